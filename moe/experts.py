"""Expert weights and their interchangeable compute backends.

All backends take the same input: rows `x` [N, D] already sorted by (local) expert, and
`counts` [E] (int64, rows per expert, summing to N), and return y [N, D] where row i is
expert(e_i)(x_i). SwiGLU experts: y = (silu(x W_gate) * (x W_up)) W_out, stored as
w_in [E, D, 2F] (gate | up halves side by side, so one grouped GEMM computes both) and
w_out [E, F, D]. GELU experts: w_in [E, D, F].

Backends:
  grouped_mm  torch's grouped GEMM (one kernel per projection for all experts; bf16 on CUDA, any on CPU)
  padded      rows scattered into [E, C, D] buffers (C = capacity or the largest count), batched matmul
  loop        float32 per-expert reference
  megablocks  MegaBlocks' grouped GEMM, only when that package imports
"""

from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.kernels import autocast_dtype
from parallel.layout import Split

from .kernels import swiglu as swiglu_fn

BACKENDS = ("grouped_mm", "padded", "loop", "megablocks")


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise RuntimeError("this torch has no grouped_mm (needs torch >= 2.8): set model.expert_backend=padded")
    return fn


def megablocks_gmm():
    """MegaBlocks' grouped GEMM op, or None when megablocks (a CUDA source build) is not installed."""
    try:
        gg = importlib.import_module("megablocks.grouped_gemm_util")
        return gg.ops.gmm if gg.grouped_gemm_is_available() else None
    except Exception:  # ImportError, or a broken CUDA extension
        return None


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; makes the incoming gradient contiguous. grouped_mm's backward rejects
    non-contiguous gradients (e.g. the expanded ones produced by y.sum())."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _activation(h: torch.Tensor, swiglu: bool, approx: str) -> torch.Tensor:
    if swiglu:  # one fused kernel on CUDA (moe.kernels)
        return swiglu_fn(h)
    return F.gelu(h, approximate=approx)


class Experts(nn.Module):
    """E local experts (E = n_experts / ep under expert parallelism: the weights are cut on dim 0).
    They run on the tokens routed to them from a token shard (under tp each rank routes 1/tp of
    the micro-batch), which PARAM_SPLITS records for the gradient reducer."""

    PARAM_SPLITS = {name: Split(ep_dim=0, token_sharded=True) for name in ("w_in", "w_out")}

    def __init__(self, n_local: int, d_model: int, ffn: int, swiglu: bool, gelu_approx: str, backend: str):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"model.expert_backend ({backend!r}) is not one of {list(BACKENDS)}")
        self.swiglu, self.approx, self.backend = swiglu, gelu_approx, backend
        self.w_in = nn.Parameter(torch.empty(n_local, d_model, ffn * (2 if swiglu else 1)))
        self.w_out = nn.Parameter(torch.empty(n_local, ffn, d_model))
        if backend == "megablocks" and megablocks_gmm() is None:
            raise ValueError("model.expert_backend=megablocks but megablocks does not import here: "
                             "install it (CUDA only) or use expert_backend=grouped_mm")

    def forward(self, x: torch.Tensor, counts: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        compute_dtype = autocast_dtype(x.device.type)
        if compute_dtype is not None:  # compute like an autocast matmul: in its dtype
            x = x.to(compute_dtype)
        if x.shape[0] == 0:  # keep x in the graph: its backward may be an expert-parallel all-to-all
            return x.new_zeros(0, self.w_out.shape[-1]) + 0 * (x.sum() + self.w_in.sum() + self.w_out.sum()).to(x.dtype)
        if self.backend == "loop":
            return self.forward_loop(x, counts)
        if self.backend == "padded":
            return self.forward_padded(x, counts, capacity)
        if self.backend == "megablocks":
            return self.forward_megablocks(x, counts)
        return self.forward_grouped(x, counts)

    def forward_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The float32 reference: one small MLP per expert (float32 even inside autocast)."""
        outs, start = [], 0
        with torch.autocast(x.device.type, enabled=False):
            for e, n in enumerate(counts.tolist()):
                h = x[start:start + n].float() @ self.w_in[e].float()
                outs.append(_activation(h, self.swiglu, self.approx) @ self.w_out[e].float())
                start += n
        return torch.cat(outs).to(x.dtype)

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype != torch.bfloat16:
            if not getattr(self, "_warned", False):
                warnings.warn("grouped_mm on CUDA needs bf16 activations; float32 falls back to the padded backend")
                self._warned = True
            return self.forward_padded(x, counts, None)
        gmm = _grouped_mm_fn()
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = gmm(x.contiguous(), self.w_in.to(x.dtype), offs=offs)
        a = _activation(_ContiguousGrad.apply(h), self.swiglu, self.approx)
        return _ContiguousGrad.apply(gmm(a.contiguous(), self.w_out.to(x.dtype), offs=offs))

    def forward_padded(self, x: torch.Tensor, counts: torch.Tensor, capacity: int | None) -> torch.Tensor:
        """Scatter rows into [E, C, D] (C = capacity, or the largest count when dropless), two bmm's,
        gather back. Padding rows are zeros and are never read back."""
        E = counts.shape[0]
        C = capacity if capacity is not None else int(counts.max())
        if capacity is not None and int(counts.max()) > capacity:
            raise ValueError(f"padded experts: an expert got {int(counts.max())} rows but capacity is {capacity}")
        starts = torch.cumsum(counts, 0) - counts
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=x.shape[0])
        slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
        flat = expert_of_row * C + slot  # row -> position in the [E*C] buffer
        buf = x.new_zeros(E * C, x.shape[1]).index_copy(0, flat, x).view(E, C, -1)
        h = torch.bmm(buf, self.w_in.to(x.dtype))
        y = torch.bmm(_activation(h, self.swiglu, self.approx), self.w_out.to(x.dtype))
        return y.view(E * C, -1).index_select(0, flat)

    def forward_megablocks(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gmm = megablocks_gmm()
        sizes = counts.cpu()
        h = gmm(x, self.w_in.to(x.dtype), sizes)
        return gmm(_activation(h, self.swiglu, self.approx), self.w_out.to(x.dtype), sizes)
