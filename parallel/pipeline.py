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
would cost more code than the ~150 lines of plain P2P here.

Communication model (what `validate_schedule` simulates): sends are posted with `isend` as soon as
an output exists and are only waited for at the end of the step; receives block until the data
arrives. A rank therefore never waits on a send, and the schedule is deadlock-free exactly when the
simulation of blocking receives over the action lists completes. (With rendezvous sends, as gloo's
blocking `send` is, plain 1F1B deadlocks in its steady state: rank r sends F(i + 1) forward while
rank r + 1 sends B(i) back; Megatron avoids that by fusing each send with the opposite receive.)
Every message carries its own tag (kind, virtual stage, micro-batch), so matching never depends on
posting order. On gloo this was measured (two ranks, isend first, receive in another order). NCCL
serialises send/recv to one peer on one stream; running this executor there would need the paired
batch_isend_irecv of Megatron, which cannot be tested on the CPU machine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
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
    _check_schedule_args(kind, pp, vpp, n_micro)
    if kind == "interleaved" and n_micro % pp:
        raise ValueError(f"n_micro ({n_micro}) must be a multiple of pp ({pp}) for the interleaved schedule "
                         f"(micro-batches go through the chunks in groups of pp): use n_micro in "
                         f"{{{pp}, {2 * pp}, {3 * pp}, ...}} or schedule '1f1b'")
    build = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "interleaved": _interleaved}[kind]
    return [build(pp, vpp, n_micro, rank) for rank in range(pp)]


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
    B of v needs B of v + 1 - finishes. Sends never block (see the module docstring), so a
    simulation that stops with work left is a deadlock.
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
# scalar loss on the last one (target is None elsewhere); info is kept for logging.
ChunkFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


class PipelineExecutor:
    """Runs this rank's chunks through one optimizer step of a pipeline schedule.

    chunks[c] is this rank's chunk c (virtual stage c * pp + pp_rank), a ChunkFn. The first virtual
    stage reads inputs[i]; the last one gets targets[i] and its returned loss is backpropagated as
    loss / n_micro, so gradients accumulate to d(mean loss) exactly as the pp=1 trainer's do.
    act_shape/act_dtype: the static activation shape between stages, [micro_batch, S(/tp under
    sequence parallelism), D]; every send is checked against it before it leaves (a size mismatch
    aborts gloo uncatchably). before_backward(chunk, is_last): called before each backward, with
    is_last True for the chunk's last backward of the step - where a gradient reducer starts
    syncing (GradReducer.prepare(sync=is_last), one reducer per chunk).
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
        self.actions = schedules[ctx.pp_rank]
        self.act_shape, self.act_dtype = tuple(act_shape), act_dtype
        self.before_backward = before_backward
        self.n_stages = ctx.pp * ctx.vpp
        self.last_backward = {a.chunk: t for t, a in enumerate(self.actions) if a.kind == "B"}

    def step(self, inputs: Sequence[torch.Tensor] | None = None,
             targets: Sequence[Any] | None = None) -> StepResult:
        """Run every action of this rank's schedule; inputs/targets: one entry per micro-batch,
        needed only where this rank holds the first / last virtual stage (else pass None)."""
        self._check_batch("inputs", inputs, 0)
        self._check_batch("targets", targets, self.n_stages - 1)
        stash: dict[tuple[int, int], tuple] = {}  # (chunk, micro-batch) -> (input, output)
        sends: list = []
        result = StepResult([None] * self.n_micro, [[None] * self.n_micro for _ in self.chunks])
        for t, a in enumerate(self.actions):
            if a.kind == "F":
                self._forward(a, inputs, targets, stash, sends, result)
            else:
                if self.before_backward is not None:
                    self.before_backward(a.chunk, self.last_backward[a.chunk] == t)
                self._backward(a, stash, sends)
            sends = [work for work in sends if not work.is_completed()]  # free delivered buffers
        for work in sends:
            work.wait()
        result.losses = [loss for loss in result.losses if loss is not None]
        return result

    @torch.no_grad()
    def forward_only(self, n: int, inputs: Sequence[torch.Tensor] | None = None,
                     targets: Sequence[Any] | None = None) -> list[torch.Tensor]:
        """Validation: n (<= n_micro) micro-batches through every virtual stage, no backward; the
        last stage's losses come back (empty elsewhere). Each rank visits (micro-batch, virtual
        stage) in increasing order and sends only flow forward, so a receive always waits on work
        that is earlier in that order: no deadlock, whatever vpp is."""
        if not 1 <= n <= self.n_micro:
            raise ValueError(f"forward_only: n ({n}) must be between 1 and n_micro ({self.n_micro})")
        losses, sends = [], []
        for i in range(n):
            for c, chunk in enumerate(self.chunks):
                v = self._vstage(c)
                x = inputs[i] if v == 0 else self._recv("F", v, i)
                last = v == self.n_stages - 1
                y, _ = chunk(x, targets[i] if last else None)
                if last:
                    losses.append(y.detach())
                else:
                    sends.append(self._send(y.detach(), "F", v + 1, i))
        for work in sends:
            work.wait()
        return losses

    # ------------------------------------------------------------ actions
    def _forward(self, a: Action, inputs, targets, stash, sends, result: StepResult) -> None:
        v = self._vstage(a.chunk)
        if v == 0:
            x = inputs[a.microbatch]
        else:
            x = self._recv("F", v, a.microbatch).requires_grad_(True)
        last = v == self.n_stages - 1
        y, info = self.chunks[a.chunk](x, targets[a.microbatch] if last else None)
        result.infos[a.chunk][a.microbatch] = info
        if last:
            if y.numel() != 1:
                raise ValueError(f"the last virtual stage must return a scalar loss, got shape {tuple(y.shape)}: "
                                 f"return (loss, info) from its chunk function")
            result.losses[a.microbatch] = y.detach()
        else:
            sends.append(self._send(y.detach(), "F", v + 1, a.microbatch))
        stash[(a.chunk, a.microbatch)] = (x, y)

    def _backward(self, a: Action, stash, sends) -> None:
        v = self._vstage(a.chunk)
        x, y = stash.pop((a.chunk, a.microbatch))
        if v == self.n_stages - 1:
            torch.autograd.backward(y / self.n_micro)
        else:
            torch.autograd.backward(y, self._recv("B", v, a.microbatch))
        if v > 0:
            grad = x.grad if x.grad is not None else torch.zeros_like(x)
            sends.append(self._send(grad, "B", v - 1, a.microbatch))

    # ------------------------------------------------------------ point-to-point
    def _vstage(self, chunk: int) -> int:
        return chunk * self.ctx.pp + self.ctx.pp_rank

    def _tag(self, kind: str, v: int, microbatch: int) -> int:
        """Unique per message of a step: activations INTO v, or gradients INTO v."""
        return 2 * (v * self.n_micro + microbatch) + (kind == "B")

    def _send(self, t: torch.Tensor, kind: str, to_v: int, microbatch: int):
        """isend t to the rank of virtual stage to_v; returns the work to wait on at step end."""
        if tuple(t.shape) != self.act_shape or t.dtype != self.act_dtype:
            what = "activations" if kind == "F" else "input gradients"
            raise ValueError(f"virtual stage {to_v - 1 if kind == 'F' else to_v + 1} produced {what} of shape "
                             f"{tuple(t.shape)} {t.dtype}, but the executor was built for act_shape {self.act_shape} "
                             f"{self.act_dtype}: pass [micro_batch, seq(/tp with sequence parallelism), d_model]")
        dst = self.ctx.pp_ranks[to_v % self.ctx.pp]
        return dist.isend(t.contiguous(), dst=dst, group=self.ctx.pp_group, tag=self._tag(kind, to_v, microbatch))

    def _recv(self, kind: str, v: int, microbatch: int) -> torch.Tensor:
        """Blocking receive of what virtual stage v needs: F from v - 1, B from v + 1."""
        src_v = v - 1 if kind == "F" else v + 1
        buf = torch.empty(self.act_shape, dtype=self.act_dtype, device=self.ctx.device)
        dist.recv(buf, src=self.ctx.pp_ranks[src_v % self.ctx.pp], group=self.ctx.pp_group,
                  tag=self._tag(kind, v, microbatch))
        return buf

    def _check_batch(self, name: str, values, v: int) -> None:
        if v % self.ctx.pp != self.ctx.pp_rank:
            return
        if values is None or len(values) != self.n_micro:
            got = "None" if values is None else f"{len(values)} entries"
            raise ValueError(f"{name} is {got} but this rank holds virtual stage {v}: pass one entry per "
                             f"micro-batch ({self.n_micro})")
