"""training.fp8: float8 GEMMs in the blocks' tensor-parallel linears through torchao.

torchao's float8 training math runs on this CPU build: `torch._scaled_mm` has a CPU kernel in
torch 2.13 (tensorwise and rowwise scales, bf16 output), and torchao's `emulate` option runs float32
GEMMs on the float8-rounded operands. So the numerics are checked here for real: a training step of
a small dense and MoE model with float8 GEMMs against the same step in bf16 (losses within 1e-3
relative, every gradient within float8 rounding), the fused q/k/v and gate/up GEMM against the plain
one, and the layers, config keys and one-line errors. The float8 GEMMs of a GPU are checked by
tests/test_gpu.py; tensor parallelism on gloo by tests/distributed/test_fp8.py.
"""

import dataclasses
import gc
import weakref
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao.float8", reason="training.fp8 needs torchao (pip install -e '.[fp8]')")

from moe.config import get_preset  # noqa: E402
from moe.model import build_model, enable_float8  # noqa: E402
from parallel import fp8 as fp8_mod  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402
from parallel.fp8 import (check_float8_device, float8_fused_linear, float8_linear,  # noqa: E402
                          float8_recipe)
from train.config import load_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402
from tests.test_trainer import tokens  # noqa: E402,F401  - the 50k-token byte file fixture

SHRINK = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256,
              vocab_pad_multiple=8, max_seq_len=64)
MODELS = {"dense": ("tiny", {}), "dense_bias": ("tiny", dict(bias=True)),
          "gpt_gelu_bias": ("gpt2-small", {}),
          "moe": ("tiny-moe", dict(n_experts=4, top_k=2, expert_ffn_dim=32))}
# Float8 (e4m3: 3 mantissa bits) rounds each operand by up to 2^-4 relative; over this model's
# step that gives losses within ~1e-4 and gradients within 6-18% (norm of the difference over the
# norm, per tensor). A wrong transpose, a lost gradient or a weight of the wrong layer is off by
# more than 100%.
LOSS_RTOL, GRAD_RTOL = 1e-3, 0.3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def bf16_step(key: str, recipe=None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one forward + backward of a bf16 model under autocast (the trainer's
    bf16 layout), with the blocks' linears in float8 when `recipe` is given."""
    preset, extra = MODELS[key]
    cfg = get_preset(preset, **SHRINK, **extra)
    model = build_model(cfg, seed=0).to(torch.bfloat16)
    if recipe is not None:
        enable_float8(model, recipe)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    return out.loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("name, emulate",
                         [("tensorwise", False), ("rowwise", False), ("rowwise", True)])
def test_float8_step_matches_bf16_within_float8_rounding(key, name, emulate):
    loss_ref, grads_ref = bf16_step(key)
    loss, grads = bf16_step(key, float8_recipe(name, emulate))
    assert abs(loss - loss_ref) / loss_ref < LOSS_RTOL, (loss, loss_ref)
    # the key bias has no gradient in exact arithmetic (softmax ignores a shift every key shares):
    # both runs hold rounding noise there
    errors = {n: _rel(grads[n], grads_ref[n]) for n in grads_ref if not n.endswith("attn.wk.bias")}
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_RTOL, (worst, errors[worst])
    blocks = [n for n in errors if ".attn.w" in n or ".mlp.w" in n]
    assert min(errors[n] for n in blocks) > 1e-3, "float8 GEMMs must round: nothing changed"


def test_emulated_and_cpu_scaled_mm_compute_the_same_float8_math():
    """torch._scaled_mm's CPU kernel against torchao's emulation (float32 GEMMs on the float8
    operands): the same quantisation, so equal up to float32 summation order."""
    for name in ("tensorwise", "rowwise"):
        loss_hw, grads_hw = bf16_step("dense", float8_recipe(name))
        loss_em, grads_em = bf16_step("dense", float8_recipe(name, emulate=True))
        assert loss_hw == pytest.approx(loss_em, rel=1e-5)
        assert max(_rel(grads_hw[n], grads_em[n]) for n in grads_em) < 2e-2


def _operands(rows=(32, 16, 16), d=64, tokens=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).to(torch.bfloat16).requires_grad_()
    ws = [(torch.randn(n, d, generator=g) * 0.1).to(torch.bfloat16).requires_grad_() for n in rows]
    return x, ws


def test_fused_float8_gemm_equals_one_float8_gemm_on_the_concatenated_weight():
    recipe = float8_recipe("rowwise")
    x, ws = _operands()
    gy = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = float8_fused_linear(x, ws, None, recipe)
    y.backward(gy)
    cat = torch.cat([w.detach() for w in ws]).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = float8_linear(x2, cat, None, recipe)
    y2.backward(gy)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    assert torch.equal(torch.cat([w.grad for w in ws]), cat.grad)


def test_fused_float8_gemm_keeps_no_weight_copy_for_backward():
    """The concatenated weight is a temporary of the forward: once the forward returns nothing
    holds it (backward concatenates again), as in the bf16 fused GEMM."""
    recipe = float8_recipe("rowwise")
    seen = []

    class Spy:
        @staticmethod
        def apply(x, w_t, *args):
            seen.append(weakref.ref(w_t))
            return recipe.matmul.apply(x, w_t, *args)

    x, ws = _operands()
    y = float8_fused_linear(x, ws, None, dataclasses.replace(recipe, matmul=Spy))
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None
    y.float().sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in ws)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_float8_under_activation_checkpointing_gives_the_same_gradients(recompute):
    """Recomputing a block in backward repeats its float8 casts exactly (the fused GEMM's
    saved-tensor hook nests inside the checkpoint's): the same loss and gradients as without."""
    results = []
    for checkpointing in (False, True):
        preset, extra = MODELS["dense"]
        model = build_model(get_preset(preset, **SHRINK, **extra), seed=0).to(torch.bfloat16)
        enable_float8(model, float8_recipe("rowwise"))
        model.activation_checkpointing, model.recompute = checkpointing, recompute
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == loss
    assert all(torch.equal(grads_ckpt[n], grads[n]) for n in grads)


def test_float8_reaches_the_blocks_linears_only():
    """Attention q/k/v/o and the MLPs' (and shared expert's) linears get the recipe; the LM head,
    the router and the experts keep theirs; every forward GEMM of those layers goes through
    torchao's float8 function (q/k/v and gate/up as one fused call each)."""
    cfg = get_preset("tiny-moe", **SHRINK, n_experts=4, top_k=2, expert_ffn_dim=32,
                     shared_expert_ffn_dim=64)
    model = build_model(cfg, seed=0)
    recipe = float8_recipe("rowwise")
    calls = []

    class Spy:
        @staticmethod
        def apply(*args):
            calls.append(args[1].shape)
            return recipe.matmul.apply(*args)

    names = enable_float8(model, dataclasses.replace(recipe, matmul=Spy))
    per_block = ["attn.wq", "attn.wk", "attn.wv", "attn.wo"]
    shared = [n for n in names if "shared" in n]
    assert shared, names
    want = {f"layers.{i}.{n}" for i in range(2) for n in per_block} | set(shared)
    assert set(names) == want
    assert model.head.fp8 is None
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    # W^T of each GEMM per block: fused q/k/v [64, 64 + 2 x 32], wo, the shared expert's fused
    # gate/up [64, 2 x 64] and its w2
    assert [tuple(c) for c in calls] == [(64, 128), (64, 64), (64, 128), (64, 64)] * 2


# ---------------------------------------------------------------- configuration and errors
def _cfg(tmp_path: Path, tokens: str, *overrides: str):
    base = ["model.preset=tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
            "model.n_kv_heads=2", "model.ffn_dim=128", f"data.paths=[{tokens}]", "data.seq_len=32",
            "training.device=cpu", "training.global_batch_size=4", "training.micro_batch_size=2",
            "training.max_steps=3", "training.eval_interval=0", "logging.tensorboard=false",
            "checkpoint.interval=0", "optimizer.lr=1e-3", "schedule.warmup_steps=0",
            f"run_dir={tmp_path / 'run'}"]
    return load_config(None, base + list(overrides))


NO_TORCHAO = "ModuleNotFoundError: No module named 'torchao'"


@pytest.mark.parametrize("value, want", [("off", "off"), ("false", "off"),
                                         ("tensorwise", "tensorwise"), ("rowwise", "rowwise")])
def test_fp8_config_values(value, want):
    assert load_config(None, [f"training.fp8={value}"]).training.fp8 == want


@pytest.mark.parametrize("overrides, message", [
    (["training.fp8=blockwise"],
     r"^training\.fp8 \('blockwise'\) must be off, tensorwise or rowwise$"),
    (["training.fp8=true"], r"^training\.fp8 \(True\) must be off, tensorwise or rowwise$"),
    (["training.fp8=rowwise", "training.precision=fp32"],
     r"^training\.fp8=rowwise needs training\.precision=bf16 \(got fp32\).*set "
     r"training\.precision=bf16 or training\.fp8=off$"),
])
def test_fp8_config_errors_are_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_fp8_needs_a_float8_gpu_unless_emulated(monkeypatch):
    cpu = (r"^training\.fp8=rowwise needs a CUDA GPU with compute capability >= 8\.9.*this run is "
           r"on cpu: set training\.fp8=off, or training\.fp8_emulate=true")
    with pytest.raises(ValueError, match=cpu) as err:
        check_float8_device("rowwise", torch.device("cpu"), emulate=False)
    assert "\n" not in str(err.value)
    check_float8_device("rowwise", torch.device("cpu"), emulate=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    a100 = (r"needs compute capability >= 8\.9 .*NVIDIA A100-SXM4-80GB has 8\.0: set "
            r"training\.fp8=off")
    with pytest.raises(ValueError, match=a100):
        check_float8_device("tensorwise", torch.device("cuda", 0), emulate=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_device("tensorwise", torch.device("cuda", 0), emulate=False)  # H100 / H200


def test_fp8_without_torchao_names_the_fix(monkeypatch):
    monkeypatch.setattr(fp8_mod, "_torchao", lambda: NO_TORCHAO)
    message = (r"^training\.fp8=tensorwise needs torchao's float8 training, which does not import "
               r"here \(ModuleNotFoundError: .*\): pip install torchao, or set training\.fp8=off$")
    with pytest.raises(ImportError, match=message):
        float8_recipe("tensorwise")


def test_float8_layers_need_16_aligned_weights():
    cfg = get_preset("tiny", **{**SHRINK, "ffn_dim": 120})
    message = (r"^training\.fp8: layers\.0\.mlp\.w1 has a local weight of shape \(120, 64\); "
               r"float8 GEMMs need both dims multiples of 16")
    with pytest.raises(ValueError, match=message):
        enable_float8(build_model(cfg, device="meta"), float8_recipe("rowwise"))
    emulated = float8_recipe("rowwise", emulate=True)
    enable_float8(build_model(cfg, device="meta"), emulated)  # emulation: any size


@pytest.mark.parametrize("emulate, torchao, error, message", [
    (False, True, ValueError, r"^training\.fp8=rowwise needs a CUDA GPU with compute capability"),
    (True, False, ImportError, r"^training\.fp8=rowwise needs torchao's float8 training"),
])
def test_trainer_refuses_fp8_before_any_work(tmp_path, tokens, monkeypatch, emulate, torchao, error,
                                             message):
    def no_work(*args, **kwargs):
        raise AssertionError("the trainer built a model before checking training.fp8")

    monkeypatch.setattr("train.trainer.build_stage_chunks", no_work)
    if not torchao:
        monkeypatch.setattr(fp8_mod, "_torchao", lambda: NO_TORCHAO)
    cfg = _cfg(tmp_path, tokens, "training.fp8=rowwise", "training.precision=bf16",
               f"training.fp8_emulate={str(emulate).lower()}")
    with pytest.raises(error, match=message) as err:
        Trainer(cfg, ParallelContext.single(), log=lambda msg: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_trainer_checks_tokens_per_micro_batch(tmp_path, tokens, monkeypatch):
    monkeypatch.setattr("train.trainer.check_float8_device", lambda *args: None)  # a float8 GPU
    cfg = _cfg(tmp_path, tokens, "training.fp8=rowwise", "training.precision=bf16",
               "data.seq_len=30", "training.micro_batch_size=1", "training.global_batch_size=2")
    message = (r"^training\.fp8=rowwise: training\.micro_batch_size x data\.seq_len \(30 tokens, "
               r".*\) must be a multiple of 16$")
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, ParallelContext.single(), log=lambda msg: None)


def test_trainer_trains_with_emulated_fp8_like_bf16(tmp_path, tokens):
    """The config reaches the layers through the trainer: three steps with training.fp8 (emulated
    on this CPU) follow the bf16 run's losses within float8 rounding, and differ from them."""
    logs = []
    runs = {}
    for fp8 in ("off", "rowwise"):
        cfg = _cfg(tmp_path / fp8, tokens, "training.precision=bf16", f"training.fp8={fp8}",
                   "training.fp8_emulate=true")
        trainer = Trainer(cfg, ParallelContext.single(), log=logs.append)
        runs[fp8] = [trainer.train_step()["loss"] for _ in range(3)]
        if fp8 != "off":
            wq = [m for n, m in trainer.model.named_modules() if n.endswith(".wq")]
            assert wq and all(m.fp8 is trainer.fp8 for m in wq)
    assert any("float8 (rowwise, emulated): 14 linears" in line for line in logs), logs
    for got, want in zip(runs["rowwise"], runs["off"]):
        assert got == pytest.approx(want, rel=LOSS_RTOL)
    assert runs["rowwise"] != runs["off"]
