"""Data-parallel gradient reduction, bucketed and overlapped with backward, and ZeRO-1.

Which group reduces which gradient (the loss on every rank is its own mean / n_micro_batches):
  * params flagged `grad_sum_over_tp` (they saw only a token shard of the micro-batch: MoE router
    and experts under tp, everything tp-replicated under sequence parallelism): SUM over tp first;
  * dense params: SUM over dp, then / dp                 -> mean over data-parallel replicas;
  * expert params (`ep_dim` set): SUM over edp, then / dp. An expert's owner already holds the sum
    over its ep group's tokens (the all-to-all backward adds them), so summing over the edp
    replicas covers all dp ranks once; dividing by dp (not edp) gives the same mean as dense params.
Buckets are launched in a fixed order (reverse parameter order, the order backward produces them)
as soon as each is complete, so communication overlaps the rest of backward; a bucket never starts
before the previous one, which keeps the collective order identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .context import ParallelContext


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    group: object          # dp group or edp group (None = nothing to reduce)
    tp_group: object       # set when these grads are partial sums over tp
    divide: bool = False   # dp > 1: divide the (reduced) sum by dp, even when edp == 1 leaves nothing to reduce
    dst: int | None = None  # ZeRO-1: reduce to this owner rank only (None = all-reduce)
    ready: int = 0
    handle: object = None
    buffer: torch.Tensor | None = None


class GradReducer:
    """Reduce gradients after the last micro-batch's backward. Usage per optimizer step:
        reducer.prepare(last_micro_batch)    # before each backward
        loss.backward()
        reducer.finish()                     # after the last backward: grads are reduced"""

    def __init__(self, params: list[torch.nn.Parameter], ctx: ParallelContext, bucket_mb: float = 25.0,
                 owner: dict[int, int] | None = None):
        """owner (ZeRO-1, Zero1.owner): id(param) -> the global rank that updates it. Those grads are
        reduced to their owner only (half an all-reduce's traffic) and freed elsewhere."""
        self.ctx = ctx
        self.dp = ctx.dp
        self.owners = owner or {}
        self.buckets = self._make_buckets([p for p in params if p.requires_grad], bucket_mb)
        self.syncing = False
        self.next_to_launch = 0
        self._owner = {id(p): b for b in self.buckets for p in b.params}
        for p in params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _make_buckets(self, params, bucket_mb: float) -> list[_Bucket]:
        limit = int(bucket_mb * 2**20)
        ctx = self.ctx
        buckets: list[_Bucket] = []
        open_: dict[tuple, _Bucket] = {}
        for p in reversed(params):
            expert = getattr(p, "ep_dim", None) is not None
            group = (ctx.edp_group if ctx.edp > 1 else None) if expert else (ctx.dp_group if ctx.dp > 1 else None)
            tp_group = ctx.tp_group if getattr(p, "grad_sum_over_tp", False) and ctx.tp > 1 else None
            dst = self.owners.get(id(p)) if group is not None else None
            key = (expert, tp_group is not None, p.dtype, p.device, dst)
            b = open_.get(key)
            if b is None or sum(q.numel() * q.element_size() for q in b.params) >= limit:
                b = open_[key] = _Bucket([], group, tp_group, divide=ctx.dp > 1, dst=dst)
                buckets.append(b)
            b.params.append(p)
        return [b for b in buckets if b.group is not None or b.tp_group is not None or b.divide]

    def prepare(self, sync: bool) -> None:
        """Call before each backward; `sync` = this is the last micro-batch of the step."""
        self.syncing = sync
        if sync:
            self.next_to_launch = 0
            for b in self.buckets:
                b.ready, b.handle, b.buffer = 0, None, None

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        b = self._owner.get(id(p))
        if not self.syncing or b is None:
            return
        b.ready += 1
        while self.next_to_launch < len(self.buckets) and self.buckets[self.next_to_launch].ready == \
                len(self.buckets[self.next_to_launch].params):
            self._launch(self.buckets[self.next_to_launch])
            self.next_to_launch += 1

    def _launch(self, b: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        b.buffer = torch.cat([g.reshape(-1) for g in grads])
        for p in b.params:  # backward is done with them: free now, so gradients never exist twice
            p.grad = None
        if b.tp_group is not None:
            dist.all_reduce(b.buffer, group=b.tp_group)  # small (router, norms): synchronous
        if b.dst is not None:
            b.handle = dist.reduce(b.buffer, dst=b.dst, group=b.group, async_op=True)
        elif b.group is not None:
            b.handle = dist.all_reduce(b.buffer, group=b.group, async_op=True)

    def finish(self) -> None:
        """Launch what backward did not complete (unused params), wait, write the means back."""
        while self.next_to_launch < len(self.buckets):
            self._launch(self.buckets[self.next_to_launch])
            self.next_to_launch += 1
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
            if b.dst is not None and b.dst != self.ctx.rank:  # ZeRO-1: another rank owns these
                for p in b.params:
                    p.grad = None
                b.buffer, b.handle = None, None
                continue
            if b.divide:
                b.buffer.div_(self.dp)
            offset = 0
            for p in b.params:  # the reduced gradients are views into the bucket's buffer
                p.grad = b.buffer[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            b.buffer, b.handle = None, None
        self.syncing = False


def norm_buckets(params: list[torch.nn.Parameter], ctx: ParallelContext,
                 owner: dict[int, int] | None = None) -> list[tuple[list, list]]:
    """Buckets for train.optim.clip_grad_norm_ after reduction: each parameter counted once.
    tp-sharded params sum over tp; expert params sum over ep; every stage's params sum over pp;
    under ZeRO-1 (`owner`) only owners hold a param's grad, so owned params also sum over dp (dense)
    or edp (experts). All (tp-sharded?, expert?, owned?) buckets exist on every rank, possibly
    empty, so every rank issues the same all-reduces. A tied LM-head replica (`tied_to`, pp > 1)
    is left out: it mirrors the first stage's embedding, which is counted (see `tied_replicas`)."""
    def group(g, n):
        return g if n > 1 else None

    tp, ep, pp = group(ctx.tp_group, ctx.tp), group(ctx.ep_group, ctx.ep), group(ctx.pp_group, ctx.pp)
    dp, edp = group(ctx.dp_group, ctx.dp), group(ctx.edp_group, ctx.edp)
    owner = owner or {}
    counted = [p for p in params if p.requires_grad and getattr(p, "tied_to", None) is None]
    buckets = []
    for tp_sharded in (False, True):
        for expert in (False, True):
            for owned in (False, True):
                ps = [p for p in counted if (getattr(p, "tp_dim", None) is not None) == tp_sharded
                      and (getattr(p, "ep_dim", None) is not None) == expert and (id(p) in owner) == owned]
                zero = (edp if expert else dp) if owned else None
                groups = [tp if tp_sharded else None, ep if expert else None, pp, zero]
                buckets.append((ps, [g for g in groups if g is not None]))
    return buckets


def tied_replicas(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Parameters that mirror another one (a tied LM head on the last pipeline stage): not counted
    in the gradient norm, but scaled by the same clip factor so both replicas stay equal."""
    return [p for p in params if p.requires_grad and getattr(p, "tied_to", None) is not None]


class Zero1:
    """ZeRO stage 1: each data-parallel rank keeps optimizer state (AdamW moments) only for the
    parameters it owns and updates only those. Dense params are partitioned over dp, expert params
    over edp, in contiguous runs of ~equal size, so optimizer memory drops ~dp-fold. With GradReducer(owner=zero.owner) each gradient bucket is reduced to its owner only
    and freed elsewhere; the global-norm clip sums owned norms over dp (norm_buckets(owner=...));
    after the step the owners broadcast the new values. Reduce + broadcast move as many bytes as
    one all-reduce (which is itself a reduce-scatter + all-gather), and the update is exactly the
    unsharded one."""

    def __init__(self, params: list[torch.nn.Parameter], ctx: ParallelContext, exempt: set[int] = frozenset(),
                 bucket_mb: float = 25.0):
        """exempt: ids of params every rank keeps updating itself (the two replicas of a tied
        embedding split over pipeline stages, whose gradients are summed across stages)."""
        self.ctx = ctx
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.owner: dict[int, int] = {}
        self.params = [p for p in params if id(p) not in exempt]
        self.exempt = [p for p in params if id(p) in exempt]
        dense = [p for p in self.params if getattr(p, "ep_dim", None) is None]
        expert = [p for p in self.params if getattr(p, "ep_dim", None) is not None]
        self._assign(dense, ctx.dp_group if ctx.dp > 1 else None)
        self._assign(expert, ctx.edp_group if ctx.edp > 1 else None)

    def _assign(self, params, group) -> None:
        """Contiguous runs in backward order (reverse parameter order), ~equal in size: a gradient
        bucket then mostly has one owner, so reduce-to-owner overlaps backward as all-reduce did."""
        n = _size(group)
        total = sum(p.numel() for p in params)
        done = 0
        for p in reversed(params):
            r = min(n - 1, (2 * done + p.numel()) * n // (2 * max(total, 1)))  # rank of the param's midpoint
            done += p.numel()
            self.owner[id(p)] = dist.get_global_rank(group, r) if group is not None else self.ctx.rank
            p._zero_group = group

    def local_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.params if self.owner[id(p)] == self.ctx.rank] + self.exempt

    @torch.no_grad()
    def broadcast(self) -> None:
        """After the owners' optimizer step: every replica receives the updated values, one
        flattened broadcast per (group, owner, dtype)."""
        batches: dict[tuple, list] = {}
        for p in self.params:
            if p._zero_group is not None:
                batches.setdefault((id(p._zero_group), self.owner[id(p)], p.dtype), []).append(p)
        for (_, src, _), ps in batches.items():
            for piece in _pieces(ps, self.bucket_bytes):
                self._broadcast_flat(piece, src)

    @staticmethod
    def _broadcast_flat(ps: list[torch.nn.Parameter], src: int) -> None:
        flat = torch.cat([p.data.reshape(-1) for p in ps])
        dist.broadcast(flat, src=src, group=ps[0]._zero_group)
        offset = 0
        for p in ps:
            p.data.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def _pieces(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive runs of params of at most `limit` bytes each (a lone larger param is its own run),
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
