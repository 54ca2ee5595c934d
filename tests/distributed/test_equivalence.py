"""Tensor / sequence / data / expert parallelism and ZeRO-1 train exactly like one process.

For a tiny dense model and a tiny MoE model (tests/distributed/equiv_workers.py: MODELS), three AdamW
steps with micro-batching, gradient reduction and global-norm clipping under each layout must give the
single-process run's losses (dp-mean of the LM loss per step, relative difference <= 1e-5; the MoE
aux and z losses too) and, with every shard gathered by `tp_dim` / `ep_dim`, the single-process
weights before (init is layout-independent) and after training (atol 1e-5). Because AdamW is nearly
blind to a uniform gradient scale, the reduced step-0 gradients (atol 1e-6) and the global grad norm
per step (rtol 1e-5) are compared too. The reference is computed here, in the test process, by the
same step function with the degenerate context.

One spawn per world size runs all its layouts in turn (a spawn costs seconds); the parametrized tests
then check each layout's numbers. Invalid layouts are checked without processes: they must fail with
a one-line error before any process group or weight exists.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from moe.model import Decoder, validate_layout
from parallel.context import ParallelContext
from tests.distributed.equiv_workers import MAX_NORM, MODELS, Layout, model_config, reference, \
    reference_with, run_layouts
from tests.distributed.harness import run_distributed

LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5
GRAD_ATOL = 1e-6  # largest gradient entries are ~1e-2
# bf16: the forward's GEMMs round to bf16 (8 bits of mantissa) and a tp layout adds its partial sums
# in another order, so elementwise errors are large where values are tiny. bf16 layouts are compared
# per tensor, relatively: ||grad - ref|| / ||ref|| and ||update - ref update|| / ||ref update||.
# Measured with tp 2: loss 1.4e-4, gradients 9e-3, updates 6.8e-2 (dp-only layouts: ~1e-7). A wrong
# reduction is off by tens of percent, a lost main-weight update by 100%.
BF16_TOL = dict(loss=1e-3, param=0.2, grad=3e-2)

WORLD2 = [
    Layout("dense/tp2", "dense", tp=2),
    Layout("dense_pad/tp2", "dense_pad", tp=2),
    Layout("dense/dp2", "dense"),
    Layout("dense/tp2_sp", "dense", tp=2, sp=True),
    Layout("moe/tp2", "moe", tp=2),
    Layout("moe/dp2", "moe"),
    Layout("moe/tp2_sp", "moe", tp=2, sp=True),
    Layout("moe/ep2_dp2", "moe", ep=2),
    Layout("moe_capacity/ep2_dp2", "moe_capacity", ep=2),
    Layout("moe_capacity/tp2", "moe_capacity", tp=2),  # drops decided over the whole micro-batch
    Layout("moe_capacity/tp2_sp", "moe_capacity", tp=2, sp=True),
    Layout("moe/tp2_ep2_fold", "moe", tp=2, ep=2, fold=True),         # each tp rank holds 2 of the 4 experts
    Layout("moe_capacity/tp2_ep2_fold", "moe_capacity", tp=2, ep=2, fold=True),
    Layout("moe/dp2_bf16", "moe", precision="bf16"),
    Layout("dense/tp2_sp_bf16", "dense", tp=2, sp=True, precision="bf16"),
    Layout("moe_seq/tp2", "moe_seq", tp=2),          # sequences split over the two token shards
    Layout("moe_seq/tp2_sp", "moe_seq", tp=2, sp=True),
    Layout("moe_global/ep2_dp2", "moe_global", ep=2),
    Layout("moe_bias/dp2", "moe_bias"),
    Layout("dense_qk/tp2", "dense_qk", tp=2),
    Layout("dense_qk/tp2_sp", "dense_qk", tp=2, sp=True),
    Layout("moe_qk/tp2", "moe_qk", tp=2),
    Layout("moe_qk/tp2_sp", "moe_qk", tp=2, sp=True),
    Layout("gpt1/tp2_sp", "gpt1", tp=2, sp=True),
]
WORLD4 = [
    Layout("dense_h8/tp4", "dense_h8", tp=4),
    Layout("moe_h8/tp4", "moe_h8", tp=4),
    Layout("dense/tp2_dp2", "dense", tp=2),
    Layout("moe/tp2_dp2", "moe", tp=2),
    Layout("dense/dp4_zero1", "dense", zero1=True),
    Layout("moe/dp4_zero1", "moe", zero1=True),
    Layout("moe/ep4_dp4", "moe", ep=4),
    Layout("moe/tp2_ep2_dp2", "moe", tp=2, ep=2),
    Layout("moe/ep2_dp4_zero1", "moe", ep=2, zero1=True),  # edp = 2: expert grads reduced, experts partitioned
    Layout("moe/tp2_ep4_fold", "moe", tp=2, ep=4, fold=True),         # one expert per rank, edp = 1
    Layout("moe/tp2_ep2_fold_zero1", "moe", tp=2, ep=2, fold=True, zero1=True),  # edp = 2 across dp
    Layout("moe/tp2_ep2_dp2_bf16", "moe", tp=2, ep=2, precision="bf16"),
    Layout("moe/dp4_zero1_bf16", "moe", zero1=True, precision="bf16"),
    Layout("dense/tp2_dp2_zero1_bf16", "dense", tp=2, zero1=True, precision="bf16"),
    Layout("moe_global/tp2_ep2_dp2", "moe_global", tp=2, ep=2),
    Layout("moe_bias/tp2_ep2_dp2", "moe_bias", tp=2, ep=2),
]


@contextlib.contextmanager
def _one_thread():
    """The references run single-threaded: on a loaded 2-core machine intra-op threads make them ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def _reference(key: str, precision: str = "fp32") -> dict:
    with _one_thread():
        return reference(key, precision)


def _spawn(world: int, layouts: list[Layout]) -> list[dict]:
    refs = {key: _reference(*key) for key in {layout.reference_key for layout in layouts}}
    return run_distributed(run_layouts, world, layouts, refs, timeout=240)


@pytest.fixture(scope="module")
def world2():
    return _spawn(2, WORLD2)


@pytest.fixture(scope="module")
def world4():
    return _spawn(4, WORLD4)


def _check_layout(results: list[dict], layout: Layout) -> None:
    ref = _reference(*layout.reference_key)
    per_rank = [r[layout.name] for r in results]
    rel = max(((g["losses"] - ref["losses"]).abs() / ref["losses"].abs().clamp(min=1e-12)).max().item() for g in per_rank)
    print(f"{layout.name}: loss rel {rel:.2e}, step-0 grad {max(g['grad_err'] for g in per_rank):.2e}, "
          f"params {max(g['param_err'] for g in per_rank):.2e}, {max(g['seconds'] for g in per_rank):.1f} s")
    tol = BF16_TOL if layout.precision == "bf16" else dict(loss=LOSS_RTOL, param=PARAM_ATOL, grad=GRAD_ATOL)
    for rank, got in enumerate(per_rank):
        where = f"{layout.name} rank {rank} {got['coords']}"
        assert got["init_err"] == 0.0, f"{where}: initial weights differ from single-process init by {got['init_err']:.3g}"
        rel = ((got["losses"] - ref["losses"]).abs() / ref["losses"].abs().clamp(min=1e-12)).max().item()
        assert rel <= tol["loss"], f"{where}: losses {got['losses'].tolist()} vs reference {ref['losses'].tolist()}"
        assert torch.allclose(got["grad_norms"], ref["grad_norms"], rtol=tol["loss"], atol=0), where
        assert got["grad_err"] <= tol["grad"], f"{where}: step-0 gradient of {got['worst_grad']} off by {got['grad_err']:.3g}"
        assert got["param_err"] <= tol["param"], f"{where}: {got['worst_param']} off by {got['param_err']:.3g}"
    if layout.zero1:  # each rank steps only its share; the shares cover every distinct shard once
        owned = [got["n_owned"] for got in per_rank]
        n_expert = sum(".experts." in name for name in ref["init"])
        expert_shards = layout.ep * (1 if layout.fold else layout.tp)  # unfolded experts repeat over tp
        want = layout.tp * (len(ref["init"]) - n_expert) + expert_shards * n_expert
        assert min(owned) > 0 and sum(owned) == want, owned


@pytest.mark.slow
@pytest.mark.parametrize("layout", WORLD2, ids=[layout.name for layout in WORLD2])
def test_world2_layout_matches_single_process(world2, layout):
    _check_layout(world2, layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", WORLD4, ids=[layout.name for layout in WORLD4])
def test_world4_layout_matches_single_process(world4, layout):
    _check_layout(world4, layout)


def test_reference_exercises_clipping_capacity_and_updates():
    """The oracle is not trivial: clipping acts on some steps (not all), capacity drops tokens,
    aux losses are live, and the weights move far more than the comparison tolerance."""
    dense, capped = _reference("dense"), _reference("moe_capacity")
    for ref in (dense, capped):
        clipped = ref["grad_norms"] > MAX_NORM
        assert clipped.any() and not clipped.all(), ref["grad_norms"]
        moved = max((ref["final"][n] - ref["init"][n]).abs().max().item() for n in ref["init"])
        assert moved > 100 * PARAM_ATOL, moved
    assert (capped["losses"][:, 3] > 0).all(), "capacity_factor 1.0 should drop some routed slots"
    assert (capped["losses"][:, 1] > 0).all() and (dense["losses"][:, 1:3] == 0).all()


def test_balance_references_are_live():
    """The balancing oracles move: the expert biases change the routing within the steps, the
    sequence and global scopes give other aux losses than the micro-batch scope would."""
    bias = _reference("moe_bias")
    final = bias["final"]["layers.1.mlp.router.expert_bias"]
    assert bias["init"]["layers.1.mlp.router.expert_bias"].eq(0).all(), final
    assert final.unique().numel() >= 2, final
    assert "layers.0.mlp.router.weight" not in bias["init"]  # first_k_dense: block 0 is dense
    scoped = {key: _reference(key)["losses"][:, 1] for key in ("moe_seq", "moe_global")}
    for key, aux in scoped.items():
        micro = reference_with(key, aux_loss_scope="micro_batch")["losses"][:, 1]
        assert (aux > 0).all() and ((aux - micro).abs() > 1e-5 * aux).all(), key


def test_feature_references_are_live():
    """The HF-family features change the training: q/k clipping bites on the normalised q and k,
    and the per-head q/k norms and post-norm blocks give other losses than the plain blocks."""
    for key, off in (("dense_qk", dict(qkv_clip=None)), ("moe_qk", dict(qk_norm="none")),
                     ("gpt1", dict(norm_position="pre"))):
        ref, plain = _reference(key)["losses"][:, 0], reference_with(key, **off)["losses"][:, 0]
        assert (ref[-1] - plain[-1]).abs() > 1e-3 * ref[-1], (key, ref, plain)  # after 2 updates


# ----------------------------------------------------------------------------- invalid layouts

def _ctx(tp: int = 1, ep: int = 1) -> SimpleNamespace:
    """What validate_layout reads from a ParallelContext, without any process group."""
    return SimpleNamespace(tp=tp, ep=ep)


@pytest.mark.parametrize("key, tp, ep, pattern", [
    ("dense", 3, 1, r"model\.n_heads \(4\) must be divisible by parallel\.tp \(3\): use tp in \{1, 2, 4\}"),
    ("dense", 4, 1, r"model\.n_kv_heads \(2\) must be divisible by parallel\.tp \(4\)"),
    ("moe", 1, 3, r"model\.n_experts \(4\) must be divisible by parallel\.ep \(3\)"),
    ("dense", 1, 2, r"parallel\.ep \(2\) > 1 needs an MoE model"),
])
def test_model_rejects_layout_before_building(key, tp, ep, pattern):
    cfg = model_config(key)
    with pytest.raises(ValueError, match=pattern) as err:
        validate_layout(cfg, _ctx(tp, ep))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=pattern):  # the model's constructor runs the same check first
        Decoder(cfg, _ctx(tp, ep))


def test_padded_vocab_must_split_over_tp():
    cfg = replace(model_config("dense_h8"), vocab_pad_multiple=2)  # 250 rows: 8 heads / 4 kv heads do split by 4
    with pytest.raises(ValueError, match=r"padded vocabulary \(250\) must be divisible by parallel\.tp \(4\)"):
        validate_layout(cfg, _ctx(tp=4))


@pytest.mark.parametrize("world, kw, pattern", [
    (4, dict(tp=3, dp=1), r"parallel\.tp \(3\) \* parallel\.pp \(1\) \* parallel\.dp \(1\) = 3 must equal world_size \(4\)"),
    (4, dict(tp=3), r"world_size \(4\) must be divisible by parallel\.tp \(3\) \* parallel\.pp \(1\)"),
    (4, dict(ep=3), r"parallel\.dp \(4\) must be divisible by parallel\.ep \(3\)"),
    (8, dict(tp=2, ep=8), r"parallel\.dp \(4\) must be divisible by parallel\.ep \(8\)"),
])
def test_context_rejects_layout_before_any_process_group(world, kw, pattern):
    """These fail in the constructor before torch.distributed is touched (it is not initialised here)."""
    with pytest.raises(ValueError, match=pattern) as err:
        ParallelContext(world_size=world, rank=0, **kw)
    assert "\n" not in str(err.value)


def test_every_model_key_has_a_layout():
    assert {layout.model for layout in WORLD2 + WORLD4} == set(MODELS)
