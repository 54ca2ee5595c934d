"""launchers/slurm/pretrain.sbatch under a real SLURM (two nodes on one host, ../shared/tools/slurm-local):
a 2-rank data-parallel job, preempted mid-run, requeued and resumed, must reproduce the
single-process losses. One job covers both the launch and the requeue. Skipped where sbatch is
missing."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from parallel.context import ParallelContext
from train.config import load_config
from train.data import write_token_file
from train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
SLURM_CONF = os.environ.get("SLURM_CONF", "/tmp/slurm-local/etc/slurm.conf")


def _slurm_up() -> bool:
    """sbatch is installed and a controller answers (scontrol ping), e.g. after slurm-local/start.sh."""
    if shutil.which("sbatch") is None or not Path(SLURM_CONF).exists():
        return False
    ping = subprocess.run(["scontrol", "ping"], env={**os.environ, "SLURM_CONF": SLURM_CONF},
                          capture_output=True, text=True, timeout=30)
    return ping.returncode == 0 and "UP" in ping.stdout


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _slurm_up(), reason="no running SLURM here (start ../shared/tools/slurm-local/start.sh)")]


OVERRIDES = ["model.preset=tiny-moe", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
             "model.n_experts=4", "model.expert_ffn_dim=32", "data.seq_len=32", "training.global_batch_size=8",
             "training.micro_batch_size=2", "training.max_steps=20", "training.precision=fp32", "training.device=cpu",
             "training.eval_interval=0", "checkpoint.interval=2", "logging.tensorboard=false"]


def _single_process(overrides: list[str], run_dir: Path) -> None:
    """The reference: the same config in this process."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, f"run_dir={run_dir}"])
    Trainer(cfg, ParallelContext.single(), log=lambda msg: None).train()


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "split" not in r]


def _corpus(tmp_path: Path) -> Path:
    """20k random byte tokens in 5 documents; returns the token-file prefix."""
    rng = np.random.default_rng(0)
    prefix = tmp_path / "corpus"
    write_token_file(prefix, [rng.integers(0, 256, 4000).tolist() for _ in range(5)],
                     vocab_size=257)
    return prefix


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}  # a job in any other state (REQUEUED, PENDING, ...) is not over


def _squeue(name: str) -> tuple[str, str, str] | None:
    """(job id, state, reason) of the job called `name` in any state (an ended job stays listed
    for MinJobAge seconds), or None once it has left."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i %T %r"],
                         env={**os.environ, "SLURM_CONF": SLURM_CONF}, capture_output=True,
                         text=True, timeout=30).stdout.split()
    return tuple(out[:3]) if len(out) >= 3 else None


def _submit(name: str, nodes: int, out: Path, overrides: list[str], env: dict) -> subprocess.Popen:
    """sbatch --wait of pretrain.sbatch on configs/tiny.yaml, one task per node."""
    return subprocess.Popen(["sbatch", "--wait", "--job-name", name, "--nodes", str(nodes),
                             "--ntasks-per-node", "1", "--output", str(out),
                             "launchers/slurm/pretrain.sbatch", "configs/tiny.yaml", *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _slurm(*args: str) -> None:
    subprocess.run(list(args), env={**os.environ, "SLURM_CONF": SLURM_CONF}, check=True, timeout=30)


def test_sbatch_job_preempted_requeued_and_resumed_matches_single_process(tmp_path):
    """SIGUSR1 (what `#SBATCH --signal=USR1@120` sends before the time limit) mid-run: both ranks
    stop at one step with a checkpoint and exit 75, pretrain.sbatch requeues the job, and the
    requeued job resumes and finishes; its losses equal one process's. The lab SLURM holds a
    requeued job ~2 minutes (its credential lifetime) before it may start again: the test releases
    it with `scontrol update StartTime=now+2`. Not `now`: the old credential is revoked at a
    one-second resolution, and an allocation in the same second as the requeue is killed as
    "Job credential revoked" (the job then ends FAILED, seen on this machine)."""
    prefix = _corpus(tmp_path)
    common = [*OVERRIDES, f"data.paths=[{prefix}]"]
    run, out, name = tmp_path / "slurm", tmp_path / "slurm.out", f"requeue-{os.getpid()}"
    env = {**os.environ, "PYTHON": sys.executable, "REPO": str(ROOT), "SLURM_CONF": SLURM_CONF,
           "SRUN_WAIT": "20"}
    job = _submit(name, 2, out, [*common, f"run_dir={run}"], env)
    try:
        deadline, signalled, released = time.monotonic() + 300, False, False
        while job.poll() is None:
            assert time.monotonic() < deadline, "job not done after 300 s"
            metrics = run / "metrics.jsonl"
            rows = metrics.read_text().splitlines() if metrics.exists() else []
            queued = _squeue(name)
            if not signalled and len(rows) >= 2 and queued and queued[1] == "RUNNING":
                _slurm("scancel", "--signal=USR1", queued[0])  # to its tasks, as --signal does
                signalled = True
            elif signalled and not released and queued and queued[1:] == ("PENDING", "BeginTime"):
                _slurm("scontrol", "update", f"JobId={queued[0]}", "StartTime=now+2")
                released = True
            time.sleep(0.2)
        stdout, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
        subprocess.run(["scancel", "--name", name], env={**os.environ, "SLURM_CONF": SLURM_CONF},
                       capture_output=True, timeout=30)  # a no-op unless the test failed mid-job
    log = out.read_text() if out.exists() else ""
    assert job.returncode == 0 and signalled and released, f"{stdout}\n{stderr}\n{log[-4000:]}"
    stop = re.search(r"SIGUSR1: stopping at step (\d+) with a final checkpoint", log)
    assert stop and 2 <= int(stop.group(1)) < 20, log[-4000:]
    assert "stopped with a checkpoint (exit 75): requeueing job" in log
    assert "(restart 1): resuming" in log
    assert f"resumed from {run / 'checkpoints' / f'step_{int(stop.group(1)):08d}'}" in log
    assert log.count("2 process(es)") == 2  # both attempts ran the 2-rank layout
    _single_process(common, tmp_path / "single")
    got, ref = _losses(run), _losses(tmp_path / "single")
    assert len(got) == len(ref) == 20  # every step once
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_cancelled_job_saves_and_stays_cancelled(tmp_path):
    """scancel sends SIGTERM too: the ranks save (within SLURM's KillWait) and exit 75, but a job
    being cancelled is not requeued: it would come back after the user cancelled it."""
    prefix = _corpus(tmp_path)
    common = [*OVERRIDES, f"data.paths=[{prefix}]", "training.max_steps=100000"]
    run, out, name = tmp_path / "slurm", tmp_path / "slurm.out", f"cancel-{os.getpid()}"
    env = {**os.environ, "PYTHON": sys.executable, "REPO": str(ROOT), "SLURM_CONF": SLURM_CONF}
    job = _submit(name, 1, out, [*common, f"run_dir={run}"], env)
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
            assert job.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        _slurm("scancel", "--name", name)
        job.communicate(timeout=120)
        time.sleep(3)  # a requeued job would be PENDING by now
        queued = _squeue(name)
        assert queued is None or queued[1] in ENDED | {"COMPLETING"}, \
            f"the cancelled job came back: {queued}"
    finally:
        if job.poll() is None:
            job.kill()
        subprocess.run(["scancel", "--name", name], env={**os.environ, "SLURM_CONF": SLURM_CONF},
                       capture_output=True, timeout=30)
    log = out.read_text()
    stop = re.search(r"SIGTERM: stopping at step (\d+) with a final checkpoint", log)
    assert stop and "requeueing" not in log, log[-3000:]
    assert (run / "checkpoints" / f"step_{int(stop.group(1)):08d}" / "meta.json").is_file()
