"""AdamW parameter groups and hyperparameter checks, the warmup + decay learning-rate schedule.

The pieces the trainer composes once per step:

    lr = schedule.lr_at(step); apply_lr(optimizer.adamw, lr)
    grad_norm = optimizer.clip(max_norm)                # same value on every rank
    if math.isfinite(grad_norm): optimizer.step()

`build_optimizer` makes a plain torch AdamW over a module (tests, single-device use);
`build_parallel_optimizer` makes parallel.optimizer.ParallelOptimizer (main parameters, float32
gradient buffers, ZeRO-1) with the same groups and checks. Gradient clipping across shards is
parallel.clip.clip_grad_norm_, re-exported here.
"""

import math
from dataclasses import dataclass

import torch

from parallel.clip import clip_grad_norm_  # noqa: F401  (part of this module's API)
from parallel.layout import LayoutTable
from parallel.optimizer import ParallelOptimizer

SCHEDULE_KINDS = ("cosine", "linear", "constant")
_FUSED_DEVICE_TYPES = ("cuda", "cpu")


# ----------------------------------------------------------------------------- parameter groups


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable params into [decay, no_decay] AdamW groups, in `named_parameters` order.

    Why: weight decay pulls weights towards 0, which is right for matmul weights and embeddings
    (>= 2-D, including expert weights [E, d, f]) but hurts biases and norm gains (1-D), whose
    natural value is not 0 (nanoGPT / GPT-3 convention: decay iff `p.dim() >= 2`).
    Frozen params (requires_grad=False) are left out; tied params appear once (named_parameters
    de-duplicates). Both groups are always returned, possibly empty, so group 0 is always "decay"
    and group 1 "no_decay". Each group carries "names" for logging and tests.
    """
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay ({weight_decay}) must be a finite number >= 0: use e.g. 0.1, or 0.0 to disable")
    decay = {"params": [], "names": [], "weight_decay": float(weight_decay)}
    no_decay = {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = decay if p.dim() >= 2 else no_decay
        group["params"].append(p)
        group["names"].append(name)
    if not decay["params"] and not no_decay["params"]:
        raise ValueError("model has no trainable parameters (all have requires_grad=False): unfreeze some before building the optimizer")
    return [decay, no_decay]


def _resolve_fused(params: list[torch.Tensor], fused: bool | None) -> bool:
    """Pick the fused AdamW kernel when every param can use it.

    fused=None: fused when all params are floating point on CUDA or all on CPU. The fused CPU
    kernel (torch >= 2.4) was checked on torch 2.13 against the foreach path: 20 steps of a small
    MLP agree to 1.2e-7 in fp32 and exactly in bf16 (tests/test_optim.py keeps checking it).
    fused=True with an unsupported param raises here, with the param's device and dtype.
    """
    ok = [p.is_floating_point() and p.device.type in _FUSED_DEVICE_TYPES for p in params]
    one_device_type = len({p.device.type for p in params}) <= 1
    if fused is None:
        return all(ok) and one_device_type
    if fused and not all(ok):
        bad = params[ok.index(False)]
        raise ValueError(
            f"fused=True needs floating-point params on {'/'.join(_FUSED_DEVICE_TYPES)}, got {bad.dtype} on {bad.device}: "
            "pass fused=None (auto) or fused=False"
        )
    return bool(fused)


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`; fused kernel where possible, else foreach.

    Update per param (decoupled decay, Loshchilov & Hutter):
        p <- p - lr * wd_group * p - lr * m_hat / (sqrt(v_hat) + eps)
    `lr` here is only the initial value; the trainer overwrites it each step with `apply_lr`.
    """
    _check_hyper(lr, betas, eps)
    groups = param_groups(model, weight_decay)
    use_fused = _resolve_fused([p for g in groups for p in g["params"]], fused)
    kernel = {"fused": True} if use_fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kernel)


def _check_hyper(lr: float, betas: tuple[float, float], eps: float) -> None:
    if not (lr > 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr ({lr}) must be a finite number > 0: use e.g. 3e-4")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas ({betas}) must be two numbers in [0, 1): use e.g. (0.9, 0.95)")
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps ({eps}) must be a finite number > 0: use e.g. 1e-8")


def build_parallel_optimizer(chunks: list[torch.nn.Module], table: LayoutTable, lr: float,
                             weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                             eps: float = 1e-8, fused: bool | None = None,
                             model_dtype: torch.dtype | None = None, bucket_mb: float = 25.0) -> ParallelOptimizer:
    """AdamW (same groups and checks as build_optimizer) over the main parameters of this rank's
    pipeline chunks, laid out by `table` (ZeRO-1 owners included). model_dtype=torch.bfloat16
    holds the model in bf16 with float32 main weights (see parallel/optimizer.py)."""
    _check_hyper(lr, betas, eps)
    groups = param_groups(torch.nn.ModuleList(chunks), weight_decay)
    chunk_params = [[p for p in chunk.parameters() if p.requires_grad] for chunk in chunks]
    use_fused = _resolve_fused([p for ps in chunk_params for p in ps], fused)
    return ParallelOptimizer(groups, chunk_params, table, lr=lr, betas=betas, eps=eps, fused=use_fused,
                             model_dtype=model_dtype, bucket_mb=bucket_mb)


# ----------------------------------------------------------------------------- learning-rate schedule


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup, then cosine/linear/no decay to `min_lr`, then hold; a pure function of step.

    `step` is 0-based: lr_at(0) is the lr of the first optimizer step. With W = warmup_steps,
    D = decay_steps and p = (step - W) / (D - W):
        step <  W:       lr * (step + 1) / W          (Megatron/nanoGPT style: never 0, reaches lr at W-1)
        W <= step <  D:  cosine   min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * p))
                         linear   lr - (lr - min_lr) * p
                         constant lr                   (min_lr unused)
        step >= D:       min_lr (constant: lr)
    So lr is reached twice (steps W-1 and W) and min_lr first at step D; W == D jumps from the
    warmup straight to min_lr. Because lr is a function of step only,
    resuming needs no schedule state: the checkpoint's step is enough (no state_dict).
    """

    kind: str
    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int = 0

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind {self.kind!r} is unknown: choose one of {', '.join(SCHEDULE_KINDS)}")
        if not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise ValueError(f"lr ({self.lr}) must be a finite number > 0: use e.g. 3e-4")
        if not (0.0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr ({self.min_lr}) must be in [0, lr ({self.lr})]: use e.g. min_lr = lr / 10")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be >= 0")
        if self.warmup_steps > self.decay_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be <= decay_steps ({self.decay_steps}): "
                "decay_steps counts from step 0 and includes the warmup"
            )

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based optimizer step `step` (formula in the class docstring)."""
        if step < 0:
            raise ValueError(f"step ({step}) must be >= 0")
        W, D = self.warmup_steps, self.decay_steps
        if step < W:
            return self.lr * (step + 1) / W
        if self.kind == "constant":
            return self.lr
        if step >= D:
            return self.min_lr
        progress = (step - W) / (D - W)  # in [0, 1): D > W here
        if self.kind == "cosine":
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        return self.lr - (self.lr - self.min_lr) * progress


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set `lr` on every param group (the schedule owns the lr; groups differ only in decay)."""
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr ({lr}) must be a finite number >= 0: check the schedule")
    for group in optimizer.param_groups:
        group["lr"] = lr
