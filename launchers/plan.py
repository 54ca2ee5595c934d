"""Plan a layout: `python launchers/plan.py CONFIG [key.sub=value ...] [--nodes N --gpus-per-node G]`.

Prints, without starting any process or touching a GPU: the rank grid and process groups, each
pipeline stage's layers (MoE / dense), parameters and estimated memory per GPU, FLOPs per step and
the pipeline bubble, for world = N x G (dp derived as in training). Example:
    python launchers/plan.py configs/moe16x.yaml --nodes 4 --gpus-per-node 8
An invalid layout (world not divisible, tp not dividing the heads, more stages than layers, ...)
is one line on stderr and exit status 2. The computation lives in train/plan.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import load_config  # noqa: E402
from train.plan import format_plan, plan_layout  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training YAML, e.g. configs/moe16x.yaml")
    p.add_argument("overrides", nargs="*", help="field overrides such as parallel.tp=4 training.micro_batch_size=2")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node; default: the smallest world the config allows, tp x pp x (dp or ep)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--attention-scores", action="store_true",
                   help="count materialised attention scores (5 a s^2 b bytes per layer, Korthikanti's full "
                        "formula) instead of assuming fused SDPA/flash attention")
    return p.parse_intermixed_args(argv)


def default_gpus_per_node(cfg, nodes: int) -> int:
    """Without --gpus-per-node: one node holding the smallest world the config accepts."""
    if nodes != 1:
        raise ValueError(f"--gpus-per-node is required with --nodes {nodes}: e.g. --gpus-per-node 8")
    p = cfg.parallel
    return p.tp * p.pp * (p.dp or p.ep)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        gpus = args.gpus_per_node if args.gpus_per_node is not None else default_gpus_per_node(cfg, args.nodes)
        plan = plan_layout(cfg, args.nodes, gpus, args.gpu_mem_gb, args.attention_scores)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
