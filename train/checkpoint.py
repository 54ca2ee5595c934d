"""Checkpoints: atomic, one file per rank, keep the last K, exact resume.

Layout of one checkpoint (every rank writes its own shard of model + optimizer + RNG; rank 0 writes
the step, data position, layout and config last, as meta.json, which marks the checkpoint complete):
    <dir>/step_00000100/rank_00000.pt
    <dir>/step_00000100/meta.json
Atomicity: everything is written under step_XXXXXXXX.tmp/ and renamed to its final name only after
every rank has finished (a barrier), so a crash mid-save leaves the previous checkpoints untouched and
never a half checkpoint under a final name. Loading uses torch.load(weights_only=True): no pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier(ctx) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (final name and meta.json present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def layout_of(ctx) -> dict[str, int]:
    return {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "ep": ctx.ep}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(root: str | Path, step: int, ctx, shard: dict[str, Any], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """Collective: every rank calls it. `shard` is this rank's {model, optimizer, rng} state;
    `meta` (rank 0's) must be JSON-serialisable. Returns the final directory."""
    root = Path(root)
    tmp, final = root / f"step_{step:08d}.tmp", step_dir(root, step)
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):  # leftovers of crashed saves, at any step
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier(ctx)
    torch.save(shard, tmp / f"rank_{ctx.rank:05d}.pt")
    _barrier(ctx)
    if ctx.rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "layout": layout_of(ctx)}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(ctx)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """'none' -> None; 'auto' -> the latest complete checkpoint under root, or None if there is
    none yet; anything else is a checkpoint directory that must exist."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume}: no complete checkpoint there (meta.json missing); "
                                f"use auto or a step_XXXXXXXX directory under {root}")
    return path


def load_checkpoint(path: Path, ctx) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this rank's shard, meta). The saved layout must equal the current one."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path}: meta.json is unreadable ({e.__class__.__name__}); "
                         f"resume from an earlier checkpoint") from None
    if meta.get("layout") != layout_of(ctx):
        raise ValueError(f"checkpoint {path} was saved with layout {meta.get('layout')} but this run has "
                         f"{layout_of(ctx)}: resume with the same parallel sizes")
    file = path / f"rank_{ctx.rank:05d}.pt"
    try:
        shard = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} has no shard for rank {ctx.rank} ({file.name})") from None
    except Exception as e:  # truncated / corrupt zip, unpickling refused
        raise ValueError(f"checkpoint shard {file} is corrupt ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); "
                         f"resume from an earlier checkpoint") from None
    return shard, meta
