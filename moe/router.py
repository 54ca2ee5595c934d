"""Top-k router: expert scores, (group-limited) top-k with an optional selection bias, gate weights,
the load-balancing losses (per micro-batch, per sequence or over the global batch), the ST-MoE
z-loss, and the expert-bias update of auxiliary-loss-free balancing.

Math (T tokens, E experts, k experts per token; float32 throughout, even under autocast):
    x'      = x * U(1 - eps, 1 + eps)              input jitter, training only (router_input_jitter)
    l       = x' W_r                               [T, E] logits
    s       = softmax(l)  or  sigmoid(l)           [T, E] scores (score_function)
    c       = s + b                                choice scores, b the expert bias (0 when off)
    groups  (n_group G > 1): experts form G contiguous groups of E/G; a group's score is the sum
            of its group_score_topk best c; each token keeps its topk_group best groups and
            c = -inf elsewhere
    idx     = topk(c, k)                           [T, k] chosen experts (b only changes the choice)
    w       = s[idx]                               [T, k]; topk_before_softmax: w = softmax(l[idx])
    w       = w / (sum_k w + 1e-20)                when normalising (norm_topk_prob; default: k > 1)
    w       = w * routed_scaling_factor
Balance losses use probabilities q: q = softmax(l) for softmax scores, q = s / sum_e s for sigmoid
scores (DeepSeek-V3 normalises its affinities the same way):
    f_e     = (# slots routed to e) / (T k)        no gradient
    P_e     = mean_t q[t, e]                       differentiable
    micro_batch:  aux = coef * E * sum_e f_e P_e   over the micro-batch's tokens (coef if balanced)
    sequence:     aux = coef * mean_b (E * sum_e f_be P_be), f and P over the tokens of sequence b
    global_batch: aux = coef * E * sum_e F_e P_e,  F_e = C_e / sum_e' C_e' from the step's counts C
                  over every micro-batch and data-parallel rank
    z       = coef_z * mean_t logsumexp(l_t)^2
Why global_batch is exact: the step's objective is coef E sum_e F_e Pbar_e, Pbar over all N tokens
of the step. F has no gradient, so this equals the mean over the step's equal-sized micro-batches
of coef E sum_e F_e P_e(micro-batch) - the term above, weighted like each micro-batch's LM loss.
Only F must be known before the first backward: the trainer counts it in a no-grad pre-pass
(moe/stages.py routing_count_fn).
Expert bias, after each optimizer step, from the step's loads n_e (routed slots summed over every
micro-batch and rank, hence identical on every rank):
    b_e += rate * sign(mean_e' n_e' - n_e)
When a micro-batch's tokens are split over ranks (tensor-parallel token sharding, sequence
parallelism), counts, probability sums and token counts are summed over `stats_group` first, so
every rank computes the loss of the whole micro-batch (or sequence) exactly as one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.layout import Split
from parallel.tensor import reduce_from_tp

from .config import ModelConfig


@dataclass
class Routing:
    weights: torch.Tensor          # [T, k] gate weights (float32 whatever x's dtype)
    experts: torch.Tensor          # [T, k] int64 expert ids, best first
    aux_loss: torch.Tensor         # scalar, coefficient applied, differentiable
    z_loss: torch.Tensor           # scalar, coefficient applied, differentiable
    tokens_per_expert: torch.Tensor  # [E] int64 counts over the whole micro-batch (before any dropping)
    host_counts: list[int] | None = None  # [E] this rank's slots per expert, known on the host
                                          # without reading the device (forced routing only)


@dataclass(frozen=True)
class RouterOptions:
    """The ModelConfig routing fields a router needs (defaults: softmax top-k, Mixtral/Switch)."""
    score_function: str = "softmax"
    topk_before_softmax: bool = False
    normalize: bool | None = None       # None: when top_k > 1
    scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score_topk: int = 2
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    input_jitter: float = 0.0
    aux_scope: str = "micro_batch"

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "RouterOptions":
        return cls(cfg.score_function, cfg.topk_before_softmax, cfg.norm_topk_prob,
                   cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group, cfg.group_score_topk,
                   cfg.expert_bias, cfg.expert_bias_update_rate, cfg.router_input_jitter,
                   cfg.aux_loss_scope)


# ---------------------------------------------------------------- scores, choice, weights
def router_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """s = softmax(l) or sigmoid(l), [T, E]."""
    return torch.softmax(logits, dim=-1) if score_function == "softmax" else torch.sigmoid(logits)


def balance_probs(scores: torch.Tensor, score_function: str) -> torch.Tensor:
    """q, the per-token expert distribution the balance losses average: softmax scores as they are,
    sigmoid scores divided by their sum over experts."""
    if score_function == "softmax":
        return scores
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


def group_limited(choice: torch.Tensor, n_group: int, topk_group: int,
                  group_score_topk: int) -> torch.Tensor:
    """choice [T, E] with -inf outside each token's topk_group best groups; a group's score is the
    sum of its group_score_topk best choice scores (DeepSeek-V3 node-limited routing)."""
    T, E = choice.shape
    grouped = choice.view(T, n_group, E // n_group)                      # [T, G, E/G]
    group_scores = grouped.topk(group_score_topk, dim=-1).values.sum(-1)  # [T, G]
    best = group_scores.topk(topk_group, dim=-1).indices                # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(T, E)


def gate_weights(logits: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor, top_k: int,
                 opts: RouterOptions) -> torch.Tensor:
    """w [T, k]: the chosen scores (or a softmax over the chosen logits), normalised when asked
    (by default when k > 1: top-1 keeps p as in Switch, so the router still gets an LM-loss
    gradient), then times the routed scaling factor."""
    if opts.topk_before_softmax:
        w = torch.softmax(logits.gather(1, experts), dim=-1)
    else:
        w = scores.gather(1, experts)
        normalize = top_k > 1 if opts.normalize is None else opts.normalize
        if normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * opts.scaling_factor if opts.scaling_factor != 1.0 else w


# ---------------------------------------------------------------- balance losses
def expert_counts(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots per expert, [E] int64. A scatter-add rather than bincount, which reads its input's
    max back to the host (a device sync) on CUDA."""
    flat = experts.flatten()
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int, coef: float,
                        stats_group=None, global_counts: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """aux = coef * E * sum_e f_e * P_e over all tokens of the micro-batch (module docstring);
    with `global_counts` [E] (the step's routed slots per expert), f = global_counts / their sum
    (the global_batch scope). Returns (loss, this micro-batch's tokens_per_expert)."""
    T, k = experts.shape
    counts = expert_counts(experts, n_experts)  # [E] local routed slots
    prob_sum = probs.sum(dim=0)  # [E]
    n_tokens = torch.full((1,), float(T), device=probs.device)
    if stats_group is not None:
        counts = reduce_from_tp(counts.float(), stats_group).long()
        prob_sum = reduce_from_tp(prob_sum, stats_group)
        n_tokens = reduce_from_tp(n_tokens, stats_group)
    if global_counts is None:
        f = counts.float() / (n_tokens * k)
    else:
        f = global_counts.float() / global_counts.float().sum().clamp(min=1)
    P = prob_sum / n_tokens
    return coef * n_experts * (f * P).sum(), counts


def sequence_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int, coef: float,
                            seq_ids: torch.Tensor, n_seqs: int, stats_group=None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """aux = coef * mean_b E sum_e f_be P_be (DeepSeek-V2/V3 sequence-wise balance loss).
    seq_ids [T]: each local token's sequence in the micro-batch (0 .. n_seqs-1). A sequence split
    over `stats_group` (token sharding, sequence parallelism) has its counts, probability sums
    and token count summed over the group first. Returns (loss, the micro-batch's
    tokens_per_expert)."""
    T, k = experts.shape
    E, dev = n_experts, probs.device
    slots = (seq_ids[:, None] * E + experts).flatten()                  # [T k] (sequence, expert) cells
    counts = torch.zeros(n_seqs * E, device=dev).index_add_(0, slots, torch.ones(T * k, device=dev))
    prob_sum = torch.zeros(n_seqs, E, device=dev).index_add(0, seq_ids, probs)  # [B, E]
    n_tok = torch.zeros(n_seqs, device=dev).index_add_(0, seq_ids, torch.ones(T, device=dev))
    if stats_group is not None:
        counts = reduce_from_tp(counts, stats_group)
        prob_sum = reduce_from_tp(prob_sum, stats_group)
        n_tok = reduce_from_tp(n_tok, stats_group)
    n_tok = n_tok.clamp(min=1)[:, None]                                 # [B, 1]
    f = counts.view(n_seqs, E) / (n_tok * k)
    per_sequence = E * (f * prob_sum / n_tok).sum(-1)                   # [B]
    return coef * per_sequence.mean(), counts.view(n_seqs, E).sum(0).round().long()


def z_loss(logits: torch.Tensor, coef: float, stats_group=None) -> torch.Tensor:
    """coef * mean over all micro-batch tokens of logsumexp(logits)^2. With tokens split over
    `stats_group`, each rank contributes its sum / total tokens; the forward value is all-reduced."""
    sq = torch.logsumexp(logits, dim=-1).square().sum()
    n = torch.full((1,), float(logits.shape[0]), device=logits.device)
    if stats_group is not None:
        sq = reduce_from_tp(sq, stats_group)
        n = reduce_from_tp(n, stats_group)
    return coef * sq / n.squeeze()


def expert_bias_step(load: torch.Tensor, rate: float) -> torch.Tensor:
    """rate * sign(mean load - load), [E]: raise the bias of under-loaded experts, lower it for
    over-loaded ones (DeepSeek-V3; `load` = the step's routed slots per expert)."""
    load = load.float()
    return rate * torch.sign(load.mean() - load)


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


def forced_counts(n_tokens: int, n_experts: int, top_k: int, imbalance: float = 1.0) -> list[int]:
    """Slots per expert of forced_experts(n_tokens, n_experts, top_k, imbalance), in plain Python.

    Expert-parallel dispatch needs these as split sizes on the host; computing them from the formula
    saves reading them back from the device (a sync), and is the only way when no device values
    exist (the planner's fake-tensor simulation). With T k slots: imbalance 1 gives slot s to expert
    s mod E, so expert e gets floor(T k / E) + [e < T k mod E]; imbalance F gives expert 0
    n0 = min(T, round(F T k / E)) slots and deals the other T k - n0 round-robin over 1..E-1.
    """
    slots, E = n_tokens * top_k, n_experts
    if imbalance == 1.0:
        q, r = divmod(slots, E)
        return [q + (e < r) for e in range(E)]
    n0 = min(n_tokens, round(imbalance * slots / E))
    q, r = divmod(slots - n0, E - 1)
    return [n0] + [q + (e < r) for e in range(E - 1)]


class TopKRouter(nn.Module):
    """Linear gate d_model -> E, then the routing math above. The gate weight is replicated on
    every rank (it is tiny); under tp each rank routes its token shard, so the gradient is summed
    over token shards by the gradient reducer (PARAM_SPLITS). With `opts.expert_bias` the bias is a
    persistent float32 buffer `expert_bias` [E]: saved in checkpoints (replicated, so any layout
    reloads it) and changed only by update_bias."""

    PARAM_SPLITS = {"weight": Split(token_sharded=True, keep_fp32=True)}  # routing is float32

    def __init__(self, d_model: int, n_experts: int, top_k: int, aux_coef: float, z_coef: float,
                 forced_imbalance: float | None = None, opts: RouterOptions = RouterOptions()):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.aux_coef, self.z_coef = aux_coef, z_coef
        self.forced_imbalance = forced_imbalance  # None = learned routing (see forced_experts)
        self.opts = opts
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        if opts.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor, stats_group=None, seq_ids: torch.Tensor | None = None,
                n_seqs: int = 0, global_counts: torch.Tensor | None = None) -> Routing:
        """x [T, D] -> Routing. seq_ids/n_seqs: each token's sequence (the sequence scope);
        global_counts [E]: the step's routed slots per expert (the global_batch scope)."""
        if self.training and self.opts.input_jitter > 0:
            eps = self.opts.input_jitter
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        with torch.autocast(x.device.type, enabled=False):  # float32 even inside a bf16 autocast region
            logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = router_scores(logits, self.opts.score_function)
        experts = self._choose(scores, x.shape[0])
        weights = gate_weights(logits, scores, experts, self.top_k, self.opts)
        probs = balance_probs(scores, self.opts.score_function)
        aux, counts = self._balance_loss(probs, experts, stats_group, seq_ids, n_seqs,
                                         global_counts)
        z = z_loss(logits, self.z_coef, stats_group)
        return Routing(weights, experts, aux, z, counts, self._host_counts(x.shape[0]))

    def _host_counts(self, n_tokens: int) -> list[int] | None:
        """Forced routing's slots per expert, known on the host (module docstring of forced_counts);
        None for learned routing, whose counts only the device knows."""
        if self.forced_imbalance is None:
            return None
        return forced_counts(n_tokens, self.n_experts, self.top_k, self.forced_imbalance)

    def _choose(self, scores: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """[T, k] expert ids: top-k of the (biased, group-limited) choice scores, or the forced
        choice (learned gate weights even then: the router still trains)."""
        if self.forced_imbalance is not None:
            return forced_experts(n_tokens, self.n_experts, self.top_k, self.forced_imbalance,
                                  scores.device)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        o = self.opts
        if o.n_group > 1:
            choice = group_limited(choice, o.n_group, o.topk_group, o.group_score_topk)
        return torch.topk(choice, self.top_k, dim=-1).indices

    def _balance_loss(self, probs, experts, stats_group, seq_ids, n_seqs, global_counts):
        scope = self.opts.aux_scope
        if scope == "sequence":
            if seq_ids is None:
                raise ValueError("model.aux_loss_scope=sequence: the router needs each token's "
                                 "sequence (seq_ids); call it through MoELayer")
            return sequence_balancing_loss(probs, experts, self.n_experts, self.aux_coef, seq_ids,
                                           n_seqs, stats_group)
        training = torch.is_grad_enabled() and self.training
        if scope == "global_batch" and global_counts is None and training:
            raise ValueError("model.aux_loss_scope=global_batch needs the step's expert loads "
                             "before backward: train through train.trainer.Trainer (it counts them "
                             "in a no-grad pre-pass), or pass global_loads to Decoder.forward")
        return load_balancing_loss(probs, experts, self.n_experts, self.aux_coef, stats_group,
                                   global_counts)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """After an optimizer step: expert_bias += rate * sign(mean load - load) (module docstring).
        `load` [E] must be the whole step's slots per expert, identical on every rank."""
        if self.expert_bias is None:
            raise ValueError("update_bias needs model.expert_bias=true")
        step = expert_bias_step(load.to(self.expert_bias.device), self.opts.bias_update_rate)
        self.expert_bias.add_(step)
