"""Gradient clipping by the global L2 norm of a gradient spread over many ranks.

`buckets` is how the caller says which process groups hold the *other* pieces of each set of
tensors, so that every parameter is counted exactly once in the global norm (see
`clip_grad_norm_`; parallel/data.py `norm_buckets` builds them from the layout records). This module
knows nothing about models; it takes tensors with `.grad` and process groups.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

_CLIP_EPS = 1e-6  # same epsilon as torch.nn.utils.clip_grad_norm_


def _local_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Local gradient tensors of `params` (None grads skipped; DTensor grads -> their local shard)."""
    grads = [p.grad for p in params if p.grad is not None]
    return [g.to_local() if isinstance(g, DTensor) else g for g in grads]


def _group_size(group) -> int:
    """World size of `group`; None means 'no reduction' here, so it counts as size 1."""
    if group is None:
        return 1
    if not dist.is_initialized():
        raise ValueError("clip_grad_norm_ got a process group but torch.distributed is not initialized: pass [] for single-process runs")
    return dist.get_world_size(group)


def _bucket_sq_sum(params: list[torch.Tensor], groups: list, device: torch.device) -> torch.Tensor:
    """sum_i ||g_i||^2 over this bucket's grads (fp32), then all_reduce(SUM) over each group in turn.

    Every rank calls the same all_reduces even with no local grads (it contributes 0), so a
    rank without grads for a bucket cannot make the others hang.
    """
    sq = torch.zeros((), dtype=torch.float32, device=device)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for g in _local_grads(params):
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    for (_, dtype), grads in by_kind.items():
        if dtype == torch.float32:  # one multi-tensor kernel instead of a launch per parameter
            norms = torch._foreach_norm(grads, 2)
        else:  # accumulate half-precision grads in float32
            norms = [torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads]
        sq += torch.stack([n.to(device) for n in norms]).square().sum()
    for group in groups:
        if _group_size(group) > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return sq


def _check_buckets(buckets) -> torch.device:
    """Reject a param listed twice (it would be counted and scaled twice); return the reduce device."""
    seen = set()
    device = None
    for i, (params, groups) in enumerate(buckets):
        if not isinstance(groups, (list, tuple)):
            raise ValueError(f"buckets[{i}] groups must be a list of process groups ([] for none), got {type(groups).__name__}")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"buckets[{i}] repeats a parameter of shape {tuple(p.shape)}: list every parameter in exactly one bucket")
            seen.add(id(p))
            if device is None:
                device = (p.to_local() if isinstance(p, DTensor) else p).device
    return torch.device("cpu") if device is None else device


def clip_grad_norm_(buckets: list[tuple[list[torch.Tensor], list]], max_norm: float,
                    scale_only: list[torch.Tensor] = ()) -> float:
    """Global L2 gradient norm over sharded params; scale grads in place so it is <= max_norm.

    A bucket is `(params, groups)`: `params` whose grads this rank holds, and the process groups
    across which the *other pieces* of those params live. The global norm is
        norm = sqrt( sum_b  allreduce_{groups_b}( sum_{p in b} ||grad_p||^2 ) )
    with fp32 accumulation. List a group only where ranks hold *different* pieces, never where
    they hold copies, or the copies are counted twice. E.g. with tp, ep, pp and a dp that has
    already all-reduced its grads:
        TP-sharded dense weights    [tp, pp]       replicated over tp (norms)  [pp]
        expert weights, EP-sharded  [ep, tp, pp]   ZeRO-sharded grads: add the dp group
    `None` (and size-1 groups) mean no reduction - pass `dist.group.WORLD` to sum over all ranks.
    Every rank must pass buckets with the same groups in the same order (they drive collectives).

    Scaling: grads *= min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_.
    max_norm <= 0 disables scaling. A nonfinite norm is returned unscaled: the trainer skips the step.
    `scale_only`: params scaled by the same factor but not counted (replicas of counted params,
    e.g. a tied LM head on the last pipeline stage).
    Returns the norm as a Python float (one device sync), identical on every rank.
    """
    if math.isnan(max_norm):
        raise ValueError("max_norm is NaN: use a positive number, or 0 to disable clipping")
    buckets = [(list(params), groups) for params, groups in buckets]  # params may be generators
    device = _check_buckets(buckets)
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for params, groups in buckets:
        total_sq += _bucket_sq_sum(params, groups, device)
    norm = total_sq.sqrt().item()
    if max_norm <= 0 or not math.isfinite(norm):
        return norm
    coef = max_norm / (norm + _CLIP_EPS)
    if coef < 1.0:
        for params in [p for p, _ in buckets] + [list(scale_only)]:
            grads = _local_grads(params)
            if grads:
                torch._foreach_mul_(grads, coef)
    return norm
