"""Plan a layout: `python launchers/plan.py CONFIG [key=value ...] [--nodes N --gpus-per-node G]`.

Prints, without starting any process or touching a GPU: the rank grid and process groups, each
pipeline stage's layers (MoE / dense), parameters and memory per GPU at its peak, FLOPs per step
and the pipeline bubble, for world = N x G (dp derived as in training). Example:
    python launchers/plan.py configs/moe16x.yaml --nodes 4 --gpus-per-node 8
--simulate then runs the real training step of one rank (default: the one the planner expects
heaviest; --rank R, or --rank all for one of each kind) on fake tensors and prints its measured
peak by category beside the planner's; --imbalance F sizes MoE layers for the busiest expert at F
times its fair share. --search lists the layouts that fit, fastest first.
An invalid layout (world not divisible, tp not dividing the heads, more stages than layers, ...)
is one line on stderr and exit status 2. The computation lives in train/plan.py,
train/simulate.py and train/search.py.
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
    p.add_argument("overrides", nargs="*",
                   help="field overrides such as parallel.tp=4 training.micro_batch_size=2")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node; default: the smallest world the config allows, "
                        "tp x pp x (dp or ep)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0,
                   help="memory per GPU in GiB (default 80)")
    p.add_argument("--simulate", action="store_true",
                   help="run the real training step of one rank on fake tensors and print its "
                        "measured peak memory by category beside the plan (minutes for the "
                        "largest presets)")
    p.add_argument("--rank", default=None,
                   help="with --simulate: a global rank, or 'all' for one rank of each kind "
                        "(default: the rank the planner expects heaviest)")
    p.add_argument("--imbalance", type=float, default=None,
                   help="MoE: size for forced routing with the busiest expert at F times its fair "
                        "share (sets model.forced_routing_imbalance; default 1, balanced)")
    p.add_argument("--search", action="store_true",
                   help="list the layouts of this model and batch that fit the cluster, fastest "
                        "first, and why each rejected family does not")
    p.add_argument("--headroom", type=float, default=0.0,
                   help="with --search: the fraction of each GPU's memory to leave free, e.g. 0.05")
    return p.parse_intermixed_args(argv)


def default_gpus_per_node(cfg, nodes: int) -> int:
    """Without --gpus-per-node: one node holding the smallest world the config accepts."""
    if nodes != 1:
        raise ValueError(f"--gpus-per-node is required with --nodes {nodes}: "
                         f"e.g. --gpus-per-node 8")
    p = cfg.parallel
    return p.tp * p.pp * (p.dp or p.ep)


def _checked(args: argparse.Namespace) -> list[str]:
    """The overrides to apply, after the flag combinations are checked (one-line errors)."""
    if args.rank is not None and not args.simulate:
        raise ValueError("--rank needs --simulate: e.g. --simulate --rank 0")
    if args.headroom and not args.search:
        raise ValueError("--headroom needs --search: e.g. --search --headroom 0.05")
    if args.rank is not None and args.rank != "all" and not args.rank.lstrip("-").isdigit():
        raise ValueError(f"--rank ({args.rank!r}) must be a global rank (an integer) or 'all'")
    if args.imbalance is None:
        return list(args.overrides)
    return [*args.overrides, f"model.forced_routing_imbalance={args.imbalance}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, _checked(args))
        if args.imbalance is not None and not cfg.model.n_experts:
            raise ValueError("--imbalance applies to MoE models (model.n_experts > 0)")
        gpus = args.gpus_per_node
        if gpus is None:
            gpus = default_gpus_per_node(cfg, args.nodes)
        if args.search:
            from train.search import format_search, search_layouts

            found = search_layouts(cfg, args.nodes, gpus, args.gpu_mem_gb, args.headroom)
            print(format_search(found))
            return 0
        plan = plan_layout(cfg, args.nodes, gpus, args.gpu_mem_gb)
        ranks = _ranks(plan, args.rank) if args.simulate else []
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if ranks:
        print()
        print(_simulate(cfg, plan, args.nodes, gpus, ranks))
    return 0


def _simulate(cfg, plan, nodes: int, gpus: int, ranks: list[int]) -> str:
    """Simulate each rank in turn (progress on stderr) and format them beside the plan."""
    from train.simulate import format_simulation, simulate_rank

    sims = []
    for rank in ranks:
        sims.append(simulate_rank(cfg, nodes, gpus, rank))
        print(f"  simulated rank {rank} in {sims[-1].seconds:.0f} s", file=sys.stderr, flush=True)
    return format_simulation(plan, sims)


def _ranks(plan, spec: str | None) -> list[int]:
    from train.simulate import check_rank, ranks_to_simulate

    if spec is None or spec == "all":
        return ranks_to_simulate(plan, every_kind=spec == "all")
    check_rank(int(spec), plan.layout.world)
    return [int(spec)]


if __name__ == "__main__":
    sys.exit(main())
