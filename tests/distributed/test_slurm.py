"""launchers/slurm/pretrain.sbatch under a real SLURM (two nodes on one host, ../shared/tools/slurm-local):
a 2-rank data-parallel job must reproduce the single-process losses. Skipped where sbatch is missing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.data import write_token_file

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
             "training.micro_batch_size=2", "training.max_steps=3", "training.precision=fp32", "training.device=cpu",
             "training.eval_interval=0", "checkpoint.interval=0", "logging.tensorboard=false"]


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "split" not in r]


def test_sbatch_data_parallel_matches_single_process(tmp_path):
    rng = np.random.default_rng(0)
    prefix = tmp_path / "corpus"
    write_token_file(prefix, [rng.integers(0, 256, 4000).tolist() for _ in range(5)], vocab_size=257)
    common = OVERRIDES + [f"data.paths=[{prefix}]"]
    env = {**os.environ, "PYTHON": sys.executable, "REPO": str(ROOT)}
    env["SLURM_CONF"] = SLURM_CONF
    single = subprocess.run([sys.executable, "launchers/pretrain.py", "configs/tiny.yaml", *common,
                             f"run_dir={tmp_path / 'single'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    out = tmp_path / "slurm.out"
    job = subprocess.run(["sbatch", "--wait", "--nodes", "2", "--ntasks-per-node", "1", "--output", str(out),
                          "launchers/slurm/pretrain.sbatch", "configs/tiny.yaml", *common,
                          f"run_dir={tmp_path / 'slurm'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=400)
    log = out.read_text() if out.exists() else ""
    assert job.returncode == 0, job.stderr + log[-3000:]
    assert "2 process(es)" in log
    ref, got = _losses(tmp_path / "single"), _losses(tmp_path / "slurm")
    assert len(got) == len(ref) == 3
    np.testing.assert_allclose(got, ref, rtol=1e-5)
