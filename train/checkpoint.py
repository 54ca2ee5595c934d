"""Checkpoints that any parallel layout can resume: torch.distributed.checkpoint (DCP), atomic, keep last K.

One checkpoint is a DCP directory plus meta.json:
    <dir>/step_00000100/.metadata           DCP's index: each tensor's global shape and its saved chunks
    <dir>/step_00000100/__<rank>_0.distcp   the tensor bytes each rank wrote
    <dir>/step_00000100/meta.json           step, data position, config, saved layout (rank 0, last)

Keys are global names, the same in every layout (no pipeline-chunk prefix):
    model.<name>            a parameter or persistent buffer, e.g. model.layers.7.attn.wq.weight
    optim.<name>.<key>      its AdamW state: exp_avg, exp_avg_sq (shaped like the parameter), step
    rng.<rank>.<kind>       one rank's RNG state (cpu, cuda)
Each rank describes the piece it holds as a DTensor, as its layout record (parallel/layout.py)
says: a dim split by tensor parallelism is Shard(tp_dim) on a 1-D mesh of the rank's tp group, one
split by expert parallelism is Shard(ep_dim) on a mesh of its ep group (which spans tp x dp ranks
when experts are folded); a tensor split by nothing stays a plain tensor (DCP's replicated case).
DCP writes each distinct chunk once (replicas over dp, edp and tp have the same offsets and are
deduplicated) and, on load, reads for the CURRENT layout's pieces whatever saved chunks overlap
them: resharding tp=2 x ep=2 to ep=4, folded to unfolded experts, pp=2 to one process, or ZeRO-1
to plain dp is DCP's job.

Choices:
* Weights are saved in float32 from the optimizer's main parameters (parallel/optimizer.py): a
  bf16 model's checkpoint holds the exact float32 weights, the same format as an fp32 run's, so a
  run resumes in either precision. Under ZeRO-1 a bf16 main weight exists only on its owner, which
  saves it; after loading, the owners write the bf16 model and broadcast it, as after a step.
* Pipeline stages hold disjoint names, so every rank saves only its own. The tied LM head on the
  last stage (`tied_to`) mirrors tok_emb.weight: it is not saved, and loads from model.tok_emb.weight
  and optim.tok_emb.weight.* (its AdamW state equals the embedding's: both get the same summed grad).
* ZeRO-1: only a parameter's owner holds AdamW state, and only owners save it. Each dp (dense) or
  edp (expert) group has one owner, and those owners together hold every distinct chunk, so the
  saved state is complete with no broadcast and no extra memory. On load every rank reads the state
  of the parameters its optimizer updates (all of them, or only its owned ones under ZeRO-1, plus
  what Zero1 exempts, e.g. tied-embedding replicas, which every rank updates and saves).
* RNG state is per rank: restored only when the saved layout equals this run's (bit-exact resume);
  after a layout change the run keeps its seeded RNG. Dropout masks do not depend on it: they are
  drawn from (seed, coordinates, step) streams (parallel/rng.py), so they follow the step count.
* Atomic: everything is written under step_XXXXXXXX.tmp/ and renamed after a barrier; meta.json,
  written last, marks a checkpoint complete.
* Verified: each rank computes the CRC-32 of the files it wrote; rank 0 records them all, with each
  file's size, in meta.json ("files"), and meta.json carries the CRC-32 of its own other fields
  ("meta_checksum"). A checkpoint is used only after every file matches (`verify_checkpoint`, the
  files split over the ranks); auto-resume takes the newest checkpoint that verifies.
* Nothing is deleted but what `keep_last` prunes: a checkpoint that must make way (a re-save of the
  same step, newer checkpoints of an abandoned timeline) is moved under <dir>/aside/.
* No unpickling of data: DCP reads tensors with torch.load(weights_only=True), but its .metadata
  index is a pickle, so it is read here through an allow-list (DCP's metadata classes, torch.Size,
  dtypes) that refuses anything else.
"""

from __future__ import annotations

import builtins
import importlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from parallel.layout import ParamLayout, clean_name

STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL, OPTIM, RNG = "model.", "optim.", "rng."


# ------------------------------------------------------------------------------------------ directories


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
    return {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "ep": ctx.ep,
            "fold_experts": int(ctx.fold_experts)}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class ResumeChoice(NamedTuple):
    """The checkpoint a run continues from (None: start from scratch) and, for auto-resume, each
    newer checkpoint passed over with the reason (a failed file, a torn meta.json)."""

    path: Path | None
    skipped: list[tuple[str, str]]


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def choose_checkpoint(resume: str, root: str | Path, ctx=None,
                      max_step: int | None = None) -> ResumeChoice:
    """Collective when ctx spans several processes. 'none' -> no checkpoint; 'auto' -> the newest
    checkpoint under root (at most `max_step`) that verifies, None when root holds none, an error
    when it holds some and none verifies; anything else -> that checkpoint directory, which must
    verify. Every rank gets the same answer or the same error."""
    if resume == "none":
        return ResumeChoice(None, [])
    if resume != "auto":
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume={resume}: no complete checkpoint there "
                                    f"(meta.json missing); use auto or a step_XXXXXXXX directory "
                                    f"under {root}")
        verify_checkpoint(path, ctx)
        return ResumeChoice(path, [])
    names = on_rank0_for_all(ctx, lambda: [p.name for p in list_checkpoints(root)])
    found = [Path(root) / n for n in names if max_step is None or step_of(Path(n)) <= max_step]
    skipped = []
    for path in reversed(found):
        try:
            verify_checkpoint(path, ctx)
            return ResumeChoice(path, skipped)
        except ValueError as e:
            why = str(e).split(": ", 1)[-1].removesuffix("; resume from an earlier checkpoint")
            skipped.append((path.name, why))
    if skipped and max_step is None:
        why = "; ".join(f"{n}: {reason}" for n, reason in skipped)
        raise ValueError(f"checkpoint.resume=auto: none of the {len(skipped)} checkpoints under "
                         f"{root} verifies ({why}); move them away, or start a new run with "
                         f"checkpoint.overwrite=true (they are moved aside, not deleted)")
    return ResumeChoice(None, skipped)


def find_checkpoint(path: str | Path) -> Path:
    """A step_XXXXXXXX directory, or the newest one that verifies under RUN_DIR/checkpoints or the
    given folder; each newer one that does not is named on stderr."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        if list_checkpoints(root):
            choice = choose_checkpoint("auto", root)
            for name, why in choice.skipped:
                print(f"warning: skipped checkpoint {name}: {why}", file=sys.stderr)
            return choice.path
    raise FileNotFoundError(f"no checkpoint under {path}: pass a run_dir or a step_XXXXXXXX "
                            f"directory")


def on_rank0_for_all(ctx, fn):
    """Collective: rank 0 runs fn (one view of a shared filesystem) and every rank returns its
    result, or raises its ValueError / OSError (FileNotFoundError, ...) with the same type and
    text."""
    if ctx is None or ctx.world_size == 1:
        return fn()
    answer: list = [None]
    if ctx.rank == 0:
        try:
            answer = [("ok", fn())]
        except (ValueError, OSError) as e:
            answer = [(type(e).__name__, str(e))]
    dist.broadcast_object_list(answer, src=0, group=ctx.world_group)
    kind, value = answer[0]
    if kind != "ok":
        raise same_error(kind, value)
    return value


def same_error(kind: str, message: str) -> Exception:
    """An exception of the builtin type named `kind` (ValueError, FileNotFoundError, ...) carrying
    `message`; RuntimeError when `kind` names no builtin exception."""
    cls = getattr(builtins, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    return cls(message)


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json: step, data position, config, the layout the checkpoint was saved with and the
    checksums of its files; its own fields are checked against meta_checksum when present."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path}: meta.json is unreadable ({e.__class__.__name__}); "
                         f"resume from an earlier checkpoint") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {path}: meta.json holds a {type(meta).__name__}, not an "
                         f"object; resume from an earlier checkpoint")
    recorded = meta.pop("meta_checksum", None)
    if recorded is not None and recorded != _json_checksum(meta):
        raise ValueError(f"checkpoint {path}: meta.json fails its checksum (changed or damaged "
                         f"after the save); resume from an earlier checkpoint")
    return meta


# ------------------------------------------------------------------------------------- checksums
_CHUNK = 8 << 20


def file_checksum(path: str | Path) -> str:
    """'crc32:<8 hex digits>' of a file, read in 8 MiB pieces. CRC-32 (zlib) detects every error
    burst up to 32 bits and any other corruption with probability 1 - 2^-32, at 0.6-1.8 GB/s on one
    loaded core, 7-20% of what the save itself costs (benchmarks/checkpoint_io.py, docs/faults.md);
    SHA-256 and BLAKE2b cost 1.3-2.4x more."""
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"crc32:{crc:08x}"


def _json_checksum(obj: dict[str, Any]) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return f"crc32:{zlib.crc32(text.encode()):08x}"


def _file_records(paths: list[Path]) -> dict[str, dict[str, Any]]:
    return {p.name: {"bytes": p.stat().st_size, "checksum": file_checksum(p)} for p in paths}


def _gather_checksums(ctx, tmp: Path) -> dict[str, dict[str, Any]]:
    """Collective: every rank checksums the DCP files it wrote (__<rank>_*.distcp); rank 0 adds the
    .metadata index. Returns the merged {file name: {bytes, checksum}} on rank 0, which writes
    meta.json (the other ranks get their own records only)."""
    error, mine = None, {}
    try:
        mine = _file_records(sorted(tmp.glob(f"__{ctx.rank}_*.distcp")))
        if ctx.rank == 0:
            mine.update(_file_records([tmp / ".metadata"]))
    except OSError as e:
        error = OSError(f"checksumming checkpoint {tmp} failed ({_first_line(e)}); the previous "
                        f"checkpoints are untouched: check the disk")
    agree(ctx, error)
    if ctx.world_size == 1:
        return mine
    gathered: list | None = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0, group=ctx.world_group)
    if ctx.rank != 0:
        return mine
    return {name: rec for part in gathered for name, rec in part.items()}


def _check_file(path: Path, name: str, record: dict[str, Any]) -> str | None:
    """Why `name` fails its record, or None when its size and checksum match."""
    f = path / name
    if not f.is_file():
        return f"{name} is missing"
    size = f.stat().st_size
    if size != record.get("bytes"):
        return f"{name} has {size} bytes but {record.get('bytes')} were written"
    found = file_checksum(f)
    if found != record.get("checksum"):
        recorded = record.get("checksum")
        return f"{name} fails its checksum ({found}, recorded {recorded}): the file is corrupt"
    return None


def verify_checkpoint(path: str | Path, ctx=None) -> dict[str, Any]:
    """Collective when ctx spans several processes: check meta.json and every file it records, the
    files split over the ranks (rank r checks files r, r + world, ...); all ranks raise the same
    one-line ValueError naming the first bad file, or return meta.json. A checkpoint saved before
    checksums were recorded has no "files" entry and passes unchecked (meta["files"] is None)."""
    path = Path(path)
    meta = on_rank0_for_all(ctx, lambda: read_meta(path))  # one reading: all ranks branch alike
    files = meta.get("files")
    if files is None:
        meta["files"] = None
        return meta
    rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
    names = sorted(files)
    problems = [p for p in (_check_file(path, n, files[n]) for n in names[rank::world]) if p]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, problems, group=ctx.world_group)
        problems = sorted(p for part in gathered for p in part)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"checkpoint {path}: {problems[0]}{more}; resume from an earlier "
                         f"checkpoint")
    return meta


# ---------------------------------------------------------------------------------- moving aside
def move_aside(paths: list[Path], root: Path, why: str) -> Path | None:
    """Move `paths` (files or directories) into a new folder <root>/aside/<time>-<why>/ with renames
    (no copy, nothing deleted); returns that folder, or None when there was nothing to move."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    base = root / "aside" / f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir(parents=True)
    for p in paths:
        os.replace(p, dest / p.name)
    _fsync_dir(root)
    return dest


# ------------------------------------------------------------------------------------------ the DCP index
_INDEX_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                  "torch.distributed.checkpoint.planner")
_INDEX_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                  ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                  ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata but refuses every global outside an allow-list: DCP's own metadata
    classes, torch.Size, torch dtypes, paths. A crafted index cannot run code (os.system etc.)."""

    def find_class(self, module: str, name: str):
        if module in _INDEX_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif (module, name) in _INDEX_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def _read_index(path: Path):
    with open(path / ".metadata", "rb") as f:
        return _IndexUnpickler(f).load()


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata goes through _IndexUnpickler instead of pickle.load."""

    def read_metadata(self, *args, **kwargs):
        metadata = _read_index(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


def saved_tensors(path: str | Path) -> dict[str, TensorStorageMetadata]:
    """Every saved key with its global shape, dtype and chunks, read from the DCP index."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"checkpoint {path} has no DCP index (.metadata): it is incomplete or from the "
                                f"older one-file-per-rank format; resume from another checkpoint")
    try:
        metadata = _read_index(path)
        saved = dict(metadata.state_dict_metadata)
    except Exception as e:  # truncated, garbage, or a refused global
        raise ValueError(f"checkpoint {path}: .metadata is corrupt or unsafe ({_first_line(e)}); "
                         f"resume from an earlier checkpoint") from None
    return {k: v for k, v in saved.items() if isinstance(v, TensorStorageMetadata)}


@contextmanager
def _single_process_quiet(no_dist: bool):
    """DCP warns on every single-process save/load that it 'assumes the intent is single process';
    here that is the intent (world_size 1), so that one warning is silenced."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _first_line(e: BaseException) -> str:
    """'Type: first line of the message', unwrapping DCP's CheckpointException (whose own text is a
    multi-line traceback per rank) to the first failing rank's error."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
        return f"rank {rank}: {_first_line(inner)}"
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0][:160] if text else ''}"


# ------------------------------------------------------------------------------------------ write / read
def save_checkpoint(root: str | Path, step: int, ctx, state: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """Collective: every rank calls it with its own `state` (global key -> Tensor or DTensor, see the
    module docstring); `meta` (rank 0's) must be JSON-serialisable. Returns the final directory."""
    root = Path(root)
    tmp, final = root / f"step_{step:08d}.tmp", step_dir(root, step)
    agree(ctx, _on_rank0(ctx, lambda: _prepare_tmp(root, tmp)))
    try:
        with _single_process_quiet(ctx.world_size == 1):
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=ctx.world_size == 1,
                     process_group=ctx.world_group)
    except CheckpointException as e:  # DCP's BaseException: re-raised as the I/O error it reports
        raise OSError(f"saving checkpoint {tmp} failed ({_first_line(e)}); the previous checkpoints are "
                      f"untouched: check disk space and permissions") from None
    meta = {**meta, "step": step, "layout": layout_of(ctx), "files": _gather_checksums(ctx, tmp)}
    agree(ctx, _on_rank0(ctx, lambda: _publish(root, tmp, final, meta, keep_last)))
    return final


def _on_rank0(ctx, fn) -> Exception | None:
    """Run fn on rank 0 only; return its exception instead of raising (for agree())."""
    if ctx.rank != 0:
        return None
    try:
        fn()
    except Exception as e:
        return e
    return None


def _prepare_tmp(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step_*.tmp"):  # leftovers of crashed saves, at any step
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()


def _publish(root: Path, tmp: Path, final: Path, meta: dict[str, Any], keep_last: int) -> None:
    """meta.json (fsynced, with the checksum of its own fields) marks the checkpoint complete; then
    the directory takes its final name. A checkpoint of the same step is renamed to .old first and
    moved under aside/ after the rename, so a crash never leaves the step without a complete
    checkpoint and nothing but keep_last pruning deletes one. Pruning never touches `final`."""
    with open(tmp / "meta.json", "w") as f:
        f.write(json.dumps({**meta, "meta_checksum": _json_checksum(meta)}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists():  # left by a crash between the two renames below
        move_aside([old], root, f"resaved-{final.name}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old.exists():
        move_aside([old], root, f"resaved-{final.name}")
    others = [c for c in list_checkpoints(root) if c != final]  # oldest first
    for ckpt in others[:max(len(others) + 1 - keep_last, 0)]:  # keep `final` + the newest keep_last - 1
        shutil.rmtree(ckpt, ignore_errors=True)


def agree(ctx, error: Exception | None) -> None:
    """Collective: raise on EVERY rank if any rank hit an error before a collective, so no rank is
    left waiting in one (a rank-local check must not turn into a hang). Every rank raises the same
    error: the lowest failing rank's type and text, naming that rank when not all of them failed
    (so a launcher can print it once)."""
    if ctx.world_size == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.world_group)
    if flag.item() == 0:
        return
    errors: list = [None] * ctx.world_size
    mine = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(errors, mine, group=ctx.world_group)
    failed = [r for r, e in enumerate(errors) if e is not None]
    kind, message = errors[failed[0]]
    where = "" if len(failed) == ctx.world_size else f" (on rank {failed[0]})"
    raise same_error(kind, message + where)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_targets(path: Path, state: dict[str, torch.Tensor], saved: dict[str, TensorStorageMetadata]) -> None:
    """Every requested key is in the index, with the same global shape, fully covered by saved chunks."""
    for key, target in state.items():
        md = saved.get(key)
        if md is None:
            raise ValueError(f"checkpoint {path} has no tensor {key}: it was saved from another model; "
                             f"resume with the model config in its meta.json")
        if tuple(md.size) != tuple(target.shape):
            raise ValueError(f"checkpoint {path}: {key} has shape {tuple(md.size)} but this run's is "
                             f"{tuple(target.shape)}; resume with the model config in its meta.json")
        if sum(math.prod(c.sizes) for c in md.chunks) != math.prod(md.size):
            raise ValueError(f"checkpoint {path}: the saved chunks of {key} do not cover it; "
                             f"resume from an earlier checkpoint")


def _read_into(path: Path, state: dict[str, torch.Tensor], saved: dict[str, TensorStorageMetadata],
               no_dist: bool, ctx=None) -> None:
    """Check the targets (on every rank, agreeing before the collective load when `ctx` is given,
    so one rank's mismatch cannot leave the others waiting), then let DCP read the overlapping
    chunks into them."""
    try:
        _check_targets(path, state, saved)
        error = None
    except ValueError as e:
        error = e
    if ctx is not None:
        agree(ctx, error)
    elif error is not None:
        raise error
    try:
        with _single_process_quiet(no_dist):
            dcp.load(state, storage_reader=_SafeReader(path), no_dist=no_dist,
                     process_group=None if ctx is None else ctx.world_group)
    except (Exception, CheckpointException) as e:  # a truncated, garbage or missing .distcp file (on any rank)
        raise ValueError(f"checkpoint {path} is corrupt or incomplete ({_first_line(e)}); "
                         f"resume from an earlier checkpoint") from None


def load_full_state(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every saved tensor whose key starts with `prefix`, whole, on CPU, keyed without the prefix.
    Runs in this process alone (no process group needed), whatever layout saved it."""
    path = Path(path)
    verify_checkpoint(path)  # meta.json readable, every file as it was written
    saved = saved_tensors(path)
    state = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in saved.items() if k.startswith(prefix)}
    _read_into(path, state, saved, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def load_full_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole model as a single-process state dict {name: tensor} (for generate / convert)."""
    return load_full_state(path, MODEL)


# ------------------------------------------------------------------------------------------ describing shards
def shard_meshes(ctx) -> dict[str, DeviceMesh | None]:
    """1-D DeviceMeshes over this rank's tp and ep groups (None where the group has size 1): the
    ranks over which a parameter's distinct pieces are spread. Built from ctx's groups, so no new
    process group is created."""
    meshes: dict[str, DeviceMesh | None] = {}
    for kind in ("tp", "ep"):
        group = ctx.group(kind)
        meshes[kind] = None if group is None else DeviceMesh.from_group(
            group, ctx.device.type, mesh=dist.get_process_group_ranks(group), mesh_dim_names=(kind,))
    return meshes


def _describe(local: torch.Tensor, rec: ParamLayout | None, meshes: dict) -> torch.Tensor:
    """This rank's piece `local` of a tensor laid out as `rec`, as a DTensor: Shard(tp_dim) over the
    tp mesh or Shard(ep_dim) over the ep mesh; plain when nothing is split (or for a buffer)."""
    if rec is None:
        return local
    if rec.tp_dim is not None and rec.ep_dim is not None and meshes["tp"] and meshes["ep"]:
        raise ValueError(f"{rec.name} is split by both tp and ep: checkpoints cannot describe that; "
                         f"split it by one of them")
    if rec.tp_dim is not None and meshes["tp"] is not None:
        return DTensor.from_local(local, meshes["tp"], [Shard(rec.tp_dim)], run_check=False)
    if rec.ep_dim is not None and meshes["ep"] is not None:
        return DTensor.from_local(local, meshes["ep"], [Shard(rec.ep_dim)], run_check=False)
    return local


def _entries(chunks, optimizer) -> list[tuple[str, torch.Tensor, ParamLayout | None, bool]]:
    """(global name, tensor, layout record, is_tied_replica) for what this rank checkpoints: the
    float32 master of every parameter it holds one for (optimizer.master) and every persistent
    buffer. A tied replica is listed under the name of the tensor it mirrors (`tied_to`)."""
    table, out = optimizer.table, []
    for chunk in chunks:
        params = {id(p) for p in chunk.parameters()}
        for name, t in chunk.state_dict(keep_vars=True).items():
            if id(t) not in params:  # a persistent buffer (torch.compile wrappers add ._orig_mod)
                out.append((clean_name(name), t, None, False))
            elif optimizer.master(t) is not None:
                rec = table[t]
                out.append((rec.tied_to or rec.name, optimizer.master(t), rec, rec.tied_to is not None))
    return out


# ------------------------------------------------------------------------------------------ training state
def training_state(chunks, optimizer, ctx, rng: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """This rank's part of the checkpoint: model.* (float32 masters), optim.* (AdamW state of the
    parameters it updates) and rng.<rank>.*, each described for DCP (no copies made)."""
    meshes, state = shard_meshes(ctx), {}
    for name, t, rec, tied in _entries(chunks, optimizer):
        if tied:  # a tied replica is saved once, by the stage holding the tensor it mirrors
            continue
        state[MODEL + name] = _describe(t.detach(), rec, meshes)
        for key, value in (optimizer.adamw.state.get(t, {}) if rec is not None else {}).items():
            if not torch.is_tensor(value):
                raise ValueError(f"optimizer state {key!r} of {name} is a {type(value).__name__}: only tensor "
                                 f"state can be checkpointed; use torch.optim.AdamW")
            state[f"{OPTIM}{name}.{key}"] = _describe(value, rec, meshes) if value.shape == t.shape else value
    for kind, t in (rng or {}).items():
        state[f"{RNG}{ctx.rank:05d}.{kind}"] = t
    return state


def _optimizer_targets(entries, meshes, saved) -> dict[str, tuple[torch.Tensor, str, torch.Tensor]]:
    """key -> (main tensor, state name, allocated target) for every saved optim.<name>.<state> of
    the parameters this rank updates; a tied replica reads the mirrored tensor's state."""
    by_param: dict[str, list[tuple[str, str]]] = {}  # name -> [(state name, key)]
    for key in saved:
        if key.startswith(OPTIM):
            name, _, state_name = key[len(OPTIM):].rpartition(".")
            by_param.setdefault(name, []).append((state_name, key))
    targets = {}
    for name, main, rec, _ in entries:
        if rec is None:
            continue
        for state_name, key in by_param.get(name, []):
            md = saved[key]
            if tuple(md.size) == rec.global_shape:
                t = _describe(torch.empty(main.shape, dtype=md.properties.dtype, device=main.device), rec, meshes)
            else:  # scalar state (AdamW's step)
                t = torch.empty(md.size, dtype=md.properties.dtype)
            if key in targets:  # the two replicas of a tied embedding are never on one rank (pp > 1)
                raise ValueError(f"{key} is updated twice on one rank: the tied embedding's replicas must "
                                 f"be on different pipeline ranks")
            targets[key] = (main, state_name, t)
    return targets


def _set_optimizer_state(optimizer, states: dict[int, dict[str, torch.Tensor]]) -> None:
    """Install {id(main): {state name: tensor}} through AdamW's load_state_dict, which moves each
    value to its parameter's device and dtype the way torch.optim expects (step stays float32)."""
    if not states:
        return
    adamw = optimizer.adamw
    sd = adamw.state_dict()
    index = {id(p): i for group, packed in zip(adamw.param_groups, sd["param_groups"])
             for p, i in zip(group["params"], packed["params"])}
    sd["state"] = {index[pid]: st for pid, st in states.items()}
    adamw.load_state_dict(sd)


def restore_training_state(path: str | Path, chunks, optimizer, ctx, device: torch.device) -> tuple[dict, bool]:
    """Collective: load a checkpoint saved under ANY layout and precision into this rank's float32
    masters and AdamW state, then write the model from them (optimizer.write_model: the bf16 cast,
    ZeRO-1's broadcast). RNG is restored only if the saved layout equals this one.
    Returns (meta, same_layout).

    1. targets for the current layout: the masters and buffers themselves (DCP writes into them),
       fresh tensors for optimizer state, this rank's RNG when the layout matches;
    2. DCP reads each target's overlapping saved chunks;
    3. copy into second holders of one key (tied replicas), install optimizer state, write the
       model, set RNG."""
    path = Path(path)
    meta, saved, meshes = read_meta(path), saved_tensors(path), shard_meshes(ctx)
    entries, state, copies = _entries(chunks, optimizer), {}, []
    for name, t, rec, _ in entries:
        if MODEL + name in state:  # a second holder of one key on this rank
            copies.append((t, state[MODEL + name]))
        else:
            state[MODEL + name] = _describe(t.detach(), rec, meshes)
    optim = _optimizer_targets(entries, meshes, saved)
    state.update({key: t for key, (_, _, t) in optim.items()})
    same_layout = meta.get("layout") == layout_of(ctx)
    rng_keys = {k: k.rsplit(".", 1)[1] for k in saved if same_layout and k.startswith(f"{RNG}{ctx.rank:05d}.")}
    state.update({k: torch.empty(saved[k].size, dtype=saved[k].properties.dtype) for k in rng_keys})
    _read_into(path, state, saved, no_dist=ctx.world_size == 1, ctx=ctx)
    _install(optimizer, copies, optim)
    if "cpu" in rng_keys.values():
        set_rng_state({kind: state[k] for k, kind in rng_keys.items()}, device)
    return meta, same_layout


@torch.no_grad()
def _install(optimizer, copies, optim) -> None:
    """After DCP's read: fill second holders, install AdamW state, write the model from the masters."""
    for dst, src in copies:
        dst.copy_(src.to_local() if isinstance(src, DTensor) else src)
    states: dict[int, dict[str, torch.Tensor]] = {}
    for main, state_name, t in optim.values():
        states.setdefault(id(main), {})[state_name] = t.to_local() if isinstance(t, DTensor) else t
    _set_optimizer_state(optimizer, states)
    optimizer.write_model()
