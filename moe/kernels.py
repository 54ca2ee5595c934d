"""Fused elementwise and row-movement ops of the MoE layer and the SwiGLU MLP.

Each op is one autograd Function with two implementations of the same math:
  - a Triton kernel, used for CUDA tensors when Triton imports (one pass over memory, fp32 math);
  - plain torch ops (CPU, or no Triton), which the CPU test suite checks against references.
`tests/test_gpu.py` checks the kernels against the torch path on a GPU.

  swiglu(h)                          h [M, 2F] = gate | up  ->  silu(gate) * up  [M, F]
  gather_rows(x, token_idx, slot_row) x [T, D] -> x[token_idx] [N, D]; backward sums each token's
                                      k slot gradients by gather (no atomics, deterministic)
  rope_triton(x, cos, sin, interleaved)  rotary positions on [B, S, H, Dh] in one pass (CUDA only; the
                                      torch path is moe.layers.apply_rope)
  combine_rows(y, w, token_idx, slot_row)
                                     out[t] = sum_j w[slot] * y[slot_row[t, j]]  [T, D]; a dropped
                                      slot (slot_row == N) adds nothing; backward gives y and w

`slot_row` [T, k] is the inverse of the expert-major sort: the row of slot (t, j) among the N kept,
sorted rows, or N when the slot was dropped by the capacity limit. `token_idx` [N] is each sorted
row's token. The rows are always accumulated in float32 and written in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.kernels import accumulate_dtype, triton, use_triton

if triton is not None:
    import triton.language as tl


def _block(width: int) -> int:
    return min(1024, triton.next_power_of_2(max(width, 16)))


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, a_ptr, F_: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_
        g = tl.load(h_ptr + row * 2 * F_ + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F_ + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        tl.store(a_ptr + row * F_ + cols, a.to(a_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(h_ptr, da_ptr, dh_ptr, F_: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F_
        g = tl.load(h_ptr + row * 2 * F_ + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F_ + F_ + cols, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + row * F_ + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = da * u * s * (1.0 + g * (1.0 - s))
        du = da * g * s
        tl.store(dh_ptr + row * 2 * F_ + cols, dg.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + row * 2 * F_ + F_ + cols, du.to(dh_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_kernel(src_ptr, slot_ptr, w_ptr, out_ptr, N, D: tl.constexpr, K: tl.constexpr,
                        HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        # out[t] = sum_j w[t, j] * src[slot[t, j]]  (slot == N: dropped, adds nothing)
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            s = tl.load(slot_ptr + t * K + j)
            valid = s < N
            v = tl.load(src_ptr + tl.where(valid, s, 0) * D + cols, mask=mask & valid, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(go_ptr, y_ptr, tok_ptr, w_ptr, gy_ptr, gw_ptr, D: tl.constexpr, BLOCK: tl.constexpr):
        # per sorted row s of token t: gy[s] = w[s] * go[t];  gw[s] = <go[t], y[s]>
        s = tl.program_id(0).to(tl.int64)
        t = tl.load(tok_ptr + s)
        w = tl.load(w_ptr + s).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            go = tl.load(go_ptr + t * D + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + s * D + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(gy_ptr + s * D + cols, (go * w).to(gy_ptr.dtype.element_ty), mask=mask)
            acc += go * y
        tl.store(gw_ptr + s, tl.sum(acc, axis=0))


    @triton.jit
    def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, S, H, sxb, sxs, sxh, sob, sos, soh,
                     HALF: tl.constexpr, DH: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
        # one program per (b, s): every head's first 2*HALF dims rotated by position s, the rest copied
        pid = tl.program_id(0).to(tl.int64)
        b, s = pid // S, pid % S
        heads = tl.arange(0, BLOCK_H).to(tl.int64)  # heads * stride can pass 2^31 (long sequences)
        p = tl.arange(0, BLOCK_P)
        pm = p < HALF
        cos = tl.load(cos_ptr + s * HALF + p, mask=pm, other=0.0)[None, :]
        sin = tl.load(sin_ptr + s * HALF + p, mask=pm, other=0.0)[None, :]
        if INVERSE:  # the backward rotates by -angle
            sin = -sin
        if INTERLEAVED:
            i0, i1 = 2 * p, 2 * p + 1
        else:
            i0, i1 = p, p + HALF
        m = (heads[:, None] < H) & pm[None, :]
        xb = x_ptr + b * sxb + s * sxs + heads[:, None] * sxh
        ob = out_ptr + b * sob + s * sos + heads[:, None] * soh
        x0 = tl.load(xb + i0[None, :], mask=m, other=0.0).to(tl.float32)
        x1 = tl.load(xb + i1[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(ob + i0[None, :], (x0 * cos - x1 * sin).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(ob + i1[None, :], (x1 * cos + x0 * sin).to(out_ptr.dtype.element_ty), mask=m)
        if DH > 2 * HALF:  # partial rotary: the other dims pass through
            r = 2 * HALF + tl.arange(0, BLOCK_R)
            mr = (heads[:, None] < H) & (r < DH)[None, :]
            tl.store(ob + r[None, :], tl.load(xb + r[None, :], mask=mr, other=0.0), mask=mr)


# ---------------------------------------------------------------- rotary positions
def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool):
    B, S, H, DH = x.shape
    half = cos.shape[-1]
    out = torch.empty(B, S, H, DH, device=x.device, dtype=x.dtype)
    if x.numel():
        _rope_kernel[(B * S,)](x, out, cos, sin, S, H, *x.stride()[:3], *out.stride()[:3], HALF=half, DH=DH,
                               INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_H=triton.next_power_of_2(H),
                               BLOCK_P=triton.next_power_of_2(half), BLOCK_R=triton.next_power_of_2(max(DH - 2 * half, 1)),
                               num_warps=4)
    return out


class _Rope(torch.autograd.Function):
    """Triton rotary embedding on [B, S, H, Dh] (any strides with a unit last stride): one read and
    one write of x; backward is the inverse rotation of the gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved: bool):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _rope_launch(x, cos, sin, interleaved, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        g = grad if grad.stride(-1) == 1 else grad.contiguous()
        return _rope_launch(g, cos, sin, ctx.interleaved, inverse=True), None, None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of each head of x [B, S, H, Dh] (a CUDA tensor; Triton
    must import) by the angles of its position; cos/sin [>= S, r/2] float32. Returns a new
    contiguous [B, S, H, Dh] tensor in x's dtype (the math is float32)."""
    S = x.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos[:S].float().contiguous(), sin[:S].float().contiguous()
    return _Rope.apply(x, cos, sin, interleaved)


# ---------------------------------------------------------------- swiglu
def _swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """Triton SwiGLU: saves only h; backward writes d(gate) | d(up) in one pass."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        h2 = h.contiguous().view(-1, h.shape[-1])
        M, f = h2.shape[0], h.shape[-1] // 2
        a = torch.empty(M, f, device=h.device, dtype=h.dtype)
        if M:
            block = _block(f)
            _swiglu_fwd_kernel[(M, triton.cdiv(f, block))](h2, a, f, BLOCK=block, num_warps=4)
        ctx.save_for_backward(h2)
        ctx.shape = h.shape
        return a.view(*h.shape[:-1], f)

    @staticmethod
    def backward(ctx, da: torch.Tensor):
        (h2,) = ctx.saved_tensors
        M, f = h2.shape[0], h2.shape[1] // 2
        da = da.contiguous().view(M, f)
        dh = torch.empty_like(h2)
        if M:
            block = _block(f)
            _swiglu_bwd_kernel[(M, triton.cdiv(f, block))](h2, da, dh, f, BLOCK=block, num_warps=4)
        return dh.view(ctx.shape)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h [..., 2F] holding gate | up side by side; returns [..., F]."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim ({h.shape[-1]}) must hold gate | up halves, so be even")
    if use_triton(h):
        return _SwiGLU.apply(h)
    return _swiglu_torch(h)


# ---------------------------------------------------------------- permutation rows
def _combine(src: torch.Tensor, slot_row: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * src[slot_row[t, j]] ([T, D], src's dtype, fp32 accumulation);
    slot_row == N (dropped) adds nothing; w None means weights of 1."""
    T, k = slot_row.shape
    N, D = src.shape
    if N == 0:
        return src.new_zeros(T, D)
    if use_triton(src):
        out = torch.empty(T, D, device=src.device, dtype=src.dtype)
        if T:
            block = _block(D)
            w_arg = w.contiguous() if w is not None else slot_row  # unused when HAS_W is False
            _combine_kernel[(T, triton.cdiv(D, block))](src.contiguous(), slot_row.contiguous(), w_arg, out, N, D,
                                                        K=k, HAS_W=w is not None, BLOCK=block, num_warps=4)
        return out
    acc = accumulate_dtype(src)
    valid = slot_row < N
    rows = src.index_select(0, slot_row.clamp(max=N - 1).flatten()).view(T, k, D).to(acc)
    rows = torch.where(valid[..., None], rows, 0.0)  # a dropped slot adds 0, even if the row it read is inf
    scale = valid.to(acc) if w is None else w.to(acc)
    return torch.einsum("tkd,tk->td", rows, scale).to(src.dtype)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, token_idx: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slot_row)
        return x.index_select(0, token_idx)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (slot_row,) = ctx.saved_tensors
        return _combine(grad_rows.contiguous(), slot_row, None), None, None


def gather_rows(x: torch.Tensor, token_idx: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    """x[token_idx] ([N, D]): each token's row once per kept slot, in sorted order. Backward sums
    the k slot gradients of each token by gathering them through `slot_row` (no atomic adds)."""
    return _GatherRows.apply(x, token_idx, slot_row)


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, w: torch.Tensor, token_idx: torch.Tensor, slot_row: torch.Tensor):
        w_slot = torch.cat([w, w.new_zeros(1)])[slot_row]  # [T, k], 0 if dropped
        ctx.save_for_backward(y, w, token_idx)
        return _combine(y, slot_row, w_slot)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, w, token_idx = ctx.saved_tensors
        go = grad_out.contiguous()
        N, D = y.shape
        if N and use_triton(y, go):
            y = y.contiguous()  # the kernel reads and writes rows at s * D
            gy = torch.empty_like(y)
            gw = torch.empty(N, device=y.device, dtype=torch.float32)
            _combine_bwd_kernel[(N,)](go, y, token_idx, w.contiguous(), gy, gw, D,
                                      BLOCK=_block(D), num_warps=4)
        else:
            acc = accumulate_dtype(y)
            go_rows = go.index_select(0, token_idx).to(acc)  # [N, D]
            gy = (go_rows * w.to(acc)[:, None]).to(y.dtype)
            gw = (go_rows * y.to(acc)).sum(-1)
        return gy, gw.to(w.dtype), None, None


def combine_rows(y: torch.Tensor, w: torch.Tensor, token_idx: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over token t's kept slots of w[row] * y[row] ([T, D] in y's dtype, accumulated in
    float32). y [N, D] expert outputs in sorted order, w [N] their gate weights (float32)."""
    return _CombineRows.apply(y, w, token_idx, slot_row)
