"""`training.compile: true` through the trainer: every block compiled, the same losses and grad
norms as eager, and a checkpoint that an eager run resumes (parameter names without torch.compile's
wrapper). The compiler runs with the `aot_eager` backend: Dynamo's capture and AOTAutograd's
forward/backward graphs are the real ones, only inductor's code generation (a C++ build per graph,
about a minute per block on a 2-core CPU) is left to torch's own tests."""
import functools

import pytest
import torch

from parallel.context import ParallelContext
from train.checkpoint import list_checkpoints
from train.config import load_config
from train.trainer import Trainer
from tests.test_trainer import tokens  # noqa: F401 - the 50k-token random byte file fixture

pytestmark = pytest.mark.slow
SHRINK = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
          "model.ffn_dim=128"]
MODELS = {"dense": ["model.preset=tiny"],
          "moe": ["model.preset=tiny-moe", "model.n_experts=4", "model.expert_ffn_dim=32"],
          "dense_dropout": ["model.preset=tiny", "model.dropout=0.1"]}  # graph break per dropout


def _trainer(tmp_path, tokens, model: str, run: str, *extra: str) -> Trainer:
    cfg = load_config(None, [*MODELS[model], *SHRINK, f"data.paths=[{tokens}]", "data.seq_len=32",
                             "training.precision=fp32", "training.device=cpu",
                             "training.global_batch_size=4", "training.micro_batch_size=2",
                             "training.max_steps=2", "training.eval_interval=0",
                             "logging.tensorboard=false", "checkpoint.interval=0",
                             f"run_dir={tmp_path / run}", *extra])
    return Trainer(cfg, ParallelContext.single(), log=lambda msg: None)


@pytest.mark.parametrize("model", list(MODELS))
def test_compiled_blocks_train_like_eager_and_resume_eagerly(tmp_path, tokens, model, monkeypatch):
    eager = _trainer(tmp_path, tokens, model, "eager")
    want = [eager.train_step() for _ in range(2)]
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    compiled = _trainer(tmp_path, tokens, model, "compiled", "training.compile=true")
    blocks = compiled.model.layers.values()
    assert all(type(block).__name__ == "OptimizedModule" for block in blocks)
    got = compiled.train()
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(want[-1][key], rel=1e-6), key
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # Dynamo captured graphs
    (ckpt,) = list_checkpoints(tmp_path / "compiled" / "checkpoints")
    resumed = _trainer(tmp_path, tokens, model, "resumed", f"checkpoint.resume={ckpt}")
    assert resumed.step == 2
    weights = {n.replace("._orig_mod", ""): p for n, p in compiled.model.named_parameters()}
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, weights[name]), name
    assert set(weights) == {n for n, _ in eager.model.named_parameters()}
