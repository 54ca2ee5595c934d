"""The MoE MLP: router -> permute -> (expert-parallel dispatch) -> experts -> combine -> unpermute.

Shapes: T tokens on this rank, k experts per token, D width, E experts (E_l local under EP).
Auxiliary losses are not added to the LM loss by the caller and never stored in globals: they are
attached to this layer's output with AttachAuxLoss, whose backward injects d(aux)/d(router) scaled
by `aux_grad_scale` (the factor the trainer applies to the LM loss of this micro-batch). That makes
them correct under every pipeline schedule; their detached values come back in MoEStats for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from parallel.context import ParallelContext
from parallel.kernels import autocast_dtype
from parallel.tensor import gather_from_tp, reduce_from_tp, scatter_to_tp

from .config import ModelConfig
from .experts import Experts
from .kernels import combine_rows, gather_rows
from .layers import DenseMLP
from .router import RouterOptions, TopKRouter, expert_counts


@dataclass
class MoEStats:
    aux_loss: torch.Tensor           # scalar, detached, coefficient applied
    z_loss: torch.Tensor             # scalar, detached, coefficient applied
    tokens_per_expert: torch.Tensor  # [E] routed slots per expert over the micro-batch (before dropping)
    dropped_fraction: torch.Tensor   # scalar: share of routed slots dropped by the capacity limit


class AttachAuxLoss(torch.autograd.Function):
    """Forward: returns the activations unchanged. Backward: passes their gradient through and
    gives `loss` the gradient `scale`, i.e. behaves as if `scale * loss` were added to the objective."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


@dataclass(frozen=True)
class Permutation:
    """What unpermute needs: for each kept slot (sorted by expert) its token row and gate weight,
    and the inverse map from each (token, choice) slot to its sorted row."""
    token_idx: torch.Tensor   # [N] token row of each kept slot, expert-major order
    weights: torch.Tensor     # [N] gate weight of each kept slot
    counts: torch.Tensor      # [E] kept slots per expert
    n_tokens: int
    slot_row: torch.Tensor    # [T, k] sorted row of slot (t, j), or N when the slot was dropped


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float | None) -> int | None:
    """Slots per expert: ceil(factor * T * k / E); None means dropless."""
    return None if factor is None else math.ceil(factor * n_tokens * top_k / n_experts)


def _priority_sort(experts: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """Order of the T*k slots (indices into experts.flatten()): expert-major, then priority - all
    first choices by token position, then all second choices (GShard/Switch)."""
    T, k = experts.shape
    pos = torch.arange(T, device=experts.device) if pos is None else pos
    priority = torch.arange(k, device=experts.device)[None, :] * T + pos[:, None]  # [T, k]
    return torch.argsort((experts * (T * k) + priority).flatten())


def capacity_keep(experts: torch.Tensor, n_experts: int, capacity: int,
                  pos: torch.Tensor | None = None) -> torch.Tensor:
    """[T, k] bool: the slot fits within its expert's first `capacity` slots in priority order.
    `pos` [T]: each token's position in the micro-batch (default: row order), which sets priority."""
    order = _priority_sort(experts, pos)
    sorted_experts = experts.flatten()[order]
    counts = expert_counts(experts, n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
    keep = torch.empty_like(order, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(experts)


def permute(experts: torch.Tensor, weights: torch.Tensor, n_experts: int, capacity: int | None = None,
            keep: torch.Tensor | None = None) -> Permutation:
    """Sort the T*k routed slots by expert. With a capacity (or an explicit `keep` mask from
    capacity_keep), each expert keeps its first `capacity` slots in priority order - all first
    choices (in token order) before all second choices, as in GShard/Switch - and the rest are
    dropped (their tokens pass through on the residual only)."""
    T, k = experts.shape
    if capacity is not None and keep is None:
        keep = capacity_keep(experts, n_experts, capacity)
    order = _priority_sort(experts, None)
    if keep is not None:
        order = order[keep.flatten()[order]]
    counts = expert_counts(experts.flatten()[order], n_experts)
    n = order.numel()
    slot_row = torch.full((T * k,), n, dtype=torch.long, device=experts.device)
    slot_row.scatter_(0, order, torch.arange(n, device=experts.device))
    return Permutation(order // k, weights.flatten()[order], counts, T, slot_row.view(T, k))


def permute_tokens(tokens: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """The rows the experts see: tokens[perm.token_idx] ([N, D]), one per kept slot, expert-major.
    Backward sums each token's slot gradients by gathering (deterministic, no atomic adds)."""
    return gather_rows(tokens, perm.token_idx, perm.slot_row)


def unpermute(y: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """out[t] = sum over kept slots s of token t: weight_s * y_s (accumulated in float32, returned
    in y's dtype). Dropped slots contribute zero."""
    return combine_rows(y, perm.weights, perm.token_idx, perm.slot_row)


class LocalDispatcher:
    """Expert parallelism of size 1: every expert is local, nothing to send."""

    n_local_experts: int

    def __init__(self, n_experts: int):
        self.n_local_experts = n_experts

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor, host_counts=None):
        return x, counts, None

    def combine(self, y: torch.Tensor, meta) -> torch.Tensor:
        return y


def make_dispatcher(cfg: ModelConfig, ctx: ParallelContext):
    if ctx.ep == 1:
        return LocalDispatcher(cfg.n_experts)
    from parallel.expert import AllToAllDispatcher

    return AllToAllDispatcher(cfg.n_experts, ctx.ep_group, ctx.ep)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        self.router = TopKRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.aux_loss_coef, cfg.z_loss_coef,
                                 cfg.forced_routing_imbalance, RouterOptions.from_config(cfg))
        self.dispatcher = make_dispatcher(cfg, ctx)
        self.experts = Experts(self.dispatcher.n_local_experts, cfg.d_model, cfg.expert_ffn, cfg.mlp == "swiglu",
                               cfg.gelu_approx, cfg.expert_backend)
        self.shared = DenseMLP(cfg, ctx, cfg.shared_expert_ffn_dim) if cfg.shared_expert_ffn_dim else None
        # Qwen2-MoE's gate [1, D] sees the same tokens as the shared expert (all of them on every tp
        # rank, or the sequence shard under sequence parallelism, where its layout record makes it a
        # tp partial sum like every tp-replicated weight): unlike the router, no token shard.
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor, aux_grad_scale: float = 1.0,
                global_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x [B, S(/tp), D] -> (y like x, stats). global_counts [E]: this layer's routed slots per
        expert over the whole step (needed by model.aux_loss_scope=global_batch in training)."""
        # 1. flatten tokens; with tp > 1 (no sequence parallelism) each tp rank takes 1/tp of them,
        #    so no expert work is duplicated across the tp group
        # 2. route (float32) and compute aux/z losses over the whole micro-batch
        # 3. permute slots expert-major, dropping over-capacity slots
        # 4. dispatch to the ranks owning the experts (identity without EP), compute, combine
        # 5. unpermute (weighted sum per token), restore the token layout, attach the aux losses
        shape = x.shape
        tp_group = self.ctx.tp_group if self.ctx.tp > 1 else None
        tokens = x.reshape(-1, shape[-1])
        shard_tokens = tp_group is not None and not self.ctx.sequence_parallel
        if shard_tokens:
            tokens = scatter_to_tp(tokens, tp_group, dim=0)
        routing = self._route(tokens, shape, tp_group, global_counts)
        cap = expert_capacity(tokens.shape[0] * (self.ctx.tp if tp_group is not None else 1), self.cfg.top_k,
                              self.cfg.n_experts, self.cfg.capacity_factor)
        keep = None if cap is None else self._keep(routing.experts, cap, shape, tp_group)
        perm = permute(routing.experts, routing.weights, self.cfg.n_experts, keep=keep)
        compute_dtype = autocast_dtype(tokens.device.type)
        if compute_dtype is not None:  # cast the T tokens once, not their N = T*k copies:
            tokens = tokens.to(compute_dtype)  # the experts compute in it
        rows = permute_tokens(tokens, perm)
        host_counts = routing.host_counts if keep is None else None  # capacity changes the counts
        x_local, counts_local, meta = self.dispatcher.dispatch(rows, perm.counts, host_counts)
        y_local = self.experts(x_local, counts_local, self._local_capacity(cap))
        y = unpermute(self.dispatcher.combine(y_local, meta), perm)
        if shard_tokens:
            y = gather_from_tp(y, tp_group, dim=0)
        y = y.view(shape)
        if self.shared is not None:
            y = y + self._shared(x)
        y = AttachAuxLoss.apply(y, routing.aux_loss + routing.z_loss, aux_grad_scale)
        return y, self._stats(routing, perm, tokens.shape[0], tp_group)

    def _route(self, tokens: torch.Tensor, shape: torch.Size, tp_group, global_counts):
        """The router on this rank's tokens, with what its balance-loss scope needs: each token's
        sequence (a sequence may be split over the tp group) or the step's counts."""
        if self.cfg.aux_loss_scope != "sequence":
            return self.router(tokens, stats_group=tp_group, global_counts=global_counts)
        pos, seq_len = self._positions(tokens.shape[0], shape, tp_group, tokens.device)
        return self.router(tokens, stats_group=tp_group, seq_ids=pos // seq_len, n_seqs=shape[0])

    def _positions(self, n_local: int, shape: torch.Size, tp_group,
                   device) -> tuple[torch.Tensor, int]:
        """([n_local] each local token's position in the flattened micro-batch, the full sequence
        length): so position // length is its sequence and positions order capacity priority."""
        pos = torch.arange(n_local, device=device)
        if tp_group is None:
            return pos, shape[1]
        r = self.ctx.tp_rank
        if self.ctx.sequence_parallel:  # x [B, S/tp, D]: local (b, s) is global b*S + r*S/tp + s
            B, S_l = shape[0], shape[1]
            s_idx = torch.arange(S_l, device=device)
            pos = torch.arange(B, device=device)[:, None] * S_l * self.ctx.tp + r * S_l + s_idx
            return pos.flatten(), S_l * self.ctx.tp
        return pos + r * n_local, shape[1]  # a contiguous 1/tp chunk of the flattened tokens

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert, times sigmoid(x . w_gate) per token when gated (Qwen2-MoE)."""
        y = self.shared(x)
        if self.shared_gate is None:
            return y
        return y * torch.sigmoid(self.shared_gate(x))

    def _keep(self, experts: torch.Tensor, cap: int, shape: torch.Size, tp_group) -> torch.Tensor:
        """Capacity dropping decided over the whole micro-batch, as one process would: when the
        tokens are split over the tp group, all-gather every rank's choices and token positions,
        rank all slots together, and keep this rank's rows of the result."""
        if tp_group is None:
            return capacity_keep(experts, self.cfg.n_experts, cap)
        n_local, r = experts.shape[0], self.ctx.tp_rank
        pos, _ = self._positions(n_local, shape, tp_group, experts.device)
        all_experts = gather_from_tp(experts, tp_group, dim=0)
        all_pos = gather_from_tp(pos, tp_group, dim=0)
        keep = capacity_keep(all_experts, self.cfg.n_experts, cap, all_pos)
        return keep[r * n_local:(r + 1) * n_local]

    def _local_capacity(self, cap: int | None) -> int | None:
        """Padded-buffer size per local expert. Under EP every source rank keeps <= its own cap
        (which depends on its own token count), so no fixed size is safe: let the padded backend
        size the buffer by the largest received count."""
        return cap if self.ctx.ep == 1 else None

    def _stats(self, routing, perm: Permutation, n_tokens: int, tp_group) -> MoEStats:
        """Detached statistics of the whole micro-batch (token shards summed over tp)."""
        # built on the device by fills: a host tensor copied over would make the host wait for the
        # GPU (a pageable host-to-device copy synchronises the stream) in every MoE layer
        device = perm.token_idx.device
        counts = torch.stack([torch.full((), float(perm.token_idx.numel()), device=device),
                              torch.full((), float(n_tokens * self.cfg.top_k), device=device)])
        if tp_group is not None:
            counts = reduce_from_tp(counts, tp_group)
        dropped = 1.0 - counts[0] / counts[1].clamp(min=1)
        return MoEStats(routing.aux_loss.detach(), routing.z_loss.detach(), routing.tokens_per_expert.detach(),
                        dropped)
