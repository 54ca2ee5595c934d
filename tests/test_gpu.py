"""GPU checks (skipped without CUDA): the bf16 fast paths agree with the float32 reference on the
device, and a bf16 training step runs. Run on a GPU machine with `python -m pytest -q -m gpu`."""

import pytest
import torch

from moe.config import get_preset
from moe.moe_layer import MoELayer
from parallel.context import ParallelContext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _layer(backend: str) -> MoELayer:
    cfg = get_preset("tiny-moe", d_model=256, expert_ffn_dim=512, n_experts=8, expert_backend=backend)
    torch.manual_seed(0)
    layer = MoELayer(cfg, ParallelContext.single("cuda")).cuda()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer


@pytest.mark.parametrize("backend", ["grouped_mm", "padded"])
def test_bf16_backends_match_fp32_loop_on_cuda(backend):
    x = torch.randn(4, 512, 256, device="cuda")
    ref_layer, layer = _layer("loop"), _layer(backend)
    layer.load_state_dict(ref_layer.state_dict())
    ref, _ = ref_layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = layer(x)
    out.float().sum().backward()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bf16_training_steps_on_cuda(tmp_path):
    from train.config import load_config
    from train.data import write_token_file
    from train.trainer import Trainer

    write_token_file(tmp_path / "tok", [list(range(256)) * 40], vocab_size=257)
    cfg = load_config("configs/tiny.yaml", [f"data.paths=[{tmp_path / 'tok'}]", f"run_dir={tmp_path / 'run'}",
                                           "training.max_steps=5", "training.precision=bf16", "training.device=cuda",
                                           "training.eval_interval=0", "checkpoint.interval=0"])
    last = Trainer(cfg, ParallelContext.single("cuda"), log=lambda m: None).train()
    assert torch.isfinite(torch.tensor(last["loss"])) and last["grad_norm"] > 0


def test_moe_layer_benchmark_runs_on_cuda():
    from benchmarks import moe_layer

    result = moe_layer.main(["--shapes", "2048x512x256x8x2", "--iters", "3", "--warmup", "1", "--device", "cuda"])
    assert result


# ---------------------------------------------------------------- moe.kernels: Triton against the torch path
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (2, 500, 2 * 1408)), (torch.float32, (37, 2 * 24))])
def test_triton_swiglu_matches_torch_path(dtype, shape):
    from moe.kernels import swiglu, use_triton

    if not use_triton(torch.empty(0, device="cuda")):
        pytest.skip("triton does not import here")
    h = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", dtype=dtype)
    out = swiglu(h)
    out.backward(g)
    h_ref = h.detach().cpu().double().requires_grad_()
    ref = swiglu(h_ref)  # torch path on CPU, float64
    ref.backward(g.cpu().double())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert out.dtype == dtype and h.grad.dtype == dtype
    assert _rel(out.cpu(), ref) < tol and _rel(h.grad.cpu(), h_ref.grad) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("capacity", [None, 200])
def test_triton_permutation_rows_match_torch_path(dtype, capacity):
    from moe.kernels import combine_rows, gather_rows, use_triton
    from moe.moe_layer import permute

    if not use_triton(torch.empty(0, device="cuda")):
        pytest.skip("triton does not import here")
    T, k, E, D = 1000, 2, 8, 520
    gen = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).cuda()
    weights = torch.rand(T, k, generator=gen).softmax(-1).cuda().requires_grad_()
    perm = permute(experts, weights, E, capacity=capacity)
    assert capacity is None or (perm.slot_row == perm.token_idx.numel()).any()  # some slots dropped
    x = torch.randn(T, D, device="cuda", dtype=dtype, requires_grad=True)
    rows = gather_rows(x, perm.token_idx, perm.slot_row)
    y = rows * torch.linspace(0.5, 1.5, D, device="cuda", dtype=dtype)  # any per-row function
    out = combine_rows(y, perm.weights, perm.token_idx, perm.slot_row)
    g = torch.randn(T, D, device="cuda", dtype=dtype)
    out.backward(g)

    cpu = lambda t: t.detach().cpu().double().requires_grad_()  # noqa: E731
    x_ref, w_ref = cpu(x), cpu(weights)
    perm_ref = permute(experts.cpu(), w_ref, E, capacity=capacity)
    rows_ref = x_ref[perm_ref.token_idx]
    y_ref = rows_ref * torch.linspace(0.5, 1.5, D, dtype=dtype).double()
    ref = torch.zeros(T, D, dtype=torch.float64).index_add(0, perm_ref.token_idx, y_ref * perm_ref.weights[:, None])
    ref.backward(g.cpu().double())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert out.dtype == dtype
    assert _rel(out.cpu(), ref) < tol
    assert _rel(x.grad.cpu(), x_ref.grad) < tol
    assert _rel(weights.grad.cpu(), w_ref.grad) < tol


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # full and partial (GLM-style) rotary
def test_triton_rope_matches_apply_rope(interleaved, rotary_dim):
    from moe.kernels import rope_triton, use_triton
    from moe.layers import apply_rope

    if not use_triton(torch.empty(0, device="cuda")):
        pytest.skip("triton does not import here")
    B, S, H, K, Dh = 2, 37, 6, 2, 64
    qkv = torch.randn(B, S, (H + 2 * K) * Dh, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q = qkv[..., : H * Dh].view(B, S, H, Dh)  # a strided view, as in Attention
    angles = torch.rand(S + 5, rotary_dim // 2, device="cuda") * 6.28
    out = rope_triton(q, angles.cos(), angles.sin(), interleaved)
    g = torch.randn_like(out)
    out.backward(g)
    q_ref = q.detach().cpu().double().requires_grad_()
    cos, sin = angles[:S].cos().cpu().double(), angles[:S].sin().cpu().double()
    ref = apply_rope(q_ref.transpose(1, 2), cos, sin, interleaved).transpose(1, 2)
    ref.backward(g.cpu().double())
    assert out.shape == (B, S, H, Dh) and out.dtype == torch.bfloat16
    assert _rel(out.cpu(), ref) < 1e-2
    assert _rel(qkv.grad[..., : H * Dh].view(B, S, H, Dh).cpu(), q_ref.grad) < 1e-2
    assert (qkv.grad[..., H * Dh:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_cross_entropy_matches_torch_path(dtype):
    from parallel.kernels import use_triton
    from parallel.tensor import vocab_parallel_cross_entropy

    if not use_triton(torch.empty(0, device="cuda")):
        pytest.skip("triton does not import here")
    B, S, V = 3, 50, 5003  # V not a multiple of the kernel's block
    logits = (torch.randn(B, S, V, device="cuda") * 4).to(dtype)
    logits[..., 5000:] = float("-inf")  # padded vocab columns
    logits.requires_grad_()
    targets = torch.randint(0, 5000, (B, S), device="cuda")
    targets[0, :7] = -100
    loss = vocab_parallel_cross_entropy(logits, targets, None, ignore_index=-100)
    g = torch.rand(B, S, device="cuda")
    loss.backward(g)
    ref_logits = logits.detach().cpu().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits.transpose(1, 2), targets.cpu(), reduction="none",
                                            ignore_index=-100)
    ref.backward(g.cpu().double())
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert _rel(loss.cpu(), ref) < 1e-5
    assert _rel(logits.grad.cpu(), ref_logits.grad) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert (logits.grad[0, :7] == 0).all() and (logits.grad[..., 5000:] == 0).all()


# ---------------------------------------------------------------- training.fp8: float8 GEMMs
def _float8_gpu() -> bool:
    import importlib.util

    has_torchao = importlib.util.find_spec("torchao") is not None
    return has_torchao and torch.cuda.get_device_capability() >= (8, 9)


needs_float8 = pytest.mark.skipif(not torch.cuda.is_available() or not _float8_gpu(),
                                  reason="needs torchao and a GPU of compute capability >= 8.9")


@needs_float8
@pytest.mark.parametrize("name", ["tensorwise", "rowwise"])
def test_float8_gemms_on_cuda_match_emulation(name):
    """cuBLAS / CUTLASS float8 GEMMs against torchao's emulation (float32 GEMMs on the same float8
    operands), forward and both gradients, and against the bf16 GEMM within float8 rounding."""
    from parallel.fp8 import float8_linear, float8_recipe

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2048, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(5632, 2048, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    gy = torch.randn(4096, 5632, device="cuda", generator=g).to(torch.bfloat16)
    outs = {}
    for kind in ("hw", "emulated", "bf16"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        if kind == "bf16":
            y = torch.nn.functional.linear(xi, wi)
        else:
            y = float8_linear(xi, wi, None, float8_recipe(name, emulate=kind == "emulated"))
        y.backward(gy)
        outs[kind] = (y.detach(), xi.grad, wi.grad)
    for hw, em, ref in zip(outs["hw"], outs["emulated"], outs["bf16"]):
        assert _rel(hw, em) < 2e-2  # fast accumulation in the forward GEMM, float32 emulation
        assert 1e-3 < _rel(hw, ref) < 0.1


@needs_float8
def test_fp8_training_steps_on_cuda_follow_bf16(tmp_path):
    """The trainer with training.fp8=rowwise on the GPU: five steps within float8 rounding of
    bf16."""
    from train.config import load_config
    from train.data import write_token_file
    from train.trainer import Trainer

    write_token_file(tmp_path / "tok", [list(range(256)) * 40], vocab_size=257)
    losses = {}
    for fp8 in ("off", "rowwise"):
        cfg = load_config("configs/tiny.yaml", [
            f"data.paths=[{tmp_path / 'tok'}]", f"run_dir={tmp_path / fp8}", "model.ffn_dim=352",
            "model.expert_ffn_dim=128", "training.max_steps=5", "training.precision=bf16",
            f"training.fp8={fp8}", "training.device=cuda", "training.eval_interval=0",
            "checkpoint.interval=0"])
        trainer = Trainer(cfg, ParallelContext.single("cuda"), log=lambda m: None)
        losses[fp8] = [trainer.train_step()["loss"] for _ in range(5)]
    assert losses["rowwise"] == pytest.approx(losses["off"], rel=1e-2)
    assert losses["rowwise"] != losses["off"]


@needs_float8
def test_train_step_benchmark_fp8_rows_run_on_cuda():
    from benchmarks import train_step

    result = train_step.main(["--configs", "dense-1.1b,moe-16x", "--batch-size", "1", "--seq-len",
                              "256", "--steps", "2", "--warmup", "1", "--fp8",
                              "off,tensorwise,rowwise", "--device", "cuda"])
    want = ["mixed", "mixed+fp8 tensorwise", "mixed+fp8 rowwise"]
    for res in result["results"]:
        assert [r["precision"] for r in res["rows"]] == want
        assert all("error" not in r for r in res["rows"]), res["rows"]
