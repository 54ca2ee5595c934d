"""`launchers/finetune.py` end to end: a real torchrun (tp=2, gloo) of DPO from one of our
checkpoints writes TRL's metric names to metrics.jsonl and TensorBoard (read back with
TensorBoard's own reader), validates at step 0 and reports truncation (the launcher's one-line
errors are tests/test_tasks.py's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_tasks import MOE, dpo_records, pretrained  # noqa: F401 - the fixture is used below

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LAUNCHER = str(REPO / "launchers" / "finetune.py")
REWARDS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]


def _config(root: Path, init_from: Path, data: Path) -> Path:
    overrides = dict(item.split("=", 1) for item in MOE)
    model = {k.split(".", 1)[1]: yaml.safe_load(v) for k, v in overrides.items()}
    cfg = {"model": model, "data": {"seq_len": 64, "cache_dir": str(root / "cache")},
           "task": {"kind": "dpo", "data": str(data), "valid_fraction": 0.25, "beta": 0.1},
           "optimizer": {"lr": 3.0e-3}, "schedule": {"warmup_steps": 0},
           "training": {"precision": "fp32", "device": "cpu", "global_batch_size": 4,
                        "micro_batch_size": 2, "max_steps": 3, "eval_interval": 3, "eval_steps": 4},
           "checkpoint": {"interval": 0, "init_from": str(init_from)},
           "logging": {"tensorboard": True, "histograms": False, "interval": 1}}
    path = root / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_dpo_tp2_logs_trl_names(tmp_path, pretrained):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in dpo_records(24)))
    config, run_dir = _config(tmp_path, pretrained, data), tmp_path / "run"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 "2", LAUNCHER, str(config), f"run_dir={run_dir}", "parallel.tp=2"], tmp_path)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"initialised weights from {pretrained}" in proc.stdout
    assert "validation at step 0: loss 0.6931 | rewards/chosen 0.0000" in proc.stdout  # pi = ref
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "split" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(set(REWARDS + ["dpo_loss", "logps/chosen"]) <= set(r) for r in steps)
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in valid] == [0, 3] and valid[-1]["rewards/margins"] != 0.0
    assert [r for r in records if r.get("split") == "data"][0]["truncated_fraction/train"] == 0.0
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{k}" for k in REWARDS} | {f"valid/{k}" for k in REWARDS} <= tags
    got = [e.value for e in events.Scalars("train/rewards/accuracies")]
    assert got == pytest.approx([r["rewards/accuracies"] for r in steps])
