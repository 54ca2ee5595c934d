"""The pieces of the parallel-equivalence suite that run inside a process (reference or gloo rank).

One training step, written once and run by every layout (it mirrors train/trainer.py's
forward_backward + train_step): the global batch of G sequences is fixed; data-parallel rank d takes
the contiguous slice [d*G/dp, (d+1)*G/dp) and splits it into micro-batches of m sequences, so

    n_micro = G / (dp * m),   backward of loss_i / n_micro  (aux_grad_scale = 1 / n_micro)
    ParallelOptimizer (the trainer's): float32 gradient buffers, tp partial sums, then dp (dense) /
    edp (expert) means  ->  clip at MAX_NORM  ->  AdamW on float32 main weights  ->  model written

The single-process reference is the same function with the degenerate context (dp = 1, so
n_micro = G / m): it sees the identical micro-batches, which the MoE aux loss needs (it is a
per-micro-batch statistic), and its gradient is the mean over all G / m micro-batches, exactly the
dp mean of the per-rank means. Every layout must therefore reproduce the reference's losses and, after
its shards are gathered (by each parameter's layout record), the reference's updated weights. Under
precision "bf16" the model is held in bf16 and runs under autocast, with float32 main weights and
float32 gradient accumulation (the trainer's bf16 layout); the reference does the same.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from moe.config import ModelConfig, get_preset
from moe.model import Decoder, build_model
from moe.stages import reduce_loads_over_dp, routing_count_fn, update_expert_biases
from parallel.context import ParallelContext
from parallel.layout import LayoutTable
from parallel.optimizer import ParallelOptimizer
from train.optim import build_parallel_optimizer

G, MICRO, SEQ, STEPS = 16, 2, 16, 3   # global batch (sequences), micro-batch, sequence length, AdamW steps
LR, WEIGHT_DECAY = 1e-3, 0.1
# Adam divides by sqrt(v) + eps, so an element whose gradient is ~1e-9 (a near-cancelling sum; typical
# entries are ~1e-4) turns fp32 summation-order noise into an update difference of up to ~lr. eps = 1e-6
# damps those elements only; it is a conditioning choice, not a tolerance (measured: 2.5e-5 -> <1e-6).
ADAM_EPS = 1e-6
# These tiny models start with a global grad norm of 0.82-0.84 that falls to 0.75-0.77 by step 3, so
# 1.0 would never clip; at 0.78 the first two steps are clipped and the last is not (both paths run).
MAX_NORM = 0.78
TOKEN_SEED = 1234

_SHRINK = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256,
               vocab_pad_multiple=8, max_seq_len=64)
_MOE = dict(n_experts=4, top_k=2, expert_ffn_dim=32)
# tp=4 cannot split 2 kv heads (validate_layout rejects it), so tp=4 runs twice the heads: 8 query and
# 4 kv heads of width 8 keep the GQA ratio (2 query heads per kv head, 1 kv head per rank).
_HEADS8 = dict(n_heads=8, n_kv_heads=4)
MODELS: dict[str, tuple[str, dict]] = {
    "dense": ("tiny", {}),
    "dense_pad": ("tiny", dict(vocab_size=250)),                  # 250 -> 256 rows: padded, masked vocab
    "moe": ("tiny-moe", _MOE),
    "moe_capacity": ("tiny-moe", dict(_MOE, capacity_factor=1.0)),
    "dense_h8": ("tiny", dict(_HEADS8, vocab_size=250)),
    "moe_h8": ("tiny-moe", dict(_MOE, **_HEADS8)),
    # balance-loss scopes: f over each sequence (split over tp ranks under token sharding), or over
    # the whole step (counted in a no-grad pre-pass); a coefficient large enough to steer the router
    "moe_seq": ("tiny-moe", dict(_MOE, aux_loss_scope="sequence", aux_loss_coef=0.1,
                                 shared_expert_ffn_dim=32, shared_expert_gate=True)),
    "moe_global": ("tiny-moe", dict(_MOE, aux_loss_scope="global_batch", aux_loss_coef=0.1)),
    # aux-loss-free balancing (DeepSeek-V3 style: sigmoid, groups, scaled weights, first block
    # dense); the rate is large so the bias changes the routing within the three steps, and 8
    # experts make a data-parallel shard's load signs differ from the whole step's
    "moe_bias": ("tiny-moe", dict(_MOE, n_experts=8, score_function="sigmoid", n_group=2,
                                  topk_group=1, routed_scaling_factor=2.0, expert_bias=True,
                                  expert_bias_update_rate=0.05, aux_loss_coef=0.0,
                                  first_k_dense=1)),
    # attention and block features of the HF families: OLMoE's q/k norms over the whole projection
    # (statistics summed over tp) and clip_qkv (1.5 clips ~13% of the normalised q/k entries),
    # GLM-4's sandwich norms; Qwen3's per-head q/k norms (weights replicated, gradients summed over
    # tp); GPT-1's post-norm blocks with no final norm, LayerNorm biases and learned positions
    "dense_qk": ("tiny", dict(qk_norm="full", qkv_clip=1.5, sandwich_norm=True)),
    "moe_qk": ("tiny-moe", dict(_MOE, qk_norm="head", shared_expert_ffn_dim=32)),
    "gpt1": ("gpt1-tiny", dict(n_kv_heads=4, ffn_dim=256)),
}


def model_config(key: str) -> ModelConfig:
    preset, extra = MODELS[key]
    return get_preset(preset, **{**_SHRINK, **extra})


def global_tokens(vocab_size: int) -> torch.Tensor:
    """[G, SEQ + 1] fixed random token ids: inputs are [:, :-1], targets [:, 1:]."""
    return torch.randint(0, vocab_size, (G, SEQ + 1), generator=torch.Generator().manual_seed(TOKEN_SEED))


@dataclass(frozen=True)
class Layout:
    """One parallel layout of one model; dp = world // tp (pp = 1)."""
    name: str
    model: str
    tp: int = 1
    ep: int = 1
    sp: bool = False
    zero1: bool = False
    fold: bool = False         # experts cut over tp x dp (the ep group spans tp ranks)
    precision: str = "fp32"    # or "bf16": bf16 model, float32 main weights and grad accumulation

    @property
    def reference_key(self) -> tuple[str, str]:
        return self.model, self.precision


# ----------------------------------------------------------------------------- one step

def _dp_mean(values: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    if ctx.dp > 1:
        dist.all_reduce(values, group=ctx.dp_group)
        values = values / ctx.dp
    return values


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def count_loads(model: Decoder, micro: tuple[torch.Tensor, ...], precision: str) -> dict[int, torch.Tensor]:
    """The global_batch scope's pre-pass (trainer._count_step_loads): routed slots per expert of
    every micro-batch, no grad, summed over dp; {} for other scopes."""
    if model.cfg.aux_loss_scope != "global_batch":
        return {}
    counted: dict[int, torch.Tensor] = {}
    count = routing_count_fn(model, counted)
    with torch.no_grad(), _autocast(precision):
        for mb in micro:
            count(mb[:, :-1], None)
    return reduce_loads_over_dp(counted, model.ctx)


def forward_backward(model: Decoder, opt: ParallelOptimizer, local: torch.Tensor, precision: str):
    """This rank's micro-batches (trainer.forward_backward); returns [lm, aux, z, dropped] means
    and the step's loads per MoE layer (summed over micro-batches and dp), for the bias update."""
    micro = local.split(MICRO)
    n_micro = len(micro)
    stats, loads = torch.zeros(4), {}
    global_loads = count_loads(model, micro, precision)
    for i, mb in enumerate(micro):
        opt.prepare(0, last=i == n_micro - 1)
        with _autocast(precision):
            out = model(mb[:, :-1], mb[:, 1:], aux_grad_scale=1.0 / n_micro, global_loads=global_loads)
        (out.loss / n_micro).backward()
        dropped = sum(s.dropped_fraction for s in out.moe.values()) / max(len(out.moe), 1)
        stats += torch.stack([out.loss.detach().float(), out.aux_loss, out.z_loss, torch.as_tensor(dropped)])
        for layer, s in out.moe.items():
            loads[layer] = loads.get(layer, 0) + s.tokens_per_expert.float()
    opt.finish()
    return stats / n_micro, reduce_loads_over_dp(loads, model.ctx)


def _gather_grads(model: Decoder, ctx: ParallelContext, opt: ParallelOptimizer) -> dict:
    """Full reduced gradients (the main parameters' .grad). Under ZeRO-1 only owners hold them: the
    owners broadcast copies for the gather (the clip must still count each gradient once)."""
    grads = {}
    for name, p in model.named_parameters():
        rec, main = opt.table[p], opt.master(p)
        g = main.grad.clone() if main is not None else torch.zeros(p.shape)
        if rec.owner is not None:
            dist.broadcast(g, src=rec.owner, group=ctx.group(rec.grad_group))
        grads[name] = g
    return gather_full(model, ctx, grads)


def train(model: Decoder, ctx: ParallelContext, tokens: torch.Tensor, zero1: bool = False,
          precision: str = "fp32") -> dict:
    """STEPS optimizer steps on this rank's slice of `tokens` (trainer.train_step, constant lr).
    Returns per-step dp-mean [lm, aux, z, dropped] and the global grad norm before clipping."""
    table = LayoutTable([model], ctx, zero1=zero1)
    opt = build_parallel_optimizer([model], table, LR, WEIGHT_DECAY, eps=ADAM_EPS,
                                   model_dtype=torch.bfloat16 if precision == "bf16" else None)
    per_rank = G // ctx.dp
    local = tokens[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]  # contiguous dp slice
    losses, norms, first_grads = [], [], None
    for step in range(STEPS):
        stats, loads = forward_backward(model, opt, local, precision)
        losses.append(_dp_mean(stats, ctx))
        if step == 0:  # reduced, not yet clipped: Adam hides a uniform gradient scale error, this does not
            first_grads = _gather_grads(model, ctx, opt)
        norms.append(opt.clip(MAX_NORM))
        opt.step()
        update_expert_biases([model], loads)
        opt.zero_grad()
    masters = {name: _master_or_model(opt, p) for name, p in model.named_parameters()}
    final = gather_full(model, ctx, _broadcast_owned(model, ctx, opt, masters))
    return {"losses": torch.stack(losses), "grad_norms": torch.tensor(norms), "first_grads": first_grads,
            "n_owned": len(opt.main), "final": {**final, **buffers(model)}}


def buffers(model: Decoder) -> dict[str, torch.Tensor]:
    """The persistent buffers (the routers' expert biases: replicated state, compared like weights)."""
    params = dict(model.named_parameters())
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n not in params}


def _master_or_model(opt: ParallelOptimizer, p: torch.Tensor) -> torch.Tensor:
    main = opt.master(p)
    return (main if main is not None else p).detach().float().clone()


def _broadcast_owned(model: Decoder, ctx: ParallelContext, opt: ParallelOptimizer, values: dict) -> dict:
    """Under ZeRO-1 a bf16 model's exact float32 weights live on the owners: share them for the gather."""
    for name, p in model.named_parameters():
        rec = opt.table[p]
        if rec.owner is not None:
            dist.broadcast(values[name], src=rec.owner, group=ctx.group(rec.grad_group))
    return values


# ----------------------------------------------------------------------------- gathering shards

def _all_gather_cat(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def gather_full(model: Decoder, ctx: ParallelContext, values: dict | None = None) -> dict[str, torch.Tensor]:
    """name -> full tensor: each parameter's pieces (or of `values`, name -> a tensor shaped like
    the parameter, e.g. its gradient) concatenated over tp and ep as its layout record says."""
    full = {}
    for name, rec in model.layouts().items():
        t = values[name] if values is not None else dict(model.named_parameters())[name].detach()
        if rec.tp_dim is not None and ctx.tp > 1:
            t = _all_gather_cat(t, ctx.tp_group, rec.tp_dim)
        if rec.ep_dim is not None and ctx.ep > 1:
            t = _all_gather_cat(t, ctx.ep_group, rec.ep_dim)
        full[name] = t.clone()
    return full


def max_rel_error(got: dict, want: dict, base: dict | None = None) -> tuple[float, str]:
    """(max over tensors of ||got - want|| / ||want - base||, the worst tensor's name): a relative error
    per tensor (of its update when `base` is the initial weights), for bf16 runs whose elementwise
    rounding differs between layouts; inf on any name/shape mismatch."""
    if set(got) != set(want):
        return float("inf"), f"names differ: {sorted(set(got) ^ set(want))}"
    worst, where = 0.0, ""
    for name, w in want.items():
        ref = w.double() - (base[name].double() if base is not None else 0.0)
        if got[name].shape != w.shape:
            return float("inf"), f"{name}: shape {tuple(got[name].shape)} != {tuple(w.shape)}"
        err = (got[name].double() - w.double()).norm().item() / max(ref.norm().item(), 1e-30)
        if err > worst:
            worst, where = err, name
    return worst, where


def max_param_error(got: dict, want: dict) -> tuple[float, str]:
    """(max |got - want| over all parameters, the worst parameter's name); inf on any name/shape mismatch."""
    if set(got) != set(want):
        return float("inf"), f"names differ: {sorted(set(got) ^ set(want))}"
    worst, where = 0.0, ""
    for name, w in want.items():
        if got[name].shape != w.shape:
            return float("inf"), f"{name}: shape {tuple(got[name].shape)} != {tuple(w.shape)}"
        err = (got[name].double() - w.double()).abs().max().item()
        if err > worst:
            worst, where = err, name
    return worst, where


# ----------------------------------------------------------------------------- reference and workers

def reference(key: str, precision: str = "fp32") -> dict:
    """Single-process run of model `key`: initial and final weights, losses, grad norms."""
    return reference_with(key, precision)


def reference_with(key: str, precision: str = "fp32", **overrides) -> dict:
    """reference(key) with some model fields changed (e.g. another balance-loss scope)."""
    cfg, ctx = replace(model_config(key), **overrides), ParallelContext.single()
    model = build_model(cfg, ctx, seed=0)
    init = {n: t.detach().clone() for n, t in model.state_dict().items()}  # parameters and expert biases
    run = train(model, ctx, global_tokens(cfg.vocab_size), precision=precision)
    return {**run, "init": init}


def run_layout(rank: int, world: int, layout: Layout, ref: dict) -> dict:
    """Build `layout` on this rank, check its initial shards, train, gather, compare to `ref`."""
    t0 = time.perf_counter()
    ctx = ParallelContext.for_testing(rank, world, tp=layout.tp, ep=layout.ep, sequence_parallel=layout.sp,
                                      fold_experts=layout.fold)
    cfg = model_config(layout.model)
    torch.manual_seed(1000 + rank)  # a layout must not depend on the global RNG state
    model = build_model(cfg, ctx, seed=0)
    init_err, _ = max_param_error({**gather_full(model, ctx), **buffers(model)}, ref["init"])
    run = train(model, ctx, global_tokens(cfg.vocab_size), zero1=layout.zero1, precision=layout.precision)
    final, grads = run.pop("final"), run.pop("first_grads")
    if layout.precision == "bf16":  # relative per tensor (bf16 rounding differs elementwise between layouts)
        param_err, worst = max_rel_error(final, ref["final"], ref["init"])
        grad_err, worst_grad = max_rel_error(grads, ref["first_grads"])
    else:
        param_err, worst = max_param_error(final, ref["final"])
        grad_err, worst_grad = max_param_error(grads, ref["first_grads"])
    return {**run, "init_err": init_err, "param_err": param_err, "worst_param": worst,
            "grad_err": grad_err, "worst_grad": worst_grad,
            "coords": tuple(ctx.coords), "seconds": time.perf_counter() - t0}


def run_layouts(rank: int, world: int, layouts: list[Layout], refs: dict) -> dict:
    """Every layout in turn on one spawn (each builds its own ParallelContext and process groups)."""
    return {layout.name: run_layout(rank, world, layout, refs[layout.reference_key]) for layout in layouts}
