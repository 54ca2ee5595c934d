"""Top-k router with the Switch/GShard load-balancing loss and the ST-MoE router z-loss.

Math (T tokens, E experts, k experts per token):
    logits  = x W_r                        [T, E]    (computed and kept in float32)
    p       = softmax(logits)              [T, E]
    w, idx  = topk(p, k);  w = w / sum(w)  [T, k]    (renormalised over the chosen k when k > 1;
                                                      top-1 keeps p, as in Switch)
    f_e     = (# routed slots to e) / (T k)          fraction of assignments, no gradient
    P_e     = mean_t p[t, e]                          mean router probability, differentiable
    aux     = coef_aux * E * sum_e f_e P_e            == coef_aux when perfectly balanced
    z       = coef_z * mean_t logsumexp(logits_t)^2
When the tokens of one micro-batch are split over several ranks (tensor-parallel token sharding,
sequence parallelism) the per-expert counts and probability sums are summed over `stats_group`
first, so every rank computes the loss of the whole micro-batch, exactly as one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.layout import Split
from parallel.tensor import reduce_from_tp


@dataclass
class Routing:
    weights: torch.Tensor          # [T, k] renormalised gate weights (x.dtype-independent float32)
    experts: torch.Tensor          # [T, k] int64 expert ids
    aux_loss: torch.Tensor         # scalar, coefficient applied, differentiable
    z_loss: torch.Tensor           # scalar, coefficient applied, differentiable
    tokens_per_expert: torch.Tensor  # [E] int64 counts over the whole micro-batch (before any dropping)


def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots per expert, [E] int64. A scatter-add rather than bincount, which reads its input's
    max back to the host (a device sync) on CUDA."""
    flat = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int, coef: float,
                        stats_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """aux = coef * E * sum_e f_e * P_e over all tokens of the micro-batch (see module docstring).
    Returns (loss, tokens_per_expert)."""
    T, k = experts.shape
    counts = expert_counts(experts, n_experts)  # [E] local routed slots
    prob_sum = probs.sum(dim=0)  # [E]
    n_tokens = torch.full((1,), float(T), device=probs.device)
    if stats_group is not None:
        counts = reduce_from_tp(counts.float(), stats_group).long()
        prob_sum = reduce_from_tp(prob_sum, stats_group)
        n_tokens = reduce_from_tp(n_tokens, stats_group)
    f = counts.float() / (n_tokens * k)
    P = prob_sum / n_tokens
    return coef * n_experts * (f * P).sum(), counts


def z_loss(logits: torch.Tensor, coef: float, stats_group=None) -> torch.Tensor:
    """coef * mean over all micro-batch tokens of logsumexp(logits)^2. With tokens split over
    `stats_group`, each rank contributes its sum / total tokens; the forward value is all-reduced."""
    sq = torch.logsumexp(logits, dim=-1).square().sum()
    n = torch.full((1,), float(logits.shape[0]), device=logits.device)
    if stats_group is not None:
        sq = reduce_from_tp(sq, stats_group)
        n = reduce_from_tp(n, stats_group)
    return coef * sq / n.squeeze()


def forced_experts(n_tokens: int, n_experts: int, top_k: int, imbalance: float = 1.0,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """A fixed [T, k] expert choice with a known load, for benchmarks and memory simulation.

    imbalance 1: slot s = t k + j goes to expert s mod E (every expert within one slot of the fair
    share T k / E; Megatron's force-load-balancing). imbalance F > 1: expert 0 is the first choice
    of the first min(T, round(F T k / E)) tokens, the busiest expert at F times its fair share, and
    the remaining slots go round-robin over experts 1..E-1. A token never gets one expert twice.
    """
    T, k, E = n_tokens, top_k, n_experts
    t = torch.arange(T, device=device)[:, None]
    j = torch.arange(k, device=device)[None, :]
    if imbalance == 1.0:
        return (t * k + j) % E
    n0 = min(T, round(imbalance * T * k / E))
    busy = t < n0                                   # tokens whose first choice is expert 0
    counter = t * k - torch.clamp(t, max=n0) + j - busy.long()  # index among the other slots
    return torch.where(busy & (j == 0), 0, 1 + counter % (E - 1))


class TopKRouter(nn.Module):
    """Linear gate d_model -> E, then the routing math above. The gate weight is replicated on
    every rank (it is tiny); under tp each rank routes its token shard, so the gradient is summed
    over token shards by the gradient reducer (PARAM_SPLITS)."""

    PARAM_SPLITS = {"weight": Split(token_sharded=True, keep_fp32=True)}  # routing is float32

    def __init__(self, d_model: int, n_experts: int, top_k: int, aux_coef: float, z_coef: float,
                 forced_imbalance: float | None = None):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.aux_coef, self.z_coef = aux_coef, z_coef
        self.forced_imbalance = forced_imbalance  # None = learned routing (see forced_experts)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x: torch.Tensor, stats_group=None) -> Routing:
        with torch.autocast(x.device.type, enabled=False):  # float32 even inside a bf16 autocast region
            logits = F.linear(x.float(), self.weight.float())  # [T, E]
        probs = torch.softmax(logits, dim=-1)
        if self.forced_imbalance is None:
            weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        else:  # fixed choice, learned gate weights: the router still trains
            experts = forced_experts(x.shape[0], self.n_experts, self.top_k, self.forced_imbalance, x.device)
            weights = probs.gather(1, experts)
        if self.top_k > 1:  # renormalise over the chosen k (Mixtral); top-1 keeps p (Switch), so the
            weights = weights / weights.sum(dim=-1, keepdim=True)  # router still gets an LM-loss gradient
        aux, counts = load_balancing_loss(probs, experts, self.n_experts, self.aux_coef, stats_group)
        z = z_loss(logits, self.z_coef, stats_group)
        return Routing(weights, experts, aux, z, counts)
