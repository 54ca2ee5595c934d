"""Step metrics -> console line, TensorBoard (<run_dir>/tb/) and <run_dir>/metrics.jsonl.

Only the logging rank writes. Every step appends one JSON object; the same scalars go to TensorBoard,
plus per-MoE-layer expert-load max/min (as a multiple of the balanced load) and tokens-per-expert
histograms.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (FLOP/s) used for MFU; unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
              "A100": 312e12, "A800": 312e12, "L40S": 362e12, "B200": 2250e12, "GH200": 989e12}  # first match wins


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def flops_per_token(active_params: int, n_layers: int, d_attn: int, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (PaLM appendix B): 6 N_active + 12 L d S, the
    second term being attention scores and values (d = heads x head dim)."""
    return 6.0 * active_params + 12.0 * n_layers * d_attn * seq_len


def expert_load(tokens_per_expert: torch.Tensor) -> tuple[float, float]:
    """(max, min) expert load as a multiple of the perfectly balanced load (1.0 = balanced)."""
    t = tokens_per_expert.float()
    mean = t.mean().clamp(min=1e-9)
    return float(t.max() / mean), float(t.min() / mean)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, histograms: bool = True):
        self.enabled = enabled
        self.histograms = histograms
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, scalars: dict[str, float | None], loads: dict[int, torch.Tensor] | None = None,
            prefix: str = "train") -> None:
        """One JSON line {"step", **scalars, per-layer load max/min}; the same scalars to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, **scalars}
        for layer, counts in (loads or {}).items():
            hi, lo = expert_load(counts)
            record[f"moe/layer{layer}/load_max"] = hi
            record[f"moe/layer{layer}/load_min"] = lo
        record = {k: _clean(v) for k, v in record.items()}
        if prefix == "train":
            self.jsonl.write(json.dumps(record) + "\n")
        else:
            self.jsonl.write(json.dumps({"step": step, "split": prefix, **{k: v for k, v in record.items()
                                                                           if k != "step"}}) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}" if not k.startswith("moe/") else k, v, step)
            if self.histograms:
                for layer, counts in (loads or {}).items():
                    self._expert_histogram(layer, counts, step)

    def log_histograms(self, step: int, values: dict[str, torch.Tensor]) -> None:
        """A TensorBoard histogram of each tensor's values under its tag (e.g. a layer's expert
        biases: how they spread over the experts); nothing without TensorBoard or histograms."""
        if not self.enabled or self.writer is None or not self.histograms:
            return
        for tag, t in values.items():
            self.writer.add_histogram(tag, t.detach().double().cpu(), step)

    def _expert_histogram(self, layer: int, counts: torch.Tensor, step: int) -> None:
        """Tokens per expert as a histogram over expert ids (bucket e has height counts[e])."""
        ids = torch.arange(counts.numel(), dtype=torch.float64)
        self.writer.add_histogram_raw(
            f"moe/layer{layer}/tokens_per_expert", min=0, max=counts.numel() - 1, num=int(counts.sum()),
            sum=float((ids * counts.double()).sum()), sum_squares=float((ids * ids * counts.double()).sum()),
            bucket_limits=(ids + 0.5).tolist(), bucket_counts=counts.double().tolist(), global_step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class Throughput:
    """Tokens/s and ETA over the last logging window."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> tuple[float, float]:
        """(tokens per second, seconds elapsed) since the last call; resets the window."""
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        rate = self.tokens / dt
        self.t0, self.tokens = now, 0
        return rate, dt


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
