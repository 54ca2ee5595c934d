"""Restart without a human, for real: `torchrun --max-restarts 1 ... --resume` on 2 ranks, one
worker killed with SIGKILL mid-run. The job must finish by itself, resumed from its newest verified
checkpoint, with per-step losses equal to an uninterrupted run: bit-exact against the killed
attempt's own rows (same layout) and to 1e-5 against one process. Then a new run in the same
run_dir is refused with one error line (not one per rank, no traceback)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.test_launch import (LAUNCHER, _env, _single_process,  # noqa: F401
                                           config_file)
from tests.test_trainer import train_losses

pytestmark = pytest.mark.slow
STEPS = 20  # enough that the kill lands mid-run on an idle machine too


def _worker_pid(agent_pid: int, rank: int) -> int | None:
    """The torchrun worker (a child of the agent) whose environment says RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _kill_rank1_after(proc: subprocess.Popen, run_dir: Path, rows: int) -> int:
    """SIGKILL rank 1 once metrics.jsonl has `rows` rows and step 2's checkpoint is complete."""
    deadline = time.monotonic() + 180
    metrics = run_dir / "metrics.jsonl"
    ckpt = run_dir / "checkpoints" / "step_00000002" / "meta.json"
    while not (ckpt.is_file() and metrics.is_file()
               and len(metrics.read_text().splitlines()) >= rows):
        assert proc.poll() is None, f"torchrun ended before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress after 180 s"
        time.sleep(0.05)
    pid = _worker_pid(proc.pid, 1)
    assert pid is not None, "rank 1 not found among torchrun's children"
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_worker_restarts_and_the_job_finishes_with_the_same_losses(
        config_file, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", LAUNCHER, str(config_file), f"run_dir={run_dir}",
           f"training.max_steps={STEPS}", "checkpoint.interval=2", "--resume"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _kill_rank1_after(proc, run_dir, rows=3)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"the job did not finish by itself:\n{out[-3000:]}\n{err[-3000:]}"
    starts = json.loads((run_dir / "run.json").read_text())["starts"]
    assert len(starts) == 2 and starts[0]["step"] == 0 and starts[1]["step"] >= 2, starts
    resumed = starts[1]["step"]
    ckpt = run_dir / "checkpoints" / f"step_{resumed:08d}"
    assert f"resumed from {ckpt} at step {resumed}" in out

    final = train_losses(run_dir)
    assert sorted(final) == list(range(1, STEPS + 1))  # each step once
    (aside,) = (run_dir / "aside").iterdir()
    killed = train_losses(aside)  # the attempt that lost a worker
    redone = [s for s in killed if s > resumed]
    assert redone and all(final[s] == killed[s] for s in killed)  # bit-exact where both ran

    _single_process(config_file, tmp_path / "single", f"training.max_steps={STEPS}").train()
    single = train_losses(tmp_path / "single")
    assert [final[s] for s in sorted(final)] == pytest.approx([single[s] for s in sorted(single)],
                                                              rel=1e-5)

    # a new run (no --resume) in the same run_dir: refused, once, in one line, exit status 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           LAUNCHER, str(config_file), f"run_dir={run_dir}", "training.max_steps=3"]
    again = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=240)
    ours = [line for line in again.stderr.splitlines() if line.startswith("error")]
    assert again.returncode != 0 and len(ours) == 1, again.stderr
    assert ours[0].startswith(f"error: {run_dir / 'checkpoints'} already holds checkpoints of run")
    assert "exitcode: 2" in again.stderr and "[rank" not in again.stderr, again.stderr
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))  # untouched
