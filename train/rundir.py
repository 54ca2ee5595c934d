"""Who owns a run directory, and what starting, resuming or rolling back a run does to it.

A run has an id, recorded in <run_dir>/run.json (with one entry per start: time, step, checkpoint)
and in every checkpoint's meta.json. The rules, all decided by rank 0 and moved with renames only:
* a new run (checkpoint.resume=none) refuses a checkpoint directory that holds checkpoints: they
  belong to an earlier run. checkpoint.overwrite=true moves them to <checkpoint dir>/aside/; the
  earlier run's metrics.jsonl, tb/, config.yaml and run.json go to <run_dir>/aside/ either way;
* resuming step S of this directory moves every newer checkpoint (an abandoned or unverifiable
  timeline) to <checkpoint dir>/aside/; resuming a checkpoint from elsewhere treats the directory's
  own checkpoints as a new run would;
* a resumed run keeps the rows of metrics.jsonl up to step S (the whole file moves to
  <run_dir>/aside/ first) and TensorBoard purges its events from step S + 1 (`purge_step`), so no
  curve is drawn twice;
* a resumed run must be the same model: every architecture field of the checkpoint's config equals
  this run's (moe.config.TRAINING_ONLY and the other sections may change; the log lists them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from moe.config import TRAINING_ONLY, ModelConfig

from .checkpoint import (ResumeChoice, list_checkpoints, move_aside, on_rank0_for_all, read_meta,
                         step_of)
from .config import TrainConfig

RUN_FILE = "run.json"
LOG_FILES = ("metrics.jsonl", "tb", "config.yaml", RUN_FILE)  # written beside the checkpoints
_STEP = re.compile(r'^\{"step": (\d+)[,}]')  # MetricsLogger writes "step" first


class RunStart(NamedTuple):
    run_id: str
    resume_from: Path | None  # the verified checkpoint to restore, None = from scratch
    step: int                 # the step the run continues from
    purge_step: int | None    # TensorBoard hides events from this step on (None: nothing to hide)


def start_run(cfg: TrainConfig, ckpt_dir: Path, choice: ResumeChoice, ctx,
              log: Callable[[str], None]) -> RunStart:
    """Collective: claim run_dir for a run that starts from `choice` (already verified on every
    rank). Rank 0 checks the model, moves what must make way, truncates metrics.jsonl and records
    the start in run.json; every rank gets the same RunStart, or raises the same error."""
    for name, why in choice.skipped:
        log(f"warning: skipped checkpoint {name}: {why}")
    return on_rank0_for_all(ctx, lambda: _claim(cfg, ckpt_dir, choice, log))


def _claim(cfg: TrainConfig, ckpt_dir: Path, choice: ResumeChoice, log) -> RunStart:
    run_dir, path = Path(cfg.run_dir), choice.path
    meta = read_meta(path) if path is not None else None
    if meta is not None:
        if meta.get("files") is None:
            log(f"warning: {path} predates checksums: its files are used unverified")
        check_same_model(meta.get("config", {}).get("model", {}), cfg.model, path)
        changed = setting_changes(meta.get("config", {}), cfg.to_dict())
        if changed:
            log(f"resume: settings changed since {path.name}: {', '.join(changed)}")
    step = int(meta["step"]) if meta is not None else 0
    _make_way(cfg, ckpt_dir, path, step, log)
    purge = None
    if _continues_here(path, ckpt_dir):  # this run_dir's logs are its past up to `step`
        truncated = truncate_metrics(run_dir, step, log)
        purge = step + 1 if truncated or (run_dir / "tb").is_dir() else None
    else:
        logs = [run_dir / f for f in LOG_FILES if (run_dir / f).is_dir() or _size(run_dir / f)]
        _set_aside(move_aside(logs, run_dir, "earlier-run"), "the earlier run's logs", log)
    run_id = (meta or {}).get("run_id") or new_run_id()
    record_start(run_dir, run_id, step, path)
    return RunStart(run_id, path, step, purge)


def _continues_here(path: Path | None, ckpt_dir: Path) -> bool:
    return path is not None and path.resolve().parent == ckpt_dir.resolve()


def _make_way(cfg: TrainConfig, ckpt_dir: Path, path: Path | None, step: int, log) -> None:
    """Move aside the checkpoints that are not this run's past: newer than the resumed one in the
    same directory, or all of them when the run does not continue from this directory (refused
    without checkpoint.overwrite=true)."""
    existing = list_checkpoints(ckpt_dir)
    if _continues_here(path, ckpt_dir):
        newer = [c for c in existing if step_of(c) > step]
        dest = move_aside(newer, ckpt_dir, f"after-{path.name}")
        _set_aside(dest, f"{len(newer)} newer checkpoint(s)", log)
        return
    if not existing:
        return
    if not cfg.checkpoint.overwrite:
        owner = _recorded_run_id(Path(cfg.run_dir))
        whose = f" of run {owner}" if owner else ""
        span = f"{existing[0].name} .. {existing[-1].name}"
        raise ValueError(f"{ckpt_dir} already holds checkpoints{whose} ({span}): continue that run "
                         f"with --resume (checkpoint.resume=auto), use a new run_dir, or set "
                         f"checkpoint.overwrite=true to move them to {ckpt_dir / 'aside'} (nothing "
                         f"is deleted)")
    dest = move_aside(existing, ckpt_dir, "overwritten")
    _set_aside(dest, f"{len(existing)} earlier checkpoint(s)", log)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _set_aside(dest: Path | None, what: str, log) -> None:
    if dest is not None:
        log(f"moved {what} to {dest}")


# ------------------------------------------------------------------------------------------ run id
def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _recorded_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def record_start(run_dir: Path, run_id: str, step: int, path: Path | None) -> None:
    """run.json: the run id and one entry per start (time, step, checkpoint), written atomically."""
    record: dict[str, Any] = {"run_id": run_id, "starts": []}
    try:
        old = json.loads((run_dir / RUN_FILE).read_text())
        if old.get("run_id") == run_id:
            record["starts"] = list(old.get("starts", []))
    except (OSError, ValueError, AttributeError):
        pass
    record["starts"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step,
                             "checkpoint": None if path is None else str(path)})
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, run_dir / RUN_FILE)


# ----------------------------------------------------------------------------------- resume checks
def check_same_model(saved: dict[str, Any], model: ModelConfig, path: Path) -> None:
    """One-line ValueError listing every architecture field (all ModelConfig fields but
    TRAINING_ONLY) whose value differs between the checkpoint's config and this run's; a field
    the checkpoint predates counts as its default."""
    diffs = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in TRAINING_ONLY:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        old, new = _plain(saved.get(f.name, default)), _plain(getattr(model, f.name))
        if old != new:
            diffs.append(f"model.{f.name} is {old!r} there, {new!r} here")
    if diffs:
        raise ValueError(f"checkpoint {path} holds another model ({'; '.join(diffs)}): resume with "
                         f"the checkpoint's model settings (its meta.json has them) or start a new "
                         f"run in a new run_dir")


def setting_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'section.field old -> new' for every field outside the architecture that differs (the
    resume setting itself excepted)."""
    old, new = _flatten(saved), _flatten(now)
    architecture = {k for k in new if k.startswith("model.") and k[6:] not in TRAINING_ONLY}
    keys = [k for k in sorted(new) if k not in architecture | {"checkpoint.resume"}]
    return [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in keys
            if _plain(old.get(k)) != _plain(new[k])]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples are lists), so a saved config compares equal to a live one."""
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------------ metrics rows
def truncate_metrics(run_dir: Path, step: int, log) -> bool:
    """Keep the rows of <run_dir>/metrics.jsonl up to `step` (a torn last line is dropped too);
    when any row goes, the whole file first moves to <run_dir>/aside/. Returns whether any did."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    tmp, kept, dropped = path.with_name("metrics.jsonl.tmp"), 0, 0
    with open(path, encoding="utf-8", errors="replace") as src, open(tmp, "w") as dst:
        for line in src:
            row_step = _row_step(line)
            if row_step is not None and row_step <= step and line.endswith("\n"):
                dst.write(line)
                kept += 1
            else:
                dropped += 1
    if not dropped:
        tmp.unlink()
        return False
    dest = move_aside([path], run_dir, f"resumed-at-step-{step}")
    os.replace(tmp, path)
    log(f"metrics.jsonl: kept {kept} rows up to step {step}, dropped {dropped} (the full file is "
        f"in {dest})")
    return True


def _row_step(line: str) -> int | None:
    m = _STEP.match(line)
    if m:
        return int(m.group(1))
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
