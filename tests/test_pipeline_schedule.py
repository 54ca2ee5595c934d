"""Spec for parallel/pipeline.py schedules and validator, moe/stages.py costs, and the executor on
one process (the multi-rank runs are in tests/distributed/test_pipeline.py).

Oracles: hand-written schedules and warmup tables (Megatron's counts), the activation-memory
formula of parallel/partition.py (written independently of the schedules), FLOP counts spelled out
matmul by matmul, a plain micro-batch loop for the executor, and for the communication plans
(lower_schedule / check_plan) an independent replay of NCCL's matching rules: one FIFO channel per
ordered pair of ranks, the k-th send meets the k-th receive, tags play no part.
"""

from collections import Counter

import pytest
import torch

from moe.config import ModelConfig, get_preset
from moe.model import build_model
from moe.stages import (build_stage_chunks, embedding_cost, head_cost, layer_costs, merge_stage_stats, plan_stages,
                        stage_chunk_fn)
from parallel.context import ParallelContext
from parallel.partition import activation_microbatches_in_flight
from parallel.pipeline import (P2P, Action, PipelineExecutor, build_schedule, check_plan, format_schedule,
                               forward_only_schedule, lower_schedule, validate_schedule)


def parse(rows: list[str]) -> list[list[Action]]:
    """["0F0 0B0", ...] -> action lists (chunk, kind, micro-batch), the grid notation."""
    return [[Action(cell[1], int(cell[0]), int(cell[2:])) for cell in row.split()] for row in rows]


def grid_cases():
    for pp in range(1, 5):
        for m in range(1, 7):
            yield "gpipe", pp, 1, m
            yield "1f1b", pp, 1, m
    for pp in range(2, 5):
        for vpp in (1, 2, 3):
            for m in (pp, 2 * pp, 3 * pp):
                yield "interleaved", pp, vpp, m


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("kind,pp,vpp,m", list(grid_cases()))
def test_schedules_validate_and_hold_every_action_once(kind, pp, vpp, m):
    schedules = build_schedule(kind, pp, vpp, m)
    validate_schedule(schedules, pp, vpp, m)
    for row in schedules:
        assert sorted((a.kind, a.chunk, a.microbatch) for a in row) == sorted(
            (k, c, i) for k in "FB" for c in range(vpp) for i in range(m))


@pytest.mark.parametrize("kind,pp,vpp,m", list(grid_cases()))
def test_peak_activations_match_partition_formula(kind, pp, vpp, m):
    """Forwards alive at once on each rank = the memory formula the planner reports."""
    for rank, row in enumerate(build_schedule(kind, pp, vpp, m)):
        alive = peak = 0
        for a in row:
            alive += 1 if a.kind == "F" else -1
            peak = max(peak, alive)
        assert peak == activation_microbatches_in_flight(kind, pp, vpp, m, rank), (rank, format_schedule([row]))


@pytest.mark.parametrize("pp,m,leading", [(4, 8, [4, 3, 2, 1]), (4, 2, [2, 2, 2, 1]), (2, 1, [1, 1]),
                                          (3, 5, [3, 2, 1])])
def test_1f1b_warmup_is_pp_minus_rank_minus_1(pp, m, leading):
    """Forwards before the first backward = warmup (pp - r - 1, capped at m) + the steady state's first."""
    for rank, row in enumerate(build_schedule("1f1b", pp, 1, m)):
        first_b = next(t for t, a in enumerate(row) if a.kind == "B")
        assert first_b == leading[rank]
        assert all(a.kind == "F" for a in row[:first_b])


def test_exact_schedules():
    assert build_schedule("1f1b", 2, 1, 3) == parse(["0F0 0F1 0B0 0F2 0B1 0B2", "0F0 0B0 0F1 0B1 0F2 0B2"])
    assert build_schedule("gpipe", 2, 1, 2) == parse(["0F0 0F1 0B0 0B1"] * 2)
    # Megatron interleaved, pp=2 vpp=2 m=2: warmup 2(pp-r-1)+(vpp-1)pp = 4 on rank 0 (all), 2 on rank 1
    assert build_schedule("interleaved", 2, 2, 2) == parse(["0F0 0F1 1F0 1F1 1B0 1B1 0B0 0B1",
                                                            "0F0 0F1 1F0 1B0 1F1 1B1 0B0 0B1"])


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match=r"n_micro \(6\) must be a multiple of pp \(4\) for the interleaved"):
        build_schedule("interleaved", 4, 2, 6)
    with pytest.raises(ValueError, match=r"vpp \(2\) > 1 applies only to schedule 'interleaved'"):
        build_schedule("1f1b", 2, 2, 4)
    with pytest.raises(ValueError, match=r"schedule \('zb'\) must be one of gpipe, 1f1b, interleaved"):
        build_schedule("zb", 2, 1, 4)
    with pytest.raises(ValueError, match=r"n_microbatches \(0\) must be >= 1"):
        build_schedule("gpipe", 2, 1, 0)


# ----------------------------------------------------------------------------- validator

def test_validator_detects_deadlock_from_swapped_actions():
    schedules = build_schedule("gpipe", 2, 1, 2)
    row = schedules[0]
    row[1], row[2] = row[2], row[1]  # rank 0: 0F0 0B0 0F1 0B1 - waits for 0B0 while rank 1 waits for 0F1
    with pytest.raises(ValueError, match=r"deadlock, no rank can proceed \(rank 0 at 0B0, rank 1 at 0F1\)") as err:
        validate_schedule(schedules, 2, 1, 2)
    assert "rank  0 |  0F0 [0B0] 0F1  0B1" in str(err.value)  # the grid marks where each rank is stuck
    assert "rank  1 |  0F0 [0F1] 0B0  0B1" in str(err.value)


def test_validator_detects_cross_chunk_deadlock():
    """Interleaved pp=2 vpp=2: rank 0 runs 0B0 before 1F0, but 0B0 needs the gradient of virtual
    stage 1, which needs stage 2's backward (rank 0 chunk 1), which needs 1F0: a cycle."""
    schedules = build_schedule("interleaved", 2, 2, 2)
    schedules[0].remove(Action("B", 0, 0))
    schedules[0].insert(2, Action("B", 0, 0))
    with pytest.raises(ValueError, match=r"deadlock, no rank can proceed \(rank 0 at 0B0, rank 1 at 1F0\)"):
        validate_schedule(schedules, 2, 2, 2)
    schedules = build_schedule("interleaved", 2, 2, 2)
    row = schedules[1]
    row[2], row[3] = row[3], row[2]  # rank 1: 1B0 before its own 1F0
    with pytest.raises(ValueError, match=r"rank 1 slot 2 runs 1B0 before its forward 1F0"):
        validate_schedule(schedules, 2, 2, 2)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s[1].remove(Action("B", 0, 1)),
     r"B of virtual stage 1 \(rank 1 chunk 0\) on micro-batch 1 appears 0 times"),
    (lambda s: s[0].append(Action("F", 0, 0)), r"F of virtual stage 0 .* appears 2 times"),
    (lambda s: s[0].append(Action("F", 1, 0)), r"rank 0 slot 8 \(1F0\) is out of range: chunk < vpp \(1\)"),
    (lambda s: s[0].append("0F0"), r"rank 0 slot 8 holds '0F0', not Action"),
    (lambda s: s.pop(), r"schedule has 1 rank lists but pp is 2"),
])
def test_validator_rejects_malformed_schedules(edit, message):
    schedules = build_schedule("1f1b", 2, 1, 4)
    edit(schedules)
    with pytest.raises(ValueError, match=message):
        validate_schedule(schedules, 2, 1, 4)


# ----------------------------------------------------------------------------- costs and stages

SMALL = dict(vocab_size=50, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=8)


def test_layer_costs_count_matmuls_and_attention():
    S, D, F, dh = 4, 8, 16, 4
    attn = 2 * D * (2 * dh) + 2 * D * dh * 2 + 2 * (2 * dh) * D + 2 * 2 * (2 * dh) * (1 + 2 + 3 + 4) / S
    assert layer_costs(ModelConfig(**SMALL), S) == pytest.approx([S * (attn + 3 * 2 * D * F)] * 2)
    gelu = ModelConfig(**SMALL, mlp="gelu")
    assert layer_costs(gelu, S)[0] == pytest.approx(S * (attn + 2 * 2 * D * F))
    moe = ModelConfig(**SMALL, n_experts=4, top_k=2, expert_ffn_dim=8, moe_every=2, shared_expert_ffn_dim=4)
    routed = 2 * D * 4 + 2 * (3 * 2 * D * 8) + 3 * 2 * D * 4  # router, 2 of 4 experts, shared expert
    assert layer_costs(moe, S) == pytest.approx([S * (attn + 3 * 2 * D * F), S * (attn + routed)])
    banded = ModelConfig(**SMALL, local_window=2, local_layers="odd")  # layer 1 attends to 1, 2, 2, 2 keys
    band_attn = attn - 2 * 2 * (2 * dh) * (10 - 7) / S
    assert layer_costs(banded, S)[1] == pytest.approx(S * (band_attn + 3 * 2 * D * F))
    assert embedding_cost(ModelConfig(**SMALL), S) == S * D
    assert head_cost(ModelConfig(**SMALL, vocab_pad_multiple=64), S) == 2 * S * D * 64
    with pytest.raises(ValueError, match=r"seq_len \(9\) must be in \[1, model.max_seq_len \(8\)\]"):
        layer_costs(ModelConfig(**SMALL), 9)


def test_plan_stages_uses_costs():
    """GPT-2 small's head (2 D V = 77M FLOPs per token) outweighs a block: the last stage gets fewer."""
    partition = plan_stages(get_preset("gpt2-small"), 4, 1, 1024)
    counts = [len(s) for s in partition]
    assert sum(counts) == 12 and counts[-1] < min(counts[:-1]), counts
    assert plan_stages(ModelConfig(**dict(SMALL, n_layers=4)), 2, 1, 4, stage_layers=[1, 3]) == [[0], [1, 2, 3]]


def test_build_stage_chunks_single_process_is_the_whole_model():
    cfg = ModelConfig(**dict(SMALL, n_layers=3))
    (chunk,) = build_stage_chunks(cfg, ParallelContext.single(), [[0, 1, 2]], seed=3)
    whole = build_model(cfg, seed=3)
    assert chunk.pre and chunk.post
    assert all(torch.equal(p, q) for p, q in zip(chunk.parameters(), whole.parameters()))
    with pytest.raises(ValueError, match=r"partition has 2 virtual stages but parallel.pp \* parallel.vpp is 1"):
        build_stage_chunks(cfg, ParallelContext.single(), [[0], [1, 2]])
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        build_stage_chunks(cfg, ParallelContext.single(), [[0, 1]])


# ----------------------------------------------------------------------------- executor, one process

@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
def test_executor_single_process_matches_plain_loop(kind):
    """pp=1: no communication; losses, gradients (including the MoE aux-loss gradients) and stats
    equal a plain loop of loss / m backward passes."""
    cfg = ModelConfig(**SMALL, n_experts=4, top_k=2, expert_ffn_dim=8, tie_embeddings=True)
    m, tokens = 3, torch.randint(0, 50, (3, 2, 5), generator=torch.Generator().manual_seed(0))
    ref, model = build_model(cfg, seed=1), build_model(cfg, seed=1)
    ref_losses, ref_aux = [], 0.0
    for mb in tokens:
        out = ref(mb[:, :-1], mb[:, 1:], aux_grad_scale=1 / m)
        (out.loss / m).backward()
        ref_losses.append(out.loss.item())
        ref_aux += float(out.aux_loss)
    calls = []
    executor = PipelineExecutor([stage_chunk_fn(model, 1 / m)], ParallelContext.single(), kind, m, (2, 4, 8),
                                before_backward=lambda c, last: calls.append((c, last)))
    result = executor.step([mb[:, :-1] for mb in tokens], [mb[:, 1:] for mb in tokens])
    assert [float(x) for x in result.losses] == pytest.approx(ref_losses, rel=1e-6)
    assert float(merge_stage_stats(result.infos, cfg.n_layers, cfg.n_experts)["aux_loss"]) == pytest.approx(ref_aux, rel=1e-6)
    assert calls == [(0, False), (0, False), (0, True)]
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_executor_argument_errors():
    model, ctx = build_model(ModelConfig(**SMALL)), ParallelContext.single()
    with pytest.raises(ValueError, match=r"got 2 chunks but parallel.vpp is 1"):
        PipelineExecutor([stage_chunk_fn(model, 1.0)] * 2, ctx, "1f1b", 2, (1, 4, 8))
    executor = PipelineExecutor([stage_chunk_fn(model, 1.0)], ctx, "1f1b", 2, (1, 4, 8))
    with pytest.raises(ValueError, match=r"inputs is 1 entries but this rank holds virtual stage 0"):
        executor.step([torch.zeros(1, 4, dtype=torch.long)], None)
    with pytest.raises(ValueError, match=r"targets is None but this rank holds virtual stage 0"):
        executor.step([torch.zeros(1, 4, dtype=torch.long)] * 2, None)


# ----------------------------------------------------------------------------- communication plan

def _messages(a: Action, rank: int, pp: int, n_stages: int):
    """(message action a needs or None, message it makes or None), as (kind, from, to, micro-batch)."""
    v, i = a.chunk * pp + rank, a.microbatch
    if a.kind == "F":
        return (("F", v - 1, v, i) if v > 0 else None), (("F", v, v + 1, i) if v < n_stages - 1 else None)
    return (("B", v + 1, v, i) if v < n_stages - 1 else None), (("B", v, v - 1, i) if v > 0 else None)


def replay(schedules, batches, pp: int, vpp: int) -> str:
    """Independent oracle: NCCL's rules replayed literally, message identities used only to check.

    Each directed pair of ranks is a FIFO channel: the k-th send posted on it meets the k-th receive
    posted for it (tags play no part). A rank posts batch t once batch t - 1 is done and action
    t - 1 ran; a batch is done when each of its operations has met its partner. Returns "ok",
    "deadlock", "mismatch" (partners carry different messages), "no input" (an action runs before
    its input arrived) or "not produced" (a send is posted before the action that makes its data)."""
    channel = {}  # (src, dst) -> ([sent messages], [expected messages]) in posting order
    posted = [[] for _ in range(pp)]  # posted[r]: (channel, side, k, op) for r's current batch
    pos, arrived, made = [-1] * pp, [set() for _ in range(pp)], [set() for _ in range(pp)]

    def post(r: int) -> bool:  # False: a send whose data does not exist yet
        pos[r] += 1
        posted[r] = []
        for p in batches[r][pos[r]] if pos[r] < len(batches[r]) else []:
            key, side = ((r, p.peer), 0) if p.is_send else ((p.peer, r), 1)
            queues = channel.setdefault(key, ([], []))
            posted[r].append((key, side, len(queues[side]), p))
            queues[side].append(p.message)
        return all(p.message in made[r] for _, _, _, p in posted[r] if p.is_send)

    def done(r: int) -> bool:
        return pos[r] < len(batches[r]) and all(len(channel[key][1 - side]) > k for key, side, k, _ in posted[r])

    if not all(post(r) for r in range(pp)):
        return "not produced"
    while any(done(r) for r in range(pp)):
        for r in (r for r in range(pp) if done(r)):
            if any(channel[key][0][k] != channel[key][1][k] for key, _, k, _ in posted[r]):
                return "mismatch"
            arrived[r] |= {p.message for _, _, _, p in posted[r] if not p.is_send}
            if pos[r] < len(schedules[r]):
                need, makes = _messages(schedules[r][pos[r]], r, pp, pp * vpp)
                if need is not None and need not in arrived[r]:
                    return "no input"
                made[r].add(makes)
            if not post(r):
                return "not produced"
    return "ok" if all(pos[r] == len(batches[r]) for r in range(pp)) else "deadlock"


def plan_cases():
    for kind, pp, vpp, m in grid_cases():
        yield kind, pp, vpp, m, build_schedule(kind, pp, vpp, m)
        if kind != "1f1b":  # forward-only plans: gpipe's and interleaved's (pp, vpp, m) grid
            yield "forward-only", pp, vpp, m, forward_only_schedule(pp, vpp, m)


@pytest.mark.parametrize("kind,pp,vpp,m,schedules", list(plan_cases()))
def test_plans_match_pairwise_and_complete_under_nccl_rules(kind, pp, vpp, m, schedules):
    batches = lower_schedule(schedules, pp, vpp)
    check_plan(schedules, batches, pp, vpp)
    assert replay(schedules, batches, pp, vpp) == "ok"
    for r in range(pp):  # every message crosses once: out of one rank, into its neighbour
        sends = [p.message for b in batches[r] for p in b if p.is_send]
        recvs = [p.message for b in batches[r] for p in b if not p.is_send]
        assert len(set(sends)) == len(sends) and len(set(recvs)) == len(recvs)
        assert all(msg[1] % pp == r and msg[2] == msg[1] + (1 if msg[0] == "F" else -1) for msg in sends)
    if kind != "interleaved" or vpp == 1:  # no receive moved ahead: Megatron's plain 1F1B pairing
        assert batches == lower_schedule(schedules, pp, vpp, receive_ahead=False)


def test_1f1b_plan_pairs_sends_with_the_opposite_receives():
    """Megatron's send_forward_recv_backward / send_backward_recv_forward, pp=2 m=3: in the steady
    state rank 0 sends F(i+1) together with receiving B(i), while rank 1 sends B(i) together with
    receiving F(i+1) - the exchange that deadlocks NCCL when posted as separate operations."""
    rank0 = [[], ["SEND_F[0->1 mb0]"], ["SEND_F[0->1 mb1]", "RECV_B[1->0 mb0]"], [],
             ["SEND_F[0->1 mb2]", "RECV_B[1->0 mb1]"], ["RECV_B[1->0 mb2]"], []]  # 0F0 0F1 0B0 0F2 0B1 0B2
    rank1 = [["RECV_F[0->1 mb0]"], [], ["SEND_B[1->0 mb0]", "RECV_F[0->1 mb1]"], [],
             ["SEND_B[1->0 mb1]", "RECV_F[0->1 mb2]"], [], ["SEND_B[1->0 mb2]"]]  # 0F0 0B0 0F1 0B1 0F2 0B2
    batches = lower_schedule(build_schedule("1f1b", 2, 1, 3), 2, 1)
    assert [[[str(p) for p in b] for b in rank] for rank in batches] == [rank0, rank1]


def test_interleaved_needs_receive_ahead():
    """pp=2 vpp=2 m=4 lowered naively deadlocks on NCCL: rank 0 sends the gradient 2->1 (after 1B0)
    and waits for rank 1 to receive it, which rank 1 posts only before 0B0, after sending it the
    gradient 3->2 that rank 0 receives only after 0F3. Receive-ahead moves rank 1's receive into
    the batch it is waiting in (before 0F2), as Megatron's interleaved schedule posts it."""
    schedules = build_schedule("interleaved", 2, 2, 4)
    naive = lower_schedule(schedules, 2, 2, receive_ahead=False)
    assert replay(schedules, naive, 2, 2) == "deadlock"
    with pytest.raises(ValueError, match=r"deadlock, no batch can complete: rank 0 \(batch before 0F3\) waits with "
                                         r"SEND_B\[2->1 mb0\] for rank 1, which posts the match only before 0B0"):
        check_plan(schedules, naive, 2, 2)
    batches = lower_schedule(schedules, 2, 2)
    assert schedules[1][6] == Action("F", 0, 2)
    assert [str(p) for p in batches[1][6]] == ["SEND_B[3->2 mb1]", "RECV_F[0->1 mb2]", "RECV_B[2->1 mb0]"]
    assert [str(p) for p in naive[1][6]] == ["SEND_B[3->2 mb1]", "RECV_F[0->1 mb2]"]


def _move(rank: int, src: int, dst: int, op: str):
    """An edit that moves the operation written `op` of `rank` from batch src to the end of batch dst."""
    def edit(batches):
        (p,) = [p for p in batches[rank][src] if str(p) == op]
        batches[rank][src].remove(p)
        batches[rank][dst].append(p)
    return edit


@pytest.mark.parametrize("edit,verdict,message", [
    # rank 0 receives B mb1 ahead of B mb0, while rank 1 sends them in micro-batch order
    (_move(0, 4, 1, "RECV_B[1->0 mb1]"), "mismatch",
     r"message 0 from rank 1 to rank 0 differs: rank 1 sends SEND_B\[1->0 mb0\] but rank 0 receives "
     r"RECV_B\[1->0 mb1\]; NCCL matches by posting order"),
    # rank 0 posts both backward receives with its first send: 1B1 needs 1F1, which rank 0 sends later
    (lambda b: [_move(0, 2, 1, "RECV_B[1->0 mb0]")(b), _move(0, 4, 1, "RECV_B[1->0 mb1]")(b)], "deadlock",
     r"deadlock, no batch can complete: rank 0 \(batch before 0F1\) waits with RECV_B\[1->0 mb1\] for rank 1, "
     r"which posts the match only before 0F2"),
    (_move(1, 2, 3, "RECV_F[0->1 mb1]"), "no input",
     r"rank 1 posts RECV_F\[0->1 mb1\] in batch 3, but it must sit in batch 0..2 \(at or before the action"),
    (_move(0, 2, 1, "SEND_F[0->1 mb1]"), "not produced",
     r"rank 0 posts SEND_F\[0->1 mb1\] in batch 1, but it must sit in batch 2..6 \(after the action"),
    (lambda b: b[0][4].pop(0), "deadlock", r"rank 0 never posts SEND_F\[0->1 mb2\], which its actions need"),
    (lambda b: b[1][0].append(P2P("RECV_F", 1, 0, 0)), "mismatch", r"rank 1 batch 0 holds RECV_F\[0->1 mb0\] "
     r"from rank 0, which none of its actions sends or needs \(or a second copy\)"),
    (lambda b: b[1][0].append(P2P("RECV_F", 1, 0, 1)), "deadlock", r"rank 1 batch 0 holds RECV_F\[0->1 mb0\] "
     r"from rank 1, which"),
    (lambda b: b[1].pop(), "ok", r"rank 1 has 6 batches for 6 actions: give len\(actions\) \+ 1"),
])
def test_broken_plans_are_detected(edit, verdict, message):
    """Hand-broken 1F1B plans (pp=2, m=3; the batches are in the test above): check_plan names the
    problem, and the independent replay agrees that the plan would not run (or how it fails)."""
    schedules = build_schedule("1f1b", 2, 1, 3)
    batches = lower_schedule(schedules, 2, 1)
    edit(batches)
    if verdict != "ok":  # (the truncated plan is only a shape error for check_plan)
        assert replay(schedules, batches, 2, 1) == verdict
    with pytest.raises(ValueError, match=r"invalid communication plan: " + message):
        check_plan(schedules, batches, 2, 1)


def test_check_plan_agrees_with_replay_on_random_edits():
    """Move random operations to random batches of the same rank (sends later, receives earlier, or
    anywhere): check_plan accepts exactly the plans the independent replay runs to the end."""
    gen = torch.Generator().manual_seed(0)
    pick = lambda n: int(torch.randint(n, (1,), generator=gen))  # noqa: E731
    verdicts = Counter()
    for kind, pp, vpp, m in [("1f1b", 2, 1, 3), ("1f1b", 3, 1, 4), ("gpipe", 3, 1, 2), ("interleaved", 2, 2, 4),
                             ("interleaved", 3, 2, 3)] * 40:
        schedules = build_schedule(kind, pp, vpp, m)
        batches = lower_schedule(schedules, pp, vpp)
        r = pick(pp)
        src = pick(len(batches[r]))
        while not batches[r][src]:
            src = pick(len(batches[r]))
        p = batches[r][src].pop(pick(len(batches[r][src])))
        dst = batches[r][pick(len(batches[r]))]
        dst.insert(pick(len(dst) + 1), p)
        verdict = replay(schedules, batches, pp, vpp)
        verdicts[verdict] += 1
        try:
            check_plan(schedules, batches, pp, vpp)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == (verdict == "ok"), (kind, pp, vpp, m, r, str(p), verdict)
    assert min(verdicts[v] for v in ("ok", "deadlock", "no input", "not produced", "mismatch")) >= 5, verdicts
