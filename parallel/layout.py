"""Where each parameter lives: one frozen record per parameter, made from the ParallelContext.

Layers that cut a parameter say so once, in a class attribute `PARAM_SPLITS` (their own parameter
name -> `Split`). `param_layouts(module, ctx)` turns those declarations and the context into a
`ParamLayout` per parameter, and `LayoutTable` adds what the run decides (ZeRO-1 owners, tied
replicas across pipeline stages). Every consumer reads the record instead of re-deriving it:

    model init / loading   the slice of the full tensor this rank keeps    tp_dim, ep_dim
    gradient reducer       the groups that sum the gradient                tp_partial, grad_group
    clipping               the groups holding the tensor's other pieces    tp_dim, ep_dim, owner
    ZeRO-1                 the rank that updates it                        owner
    checkpoints            how this rank's piece is described to DCP       tp_dim, ep_dim
    planner / simulation   how many elements each rank holds               global/local_shape

Gradient of a parameter (every rank's loss is its own mean / micro-batches):
    tp_partial   the rank saw only a token shard of the micro-batch (MoE router and experts under
                 tensor parallelism, every tp-replicated parameter under sequence parallelism):
                 sum over tp first;
    grad_group   "dp" for dense parameters, "edp" for expert parameters (an expert's owner already
                 holds the sum over its ep group's tokens: the all-to-all backward adds them); the
                 sum over that group, divided by dp, is the mean over data-parallel replicas.
With expert folding the ep group spans tp x dp ranks, so an expert shard never repeats inside a
tp group and its gradient is not a tp partial sum (the edp group covers those ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .context import ParallelContext


@dataclass(frozen=True)
class Split:
    """A layer's declaration for one of its parameters."""

    tp_dim: int | None = None      # dim cut into contiguous tp-rank chunks (None = replicated)
    ep_dim: int | None = None      # dim cut over the expert-parallel group (expert weights)
    token_sharded: bool = False    # the layer runs on a 1/tp token shard (MoE router and experts)
    tp_partial: bool = False       # the layer holds a 1/tp share of what the weight applies to (a
                                   # per-head norm over H/tp heads): its gradient is a tp partial sum
    keep_fp32: bool = False        # the layer computes with it in float32: a bf16 model keeps it so


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is laid out over the ranks of one run."""

    name: str                       # global name, the same in every layout (checkpoint key)
    global_shape: tuple[int, ...]   # the whole tensor, as one process holds it
    local_shape: tuple[int, ...]    # this rank's piece
    tp_dim: int | None
    ep_dim: int | None
    tp_partial: bool                # gradient is a partial sum over the tp group
    grad_group: str                 # "dp" (dense) or "edp" (experts): where replicas are summed
    tied_to: str | None = None      # a replica of another parameter (tied LM head, last stage)
    tied: bool = False              # one of the two replicas of a tied embedding split over stages
    owner: int | None = None        # ZeRO-1: the global rank that updates it (None: every holder)
    keep_fp32: bool = False         # stays float32 in a bf16 model (its layer computes in float32)

    @property
    def expert(self) -> bool:
        return self.ep_dim is not None

    def shard(self, full: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
        """This rank's piece of the whole tensor `full` (a copy when anything is cut)."""
        if tuple(full.shape) != self.global_shape:
            raise ValueError(f"{self.name}: full tensor has shape {tuple(full.shape)}, expected "
                             f"{self.global_shape}")
        piece = shard_tensor(full, self.tp_dim, ctx.tp_rank, ctx.tp)  # no split cuts both dims
        return shard_tensor(piece, self.ep_dim, ctx.ep_rank, ctx.ep)


def shard_tensor(full: torch.Tensor, tp_dim: int | None, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous chunk of `full` along tp_dim, of `size` chunks (a copy; tp_dim None =
    replicated, returned as is). ParamLayout.shard cuts a tp dim and an ep dim with it.

    Model init generates each full tensor from the same seed on every rank and keeps its shard, so
    every TP layout starts from exactly the single-process weights.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard_tensor: rank ({rank}) must be in [0, size ({size}))")
    if tp_dim is None or size == 1:
        return full
    if full.shape[tp_dim] % size:
        raise ValueError(f"shard_tensor: dim {tp_dim} of shape {tuple(full.shape)} is not divisible by the "
                         f"tp size ({size}): pad that dimension or choose tp dividing {full.shape[tp_dim]}")
    n = full.shape[tp_dim] // size
    return full.narrow(tp_dim, rank * n, n).clone(memory_format=torch.contiguous_format)


def _global_shape(local: tuple[int, ...], split: Split, ctx: ParallelContext) -> tuple[int, ...]:
    shape = list(local)
    for dim, size in ((split.tp_dim, ctx.tp), (split.ep_dim, ctx.ep)):
        if dim is not None:
            shape[dim] *= size
    return tuple(shape)


def _record(name: str, p: torch.Tensor, split: Split, ctx: ParallelContext,
            tied: dict[str, str | None]) -> ParamLayout:
    sp_replica = ctx.sequence_parallel and split.tp_dim is None
    tokens = split.token_sharded and not (ctx.fold_experts and split.ep_dim is not None)
    return ParamLayout(name=name, global_shape=_global_shape(tuple(p.shape), split, ctx),
                       local_shape=tuple(p.shape), tp_dim=split.tp_dim, ep_dim=split.ep_dim,
                       tp_partial=ctx.tp > 1 and (split.tp_partial or tokens or sp_replica),
                       grad_group="edp" if split.ep_dim is not None else "dp",
                       tied_to=tied.get(name), tied=name in tied, keep_fp32=split.keep_fp32)


def clean_name(name: str) -> str:
    """A parameter's global name: torch.compile wrappers add `._orig_mod`, not part of it."""
    return name.replace("._orig_mod", "")


def param_layouts(module: nn.Module, ctx: ParallelContext) -> dict[str, ParamLayout]:
    """name -> record for every parameter of `module` (names as `named_parameters` gives them).

    Splits come from each owning layer's PARAM_SPLITS. `tied_params()` on the module (if it has
    one) names the parameters that form a tied pair split over pipeline stages, each mapped to
    the tensor it mirrors, or None for the mirrored one: the last stage's {"head.weight":
    "tok_emb.weight"}, the first stage's {"tok_emb.weight": None}."""
    tied = module.tied_params() if hasattr(module, "tied_params") else {}
    out = {}
    for mod_name, mod in module.named_modules():
        splits = getattr(type(mod), "PARAM_SPLITS", {})
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            out[name] = _record(clean_name(name), p, splits.get(p_name, Split()), ctx, tied)
    return out


def zero1_ranks(sizes: list[int], n: int) -> list[int]:
    """ZeRO-1 ownership of parameters of these sizes (in parameter order) over a group of n: the
    group rank of each, assigned in backward order (reverse parameter order) to the rank of the
    parameter's midpoint in the running total, so each rank owns a contiguous run of ~1/n."""
    total, done, ranks = sum(sizes), 0, []
    for size in reversed(sizes):
        ranks.append(min(n - 1, (2 * done + size) * n // (2 * max(total, 1))))
        done += size
    return ranks[::-1]


class LayoutTable:
    """The records of every parameter a rank holds (all its pipeline chunks), with the run's
    decisions: which parameters form a tied pair across stages, and ZeRO-1 owners."""

    def __init__(self, modules: Iterable[nn.Module], ctx: ParallelContext, zero1: bool = False):
        self.ctx = ctx
        self._entries: dict[int, tuple[nn.Parameter, ParamLayout]] = {}
        for module in modules:
            named = dict(module.named_parameters())
            for name, rec in param_layouts(module, ctx).items():
                self._entries[id(named[name])] = (named[name], rec)
        if zero1:
            self._assign_owners()

    def _assign_owners(self) -> None:
        """ZeRO-1: dense parameters partitioned over dp, expert parameters over edp, in contiguous
        runs of ~equal size in backward order (reverse parameter order), so a gradient bucket
        mostly has one owner and reduce-to-owner overlaps backward as all-reduce does. The two
        replicas of a tied embedding stay with every holder (their gradients are summed across
        stages, then both apply the same update)."""
        for kind in ("dp", "edp"):
            group = self.ctx.group(kind)
            run = [(k, p, r) for k, (p, r) in self._entries.items()
                   if r.grad_group == kind and not r.tied and p.requires_grad]
            if group is None:
                continue
            ranks = zero1_ranks([p.numel() for _, p, _ in run], dist.get_world_size(group))
            for (key, p, r), rank in zip(run, ranks):
                self._entries[key] = (p, replace(r, owner=dist.get_global_rank(group, rank)))

    def __getitem__(self, p: torch.Tensor) -> ParamLayout:
        return self._entries[id(p)][1]

    def __contains__(self, p: torch.Tensor) -> bool:
        return id(p) in self._entries

    def __iter__(self) -> Iterator[tuple[nn.Parameter, ParamLayout]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def updates(self, p: torch.Tensor) -> bool:
        """Does this rank update (and hold optimizer state for) `p`?"""
        owner = self[p].owner
        return owner is None or owner == self.ctx.rank
