"""Dense -> MoE upcycling: start an MoE model from a trained dense one, computing the same function.

Sparse upcycling (Komatsuzaki et al. 2022) copies the dense MLP into every expert; fine-grained
upcycling (He et al. 2024) first cuts it into g slices. Both are exact at step 0 here:

    A dense MLP is a sum over its F hidden units, MLP(x) = sum_j w2[:, j] act_j(x) (SwiGLU and GELU
    act unit by unit), so g slices of F/g units are g experts whose outputs sum to MLP(x).
    The MoE gets E = c g experts: expert e is slice e % g of copy e // g. Router rows are equal
    within a copy (one small random row per copy), so the g slices of a copy always score the same,
    and a top-k with g | k takes whole copies. With the k weights normalised (they sum to 1, then
    times the routed scaling factor s) every chosen slice of copy c gets s p_c / (g sum_c' p_c'):
        MoE(x) = s * sum_chosen c  p_c / (g sum p) * sum_slices y = (s / g) MLP(x),
    so each expert's output projection is scaled by g / s and MoE(x) = MLP(x) exactly.
Everything else (attention, norms, embeddings, head, the MLPs of blocks that stay dense) is copied;
expert biases start at zero. Group-limited routing keeps the property when each group holds whole
copies (g | E / n_group); capacity dropping does not (a dropped slot loses part of the MLP).
"""

from __future__ import annotations

import torch

from .config import TRAINING_ONLY, ModelConfig, first_difference
from .model import init_generator

# Fields that only the MoE blocks use: the dense source need not (and cannot) match them.
MOE_FIELDS = frozenset({
    "n_experts", "top_k", "moe_every", "first_k_dense", "dense_layers", "moe_layers",
    "expert_ffn_dim", "shared_expert_ffn_dim", "shared_expert_gate", "score_function",
    "topk_before_softmax", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group",
    "group_score_topk", "expert_bias"})


def granularity(dense: ModelConfig, moe: ModelConfig) -> int:
    """g: how many expert slices one dense MLP is cut into (dense ffn / expert ffn)."""
    return dense.ffn // moe.expert_ffn


def check_upcycle(dense: ModelConfig, moe: ModelConfig) -> None:
    """One-line ValueError naming the field when `dense` cannot be upcycled exactly into `moe`."""
    if dense.n_experts or not moe.n_experts:
        raise ValueError(f"checkpoint.upcycle turns a dense checkpoint into an MoE model, but the "
                         f"source has model.n_experts {dense.n_experts} and this run "
                         f"{moe.n_experts}")
    all_moe = len(moe.moe_layer_ids) == moe.n_layers  # then no block keeps ffn_dim
    skip = TRAINING_ONLY | MOE_FIELDS | ({"ffn_dim"} if all_moe else set())
    diff = first_difference(moe, dense, skip=skip)
    if diff is not None:
        name, ours, theirs = diff
        raise ValueError(f"checkpoint.upcycle: model.{name} is {ours!r} here but {theirs!r} in the "
                         f"dense checkpoint: set model.{name}={theirs!r}")
    g = max(granularity(dense, moe), 1)
    problems = [
        (not dense.bias, "the dense MLP has biases (model.bias true) and experts have none"),
        (dense.ffn % moe.expert_ffn == 0,
         f"model.expert_ffn_dim ({moe.expert_ffn}) must divide the dense MLP width ({dense.ffn})"),
        (moe.shared_expert_ffn_dim == 0,
         "a shared expert has no dense counterpart: set model.shared_expert_ffn_dim=0"),
        (moe.normalizes_topk, "the k gate weights must sum to 1: set model.norm_topk_prob=true"),
        (moe.n_experts % g == 0 and moe.top_k % g == 0,
         f"with {g} slices per dense MLP, model.n_experts ({moe.n_experts}) and model.top_k "
         f"({moe.top_k}) must be multiples of {g}"),
        ((moe.n_experts // moe.n_group) % g == 0,
         f"each of the model.n_group ({moe.n_group}) expert groups must hold whole copies of {g} "
         f"slices"),
    ]
    for ok, problem in problems:
        if not ok:
            raise ValueError(f"checkpoint.upcycle: {problem}")


def upcycle_state(dense_state: dict[str, torch.Tensor], dense: ModelConfig, moe: ModelConfig,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """The MoE model's whole-model state dict (our names, full tensors) made from a dense one's."""
    check_upcycle(dense, moe)
    moe_blocks = list(moe.moe_layer_ids)
    mlp_prefixes = tuple(f"layers.{i}.mlp." for i in moe_blocks)
    out = {k: v for k, v in dense_state.items() if not k.startswith(mlp_prefixes)}
    for i in moe_blocks:
        out.update(_moe_block(dense_state, f"layers.{i}.mlp.", dense, moe, seed))
    return out


def _moe_block(sd: dict[str, torch.Tensor], prefix: str, dense: ModelConfig, moe: ModelConfig,
               seed: int) -> dict[str, torch.Tensor]:
    """One block's experts (slice e % g of copy e // g, output scaled by g / s), router and expert
    bias."""
    g, fe, swiglu = granularity(dense, moe), moe.expert_ffn, moe.mlp == "swiglu"
    w1, w2 = sd[prefix + "w1.weight"].float(), sd[prefix + "w2.weight"].float()  # [F, D], [D, F]
    w3 = sd[prefix + "w3.weight"].float() if swiglu else None                     # [F, D]
    w_in, w_out = [], []
    for e in range(moe.n_experts):
        rows = slice((e % g) * fe, (e % g + 1) * fe)
        parts = [w1[rows].t()] + ([w3[rows].t()] if swiglu else [])  # gate | up, [D, Fe] each
        w_in.append(torch.cat(parts, dim=1))                       # [D, 2Fe] (SwiGLU) or [D, Fe]
        w_out.append(w2[:, rows].t() * (g / moe.routed_scaling_factor))  # [Fe, D]
    out = {prefix + "experts.w_in": torch.stack(w_in), prefix + "experts.w_out": torch.stack(w_out),
           prefix + "router.weight": router_rows(prefix + "router.weight", moe, g, seed)}
    if moe.expert_bias:
        out[prefix + "router.expert_bias"] = torch.zeros(moe.n_experts)
    return out


def router_rows(name: str, moe: ModelConfig, g: int, seed: int) -> torch.Tensor:
    """[E, D] router weight: one row per copy drawn N(0, (init_std / sqrt(d_model))^2) from the
    (seed, name) generator every init uses - small, so the first routing is near uniform - each
    repeated for the copy's g slices."""
    std = moe.init_std / moe.d_model ** 0.5
    rows = torch.randn(moe.n_experts // g, moe.d_model, generator=init_generator(seed, name)) * std
    return rows.repeat_interleave(g, dim=0)
