"""Benchmark: forward + backward of our MoELayer per expert backend, against two references.

    python -m benchmarks.moe_layer                          # the issue's shapes, amp and bf16, on cuda
    python -m benchmarks.moe_layer --backends grouped_mm,padded --precision bf16 --json out/moe.json
    python -m benchmarks.moe_layer --smoke                  # CPU, T=64 d=32 f=16 E=4 k=2, fp32, 2 iterations

Each cell is TFLOP/s of the *active expert* FLOPs only (the router, permutation and combine are
timed but not counted): a SwiGLU expert does 3 matmuls (gate, up, down) of 2*d*f FLOPs per routed
token, so forward = 2*T*k*3*d*f and forward + backward = 3x that (backward computes the input and
weight gradients, 2 matmuls per forward matmul).

Columns:
  grouped_mm, padded, loop, megablocks   our MoELayer (router + permute + experts + unpermute) with
                                         that expert backend (megablocks only when it imports)
  naive loop   a reference written here: the same router, then per expert `index_select` its tokens,
               three separate matmuls and an `index_add_` back - no sorting, no grouped GEMM (the
               shape of HF Mixtral's eager expert loop); same weights and routing as our layer
  dense limit  the same FLOPs as ONE dense GEMM chain with no routing at all:
               x [T*k, d] @ W1 [d, 2f] -> silu(gate) * up -> @ W2 [f, d], forward + backward
               (dX, dW1, dW2). It is what a perfect grouped GEMM would reach if all experts were one
               expert with T*k tokens and routing were free: the practical ceiling at these shapes.
  best / limit the fastest of our backends as a percentage of the dense limit
A '*' after a number means the case raised a warning (listed under the table), e.g. a backend
falling back to another one. Precisions (each its own table): amp = fp32 params + autocast(bf16),
with fp32 inputs as in our trainer's residual stream; bf16 = bf16 params and inputs; fp32 (smoke).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/moe_layer.py` as a plain script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import (PRECISIONS, autocast, environment, fmt, guarded, markdown_table,  # noqa: E402
                        median_ms, param_dtype, parse_precisions, resolve_device, write_json, write_profile)
from moe.config import ModelConfig  # noqa: E402
from moe.experts import megablocks_gmm  # noqa: E402
from moe.moe_layer import MoELayer  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402

LAYER_BACKENDS = ("grouped_mm", "padded", "loop", "megablocks")
REFERENCES = ("naive loop", "dense limit")


@dataclass(frozen=True)
class Shape:
    T: int  # tokens
    d: int  # model width
    f: int  # expert ffn width
    E: int  # experts
    k: int  # experts per token

    def label(self) -> str:
        return f"T={self.T} d={self.d} f={self.f} E={self.E} k={self.k}"

    def expert_flops(self) -> float:
        """Forward + backward FLOPs of the active experts: 3 * (2 * T*k * 3 * d * f)."""
        return 3.0 * 2.0 * self.T * self.k * 3.0 * self.d * self.f


ISSUE_SHAPES = (Shape(16384, 2048, 1408, 16, 2), Shape(16384, 4096, 4096, 16, 2), Shape(8192, 4096, 14336, 8, 2))
SMOKE_SHAPE = Shape(64, 32, 16, 4, 2)


def parse_shape(text: str) -> Shape:
    """'TxDxFxExK', e.g. 16384x2048x1408x16x2."""
    parts = text.lower().split("x")
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shapes entry {text!r} must be TxDxFxExK with positive integers, e.g. 16384x2048x1408x16x2")
    shape = Shape(*map(int, parts))
    if shape.k > shape.E:
        raise ValueError(f"--shapes entry {text!r}: k ({shape.k}) must be <= E ({shape.E})")
    return shape


def available_backends() -> list[str]:
    """Our expert backends that can run here (megablocks only when its CUDA build imports)."""
    return [b for b in LAYER_BACKENDS if b != "megablocks" or megablocks_gmm() is not None]


def parse_backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in LAYER_BACKENDS]
    if bad or not names:
        raise ValueError(f"--backends {text!r}: each entry must be one of {list(LAYER_BACKENDS)}")
    if "megablocks" in names and megablocks_gmm() is None:
        raise ValueError("--backends megablocks: megablocks does not import here (CUDA source build); drop it")
    return names


# ---------------------------------------------------------------- the modules under test
def build_layer(shape: Shape, backend: str, precision: str, device: torch.device, seed: int) -> MoELayer:
    """Our MoELayer (dropless, SwiGLU, no shared expert) with N(0, 0.02) weights drawn from `seed`,
    so every backend (and the naive reference built from it) routes the same tokens the same way."""
    cfg = ModelConfig(d_model=shape.d, n_heads=1, n_layers=1, n_experts=shape.E, top_k=shape.k,
                      expert_ffn_dim=shape.f, mlp="swiglu", expert_backend=backend)
    with torch.device(device):
        layer = MoELayer(cfg, ParallelContext.single(device))
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in (layer.router.weight, layer.experts.w_in, layer.experts.w_out):
            p.normal_(0.0, 0.02, generator=gen)
    return layer.to(param_dtype(precision))


class NaiveMoE(nn.Module):
    """The unsorted per-expert loop: route (fp32 softmax, top-k, renormalise, as our router), then
    for each expert gather its tokens with index_select, y_e = (silu(x W_gate) * (x W_up)) W_down,
    and scatter-add w * y_e back. Gate and up are separate weights, as in HF Mixtral."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        f = layer.experts.w_out.shape[1]
        self.top_k = layer.cfg.top_k
        self.router = nn.Parameter(layer.router.weight.detach().clone())        # [E, d]
        self.w_gate = nn.Parameter(layer.experts.w_in.detach()[..., :f].clone())  # [E, d, f]
        self.w_up = nn.Parameter(layer.experts.w_in.detach()[..., f:].clone())    # [E, d, f]
        self.w_down = nn.Parameter(layer.experts.w_out.detach().clone())          # [E, f, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x.float(), self.router.float()), dim=-1)  # [T, E], as TopKRouter
        weights, experts = torch.topk(probs, self.top_k, dim=-1)         # [T, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.w_gate.shape[0]):
            token, slot = torch.where(experts == e)  # tokens routed to e (host sync, as in HF)
            xe = x.index_select(0, token)            # [n_e, d]
            ye = (F.silu(xe @ self.w_gate[e]) * (xe @ self.w_up[e])) @ self.w_down[e]
            out.index_add_(0, token, (ye * weights[token, slot, None]).to(out.dtype))
        return out


class DenseChain(nn.Module):
    """The dense-GEMM-chain limit: x [T*k, d] @ W1 [d, 2f] -> silu(gate) * up -> @ W2 [f, d].
    Exactly the active expert FLOPs, as one big GEMM pair: no routing, permutation or imbalance."""

    def __init__(self, shape: Shape, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(shape.d, 2 * shape.f, generator=gen) * 0.02)
        self.w2 = nn.Parameter(torch.randn(shape.f, shape.d, generator=gen) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w1).chunk(2, dim=-1)  # [T*k, f] each
        return (F.silu(gate) * up) @ self.w2       # [T*k, d]


# ---------------------------------------------------------------- timing
def step_fn(module: nn.Module, x: torch.Tensor, precision: str, device: torch.device):
    """One forward + backward with a fixed random output gradient; grads reset to None each call,
    as the trainer's zero_grad(set_to_none=True) does. Returns the closure to time."""
    params = [p for p in module.parameters()] + [x]
    grad = torch.randn(x.shape, device=device, generator=torch.Generator(device).manual_seed(1))
    grads: dict[torch.dtype, torch.Tensor] = {}  # the output gradient in the output's dtype

    def step() -> None:
        for p in params:
            p.grad = None
        with autocast(precision, device):
            y = module(x)
        y = y[0] if isinstance(y, tuple) else y  # MoELayer returns (y, stats)
        if y.dtype not in grads:  # cast once, not inside every timed step
            grads[y.dtype] = grad.to(y.dtype)
        y.backward(grads[y.dtype])

    return step


def time_case(make, precision: str, device: torch.device, flops: float, iters: int, warmup: int,
              profile: tuple[str, str] | None = None) -> dict:
    """Build one case with `make()` -> (module, input) and time it (see benchmarks.guarded).
    `profile` = (directory, name): also write the case's profiler table there."""

    def measure() -> dict:
        step = step_fn(*make(), precision, device)
        ms = median_ms(step, iters, warmup, device)
        if profile:
            write_profile(*profile, step, device)
        return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}

    return guarded(measure, device)  # the module and its grads die with the step closure


def bench_shape(shape: Shape, precision: str, backends: list[str], device: torch.device, iters: int,
                warmup: int, seed: int, profile: str | None = None) -> dict[str, dict]:
    """All cases of one (shape, precision): our backends, the naive loop, the dense limit.
    With `profile` (a directory) each case also writes its profiler table there."""
    flops = shape.expert_flops()
    x_dtype = torch.bfloat16 if precision in ("bf16", "mixed") else torch.float32  # amp: fp32 stream

    def tokens(rows: int):
        gen = torch.Generator(device).manual_seed(seed + 1)
        return torch.randn(rows, shape.d, device=device, generator=gen, dtype=x_dtype).requires_grad_()

    def where(name: str) -> tuple[str, str] | None:
        return (profile, f"moe_{precision}_{shape.T}x{shape.d}x{shape.f}x{shape.E}x{shape.k}_{name}") if profile else None

    cases = {}
    for backend in backends:
        cases[backend] = time_case(lambda: (build_layer(shape, backend, precision, device, seed), tokens(shape.T)),
                                   precision, device, flops, iters, warmup, where(backend))

    def naive():
        return NaiveMoE(build_layer(shape, "loop", "fp32", device, seed)).to(param_dtype(precision)), tokens(shape.T)

    def dense():
        return DenseChain(shape, seed).to(device, param_dtype(precision)), tokens(shape.T * shape.k)

    cases["naive loop"] = time_case(naive, precision, device, flops, iters, warmup)
    cases["dense limit"] = time_case(dense, precision, device, flops, iters, warmup, where("dense"))
    return cases


# ---------------------------------------------------------------- report
def _cell(case: dict) -> str:
    if "error" in case:
        return "error"
    return fmt(case["tflops"]) + ("*" if case.get("warnings") else "")


def format_table(runs: list[dict], precision: str, backends: list[str]) -> str:
    """Rows = shapes, columns = our backends + references + best / limit (%), for one precision."""
    headers = ["shape", *backends, *REFERENCES, "best / limit (%)"]
    rows, notes = [], []
    for run in (r for r in runs if r["precision"] == precision):
        cases = run["cases"]
        ours = [cases[b]["tflops"] for b in backends if "tflops" in cases[b]]
        limit = cases["dense limit"].get("tflops")
        best = fmt(100.0 * max(ours) / limit) if ours and limit else "-"
        rows.append([run["shape_label"], *(_cell(cases[c]) for c in [*backends, *REFERENCES]), best])
        for name, case in cases.items():
            notes += [f"- {run['shape_label']}, {name}: {w}" for w in case.get("warnings", [])]
            notes += [f"- {run['shape_label']}, {name}: {case['error']}"] if "error" in case else []
    title = f"### {precision}: {PRECISIONS[precision]} - TFLOP/s of active expert FLOPs, forward + backward"
    return "\n".join([title, "", markdown_table(headers, rows), *([""] + notes if notes else [])])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, T=64 d=32 f=16 E=4 k=2, fp32, 2 iterations")
    p.add_argument("--shapes", nargs="+", help="TxDxFxExK entries (default: the issue's three shapes)")
    p.add_argument("--iters", type=int, help="timed iterations, median reported (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default 5; smoke 1)")
    p.add_argument("--backends", help=f"comma list of {list(LAYER_BACKENDS)} (default: all that import)")
    p.add_argument("--precision", help=f"comma list of {list(PRECISIONS)} (default amp,bf16; smoke fp32)")
    p.add_argument("--device", help="cuda or cpu (default cuda when available; smoke cpu)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    p.add_argument("--json", metavar="OUT", help="also write every number (ms, TFLOP/s, warnings) to OUT")
    p.add_argument("--profile", metavar="DIR", help="also write a torch.profiler table per case (not the naive "
                   "loop) to DIR/<case>.txt: self device time by operator")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    """Fill the defaults (GPU or smoke) and validate every option; one-line ValueError on bad input."""
    smoke = args.smoke
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else [SMOKE_SHAPE] if smoke else list(ISSUE_SHAPES)
    iters = args.iters if args.iters is not None else 2 if smoke else 20
    warmup = args.warmup if args.warmup is not None else 1 if smoke else 5
    if iters < 1 or warmup < 0:
        raise ValueError(f"--iters ({iters}) must be >= 1 and --warmup ({warmup}) >= 0")
    return dict(shapes=shapes, iters=iters, warmup=warmup,
                backends=parse_backends(args.backends) if args.backends else available_backends(),
                precisions=parse_precisions(args.precision or ("fp32" if smoke else "amp,bf16")),
                device=resolve_device(args.device or ("cpu" if smoke else None)))


def main(argv: list[str] | None = None) -> dict:
    """Run every (precision, shape) and print one markdown table per precision; returns the results."""
    args = parse_args(argv)
    try:
        opts = resolve(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    device = opts["device"]
    runs = []
    for precision in opts["precisions"]:
        for shape in opts["shapes"]:
            cases = bench_shape(shape, precision, opts["backends"], device, opts["iters"], opts["warmup"], args.seed,
                                args.profile)
            runs.append({"precision": precision, "shape": asdict(shape), "shape_label": shape.label(),
                         "expert_flops": shape.expert_flops(), "cases": cases})
    result = {**environment(device), "iters": opts["iters"], "warmup": opts["warmup"], "runs": runs}
    print(f"MoE layer forward + backward on {result['device']} (torch {result['torch']}), "
          f"median of {opts['iters']} after {opts['warmup']} warmup\n")
    print("\n\n".join(format_table(runs, p, opts["backends"]) for p in opts["precisions"]))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
