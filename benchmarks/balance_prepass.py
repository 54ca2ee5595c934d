"""Benchmark: what model.aux_loss_scope=global_batch costs (its no-grad routing pre-pass).

    python -m benchmarks.balance_prepass              # configs/tiny.yaml's model, one process
    python -m benchmarks.balance_prepass --config configs/moe16x.yaml model.n_layers=4 \
        training.micro_batch_size=1
    python -m benchmarks.balance_prepass --smoke      # CPU, 2 tiny steps: checks it runs

Two Trainers with the same config and data (random tokens in a temporary directory), one per
scope (micro_batch, global_batch), take turns doing optimizer steps, so load changes on a shared
machine hit both alike; each step is timed by the wall clock (after a device synchronise) and by
this thread's CPU time (with torch on one thread, robust to other processes). Printed: the median
step of each scope and the global_batch / micro_batch ratio. Theory: the pre-pass is one more
forward of every micro-batch up to the last MoE block (no head, no loss, no autograd), so about
+1/3 of a step without activation recompute (forward : backward ~ 1 : 2) and +1/4 with full
recompute, plus on pp > 1 a forward-only pipeline of n_micro + pp - 1 slots.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/balance_prepass.py` as a plain script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from parallel.context import ParallelContext  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import write_token_file  # noqa: E402
from train.trainer import Trainer  # noqa: E402

SCOPES = ("micro_batch", "global_batch")
SMOKE = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=128", "model.expert_ffn_dim=32", "model.n_experts=4", "data.seq_len=32",
         "training.global_batch_size=4", "training.micro_batch_size=2"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*",
                   help="config overrides, e.g. training.activation_checkpointing=true")
    p.add_argument("--config", default="configs/tiny.yaml",
                   help="training YAML whose model and batch are used")
    p.add_argument("--steps", type=int, default=10, help="timed steps per scope (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per scope first")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 2 steps, 1 warmup (checks that it runs)")
    return p.parse_intermixed_args(argv)


def build(config: str, scope: str, tmp: Path, overrides: list[str]) -> Trainer:
    fixed = [f"run_dir={tmp / scope}", f"data.paths=[{tmp / 'tokens'}]", "data.tokenizer=byte",
             "training.eval_interval=0", "checkpoint.interval=0", "logging.tensorboard=false",
             f"model.aux_loss_scope={scope}"]
    cfg = load_config(config, [*overrides, *fixed])
    return Trainer(cfg, ParallelContext.single(), log=lambda msg: None)


def timed_step(trainer: Trainer) -> tuple[float, float]:
    """(wall ms, this thread's CPU ms) of one train_step."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    wall, cpu = time.perf_counter(), time.thread_time()
    trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return 1e3 * (time.perf_counter() - wall), 1e3 * (time.thread_time() - cpu)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    overrides = [*(SMOKE if args.smoke else []), *args.overrides]
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="balance_prepass_") as d:
        tmp = Path(d)
        rng = np.random.default_rng(0)
        docs = [rng.integers(0, 256, 4096) for _ in range(64)]
        write_token_file(tmp / "tokens", docs, vocab_size=257)
        trainers = {scope: build(args.config, scope, tmp, overrides) for scope in SCOPES}
        times: dict[str, list[tuple[float, float]]] = {scope: [] for scope in SCOPES}
        for i in range(warmup + steps):
            for scope, trainer in trainers.items():
                t = timed_step(trainer)
                if i >= warmup:
                    times[scope].append(t)
    return {scope: {"wall_ms": statistics.median(w for w, _ in ts),
                    "cpu_ms": statistics.median(c for _, c in ts),
                    "prepass": trainers[scope].count_executor is not None}
            for scope, ts in times.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    result = run(parse_args(argv))
    print("| scope | step wall (ms) | step CPU (ms) |\n|---|---|---|")
    for scope, r in result.items():
        print(f"| {scope} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} |")
    base, glob = result["micro_batch"], result["global_batch"]
    print(f"global_batch / micro_batch: wall {glob['wall_ms'] / base['wall_ms']:.3f}, "
          f"CPU {glob['cpu_ms'] / base['cpu_ms']:.3f}")
    return result


if __name__ == "__main__":
    main()
