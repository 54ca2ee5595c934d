"""The bf16 precision layout (parallel/optimizer.py): bf16 model parameters, float32 main weights and
float32 gradient accumulation in the optimizer, the model written once per step.

* weight casts per step do not grow with the number of micro-batches (none in forward/backward);
* gradients accumulate in float32 (a bf16 sum of many small micro-batch gradients would lose them);
* the update is applied to float32 main weights and written to the bf16 model once per step;
* precision=fp32 is exactly the plain torch AdamW step (the model is its own main copy).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe.config import get_preset
from moe.model import build_model
from parallel.context import ParallelContext
from parallel.layout import LayoutTable
from train.optim import build_optimizer, build_parallel_optimizer

aten = torch.ops.aten


class WeightCasts(TorchDispatchMode):
    """Counts dtype conversions (aten._to_copy) that read a weight matrix's storage: the per-call
    casts of float32 weights that autocast's cache does not cover (experts, fused q/k/v, gate/up)."""

    def __init__(self, weights):
        super().__init__()
        self.storages = {w.untyped_storage().data_ptr() for w in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._to_copy.default and args[0].untyped_storage().data_ptr() in self.storages:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _model(seed=0):
    cfg = get_preset("tiny-moe", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128, expert_ffn_dim=64)
    return cfg, build_model(cfg, ParallelContext.single(), seed=seed)


def _step(model, opt, tokens, n_micro):
    for i, mb in enumerate(tokens.chunk(n_micro)):
        opt.prepare(0, last=i == n_micro - 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(mb[:, :-1], mb[:, 1:], aux_grad_scale=1.0 / n_micro)
        (out.loss / n_micro).backward()
    opt.finish()
    opt.clip(1.0)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, None])
def test_weight_casts_do_not_grow_with_micro_batches(model_dtype):
    """bf16 layout: no weight is cast in forward or backward, whatever the micro-batch count.
    The float32 model under autocast (the old layout, model_dtype None) casts the experts and the
    fused projections once per micro-batch: 8 micro-batches cast 8 times as often as 1."""
    counts = {}
    for n_micro in (1, 8):
        cfg, model = _model()
        opt = build_parallel_optimizer([model], LayoutTable([model], model.ctx), 1e-3, model_dtype=model_dtype)
        tokens = torch.randint(0, cfg.vocab_size, (8, 17), generator=torch.Generator().manual_seed(0))
        with WeightCasts([p for p in model.parameters() if p.dim() >= 2]) as casts:
            _step(model, opt, tokens, n_micro)
        counts[n_micro] = casts.count
    if model_dtype is torch.bfloat16:
        assert counts == {1: 0, 8: 0}
    else:
        assert counts[8] == 8 * counts[1] > 0, counts


def test_bf16_model_has_float32_main_weights_and_router():
    cfg, model = _model()
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = LayoutTable([model], model.ctx)
    opt = build_parallel_optimizer([model], table, 1e-3, model_dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        main = opt.master(p)
        assert torch.equal(main, full[name]) and main.dtype == torch.float32, name  # exact float32 values
        if name.endswith("router.weight"):  # routing computes in float32: the parameter stays float32
            assert p.dtype == torch.float32 and main is p
        else:
            assert p.dtype == torch.bfloat16 and main is not p and torch.equal(p, full[name].bfloat16()), name


def test_gradients_accumulate_in_float32():
    """64 micro-batches: the reducer's float32 buffer holds the sum of their bf16 gradients to float32
    accuracy, where a bf16 running sum (what .grad accumulation on a bf16 parameter gives) loses
    ~1e-3 relative. Reference: the same bf16 gradients from a copy of the layer, summed in float64."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256, bias=False)
    opt = build_parallel_optimizer([lin], LayoutTable([lin], ParallelContext.single()), 1e-3,
                                   model_dtype=torch.bfloat16)
    twin = torch.nn.Linear(256, 256, bias=False).bfloat16()
    twin.weight.data.copy_(lin.weight.data)
    exact, bf16_sum = torch.zeros(256, 256, dtype=torch.float64), torch.zeros(256, 256, dtype=torch.bfloat16)
    for i, xi in enumerate(torch.randn(64, 4, 256).bfloat16()):
        opt.prepare(0, last=i == 63)
        lin(xi).float().square().mean().backward()
        twin.weight.grad = None
        twin(xi).float().square().mean().backward()
        exact += twin.weight.grad.double()
        bf16_sum += twin.weight.grad
    opt.finish()
    got = opt.master(lin.weight).grad
    assert got.dtype == torch.float32
    rel = ((got.double() - exact).norm() / exact.norm()).item()
    bf16_rel = ((bf16_sum.double() - exact).norm() / exact.norm()).item()
    assert rel < 1e-6 and bf16_rel > 1e-3, (rel, bf16_rel)


def test_update_goes_to_float32_main_weights():
    """An update far below bf16's resolution (lr 1e-6 on weights of ~2e-2, whose bf16 spacing is ~1e-4)
    moves the float32 main weights every step; the bf16 model follows once the sum is large enough."""
    cfg, model = _model()
    opt = build_parallel_optimizer([model], LayoutTable([model], model.ctx), 1e-6, weight_decay=0.0,
                                   model_dtype=torch.bfloat16)
    w = model.layers["0"].attn.wq.weight
    start = opt.master(w).clone()
    tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    _step(model, opt, tokens, 2)
    moved = (opt.master(w) - start).abs()
    assert moved.max() > 0 and moved.max() < 1.5e-6  # Adam's first step moves each weight by ~lr
    assert torch.equal(w, opt.master(w).bfloat16())  # the model is the rounded main weights


def test_fp32_layout_is_plain_adamw():
    """precision=fp32: the model is its own main copy, and a step equals torch's AdamW step exactly."""
    cfg, model = _model()
    _, ref = _model()
    opt = build_parallel_optimizer([model], LayoutTable([model], model.ctx), 1e-3)
    ref_opt = build_optimizer(ref, 1e-3)
    assert all(opt.master(p) is p for p in model.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(2))
    for i, mb in enumerate(tokens.chunk(2)):
        opt.prepare(0, last=i == 1)
        (model(mb[:, :-1], mb[:, 1:], aux_grad_scale=0.5).loss / 2).backward()
        (ref(mb[:, :-1], mb[:, 1:], aux_grad_scale=0.5).loss / 2).backward()
    opt.finish()
    opt.step()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
