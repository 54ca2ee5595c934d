"""Pipeline schedules as data, a pure-Python validator, and the executor that runs one step.

Vocabulary (the partitioner's, see parallel/partition.py): S = pp * vpp virtual stages in pipeline
order; chunk c of pipeline rank r is virtual stage v = c * pp + r, so v lives on rank v % pp.
Activations flow v -> v + 1 (rank r -> r + 1, and rank pp - 1 -> rank 0 between chunks when
interleaving), gradients flow back v + 1 -> v.

A schedule is one list of Actions per pipeline rank (torch.distributed.pipelining's idea):
    Action("F", chunk, microbatch)   forward of that chunk on that micro-batch
    Action("B", chunk, microbatch)   its backward (input and weight gradients together)
written "0F3" (chunk 0, forward, micro-batch 3) in grids and errors.

Why our own executor rather than torch.distributed.pipelining (whose schedules do run on gloo,
DESIGN.md): our chunks return more than a tensor (the LM loss on the last stage plus MoE statistics
from every stage), the step must hand control back around each chunk's last backward (gradient
reduction overlapped with backward) and after it (tied-embedding sync), and the schedules must use
the partitioner's virtual-stage numbering so that both can be validated and printed together. Doing
that through pipelining's PipelineStage/_Action (private, and drifting between torch 2.11 and 2.13)
would cost more code than the plain P2P here.

Communication (NCCL-safe, the Megatron way). NCCL ignores tags and matches the point-to-point
messages between two ranks in the order they are posted; a send may not finish before its receive
is posted, and a rank's batched sends and receives run one batch after another on one stream. So
the executor never relies on tags or buffering: each schedule is lowered (torch.pipelining's
`_add_send_recv` idea) to explicit SEND_F / RECV_F / SEND_B / RECV_B operations, grouped into one
batch between consecutive actions - the outputs of action t - 1 leave and the inputs of action t
arrive in one `dist.batch_isend_irecv`, waited for before action t runs (Megatron's
send_forward_recv_backward) - and receives are moved ahead where a send would wait for a receive
its peer posts only later (Megatron's receive-ahead; the interleaved schedule needs it). Two
pure-Python checks guard every plan: between each pair of ranks the sends of one side equal the
receives of the other, kind, stage, micro-batch and order; and a simulation in which a batch
completes only once every peer has posted its matching operation runs to the end (no deadlock).
`validate_schedule` checks the schedule itself against the weaker model the plan is built from:
non-blocking sends, receives that block until the data exists. On gloo (the CPU tests) the same
plan runs with the same default tag everywhere, so gloo matches by order exactly like NCCL.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .context import ParallelContext
from .partition import _check_int, _check_schedule_args

KINDS = ("F", "B")


@dataclass(frozen=True)
class Action:
    """One unit of pipeline work on one rank: kind "F" | "B" of `chunk` on `microbatch`."""

    kind: str
    chunk: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.chunk}{self.kind}{self.microbatch}"


# ---------------------------------------------------------------------------------------------
# Building schedules
# ---------------------------------------------------------------------------------------------


def build_schedule(kind: str, pp: int, vpp: int, n_micro: int) -> list[list[Action]]:
    """Per-rank action lists for gpipe, 1f1b or interleaved (1F1B over vpp chunks per rank).

    gpipe:       every forward, then every backward (m micro-batches of activations alive).
    1f1b:        Megatron's forward_backward_pipelining_without_interleaving: warmup of
                 min(pp - r - 1, m) forwards, steady state of alternating F(i + warmup), B(i),
                 cooldown of the remaining backwards; at most pp - r activations alive.
    interleaved: Narayanan et al. 2021 / Megatron's interleaved schedule over m * vpp chunk-steps;
                 micro-batches go through the chunks in groups of pp (needs m % pp == 0).
    vpp > 1 only for "interleaved" (the checks are parallel/partition.py's).
    """
    return [list(rank_schedule(kind, pp, vpp, n_micro, rank)) for rank in range(pp)]


@functools.lru_cache(maxsize=1024)
def rank_schedule(kind: str, pp: int, vpp: int, n_micro: int, rank: int) -> tuple[Action, ...]:
    """Pipeline rank `rank`'s row of build_schedule, cached (immutable): the planner replays one
    rank's schedule for many layouts that share it."""
    _check_schedule_args(kind, pp, vpp, n_micro)
    if kind == "interleaved" and n_micro % pp:
        raise ValueError(f"n_micro ({n_micro}) must be a multiple of pp ({pp}) for the interleaved schedule "
                         f"(micro-batches go through the chunks in groups of pp): use n_micro in "
                         f"{{{pp}, {2 * pp}, {3 * pp}, ...}} or schedule '1f1b'")
    build = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "interleaved": _interleaved}[kind]
    return tuple(build(pp, vpp, n_micro, rank))


def _gpipe(pp: int, vpp: int, n_micro: int, rank: int) -> list[Action]:
    return [Action("F", 0, i) for i in range(n_micro)] + [Action("B", 0, i) for i in range(n_micro)]


def _one_f_one_b(pp: int, vpp: int, n_micro: int, rank: int) -> list[Action]:
    warmup = min(pp - rank - 1, n_micro)
    # 1. warmup: fill the pipeline up to this rank's depth
    actions = [Action("F", 0, i) for i in range(warmup)]
    # 2. steady state: one forward, one backward
    for i in range(n_micro - warmup):
        actions += [Action("F", 0, warmup + i), Action("B", 0, i)]
    # 3. cooldown: drain the backwards still owed
    actions += [Action("B", 0, i) for i in range(n_micro - warmup, n_micro)]
    return actions


def _interleaved(pp: int, vpp: int, n_micro: int, rank: int) -> list[Action]:
    """Megatron's count: warmup = 2 (pp - r - 1) + (vpp - 1) pp chunk-steps (capped at m * vpp).

    The k-th forward of a rank: group k // (pp vpp), position q = k % (pp vpp) in it; chunk q // pp,
    micro-batch group * pp + q % pp. The k-th backward walks the chunks in reverse order.
    """
    total = n_micro * vpp
    warmup = min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)

    def step(kind: str, k: int) -> Action:
        group, q = divmod(k, pp * vpp)
        chunk = q // pp if kind == "F" else vpp - 1 - q // pp
        return Action(kind, chunk, group * pp + q % pp)

    actions = [step("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [step("F", warmup + k), step("B", k)]
    actions += [step("B", k) for k in range(total - warmup, total)]
    return actions


# ---------------------------------------------------------------------------------------------
# Validating schedules
# ---------------------------------------------------------------------------------------------


def format_schedule(schedules: Sequence[Sequence[Action]], stuck: Sequence[int] | None = None) -> str:
    """A grid: one row per rank, one column per time slot ("0F3" = chunk 0, forward, micro-batch 3).

    `stuck[r]`: index of the action rank r cannot run (shown as [0B3]); len(row) = finished."""
    width = max([len(str(a)) for row in schedules for a in row] + [3]) + 2
    rows = []
    for r, row in enumerate(schedules):
        cells = [f"[{a}]" if stuck is not None and stuck[r] == t else f" {a} " for t, a in enumerate(row)]
        rows.append(f"rank {r:>2} | " + "".join(c.rjust(width) for c in cells))
    return "\n".join(rows)


def validate_schedule(schedules: Sequence[Sequence[Action]], pp: int, vpp: int, n_micro: int) -> None:
    """Raise ValueError (summary line, then the grid) unless the schedule can run to completion.

    Checks, in order: one list per rank; well-formed actions; every (virtual stage, micro-batch)
    has exactly one F and one B; on each rank F precedes its B; and a simulation in which a rank
    runs its next action only once its inputs exist - F of v needs F of v - 1 (same micro-batch),
    B of v needs B of v + 1 - finishes. Sends do not block in this model (the data dependencies
    alone); a simulation that stops with work left is a deadlock. Whether the sends and receives can
    be posted safely on NCCL is the communication plan's question (lower_schedule, check_plan).
    """
    _check_int("pp", pp, 1, "use pp=1 for no pipeline parallelism")
    _check_int("vpp", vpp, 1, "use vpp=1 for no interleaving")
    _check_int("n_micro", n_micro, 1, "use at least one micro-batch")
    if len(schedules) != pp:
        raise ValueError(f"schedule has {len(schedules)} rank lists but pp is {pp}: give one list per rank")
    for check in (lambda: _malformed(schedules, vpp, n_micro), lambda: _coverage(schedules, pp, vpp, n_micro),
                  lambda: _backward_first(schedules)):
        problem = check()  # in order: the later checks assume well-formed actions
        if problem:
            raise ValueError(f"invalid pipeline schedule: {problem}\n{format_schedule(schedules)}")
    stuck = _simulate(schedules, pp, vpp)
    if stuck is not None:
        blocked = ", ".join(f"rank {r} at {schedules[r][t]}" for r, t in enumerate(stuck) if t < len(schedules[r]))
        raise ValueError(f"invalid pipeline schedule: deadlock, no rank can proceed ({blocked}); "
                         f"each waits for an input another rank produces later\n{format_schedule(schedules, stuck)}")


def _malformed(schedules, vpp: int, n_micro: int) -> str:
    for r, row in enumerate(schedules):
        for t, a in enumerate(row):
            if not isinstance(a, Action) or a.kind not in KINDS:
                return f"rank {r} slot {t} holds {a!r}, not Action('F'|'B', chunk, microbatch)"
            if not (0 <= a.chunk < vpp and 0 <= a.microbatch < n_micro):
                return f"rank {r} slot {t} ({a}) is out of range: chunk < vpp ({vpp}), micro-batch < {n_micro}"
    return ""


def _coverage(schedules, pp: int, vpp: int, n_micro: int) -> str:
    seen = Counter((a.kind, a.chunk * pp + r, a.microbatch) for r, row in enumerate(schedules) for a in row)
    for kind in KINDS:
        for v in range(pp * vpp):
            for i in range(n_micro):
                if seen[(kind, v, i)] != 1:
                    return (f"{kind} of virtual stage {v} (rank {v % pp} chunk {v // pp}) on micro-batch {i} "
                            f"appears {seen[(kind, v, i)]} times; it must appear exactly once")
    return ""


def _backward_first(schedules) -> str:
    for r, row in enumerate(schedules):
        done = set()
        for t, a in enumerate(row):
            if a.kind == "B" and (a.chunk, a.microbatch) not in done:
                return f"rank {r} slot {t} runs {a} before its forward {a.chunk}F{a.microbatch}"
            done.add((a.chunk, a.microbatch))
    return ""


def _simulate(schedules, pp: int, vpp: int) -> list[int] | None:
    """Run every rank as far as its inputs allow, round after round; None = all finished, else
    each rank's position when no rank can move any more."""
    n_stages, done, pos = pp * vpp, set(), [0] * pp
    while True:
        moved = False
        for r, row in enumerate(schedules):
            while pos[r] < len(row) and _ready(row[pos[r]], r, pp, n_stages, done):
                a = row[pos[r]]
                done.add((a.kind, a.chunk * pp + r, a.microbatch))
                pos[r] += 1
                moved = True
        if all(pos[r] == len(row) for r, row in enumerate(schedules)):
            return None
        if not moved:
            return pos


def _ready(a: Action, rank: int, pp: int, n_stages: int, done: set) -> bool:
    v, i = a.chunk * pp + rank, a.microbatch
    if a.kind == "F":
        return v == 0 or ("F", v - 1, i) in done
    return ("F", v, i) in done and (v == n_stages - 1 or ("B", v + 1, i) in done)


# ---------------------------------------------------------------------------------------------
# Lowering a schedule to batched point-to-point operations
# ---------------------------------------------------------------------------------------------

P2P_OPS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
# batches[r][t]: the operations rank r posts in one batch_isend_irecv, and waits for, before its
# action t; t = len(actions[r]) is the batch after its last action (the last outputs leave).
Batches = list[list[list["P2P"]]]


@dataclass(frozen=True)
class P2P:
    """One point-to-point operation of virtual stage `stage` on `microbatch`; `peer` is the pipeline
    rank on the other side. SEND_F: the stage's output to stage + 1; RECV_F: its input from
    stage - 1; SEND_B: the gradient of its input to stage - 1; RECV_B: the gradient of its output
    from stage + 1. Written "SEND_F[2->3 mb0]" (message F from stage 2 to stage 3, micro-batch 0)."""

    op: str
    stage: int
    microbatch: int
    peer: int

    @cached_property
    def is_send(self) -> bool:
        return self.op.startswith("SEND")

    @cached_property
    def message(self) -> tuple[str, int, int, int]:
        """(kind, from stage, to stage, micro-batch): identical for a send and its matching receive."""
        kind, v = self.op[-1], self.stage
        other = v + 1 if (kind == "F") == self.is_send else v - 1
        src, dst = (v, other) if self.is_send else (other, v)
        return kind, src, dst, self.microbatch

    def __str__(self) -> str:
        kind, src, dst, i = self.message
        return f"{self.op}[{src}->{dst} mb{i}]"


def lower_schedule(schedules: Sequence[Sequence[Action]], pp: int, vpp: int,
                   receive_ahead: bool = True) -> Batches:
    """Per rank, the batches of sends and receives around its actions (see `Batches`).

    1. lower: action t receives its input in batch t and sends its output in batch t + 1, so each
       batch holds "outputs of t - 1 out, inputs of t in" - Megatron's send_forward_recv_backward
       and send_backward_recv_forward, one batch_isend_irecv each;
    2. receive ahead (receive_ahead=True): simulate the batches (see `check_plan`); wherever every
       rank is stuck and a send waits for a receive that its peer posts only in a later batch, move
       that receive - with the earlier receives from the same sender, keeping their order - into
       the peer's current batch, and go on. Posting a receive early only costs its buffer sooner.
    The schedule should pass `validate_schedule` first; `check_plan` verifies the result.
    """
    n_stages = pp * vpp
    batches = [_lower_rank(row, r, pp, n_stages) for r, row in enumerate(schedules)]
    if receive_ahead:
        _simulate_plan(batches, hoist=True)
    return batches


def _lower_rank(row: Sequence[Action], rank: int, pp: int, n_stages: int) -> list[list[P2P]]:
    batches: list[list[P2P]] = [[] for _ in range(len(row) + 1)]
    for t, a in enumerate(row):
        v, i = a.chunk * pp + rank, a.microbatch
        if a.kind == "F":
            if v > 0:
                batches[t].append(P2P("RECV_F", v, i, (v - 1) % pp))
            if v < n_stages - 1:
                batches[t + 1].append(P2P("SEND_F", v, i, (v + 1) % pp))
        else:
            if v < n_stages - 1:
                batches[t].append(P2P("RECV_B", v, i, (v + 1) % pp))
            if v > 0:
                batches[t + 1].append(P2P("SEND_B", v, i, (v - 1) % pp))
    return batches


def forward_only_schedule(pp: int, vpp: int, n: int) -> list[list[Action]]:
    """Validation: every rank runs F of (micro-batch, chunk) in increasing order, no backward."""
    return [[Action("F", c, i) for i in range(n) for c in range(vpp)] for _ in range(pp)]


# ---------------------------------------------------------------------------------------------
# Checking a communication plan
# ---------------------------------------------------------------------------------------------


def check_plan(schedules: Sequence[Sequence[Action]], batches: Batches, pp: int, vpp: int) -> None:
    """Raise a one-line ValueError naming the first problem unless the plan is safe on NCCL.

    1. shape: one batch list per rank, len(actions) + 1 batches each, well-formed operations;
    2. placement: each rank exchanges exactly the messages its actions need and produce, every
       input received in a batch at or before its action, every output sent after its action;
    3. order: for every pair of ranks, the sends of one equal the receives of the other (kind,
       stages, micro-batch) in posting order - NCCL ignores tags and matches by that order;
    4. progress: a simulation in which a rank waits for each batch to complete, and a batch
       completes once every peer has posted the matching operation (a send does not finish before
       its receive is posted), runs every rank to the end.
    """
    problem = _plan_shape(schedules, batches, pp) or _misplaced(schedules, batches, pp, pp * vpp) \
        or _order_mismatch(batches, pp)
    if problem:
        raise ValueError(f"invalid communication plan: {problem}")
    stuck = _simulate_plan(batches, hoist=False)
    if stuck is not None:
        waits = "; ".join(_why_stuck(schedules, batches, stuck, r) for r in range(pp) if stuck[r] < len(batches[r]))
        raise ValueError(f"invalid communication plan: deadlock, no batch can complete: {waits}")


def _plan_shape(schedules, batches, pp: int) -> str:
    if len(batches) != pp or len(schedules) != pp:
        return f"{len(batches)} batch lists and {len(schedules)} action lists for pp ({pp}): give one per rank"
    for r, (row, rank_batches) in enumerate(zip(schedules, batches)):
        if len(rank_batches) != len(row) + 1:
            return f"rank {r} has {len(rank_batches)} batches for {len(row)} actions: give len(actions) + 1"
        for t, batch in enumerate(rank_batches):
            for p in batch:
                if not isinstance(p, P2P) or p.op not in P2P_OPS or not 0 <= p.peer < pp:
                    return f"rank {r} batch {t} holds {p!r}, not P2P(SEND_F|RECV_F|SEND_B|RECV_B, stage, mb, peer)"
    return ""


def _misplaced(schedules, batches, pp: int, n_stages: int) -> str:
    """Compare each rank's operations with the ones its actions call for, slot by slot."""
    for r, row in enumerate(schedules):
        want = {}  # operation -> (earliest, latest) batch it may sit in
        for t, p in ((t, p) for t, b in enumerate(_lower_rank(row, r, pp, n_stages)) for p in b):
            want[p] = (t, len(row)) if p.is_send else (0, t)
        got = [(t, p) for t, b in enumerate(batches[r]) for p in b]
        for t, p in got:
            if p not in want:
                peer = f"{'to' if p.is_send else 'from'} rank {p.peer}"
                return (f"rank {r} batch {t} holds {p} {peer}, which none of its actions sends or needs "
                        f"(or a second copy)")
            lo, hi = want.pop(p)
            if not lo <= t <= hi:
                side = "after the action that produces it" if p.is_send else "at or before the action that needs it"
                return f"rank {r} posts {p} in batch {t}, but it must sit in batch {lo}..{hi} ({side})"
        if want:
            return f"rank {r} never posts {min(want, key=want.get)}, which its actions need"
    return ""


def _order_mismatch(batches: Batches, pp: int) -> str:
    sent: dict[tuple[int, int], list[P2P]] = {}  # (from rank, to rank) -> operations in posting order
    got: dict[tuple[int, int], list[P2P]] = {}
    for r, rank in enumerate(batches):
        for p in (p for b in rank for p in b):
            (sent if p.is_send else got).setdefault((r, p.peer) if p.is_send else (p.peer, r), []).append(p)
    for src, dst in sorted(set(sent) | set(got)):
        s, g = sent.get((src, dst), []), got.get((src, dst), [])
        k = next((k for k, (x, y) in enumerate(zip(s, g)) if x.message != y.message), min(len(s), len(g)))
        if k < max(len(s), len(g)):
            return (f"message {k} from rank {src} to rank {dst} differs: rank {src} sends {_nth(s, k)} but rank "
                    f"{dst} receives {_nth(g, k)}; NCCL matches by posting order (tags are ignored), so post "
                    f"them in the same order")
    return ""


def _nth(ops: list[P2P], k: int) -> str:
    return str(ops[k]) if k < len(ops) else "nothing"


def _simulate_plan(batches: Batches, hoist: bool) -> list[int] | None:
    """Run the batches as NCCL would, round after round: pos[r] = the batch rank r has posted and
    waits on (it then runs action pos[r], which never waits by itself). None = every rank finished,
    else the positions where no batch can complete. hoist=True moves receives ahead (mutating
    `batches`, see lower_schedule) instead of stopping where that helps."""
    where = {(p.is_send, p.message): (r, t) for r, rank in enumerate(batches) for t, b in enumerate(rank) for p in b}
    pos = [0] * len(batches)
    while True:
        moved = False
        for r, rank in enumerate(batches):
            while pos[r] < len(rank) and all(_posted(p, where, pos) for p in rank[pos[r]]):
                pos[r] += 1
                moved = True
        if all(pos[r] == len(rank) for r, rank in enumerate(batches)):
            return None
        if not moved and not (hoist and _receive_ahead(batches, where, pos)):
            return pos


def _posted(p: P2P, where: dict, pos: list[int]) -> bool:
    """Has the matching operation been posted? (A plan missing it fails `_misplaced` first.)"""
    rank, t = where.get((not p.is_send, p.message), (None, None))
    return rank is not None and pos[rank] >= t


def _receive_ahead(batches: Batches, where: dict, pos: list[int]) -> bool:
    """Find a send stuck on a receive that its peer posts in a later batch and move that receive
    ahead into the peer's current batch (see lower_schedule). False = no such send."""
    for r, t in enumerate(pos):
        for p in [p for p in batches[r][t] if p.is_send] if t < len(batches[r]) else []:
            dst, later = where.get((False, p.message), (r, -1))
            if later > pos[dst]:
                _move_receives(batches, where, dst, r, pos[dst], later, p.message)
                return True
    return False


def _move_receives(batches: Batches, where: dict, rank: int, src: int, into: int, later: int, message) -> None:
    """Move rank's receives from src in batches into + 1 .. later, up to and including `message`,
    to the end of batch `into`, in order (the ones they would overtake come along)."""
    pending = [(u, q) for u in range(into + 1, later + 1) for q in batches[rank][u] if not q.is_send and q.peer == src]
    last = next(k for k, (_, q) in enumerate(pending) if q.message == message)
    for u, q in pending[:last + 1]:
        batches[rank][u].remove(q)
        batches[rank][into].append(q)
        where[(False, q.message)] = (rank, into)


def _why_stuck(schedules, batches: Batches, stuck: list[int], r: int) -> str:
    t = stuck[r]
    where = {(p.is_send, p.message): (s, u) for s, rank in enumerate(batches) for u, b in enumerate(rank) for p in b}
    before = f"before {schedules[r][t]}" if t < len(schedules[r]) else "after its last action"
    for p in batches[r][t]:
        peer, u = where.get((not p.is_send, p.message), (None, None))
        if peer is not None and stuck[peer] < u:
            other = f"before {schedules[peer][u]}" if u < len(schedules[peer]) else "after its last action"
            return f"rank {r} (batch {before}) waits with {p} for rank {peer}, which posts the match only {other}"
    return f"rank {r} waits at batch {t}"


# ---------------------------------------------------------------------------------------------
# Running a schedule
# ---------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """losses[i]: micro-batch i's loss as the last virtual stage returned it (detached, NOT divided
    by n_micro); empty on ranks without the last stage. infos[c][i]: what chunk c returned beside
    its output for micro-batch i (e.g. MoE statistics), for logging."""

    losses: list[torch.Tensor]
    infos: list[list[Any]]


# chunk(x, target) -> (output, info): output = activations for the next virtual stage, or the
# scalar loss on the last one (target is None elsewhere); info is kept for logging. When the step
# is given side inputs, chunk(x, target, side) on every stage (e.g. document ids for masking).
ChunkFn = Callable[..., tuple[torch.Tensor, Any]]


class PipelineExecutor:
    """Runs this rank's chunks through one optimizer step of a pipeline schedule.

    chunks[c] is this rank's chunk c (virtual stage c * pp + pp_rank), a ChunkFn. The first virtual
    stage reads inputs[i]; the last one gets targets[i] and its returned loss is backpropagated as
    loss / n_micro, so gradients accumulate to d(mean loss) exactly as the pp=1 trainer's do.
    act_shape/act_dtype: the static activation shape between stages, [micro_batch, S(/tp under
    sequence parallelism), D]; every send is checked against it before it leaves (a size mismatch
    aborts gloo uncatchably). before_backward(chunk, is_last): called before each backward, with
    is_last True for the chunk's last backward of the step - where a gradient reducer starts
    syncing (GradReducer.prepare(sync=is_last), one reducer per chunk). `side` (step and
    forward_only): optional per-micro-batch values that every virtual stage reads, not only the
    first or last (the document ids of packed sequences mask attention in every block); with them
    each chunk is called chunk(x, target, side[i]). Every rank passes its own copy (no P2P).
    """

    def __init__(self, chunks: Sequence[ChunkFn], ctx: ParallelContext, schedule_kind: str, n_micro: int,
                 act_shape: Sequence[int], act_dtype: torch.dtype = torch.float32,
                 before_backward: Callable[[int, bool], None] | None = None):
        if len(chunks) != ctx.vpp:
            raise ValueError(f"got {len(chunks)} chunks but parallel.vpp is {ctx.vpp}: pass this rank's "
                             f"chunks c = 0 .. vpp - 1 (virtual stages c * pp + pp_rank)")
        schedules = build_schedule(schedule_kind, ctx.pp, ctx.vpp, n_micro)
        validate_schedule(schedules, ctx.pp, ctx.vpp, n_micro)
        self.chunks, self.ctx, self.n_micro = list(chunks), ctx, n_micro
        self.actions, self.batches = schedules[ctx.pp_rank], _checked_plan(schedules, ctx)
        self.act_shape, self.act_dtype = tuple(act_shape), act_dtype
        self.before_backward = before_backward
        self.n_stages = ctx.pp * ctx.vpp
        self.last_backward = {a.chunk: t for t, a in enumerate(self.actions) if a.kind == "B"}
        self._forward_plans: dict[int, tuple[list[Action], list[list[P2P]]]] = {}  # n -> forward_only's plan
        if ctx.pp > 1:  # NCCL: a group's first batch_isend_irecv must involve all its ranks; a barrier
            dist.barrier(group=ctx.pp_group)  # first makes the communicator exist before any P2P batch

    def step(self, inputs: Sequence[torch.Tensor] | None = None,
             targets: Sequence[Any] | None = None, side: Sequence[Any] | None = None) -> StepResult:
        """Run every action of this rank's schedule; inputs/targets: one entry per micro-batch,
        needed only where this rank holds the first / last virtual stage (else pass None)."""
        self._check_batch("inputs", inputs, 0)
        self._check_batch("targets", targets, self.n_stages - 1)
        self._check_side(side, self.n_micro)
        stash: dict[tuple[int, int], tuple] = {}  # (chunk, micro-batch) -> (input, output)
        result = StepResult([None] * self.n_micro, [[None] * self.n_micro for _ in self.chunks])

        def run(t: int, a: Action, inbox: dict, outbox: dict) -> None:
            if a.kind == "F":
                self._forward(a, inputs, targets, side, inbox, outbox, stash, result)
                return
            if self.before_backward is not None:
                self.before_backward(a.chunk, self.last_backward[a.chunk] == t)
            self._backward(a, inbox, outbox, stash)

        self._execute(self.actions, self.batches, run)
        result.losses = [loss for loss in result.losses if loss is not None]
        return result

    @torch.no_grad()
    def forward_only(self, n: int, inputs: Sequence[torch.Tensor] | None = None,
                     targets: Sequence[Any] | None = None, side: Sequence[Any] | None = None,
                     ) -> list[torch.Tensor]:
        """Validation: n (<= n_micro) micro-batches through every virtual stage, no backward; the
        last stage's losses come back (empty elsewhere). Every rank runs forward_only_schedule
        ((micro-batch, chunk) in increasing order) through its own checked plan, built on first use."""
        if not 1 <= n <= self.n_micro:
            raise ValueError(f"forward_only: n ({n}) must be between 1 and n_micro ({self.n_micro})")
        self._check_side(side, n)
        if n not in self._forward_plans:
            schedules = forward_only_schedule(self.ctx.pp, self.ctx.vpp, n)
            self._forward_plans[n] = schedules[self.ctx.pp_rank], _checked_plan(schedules, self.ctx)
        losses: list[torch.Tensor] = []

        def run(t: int, a: Action, inbox: dict, outbox: dict) -> None:
            v, i = self._vstage(a.chunk), a.microbatch
            x = inputs[i] if v == 0 else inbox.pop(("F", v - 1, v, i))
            last = v == self.n_stages - 1
            y, _ = self._call(a.chunk, x, targets[i] if last else None, side, i)
            if last:
                losses.append(y.detach())
            else:
                outbox[("F", v, v + 1, i)] = self._outgoing(y.detach(), "F", v)

        self._execute(*self._forward_plans[n], run)
        return losses

    # ------------------------------------------------------------ actions
    def _call(self, chunk: int, x: torch.Tensor, target: Any, side,
              i: int) -> tuple[torch.Tensor, Any]:
        if side is None:
            return self.chunks[chunk](x, target)
        return self.chunks[chunk](x, target, side[i])

    def _forward(self, a: Action, inputs, targets, side, inbox, outbox, stash,
                 result: StepResult) -> None:
        v, i = self._vstage(a.chunk), a.microbatch
        x = inputs[i] if v == 0 else inbox.pop(("F", v - 1, v, i)).requires_grad_(True)
        last = v == self.n_stages - 1
        y, info = self._call(a.chunk, x, targets[i] if last else None, side, i)
        result.infos[a.chunk][i] = info
        if last:
            if y.numel() != 1:
                raise ValueError(f"the last virtual stage must return a scalar loss, got shape {tuple(y.shape)}: "
                                 f"return (loss, info) from its chunk function")
            result.losses[i] = y.detach()
        else:
            outbox[("F", v, v + 1, i)] = self._outgoing(y.detach(), "F", v)
        stash[(a.chunk, i)] = (x, y)

    def _backward(self, a: Action, inbox, outbox, stash) -> None:
        v, i = self._vstage(a.chunk), a.microbatch
        x, y = stash.pop((a.chunk, i))
        if v == self.n_stages - 1:
            torch.autograd.backward(y / self.n_micro)
        else:
            torch.autograd.backward(y, inbox.pop(("B", v + 1, v, i)))
        if v > 0:
            grad = x.grad if x.grad is not None else torch.zeros_like(x)
            outbox[("B", v, v - 1, i)] = self._outgoing(grad, "B", v)

    # ------------------------------------------------------------ point-to-point
    def _vstage(self, chunk: int) -> int:
        return chunk * self.ctx.pp + self.ctx.pp_rank

    def _execute(self, actions: Sequence[Action], batches: Sequence[Sequence[P2P]], run_action) -> None:
        """The plan's semantics (see check_plan): post batch t, wait for all of it, run action t.
        inbox: received tensors by message until an action takes them; outbox: outputs until they leave."""
        inbox: dict[tuple, torch.Tensor] = {}
        outbox: dict[tuple, torch.Tensor] = {}
        for t, batch in enumerate(batches):
            self._exchange(batch, inbox, outbox)
            if t < len(actions):
                run_action(t, actions[t], inbox, outbox)

    def _exchange(self, batch: Sequence[P2P], inbox: dict, outbox: dict) -> None:
        """One batch_isend_irecv for the whole batch, in the plan's order, waited for in full (on
        NCCL the wait orders the compute stream after the transfers; tags stay at the default)."""
        if not batch:
            return
        ops = []
        for p in batch:
            peer = self.ctx.pp_ranks[p.peer]
            if p.is_send:
                ops.append(dist.P2POp(dist.isend, outbox.pop(p.message), peer, self.ctx.pp_group))
            else:
                inbox[p.message] = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.ctx.device)
                ops.append(dist.P2POp(dist.irecv, inbox[p.message], peer, self.ctx.pp_group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def _outgoing(self, t: torch.Tensor, kind: str, from_v: int) -> torch.Tensor:
        """Check what virtual stage from_v sends against act_shape before it leaves (a size mismatch
        aborts gloo uncatchably) and make it contiguous for the transport."""
        if tuple(t.shape) != self.act_shape or t.dtype != self.act_dtype:
            what = "activations" if kind == "F" else "input gradients"
            raise ValueError(f"virtual stage {from_v} produced {what} of shape {tuple(t.shape)} {t.dtype}, but the "
                             f"executor was built for act_shape {self.act_shape} {self.act_dtype}: pass "
                             f"[micro_batch, seq(/tp with sequence parallelism), d_model]")
        return t.contiguous()

    def _check_side(self, side, n: int) -> None:
        if side is not None and len(side) != n:
            raise ValueError(f"side has {len(side)} entries but {n} micro-batches run: pass one "
                             f"entry per micro-batch on every rank, or None")

    def _check_batch(self, name: str, values, v: int) -> None:
        if v % self.ctx.pp != self.ctx.pp_rank:
            return
        if values is None or len(values) != self.n_micro:
            got = "None" if values is None else f"{len(values)} entries"
            raise ValueError(f"{name} is {got} but this rank holds virtual stage {v}: pass one entry per "
                             f"micro-batch ({self.n_micro})")


def _checked_plan(schedules: Sequence[Sequence[Action]], ctx: ParallelContext) -> list[list[P2P]]:
    """This rank's batches of a lowered and checked plan (every rank derives the same whole plan)."""
    batches = lower_schedule(schedules, ctx.pp, ctx.vpp)
    check_plan(schedules, batches, ctx.pp, ctx.vpp)
    return batches[ctx.pp_rank]
