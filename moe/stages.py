"""Pipeline stages of the Decoder: layer costs for the partitioner, this rank's chunks, tied embeddings.

The partitioner (parallel/partition.py) balances one cost per decoder block plus the embedding
(first stage) and head (last stage) extras; this module computes those costs from the ModelConfig,
builds only this rank's chunks - chunk c of pipeline rank r is virtual stage v = c * pp + r, with
the embedding on v = 0 and the final norm + head on v = S - 1. A tied embedding split over the
first and last stages is a pair of replicas (Decoder.tied_params); parallel/optimizer.py sums their
gradients over ParallelContext.tied_group so they stay equal.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from parallel.context import ParallelContext
from parallel.partition import check_partition, partition_layers
from parallel.rng import ParallelRNG

from .config import ModelConfig
from .model import Decoder, DecoderOutput, build_empty, build_model

# ---------------------------------------------------------------------------------------------
# Costs (forward FLOPs for one sequence of seq_len tokens; backward is ~2x of each, so ratios hold)
# ---------------------------------------------------------------------------------------------


def _mlp_flops(cfg: ModelConfig, ffn: int) -> float:
    """Per token: 2 D F per matmul; SwiGLU has three (w1, w3, w2), GELU two (w1, w2)."""
    return (3 if cfg.mlp == "swiglu" else 2) * 2.0 * cfg.d_model * ffn


def _mean_keys(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    """Keys a query attends to, averaged over positions: (S + 1) / 2 causal, min(i, w) banded."""
    window = cfg.local_window if cfg.is_local_layer(layer) else None
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return sum(min(i, window) for i in range(1, seq_len + 1)) / seq_len


def _attention_flops(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    """Per token: projections 2 D (H dh) for q and o, 2 D (K dh) for k and v; then scores and the
    weighted sum of values, 2 * 2 H dh per attended key (causal/banded masking skips the rest)."""
    q_width, kv_width = cfg.n_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    projections = 2.0 * cfg.d_model * (2 * q_width + 2 * kv_width)
    return projections + 4.0 * q_width * _mean_keys(cfg, layer, seq_len)


def layer_costs(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Forward FLOPs of each decoder block on one sequence of seq_len tokens.

    dense block = attention + MLP(ffn);  MoE block = attention + router (2 D E) + top_k experts'
    MLP(expert_ffn) (+ the shared expert's MLP). Counted: matmuls and attention scores/values.
    Not counted: norms, activations, softmax, RoPE, residual adds and the MoE permutation/all-to-all
    (elementwise or communication; small next to the matmuls at real widths).
    """
    if seq_len < 1 or seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be in [1, model.max_seq_len ({cfg.max_seq_len})]: "
                         f"pass the training sequence length (data.seq_len)")
    costs = []
    for layer in range(cfg.n_layers):
        flops = _attention_flops(cfg, layer, seq_len)
        if cfg.is_moe_layer(layer):
            flops += 2.0 * cfg.d_model * cfg.n_experts + cfg.top_k * _mlp_flops(cfg, cfg.expert_ffn)
            if cfg.shared_expert_ffn_dim:
                flops += _mlp_flops(cfg, cfg.shared_expert_ffn_dim)
        else:
            flops += _mlp_flops(cfg, cfg.ffn)
        costs.append(seq_len * flops)
    return costs


def embedding_cost(cfg: ModelConfig, seq_len: int) -> float:
    """Token lookup (+ position add): no matmul, counted as D adds per token so it is not free."""
    return float(seq_len * cfg.d_model)


def head_cost(cfg: ModelConfig, seq_len: int) -> float:
    """LM head logits, 2 D V per token over the padded vocabulary (norm and cross-entropy not
    counted). At GPT-2 scale it outweighs a block several times, which is why the last stage
    usually gets fewer layers."""
    return 2.0 * seq_len * cfg.d_model * cfg.padded_vocab_size


def plan_stages(cfg: ModelConfig, pp: int, vpp: int, seq_len: int, stage_layers: list[int] | None = None,
                first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> list[list[int]]:
    """The partition (one layer list per virtual stage) balanced on the costs above."""
    return partition_layers(layer_costs(cfg, seq_len), pp, vpp, first_stage_layers=first_stage_layers,
                            last_stage_layers=last_stage_layers, stage_layers=stage_layers,
                            first_extra=embedding_cost(cfg, seq_len), last_extra=head_cost(cfg, seq_len))


# ---------------------------------------------------------------------------------------------
# This rank's chunks
# ---------------------------------------------------------------------------------------------


def build_stage_chunks(cfg: ModelConfig, ctx: ParallelContext, partition: list[list[int]], seed: int = 0,
                       device: str | torch.device | None = None, init: bool = True) -> list[Decoder]:
    """This rank's chunks, chunk c = virtual stage c * pp + pp_rank, initialised with init_weights(seed).

    Init is layout-independent (each parameter drawn whole from a (seed, name) generator, tied head
    drawn under the embedding's name), so the chunks hold exactly the single-process weights.
    init=False leaves the weights uninitialised (build_empty), for a caller that loads every one.
    """
    n_stages = ctx.pp * ctx.vpp
    if len(partition) != n_stages:
        raise ValueError(f"partition has {len(partition)} virtual stages but parallel.pp * parallel.vpp is "
                         f"{n_stages}: build it with plan_stages(cfg, pp, vpp, seq_len)")
    check_partition(partition, cfg.n_layers)
    chunks, rng = [], ParallelRNG(seed, ctx)  # one dropout tracker for all of this rank's chunks
    for c in range(ctx.vpp):
        v = c * ctx.pp + ctx.pp_rank
        build = build_model if init else build_empty
        chunks.append(build(cfg, ctx, seed=seed, device=device or "cpu", layer_ids=partition[v],
                            pre=v == 0, post=v == n_stages - 1, rng=rng))
    return chunks


def stage_chunk_fn(chunk: Decoder, aux_grad_scale: float,
                   global_loads: dict[int, torch.Tensor] | None = None,
                   ) -> Callable[[torch.Tensor, Any], tuple]:
    """Adapt a Decoder chunk to the executor's contract chunk(x, target[, doc_ids]) -> (output,
    info).

    output: the hidden activations on non-last chunks, the mean LM loss on the last. info: a
    DecoderOutput with only the detached loss, aux_loss, z_loss and MoE statistics (no logits or
    activations are kept alive for logging). aux_grad_scale: the micro-batch's loss weight
    (1 / n_micro), applied to the MoE auxiliary losses in backward as on pp=1. global_loads: a
    dict the caller refills before each step with the step's loads (model.aux_loss_scope
    global_batch, see count_step_loads); read at every call, so one executor serves every step.
    doc_ids: the executor's per-stage side input for packed rows (Decoder.forward); None = one
    document a row.
    """

    def run(x: torch.Tensor, target: Any, doc_ids: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, DecoderOutput]:
        out = chunk(x, target, aux_grad_scale=aux_grad_scale, global_loads=global_loads,
                    doc_ids=doc_ids)
        output = out.hidden if not chunk.post else out.loss
        if output is None:
            raise ValueError("the last pipeline stage got no targets: pass targets to PipelineExecutor.step")
        loss = out.loss.detach() if out.loss is not None else None
        return output, DecoderOutput(logits=None, loss=loss, aux_loss=out.aux_loss, z_loss=out.z_loss, moe=out.moe)

    return run


def merge_stage_stats(infos: list[list[DecoderOutput]], n_layers: int, n_experts: int,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Sum this rank's chunk statistics over chunks and micro-batches, on `device` (no host sync):
    aux_loss, z_loss, dropped (summed dropped fractions over MoE layers and micro-batches),
    aux_layers [n_layers] (each layer's balance loss), dropped_layers [n_layers] (each layer's
    dropped fractions) and loads [n_layers, n_experts] (tokens per expert), zero for layers this
    rank lacks, so the caller can all-reduce them over pipeline ranks as they are and divide by
    n_micro."""
    aux, z, dropped = (torch.zeros((), device=device) for _ in range(3))
    aux_layers = torch.zeros(n_layers, device=device)
    loads = torch.zeros(n_layers, max(n_experts, 1), device=device)
    dropped_layers = torch.zeros(n_layers, device=device)
    for per_micro in infos:
        for out in per_micro:
            aux, z = aux + out.aux_loss.float().to(device), z + out.z_loss.float().to(device)
            for layer, stats in out.moe.items():
                dropped = dropped + stats.dropped_fraction.to(device)
                aux_layers[layer] += stats.aux_loss.float().to(device)
                dropped_layers[layer] += stats.dropped_fraction.to(device)
                loads[layer] += stats.tokens_per_expert.to(device)
    return {"aux_loss": aux, "z_loss": z, "dropped": dropped, "aux_layers": aux_layers,
            "loads": loads, "dropped_layers": dropped_layers}


# ---------------------------------------------------------------------------------------------
# Step-wide expert loads: the global_batch balance loss and the expert-bias update
# ---------------------------------------------------------------------------------------------


def routing_count_fn(chunk: Decoder,
                     counted: dict[int, torch.Tensor]) -> Callable[[torch.Tensor, Any], tuple]:
    """A chunk function for a no-grad pass that only counts routing: runs the chunk with
    routing_only (the last stage stops after its last MoE block: no head, no loss) and adds each
    MoE layer's routed slots per expert into `counted` (layer -> [E] float). The last stage
    returns a zero in place of a loss. doc_ids: as for stage_chunk_fn (packed rows route what
    their masked attention produced)."""

    def run(x: torch.Tensor, target: Any,
            doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        out = chunk(x, routing_only=True, doc_ids=doc_ids)
        for layer, stats in out.moe.items():
            load = stats.tokens_per_expert.float()
            counted[layer] = counted[layer] + load if layer in counted else load
        return (out.hidden if not chunk.post else out.hidden.new_zeros(())), None

    return run


def reduce_loads_over_dp(loads: dict[int, torch.Tensor],
                         ctx: ParallelContext) -> dict[int, torch.Tensor]:
    """Sum each layer's [E] loads over the data-parallel group (one all-reduce, layers in a fixed
    order; the ranks of one dp group hold the same layers). Token shards inside a tp group are
    already summed by the router, so the result counts every token of the step once, on every
    rank."""
    if ctx.dp == 1 or not loads:
        return dict(loads)
    keys = sorted(loads)
    flat = torch.stack([loads[k].float() for k in keys])  # [layers, E]
    dist.all_reduce(flat, group=ctx.dp_group)
    return dict(zip(keys, flat.unbind(0)))


def pool_loads_over_layers(loads: dict[int, torch.Tensor], ctx: ParallelContext, n_experts: int,
                           device: torch.device | str = "cpu") -> dict[int, torch.Tensor]:
    """model.aux_loss_pool_layers: every MoE layer's balance loss takes f from the loads of all MoE
    layers together, F_e = sum_l C_le / sum_{l,e'} C_le' (transformers' load_balancing_loss_func
    pools the layers' tokens the same way). `loads` holds this rank's layers (already summed over
    dp); their [E] total is summed over the pipeline ranks (every pp rank takes part, with or
    without MoE layers), and each of this rank's layers gets that same total."""
    total = torch.zeros(n_experts, device=device)
    for load in loads.values():
        total = total + load.float().to(device)
    if ctx.pp > 1:
        dist.all_reduce(total, group=ctx.pp_group)
    return {layer: total for layer in loads}


@torch.no_grad()
def update_expert_biases(chunks: list[Decoder], loads: dict[int, torch.Tensor]) -> None:
    """After an optimizer step: each router with an expert bias moves it by its rule (moe/router.py)
    from its layer's step load (summed over micro-batches and ranks: the same on every rank)."""
    for chunk in chunks:
        for key, block in chunk.layers.items():
            router = getattr(block.mlp, "router", None)
            if router is None or router.expert_bias is None or router.opts.bias_update_rate == 0:
                continue
            router.update_bias(loads[int(key)])


def expert_bias_table(chunks: list[Decoder], n_layers: int, n_experts: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[n_layers, n_experts] expert biases of this rank's layers (zero rows elsewhere): summed over
    pipeline ranks, the whole model's biases, for logging."""
    table = torch.zeros(n_layers, max(n_experts, 1), device=device)
    for chunk in chunks:
        for key, block in chunk.layers.items():
            router = getattr(block.mlp, "router", None)
            if router is not None and router.expert_bias is not None:
                table[int(key)] = router.expert_bias.to(device)
    return table
