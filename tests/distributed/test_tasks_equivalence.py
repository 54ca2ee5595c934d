"""Post-training tasks train exactly like one process under tensor, sequence, expert (+ZeRO-1)
and pipeline parallelism.

Each task (classify with L3 = L2 + lambda L1, SFT with packed rows and document masking, DPO with
reference log-probabilities computed under the layout) runs 3 optimizer steps through the real
Trainer on 2 gloo ranks in each layout (the interleaved pp 2 x vpp 2 one on a 4-block model), and
the single-process Trainer on the same config is the reference: every step's loss, task loss,
task scalars (accuracy, DPO rewards) and clipped grad norm must agree within rel 1e-5 (float32),
and so must the held-out metrics evaluated after the steps. One spawn runs every (layout, task)
pair in turn; the references run in the test process.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch

from parallel.context import ParallelContext
from tests.distributed.harness import run_distributed
from tests.test_tasks import MOE, RECORDS
from train.config import load_config

pytestmark = pytest.mark.slow
STEPS, RTOL = 3, 1e-5
TASKS = ("classify", "sft", "dpo")
FOUR_BLOCKS = ["model.n_layers=4"]
LAYOUTS = {  # name -> parallel overrides (world 2); the model overrides they need come first
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "ep2_dp2_zero1": ["parallel.ep=2", "parallel.zero1=true"],
    "pp2": ["parallel.pp=2"],
    "pp2_vpp2": [*FOUR_BLOCKS, "parallel.pp=2", "parallel.vpp=2"],
}


def _model_overrides(layout: list[str]) -> tuple[str, ...]:
    return tuple(o for o in layout if o.startswith("model."))


def _config(root: str, kind: str, run: str, layout: list[str]):
    """Rows of 96 positions (two SFT examples fit in one), clipping active, lambda = 0.5."""
    data = f"{root}/{kind}.jsonl"
    return load_config(None, [
        *MOE, "data.seq_len=96", "training.precision=fp32", "training.device=cpu",
        "training.global_batch_size=8", "training.micro_batch_size=2",
        f"training.max_steps={STEPS}", "training.eval_interval=0", "training.eval_steps=2",
        "logging.tensorboard=false", "checkpoint.interval=0", "optimizer.lr=3e-3",
        "optimizer.grad_clip=0.5", "schedule.warmup_steps=0", f"run_dir={root}/{run}",
        f"task.kind={kind}", f"task.data={data}", "task.valid_fraction=0.25", "task.lm_coef=0.5",
        "parallel.timeout_s=120", *layout])


def _run(cfg, ctx) -> dict:
    from train.trainer import Trainer

    trainer = Trainer(cfg, ctx, log=lambda msg: None)
    steps = [{k: float(v) for k, v in trainer.train_step().items()
              if k != "lr" and isinstance(v, (int, float))} for _ in range(STEPS)]
    return {"steps": steps, "valid": trainer.evaluate()}


def worker(rank: int, world: int, root: str) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name, layout in LAYOUTS.items():
        for kind in TASKS:
            cfg = _config(root, kind, f"{name}-{kind}-r{rank}", layout)
            p = cfg.parallel
            ctx = ParallelContext.for_testing(rank, world, tp=p.tp, pp=p.pp, ep=p.ep, vpp=p.vpp,
                                              sequence_parallel=p.sequence_parallel, timeout_s=120)
            out[(name, kind)] = _run(cfg, ctx)
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tasks")
    for kind, records in RECORDS.items():
        (root / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(40)))
    return str(root)


@functools.cache
def _reference(root: str, kind: str, model: tuple[str, ...]) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = f"single-{kind}-{len(model)}"
        return _run(_config(root, kind, run, list(model)), ParallelContext.single())
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world2(data_root):
    return run_distributed(worker, 2, data_root, timeout=600)


def _rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-6)


def _close(got: float, want: float) -> bool:
    return _rel(got, want) <= RTOL


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", TASKS)
def test_task_layout_matches_single_process(world2, data_root, layout, kind):
    ref = _reference(data_root, kind, _model_overrides(LAYOUTS[layout]))
    first, last = ref["steps"][0], ref["steps"][-1]
    assert first["grad_norm"] > 0.5 and last["loss"] != first["loss"]  # clipped; the model moves
    pairs = [(g, w) for r in world2 for g, w in zip(r[(layout, kind)]["steps"], ref["steps"])]
    worst = max(_rel(g[k], w[k]) for g, w in pairs for k in w)
    print(f"{layout}/{kind}: worst relative difference over steps {worst:.1e}")
    for rank, per_rank in enumerate(world2):
        got = per_rank[(layout, kind)]
        for step, (g, w) in enumerate(zip(got["steps"], ref["steps"])):
            assert set(g) == set(w)
            bad = {k: (g[k], w[k]) for k in w if not _close(g[k], w[k])}
            assert not bad, f"{layout}/{kind} rank {rank} step {step}: (got, single process) {bad}"
        bad = {k: (got["valid"][k], v) for k, v in ref["valid"].items()
               if not _close(got["valid"][k], v)}
        assert not bad, f"{layout}/{kind} rank {rank} validation: {bad}"
