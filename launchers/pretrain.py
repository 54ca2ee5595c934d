"""Pretrain a decoder: `python launchers/pretrain.py CONFIG [KEY.SUB=VALUE ...] [--resume]`.

Single process as a plain script; data/tensor/expert parallel under torchrun or srun:
    torchrun --nproc_per_node 4 launchers/pretrain.py configs/tiny.yaml parallel.tp=2 parallel.ep=2
Overrides and --resume may come in any order after the config. Exit status:
    0   finished (training.max_steps reached)
    2   a configuration or input error, wherever it was found (one line on stderr, once per run)
    75  stopped by SIGTERM / SIGUSR1 after saving a checkpoint: run again with --resume
        (launchers/slurm/pretrain.sbatch requeues the job; torchrun --max-restarts restarts it)
    1   anything else (a traceback is printed)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from parallel.context import ParallelContext, launch_info  # noqa: E402
from train.config import load_config  # noqa: E402
from train.trainer import STOP_SIGNALS, Trainer  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_REQUEUE = 0, 1, 2, 75
INPUT_ERRORS = (ValueError, FileNotFoundError)  # configuration, data, run_dir, checkpoints


def parse_args(argv: list[str] | None = None, description: str = __doc__,
               prog: str = "pretrain.py") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog,
                                usage="%(prog)s CONFIG [KEY.SUB=VALUE ...] [--resume]",
                                description=description.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="training YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY.SUB=VALUE",
                   help="field overrides such as training.max_steps=100 parallel.tp=2")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint that verifies "
                        "(checkpoint.resume=auto); starts from scratch when there is none")
    return p.parse_intermixed_args(argv)


def build_context(cfg) -> ParallelContext:
    p = cfg.parallel
    backend = None if p.backend == "auto" else p.backend
    if cfg.training.device == "cpu":
        backend = backend or "gloo"
    return ParallelContext.from_env(tp=p.tp, pp=p.pp, ep=p.ep, dp=p.dp, vpp=p.vpp,
                                    sequence_parallel=p.sequence_parallel, fold_experts=p.fold_experts,
                                    backend=backend, timeout_s=p.timeout_s)


def main(argv: list[str] | None = None, description: str = __doc__, check=None,
         prog: str = "pretrain.py") -> int:
    """Parse, load and check the config (`check(cfg)` may raise ValueError), build the context,
    train."""
    args = parse_args(argv, description, prog)
    overrides = list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        if check is not None:
            check(cfg)
        ctx = build_context(cfg)
    except INPUT_ERRORS as e:  # the same on every rank: one of them says it
        if _launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return _leave(EXIT_INPUT, dist.is_initialized())
    code = EXIT_FAILED
    try:
        trainer = _build_trainer(cfg, ctx)
        trainer.train()
        code = EXIT_REQUEUE if trainer.stopped_by else EXIT_OK
    except INPUT_ERRORS as e:
        code = EXIT_INPUT
        report_once(ctx, str(e))
    except FloatingPointError as e:  # non-finite steps beyond training.max_bad_steps
        report_once(ctx, str(e))
    except BaseException:
        traceback.print_exc()
    return _leave(code, ctx.world_size > 1, ctx)


def _build_trainer(cfg, ctx: ParallelContext) -> Trainer:
    """The Trainer, with a stop signal that arrives while it is built (loading, verifying) kept:
    training then stops after its first step with a checkpoint and status 75, instead of the
    signal's default ending the process with 143, which a job script would not requeue."""
    early: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: early.append(signum))
                for sig in STOP_SIGNALS}
    try:
        trainer = Trainer(cfg, ctx)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if early:
        trainer.stop_requested = early[0]
    return trainer


def _launch_rank() -> int:
    try:
        return launch_info(os.environ).rank
    except ValueError:
        return 0


def _leave(code: int, distributed: bool, ctx: ParallelContext | None = None) -> int:
    """Flush, then with a process group: destroy it and os._exit, which avoids gloo's intermittent
    SIGABRT at interpreter shutdown (DESIGN.md) that would replace the exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    if distributed:
        if ctx is not None:
            ctx.destroy()
        elif dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)
    return code


def report_once(ctx: ParallelContext, message: str) -> None:
    """One error line per failure, not one per rank: rank 0 prints its error and posts it in the
    rendezvous store; another rank prints only an error rank 0 does not report (it waits up to 5 s
    for rank 0's post, and prints when the store cannot tell)."""
    if ctx.world_size == 1 or not dist.is_initialized():
        print(f"error: {message}", file=sys.stderr)
        return
    key = "moeframe/error/rank0"
    if ctx.rank == 0:
        print(f"error: {message}", file=sys.stderr)
    try:
        store = dist.distributed_c10d._get_default_store()
        if ctx.rank == 0:
            store.set(key, message)
            return
        store.wait([key], timedelta(seconds=5))
        if store.get(key).decode() == message:
            return
    except Exception:  # noqa: BLE001 - no answer from the store: say it here rather than not at all
        pass
    if ctx.rank != 0:
        print(f"error (rank {ctx.rank}): {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
