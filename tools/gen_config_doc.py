"""Regenerate the field tables of docs/configuration.md from the dataclass definitions.

Each field's description is the trailing comment on its line in moe/config.py / train/config.py,
so the code stays the single source. Run: python tools/gen_config_doc.py > docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.config import ModelConfig  # noqa: E402
from train import config as tc  # noqa: E402

FIELD_LINE = re.compile(r"^\s+(\w+): [^=]+= (.+?)\s+#\s*(.*)$")
SECTIONS = [("(top level)", None), ("model", ModelConfig), ("parallel", tc.ParallelConfig), ("data", tc.DataConfig),
            ("optimizer", tc.OptimizerConfig), ("schedule", tc.ScheduleConfig), ("training", tc.TrainingConfig),
            ("checkpoint", tc.CheckpointConfig), ("logging", tc.LoggingConfig),
            ("task", tc.TaskConfig)]


def comments(path: Path) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the trailing comment on the field's line (fields of the same name
    in two sections, e.g. checkpoint.interval and logging.interval, keep their own comments)."""
    out, cls = {}, ""
    for line in path.read_text().splitlines():
        if line.startswith("class "):
            cls = line.split()[1].split("(")[0].rstrip(":")
        m = FIELD_LINE.match(line)
        if m:
            out.setdefault((cls, m.group(1)), m.group(3))
    return out


def table(cls, notes: dict[str, str]) -> list[str]:
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name == "model":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        note = notes.get((cls.__name__, f.name), "").replace(" | ", " / ")
        rows.append(f"| `{f.name}` | `{default!r}` | {note} |")
    return rows


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    notes = {**comments(root / "train/config.py")}
    model_notes = comments(root / "moe/config.py")
    print(Path(root / "docs/configuration.head.md").read_text().rstrip() + "\n")
    for name, cls in SECTIONS:
        if cls is None:
            print("## Top level\n")
            print("\n".join(["| field | default | meaning |", "|---|---|---|",
                             f"| `run_dir` | `'runs/default'` | {notes[('TrainConfig', 'run_dir')]} |"]) + "\n")
            continue
        print(f"## `{name}`\n")
        print("\n".join(table(cls, model_notes if cls is ModelConfig else notes)) + "\n")


if __name__ == "__main__":
    main()
