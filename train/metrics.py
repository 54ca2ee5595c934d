"""Step metrics -> console line, TensorBoard (<run_dir>/tb/) and <run_dir>/metrics.jsonl.

Only the logging rank writes. Every step appends one JSON object; the same scalars go to TensorBoard,
plus per-MoE-layer expert-load figures (train/expert_load.py: max and min as a multiple of the fair
share, coefficient of variation, experts under half their share, dropped fraction in capacity mode;
each TensorBoard tag carries its description), tokens-per-expert histograms, and every
`image_interval` steps one picture of all MoE layers x experts over the steps since the last one.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .expert_load import DESCRIPTIONS, image_summary, load_image, load_stats, scalar_summary

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


def flops_per_token(matmul_params: int, n_layers: int, d_attn: int, seq_len: int) -> float:
    """Training FLOPs per token that run as matrix multiplies, forward + backward (PaLM appendix B,
    matmuls only): 6 N + 12 L d S.

    6 N: N = the active matmul parameters (moe.model.matmul_params), each doing 2 FLOPs per token
    in forward and 4 in backward (input and weight gradients). The input-embedding lookup is a
    gather and norms, biases, activations and softmax are elementwise: none is counted. A tied
    embedding counts once, as the LM head; experts count top_k / n_experts of their weights.
    12 L d S: attention scores q k^T and the weighted sum of values, 2 d S FLOPs each per token and
    layer in forward (d = heads x head dim, S the sequence), x 3 with backward; causal masking is
    not discounted (PaLM, torchtitan). MFU = this x tokens/s / the device's dense bf16 peak."""
    return 6.0 * matmul_params + 12.0 * n_layers * d_attn * seq_len


def model_flops_per_token(cfg, seq_len: int, model=None) -> float:
    """flops_per_token of the whole model of ModelConfig `cfg` at sequence length `seq_len`,
    the same for every layout (its matmul parameters are counted on the meta device, free;
    `model`: that whole model when the caller has built it already)."""
    from moe.model import build_model, matmul_params

    n = matmul_params(model if model is not None else build_model(cfg, device="meta"))
    return flops_per_token(n, cfg.n_layers, cfg.n_heads * cfg.dim_head, seq_len)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 histograms: bool = True, purge_step: int | None = None, image_interval: int = 0,
                 top_k: int | None = None):
        """purge_step: a resumed run's first step; TensorBoard hides the events an earlier attempt
        logged at and after it, so resumed curves never overlap (train/rundir.py)."""
        self.enabled = enabled
        self.histograms = histograms
        self.image_interval, self.top_k = image_interval, top_k  # 0 = no expert-load pictures
        self._window: dict[int, torch.Tensor] = {}  # tokens per expert since the last picture
        self._described: set[str] = set()  # tags whose description TensorBoard already has
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, scalars: dict[str, float | None], loads: dict[int, torch.Tensor] | None = None,
            prefix: str = "train", dropped: dict[int, float] | None = None) -> None:
        """One JSON line {"step", **scalars, per-layer load figures (and `dropped` fractions)}; the
        same scalars to TensorBoard, and the expert-load picture when a window ends."""
        if not self.enabled:
            return
        record = {"step": step, **scalars}
        for layer, counts in (loads or {}).items():
            record.update({f"moe/layer{layer}/{k}": v for k, v in load_stats(counts).items()})
        for layer, fraction in (dropped or {}).items():
            record[f"moe/layer{layer}/dropped_fraction"] = fraction
        record = {k: _clean(v) for k, v in record.items()}
        if prefix == "train":
            self.jsonl.write(json.dumps(record) + "\n")
        else:
            self.jsonl.write(json.dumps({"step": step, "split": prefix, **{k: v for k, v in record.items()
                                                                           if k != "step"}}) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._add_scalar(f"{prefix}/{k}" if not k.startswith("moe/") else k, v, step)
            if self.histograms:
                for layer, counts in (loads or {}).items():
                    self._expert_histogram(layer, counts, step)
            self._expert_picture(step, loads or {})

    def _add_scalar(self, tag: str, value: float, step: int) -> None:
        """add_scalar, except that a per-layer MoE tag (moe/layerN/<figure>) with a description
        (DESCRIPTIONS) gets it with its first value, so TensorBoard shows what the number means."""
        per_layer = tag.startswith("moe/layer")
        known = tag not in self._described and per_layer
        description = DESCRIPTIONS.get(tag.rsplit("/", 1)[-1]) if known else None
        if description is None:
            self.writer.add_scalar(tag, value, step)
            return
        self.writer._get_file_writer().add_summary(scalar_summary(tag, value, description), step)
        self._described.add(tag)

    def _expert_picture(self, step: int, loads: dict[int, torch.Tensor]) -> None:
        """Sum the tokens per expert over the window; at its end, one layers x experts image."""
        if not self.image_interval or not loads:
            return
        for layer, counts in loads.items():
            self._window[layer] = self._window.get(layer, 0) + counts.detach().cpu().long()
        if step % self.image_interval == 0:
            rgb = load_image(self._window, step, self.top_k)
            self.writer._get_file_writer().add_summary(image_summary("moe/expert_load", rgb), step)
            self._window = {}

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
