"""GPU benchmarks that also run on CPU in `--smoke` mode, so the test suite keeps them working.

    python -m benchmarks.moe_layer  [--smoke]   MoE layer forward + backward per expert backend
    python -m benchmarks.train_step [--smoke]   full training step of our model (and HF's, --hf)
    python -m benchmarks.balance_prepass [--smoke]  the global_batch balance loss's pre-pass cost

This module holds what both scripts share: device and precision handling, the timer (median of N
timed iterations after warmup, CUDA events on a GPU) and the markdown table printer. Figures are
only meaningful on a GPU; smoke mode checks that the code paths run and the tables are well formed.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

# precision name -> what it means for parameters, inputs and the forward pass
PRECISIONS = {
    "mixed": "bf16 params, float32 main weights and gradient accumulation in the optimizer, autocast(bf16) "
             "(what our trainer does with training.precision=bf16)",
    "amp": "fp32 params + autocast(bf16) (float32 weights cast to bf16 in the forward)",
    "bf16": "bf16 params and activations, no autocast (no fp32 master weights)",
    "fp32": "fp32 params and activations (CPU smoke mode)",
}


def resolve_device(name: str | None) -> torch.device:
    """`None` = cuda when available, else cpu. Asking for cuda without a GPU is a one-line error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible here; use --device cpu (or --smoke)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {name}: only cuda and cpu are supported")
    return device


def parse_precisions(text: str) -> list[str]:
    """Comma list of precision names, e.g. "amp,bf16"."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PRECISIONS]
    if bad or not names:
        raise ValueError(f"--precision {text!r}: each entry must be one of {list(PRECISIONS)}")
    return names


def param_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision in ("bf16", "mixed") else torch.float32


def autocast(precision: str, device: torch.device):
    """The forward-pass context: autocast to bf16 for "amp" and "mixed", nothing otherwise."""
    if precision in ("amp", "mixed"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn` in milliseconds over `iters` timed calls after `warmup` untimed ones.

    On CUDA each call is bracketed by CUDA events (device time between the two records, so host
    launch overhead counts only where it stalls the GPU) and the events are read after one final
    synchronize. On CPU, perf_counter around each call. The median resists stragglers (allocator
    growth, clock changes) better than the mean.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters ({iters}) must be >= 1 and warmup ({warmup}) >= 0")
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def free_memory(device: torch.device) -> None:
    """Return cached blocks between cases so one case's peak does not shape the next."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(measure: Callable[[], dict], device: torch.device) -> dict:
    """Run one benchmark case. Failures (OOM, an unsupported dtype) become an 'error' entry rather
    than ending the whole run; warnings raised meanwhile are kept under 'warnings'."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = measure()
        except (RuntimeError, ValueError, NotImplementedError) as e:
            result = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
            print(f"# error: {result['error']}", file=sys.stderr)
    notes = sorted({(str(w.message).splitlines() or [""])[0] for w in caught})
    if notes:
        result["warnings"] = notes
    free_memory(device)
    return result


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with `digits` significant digits; '-' for a missing value."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (one header row, one separator, then the rows)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    """What produced the numbers: device name, torch and CUDA versions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}


def profile_table(fn: Callable[[], None], device: torch.device, steps: int = 3, row_limit: int = 30) -> str:
    """Run `fn` `steps` times under torch.profiler (after one untimed call) and return the operator
    table sorted by self device time (self CPU time on CPU): where the time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{steps} steps\n" + prof.key_averages().table(sort_by=key, row_limit=row_limit, max_name_column_width=70)


def write_profile(directory: str | None, name: str, fn: Callable[[], None], device: torch.device) -> None:
    """With --profile DIR, write profile_table(fn) to DIR/<name>.txt (name made file-safe)."""
    if not directory:
        return
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"{safe}.txt").write_text(profile_table(fn, device) + "\n")


def write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
