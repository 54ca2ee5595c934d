"""Building blocks of the decoder: norms, positions (learned, sinusoidal, RoPE with scaling),
attention (SDPA; MHA/GQA/MQA; optional banded window) and the dense MLP (GELU / SwiGLU).

Shapes: B batch, S sequence, D d_model, H query heads, K kv heads, Dh head dim, F MLP width.
Linear layers come from parallel.tensor: with tensor parallelism they hold a shard (heads, MLP
columns) and do the Megatron collectives; with tp == 1 they are plain linears.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.context import ParallelContext
from parallel.layout import Split
from parallel.rng import REPLICATED, TP_LOCAL, DropoutKey
from parallel.tensor import ColumnParallelLinear, ParallelRMSNorm, RowParallelLinear, \
    enter_tp_region, fused_column_linear

from .config import ModelConfig
from .kernels import rope_triton, swiglu, use_triton


# ---------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight  (LLaMA, GLM); torch's fused rms_norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (GPT). Under autocast it computes in float32, so a bf16 model keeps its
    weight and bias in float32 rather than casting them on every call."""

    PARAM_SPLITS = {"weight": Split(keep_fp32=True), "bias": Split(keep_fp32=True)}


class HeadRMSNorm(RMSNorm):
    """RMSNorm of each attention head's Dh features with one [Dh] weight shared by the heads
    (Qwen3 and GLM-4.5 q/k norms), applied to [.., heads, Dh]. Under tensor parallelism a rank
    holds H/tp heads, so its weight gradient sums only its own heads: a partial sum over the tp
    group, with or without sequence parallelism (PARAM_SPLITS)."""

    PARAM_SPLITS = {"weight": Split(tp_partial=True)}

    def __init__(self, dim: int, eps: float, ctx: ParallelContext):
        super().__init__(dim, eps)


def make_qk_norms(cfg: ModelConfig, ctx: ParallelContext) -> tuple[nn.Module | None, ...]:
    """(q norm, k norm) for model.qk_norm: per head ([Dh] weights), over the whole projection
    ([H*Dh] / [K*Dh] weights, split over tp like the projection's output), or none."""
    if cfg.qk_norm == "head":
        return tuple(HeadRMSNorm(cfg.dim_head, cfg.norm_eps, ctx) for _ in "qk")
    if cfg.qk_norm == "full":
        return (ParallelRMSNorm(cfg.n_heads * cfg.dim_head, cfg.norm_eps, ctx),
                ParallelRMSNorm(cfg.kv_heads * cfg.dim_head, cfg.norm_eps, ctx))
    return None, None


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# ---------------------------------------------------------------- positions
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) for the rotary dims, with the configured context scaling:
    linear (positions / factor), NTK-aware (base * factor^(d/(d-2))), or LLaMA-3.1 per-frequency
    scaling (long wavelengths / factor, short kept, a smooth ramp in between)."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    if cfg.rope_scaling == "ntk":
        base = base * cfg.rope_scaling_factor ** (dim / (dim - 2))
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        inv = _llama3_scale(inv, cfg)
    return inv.float()


def _llama3_scale(inv: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    factor, orig = cfg.rope_scaling_factor, cfg.rope_original_max_seq_len
    low_wavelen = orig / cfg.rope_low_freq_factor
    high_wavelen = orig / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / factor, blended)
    return torch.where(wavelen < high_wavelen, inv, out)


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, rotary_dim/2] in float32."""
    inv = rope_inv_freq(cfg).to(device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of each head of x [B, H, S, Dh]; the rest pass through.
    Pairs are (i, i + r/2) ("rotate half", LLaMA/HF) or (2i, 2i+1) (interleaved, GLM)."""
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r].float(), x[..., r:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """apply_rope for x [B, S, H, Dh] with tables for >= S positions: one fused kernel on CUDA when
    Triton imports, else apply_rope on the [B, H, S, Dh] view. Tables [B, S, r/2] give every row its
    own positions (packed documents, see document_layout) and take the torch path."""
    if cos.dim() == 3:
        y = apply_rope(x.transpose(1, 2), cos[:, None], sin[:, None], interleaved)  # [B, H, S, Dh]
        return y.transpose(1, 2)
    if use_triton(x):
        return rope_triton(x, cos, sin, interleaved)
    S = x.shape[1]
    return apply_rope(x.transpose(1, 2), cos[:S], sin[:S], interleaved).transpose(1, 2)


def sinusoidal_table(seq_len: int, dim: int) -> torch.Tensor:
    """The original Transformer's fixed positions: sin on even dims, cos on odd, [S, D]."""
    pos = torch.arange(seq_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(seq_len, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table


# ---------------------------------------------------------------- dropout
class Dropout(nn.Module):
    """Inverted dropout whose mask comes from the layout-aware streams of parallel/rng.py.

    `sharded`: each tp rank holds different elements of the activation (sequence parallelism), so
    its masks must differ from the other tp ranks'; otherwise every tp rank holds the whole
    activation and must drop the same elements, or the replicas would drift apart.
    """

    def __init__(self, p: float, sharded: bool):
        super().__init__()
        self.p, self.stream = p, TP_LOCAL if sharded else REPLICATED

    def forward(self, x: torch.Tensor, key: DropoutKey | None, site: str) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if key is None:
            raise ValueError(f"dropout at {site} needs a DropoutKey (ParallelRNG.next_key()): run "
                             f"blocks through Decoder.forward, or set model.dropout=0")
        return key.dropout(x, self.p, self.stream, site)

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream}"


# ---------------------------------------------------------------- attention
def banded_causal_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean [S, S], True where query i may attend key j: i - window < j <= i."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def document_layout(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal mask and per-document positions for packed sequences.

    doc_ids [B, S]: a label per position; a document is a run of equal neighbours (labels may repeat
    further on). Returns mask [B, 1, S, S], True where query i may attend key j: same run and
    j <= i; and positions [B, S]: i minus the start of i's run, so every document sees exactly what
    it would see alone in its own row (positions 0, 1, ... and no other document)."""
    B, S = doc_ids.shape
    idx = torch.arange(S, device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run = starts.long().cumsum(dim=1)  # [B, S] run index, one per document
    causal = idx[None, :] <= idx[:, None]  # [S, S]
    mask = (run[:, :, None] == run[:, None, :]) & causal
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # [B, S] start of each position's run
    return mask[:, None], idx - first


class Attention(nn.Module):
    """Causal self-attention through scaled_dot_product_attention. GQA/MQA use SDPA's enable_gqa,
    so K/V are never repeated in memory. Under tensor parallelism each rank holds H/tp query heads
    and K/tp kv heads (whole groups), so no communication is needed inside attention itself."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer_idx: int):
        super().__init__()
        self.h_local = cfg.n_heads // ctx.tp
        self.kv_local = cfg.kv_heads // ctx.tp
        self.dh = cfg.dim_head
        self.window = cfg.local_window if cfg.is_local_layer(layer_idx) else None
        self.site = f"layers.{layer_idx}.attn.probs"
        self.interleaved = cfg.rope_interleaved
        self.dropout = cfg.dropout
        qkv_bias = cfg.use_qkv_bias
        self.wq = ColumnParallelLinear(cfg.d_model, cfg.n_heads * self.dh, qkv_bias, ctx)
        self.wk = ColumnParallelLinear(cfg.d_model, cfg.kv_heads * self.dh, qkv_bias, ctx)
        self.wv = ColumnParallelLinear(cfg.d_model, cfg.kv_heads * self.dh, qkv_bias, ctx)
        self.wo = RowParallelLinear(cfg.n_heads * self.dh, cfg.d_model, cfg.bias, ctx)
        self.qk_norm = cfg.qk_norm
        self.q_norm, self.k_norm = make_qk_norms(cfg, ctx)
        self.clip = cfg.qkv_clip

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                key: DropoutKey | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """key: this call's dropout stream (needed when attention dropout is on); mask: None
        (causal) or a boolean [B, 1, S, S] that already includes causality (packed documents, see
        document_layout); a local window is applied on top of either."""
        x = enter_tp_region(x, self.wq.group, self.wq.sequence_parallel)  # one gather for q, k and v
        B, S = x.shape[:2]  # under sequence parallelism S is now the full sequence
        qkv = fused_column_linear(x, [self.wq, self.wk, self.wv])  # one GEMM: [B, S, (H + 2K) Dh]
        q, k, v = qkv.split([self.h_local * self.dh, self.kv_local * self.dh, self.kv_local * self.dh], dim=-1)
        q, k, v = self._norm_and_clip(q, k, v, B, S)  # [B, S, H, Dh], [B, S, K, Dh], [B, S, K Dh]
        if rope is not None:
            q, k = rotary(q, *rope, self.interleaved), rotary(k, *rope, self.interleaved)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, Dh], [B, K, S, Dh]
        v = v.view(B, S, self.kv_local, self.dh).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if p > 0.0:  # this rank's heads: masks independent of every other rank's (tp_local stream)
            if key is None:
                raise ValueError(f"attention dropout at {self.site} needs a DropoutKey: run blocks "
                                 f"through Decoder.forward, or set model.dropout=0")
            with key.fork(TP_LOCAL, self.site, x.device):
                y = self._sdpa(q, k, v, p, mask)
        else:
            y = self._sdpa(q, k, v, p, mask)
        return self.wo(y.transpose(1, 2).reshape(B, S, self.h_local * self.dh))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
              mask: torch.Tensor | None) -> torch.Tensor:
        """Causal (or banded, or document-masked) SDPA of q [B, H, S, Dh] over k, v [B, K, S, Dh]
        -> [B, H, S, Dh]."""
        gqa = self.kv_local != self.h_local
        if self.window is not None:
            band = banded_causal_mask(q.shape[2], self.window, q.device)
            mask = band if mask is None else mask & band
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p,
                                                  enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)

    def _norm_and_clip(self, q, k, v, B: int, S: int):
        """q, k as [B, S, heads, Dh] after the q/k norms (over the whole projection before the head
        view, or per head after it), then q, k, v clamped to [-qkv_clip, qkv_clip] (OLMoE order)."""
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)  # [B, S, H Dh], [B, S, K Dh] (this rank's shard)
        q = q.view(B, S, self.h_local, self.dh)
        k = k.view(B, S, self.kv_local, self.dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        return q, k, v


# ---------------------------------------------------------------- dense MLP
def gelu(x: torch.Tensor, approx: str) -> torch.Tensor:
    return F.gelu(x, approximate=approx)


class DenseMLP(nn.Module):
    """GELU: W2 gelu(W1 x).  SwiGLU: W2 (silu(W1 x) * W3 x).  W1/W3 column-parallel, W2 row-parallel,
    so a tensor-parallel MLP needs one all-reduce (or reduce-scatter) at its output."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, ffn_dim: int | None = None):
        super().__init__()
        f = ffn_dim or cfg.ffn
        self.swiglu = cfg.mlp == "swiglu"
        self.approx = cfg.gelu_approx
        self.w1 = ColumnParallelLinear(cfg.d_model, f, cfg.bias, ctx)
        self.w3 = ColumnParallelLinear(cfg.d_model, f, cfg.bias, ctx) if self.swiglu else None
        self.w2 = RowParallelLinear(f, cfg.d_model, cfg.bias, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:  # gate | up as one GEMM, then one fused SwiGLU kernel on CUDA
            x = enter_tp_region(x, self.w1.group, self.w1.sequence_parallel)
            return self.w2(swiglu(fused_column_linear(x, [self.w1, self.w3])))
        return self.w2(gelu(self.w1(x), self.approx))
