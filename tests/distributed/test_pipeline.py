"""Pipeline parallelism against the single-process model: losses, grad norms and updated weights.

Each case trains 3 AdamW steps (fp32) on gloo ranks with the trainer's recipe - loss / n_micro and
aux_grad_scale = 1 / n_micro per micro-batch, ParallelOptimizer (one gradient reducer per chunk,
syncing on the chunk's last backward; tied-embedding gradient sum; global-norm clip; AdamW) - and the
parent repeats it on one process with the whole model and the whole global batch (dp * n_micro
micro-batches), with torch's own AdamW and clip_grad_norm_ as the outside reference. Every rank's
per-micro-batch losses (last stage), clipped grad norms, MoE aux/z totals and final parameter shards
must match the reference (losses and norms relative 1e-5, parameters atol 1e-5). The grad norm is
the scale-sensitive oracle: AdamW and clipping are invariant to a constant factor on all grads.
One spawn per world size (a launch costs seconds); the cases get their own ParallelContext groups.
The last test drives the executor alone (toy stages) over a 4-rank interleaved ring.
"""
import zlib

import pytest
import torch

from moe.config import ModelConfig, get_preset
from moe.model import build_model
from moe.stages import build_stage_chunks, merge_stage_stats, plan_stages, stage_chunk_fn
from parallel.context import ParallelContext
from parallel.layout import LayoutTable
from parallel.pipeline import PipelineExecutor
from parallel.tensor import shard_tensor
from tests.distributed.harness import run_distributed
from train.optim import build_optimizer, build_parallel_optimizer

pytestmark = pytest.mark.slow
SEQ, MB, STEPS, SEED = 8, 2, 3, 0
# Adam eps 1e-6, not 1e-8: the attention key bias has an exactly-zero true gradient (softmax is
# shift-invariant), so its gradient is ~1e-11 of roundoff that eps=1e-8 would turn into lr * 1e-3
# updates, different in every summation order; real gradients here are >= ~1e-5.
LR, WD, EPS, CLIP = 1e-3, 0.1, 1e-6, 0.5
RTOL, ATOL = 1e-5, 1e-5
DENSE = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
MOE = dict(DENSE, n_experts=4, top_k=2, expert_ffn_dim=32, moe_every=2)  # blocks 1 and 3 are MoE

CASES_2 = [
    dict(name="pp2_1f1b", model="dense", layout=dict(pp=2), schedule="1f1b", n_micro=4),
    dict(name="pp2_gpipe", model="dense", layout=dict(pp=2), schedule="gpipe", n_micro=3),
    dict(name="pp2_vpp2_interleaved", model="dense", layout=dict(pp=2, vpp=2), schedule="interleaved", n_micro=4),
    dict(name="pp2_tied_gpt2", model="gpt2-small-tiny", layout=dict(pp=2), schedule="1f1b", n_micro=2),
    dict(name="pp2_stage_layers_1_3", model="dense", layout=dict(pp=2), schedule="1f1b", n_micro=3,
         stage_layers=[1, 3]),
    dict(name="pp2_embedding_only_stage_0_4", model="dense", layout=dict(pp=2), schedule="gpipe", n_micro=2,
         stage_layers=[0, 4]),
]
CASES_4 = [
    dict(name="pp4_1f1b", model="dense", layout=dict(pp=4), schedule="1f1b", n_micro=5),
    dict(name="pp2_tp2", model="dense", layout=dict(pp=2, tp=2), schedule="1f1b", n_micro=2),
    dict(name="pp2_tp2_sp_gpipe", model="dense", layout=dict(pp=2, tp=2, sequence_parallel=True),
         schedule="gpipe", n_micro=2),
    dict(name="pp2_dp2_ep2_moe", model="moe", layout=dict(pp=2, dp=2, ep=2), schedule="1f1b", n_micro=2),
    dict(name="pp2_vpp2_tp2_tied_gpt2", model="gpt2-small-tiny", layout=dict(pp=2, vpp=2, tp=2),
         schedule="interleaved", n_micro=2),
    dict(name="pp2_tp2_ep2_fold_moe", model="moe", layout=dict(pp=2, tp=2, ep=2, fold_experts=True),
         schedule="1f1b", n_micro=2),
]
CASES_8 = [  # experts folded over tp x dp: each of a stage's 4 GPUs holds one of the 4 experts
    dict(name="pp2_tp2_dp2_ep4_fold_moe", model="moe", layout=dict(pp=2, tp=2, dp=2, ep=4, fold_experts=True),
         schedule="1f1b", n_micro=2),
]


def _config(case: dict) -> ModelConfig:
    return {"dense": lambda: ModelConfig(**DENSE), "moe": lambda: ModelConfig(**MOE)}.get(
        case["model"], lambda: get_preset(case["model"]))()


def _batches(case: dict) -> torch.Tensor:
    """[STEPS, dp * n_micro * MB, SEQ + 1] token ids; dp rank d reads the d-th block of rows."""
    dp = case["layout"].get("dp", 1)
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    return torch.randint(0, _config(case).vocab_size, (STEPS, dp * case["n_micro"] * MB, SEQ + 1), generator=gen)


# ----------------------------------------------------------------------------- worker side

def _train(ctx: ParallelContext, case: dict, data: torch.Tensor) -> dict:
    cfg, m = _config(case), case["n_micro"]
    partition = plan_stages(cfg, ctx.pp, ctx.vpp, SEQ, stage_layers=case.get("stage_layers"))
    chunks = build_stage_chunks(cfg, ctx, partition, seed=SEED)
    table = LayoutTable(chunks, ctx)
    optimizer = build_parallel_optimizer(chunks, table, LR, weight_decay=WD, eps=EPS)
    seq_local = SEQ // ctx.tp if ctx.sequence_parallel else SEQ
    executor = PipelineExecutor([stage_chunk_fn(c, 1.0 / m) for c in chunks], ctx, case["schedule"], m,
                                act_shape=(MB, seq_local, cfg.d_model), before_backward=optimizer.prepare)
    losses, norms, aux = [], [], []
    for batch in data:
        rows = batch.chunk(ctx.dp)[ctx.dp_rank].split(MB)
        result = executor.step([r[:, :-1] for r in rows], [r[:, 1:] for r in rows])
        optimizer.finish()
        norms.append(optimizer.clip(CLIP))
        optimizer.step()
        optimizer.zero_grad()
        stats = merge_stage_stats(result.infos, cfg.n_layers, cfg.n_experts)
        losses.append([float(loss) for loss in result.losses])
        aux.append(float(stats["aux_loss"] + stats["z_loss"]))
    params = {name: (p.detach().clone(), table[p].tied_to or table[p].name, table[p].tp_dim, table[p].ep_dim)
              for c in chunks for name, p in c.named_parameters()}
    return dict(coords=tuple(ctx.coords), losses=losses, norms=norms, aux=aux, params=params, partition=partition,
                ranks=dict(tp=ctx.tp_rank, ep=ctx.ep_rank))


def pipeline_worker(rank: int, world: int, cases: list, data: dict) -> dict:
    torch.manual_seed(0)
    out = {}
    for case in cases:
        ctx = ParallelContext.for_testing(rank, world, **case["layout"])
        out[case["name"]] = _train(ctx, case, data[case["name"]])
    return out


# ----------------------------------------------------------------------------- reference and checks

def _reference(case: dict, data: torch.Tensor) -> dict:
    """One process, whole model, all dp * n_micro micro-batches of each step."""
    cfg = _config(case)
    n = case["layout"].get("dp", 1) * case["n_micro"]
    model = build_model(cfg, seed=SEED)
    optimizer = build_optimizer(model, LR, weight_decay=WD, eps=EPS)
    losses, norms, aux = [], [], []
    for batch in data:
        step_losses, step_aux = [], []
        for mb in batch.split(MB):
            out = model(mb[:, :-1], mb[:, 1:], aux_grad_scale=1.0 / n)
            (out.loss / n).backward()
            step_losses.append(out.loss.item())
            step_aux.append(float(out.aux_loss + out.z_loss))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_losses)
        aux.append(step_aux)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return dict(losses=losses, norms=norms, aux=aux, params=params)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _check_case(case: dict, per_rank: list, ref: dict) -> dict:
    """Compare every rank with the reference; return the worst errors for the report."""
    cfg, layout, m = _config(case), case["layout"], case["n_micro"]
    pp, tp, ep = layout.get("pp", 1), layout.get("tp", 1), layout.get("ep", 1)
    worst = dict(loss=0.0, norm=0.0, param=0.0, aux=0.0)
    assert max(ref["norms"]) > CLIP, f"{case['name']}: clipping never active, raise the test's lr or lower CLIP"
    covered: dict[tuple, set] = {}
    for res in per_rank:
        _, pp_rank, dp_rank, tp_rank, ep_rank, _ = res["coords"]
        for step in range(STEPS):
            worst["norm"] = max(worst["norm"], _rel(res["norms"][step], ref["norms"][step]))
            want = ref["losses"][step][dp_rank * m:(dp_rank + 1) * m]
            got = res["losses"][step]
            assert len(got) == (m if pp_rank == pp - 1 else 0), (case["name"], res["coords"], got)
            worst["loss"] = max([worst["loss"]] + [_rel(g, w) for g, w in zip(got, want)])
        for name, (value, key, tp_dim, ep_dim) in res["params"].items():
            full = shard_tensor(ref["params"][key], tp_dim, res["ranks"]["tp"], tp)
            want = shard_tensor(full, ep_dim, res["ranks"]["ep"], ep)
            worst["param"] = max(worst["param"], (value - want).abs().max().item())
            covered.setdefault((dp_rank, tp_rank), set()).add(name)
    expected = set(ref["params"]) | ({"head.weight"} if cfg.tie_embeddings and pp > 1 else set())
    for key, names in covered.items():
        assert names == expected, f"{case['name']} pipeline {key}: missing {expected - names}, extra {names - expected}"
    worst["aux"] = _aux_error(case, per_rank, ref)
    for what, tol in (("loss", RTOL), ("norm", RTOL), ("param", ATOL), ("aux", RTOL)):
        assert worst[what] <= tol, f"{case['name']}: {what} error {worst[what]:.3g} > {tol}"
    return worst


def _aux_error(case: dict, per_rank: list, ref: dict) -> float:
    """Per step, the MoE aux + z totals summed over a pipeline's stages equal the reference's sum
    over the same micro-batches (tp ranks 0 only: tp ranks repeat the whole-micro-batch value)."""
    m, worst = case["n_micro"], 0.0
    for step in range(STEPS):
        totals: dict[int, float] = {}
        for res in per_rank:
            _, _, dp_rank, tp_rank, _, _ = res["coords"]
            if tp_rank == 0:
                totals[dp_rank] = totals.get(dp_rank, 0.0) + res["aux"][step]
        for dp_rank, total in totals.items():
            want = sum(ref["aux"][step][dp_rank * m:(dp_rank + 1) * m])
            worst = max(worst, abs(total - want) / max(abs(want), 1e-12) if want else abs(total))
    return worst


def _run(cases: list, world: int) -> dict:
    data = {c["name"]: _batches(c) for c in cases}
    per_rank = run_distributed(pipeline_worker, world, cases, data, timeout=240)
    report = {}
    for case in cases:
        results = [r[case["name"]] for r in per_rank]
        report[case["name"]] = _check_case(case, results, _reference(case, data[case["name"]]))
    print({k: {w: f"{e:.1e}" for w, e in v.items()} for k, v in report.items()})
    return {c["name"]: [r[c["name"]] for r in per_rank] for c in cases}


# ----------------------------------------------------------------------------- tests

def test_pipeline_world2_matches_single_process():
    results = _run(CASES_2, 2)
    assert results["pp2_stage_layers_1_3"][0]["partition"] == [[0], [1, 2, 3]]
    assert results["pp2_embedding_only_stage_0_4"][0]["partition"] == [[], [0, 1, 2, 3]]
    assert results["pp2_vpp2_interleaved"][1]["partition"] == [[0], [1], [2], [3]]
    assert all(r["aux"] == [0.0] * STEPS for r in results["pp2_1f1b"])  # dense model: no MoE statistics


def test_pipeline_world4_matches_single_process():
    results = _run(CASES_4, 4)
    aux = [r["aux"][0] for r in results["pp2_dp2_ep2_moe"]]
    assert all(a > 0 for a in aux), f"every stage holds one MoE block, so every rank reports aux > 0: {aux}"
    folded = results["pp2_tp2_ep2_fold_moe"]  # the tp pair of a stage holds different experts
    assert [r["ranks"]["ep"] for r in folded] == [0, 1, 0, 1]


def test_pipeline_world8_folded_experts_match_single_process():
    results = _run(CASES_8, 8)
    experts = {r["ranks"]["ep"] for r in results["pp2_tp2_dp2_ep4_fold_moe"]}
    assert experts == {0, 1, 2, 3}, experts


# ----------------------------------------------------------------------------- executor on a 4-rank ring

RING = dict(pp=4, vpp=2, n_micro=8, width=16, n_valid=3)  # 8 virtual stages, v -> v + 1 wraps rank 3 -> 0


def _ring_layer(v: int, width: int) -> torch.nn.Linear:
    torch.manual_seed(100 + v)
    return torch.nn.Linear(width, width)


def _ring_chunk(layer: torch.nn.Linear, last: bool):
    def chunk(x, target):
        y = torch.tanh(layer(x))
        return ((y - target).pow(2).mean() if last else y), None
    return chunk


def _ring_data(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (case["n_micro"], MB, case["width"])
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def ring_worker(rank: int, world: int, case: dict) -> dict:
    """One interleaved step (its plan moves receives ahead) and one forward_only pass of n_valid
    micro-batches on toy stages; every rank passes the data, only stage 0 / the last stage read it."""
    pp, vpp, m = case["pp"], case["vpp"], case["n_micro"]
    ctx = ParallelContext.for_testing(rank, world, pp=pp, vpp=vpp)
    stages = [c * pp + ctx.pp_rank for c in range(vpp)]
    layers = [_ring_layer(v, case["width"]) for v in stages]
    chunks = [_ring_chunk(layer, v == pp * vpp - 1) for layer, v in zip(layers, stages)]
    executor = PipelineExecutor(chunks, ctx, "interleaved", m, act_shape=(MB, case["width"]))
    inputs, targets = _ring_data(case)
    result = executor.step(list(inputs), list(targets))
    valid = executor.forward_only(case["n_valid"], list(inputs), list(targets))
    return dict(losses=[float(x) for x in result.losses], valid=[float(x) for x in valid],
                grads={v: (layer.weight.grad, layer.bias.grad) for v, layer in zip(stages, layers)})


def test_executor_world4_interleaved_ring_matches_single_process():
    """pp=4 vpp=2 m=8 through the batched, order-matched plan (gloo with one tag for every message,
    so matching is by posting order as on NCCL): losses, validation losses and every stage's
    gradients equal a plain loop over the 8 stages on one process."""
    case = RING
    n_stages, m = case["pp"] * case["vpp"], case["n_micro"]
    layers = [_ring_layer(v, case["width"]) for v in range(n_stages)]
    inputs, targets = _ring_data(case)
    want = []
    for x, target in zip(inputs, targets):
        for v, layer in enumerate(layers):
            x = _ring_chunk(layer, v == n_stages - 1)(x, target)[0]
        (x / m).backward()
        want.append(float(x.detach()))
    per_rank = run_distributed(ring_worker, case["pp"], case, timeout=120)
    assert [len(r["losses"]) for r in per_rank] == [0, 0, 0, m]
    assert per_rank[-1]["losses"] == pytest.approx(want, rel=1e-6)
    assert per_rank[-1]["valid"] == pytest.approx(want[:case["n_valid"]], rel=1e-6)
    for res in per_rank:
        for v, (weight, bias) in res["grads"].items():
            torch.testing.assert_close(weight, layers[v].weight.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(bias, layers[v].bias.grad, rtol=1e-5, atol=1e-7)
