"""The Decoder: embedding -> N blocks (attention + dense or MoE MLP) -> final norm -> LM head.

One definition serves every preset and every parallel layout. Blocks live in a ModuleDict keyed by
their global index, so a pipeline stage builds only its own blocks (`layer_ids`, `pre`, `post`) and
parameter names ("layers.7.attn.wq.weight") are the same in every layout. Weights are initialised
layout-independently: every parameter's full tensor is drawn from a generator seeded by
(seed, name) and each rank keeps its tensor/expert-parallel shard, so all layouts start from the
single-process weights.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._guards import detect_fake_mode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from parallel.context import ParallelContext, check_divisible
from parallel.fp8 import Float8Recipe, check_float8_shape
from parallel.kernels import autocast_dtype
from parallel.layout import ParamLayout, param_layouts
from parallel.rng import DropoutKey, ParallelRNG
from parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                             copy_to_tp, vocab_parallel_cross_entropy)

from .config import ModelConfig
from .layers import Attention, DenseMLP, Dropout, document_layout, make_norm, rope_cos_sin, sinusoidal_table
from .moe_layer import MoELayer, MoEStats


@dataclass
class DecoderOutput:
    logits: torch.Tensor | None          # [B, S, V] (this rank's vocab shard [B, S, V/tp] under tp); None on non-last stages
    loss: torch.Tensor | None = None     # mean LM cross-entropy over non-ignored targets (no aux terms)
    hidden: torch.Tensor | None = None   # output of this stage's last block [B, S(/tp), D]
    aux_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # sum over MoE layers, detached
    z_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))    # sum over MoE layers, detached
    moe: dict[int, MoEStats] = field(default_factory=dict)                  # layer index -> routing statistics


# Activation checkpointing: "full" keeps only each block's input and recomputes the whole block in
# backward; "selective" also keeps the outputs of the GEMMs and of attention (the expensive ops)
# and recomputes only the cheap memory-bound ones (norms, activations, rotary, routing, permutation).
RECOMPUTE = ("full", "selective")
_SAVED_OPS = {getattr(torch.ops.aten, name).default for name in
              ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_flash_attention_for_cpu") if hasattr(torch.ops.aten, name)}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_recompute_context():
    """context_fn for torch.utils.checkpoint: save GEMM and attention outputs, recompute the rest."""
    return create_selective_checkpoint_contexts(_selective_policy)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)).
    Post-norm (GPT-1): norm(x + attn(x)), then norm(x + mlp(x)).
    Sandwich (GLM-4, pre-norm): x + norm(attn(norm(x))), then x + norm(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, idx: int):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.attn_norm, self.mlp_norm = make_norm(cfg), make_norm(cfg)
        if cfg.sandwich_norm:
            self.attn_out_norm, self.mlp_out_norm = make_norm(cfg), make_norm(cfg)
        else:
            self.attn_out_norm = self.mlp_out_norm = nn.Identity()
        self.attn = Attention(cfg, ctx, idx)
        self.mlp = MoELayer(cfg, ctx) if cfg.is_moe_layer(idx) else DenseMLP(cfg, ctx)
        self.drop = Dropout(cfg.dropout, sharded=ctx.sequence_parallel and ctx.tp > 1)
        self.site = f"layers.{idx}"

    def forward(self, x, rope, aux_grad_scale: float, global_counts: torch.Tensor | None = None,
                key: DropoutKey | None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEStats | None]:
        """`key`: this forward's dropout seeds (from Decoder.forward; None when not training);
        `mask`: packed documents' attention mask (moe.layers.document_layout), None = causal."""
        a_site, m_site = f"{self.site}.attn_out", f"{self.site}.mlp_out"
        if self.pre:
            a = self.attn_out_norm(self.attn(self.attn_norm(x), rope, key, mask))
            x = x + self.drop(a, key, a_site)
            m, stats = self._mlp(self.mlp_norm(x), aux_grad_scale, global_counts)
            return x + self.drop(self.mlp_out_norm(m), key, m_site), stats
        dtype = x.dtype  # LayerNorm runs in float32 under autocast: keep the stream's dtype
        x = self.attn_norm(x + self.drop(self.attn(x, rope, key, mask), key, a_site)).to(dtype)
        m, stats = self._mlp(x, aux_grad_scale, global_counts)
        return self.mlp_norm(x + self.drop(m, key, m_site)).to(dtype), stats

    def _mlp(self, x, aux_grad_scale, global_counts=None):
        if isinstance(self.mlp, MoELayer):
            return self.mlp(x, aux_grad_scale, global_counts)
        return self.mlp(x), None


def _is_placeholder(model: nn.Module) -> bool:
    """True when the parameters hold no data yet (meta device, or fake tensors of a simulation)."""
    from torch._subclasses.fake_tensor import is_fake

    return any(p.is_meta or is_fake(p) for p in model.parameters())


def validate_layout(cfg: ModelConfig, ctx: ParallelContext) -> None:
    """Check the model's sizes against the parallel layout before building anything."""
    check_divisible("model.n_heads", cfg.n_heads, "parallel.tp", ctx.tp)
    check_divisible("model.n_kv_heads", cfg.kv_heads, "parallel.tp", ctx.tp)
    check_divisible("model.ffn_dim", cfg.ffn, "parallel.tp", ctx.tp)
    if cfg.shared_expert_ffn_dim:
        check_divisible("model.shared_expert_ffn_dim", cfg.shared_expert_ffn_dim, "parallel.tp", ctx.tp)
    if cfg.padded_vocab_size % ctx.tp:
        raise ValueError(f"padded vocabulary ({cfg.padded_vocab_size}) must be divisible by parallel.tp ({ctx.tp}): "
                         f"set model.vocab_pad_multiple to a multiple of {ctx.tp}")
    if cfg.n_experts:
        check_divisible("model.n_experts", cfg.n_experts, "parallel.ep", ctx.ep)
    elif ctx.ep > 1:
        raise ValueError(f"parallel.ep ({ctx.ep}) > 1 needs an MoE model (model.n_experts > 0)")


class Decoder(nn.Module):
    """Built on a real device, a Decoder initialises itself (init_weights(seed), the same weights
    as build_model(cfg, ctx, seed)); built on the meta device it is left for build_empty /
    build_model to materialise. `rng` draws the dropout masks (parallel/rng.py); chunks of one
    rank share one, and by default it is seeded with `seed`."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext | None = None, layer_ids: Iterable[int] | None = None,
                 pre: bool = True, post: bool = True, *, seed: int = 0,
                 rng: ParallelRNG | None = None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        validate_layout(cfg, ctx)
        self.cfg, self.ctx, self.pre, self.post = cfg, ctx, pre, post
        self.rng = rng if rng is not None else ParallelRNG(seed, ctx)
        self.activation_checkpointing = False
        self.recompute = "full"  # with activation_checkpointing: "full" or "selective" (see RECOMPUTE)
        ids = range(cfg.n_layers) if layer_ids is None else list(layer_ids)
        self.rng_chunk = zlib.crc32(repr((pre, post, list(ids))).encode())  # its dropout key stream
        self.layers = nn.ModuleDict({str(i): Block(cfg, ctx, i) for i in ids})
        if pre:
            self.tok_emb = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.d_model, ctx)
            if cfg.positions == "learned":
                self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
            elif cfg.positions == "sinusoidal":
                self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
            self.emb_drop = Dropout(cfg.dropout, sharded=ctx.sequence_parallel and ctx.tp > 1)
        if post:
            self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
            if not (cfg.tie_embeddings and pre):
                self.head = ColumnParallelLinear(cfg.d_model, cfg.padded_vocab_size, False, ctx)
        if not _is_placeholder(self):
            self.init_weights(seed)

    def tied_params(self) -> dict[str, str | None]:
        """A tied embedding split over pipeline stages (parallel/layout.py): the last stage's head
        mirrors the first stage's embedding. On one stage they are one tensor: nothing to say."""
        if not self.cfg.tie_embeddings or (self.pre and self.post):
            return {}
        return {"tok_emb.weight": None} if self.pre else {"head.weight": "tok_emb.weight"}

    def layouts(self) -> dict[str, ParamLayout]:
        """name -> layout record of every parameter, for this model's ParallelContext."""
        return param_layouts(self, self.ctx)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, aux_grad_scale: float = 1.0,
                global_loads: dict[int, torch.Tensor] | None = None, routing_only: bool = False,
                doc_ids: torch.Tensor | None = None) -> DecoderOutput:
        """x: token ids [B, S] on the first stage, else the previous stage's hidden [B, S(/tp), D].
        `aux_grad_scale`: the factor applied to this micro-batch's LM loss (e.g. 1/n_micro_batches);
        the MoE auxiliary losses get the same factor in backward. `global_loads`: layer -> [E]
        routed slots over the whole step (model.aux_loss_scope=global_batch). `routing_only`: only
        what the routing statistics need - the last stage stops after its last MoE block, no head,
        no loss. `doc_ids` [B, S] (full sequence, every stage): several documents packed per row
        attend only within themselves, with positions restarting at each
        (moe.layers.document_layout); None = one document per row."""
        mask, positions = document_layout(doc_ids) if doc_ids is not None else (None, None)
        dropout = self.training and self.cfg.dropout > 0
        drop_key = self.rng.next_key(self.rng_chunk) if dropout else None
        h = self.embed(x, drop_key, positions) if self.pre else x
        if self.pre:  # the residual stream: float32 (fp32 training, model.fp32_residual) or bf16
            compute_dtype = autocast_dtype(h.device.type)
            h = h.float() if self.cfg.fp32_residual or compute_dtype is None else h.to(compute_dtype)
        rope = self._rope(h, positions) if self.cfg.positions == "rope" else None
        out = DecoderOutput(logits=None)
        for key, block in self._blocks(routing_only):
            counts = (global_loads or {}).get(int(key))
            if self.activation_checkpointing and self.training:
                extra = {"context_fn": selective_recompute_context} if self.recompute == "selective" else {}
                h, stats = checkpoint(block, h, rope, aux_grad_scale, counts, drop_key, mask,
                                      use_reentrant=False, **extra)
            else:
                h, stats = block(h, rope, aux_grad_scale, counts, drop_key, mask)
            if stats is not None:
                out.moe[int(key)] = stats
        if out.moe:
            out.aux_loss = torch.stack([s.aux_loss for s in out.moe.values()]).sum()
            out.z_loss = torch.stack([s.z_loss for s in out.moe.values()]).sum()
        out.hidden = h
        if not self.post or routing_only:
            return out
        out.logits = self.logits(h)
        if targets is not None:
            out.loss = self.loss(out.logits, targets)
        if self.ctx.tp == 1 and self.cfg.padded_vocab_size != self.cfg.vocab_size:
            out.logits = out.logits[..., : self.cfg.vocab_size]
        return out

    def _blocks(self, routing_only: bool) -> list[tuple[str, Block]]:
        """The blocks to run: all of them, or for routing statistics on the last stage only those
        up to its last MoE block (what follows changes no routing decision)."""
        blocks = list(self.layers.items())
        if routing_only and self.post:
            moe = [i for i, (key, _) in enumerate(blocks) if self.cfg.is_moe_layer(int(key))]
            blocks = blocks[:moe[-1] + 1] if moe else []
        return blocks

    def embed(self, tokens: torch.Tensor, key: DropoutKey | None = None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token (+ learned or sinusoidal position) embeddings; positions [B, S] for packed rows."""
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        h = self.tok_emb(tokens)  # [B, S(/tp under sequence parallelism), D]
        if self.cfg.positions != "rope":
            start = self.ctx.tp_rank * h.shape[1] if self.ctx.sequence_parallel and self.ctx.tp > 1 else 0
            pos = torch.arange(start, start + h.shape[1], device=h.device)
            if positions is not None:  # [B, S] -> this rank's sequence shard [B, S(/tp)]
                pos = positions[:, start:start + h.shape[1]]
            h = h + (self.pos_emb(pos) if self.cfg.positions == "learned" else self.pos_table[pos].to(h.dtype))
        return self.emb_drop(h, key, "embedding")

    def _rope(self, h: torch.Tensor, positions: torch.Tensor | None = None):
        """cos/sin tables [S, r/2], or [B, S, r/2] looked up at `positions` [B, S] (packed rows)."""
        seq = h.shape[1] * (self.ctx.tp if self.ctx.sequence_parallel and self.ctx.tp > 1 else 1)
        cached = getattr(self, "_rope_cache", None)
        if cached is None or cached[0].shape[0] < seq or cached[0].device != h.device:
            self._rope_cache = rope_cos_sin(self.cfg, max(seq, 1), h.device)
        if positions is not None:
            return self._rope_cache[0][positions], self._rope_cache[1][positions]
        return self._rope_cache

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the logits; padded vocabulary columns are -inf."""
        h = self.norm(h)
        if hasattr(self, "head"):
            logits = self.head(h)
        else:  # tied: the embedding matrix [V/tp, D] is the head's column shard
            from parallel.tensor import gather_from_sp

            sp = self.ctx.sequence_parallel and self.ctx.tp > 1
            h = gather_from_sp(h, self.ctx.tp_group) if sp else copy_to_tp(h, self.ctx.tp_group)
            logits = F.linear(h, self.tok_emb.weight)
        return self._mask_padding(logits)

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.padded_vocab_size == self.cfg.vocab_size:
            return logits
        v_local = logits.shape[-1]
        cols = torch.arange(v_local, device=logits.device) + self.ctx.tp_rank * v_local
        return logits.masked_fill(cols >= self.cfg.vocab_size, float("-inf"))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy over non-ignored targets, vocab-parallel (no rank holds full-vocab logits)."""
        per_token = self.token_losses(logits, targets, ignore_index)
        n = (targets != ignore_index).sum().clamp(min=1)
        return per_token.sum() / n

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor,
                     ignore_index: int = -100) -> torch.Tensor:
        """Per-token cross-entropy -log p(target) [B, S] in float32 (0 where ignored), computed
        vocab-parallel."""
        group = self.ctx.tp_group if self.ctx.tp > 1 else None
        return vocab_parallel_cross_entropy(logits, targets, group, ignore_index=ignore_index)

    @torch.no_grad()
    def add_head(self, name: str, head: nn.Module, seed: int) -> None:
        """Attach a task head (e.g. a classifier on the last stage) as a submodule, so the gradient
        reducer, clipping, ZeRO-1 and checkpoints treat it like every other weight, initialised the
        layout-independent way (full tensors from (seed, "name.param") generators). Its parameters
        are replicated over tp (parallel.layout's default split): without sequence parallelism a
        head must compute alike on every tp rank, with it each rank's gradient is a partial sum."""
        self.add_module(name, head)
        for pname, p in head.named_parameters():
            p.copy_(self._full_init(f"{name}.{pname}", tuple(p.shape), seed))

    # ------------------------------------------------------------ weights
    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the buffers computed from the config (not saved in checkpoints)."""
        if hasattr(self, "pos_table"):
            self.pos_table.copy_(sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Layout-independent init: each parameter's full tensor from a (seed, name)-seeded generator,
        then this rank's shard. Normal(0, init_std) for matrices (output projections scaled by
        1/sqrt(2 n_layers), GPT-2), ones for norm weights, zeros for biases; the routers' expert
        biases (state, not weights) start at zero."""
        for name, b in self.named_buffers():
            if name.endswith("router.expert_bias"):
                b.zero_()
        layouts = self.layouts()
        for name, p in self.named_parameters():
            rec = layouts[name]  # a tied replica is drawn under the name of the tensor it mirrors
            p.copy_(rec.shard(self._full_init(rec.tied_to or rec.name, rec.global_shape, seed), self.ctx))

    def _full_init(self, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        if name.endswith("bias"):
            return torch.zeros(shape)
        if len(shape) == 1:  # norm weights
            return torch.ones(shape)
        gen = init_generator(seed, name)
        std = self.cfg.init_std
        if name.endswith(("wo.weight", "w2.weight", "w_out")):
            std = std / (2 * self.cfg.n_layers) ** 0.5
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_generator(seed: int, name: str) -> torch.Generator:
    """The generator a parameter's full tensor is drawn from: seeded by (seed, global name), so the
    draw is the same in every layout."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def param_counts(model: Decoder) -> tuple[int, int]:
    """(total, active) parameters on this rank; active counts top_k of n_experts expert weights."""
    cfg = model.cfg
    total = expert = 0
    layouts = model.layouts()
    for name, p in model.named_parameters():
        total += p.numel()
        if layouts[name].expert:
            expert += p.numel()
    active = total - expert + (expert * cfg.top_k // cfg.n_experts if cfg.n_experts else 0)
    return total, active


def matmul_params(model: Decoder) -> int:
    """Active parameters that are matmul operands on this rank: the N of the 6 N FLOPs per token
    (train.metrics.flops_per_token). Each such weight does 2 FLOPs per token in forward and 4 in
    backward (input and weight gradients). Counted: every weight of two or more dims, experts at
    top_k / n_experts (each token runs k of them), the router gate and the LM head. Not counted:
    lookup tables (the input embedding, learned positions: a gather, no arithmetic) and vectors
    (norm weights, biases: elementwise). A tied embedding is multiplied as the LM head, so it
    counts once, where this model uses it as the head."""
    lookups = {f"{name}.weight" for name, m in model.named_modules()
               if isinstance(m, (VocabParallelEmbedding, nn.Embedding))}
    if model.post and not hasattr(model, "head"):  # tied: tok_emb.weight is this model's head
        lookups.discard("tok_emb.weight")
    layouts, dense, expert = model.layouts(), 0, 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in lookups:
            continue
        if layouts[name].expert:
            expert += p.numel()
        else:
            dense += p.numel()
    cfg = model.cfg
    return dense + (expert * cfg.top_k // cfg.n_experts if cfg.n_experts else 0)


def enable_float8(model: Decoder, recipe: Float8Recipe) -> list[str]:
    """Run the blocks' tensor-parallel linears (attention q/k/v/o, dense and shared-expert MLPs)
    with float8 GEMMs; the LM head, the router (float32) and the experts (grouped GEMM) keep their
    precision. Real float8 GEMMs need every local weight's dims to be multiples of 16: checked here,
    before any step. Returns the names of the float8 layers."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name != "head":
            if not recipe.emulate:
                check_float8_shape(name, module.weight)
            module.fp8 = recipe
            names.append(name)
    return names


def build_empty(cfg: ModelConfig, ctx: ParallelContext | None = None, device="cpu", **stage) -> Decoder:
    """A Decoder with uninitialised weights on `device`, built on the meta device so no time goes
    into random init of weights about to be overwritten."""
    if detect_fake_mode() is not None:  # FakeTensorMode (the planner's simulation) allocates
        with torch.device(device):       # nothing, and to_empty cannot swap fake parameters
            return Decoder(cfg, ctx, **stage)
    with torch.device("meta"):
        model = Decoder(cfg, ctx, **stage)
    model.to_empty(device=device)
    model.init_buffers()  # to_empty left the computed (non-persistent) buffers uninitialised
    return model


@torch.no_grad()
def load_full_state_dict(model: Decoder, full: dict[str, torch.Tensor]) -> None:
    """Copy a whole-model (single-process) state dict into this rank's shards and stage: each
    tensor is cut as its layout record says, so any layout can start from one checkpoint.
    Persistent buffers (the routers' expert biases) are state too: replicated, copied whole."""
    layouts = model.layouts()
    for name, t in model.state_dict(keep_vars=True).items():
        rec = layouts.get(name)  # None for a buffer
        key = name if rec is None else (rec.name if rec.name in full else rec.tied_to)
        if key not in full:
            raise ValueError(f"checkpoint has no tensor for {name}: it does not match model {model.cfg}")
        want = tuple(t.shape) if rec is None else rec.global_shape
        if tuple(full[key].shape) != want:
            raise ValueError(f"{name}: checkpoint tensor has shape {tuple(full[key].shape)} but the model "
                             f"expects {want}: the checkpoint's model config differs from this run's")
        t.copy_(full[key] if rec is None else rec.shard(full[key], model.ctx))


def build_model(cfg: ModelConfig, ctx: ParallelContext | None = None, seed: int = 0, device=None,
                **stage) -> Decoder:
    """Build on `device` (use "meta" to count parameters of any size for free) and initialise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        with device:
            return Decoder(cfg, ctx, seed=seed, **stage)
    model = build_empty(cfg, ctx, device, seed=seed, **stage)  # no throw-away init in the layers
    model.init_weights(seed)
    return model
