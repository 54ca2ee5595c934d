"""The optimizer side of one training step, for any layout and precision.

Megatron's mixed-precision layout: with a bf16 model, forward and backward read bf16 parameters
(no per-micro-batch weight casts or copies); gradients accumulate across micro-batches in float32
(the reducer's buffers); AdamW updates float32 *main* parameters, and the bf16 model parameters are
written from them once per step. With ZeRO-1 a rank keeps main parameters and AdamW state only for
the parameters it owns (dense over dp, experts over edp) and the owners broadcast the new model
parameters, so main weights and optimizer state both divide by the data-parallel size. A float32
parameter (an fp32 model, or one kept in float32 such as the router gate) is its own main.

Per step:   prepare(c, last) before each chunk's backward -> finish() -> clip(max_norm) -> step()
            -> zero_grad()
Memory per parameter (bytes): model 2 (bf16) or 4, float32 gradient buffer 4, main 4 (bf16 model
only) and AdamW 8, the last two / dp (or edp) under ZeRO-1.
"""

from __future__ import annotations

import torch

from .clip import clip_grad_norm_
from .data import GradReducer, broadcast_from_owners, norm_buckets, sync_tied_grads
from .layout import LayoutTable


class ParallelOptimizer:
    """AdamW over main parameters, fed by one GradReducer per pipeline chunk.

    groups: AdamW parameter groups over the MODEL parameters ({"params", "names", "weight_decay"},
    as train.optim.param_groups makes them); AdamW steps the main copy of each parameter this rank
    updates, in the same groups. chunk_params: the parameters of each pipeline chunk (one reducer
    each, so a chunk's buckets launch when its own last micro-batch is done). model_dtype:
    torch.bfloat16 holds the model in bf16 (cast here, after the main copies are taken from the
    float32 values), None leaves it as built."""

    def __init__(self, groups: list[dict], chunk_params: list[list[torch.nn.Parameter]],
                 table: LayoutTable, *, lr: float, betas: tuple[float, float], eps: float,
                 fused: bool, model_dtype: torch.dtype | None = None, bucket_mb: float = 25.0):
        self.table, self.ctx = table, table.ctx
        self.params = [p for g in groups for p in g["params"]]
        self.main = {id(p): _main_copy(p, model_dtype, table[p].keep_fp32)
                     for p in self.params if table.updates(p)}
        if model_dtype is not None:
            _cast_model(self.params, table, model_dtype)
        main_groups = [self._main_group(g) for g in groups]
        kernel = {"fused": True} if fused else {"foreach": True}
        self.adamw = torch.optim.AdamW(main_groups, lr=lr, betas=tuple(betas), eps=eps, **kernel)
        self.reducers = [GradReducer(ps, table, bucket_mb) for ps in chunk_params]
        self._reducer_of = {id(p): r for r, ps in zip(self.reducers, chunk_params) for p in ps}
        # (model parameter, its main tensor) for every parameter this rank updates, fixed from here
        self._pairs = [(p, self.main[id(p)]) for p in self.params if id(p) in self.main]
        self._tied_mains = [m for p, m in self._pairs if table[p].tied]
        self._copies = [(p, m) for p, m in self._pairs if m is not p]  # written after each step
        self.clip_buckets = norm_buckets([(m, table[p]) for p, m in self._pairs], self.ctx)
        self.tied_replicas = [m for p, m in self._pairs if table[p].tied_to is not None]
        self.zero1 = any(table[p].owner is not None for p in self.params)

    def _main_group(self, group: dict) -> dict:
        """An AdamW group over the main copies of `group`'s parameters that this rank updates."""
        mine = [(n, p) for n, p in zip(group["names"], group["params"]) if id(p) in self.main]
        return dict(group, params=[self.main[id(p)] for _, p in mine], names=[n for n, _ in mine])

    def prepare(self, chunk: int, last: bool) -> None:
        """Before chunk `chunk`'s backward of a micro-batch; last = the step's last one."""
        self.reducers[chunk].prepare(sync=last)

    def finish(self) -> None:
        """After the step's last backward: reduce every chunk's gradients, sum the tied embedding's
        two replicas across stages, and give each main parameter its float32 gradient."""
        for r in self.reducers:
            r.finish()
        for p, main in self._pairs:
            main.grad = self._reducer_of[id(p)].grad(p)
        sync_tied_grads([m.grad for m in self._tied_mains], self.ctx)

    def clip(self, max_norm: float) -> float:
        """Global gradient norm over every rank's pieces; gradients scaled so it is <= max_norm."""
        return clip_grad_norm_(self.clip_buckets, max_norm, scale_only=self.tied_replicas)

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the main parameters, then the model written from them."""
        self.adamw.step()
        self.write_model()

    @torch.no_grad()
    def write_model(self) -> None:
        """Model parameters <- main parameters (a cast for a bf16 model) and, under ZeRO-1, the
        owners' values broadcast to every replica: once per step, and after loading a checkpoint."""
        if self._copies:
            torch._foreach_copy_([p.data for p, _ in self._copies], [m for _, m in self._copies])
        if self.zero1:
            broadcast_from_owners(self.params, self.table)

    def zero_grad(self) -> None:
        """After the step: empty the float32 buffers and drop every gradient reference, so the
        next backward starts from zero (a float32 parameter's .grad was a view of its buffer)."""
        for r in self.reducers:
            r.zero()
        for main in self.main.values():
            main.grad = None
        for p in self.params:
            p.grad = None

    def master(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The float32 tensor holding p's exact value on this rank (what a checkpoint saves and
        loads), or None where another rank owns p under ZeRO-1 and p is not float32 itself."""
        return self.main.get(id(p))


def _main_copy(p: torch.nn.Parameter, model_dtype: torch.dtype | None,
               keep_fp32: bool) -> torch.Tensor:
    """The float32 tensor AdamW updates for p: p itself when p stays float32, else a copy."""
    stays_fp32 = model_dtype in (None, torch.float32) or keep_fp32
    if p.dtype == torch.float32 and stays_fp32:
        return p
    return p.detach().to(torch.float32, copy=True)


@torch.no_grad()
def _cast_model(params: list[torch.nn.Parameter], table: LayoutTable, dtype: torch.dtype) -> None:
    """Hold the model's parameters in `dtype`, except those their layer computes in float32 (the
    router gate, LayerNorm): those stay float32 and are their own main parameters."""
    for p in params:
        if not table[p].keep_fp32:
            p.data = p.data.to(dtype)
