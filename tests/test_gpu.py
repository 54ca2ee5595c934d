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
