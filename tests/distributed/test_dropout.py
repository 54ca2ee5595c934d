"""Dropout under parallel layouts (parallel/rng.py), measured on the model's own dropout sites in
real gloo runs: the masks each rank draws must be those one process would draw *in distribution*.

One process draws every mask element independently with keep probability 1 - p. A layout keeps
that only if (1) ranks holding copies of an activation drop the same elements (the residual stream
on the tp ranks without sequence parallelism: otherwise the replicas drift apart) and (2) ranks
holding different elements draw independent masks (attention heads on different tp ranks, sequence
slices under sequence parallelism, different dp ranks, different pipeline stages).

Each rank runs one training-mode forward of its chunk of a 2-layer dense model (p = 0.25) on the
same tokens everywhere and records every residual/embedding mask (forward hooks on the Dropout
modules) and the per-head attention outputs of layer 0, with all heads given identical weights:
without dropout every head's output is then the same, so two heads differ exactly when their
attention dropout masks do. Checks: residual masks equal across tp ranks (no sequence parallelism)
and the final hidden state with them; everything that must be independent agrees on about
p^2 + (1-p)^2 = 62.5% of elements (never 100%); keep rates 1 - p over ~10^4 elements per layout.
"""
import itertools

import pytest
import torch

from moe.config import ModelConfig
from moe.layers import Dropout
from moe.stages import build_stage_chunks, plan_stages
from parallel.context import ParallelContext, RankCoords
from tests.distributed.harness import run_distributed

pytestmark = pytest.mark.slow
P, B, S, STEP = 0.25, 2, 8, 5
CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
           max_seq_len=16, dropout=P)
INDEPENDENT = 0.9  # agreement of two independent masks: 0.625 expected, sd ~0.02 on 512 elements
LAYOUTS_4 = {
    "tp2_dp2": dict(tp=2),
    "tp2_dp2_sp": dict(tp=2, sequence_parallel=True),
    "pp2_tp2": dict(pp=2, tp=2),
    "pp2_dp2": dict(pp=2),
}


def _same_heads(chunk) -> None:
    """Give every attention head (on every rank) the same q/k/v weights."""
    gen = torch.Generator().manual_seed(7)
    cfg = chunk.cfg
    blocks = {w: torch.randn(cfg.dim_head, cfg.d_model, generator=gen) * 0.3
              for w in ("wq", "wk", "wv")}
    with torch.no_grad():
        for block in chunk.layers.values():
            for name, value in blocks.items():
                weight = getattr(block.attn, name).weight  # [local heads * Dh, D]
                weight.view(-1, cfg.dim_head, cfg.d_model).copy_(value)


def _inputs(chunk, ctx) -> torch.Tensor:
    """Token ids on the first stage, else a fixed hidden state (this rank's slice under SP)."""
    gen = torch.Generator().manual_seed(11)
    if chunk.pre:
        return torch.randint(0, CFG["vocab_size"], (B, S), generator=gen)
    h = torch.randn(B, S, CFG["d_model"], generator=gen)
    return h.chunk(ctx.tp, dim=1)[ctx.tp_rank] if ctx.sequence_parallel else h


def _record(ctx: ParallelContext) -> dict:
    cfg = ModelConfig(**CFG)
    (chunk,) = build_stage_chunks(cfg, ctx, plan_stages(cfg, ctx.pp, 1, S), seed=0)
    _same_heads(chunk)
    masks, heads, hidden = {}, [], []

    def on_dropout(module, args, out):
        x, _, site = args
        if module.training:
            masks[site] = (out != 0) | (x == 0)

    hooks = [m.register_forward_hook(on_dropout) for m in chunk.modules() if isinstance(m, Dropout)]
    first = chunk.layers[min(chunk.layers, key=int)]
    on_heads = lambda m, args: heads.append(args[0].detach())  # noqa: E731 - wo's input
    hooks.append(first.attn.wo.register_forward_pre_hook(on_heads))
    last = chunk.layers[max(chunk.layers, key=int)]
    hooks.append(last.register_forward_hook(lambda m, args, out: hidden.append(out[0].detach())))
    x = _inputs(chunk, ctx)
    chunk.rng.start_step(STEP)
    chunk.train()(x)
    chunk.eval()(x)
    for hook in hooks:
        hook.remove()
    split = lambda t: t.view(B, S, -1, cfg.dim_head)  # noqa: E731 - [B, S, local heads, Dh]
    return dict(coords=tuple(ctx.coords), masks=masks, heads=split(heads[0]),
                heads_eval=split(heads[1]), hidden=hidden[0])


def dropout_worker(rank: int, world: int, layouts: dict) -> dict:
    return {name: _record(ParallelContext.for_testing(rank, world, **kw))
            for name, kw in layouts.items()}


def _coords(results: list[dict]) -> list[dict]:
    return [{**r, "coords": RankCoords(*r["coords"])} for r in results]


# ----------------------------------------------------------------------------- checks

def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def _check_heads(per_rank: list[dict]) -> int:
    """Layer-0 heads of all ranks of pipeline stage 0: identical without dropout, pairwise
    different with it (an identical pair means a shared attention mask)."""
    stage0 = [r for r in per_rank if r["coords"].pp == 0]
    heads = [r["heads"][:, :, h] for r in stage0 for h in range(r["heads"].shape[2])]
    evals = [r["heads_eval"][:, :, h] for r in stage0 for h in range(r["heads_eval"].shape[2])]
    for e in evals[1:]:
        torch.testing.assert_close(e, evals[0], rtol=1e-5, atol=1e-6)  # the probe is valid
    for (i, a), (j, b) in itertools.combinations(enumerate(heads), 2):
        assert (a - b).abs().max() > 1e-4, f"attention heads {i} and {j} drew the same dropout mask"
    return len(heads)


def _check_residual(per_rank: list[dict], sp: bool) -> float:
    """Equal across tp ranks without SP, independent across tp with SP and across dp always;
    returns the keep rate over every residual mask of the layout."""
    kept, total = 0, 0
    for a, b in itertools.combinations(per_rank, 2):
        same_tp_group = (a["coords"].pp, a["coords"].dp) == (b["coords"].pp, b["coords"].dp)
        for site in set(a["masks"]) & set(b["masks"]):
            agree = _agreement(a["masks"][site], b["masks"][site])
            where = f"{site} on ranks {a['coords'].rank} and {b['coords'].rank}"
            if same_tp_group and not sp:
                assert agree == 1.0, f"{where}: tp replicas dropped other elements ({agree:.3f})"
            else:
                assert agree < INDEPENDENT, f"{where}: masks not independent ({agree:.3f} agree)"
        if same_tp_group and not sp:
            pair = f"ranks {a['coords'].rank}, {b['coords'].rank}"
            assert torch.equal(a["hidden"], b["hidden"]), pair
    for r in per_rank:
        for mask in r["masks"].values():
            kept, total = kept + int(mask.sum()), total + mask.numel()
    rate = kept / total
    sd = (P * (1 - P) / total) ** 0.5
    assert abs(rate - (1 - P)) < 5 * sd, f"keep rate {rate:.4f} over {total} elements, not {1 - P}"
    return rate


def test_single_process_reference_draws_independent_masks():
    """The reference the layouts are held to: one process, heads pairwise different, keep 1 - p."""
    (ref,) = _coords([_record(ParallelContext.single())])
    assert _check_heads([ref]) == CFG["n_heads"]
    assert sorted(ref["masks"]) == ["embedding", "layers.0.attn_out", "layers.0.mlp_out",
                                    "layers.1.attn_out", "layers.1.mlp_out"]
    _check_residual([ref], sp=False)
    pairs = list(itertools.combinations(ref["masks"].values(), 2))
    assert all(_agreement(a, b) < INDEPENDENT for a, b in pairs)  # sites are mutually independent


def test_dropout_masks_under_layouts_world4():
    results = run_distributed(dropout_worker, 4, LAYOUTS_4, timeout=180)
    report = {}
    for name, layout in LAYOUTS_4.items():
        per_rank = _coords([r[name] for r in results])
        n_heads = _check_heads(per_rank)
        rate = _check_residual(per_rank, sp=layout.get("sequence_parallel", False))
        report[name] = (n_heads, round(rate, 4))
    print(report)
    assert report["tp2_dp2"][0] == 8  # 2 dp ranks x 4 heads, every one its own mask
