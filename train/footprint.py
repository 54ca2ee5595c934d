"""What one GPU holds during a training step, tensor by tensor: the planner's memory model.

The model follows our own code, not a rule of thumb: for each block it counts the tensors that
forward leaves for backward (named below after the ops that make them), for each rank it replays
the pipeline schedule's actions (parallel.pipeline.rank_schedule) to find the moment of the peak,
and at that moment it adds the transient tensors of the loss (forward) or of the first backward op
(the "spikes"). train/simulate.py measures the same step on fake tensors; tests/test_simulate.py
checks that the two agree within 3% over a matrix of layouts.

Shapes, per micro-batch on one GPU: b micro-batch, s sequence, T = b s tokens, T_n = T / tp under
sequence parallelism (else T), D width, H_l = H / tp and K_l = K / tp heads, Dh head dim,
F_l = F / tp dense width, Fe expert width, E experts (E_l = E / ep local), k top-k, T_r = routed
tokens (T / tp with tp > 1: each tp rank routes its own share), N = T_r k routed rows sent, M rows
received
(ep > 1; the busiest ep rank under forced routing), V_l = padded vocabulary / tp.
Bytes: c the compute dtype (4 in float32), 4 for float32 statistics, 8 for int64 indices.

These are the tensors of the torch (CPU) path of our fused ops, which the simulation runs: the
Triton kernels keep less on CUDA (SwiGLU only its input, RoPE only its tables), as does the fused
RMSNorm there (its input and 1/rms), while CUDA autocast runs LayerNorm in float32: a GPU run
differs by these, mostly downward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Sequence

from moe.config import ModelConfig
from moe.router import forced_counts
from parallel.layout import zero1_ranks
from parallel.pipeline import Action, rank_schedule

_F32, _I64 = 4, 8


@dataclass(frozen=True)
class Sizes:
    """Per-GPU sizes of one micro-batch (see the module docstring for the symbols)."""

    b: int
    s: int
    tp: int
    sp: bool
    ep: int
    c: int          # bytes of the compute dtype
    r: int          # bytes of the residual stream (4: fp32, or bf16 with model.fp32_residual)
    rows: int       # sequences this data-parallel rank loads per step (the batch tensor)
    rms: bool       # RMSNorm (else LayerNorm)

    @property
    def stream_kept(self) -> bool:
        """Does a norm keep its input, the residual sum, itself? LayerNorm does (on the CPU path
        it runs in the stream's dtype), RMSNorm when the stream is float32; RMSNorm computes a
        bf16 stream in float32 from a copy (counted in norm_acts) and the sum is freed."""
        return self.r == _F32 or not self.rms

    @property
    def residual(self) -> int:
        """Bytes per width of a block's residual sum [T_n, D] left alive (see stream_kept)."""
        return self.T_n * self.r if self.stream_kept else 0

    @property
    def T(self) -> int:
        return self.b * self.s

    @property
    def T_n(self) -> int:
        return self.T // self.tp if self.sp else self.T

    @property
    def T_r(self) -> int:
        return self.T // self.tp


@dataclass(frozen=True)
class Param:
    """One parameter as a GPU holds it (from its parallel.layout record)."""

    n: int          # elements on this GPU
    expert: bool    # cut over the ep group, its state over edp
    tied: bool      # a replica of a tied embedding split over pipeline stages
    fp32: bool      # kept float32 in a bf16 model (its layer computes in float32)


@dataclass(frozen=True)
class ChunkFootprint:
    """One pipeline chunk (virtual stage) as the schedule replay sees it, in bytes."""

    acts: int        # what one micro-batch's forward leaves alive until its backward
    fwd_spike: int   # transient tensors at the end of a forward (the loss, on the last chunk)
    bwd_spike: int   # transient tensors early in a backward (beyond what backward frees)


# ---------------------------------------------------------------------------------------------
# Forward: what each piece keeps for backward
# ---------------------------------------------------------------------------------------------


def norm_acts(m: ModelConfig, z: Sizes) -> int:
    """RMSNorm (the torch path: x * rsqrt(mean x^2 + eps) in float32, then * w) keeps a float32
    copy of a bf16 input [T_n, D], x * rsqrt [T_n, D] float32 and rsqrt [T_n, 1]; LayerNorm keeps
    mean and rstd [T_n, 1] in the compute dtype. An input kept as is is counted where it is made
    (the residual sum), the output where it is read."""
    if not z.rms:
        return 2 * z.T_n * z.c
    copy = z.T_n * m.d_model * _F32 if not z.stream_kept else 0
    return copy + z.T_n * m.d_model * _F32 + z.T_n * _F32


def _tp_input(m: ModelConfig, z: Sizes) -> int:
    """The input column-parallel GEMMs keep: the all-gathered sequence under sequence parallelism,
    else the norm's output itself."""
    return (z.T if z.sp else z.T_n) * m.d_model * z.c


def attention_acts(m: ModelConfig, z: Sizes) -> int:
    """norm, GEMM input, q|k|v [T, (H_l + 2 K_l) Dh] (one fused GEMM, which keeps no weight copy),
    RoPE's rotated q and k (a copy each), SDPA's output [T, H_l Dh] and log-sum-exp [b, H_l, s]
    (float32), the output transposed back to [T, H_l Dh] (a copy when q was contiguous, i.e.
    after RoPE), and the residual sum [T_n, D]. With dropout the CPU runs SDPA's math path, which
    keeps float32 q, k and v (not q|k|v or RoPE's copies), the softmax, its dropout mask and the
    dropped weights [b, H_l, s, s] (a GPU's flash kernels keep none of these), and the residual
    dropout keeps its mask."""
    h, kv, dh = m.n_heads // z.tp, m.kv_heads // z.tp, m.dim_head
    qkv = (h + 2 * kv) * dh
    out = norm_acts(m, z) + _tp_input(m, z) + _qk_norm_acts(m, z)
    if m.dropout:  # SDPA's math path on the CPU: float32 q, k, v, then softmax, mask, dropped
        out += 3 * z.T * h * dh * _F32 + 3 * z.b * h * z.s * z.s * _F32 + z.T * h * dh * z.c
    else:
        out += z.T * qkv * z.c
        if m.positions == "rope":
            out += z.T * (h + kv) * dh * z.c + z.T * h * dh * z.c
        out += z.T * h * dh * z.c + z.b * h * z.s * _F32
    return out + _residual(m, z)


def _qk_norm_acts(m: ModelConfig, z: Sizes) -> int:
    """model.qk_norm. Per head (an RMSNorm over each head's Dh): a float32 copy of bf16 q and k,
    x * rsqrt in float32, and rsqrt [T, heads]; over the whole projection (ParallelRMSNorm): the
    float32 input and its normalised copy in the compute dtype, and rsqrt [T] each for q and k."""
    heads = (m.n_heads + m.kv_heads) // z.tp
    bf16 = z.c != _F32
    if m.qk_norm == "head":
        return heads * (z.T * m.dim_head * (_F32 + _F32 * bf16) + z.T * _F32)
    if m.qk_norm == "full":
        return heads * z.T * m.dim_head * (_F32 + z.c * bf16) + 2 * z.T * _F32
    return 0


def _sandwich_acts(m: ModelConfig, z: Sizes) -> int:
    """model.sandwich_norm: each sublayer's output goes through one more norm before its residual
    add; RMSNorm keeps that output in float32 (as is, or a copy of bf16) and x * rsqrt, LayerNorm
    keeps it and its statistics in the compute dtype. Two per block."""
    if not m.sandwich_norm:
        return 0
    if m.norm == "rmsnorm":
        return 2 * (z.T_n * m.d_model * 2 * _F32 + z.T_n * _F32)
    return 2 * (z.T_n * m.d_model * z.c + 2 * z.T_n * z.c)


def mlp_acts(m: ModelConfig, z: Sizes, width: int, residual: bool = True) -> int:
    """Dense MLP of `width` (split over tp). SwiGLU: gate|up [T, 2 F_l] (one fused GEMM), silu(gate)
    and the product [T, F_l] each; GELU: W1's output and GELU's [T, F_l] each. Then the residual
    sum [T_n, D] (not for a shared expert)."""
    f = width // z.tp
    if m.mlp == "swiglu":
        out = z.T * 2 * f * z.c + 2 * z.T * f * z.c
    else:
        out = 2 * z.T * f * z.c
    return out + (_residual(m, z) if residual else 0)


def _residual(m: ModelConfig, z: Sizes) -> int:
    """A block half's residual sum [T_n, D] when its norm keeps it, and its dropout's mask."""
    return z.residual * m.d_model + (z.T_n * m.d_model * z.c if m.dropout else 0)


def routed_rows(m: ModelConfig, z: Sizes) -> tuple[int, int]:
    """(N, M): rows this GPU sends to experts and rows its experts receive. Routing is forced
    (model.forced_routing_imbalance, 1 when unset): every rank routes T_r tokens the same way,
    so ep rank 0, which holds expert 0 (the busiest), receives ep x its share."""
    counts = forced_counts(z.T_r, m.n_experts, m.top_k, m.forced_routing_imbalance or 1.0)
    n_local = m.n_experts // z.ep
    return z.T_r * m.top_k, z.ep * sum(counts[:n_local])


def moe_acts(m: ModelConfig, z: Sizes) -> int:
    """norm, its output [T_n, D] (the router's input; a float32 copy of this rank's tokens
    [T_r, D] in a bf16 model), the router's logits and softmax [T_r, E],
    log-sum-exp, sum of the top-k and the top-k weights (float32), the choices [T_r, k] (int64),
    the permutation (three int64 [N] and the float32 weights [N]); the experts' rows, gate|up
    [rows, 2 Fe], silu and product [rows, Fe] each, where rows is N without expert parallelism or
    M (plus two int64 [M] orders) with it, and the outputs [N, D] unpermute reads; the shared
    expert; the residual sum."""
    d, e, k = m.d_model, m.n_experts, m.top_k
    n, rows = routed_rows(m, z)
    router_input = z.T_n * d * z.c if z.c == _F32 else z.T_r * d * _F32  # the norm's output, or
    out = norm_acts(m, z) + router_input                                    # its float32 copy
    out += 2 * z.T_r * e * _F32 + 2 * z.T_r * _F32 + z.T_r * k * (_F32 + _I64)
    out += n * (3 * _I64 + _F32)
    width = 2 * m.expert_ffn if m.mlp == "swiglu" else m.expert_ffn
    out += rows * (d + 2 * width) * z.c + n * d * z.c
    out += 2 * rows * _I64 if z.ep > 1 else 0
    if m.shared_expert_ffn_dim:  # its GEMM keeps the gathered sequence, or the bf16 norm output
        gemm_input = z.T * d * z.c                   # the gathered sequence, or
        if not z.sp:                                 # the bf16 norm output (float32: the router's)
            gemm_input = z.T_n * d * z.c if z.c != _F32 else 0
        out += gemm_input + mlp_acts(m, z, m.shared_expert_ffn_dim, False)
        if m.shared_expert_gate:  # y * sigmoid(x w_gate): keeps y [T_n, D] and the gate [T_n, 1]
            out += z.T_n * d * z.c + z.T_n * z.c
    return out + _residual(m, z)


def block_acts(m: ModelConfig, z: Sizes, layer: int) -> int:
    """Everything one block's forward keeps: attention, then the MoE or the dense MLP (norm,
    GEMM input, MLP)."""
    out = attention_acts(m, z) + _sandwich_acts(m, z)
    if m.is_moe_layer(layer):
        return out + moe_acts(m, z)
    return out + norm_acts(m, z) + _tp_input(m, z) + mlp_acts(m, z, m.ffn)


def selective_acts(m: ModelConfig, z: Sizes, layer: int) -> int:
    """training.recompute=selective keeps the outputs of the GEMMs and of attention (moe.model's
    policy) and the block's output: q|k|v, SDPA's output and log-sum-exp, the attention output
    projection [T, D], then the MLP's GEMM outputs, or the router's logits, the experts' two
    grouped GEMMs and the weighted combine [T_r, D]."""
    h, kv, dh, d = m.n_heads // z.tp, m.kv_heads // z.tp, m.dim_head, m.d_model
    out = z.T * (h + 2 * kv) * dh * z.c + z.T * h * dh * z.c + z.b * h * z.s * _F32 + z.T * d * z.c
    if m.is_moe_layer(layer):
        _, rows = routed_rows(m, z)
        width = 2 * m.expert_ffn if m.mlp == "swiglu" else m.expert_ffn
        out += z.T_r * m.n_experts * _F32 + rows * (width + d) * z.c + z.T_r * d * z.c
        if m.shared_expert_ffn_dim:
            out += _mlp_gemm_outputs(m, z, m.shared_expert_ffn_dim)
    else:
        out += _mlp_gemm_outputs(m, z, m.ffn)
    return out + z.T_n * d * z.r


def _mlp_gemm_outputs(m: ModelConfig, z: Sizes, width: int) -> int:
    f = width // z.tp
    return z.T * (2 * f if m.mlp == "swiglu" else f) * z.c + z.T * m.d_model * z.c


def kept_per_layer(m: ModelConfig, z: Sizes, layer: int, recompute: str | None) -> int:
    """What a block keeps per micro-batch: everything, only its output (full recompute: the
    next block's checkpointed input, Korthikanti's 2 s b h), or the selective set."""
    if recompute == "full":
        return z.T_n * m.d_model * z.r
    if recompute == "selective":
        return selective_acts(m, z, layer)
    return block_acts(m, z, layer)


# ---------------------------------------------------------------------------------------------
# The ends of a chunk: its input (the embedding on the first) and the head and loss on the last
# ---------------------------------------------------------------------------------------------


def input_acts(m: ModelConfig, z: Sizes, first: bool, recompute: str | None) -> int:
    """The chunk's input [T_n, D]: received from the previous stage (the executor holds it), or
    the embedding's output, kept by the first block (its checkpoint, or its norm when that
    computes in the stream's dtype); with tp > 1 the embedding also keeps the local ids [b, s]
    int64 and the out-of-shard mask, with learned positions the position ids."""
    kept = not first or recompute is not None or z.stream_kept
    out = z.T_n * m.d_model * z.r if kept else 0
    if first and z.tp > 1:
        out += z.T * (_I64 + 1)
    if first and m.positions == "learned":
        out += z.s * _I64
    if first and m.dropout:
        out += z.T_n * m.d_model * z.c  # the embedding dropout's mask
    return out


def head_acts(m: ModelConfig, z: Sizes) -> int:
    """Final norm and its output (or the gathered sequence), the logits [T, V_l] the loss keeps
    (after the padding mask, which keeps a bool [V_l]), and the loss's targets (int64),
    log-sum-exp (float32) and ignore mask (bool) per token."""
    v = m.padded_vocab_size // z.tp
    out = (norm_acts(m, z) if m.norm_position == "pre" else 0) + _tp_input(m, z)
    out += z.T * v * z.c + z.T * (_I64 + _F32 + 1)
    return out + (v if m.padded_vocab_size != m.vocab_size else 0)


def loss_fwd_spike(m: ModelConfig, z: Sizes) -> int:
    """The loss's forward temporaries at their peak: z - max and its exp, [T, V_l] float32 each,
    plus a float32 copy of bf16 logits and the last block's bf16 output [T_n, D], which the
    forward still holds (a float32 one is kept anyway, by the final norm)."""
    v = m.padded_vocab_size // z.tp
    bf16 = z.c != _F32
    return (2 + bf16) * z.T * v * _F32 + (z.T_n * m.d_model * z.r if not z.stream_kept else 0)


def loss_bwd_spike(m: ModelConfig, z: Sizes) -> int:
    """The loss's gradient [T, V_l] (float32), then its copy through the padding mask."""
    v = m.padded_vocab_size // z.tp
    masked = z.T * v * z.c if m.padded_vocab_size != m.vocab_size else 0
    return z.T * v * _F32 + masked


def block_bwd_spike(m: ModelConfig, z: Sizes, layer: int) -> int:
    """Early in a block's backward, on top of everything forward kept: the incoming gradient
    [T_n, D], then the MLP's first operations (`_mlp_bwd_spike`). With dropout, the attention
    math path's backward later holds the gradient of the attention weights [b, H_l, s, s] in the
    compute dtype and in float32, once the MLP's own tensors are freed."""
    incoming = z.T_n * m.d_model * z.r
    spike = incoming + _mlp_bwd_spike(m, z, layer)
    if m.dropout:
        mlp_kept = block_acts(m, z, layer) - attention_acts(m, z)
        attention = incoming + z.b * (m.n_heads // z.tp) * z.s * z.s * (z.c + _F32)
        spike = max(spike, attention - mlp_kept)
    return spike


def _mlp_bwd_spike(m: ModelConfig, z: Sizes, layer: int) -> int:
    """The combine's backward (three [N, D] float32: the gathered gradient, the rows' gradient or
    a float32 copy of bf16 rows, the product for the gate weights; and the rows' gradient cast
    back to bf16), or the dense MLP's: the gradient of the down projection's input [T, F_l], then
    SwiGLU's of silu and up (GELU's of its input) while that input, silu * up (GELU's output), is
    freed."""
    if m.is_moe_layer(layer):
        n, _ = routed_rows(m, z)
        cast = n * m.d_model * z.c if z.c != _F32 else 0  # the rows' gradient back in bf16
        return 3 * n * m.d_model * _F32 + cast
    return (2 if m.mlp == "swiglu" else 1) * z.T * (m.ffn // z.tp) * z.c


# ---------------------------------------------------------------------------------------------
# A rank: its chunks, the schedule replay, and the persistent state
# ---------------------------------------------------------------------------------------------


def chunk_footprint(m: ModelConfig, z: Sizes, layers: list[int], first: bool, last: bool,
                    recompute: str | None) -> ChunkFootprint:
    """Forward keeps the input, every block's share and (last chunk) the head's tensors. Backward
    runs the head first, then the blocks from the last: each piece's spike counts against what
    the pieces before it have already freed; a recomputed block rebuilds what it did not keep."""
    kept = [kept_per_layer(m, z, i, recompute) for i in layers]
    acts = input_acts(m, z, first, recompute) + sum(kept) + (head_acts(m, z) if last else 0)
    if not last and recompute is None and not z.stream_kept:
        acts += z.T_n * m.d_model * z.r  # the output the executor holds (its sum is not kept)
    spike = loss_bwd_spike(m, z) if last else 0
    freed = head_acts(m, z) if last else 0
    output = z.T_n * m.d_model * z.c  # a block's output, freed by the backward of its reader
    for j, (layer, k) in enumerate(zip(reversed(layers), reversed(kept))):
        read_after = last or j > 0   # a non-last chunk's output stays with the executor
        rebuilt = block_acts(m, z, layer) - k
        spike = max(spike, block_bwd_spike(m, z, layer) + rebuilt - freed - output * read_after)
        freed += k
    return ChunkFootprint(acts, loss_fwd_spike(m, z) if last else 0, spike)


def replay(actions: Sequence[Action], chunks: list[ChunkFootprint]) -> tuple[int, int]:
    """(activations, transient) bytes at the peak of this rank's schedule: a forward adds its
    chunk's activations (a candidate with the forward spike), a backward is a candidate with its
    spike before it frees them."""
    live, best = 0, (0, 0)
    for a in actions:
        c = chunks[a.chunk]
        if a.kind == "F":
            live += c.acts
            best = max(best, (live, c.fwd_spike), key=sum)
        else:
            best = max(best, (live, c.bwd_spike), key=sum)
            live -= c.acts
    return best


def rank_params(m: ModelConfig, specs: list[tuple[list[int], bool, bool]], tp: int,
                ep: int) -> list[list[Param]]:
    """Per chunk, in the trainer's order (the blocks, then the embedding, then the final norm and
    head), each parameter as this GPU holds it."""
    out, key = [], dataclasses.astuple(m)
    for layers, pre, post in specs:
        sizes = [p for i in layers for p in _piece_params(key, tp, ep, "block", m.is_moe_layer(i))]
        if pre:
            sizes += _piece_params(key, tp, ep, "embedding", post)
        if post:
            sizes += _piece_params(key, tp, ep, "head", pre)
        out.append(sizes)
    return out


@functools.lru_cache(maxsize=256)
def _piece_params(key: tuple, tp: int, ep: int, piece: str, flag: bool) -> tuple[Param, ...]:
    """The parameters of one block (flag: MoE), the embedding (flag: the chunk also holds the
    head) or the head (flag: the chunk also holds the embedding), from a chunk built on the meta
    device with tp = ep = 1 and cut as their layout records say."""
    from moe.model import build_model

    m = ModelConfig(*key)
    if piece == "block":
        layer = next(i for i in range(m.n_layers) if m.is_moe_layer(i) == flag)
        chunk = build_model(m, device="meta", layer_ids=[layer], pre=False, post=False)
    else:
        chunk = build_model(m, device="meta", layer_ids=[], pre=piece == "embedding" or flag,
                            post=piece == "head" or flag)
    sizes = []
    for name, rec in chunk.layouts().items():
        if piece != "block" and name.startswith(("tok_emb", "pos_emb")) != (piece == "embedding"):
            continue
        n = math.prod(rec.local_shape) // (tp if rec.tp_dim is not None else 1)
        tied = rec.tied or rec.tied_to is not None
        sizes.append(Param(n // ep if rec.expert else n, rec.expert, tied, rec.keep_fp32))
    return tuple(sizes)


def owned(params: list[Param], zero1: bool, dp: int, edp: int) -> list[Param]:
    """The parameters whose main weights and AdamW state this GPU keeps: all, or under ZeRO-1
    those data-parallel rank 0 owns (parallel.layout.zero1_ranks: dense over dp, experts over
    edp; the replicas of a tied embedding stay with every rank)."""
    if not zero1 or dp == 1:
        return list(params)
    out = [p for p in params if p.tied]
    for expert, n in ((False, dp), (True, edp)):
        run = [p for p in params if p.expert == expert and not p.tied]
        out += [p for p, r in zip(run, zero1_ranks([p.n for p in run], n)) if r == 0]
    return out


def state_bytes(params: list[Param], mine: list[Param], bf16: bool) -> dict[str, int]:
    """Parameters (bf16 in a bf16 model unless their layer computes in float32), the float32
    gradient-accumulation buffers (every parameter), and the optimizer's share: float32 main
    weights (bf16 model only), AdamW's two float32 moments and a float32 step count per tensor."""
    def model_bytes(p: Param) -> int:
        return 2 if bf16 and not p.fp32 else 4

    optimizer = sum(8 * p.n + 4 + (4 * p.n if model_bytes(p) == 2 else 0) for p in mine)
    return {"parameters": sum(model_bytes(p) * p.n for p in params),
            "gradients": 4 * sum(p.n for p in params), "optimizer": optimizer}


def rank_memory(m: ModelConfig, layout, specs: list[tuple[list[int], bool, bool]], pp_rank: int,
                recompute: str | None, zero1: bool, precision: str) -> dict[str, int]:
    """Bytes by category (train.memory.CATEGORIES) at this rank's peak; `layout` is the
    planner's Layout (tp, pp, vpp, dp, ep, edp, schedule, n_micro, micro_batch, seq_len,
    sequence_parallel). The state (parameters, gradient buffers, optimizer) lives all step; the
    peak of the forward and backward passes adds the activations and transients the schedule
    replay finds, plus the batch of token ids. `specs`: the rank's chunks
    (parallel.partition.chunk_specs)."""
    c = 4 if precision == "fp32" else 2
    z = Sizes(layout.micro_batch, layout.seq_len, layout.tp, layout.sequence_parallel, layout.ep, c,
              4 if m.fp32_residual else c, layout.n_micro * layout.micro_batch, m.norm == "rmsnorm")
    params = [p for chunk in rank_params(m, specs, layout.tp, layout.ep) for p in chunk]
    state = state_bytes(params, owned(params, zero1, layout.dp, layout.edp), precision == "bf16")
    foot = [chunk_footprint(m, z, layers, first, last, recompute) for layers, first, last in specs]
    kind = "1f1b" if layout.pp == 1 else layout.schedule
    acts, spike = replay(rank_schedule(kind, layout.pp, layout.vpp, layout.n_micro, pp_rank), foot)
    batch = z.rows * (layout.seq_len + 1) * _I64
    return {**state, "activations": acts + batch, "temporaries": spike}
