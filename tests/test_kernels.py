"""moe.kernels: the fused SwiGLU and the permutation row ops, torch path (CPU) against plain
references and float64 gradcheck; the Triton path is checked against this one in tests/test_gpu.py."""

import pytest
import torch
import torch.nn.functional as F

from moe.kernels import combine_rows, gather_rows, swiglu
from moe.moe_layer import permute, unpermute


def _routing(T=7, k=2, E=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).softmax(-1)
    return experts, weights


def test_swiglu_matches_silu_gate_times_up_and_its_gradient():
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(swiglu(h), F.silu(h[..., :4]) * h[..., 4:])
    assert torch.autograd.gradcheck(swiglu, (h,))


def test_swiglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match="gate | up"):
        swiglu(torch.randn(2, 5))


@pytest.mark.parametrize("capacity", [None, 2])
def test_gather_and_combine_rows_match_index_add_reference(capacity):
    """Dropless and with dropped slots (capacity 2 of 14 slots over 3 experts drops most)."""
    experts, weights = _routing()
    perm = permute(experts, weights, n_experts=3, capacity=capacity)
    T, k = experts.shape
    x = torch.randn(T, 5, dtype=torch.float64)
    rows = gather_rows(x, perm.token_idx, perm.slot_row)
    torch.testing.assert_close(rows, x[perm.token_idx])
    y = torch.randn(perm.token_idx.numel(), 5, dtype=torch.float64)
    ref = torch.zeros(T, 5, dtype=torch.float64).index_add(0, perm.token_idx, y * perm.weights[:, None])
    torch.testing.assert_close(unpermute(y, perm), ref)
    # slot_row inverts the sort: kept slots point at their row, dropped ones at N
    n = perm.token_idx.numel()
    kept = perm.slot_row < n
    assert (perm.token_idx[perm.slot_row[kept]] == torch.arange(T)[:, None].expand(T, k)[kept]).all()
    assert capacity is None and kept.all() or capacity is not None and not kept.all()


@pytest.mark.parametrize("capacity", [None, 2])
def test_gather_and_combine_rows_gradcheck(capacity):
    experts, weights = _routing(seed=1)
    perm = permute(experts, weights, n_experts=3, capacity=capacity)
    x = torch.randn(experts.shape[0], 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(perm.token_idx.numel(), 4, dtype=torch.float64, requires_grad=True)
    w = perm.weights.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gather_rows(x, perm.token_idx, perm.slot_row), (x,))
    assert torch.autograd.gradcheck(lambda y, w: combine_rows(y, w, perm.token_idx, perm.slot_row), (y, w))


def test_combine_rows_keeps_the_dtype_and_accumulates_in_float32():
    experts, weights = _routing(T=64, k=2, E=4)
    perm = permute(experts, weights.float(), n_experts=4)
    y = torch.randn(perm.token_idx.numel(), 16).bfloat16()
    out = combine_rows(y, perm.weights, perm.token_idx, perm.slot_row)
    ref = torch.zeros(64, 16).index_add(0, perm.token_idx, y.float() * perm.weights[:, None]).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_everything_dropped_gives_zeros_and_zero_gradients():
    experts = torch.zeros(4, 1, dtype=torch.long)
    perm = permute(experts, torch.ones(4, 1), n_experts=2, capacity=0)
    assert perm.token_idx.numel() == 0 and (perm.slot_row == 0).all()
    x = torch.randn(4, 3, requires_grad=True)
    rows = gather_rows(x, perm.token_idx, perm.slot_row)
    y = rows * 2
    out = combine_rows(y, perm.weights, perm.token_idx, perm.slot_row)
    assert out.shape == (4, 3) and (out == 0).all()
    (out.sum() + rows.sum()).backward()
    assert (x.grad == 0).all()


# ---------------------------------------------------------------- cross-entropy shard kernels (torch path)
def test_ce_shard_stats_and_grad_match_log_softmax():
    from parallel.kernels import ce_shard_grad, ce_shard_stats

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 11, generator=gen, dtype=torch.float64) * 3
    z[:, 9:] = float("-inf")  # padded vocab columns
    z[5] = float("-inf")      # a row of a shard that holds only padding
    t = torch.tensor([0, 3, 8, -1, 4, -1])
    m, s, picked = ce_shard_stats(z, t)
    lse = m + s.log()
    torch.testing.assert_close(lse[:5], torch.logsumexp(z[:5], -1))
    assert s[5] == 0 and m[5] == float("-inf") and picked[3] == 0 and picked[5] == 0
    torch.testing.assert_close(picked[[0, 1, 2, 4]], z[[0, 1, 2, 4], t[[0, 1, 2, 4]]])
    g = torch.rand(5, generator=gen, dtype=torch.float64)
    dz = ce_shard_grad(z[:5], t[:5], lse[:5], g)
    ref = (torch.softmax(z[:5], -1) - F.one_hot(t[:5].clamp(min=0), 11) * (t[:5, None] >= 0)) * g[:, None]
    torch.testing.assert_close(dz, ref)


def test_a_dropped_slot_adds_zero_even_when_a_kept_row_is_not_finite():
    """Dropped slots must not read anything into their token: an inf in some kept expert output
    reaches only the tokens routed to it (the torch path gathers a placeholder row and masks it)."""
    experts = torch.tensor([[0, 1]] * 3)
    perm = permute(experts, torch.full((3, 2), 0.5), n_experts=2, capacity=2)  # token 2 keeps nothing
    y = torch.ones(perm.token_idx.numel(), 4)
    y[-1] = float("inf")
    out = combine_rows(y, perm.weights, perm.token_idx, perm.slot_row)
    assert (out[2] == 0).all() and torch.isinf(out[perm.token_idx[-1]]).all()
    g = torch.ones(perm.token_idx.numel(), 4)
    g[-1] = float("nan")
    x = torch.zeros(3, 4, requires_grad=True)
    gather_rows(x, perm.token_idx, perm.slot_row).backward(g)
    assert (x.grad[2] == 0).all()
