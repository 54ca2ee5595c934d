"""Pretrain a decoder: `python launchers/pretrain.py CONFIG [key.sub=value ...] [--resume]`.

Single process as a plain script; data/tensor/expert parallel under torchrun or srun:
    torchrun --nproc_per_node 4 launchers/pretrain.py configs/tiny.yaml parallel.tp=2 parallel.ep=2
Errors in the config or layout are printed as one line and exit with status 2 before any work.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.context import ParallelContext  # noqa: E402
from train.config import load_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None, description: str = __doc__) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training YAML, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="field overrides such as training.max_steps=100 parallel.tp=2")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (checkpoint.resume=auto)")
    return p.parse_args(argv)


def build_context(cfg) -> ParallelContext:
    p = cfg.parallel
    backend = None if p.backend == "auto" else p.backend
    if cfg.training.device == "cpu":
        backend = backend or "gloo"
    return ParallelContext.from_env(tp=p.tp, pp=p.pp, ep=p.ep, dp=p.dp, vpp=p.vpp,
                                    sequence_parallel=p.sequence_parallel, fold_experts=p.fold_experts,
                                    backend=backend, timeout_s=p.timeout_s)


def main(argv: list[str] | None = None, description: str = __doc__, check=None) -> int:
    """Parse, load and check the config (`check(cfg)` may raise ValueError), build the context,
    train."""
    args = parse_args(argv, description)
    overrides = list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        if check is not None:
            check(cfg)
        ctx = build_context(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = 1  # anything but a clean return is a failure (OOM, a collective timing out, Ctrl-C)
    try:
        Trainer(cfg, ctx).train()
        code = 0
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error (rank {ctx.rank}): {e}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if ctx.world_size > 1:
            ctx.destroy()
            os._exit(code)  # avoids gloo's intermittent SIGABRT at interpreter shutdown (DESIGN.md)
    return code


if __name__ == "__main__":
    sys.exit(main())
