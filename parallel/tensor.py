"""Tensor-parallel building blocks: region-change mappings, TP linear/embedding layers, vocab-parallel CE.

Mappings (Megatron mappings.py style): each autograd.Function is named for the region change it makes,
and its backward is the conjugate collective. A lowercase wrapper takes the group and is the identity
when the group is None or of size 1, so the single-process model runs the very same code.

    copy_to_tp            fwd identity               bwd all-reduce       (enter a TP region)
    reduce_from_tp        fwd all-reduce             bwd identity         (leave it, partial sums)
    gather_from_tp        fwd all-gather(dim)        bwd keep own chunk
    scatter_to_tp         fwd keep own chunk         bwd all-gather(dim)
    gather_from_sp        fwd all-gather(seq)        bwd reduce-scatter(seq)   (sequence parallel)
    reduce_scatter_to_sp  fwd reduce-scatter(seq)    bwd all-gather(seq)
    scatter_to_sp         fwd keep own seq chunk     bwd all-gather(seq)

Each layer declares how it cuts its parameters in PARAM_SPLITS (parameter name -> Split, see
parallel/layout.py: the dim sharded across tp ranks; absent = replicated); init, checkpoints and the
gradient reducer read the per-parameter records built from it. Shards are contiguous by tp rank.
Under sequence parallelism a replicated parameter (RowParallelLinear's bias, norm weights) sees only
a sequence shard, so its gradient is a partial sum over tp: the layout record says so.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.context import ParallelContext, check_divisible
from parallel.fp8 import Float8Recipe, float8_fused_linear, float8_linear
from parallel.kernels import autocast_dtype, ce_shard_grad, ce_shard_stats
from parallel.layout import Split, shard_tensor  # noqa: F401 (shard_tensor: re-exported)

SEQUENCE_DIM = 1  # activations are [B, S, D]


# ----------------------------------------------------------------------------- collectives (no autograd)

def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _check_split(x: torch.Tensor, dim: int, size: int, op: str) -> None:
    """Fail on THIS rank before a collective: mismatched sizes abort gloo uncatchably."""
    if x.dim() == 0 or x.shape[dim] % size:
        raise ValueError(f"{op}: tensor of shape {tuple(x.shape)} cannot be split on dim {dim} into {size} "
                         f"equal parts (group size): make that dim a multiple of {size}")


def _all_gather_fn():
    # torch 2.13 renames all_gather_into_tensor -> all_gather_single; older torch lacks the new name.
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_fn():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Out-of-place all-reduce (never mutates a tensor autograd may still hold)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's x along dim: [.., n, ..] -> [.., size * n, ..] (rank order)."""
    size = _size(group)
    x0 = x.movedim(dim, 0).contiguous()  # the *_single collectives concatenate on dim 0
    out = torch.empty((size * x0.shape[0], *x0.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_fn()(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over ranks, keep this rank's chunk of dim: [.., size * n, ..] -> [.., n, ..]."""
    size = _size(group)
    _check_split(x, dim, size, "reduce-scatter")
    x0 = x.movedim(dim, 0).contiguous()
    out = torch.empty((x0.shape[0] // size, *x0.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_fn()(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of dim (no communication)."""
    size = _size(group)
    _check_split(x, dim, size, "split")
    n = x.shape[dim] // size
    return x.narrow(dim, _rank(group) * n, n).contiguous()


# ----------------------------------------------------------------------------- autograd region changes

class _CopyToTP(torch.autograd.Function):
    """Enter a TP region: every rank uses the same x, so dL/dx is the sum of the ranks' partial grads."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Leave a TP region: y = sum_r y_r; each y_r receives dL/dy unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """y = cat_r(x_r, dim); x_r only influences its own chunk, so its grad is that chunk of dL/dy."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _ScatterToTP(torch.autograd.Function):
    """x_r = chunk_r(x, dim) of a replicated x; dL/dx = cat_r(dL/dx_r) (chunks are disjoint).
    Serves the hidden dim (tp) and the sequence dim (sp) alike."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromSP(torch.autograd.Function):
    """Sequence shards -> full sequence for a TP region; the region yields partial grads on the full
    sequence, so dL/dx_r = chunk_r(sum over ranks of grad) = reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Partial sums on the full sequence -> summed sequence shard; dL/dx_r = all-gather of shard grads."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


def enter_tp_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The input side of column-parallel layers: gather_from_sp ([B, S/tp, D] -> [B, S, D]) with
    sequence parallelism, else copy_to_tp. Call it once for layers that share an input (q/k/v,
    gate/up): one all-gather forward and one reduce-scatter / all-reduce backward instead of one each."""
    return gather_from_sp(x, group, SEQUENCE_DIM) if sequence_parallel else copy_to_tp(x, group)


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (skipped for a None/size-1 group)."""
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """All-gather along dim forward (rank order), keep own chunk of the gradient backward."""
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group, dim)


def scatter_to_tp(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Keep own chunk along dim forward, all-gather the gradient backward."""
    return x if _size(group) == 1 else _ScatterToTP.apply(x, group, dim)


def gather_from_sp(x: torch.Tensor, group, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """All-gather the sequence forward, reduce-scatter the gradient backward."""
    return x if _size(group) == 1 else _GatherFromSP.apply(x, group, dim)


def reduce_scatter_to_sp(x: torch.Tensor, group, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Reduce-scatter the sequence forward (sum, keep own shard), all-gather the gradient backward."""
    return x if _size(group) == 1 else _ReduceScatterToSP.apply(x, group, dim)


def scatter_to_sp(x: torch.Tensor, group, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Keep own sequence shard forward, all-gather the gradient backward: scatter_to_tp on the
    sequence dim."""
    return scatter_to_tp(x, group, dim)


# ----------------------------------------------------------------------------- sharding helpers

@torch.no_grad()
def _init_shard_(param: nn.Parameter, tp_dim: int, full_shape: tuple, std: float, rank: int, size: int,
                 generator: torch.Generator | None) -> None:
    """param <- shard of a full N(0, std^2) tensor, so the RNG stream matches the unsharded layer's."""
    if param.is_meta:
        return
    device = generator.device if generator is not None else param.device
    full = torch.empty(full_shape, dtype=param.dtype, device=device).normal_(0.0, std, generator=generator)
    param.copy_(shard_tensor(full, tp_dim, rank, size))


def _param(shape: tuple) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           fp8: Float8Recipe | None) -> torch.Tensor:
    """F.linear, or its float8 version (parallel/fp8.py) when the layer has a float8 recipe."""
    if fp8 is None:
        return F.linear(x, weight, bias)
    return float8_linear(x, weight, bias, fp8)


# ----------------------------------------------------------------------------- layers

class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: rank r holds W[r*o:(r+1)*o] (o = out/tp), tp_dim 0.

    Input region: copy_to_tp (x replicated) or, with sequence parallelism, gather_from_sp (x arrives
    sequence-sharded [B, S/tp, in] and is gathered to [B, S, in]). Output [.., out/tp] stays split
    (feed a RowParallelLinear) unless gather_output, which all-gathers it to [.., out].
    """

    PARAM_SPLITS = {"weight": Split(tp_dim=0), "bias": Split(tp_dim=0)}

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext,
                 gather_output: bool = False, init_std: float = 0.02):
        super().__init__()
        check_divisible("out_features", out_features, "parallel.tp", ctx.tp)
        self.in_features, self.out_features, self.init_std = in_features, out_features, init_std
        self.group, self.tp, self.tp_rank = ctx.tp_group, ctx.tp, ctx.tp_rank
        self.sequence_parallel, self.gather_output = ctx.sequence_parallel, gather_output
        self.fp8: Float8Recipe | None = None  # float8 GEMMs when set (moe.model.enable_float8)
        self.weight = _param((out_features // ctx.tp, in_features))
        self.bias = _param((out_features // ctx.tp,)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """W ~ N(0, init_std^2) drawn as the full [out, in] matrix then sharded; b = 0."""
        _init_shard_(self.weight, 0, (self.out_features, self.in_features), self.init_std,
                     self.tp_rank, self.tp, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, in_region: bool = False) -> torch.Tensor:
        """in_region: x already went through enter_tp_region (several column-parallel layers that
        read the same input share one gather / one backward all-reduce)."""
        if not in_region:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        y = linear(x, self.weight, self.bias, self.fp8)  # [.., out/tp]
        return gather_from_tp(y, self.group, -1) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, sp={self.sequence_parallel}")


class _FusedColumnLinear(torch.autograd.Function):
    """y = x [W_1; W_2; ..]^T (+ [b_1; b_2; ..]): one GEMM for several weights that read the same
    input. The concatenated weight is a temporary of the forward GEMM and is concatenated again in
    backward instead of being kept, so no copy of the weights lives from a micro-batch's forward
    to its backward (with several micro-batches in flight that copy would be per micro-batch)."""

    @staticmethod
    def forward(ctx, x, bias, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.has_bias, ctx.rows = bias is not None, [w.shape[0] for w in weights]
        return F.linear(x, torch.cat(weights), bias)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        grad_x = grad @ torch.cat(weights)                                  # [.., in]
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # [sum out, in]
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_b, *grad_w.split(ctx.rows)


def fused_column_linear(x: torch.Tensor, layers: list[ColumnParallelLinear]) -> torch.Tensor:
    """Several ColumnParallelLinear layers that read the same input (q/k/v, gate/up) as one GEMM;
    the outputs come back side by side, [.., sum of local outs], in `layers` order. Under autocast
    the operands are cast to its dtype first (a no-op for a bf16 model). `x` must already be in the
    tp region (enter_tp_region); the layers may not gather their output. Layers with a float8
    recipe run the GEMM in float8 (parallel/fp8.py)."""
    if any(layer.gather_output for layer in layers):
        raise ValueError("fused_column_linear: layers with gather_output=True cannot share one GEMM")
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError("fused_column_linear: either every layer has a bias or none does")
    if any(layer.fp8 is not layers[0].fp8 for layer in layers):
        raise ValueError("fused_column_linear: layers sharing one GEMM must share one float8 "
                         "recipe (or none)")
    if layers[0].fp8 is not None:
        bias = torch.cat(biases) if biases[0] is not None else None
        return float8_fused_linear(x, [layer.weight for layer in layers], bias, layers[0].fp8)
    dtype = autocast_dtype(x.device.type) or x.dtype
    weights = [layer.weight.to(dtype) for layer in layers]
    bias = torch.cat([b.to(dtype) for b in biases]) if biases[0] is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return _FusedColumnLinear.apply(x.to(dtype), bias, *weights)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: rank r holds W[:, r*i:(r+1)*i] (i = in/tp), tp_dim 1.

    x arrives split on its last dim (a ColumnParallelLinear's output), so x_r W_r^T is a partial sum:
    y = sum_r x_r W_r^T, reduced by reduce_from_tp, or reduce-scattered over the sequence with sequence
    parallelism ([B, S, out] partials -> [B, S/tp, out]). The bias is replicated and added once,
    after the reduction. Under sequence parallelism each rank sees only its tokens, so the bias
    gradient is a partial sum over the tp group (Megatron's `sequence_parallel` attribute): its
    layout record says so and the gradient reducer all-reduces it over tp, as for norm weights in
    the sequence-parallel region.
    """

    PARAM_SPLITS = {"weight": Split(tp_dim=1)}

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext,
                 init_std: float = 0.02):
        super().__init__()
        check_divisible("in_features", in_features, "parallel.tp", ctx.tp)
        self.in_features, self.out_features, self.init_std = in_features, out_features, init_std
        self.group, self.tp, self.tp_rank = ctx.tp_group, ctx.tp, ctx.tp_rank
        self.sequence_parallel = ctx.sequence_parallel
        self.fp8: Float8Recipe | None = None  # float8 GEMMs when set (moe.model.enable_float8)
        self.weight = _param((out_features, in_features // ctx.tp))
        self.bias = _param((out_features,)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """W ~ N(0, init_std^2) drawn as the full [out, in] matrix then sharded; b = 0."""
        _init_shard_(self.weight, 1, (self.out_features, self.in_features), self.init_std,
                     self.tp_rank, self.tp, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, None, self.fp8)  # [B, S, out], partial sum over in/tp columns
        if self.sequence_parallel:
            y = reduce_scatter_to_sp(y, self.group, SEQUENCE_DIM)  # -> [B, S/tp, out]
        else:
            y = reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
                f"bias={self.bias is not None}, sp={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocab rows: rank r holds rows [r*v, (r+1)*v) (v = V/tp), tp_dim 0.

    Each rank looks up the tokens it owns and writes zero rows for the rest, so the sum over ranks
    (reduce_from_tp, or reduce_scatter_to_sp giving [B, S/tp, D] with sequence parallelism) is the
    full lookup. With tp > 1, ids outside [0, V) silently give zero rows (checking would cost a device
    sync); with tp = 1 they raise as in nn.Embedding.
    """

    PARAM_SPLITS = {"weight": Split(tp_dim=0)}

    def __init__(self, num_embeddings: int, dim: int, ctx: ParallelContext, init_std: float = 0.02):
        super().__init__()
        check_divisible("num_embeddings (vocab)", num_embeddings, "parallel.tp", ctx.tp)
        self.num_embeddings, self.dim, self.init_std = num_embeddings, dim, init_std
        self.group, self.tp, self.tp_rank = ctx.tp_group, ctx.tp, ctx.tp_rank
        self.sequence_parallel = ctx.sequence_parallel
        self.vocab_start = ctx.tp_rank * (num_embeddings // ctx.tp)
        self.weight = _param((num_embeddings // ctx.tp, dim))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """E ~ N(0, init_std^2) drawn as the full [V, D] table then sharded."""
        _init_shard_(self.weight, 0, (self.num_embeddings, self.dim), self.init_std, self.tp_rank, self.tp,
                     generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [B, S, D]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.group, SEQUENCE_DIM)  # [B, S/tp, D]
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} (local {self.weight.shape[0]}), {self.dim}, sp={self.sequence_parallel}"


class ParallelRMSNorm(nn.Module):
    """RMSNorm over a feature dim that tensor parallelism splits: rank r holds features
    [r*n, (r+1)*n) (n = N/tp) of x and of the weight (tp_dim 0), like a ColumnParallelLinear's
    output.

        y = x / sqrt(sum_{all N features} x^2 / N + eps) * weight

    The sum of squares is the one statistic that spans the split: each rank sums its own features
    and the partial sums are all-reduced (OLMoE's q/k norms over the whole projection). Its backward
    is an all-reduce too: every rank's output depends on the total, so dL/d(partial_r) is the sum of
    the ranks' dL/d(total), i.e. copy_to_tp then reduce_from_tp. The weight's gradient is complete
    on each rank (its features see every token), so it needs no reduction over tp.
    """

    PARAM_SPLITS = {"weight": Split(tp_dim=0)}

    def __init__(self, features: int, eps: float, ctx: ParallelContext):
        super().__init__()
        check_divisible("features", features, "parallel.tp", ctx.tp)
        self.features, self.eps, self.group = features, eps, ctx.tp_group
        self.weight = _param((features // ctx.tp,))
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # [.., N/tp]
        sq = xf.square().sum(-1, keepdim=True)  # [.., 1] this rank's partial sum of squares
        sq = reduce_from_tp(copy_to_tp(sq, self.group), self.group)  # all-reduce fwd and bwd
        y = xf * torch.rsqrt(sq / self.features + self.eps)
        return self.weight.to(x.dtype) * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.features} (local {self.weight.shape[0]}), eps={self.eps}"


# ----------------------------------------------------------------------------- vocab-parallel cross-entropy

class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token CE over logits split by vocab across the group, never gathering the full vocab.

    With z the full logits row, M = max_j z_j and t the target id:
        loss = lse - z_t,  lse = M + log(sum_j exp(z_j - M))
        dloss/dz_j = exp(z_j - lse) - [j == t]
    Per rank (parallel.kernels, one pass over the shard): the local max m, s = sum_j exp(z_j - m)
    and z_t where this rank's contiguous range [r*v, (r+1)*v) holds t (else 0). Then M = all-reduce
    MAX of m; s * exp(m - M) and z_t are all-reduced (SUM) in one collective. Backward recomputes the
    local softmax from the saved logits and lse, so it needs no communication and nothing of size
    [tokens, V] is kept in float32.
    """

    @staticmethod
    def forward(ctx, logits_local, targets, group, ignore_index):
        v = logits_local.shape[-1]
        z = logits_local.reshape(-1, v)
        z = z if z.stride(-1) == 1 else z.contiguous()
        start = _rank(group) * v
        in_shard = (targets >= start) & (targets < start + v)
        t_local = torch.where(in_shard, targets - start, -1).reshape(-1)
        m, s, picked = ce_shard_stats(z, t_local)
        gmax = m
        if _size(group) > 1:
            gmax = m.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
            stats = torch.stack([torch.where(s > 0, s * torch.exp(m - gmax), 0.0), picked])
            dist.all_reduce(stats, group=group)
            s, picked = stats[0], stats[1]
        lse = gmax + torch.log(s)
        ignored = targets == ignore_index
        loss = (lse - picked).view(targets.shape).masked_fill(ignored, 0.0)
        ctx.save_for_backward(z, t_local, lse, ignored)
        ctx.shape = logits_local.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        z, t_local, lse, ignored = ctx.saved_tensors
        g = grad_loss.to(lse.dtype).masked_fill(ignored, 0.0).reshape(-1)
        return ce_shard_grad(z, t_local, lse, g).view(ctx.shape), None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, targets: torch.Tensor, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy (float32, shape of targets) from this rank's vocab shard [.., V/tp].

    Vocab ranges are contiguous by rank in `group`. Tokens whose target is ignore_index get loss 0 and
    gradient 0. With group None / size 1 this equals F.cross_entropy(logits.float(), targets,
    reduction="none", ignore_index=ignore_index); reduce (mean over non-ignored tokens) yourself.
    Targets outside [0, V) other than ignore_index are not detected (that would need a device sync).
    """
    if logits_local.shape[:-1] != targets.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits_local.shape)} must be targets "
                         f"{tuple(targets.shape)} plus a vocab dim: pass logits [.., V/tp] and targets [..]")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"vocab_parallel_cross_entropy: targets must be integer token ids, got {targets.dtype}")
    return _VocabParallelCrossEntropy.apply(logits_local, targets, group, ignore_index)
