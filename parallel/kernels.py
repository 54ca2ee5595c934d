"""Triton kernels of the parallel layer (the vocab-parallel cross-entropy), and the switch that
decides when any of our Triton kernels run (`use_triton`, shared with moe.kernels).

Triton is optional: the kernels run only for CUDA tensors in eager mode when it imports. Every op
here has a torch path with the same math (float32), used on CPU and under torch.compile, which the
CPU test suite checks; `tests/test_gpu.py` checks the kernels against it on a GPU.

Cross-entropy over a vocab shard, per row (token) of logits z [R, V_local]:
  ce_shard_stats(z, t)        m = max_j z_j,  s = sum_j exp(z_j - m),  picked = z_t (0 when the
                              target t is not in this shard, t = -1)          one read of z
  ce_shard_grad(z, t, lse, g) dz_j = (exp(z_j - lse) - [j == t]) * g           one read, one write
so nothing of size [R, V] is kept in float32 (the softmax is recomputed from z in backward).
"""

from __future__ import annotations

import torch

try:  # optional: used only for CUDA tensors
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, or None when it is off (or the device
    type has no autocast, e.g. meta tensors used for shape tracing)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    """What the torch paths compute in: float32 for half types, the input's own type when wider
    (float64 in gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Our Triton kernels run for CUDA tensors in eager mode. Under torch.compile the torch path is
    traced instead, so inductor sees plain ops and fuses them with their neighbours itself."""
    return triton is not None and all(t.is_cuda for t in tensors) and not torch.compiler.is_compiling()


if triton is not None:

    @triton.jit
    def _ce_stats_kernel(z_ptr, t_ptr, m_ptr, s_ptr, picked_ptr, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        m_vec = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        s_vec = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):  # online max / sum of exponentials, per lane
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m_vec, x)
            live = new_m > float("-inf")  # -inf logits (padded vocab) add nothing
            s_vec = tl.where(live, s_vec * tl.exp(m_vec - new_m) + tl.exp(x - new_m), 0.0)
            m_vec = new_m
        m = tl.max(m_vec, axis=0)
        s = tl.sum(tl.where(m_vec > float("-inf"), s_vec * tl.exp(m_vec - m), 0.0), axis=0)
        t = tl.load(t_ptr + row)
        picked = tl.where(t >= 0, tl.load(base + tl.maximum(t, 0)).to(tl.float32), 0.0)
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(picked_ptr + row, picked)

    @triton.jit
    def _ce_grad_kernel(z_ptr, dz_ptr, t_ptr, lse_ptr, g_ptr, V, stride, dstride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(z_ptr + row * stride + cols, mask=mask, other=float("-inf")).to(tl.float32)
            d = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * g
            tl.store(dz_ptr + row * dstride + cols, d.to(dz_ptr.dtype.element_ty), mask=mask)


_CE_BLOCK = 2048


def ce_shard_stats(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [R, V] logits (unit last stride), t [R] local target index or -1. Returns float32 [R]
    tensors m (row max), s (sum of exp(z - m)) and picked (z_t, or 0 where t = -1); the torch path
    keeps float64 for float64 z (gradcheck)."""
    R, V = z.shape
    if use_triton(z, t) and R and V:
        m, s, picked = (torch.empty(R, device=z.device, dtype=torch.float32) for _ in range(3))
        _ce_stats_kernel[(R,)](z, t, m, s, picked, V, z.stride(0), BLOCK=_CE_BLOCK, num_warps=8)
        return m, s, picked
    zf = z.to(accumulate_dtype(z))
    m = zf.max(dim=-1).values
    live = m > float("-inf")  # a row of only -inf logits sums to 0 rather than NaN
    s = torch.where(live, (zf - torch.where(live, m, 0.0).unsqueeze(-1)).exp().sum(-1), 0.0)
    picked = torch.where(t >= 0, zf.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    return m, s, picked


def ce_shard_grad(z: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dz = (softmax(z) - onehot(t)) * g per row, with softmax = exp(z - lse) (lse float32 [R], the
    log-sum-exp over the whole vocab) and g float32 [R]; returned in z's dtype."""
    R, V = z.shape
    if use_triton(z, t) and R and V:
        dz = torch.empty(R, V, device=z.device, dtype=z.dtype)
        _ce_grad_kernel[(R,)](z, dz, t, lse.contiguous(), g.contiguous(), V, z.stride(0), dz.stride(0),
                              BLOCK=_CE_BLOCK, num_warps=8)
        return dz
    g = g.to(lse.dtype)
    dz = (z.to(lse.dtype) - lse.unsqueeze(-1)).exp_().mul_(g.unsqueeze(-1))
    dz.scatter_add_(-1, t.clamp(min=0).unsqueeze(-1), (-g * (t >= 0)).unsqueeze(-1))
    return dz.to(z.dtype)
