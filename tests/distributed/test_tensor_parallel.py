"""Tensor parallelism against single-process references built from the same full weights.

Workers (gloo, spawned by the harness) build TP layers, load their shards of full tensors made in the
parent (via shard_tensor and each parameter's layout record), run forward/backward, and return outputs and
gradients; the parent recomputes everything with plain torch ops on the full tensors and compares the
rank's slice. One spawn checks many layouts, since a launch costs seconds.
"""
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.context import ParallelContext, group_ranks, rank_grid
from parallel.layout import param_layouts
from parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp,
                             gather_from_sp, gather_from_tp, reduce_from_tp, reduce_scatter_to_sp,
                             scatter_to_sp, scatter_to_tp, shard_tensor, vocab_parallel_cross_entropy)
from tests.distributed.harness import run_distributed

B, S, D, FF, V = 2, 4, 8, 16, 16  # S, FF and V divide by tp in {2, 4}
IGNORE = -100
TOL = dict(rtol=1e-5, atol=1e-5)

# name -> (function, dim or None): every mapping with its forward/backward pair
MAPPINGS = {
    "copy_to_tp": (copy_to_tp, None),
    "reduce_from_tp": (reduce_from_tp, None),
    "gather_from_tp": (gather_from_tp, -1),
    "gather_from_tp_dim1": (gather_from_tp, 1),
    "scatter_to_tp": (scatter_to_tp, -1),
    "gather_from_sp": (gather_from_sp, 1),
    "reduce_scatter_to_sp": (reduce_scatter_to_sp, 1),
    "reduce_scatter_to_sp_dim2": (reduce_scatter_to_sp, 2),
    "scatter_to_sp": (scatter_to_sp, 1),
}


def make_data(n_dp: int = 2) -> dict:
    """Full tensors for every check; n_dp independent data-parallel batches."""
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (n_dp, B, S), generator=g)
    targets[:, 0, 1] = IGNORE
    targets[:, 1, 3] = IGNORE
    return {
        "w1": torch.randn(FF, D, generator=g) * 0.5, "b1": torch.randn(FF, generator=g),
        "w2": torch.randn(D, FF, generator=g) * 0.5, "b2": torch.randn(D, generator=g),
        "emb": torch.randn(V, D, generator=g), "head": torch.randn(V, D, generator=g) * 0.5,
        "x": torch.randn(n_dp, B, S, D, generator=g), "gy": torch.randn(n_dp, B, S, D, generator=g),
        "tokens": torch.randint(0, V, (n_dp, B, S), generator=g),
        "logits": torch.randn(n_dp, B, S, V, generator=g) * 3, "targets": targets,
        "gloss": torch.randn(n_dp, B, S, generator=g),
    }


# ----------------------------------------------------------------------------- worker side

def _load(module, full: dict, ctx) -> None:
    with torch.no_grad():
        for name, rec in param_layouts(module, ctx).items():
            module.get_parameter(name).copy_(shard_tensor(full[name], rec.tp_dim, ctx.tp_rank, ctx.tp))


def _tp_dims(module, ctx) -> tuple:
    return tuple(rec.tp_dim for rec in param_layouts(module, ctx).values())


def _sum_partial_grads(ctx, *modules) -> None:
    """What the gradient reducer does for sequence-parallel partial grads (layout record tp_partial)."""
    for m in modules:
        for name, rec in param_layouts(m, ctx).items():
            assert rec.tp_partial == (ctx.sequence_parallel and rec.tp_dim is None), name
            if rec.tp_partial:
                dist.all_reduce(m.get_parameter(name).grad, group=ctx.tp_group)


def _seq_local(t: torch.Tensor, ctx) -> torch.Tensor:
    return t.chunk(ctx.tp, dim=1)[ctx.tp_rank] if ctx.sequence_parallel else t


def _run_mappings(ctx, rank: int) -> dict:
    out = {}
    for i, (name, (fn, dim)) in enumerate(MAPPINGS.items()):
        gen = torch.Generator().manual_seed(1000 * rank + i)
        x = torch.randn(2, 4, 8, generator=gen).requires_grad_()
        y = fn(x, ctx.tp_group) if dim is None else fn(x, ctx.tp_group, dim)
        g = torch.randn(y.shape, generator=gen)
        y.backward(g)
        out[name] = dict(x=x.detach(), y=y.detach(), g=g, dx=x.grad)
    return out


def _run_mlp(ctx, d: dict) -> dict:
    torch.manual_seed(1234)  # init contract: the shards of the full N(0, 0.02^2) draws, col then row
    col, row = ColumnParallelLinear(D, FF, True, ctx), RowParallelLinear(FF, D, True, ctx)
    init = dict(w1=col.weight.detach().clone(), w2=row.weight.detach().clone(), b1=col.bias.detach().clone())
    _load(col, {"weight": d["w1"], "bias": d["b1"]}, ctx)
    _load(row, {"weight": d["w2"], "bias": d["b2"]}, ctx)
    x = _seq_local(d["x"][ctx.dp_rank], ctx).clone().requires_grad_()
    y = row(F.gelu(col(x)))
    (y * _seq_local(d["gy"][ctx.dp_rank], ctx)).sum().backward()
    _sum_partial_grads(ctx, col, row)
    return dict(init=init, y=y.detach(), dx=x.grad, w1=col.weight.grad, b1=col.bias.grad, w2=row.weight.grad,
                b2=row.bias.grad, tp_dims=_tp_dims(col, ctx) + _tp_dims(row, ctx))


def _run_embedding(ctx, d: dict) -> dict:
    emb = VocabParallelEmbedding(V, D, ctx)
    _load(emb, {"weight": d["emb"]}, ctx)
    out = emb(d["tokens"][ctx.dp_rank])
    (out * _seq_local(d["gy"][ctx.dp_rank], ctx)).sum().backward()
    return dict(out=out.detach(), grad=emb.weight.grad, tp_dim=_tp_dims(emb, ctx)[0])


def _run_cross_entropy(ctx, d: dict) -> dict:
    logits = shard_tensor(d["logits"][ctx.dp_rank], -1, ctx.tp_rank, ctx.tp).requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, d["targets"][ctx.dp_rank], ctx.tp_group, ignore_index=IGNORE)
    (loss * d["gloss"][ctx.dp_rank]).sum().backward()
    return dict(loss=loss.detach(), grad=logits.grad)


def _run_chain(ctx, d: dict) -> dict:
    """Embedding -> residual MLP -> vocab-parallel head -> CE: the regions must compose (also under SP)."""
    emb, head = VocabParallelEmbedding(V, D, ctx), ColumnParallelLinear(D, V, False, ctx)
    col, row = ColumnParallelLinear(D, FF, True, ctx), RowParallelLinear(FF, D, True, ctx)
    for m, full in ((emb, {"weight": d["emb"]}), (head, {"weight": d["head"]}),
                    (col, {"weight": d["w1"], "bias": d["b1"]}), (row, {"weight": d["w2"], "bias": d["b2"]})):
        _load(m, full, ctx)
    h = emb(d["tokens"][ctx.dp_rank])  # [B, S(/tp), D]
    h = h + row(F.gelu(col(h)))
    loss = vocab_parallel_cross_entropy(head(h), d["targets"][ctx.dp_rank], ctx.tp_group, IGNORE)
    (loss * d["gloss"][ctx.dp_rank]).sum().backward()
    _sum_partial_grads(ctx, emb, head, col, row)
    return dict(loss=loss.detach(), emb=emb.weight.grad, head=head.weight.grad, w1=col.weight.grad,
                b1=col.bias.grad, w2=row.weight.grad, b2=row.bias.grad)


def layers_worker(rank: int, world_size: int, layouts: list, data: dict) -> list:
    results = []
    for layout in layouts:
        ctx = ParallelContext.for_testing(rank, world_size, **layout)
        results.append(dict(tp=ctx.tp, tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank, sp=ctx.sequence_parallel,
                            mappings=_run_mappings(ctx, rank), mlp=_run_mlp(ctx, data),
                            emb=_run_embedding(ctx, data), ce=_run_cross_entropy(ctx, data),
                            chain=_run_chain(ctx, data)))
    return results


# ----------------------------------------------------------------------------- parent-side references

def _chunk(t: torch.Tensor, n: int, dim: int, i: int) -> torch.Tensor:
    return t.chunk(n, dim=dim)[i]


def _expected_mapping(name: str, members: list, r: int) -> tuple:
    """(y, dx) for tp rank r, from the x and upstream grad g of every rank in its tp group."""
    xs, gs, n = [m["x"] for m in members], [m["g"] for m in members], len(members)
    dim = MAPPINGS[name][1]
    if name == "copy_to_tp":
        return xs[r], sum(gs)
    if name == "reduce_from_tp":
        return sum(xs), gs[r]
    if name.startswith("gather_from_tp"):
        return torch.cat(xs, dim), _chunk(gs[r], n, dim, r)
    if name == "gather_from_sp":
        return torch.cat(xs, dim), _chunk(sum(gs), n, dim, r)
    if name.startswith("reduce_scatter_to_sp"):
        return _chunk(sum(xs), n, dim, r), torch.cat(gs, dim)
    return _chunk(xs[r], n, dim, r), torch.cat(gs, dim)  # scatter_to_tp / scatter_to_sp


def _reference_mlp(d: dict, k: int) -> dict:
    p = {n: d[n].clone().requires_grad_() for n in ("w1", "b1", "w2", "b2")}
    x = d["x"][k].clone().requires_grad_()
    y = F.linear(F.gelu(F.linear(x, p["w1"], p["b1"])), p["w2"], p["b2"])
    (y * d["gy"][k]).sum().backward()
    return dict(y=y.detach(), dx=x.grad, **{n: t.grad for n, t in p.items()})


def _reference_chain(d: dict, k: int) -> dict:
    p = {n: d[n].clone().requires_grad_() for n in ("emb", "head", "w1", "b1", "w2", "b2")}
    h = F.embedding(d["tokens"][k], p["emb"])
    h = h + F.linear(F.gelu(F.linear(h, p["w1"], p["b1"])), p["w2"], p["b2"])
    logits = F.linear(h, p["head"])
    loss = F.cross_entropy(logits.transpose(1, 2), d["targets"][k], reduction="none", ignore_index=IGNORE)
    (loss * d["gloss"][k]).sum().backward()
    return dict(loss=loss.detach(), **{n: t.grad for n, t in p.items()})


def _check_mappings(results: list) -> None:
    for res in results:
        members = sorted((o for o in results if o["dp_rank"] == res["dp_rank"]), key=lambda o: o["tp_rank"])
        assert [m["tp_rank"] for m in members] == list(range(res["tp"]))
        for name in MAPPINGS:
            y, dx = _expected_mapping(name, [m["mappings"][name] for m in members], res["tp_rank"])
            got = res["mappings"][name]
            torch.testing.assert_close(got["y"], y, **TOL, msg=f"{name} forward, tp rank {res['tp_rank']}")
            torch.testing.assert_close(got["dx"], dx, **TOL, msg=f"{name} backward, tp rank {res['tp_rank']}")


def _check_mlp(res: dict, d: dict) -> None:
    ref, r, tp, got = _reference_mlp(d, res["dp_rank"]), res["tp_rank"], res["tp"], res["mlp"]
    seq = (lambda t: _chunk(t, tp, 1, r)) if res["sp"] else (lambda t: t)
    torch.manual_seed(1234)
    full1, full2 = torch.empty(FF, D).normal_(0, 0.02), torch.empty(D, FF).normal_(0, 0.02)
    torch.testing.assert_close(got["init"]["w1"], shard_tensor(full1, 0, r, tp), rtol=0, atol=0)
    torch.testing.assert_close(got["init"]["w2"], shard_tensor(full2, 1, r, tp), rtol=0, atol=0)
    assert torch.equal(got["init"]["b1"], torch.zeros(FF // tp))
    assert got["tp_dims"] == (0, 0, 1, None)
    torch.testing.assert_close(got["y"], seq(ref["y"]), **TOL)
    torch.testing.assert_close(got["dx"], seq(ref["dx"]), **TOL)
    for name, tp_dim in (("w1", 0), ("b1", 0), ("w2", 1), ("b2", None)):
        torch.testing.assert_close(got[name], shard_tensor(ref[name], tp_dim, r, tp), **TOL, msg=name)


def _check_embedding_and_ce(res: dict, d: dict) -> None:
    k, r, tp = res["dp_rank"], res["tp_rank"], res["tp"]
    table = d["emb"].clone().requires_grad_()
    out = F.embedding(d["tokens"][k], table)
    (out * d["gy"][k]).sum().backward()
    got = res["emb"]
    assert got["tp_dim"] == 0
    torch.testing.assert_close(got["out"], _chunk(out, tp, 1, r) if res["sp"] else out, **TOL)
    torch.testing.assert_close(got["grad"], shard_tensor(table.grad, 0, r, tp), **TOL)
    logits = d["logits"][k].clone().requires_grad_()
    loss = F.cross_entropy(logits.transpose(1, 2), d["targets"][k], reduction="none", ignore_index=IGNORE)
    (loss * d["gloss"][k]).sum().backward()
    torch.testing.assert_close(res["ce"]["loss"], loss.detach(), **TOL)
    torch.testing.assert_close(res["ce"]["grad"], shard_tensor(logits.grad, 2, r, tp), **TOL)


def _check_chain(res: dict, d: dict) -> None:
    ref, r, tp, got = _reference_chain(d, res["dp_rank"]), res["tp_rank"], res["tp"], res["chain"]
    torch.testing.assert_close(got["loss"], ref["loss"], **TOL)
    for name, tp_dim in (("emb", 0), ("head", 0), ("w1", 0), ("b1", 0), ("w2", 1), ("b2", None)):
        torch.testing.assert_close(got[name], shard_tensor(ref[name], tp_dim, r, tp), **TOL, msg=name)


def check_all(per_rank: list, layouts: list, d: dict) -> None:
    for i, layout in enumerate(layouts):
        results = [rank_results[i] for rank_results in per_rank]
        assert results[0]["sp"] == layout.get("sequence_parallel", False)
        _check_mappings(results)
        for res in results:
            _check_mlp(res, d)
            _check_embedding_and_ce(res, d)
            _check_chain(res, d)


# ----------------------------------------------------------------------------- tests

def test_single_process_layers_are_plain_torch():
    """All sizes 1: the same classes reduce to F.linear / F.embedding / F.cross_entropy."""
    ctx, d = ParallelContext.single(), make_data(1)
    res = dict(tp=1, tp_rank=0, dp_rank=0, sp=False, mlp=_run_mlp(ctx, d), emb=_run_embedding(ctx, d),
               ce=_run_cross_entropy(ctx, d), chain=_run_chain(ctx, d))
    _check_mlp(res, d)
    _check_embedding_and_ce(res, d)
    _check_chain(res, d)
    x = d["x"][0]
    assert all(fn(x, None) is x for fn, _ in MAPPINGS.values())  # None group: identity, no copy


def test_cross_entropy_half_precision_logits_get_float32_loss():
    logits = (torch.randn(3, 5, V) * 4).bfloat16().requires_grad_()
    targets = torch.tensor([[1, 2, IGNORE, 4, 5], [0, 15, 3, 3, 3], [IGNORE] * 5])
    loss = vocab_parallel_cross_entropy(logits, targets, None)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", ignore_index=IGNORE)
    torch.testing.assert_close(loss, ref)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.all(logits.grad[2] == 0)


def test_bad_inputs_raise():
    ctx = ParallelContext.single()
    with pytest.raises(ValueError, match=r"shard_tensor: dim 0 of shape \(6, 2\) is not divisible by the tp size \(4\)"):
        shard_tensor(torch.zeros(6, 2), 0, 1, 4)
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) must be targets \(2, 4\) plus a vocab dim"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), None)
    with pytest.raises(ValueError, match="targets must be integer"):
        vocab_parallel_cross_entropy(torch.zeros(2, 5), torch.zeros(2), None)
    assert ColumnParallelLinear(3, 5, False, ctx).weight.shape == (5, 3)
    assert shard_tensor(torch.arange(6), None, 1, 2).tolist() == list(range(6))
    assert shard_tensor(torch.arange(6), 0, 1, 2).tolist() == [3, 4, 5]


@pytest.mark.slow
def test_tp2_world2_with_and_without_sequence_parallel():
    layouts = [dict(tp=2), dict(tp=2, sequence_parallel=True)]
    data = make_data()
    check_all(run_distributed(layers_worker, 2, layouts, data), layouts, data)


def groups_and_layers_worker(rank: int, world_size: int, layouts: list, data: dict) -> dict:
    ctx = ParallelContext.from_env(tp=2, dp=2, ep=2, backend="gloo", timeout_s=60)
    members = {}
    for layout in GROUP_LAYOUTS:
        c = ctx if layout == GROUP_LAYOUTS[0] else ParallelContext.for_testing(rank, 4, **layout)
        for kind in ("tp", "dp", "pp", "ep", "edp") + (("tied",) if c.pp > 1 else ()):
            group = getattr(c, f"{kind}_group")
            got = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
            dist.all_gather(got, torch.tensor([rank]), group=group)
            members[(str(layout), kind)] = [int(t) for t in got]
        members[(str(layout), "coords")] = tuple(c.coords)
        members[(str(layout), "pp_ranks")] = c.pp_ranks
    return dict(members=members, layers=layers_worker(rank, world_size, layouts, data))


GROUP_LAYOUTS = [dict(tp=2, dp=2, ep=2), dict(pp=2, dp=2, ep=2), dict(dp=4, ep=2),
                 dict(tp=2, dp=2, ep=4, fold_experts=True), dict(tp=2, dp=2, ep=2, fold_experts=True)]


@pytest.mark.slow
def test_world4_groups_match_rank_grid_and_layers_match():
    layouts = [dict(tp=2, dp=2), dict(tp=4, sequence_parallel=True)]
    data = make_data()
    per_rank = run_distributed(groups_and_layers_worker, 4, layouts, data)
    for rank, res in enumerate(per_rank):
        for layout in GROUP_LAYOUTS:
            sizes = dict(tp=layout.get("tp", 1), pp=layout.get("pp", 1), dp=layout["dp"], ep=layout["ep"],
                         fold=layout.get("fold_experts", False))
            grid = rank_grid(4, **sizes)
            for kind, groups in group_ranks(4, **sizes).items():
                if kind == "tied" and sizes["pp"] == 1:
                    continue  # no tied pair across stages without pipelining
                mine = next(g for g in groups if rank in g)
                assert res["members"][(str(layout), kind)] == mine, (rank, layout, kind)
            assert res["members"][(str(layout), "coords")] == tuple(grid[rank])
            pipeline = [c.rank for c in grid if (c.dp, c.tp) == (grid[rank].dp, grid[rank].tp)]
            assert res["members"][(str(layout), "pp_ranks")] == pipeline
    # spot-check by hand: tp=2 dp=2 ep=2 -> rank 1 has tp [0, 1], dp = ep [1, 3], pp = edp [1]
    assert [per_rank[1]["members"][("{'tp': 2, 'dp': 2, 'ep': 2}", k)] for k in ("tp", "dp", "ep", "edp")] == \
        [[0, 1], [1, 3], [1, 3], [1]]
    # pp=2 dp=2: rank 1 is stage 0 of pipeline [1, 3], whose ends share the tied embedding
    assert per_rank[1]["members"][("{'pp': 2, 'dp': 2, 'ep': 2}", "pp_ranks")] == [1, 3]
    assert per_rank[1]["members"][("{'pp': 2, 'dp': 2, 'ep': 2}", "tied")] == [1, 3]
    # folded tp=2 dp=2 ep=4: one expert group of all 4 ranks; ep=2: the tp pairs, replicated over dp
    fold4, fold2 = (str(layout) for layout in GROUP_LAYOUTS[3:])
    assert [per_rank[1]["members"][(fold4, k)] for k in ("ep", "edp")] == [[0, 1, 2, 3], [1]]
    assert [per_rank[1]["members"][(fold2, k)] for k in ("ep", "edp")] == [[0, 1], [1, 3]]
    check_all([res["layers"] for res in per_rank], layouts, data)


def bad_split_worker(rank: int, world_size: int) -> None:
    ctx = ParallelContext.for_testing(rank, world_size, tp=2)
    scatter_to_sp(torch.zeros(2, 3, 4), ctx.tp_group)  # S=3 does not split over 2 ranks


@pytest.mark.slow
def test_split_mismatch_raises_before_collective_and_harness_reports_rank():
    with pytest.raises(ValueError, match=r"rank \d: split: tensor of shape \(2, 3, 4\) cannot be split on dim 1"):
        run_distributed(bad_split_worker, 2)


def hang_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(60)


@pytest.mark.slow
def test_harness_kills_hung_workers():
    start = time.monotonic()
    # rank 0 may still be starting up on a loaded machine, rank 1 must be reported
    with pytest.raises(TimeoutError, match=r"ranks \[(0, )?1\] still running after 10 s"):
        run_distributed(hang_worker, 2, timeout=10)
    assert time.monotonic() - start < 25
