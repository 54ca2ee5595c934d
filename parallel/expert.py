"""Expert parallelism: send each routed row to the rank that owns its expert, and bring the results back.

Layout: E experts over the ep ranks of an expert group, E_l = E / ep per rank; ep rank r owns the
contiguous experts [r * E_l, (r + 1) * E_l). Rows travel in three layouts (M = rows this rank
receives, N = rows it sends):

    sender,   expert-major   x_sorted [N, D]   rows of expert 0, then 1, ... (what permute() produces);
                                               since experts are contiguous per rank, this is also
                                               destination-rank-major, ready for the all-to-all
    receiver, rank-major     x_recv   [M, D]   (source rank, local expert) blocks, as the all-to-all
                                               delivers them
    receiver, expert-major   x_local  [M, D]   (local expert, source rank) blocks, what a grouped GEMM
                                               over the E_l local experts needs

Backward of an all-to-all is the same all-to-all with the send and receive splits swapped (each row
goes back where it came from), as in MegaBlocks all_to_all.py and Megatron's _AllToAll.

Hangs: every collective here runs on the ep group, whose timeout ParallelContext sets; a timed-out
or failed collective is re-raised as a RuntimeError naming the ep group's ranks and the step.
A rank whose input does not require grad while another's does would skip the backward all-to-all
and leave the others waiting: every rank of an ep group must run the same forward/backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from parallel.context import check_divisible


def rank_major_to_expert_major(counts_RE: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Gather index turning rank-major rows into expert-major rows: x_EM = x_RM[index].

    counts_RE [R, E_l]: rows from source rank r for local expert e. In rank-major order the block
    (r, e) starts at start[r, e] = sum of the counts before it in row-major order; expert-major order
    visits the same blocks column by column, (e, 0), (e, 1), ..., so

        index = cat over e, then r, of  start[r, e] + arange(counts_RE[r, e])

    The inverse permutation (expert-major back to rank-major) is this function applied to
    counts_RE.T, because rank-major blocks are the column-major blocks of the transpose.
    `total` (= counts_RE.sum()) avoids a device sync when the caller already knows it.
    """
    if counts_RE.dim() != 2:
        raise ValueError(f"counts_RE must be 2-D [ranks, local experts], got shape {tuple(counts_RE.shape)}")
    total = int(counts_RE.sum()) if total is None else total
    starts_RE = torch.cumsum(counts_RE.flatten(), 0).view_as(counts_RE) - counts_RE  # rank-major block starts
    counts_ER, starts_ER = counts_RE.t().flatten(), starts_RE.t().flatten()  # blocks in expert-major order
    block_start = torch.repeat_interleave(starts_ER, counts_ER, output_size=total)  # [M] source block start
    dest_start = torch.repeat_interleave(torch.cumsum(counts_ER, 0) - counts_ER, counts_ER, output_size=total)
    return block_start + torch.arange(total, device=counts_RE.device) - dest_start  # [M]


def _describe(group) -> str:
    return f"ep group (global ranks {dist.get_process_group_ranks(group)})"


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, step: str) -> torch.Tensor:
    """Rows x[sum(in_splits[:j]) : ...] go to rank j; out_splits[i] rows arrive from rank i (rank order)."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    try:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    except RuntimeError as err:  # gloo/nccl timeouts and peer failures; the original stays chained
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(f"expert-parallel all-to-all ({step}) failed on the {_describe(group)}: {first} "
                           f"(a rank skipped this MoE layer's dispatch/combine, or the group timeout is too short)"
                           ) from err
    return out


class _AllToAll(torch.autograd.Function):
    """y = all-to-all(x) with uneven splits. Each received row depends only on the row it was sent
    from, so dL/dx is dL/dy sent back along the same routes: the same op with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, step):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.step = out_splits, in_splits, group, step
        return _all_to_all(x, out_splits, in_splits, group, step)

    @staticmethod
    def backward(ctx, grad):
        grad_x = _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group, ctx.step + " backward")
        return grad_x, None, None, None, None


@dataclass(frozen=True)
class DispatchMeta:
    """What combine() needs to send each result row back to where its token came from."""
    send_splits: tuple[int, ...]   # [ep] rows this rank sent to each ep rank (dispatch input splits)
    recv_splits: tuple[int, ...]   # [ep] rows this rank received from each ep rank
    to_expert_major: torch.Tensor  # [M] x_local = x_recv[to_expert_major]
    to_rank_major: torch.Tensor    # [M] y_recv = y_local[to_rank_major] (the inverse permutation)


class AllToAllDispatcher:
    """Expert-parallel dispatcher with LocalDispatcher's interface (see the module docstring)."""

    def __init__(self, n_experts: int, ep_group, ep: int):
        check_divisible("model.n_experts", n_experts, "parallel.ep", ep)
        if ep_group is None or dist.get_world_size(ep_group) != ep:
            got = None if ep_group is None else dist.get_world_size(ep_group)
            raise ValueError(f"ep_group has size {got} but parallel.ep is {ep}: pass ParallelContext.ep_group")
        self.n_experts, self.ep, self.group = n_experts, ep, ep_group
        self.n_local_experts = n_experts // ep

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """counts [E] -> counts_RE [ep, E_l]: rows each source rank sends to each of our local experts.

        Our counts viewed as [ep, E_l] have row j = what we send to rank j; an equal-split
        all-to-all of those rows hands rank j row j from every rank, in source-rank order."""
        self._check_counts(counts)
        send_RE = counts.reshape(self.ep, self.n_local_experts).to(torch.int64).contiguous()
        return _all_to_all(send_RE, [1] * self.ep, [1] * self.ep, self.group, "count exchange")

    def dispatch(self, x_sorted: torch.Tensor, counts: torch.Tensor,
                 host_counts: Sequence[int] | None = None):
        """x_sorted [N, D] expert-major, counts [E] -> (x_local [M, D] expert-major,
        counts_local [E_l], meta).

        host_counts: `counts` already known on the host, the same on every rank of the group
        (forced routing: equal token counts routed by one formula); the split sizes then come
        from them instead of a device read (see `split_sizes`)."""
        # 1. exchange counts (one small collective on x's device): counts_RE[r, e] = rows rank r sends
        #    to our local expert e
        # 2. split sizes: send_splits[j] = our rows for rank j's experts; recv_splits[r] = row sums of counts_RE
        # 3. uneven all-to-all of the rows, with autograd (backward = same op, splits swapped)
        # 4. received rows are rank-major (source rank, local expert): reorder them expert-major
        #    (local expert, source rank) for the grouped GEMM; counts_local = per-local-expert totals
        if x_sorted.dim() != 2:
            raise ValueError(f"dispatch: x_sorted must be [N, D], got shape {tuple(x_sorted.shape)}")
        self._check_counts(counts)
        counts = counts.to(x_sorted.device, torch.int64)
        counts_RE = self.exchange_counts(counts)
        send_splits, recv_splits = self.split_sizes(counts, counts_RE, host_counts)
        if sum(send_splits) != x_sorted.shape[0]:  # checked before the uneven all-to-all, which would abort
            raise ValueError(f"dispatch: x_sorted has {x_sorted.shape[0]} rows but counts sum to "
                             f"{sum(send_splits)}: pass the rows and counts of the same permutation")
        x_recv = _AllToAll.apply(x_sorted, recv_splits, send_splits, self.group, "dispatch")
        M = x_recv.shape[0]
        meta = DispatchMeta(tuple(send_splits), tuple(recv_splits),
                            rank_major_to_expert_major(counts_RE, M), rank_major_to_expert_major(counts_RE.t(), M))
        return x_recv.index_select(0, meta.to_expert_major), counts_RE.sum(0), meta

    def split_sizes(self, counts: torch.Tensor, counts_RE: torch.Tensor,
                    host_counts: Sequence[int] | None) -> tuple[list[int], list[int]]:
        """(send_splits, recv_splits): rows for each ep rank's experts and rows from each ep rank.

        Read from the device (one sync), or from host_counts when every rank of the group holds
        those same counts: send_j = sum of host_counts over rank j's experts, and every source
        sends us send_{our ep rank}. That is how a fake-tensor simulation, which has no device
        values to read, learns the sizes of the all-to-all."""
        if host_counts is None:
            sizes = torch.stack([counts.reshape(self.ep, -1).sum(1), counts_RE.sum(1)])
            send, recv = sizes.tolist()
            return send, recv
        if len(host_counts) != self.n_experts:
            raise ValueError(f"dispatch: host_counts has {len(host_counts)} entries, expected "
                             f"{self.n_experts} (one per global expert, model.n_experts)")
        E_l = self.n_local_experts
        send = [sum(host_counts[j * E_l:(j + 1) * E_l]) for j in range(self.ep)]
        return send, [send[dist.get_rank(self.group)]] * self.ep

    def combine(self, y_local: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """y_local [M, D] expert-major -> y_sorted [N, D] in dispatch's x_sorted order (the inverse path)."""
        if y_local.shape[0] != sum(meta.recv_splits):
            raise ValueError(f"combine: y_local has {y_local.shape[0]} rows but dispatch delivered "
                             f"{sum(meta.recv_splits)}: pass the expert outputs for dispatch's x_local")
        y_recv = y_local.index_select(0, meta.to_rank_major)  # [M, D] rank-major again
        return _AllToAll.apply(y_recv, list(meta.send_splits), list(meta.recv_splits), self.group, "combine")

    def _check_counts(self, counts: torch.Tensor) -> None:
        if counts.dim() != 1 or counts.shape[0] != self.n_experts:
            raise ValueError(f"dispatch: counts has shape {tuple(counts.shape)}, expected [{self.n_experts}] "
                             f"(one entry per global expert, model.n_experts)")
        if counts.is_floating_point() or counts.is_complex():
            raise ValueError(f"dispatch: counts must be an integer tensor, got {counts.dtype}")
