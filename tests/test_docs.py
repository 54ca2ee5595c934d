"""The docs that users and CI rely on stay true to the code."""

import dataclasses
import re
from pathlib import Path

from moe.config import ModelConfig
from train import config as tc

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_is_documented():
    doc = (ROOT / "docs/configuration.md").read_text()
    sections = {"model": ModelConfig, "parallel": tc.ParallelConfig, "data": tc.DataConfig,
                "optimizer": tc.OptimizerConfig, "schedule": tc.ScheduleConfig, "training": tc.TrainingConfig,
                "checkpoint": tc.CheckpointConfig, "logging": tc.LoggingConfig}
    for name, cls in sections.items():
        body = doc.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(cls):
            assert re.search(rf"^\| `{f.name}` \| .+ \| \S", body, re.M), f"{name}.{f.name} undocumented"


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", readme)
    assert len(commands) == 2, "README quick start must be exactly two commands"
    test_cmd = commands[1].split(" && ", 2)[2]
    assert test_cmd in (ROOT / ".ci/run").read_text()
