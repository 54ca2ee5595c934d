"""Checkpoint edge cases that lose data or hang in real clusters: resuming an older checkpoint next
to newer ones, re-saving the resumed step, torn meta.json, one rank failing before a collective,
and gradients held twice by the reducer."""

import os

import pytest
import torch

from parallel.context import ParallelContext
from parallel.data import GradReducer
from parallel.layout import LayoutTable
from tests.distributed.harness import run_distributed
from tests.test_trainer import make_cfg, make_trainer, tokens  # noqa: F401  (fixture)
from train.checkpoint import agree, list_checkpoints, resolve_resume


def _run(tmp_path, tokens, steps, *extra, run="run"):  # noqa: F811
    cfg = make_cfg(tmp_path, tokens, f"training.max_steps={steps}", "checkpoint.interval=1",
                   "checkpoint.keep_last=5", "schedule.decay_steps=10", *extra, run=run)
    trainer = make_trainer(cfg)
    trainer.train()
    return trainer


def test_resuming_an_older_checkpoint_next_to_newer_ones_is_refused(tmp_path, tokens):  # noqa: F811
    _run(tmp_path, tokens, 3)
    root = tmp_path / "run" / "checkpoints"
    older = list_checkpoints(root)[0]
    with pytest.raises(ValueError, match=r"newer checkpoints \['step_00000002', 'step_00000003'\]") as e:
        resolve_resume(str(older), root)
    assert "\n" not in str(e.value)
    assert [p.name for p in list_checkpoints(root)] == [f"step_0000000{i}" for i in (1, 2, 3)]  # nothing lost


def test_resumed_run_at_max_steps_does_not_rewrite_its_checkpoint(tmp_path, tokens):  # noqa: F811
    _run(tmp_path, tokens, 2)
    last = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    inode = os.stat(last).st_ino
    _run(tmp_path, tokens, 2, "checkpoint.resume=auto")
    assert os.stat(last).st_ino == inode


def test_auto_resume_skips_a_torn_meta_json(tmp_path, tokens):  # noqa: F811
    _run(tmp_path, tokens, 2)
    root = tmp_path / "run" / "checkpoints"
    (list_checkpoints(root)[-1] / "meta.json").write_text('{"step": 2, "da')  # torn by a power loss
    assert resolve_resume("auto", root).name == "step_00000001"


def _agree_worker(rank, world):
    ctx = ParallelContext.for_testing(rank, world)
    try:
        agree(ctx, ValueError("rank 1 saw a bad shard") if rank == 1 else None)
    except (ValueError, RuntimeError) as e:
        return type(e).__name__
    return "no error"


@pytest.mark.slow
def test_a_rank_local_error_stops_every_rank():
    assert run_distributed(_agree_worker, 2, timeout=60) == ["RuntimeError", "ValueError"]


def test_reducer_never_holds_a_gradient_twice():
    """Each backward's gradient is added into its parameter's float32 view of one flat bucket buffer
    and freed at once (no second copy between micro-batches); after finish() the reduced gradients
    are those views, divided by dp."""
    ctx = ParallelContext.single()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ref.load_state_dict(model.state_dict())
    ctx.dp = 2  # pretend data parallelism: single-process dp buckets divide without a group
    reducer = GradReducer(list(model.parameters()), LayoutTable([model], ctx))
    x = torch.randn(2, 3, 4)
    for i, xi in enumerate(x):
        reducer.prepare(sync=i == 1)
        model(xi).sum().backward()
        ref(xi).sum().backward()
        assert all(p.grad is None for p in model.parameters())  # moved into the buffer at once
    reducer.finish()
    grads = [reducer.grad(p) for p in model.parameters()]
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 1 and all(g.dtype == torch.float32 for g in grads)
    for g, q in zip(grads, ref.parameters()):
        torch.testing.assert_close(g, q.grad / 2)
