"""Data-parallel gradient reduction (float32 accumulation buffers, bucketed, overlapped with
backward), the sets of groups for the global-norm clip, ZeRO-1's owner broadcast, and the
tied-embedding gradient sum.

Which group reduces which gradient comes from each parameter's layout record (parallel/layout.py):
  * tp_partial (the rank saw only a token shard of the micro-batch): SUM over tp first;
  * grad_group "dp" (dense): SUM over dp, then / dp          -> mean over data-parallel replicas;
  * grad_group "edp" (experts): SUM over edp, then / dp. An expert's owner already holds the sum
    over its ep group's tokens (the all-to-all backward adds them), so summing over the edp
    replicas covers all dp ranks once; dividing by dp (not edp) gives the same mean as dense params.
Every parameter's gradient accumulates, micro-batch after micro-batch, into a float32 view of its
bucket's flat buffer (Megatron's main_grad): a bf16 model's gradients are summed in float32, and a
bucket is reduced in place, with no copy, as soon as the last micro-batch's backward completes it.
Buckets are launched in a fixed order (reverse parameter order, the order backward produces them),
and a bucket never starts before the previous one, so the collective order is the same on every
rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .context import ParallelContext
from .layout import LayoutTable, ParamLayout


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    buffer: torch.Tensor           # float32 [sum of numels]: the accumulated gradients, flat
    views: list[torch.Tensor]      # each param's slice of `buffer`, shaped like the param
    group: object                  # dp or edp group (None = nothing to reduce across replicas)
    tp_group: object               # set when these grads are partial sums over tp
    dst: int | None = None         # ZeRO-1: reduce to this owner rank only (None = all-reduce)
    ready: int = 0
    handle: object = None


class GradReducer:
    """Accumulate and reduce one pipeline chunk's gradients. Usage per optimizer step:
        reducer.prepare(last_micro_batch)    # before each backward
        loss.backward()                      # hooks add each grad into its float32 view
        reducer.finish()                     # after the last backward: grads reduced, / dp
        reducer.grad(p)                      # the reduced gradient (None: another rank owns p)
        reducer.zero()                       # after the optimizer step
    """

    def __init__(self, params: list[torch.nn.Parameter], table: LayoutTable,
                 bucket_mb: float = 25.0):
        self.ctx, self.table = table.ctx, table
        self.buckets = self._make_buckets([p for p in params if p.requires_grad], bucket_mb)
        self._where = {id(p): (b, v) for b in self.buckets for p, v in zip(b.params, b.views)}
        self.syncing, self.next_to_launch = False, 0
        for p in params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _key(self, rec: ParamLayout, device) -> tuple:
        group = self.ctx.group(rec.grad_group)
        tp_group = self.ctx.group("tp") if rec.tp_partial else None
        dst = rec.owner if group is not None else None
        return group, tp_group, dst, device

    def _make_buckets(self, params, bucket_mb: float) -> list[_Bucket]:
        limit = int(bucket_mb * 2**20)
        runs: list[tuple[tuple, list]] = []
        open_: dict[tuple, list] = {}
        for p in reversed(params):
            key = self._key(self.table[p], p.device)
            run = open_.get(key)
            if run is None or sum(q.numel() * 4 for q in run) >= limit:
                run = open_[key] = []
                runs.append((key, run))
            run.append(p)
        return [self._bucket(run, *key) for key, run in runs]

    @staticmethod
    def _bucket(params, group, tp_group, dst, device) -> _Bucket:
        buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        views, offset = [], 0
        for p in params:
            views.append(buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return _Bucket(params, buffer, views, group, tp_group, dst)

    def prepare(self, sync: bool) -> None:
        """Call before each backward; `sync` = this is the last micro-batch of the step."""
        self.syncing = sync
        if sync:
            self.next_to_launch = 0
            for b in self.buckets:
                b.ready, b.handle = 0, None

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        b, view = self._where[id(p)]
        view.add_(p.grad)  # float32 accumulation; the model-dtype grad is freed at once
        p.grad = None
        if not self.syncing:
            return
        b.ready += 1
        while self.next_to_launch < len(self.buckets):
            nxt = self.buckets[self.next_to_launch]
            if nxt.ready < len(nxt.params):
                break
            self._launch(nxt)
            self.next_to_launch += 1

    def _launch(self, b: _Bucket) -> None:
        if b.tp_group is not None:
            dist.all_reduce(b.buffer, group=b.tp_group)  # small (router, norms): synchronous
        if b.dst is not None:
            b.handle = dist.reduce(b.buffer, dst=b.dst, group=b.group, async_op=True)
        elif b.group is not None:
            b.handle = dist.all_reduce(b.buffer, group=b.group, async_op=True)

    def finish(self) -> None:
        """Launch what backward did not complete (unused params), wait, divide by dp."""
        while self.next_to_launch < len(self.buckets):
            self._launch(self.buckets[self.next_to_launch])
            self.next_to_launch += 1
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
            if self.ctx.dp > 1 and (b.dst is None or b.dst == self.ctx.rank):
                b.buffer.div_(self.ctx.dp)
        self.syncing = False

    def grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """p's reduced float32 gradient after finish(); None where ZeRO-1 reduced it elsewhere."""
        b, view = self._where[id(p)]
        return None if b.dst is not None and b.dst != self.ctx.rank else view

    def zero(self) -> None:
        for b in self.buckets:
            b.buffer.zero_()


def sync_tied_grads(grads: list[torch.Tensor], ctx: ParallelContext) -> None:
    """After reduction: grad <- grad(tok_emb on the first stage) + grad(head on the last stage), on
    both replicas, so they receive the same AdamW update and stay equal. The sum is the gradient of
    the single shared matrix: d loss / d W = lookup part + head part."""
    if grads and ctx.pp > 1:
        for g in grads:
            dist.all_reduce(g, group=ctx.tied_group)


def norm_buckets(entries: list[tuple[torch.Tensor, ParamLayout]],
                 ctx: ParallelContext) -> list[tuple[list, list]]:
    """Buckets for train.optim.clip_grad_norm_: (tensors whose .grad this rank holds, groups over
    which the other pieces live), so that each parameter is counted once in the global norm. A tied
    replica (`tied_to`) is left out: it mirrors the first stage's embedding, which is counted.
    The same (tp-cut?, expert?, owned?) buckets exist on every rank, possibly empty, so every rank
    issues the same all-reduces in the same order."""
    buckets = []
    for tp_cut in (False, True):
        for expert in (False, True):
            for owned in (False, True):
                key = (tp_cut, expert, owned)
                ts = [t for t, r in entries if r.tied_to is None and _norm_key(r) == key]
                zero = "edp" if expert else "dp"
                kinds = ["tp"] * tp_cut + ["ep"] * expert + ["pp"] + [zero] * owned
                buckets.append((ts, [g for g in map(ctx.group, kinds) if g is not None]))
    return buckets


def _norm_key(r: ParamLayout) -> tuple[bool, bool, bool]:
    return r.tp_dim is not None, r.expert, r.owner is not None


@torch.no_grad()
def broadcast_from_owners(params: list[torch.nn.Parameter], table: LayoutTable,
                          bucket_bytes: int = 25 * 2**20) -> None:
    """ZeRO-1, after the owners' optimizer step: every replica receives the updated values, one
    flattened broadcast per (group, owner, dtype), in pieces of at most ~bucket_bytes."""
    batches: dict[tuple, list] = {}
    for p in params:
        rec = table[p]
        if rec.owner is not None:
            batches.setdefault((rec.grad_group, rec.owner, p.dtype), []).append(p)
    for (kind, src, _), ps in batches.items():
        for piece in _pieces(ps, bucket_bytes):
            flat = torch.cat([p.data.reshape(-1) for p in piece])
            dist.broadcast(flat, src=src, group=table.ctx.group(kind))
            offset = 0
            for p in piece:
                p.data.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


def _pieces(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of params of at most `limit` bytes each (a larger param runs alone),
    so a flattened broadcast never needs more than ~limit bytes of extra memory."""
    out, size = [[]], 0
    for p in params:
        n = p.numel() * p.element_size()
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(p)
        size += n
    return out
