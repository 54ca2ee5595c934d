"""The Trainer itself (train/trainer.py, not a re-implementation of its step) under layouts that
only it combines, against the one-process Trainer on the same config and data:

* pp=2 x dp=2 with ZeRO-1 and tied embeddings: the tied replicas (first stage's embedding, last
  stage's head) are exempt from ZeRO-1 sharding and updated on both stages, every other parameter
  by its owner alone. The first stage holds only the embedding (parallel.stage_layers=[0, 2]), so
  ZeRO-1's ownership rule would give the two replicas different dp owners: summing the tied
  gradients over the stages is then only right if neither replica is sharded;
* pp=2 x vpp=2 x dp=2: the interleaved schedule through the trainer (4 virtual stages of 1 block).

Both run the tiny MoE with capacity dropping, so the per-layer load figures and dropped fractions,
summed over pipeline stages and data-parallel ranks, are checked too. Per step: loss, LM / aux / z
loss, grad norm and every per-layer MoE figure (relative 1e-5); after 3 steps: the weights in the
final checkpoint (atol 1e-5). One 4-rank spawn runs both cases, each with its own process groups.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from parallel.context import ParallelContext
from tests.distributed.harness import run_distributed
from tests.test_trainer import read_jsonl
from train.checkpoint import list_checkpoints, load_full_model_state
from train.config import load_config
from train.data import write_token_file
from train.trainer import Trainer

pytestmark = pytest.mark.slow
MODEL = ["model.preset=tiny-moe", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=128", "model.expert_ffn_dim=32", "model.n_experts=4",
         "model.capacity_factor=1.0"]
CASES = {
    "pp2_dp2_zero1_tied": ["model.n_layers=2", "model.tie_embeddings=true", "parallel.pp=2",
                           "parallel.zero1=true", "parallel.stage_layers=[0,2]"],
    "pp2_vpp2_dp2": ["model.n_layers=4", "parallel.pp=2", "parallel.vpp=2"],
}
PARALLEL_KEYS = ("parallel.pp", "parallel.vpp", "parallel.zero1", "parallel.stage_layers")
STEPS = 3


def _config(root: str, case: str, run: str, single: bool):
    extra = [o for o in CASES[case] if not (single and o.startswith(PARALLEL_KEYS))]
    return load_config(None, [*MODEL, *extra, f"data.paths=[{root}/rand]", "data.seq_len=32",
                              "training.precision=fp32", "training.device=cpu",
                              "training.global_batch_size=8", "training.micro_batch_size=2",
                              f"training.max_steps={STEPS}", "training.eval_interval=0",
                              "schedule.warmup_steps=1", "optimizer.lr=3e-3",
                              "logging.tensorboard=false", "checkpoint.interval=0",
                              f"run_dir={root}/{case}/{run}"])


def trainer_worker(rank: int, world: int, root: str) -> dict:
    out = {}
    for case in CASES:
        cfg = _config(root, case, "layout", single=False)
        p = cfg.parallel
        ctx = ParallelContext.for_testing(rank, world, tp=p.tp, pp=p.pp, ep=p.ep, vpp=p.vpp)
        trainer = Trainer(cfg, ctx, log=lambda msg: None)
        trainer.train()
        stepped = sum(trainer.layout.updates(q) for q, _ in trainer.layout)
        out[case] = dict(coords=tuple(ctx.coords), n_params=len(trainer.layout), n_stepped=stepped,
                         zero=trainer.optimizer.zero1)
    return out


def _records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir) if "split" not in r]


def _compare(case: str, root: Path) -> float:
    got, want = _records(root / case / "layout"), _records(root / case / "single")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    scalars = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "dropped_fraction")
    keys = [k for k in want[0] if k in scalars or k.startswith("moe/")]
    assert any(k.endswith("/dropped_fraction") for k in keys) and len(keys) > 10, keys
    for k in keys:
        expected = pytest.approx([r[k] for r in want], rel=1e-5, abs=1e-7)
        assert [r[k] for r in got] == expected, f"{case}: {k}"
    assert len({r["loss"] for r in want}) == STEPS
    (layout_ckpt,), (single_ckpt,) = (list_checkpoints(root / case / run / "checkpoints")
                                      for run in ("layout", "single"))
    layout_w, single_w = load_full_model_state(layout_ckpt), load_full_model_state(single_ckpt)
    assert sorted(layout_w) == sorted(single_w)
    err = max((layout_w[n] - w).abs().max().item() for n, w in single_w.items())
    assert err <= 1e-5, f"{case}: final weights differ by {err:.3g}"
    return err


def test_trainer_pipeline_layouts_match_one_process(tmp_path):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 256, 1000) for _ in range(50)]
    write_token_file(tmp_path / "rand", docs, vocab_size=257)
    per_rank = run_distributed(trainer_worker, 4, str(tmp_path), timeout=300)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in CASES:
            Trainer(_config(str(tmp_path), case, "single", single=True), ParallelContext.single(),
                    log=lambda msg: None).train()
    finally:
        torch.set_num_threads(before)
    report = {case: _compare(case, tmp_path) for case in CASES}
    print({case: f"{err:.1e}" for case, err in report.items()})
    zero = [r["pp2_dp2_zero1_tied"] for r in per_rank]  # ranks 0, 1: the embedding; 2, 3: the rest
    # the embedding is exempt (both dp ranks step it); owners step their share of the rest
    assert [(r["n_params"], r["n_stepped"]) for r in zero[:2]] == [(1, 1), (1, 1)], zero
    assert all(r["zero"] and 1 < r["n_stepped"] < r["n_params"] for r in zero[2:]), zero
    assert [r["pp2_vpp2_dp2"]["n_params"] > 0 for r in per_rank] == [True] * 4
