"""Benchmark: one full training step of our Decoder (and, with --hf, of HF transformers' model).

    python -m benchmarks.train_step --hf                     # both configs, ours (mixed) vs HF (bf16), cuda
    python -m benchmarks.train_step --configs moe-16x --activation-checkpointing --compile
    python -m benchmarks.train_step --smoke --hf             # CPU, tiny configs, fp32, 2 steps

A step is what train/trainer.py does for one micro-batch: forward (autocast bf16 for "mixed" and
"amp"), the LM loss (MoE aux/z losses injected in backward), backward, global-norm clipping at 1.0,
fused AdamW (lr 3e-4, wd 0.1), zero_grad. "mixed" (our default) is the trainer's bf16 layout: bf16
parameters, float32 gradient buffers and main weights in parallel.optimizer.ParallelOptimizer, the
bf16 model written once per step; with "amp" the fp32 params are the master weights.
HF rows run LlamaForCausalLM / MixtralForCausalLM built from the same shapes (random init, sdpa
attention, output_router_logits=True so Mixtral also trains with its aux loss), through the same
clipping and fused AdamW, with bf16 params by default (--hf-precision).

Columns:
  tok/s       B*S / median step time (median of --steps after --warmup untimed steps)
  MFU (%)     flops_per_token * tok/s / peak, flops_per_token = 6 N_active + 12 L d S (PaLM; from
              train.metrics), peak = --peak-tflops (default: train.metrics.peak_flops, 989 for H100)
  peak mem    torch.cuda.max_memory_allocated during the steps (params, grads, AdamW state,
              activations; the model build is excluded), GiB ('-' on CPU)
  step (ms)   the median step time
Configs (B=8, S=2048): dense-1.1b = LLaMA-style d 2048, 22 layers, GQA 32/4, ffn 5632, vocab 32000;
moe-16x = d 2048, 16 layers, GQA 16/4, 16 experts top-2 (dropless), expert ffn 1408, every layer MoE.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/train_step.py` as a plain script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import (PRECISIONS, autocast, environment, fmt, guarded, markdown_table,  # noqa: E402
                        median_ms, param_dtype, parse_precisions, resolve_device, write_json, write_profile)
from moe.config import ModelConfig  # noqa: E402
from moe.experts import BACKENDS as LAYER_BACKENDS  # noqa: E402
from moe.model import RECOMPUTE, build_model, param_counts  # noqa: E402
from train.metrics import flops_per_token, peak_flops  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402
from parallel.layout import LayoutTable  # noqa: E402
from train.optim import build_optimizer, build_parallel_optimizer, clip_grad_norm_  # noqa: E402

_LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5)
CONFIGS = {
    "dense-1.1b": dict(_LLAMA, vocab_size=32000, max_seq_len=2048, d_model=2048, n_layers=22, n_heads=32,
                       n_kv_heads=4, ffn_dim=5632),
    "moe-16x": dict(_LLAMA, vocab_size=32000, max_seq_len=2048, d_model=2048, n_layers=16, n_heads=16,
                    n_kv_heads=4, n_experts=16, top_k=2, expert_ffn_dim=1408, moe_every=1),
}
SMOKE_CONFIGS = {
    "dense-1.1b": dict(_LLAMA, vocab_size=256, max_seq_len=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_dim=128),
    "moe-16x": dict(_LLAMA, vocab_size=256, max_seq_len=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    n_experts=4, top_k=2, expert_ffn_dim=32, moe_every=1),
}
LR, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 0.1, 1.0


# ---------------------------------------------------------------- models
def build_ours(cfg: ModelConfig, precision: str, device: torch.device, ckpt: bool, compile_: bool,
               recompute: str = "full"):
    """Our Decoder as the trainer builds it: init, optional activation checkpointing (full or
    selective recompute), per-block compile."""
    dtype = torch.float32 if precision == "mixed" else param_dtype(precision)  # "mixed": the optimizer casts
    model = build_model(cfg, device=device).to(dtype).train()
    model.activation_checkpointing, model.recompute = ckpt, recompute
    if compile_:
        for key in list(model.layers):
            model.layers[key] = torch.compile(model.layers[key])

    def loss_fn(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens[:, :-1], tokens[:, 1:]).loss  # aux losses enter through backward

    return model, loss_fn, "ours"


def build_hf(cfg: ModelConfig, precision: str, device: torch.device, ckpt: bool, compile_: bool,
             experts: str | None):
    """HF's LlamaForCausalLM / MixtralForCausalLM with our shapes (moe.hf.config_to_hf), random init,
    sdpa attention; Mixtral returns its router logits so its aux loss is part of the loss."""
    import transformers

    from moe.hf import config_to_hf

    fields = config_to_hf(cfg)
    body = {k: v for k, v in fields.items() if k not in ("architectures", "model_type", "dtype")}
    extra = {"output_router_logits": True} if cfg.n_experts else {}
    hf_cfg = transformers.AutoConfig.for_model(fields["model_type"], **body, **extra)
    kw = {"experts_implementation": experts} if experts else {}
    with torch.device(device):  # initialise on the GPU; built in fp32, then cast (any transformers version)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", **kw)
    model = model.to(device=device, dtype=param_dtype(precision)).train()
    if ckpt:  # renamed in transformers 5; the old name still works on 4.x
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if compile_:
        layers = model.model.layers
        for i in range(len(layers)):
            layers[i] = torch.compile(layers[i])

    def loss_fn(tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[:, :-1]
        return model(input_ids=x, labels=x, use_cache=False).loss  # HF shifts labels itself

    return model, loss_fn, hf_label(model)


def hf_label(model) -> str:
    """'hf LlamaForCausalLM' (+ the experts implementation HF picked for Mixtral)."""
    impl = getattr(model.config, "_experts_implementation", None) if model.config.model_type == "mixtral" else None
    return f"hf {type(model).__name__}" + (f" ({impl} experts)" if impl else "")


# ---------------------------------------------------------------- timing
def train_step_fn(model, loss_fn, tokens: torch.Tensor, precision: str, device: torch.device):
    """forward (autocast for amp/mixed) -> backward -> clip -> fused AdamW step -> zero_grad."""
    if precision == "mixed":
        return mixed_step_fn(model, loss_fn, tokens, device)
    optimizer = build_optimizer(model, LR, WEIGHT_DECAY, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast(precision, device):
            loss = loss_fn(tokens)
        loss.backward()
        clip_grad_norm_([(params, [])], GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def mixed_step_fn(model, loss_fn, tokens: torch.Tensor, device: torch.device):
    """The trainer's bf16 step: ParallelOptimizer over the (float32-built) model, which it holds in
    bf16 with float32 main weights; gradients accumulate in its float32 buffers."""
    table = LayoutTable([model], ParallelContext.single(device))
    optimizer = build_parallel_optimizer([model], table, LR, WEIGHT_DECAY, fused=True,
                                         model_dtype=torch.bfloat16)

    def step() -> None:
        optimizer.prepare(0, last=True)
        with autocast("mixed", device):
            loss = loss_fn(tokens)
        loss.backward()
        optimizer.finish()
        optimizer.clip(GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()

    return step


def measure(build, tokens: torch.Tensor, precision: str, device: torch.device, opts: dict) -> dict:
    """Build one model with `build()` -> (model, loss_fn, label) and time its step. The model and
    optimizer live only in this frame, so they are freed when it returns."""
    model, loss_fn, label = build()
    if device.type == "cuda":  # peak of the steps: params, grads, AdamW state, activations
        torch.cuda.reset_peak_memory_stats(device)
    step = train_step_fn(model, loss_fn, tokens, precision, device)
    ms = median_ms(step, opts["steps"], opts["warmup"], device)
    if opts.get("profile"):
        flags = (f"_ckpt_{opts['recompute']}" if opts["activation_checkpointing"] else "") + \
            ("_compiled" if opts["compile"] else "")
        write_profile(opts["profile"], f"step_{opts['config']}_{label}_{precision}{flags}", step, device)
    result = {"impl": label, "ms": ms, "tokens_per_s": tokens[:, 1:].numel() / (ms * 1e-3),
              "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def run_case(build, label: str, cfg: ModelConfig, precision: str, device: torch.device, opts: dict) -> dict:
    """`measure` one model on random tokens [B, S+1]. OOM and other failures become an 'error'
    entry (under `label`) rather than ending the run; warnings raised meanwhile are kept."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (opts["batch_size"], opts["seq_len"] + 1), generator=gen).to(device)
    result = guarded(lambda: measure(build, tokens, precision, device, opts), device)
    return {"impl": label, "precision": precision, **result}


def model_facts(cfg: ModelConfig, seq_len: int) -> dict:
    """Parameter counts (counted on the meta device, free at any size) and training FLOPs per token."""
    total, active = param_counts(build_model(cfg, device="meta"))
    return {"params": total, "active_params": active,
            "flops_per_token": flops_per_token(active, cfg.n_layers, cfg.n_heads * cfg.dim_head, seq_len)}


def bench_config(name: str, cfg: ModelConfig, device: torch.device, opts: dict) -> dict:
    """Our model at each --precision, then (with --hf) HF's model at --hf-precision."""
    facts = model_facts(cfg, opts["seq_len"])
    opts = {**opts, "config": name}  # names the profile files
    ck, cp = opts["activation_checkpointing"], opts["compile"]
    rows = [run_case(lambda: build_ours(cfg, p, device, ck, cp, opts["recompute"]), "ours", cfg, p, device, opts)
            for p in opts["precisions"]]
    if opts["hf"]:
        p = opts["hf_precision"]
        hf = lambda: build_hf(cfg, p, device, ck, cp, opts["hf_experts"])  # noqa: E731
        rows.append(run_case(hf, "hf", cfg, p, device, opts))
    for row in rows:
        if "tokens_per_s" in row and opts["peak_flops"]:
            row["mfu"] = facts["flops_per_token"] * row["tokens_per_s"] / opts["peak_flops"]
    return {"config": name, **facts, "rows": rows}


# ---------------------------------------------------------------- report
def format_report(results: list[dict], opts: dict) -> str:
    headers = ["config", "impl", "precision", "tok/s", "MFU (%)", "peak mem (GiB)", "step (ms)"]
    table, notes = [], []
    for res in results:
        for row in res["rows"]:
            if "error" in row:
                table.append([res["config"], row["impl"], row["precision"], "error", "-", "-", "-"])
                notes.append(f"- {res['config']}, {row['impl']}: {row['error']}")
                continue
            mfu = 100.0 * row["mfu"] if "mfu" in row else None
            table.append([res["config"], row["impl"], row["precision"], fmt(row["tokens_per_s"]), fmt(mfu),
                          fmt(row.get("peak_mem_gib")), fmt(row["ms"])])
            notes += [f"- {res['config']}, {row['impl']}: {w}" for w in row.get("warnings", [])]
    facts = [f"- {r['config']}: {_count(r['params'])} params, {_count(r['active_params'])} active, "
             f"{_count(r['flops_per_token'])}FLOP/token" for r in results]
    peak = f"{opts['peak_flops'] / 1e12:.0f} TFLOP/s peak" if opts["peak_flops"] else "no known peak: MFU '-'"
    flags = [f for f, on in ((f"activation checkpointing ({opts['recompute']} recompute for ours)",
                              opts["activation_checkpointing"]),
                             ("torch.compile", opts["compile"])) if on]
    title = (f"### Training step, B={opts['batch_size']} S={opts['seq_len']}, {peak}"
             + (f", {' + '.join(flags)}" if flags else ""))
    return "\n".join([title, "", *facts, "", markdown_table(headers, table), *([""] + notes if notes else [])])


def _count(n: float) -> str:
    """1.1e9 -> '1.1 G', 82752 -> '82.8 k'."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{fmt(n / scale)} {unit}"
    return f"{fmt(n)} "


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny configs (d 64, 2 layers, 4 experts), B=2 S=32, fp32, 2 steps")
    p.add_argument("--configs", help=f"comma list of {list(CONFIGS)} (default: both)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 8; smoke 2)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; smoke 32)")
    p.add_argument("--steps", type=int, help="timed steps, median reported (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--precision", help=f"ours: comma list of {list(PRECISIONS)} (default mixed; smoke fp32)")
    p.add_argument("--expert-backend", default="grouped_mm", choices=LAYER_BACKENDS,
                   help="our model.expert_backend (default grouped_mm)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward (both models)")
    p.add_argument("--recompute", default="full", choices=RECOMPUTE,
                   help="ours, with --activation-checkpointing: full blocks or selective (keep GEMM/attention outputs)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (both models)")
    p.add_argument("--hf", action="store_true", help="also time HF transformers' model with the same shapes")
    p.add_argument("--hf-precision", help=f"HF model: one of {list(PRECISIONS)} (default bf16; smoke fp32)")
    p.add_argument("--hf-experts", help="HF experts_implementation for Mixtral, e.g. eager (default: HF's own)")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: train.metrics.peak_flops of the GPU)")
    p.add_argument("--device", help="cuda or cpu (default cuda when available; smoke cpu)")
    p.add_argument("--json", metavar="OUT", help="also write every number to OUT")
    p.add_argument("--profile", metavar="DIR", help="also write a torch.profiler table per model to DIR/<case>.txt "
                   "(self device time by operator, 3 steps)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[dict[str, ModelConfig], dict]:
    """Fill the defaults (GPU or smoke), build the model configs and validate every option."""
    smoke = args.smoke
    table = SMOKE_CONFIGS if smoke else CONFIGS
    names = [c.strip() for c in (args.configs or ",".join(table)).split(",") if c.strip()]
    bad = [n for n in names if n not in table]
    if bad or not names:
        raise ValueError(f"--configs {args.configs!r}: each entry must be one of {list(table)}")
    pick = lambda value, gpu, tiny: value if value is not None else tiny if smoke else gpu  # noqa: E731
    opts = dict(batch_size=pick(args.batch_size, 8, 2), seq_len=pick(args.seq_len, 2048, 32),
                steps=pick(args.steps, 10, 2), warmup=pick(args.warmup, 3, 1),
                precisions=parse_precisions(pick(args.precision, "mixed", "fp32")),
                hf_precision=pick(args.hf_precision, "bf16", "fp32"), hf=args.hf, hf_experts=args.hf_experts,
                activation_checkpointing=args.activation_checkpointing, recompute=args.recompute,
                compile=args.compile, profile=args.profile,
                device=resolve_device(args.device or ("cpu" if smoke else None)))
    if len(parse_precisions(opts["hf_precision"])) != 1:
        raise ValueError(f"--hf-precision {opts['hf_precision']!r} must be one of {list(PRECISIONS)}")
    for key in ("batch_size", "seq_len", "steps"):
        if opts[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} ({opts[key]}) must be >= 1")
    if opts["warmup"] < 0:
        raise ValueError(f"--warmup ({opts['warmup']}) must be >= 0")
    if args.peak_tflops is not None and not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        raise ValueError(f"--peak-tflops ({args.peak_tflops}) must be a positive number, e.g. 989 for an H100")
    opts["peak_flops"] = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(opts["device"])
    cfgs = {n: ModelConfig(**{**table[n], "max_seq_len": max(opts["seq_len"], table[n]["max_seq_len"]),
                              "expert_backend": args.expert_backend}) for n in names}
    return cfgs, opts


def main(argv: list[str] | None = None) -> dict:
    """Time every config (ours, then HF with --hf) and print one markdown table; returns the results."""
    args = parse_args(argv)
    try:
        cfgs, opts = resolve(args)
        if opts["hf"]:
            import transformers  # noqa: F401  - fail here, in one line, rather than mid-run
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    device = opts["device"]
    results = [bench_config(name, cfg, device, opts) for name, cfg in cfgs.items()]
    out = {**environment(device), **{k: v for k, v in opts.items() if k != "device"}, "results": results}
    print(f"Training step on {out['device']} (torch {out['torch']}), median of {opts['steps']} after "
          f"{opts['warmup']} warmup\n")
    print(format_report(results, opts))
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
