"""Run a function on N gloo ranks from inside pytest and bring each rank's return value back.

    results = run_distributed(check_fn, 4, arg1, arg2)   # check_fn(rank, world_size, arg1, arg2)

`fn` must be a module-level (picklable) function returning small, torch.save-able values (detached
CPU tensors, numbers, strings, lists, dicts); workers are fresh "spawn" processes. Each worker
writes its result (or its exception's type, message and traceback) to a file in a temporary dir
with torch.save, then ends with destroy_process_group() and os._exit (DESIGN.md: a plain interpreter
exit intermittently SIGABRTs on gloo). A worker's exception is re-raised in the parent with the
same builtin type, the rank and the worker's traceback; a run still going after `timeout` seconds
is killed and reported. A launch costs ~4 s: put many checks in one function.
"""
import builtins
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save(path: str, payload: dict) -> None:
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)  # the parent never sees a half-written file


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    path, code = os.path.join(out_dir, f"rank{rank}.pt"), 0
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        _save(path, {"ok": True, "result": fn(rank, world_size, *args)})
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        _save(path, {"ok": False, "type": type(err).__name__, "message": str(err),
                     "traceback": traceback.format_exc()})
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)


def _load(path: str):
    return torch.load(path, weights_only=True)


def _raise_worker_error(rank: int, payload: dict) -> None:
    """Re-raise as the worker's builtin exception type, so pytest.raises(ValueError, ...) works."""
    cls = getattr(builtins, payload["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    raise cls(f"rank {rank}: {payload['message']}\n--- worker traceback (rank {rank}) ---\n"
              f"{payload['traceback']}")


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)


def run_distributed(fn, world_size: int, *args, timeout: float = 120) -> list:
    """Run fn(rank, world_size, *args) on world_size gloo ranks; return the per-rank results in rank order."""
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as out_dir:
        port, paths = _free_port(), [os.path.join(out_dir, f"rank{r}.pt") for r in range(world_size)]
        procs = [spawn.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        try:
            payloads = _wait(procs, paths, timeout)
            for p in procs:
                p.join(timeout=10)  # let finished ranks leave through destroy_process_group
        finally:
            _kill(procs)
    return [payloads[r]["result"] for r in range(world_size)]


def _wait(procs, paths, timeout: float) -> dict:
    """Poll until every rank has exited; raise at the first failure (the caller kills the rest)."""
    deadline, payloads = time.monotonic() + timeout, {}
    while True:
        for rank, (p, path) in enumerate(zip(procs, paths)):
            _check_rank(rank, p, path, payloads)
        if len(payloads) == len(procs):
            return payloads
        if time.monotonic() > deadline:
            hung = [r for r in range(len(procs)) if r not in payloads]
            raise TimeoutError(f"run_distributed: ranks {hung} still running after {timeout} s "
                               f"(a hung collective?); killed them")
        time.sleep(0.05)


def _check_rank(rank: int, proc, path: str, payloads: dict) -> None:
    """Record rank's payload once written; raise its error, or say so if it died without one."""
    dead = not proc.is_alive()  # read before the file: a dead rank has written all it ever will
    if rank not in payloads and os.path.exists(path):
        payloads[rank] = _load(path)
    if rank in payloads and not payloads[rank]["ok"]:
        _raise_worker_error(rank, payloads[rank])
    if rank not in payloads and dead:
        raise RuntimeError(f"run_distributed: rank {rank} died with exit code {proc.exitcode} before "
                           f"returning a result (negative = killed by signal)")
