"""Compare two runs' training-loss curves (e.g. training.fp8=rowwise against bf16).

    python -m benchmarks.loss_curves runs/llama-1.1b-bf16 runs/llama-1.1b-fp8 --tolerance 0.01

Reads each run's <run_dir>/metrics.jsonl (training lines only; a step logged twice, after a resume,
counts once, the later line), smooths the loss with a trailing mean over --window steps (a single
step's loss is noisy in both runs alike), and reports the largest relative gap
|loss_b - loss_a| / loss_a over the steps both runs logged from --skip on (the first steps move
fastest, where a one-step offset would dominate), the step where it is, and the final smoothed
losses. The verdict says whether the gap stays within --tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> training loss from <run_dir>/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: pass a run_dir written by launchers/pretrain.py")
    losses = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n} is not a JSON line: the file is damaged") from None
        if "split" not in row and isinstance(row.get("loss"), (int, float)):
            losses[int(row["step"])] = float(row["loss"])
    if not losses:
        raise ValueError(f"{path} has no training loss lines: did the run take a step?")
    return losses


def smoothed(losses: dict[int, float], window: int) -> dict[int, float]:
    """step -> mean loss over the `window` logged steps ending at it (fewer at the start)."""
    steps = sorted(losses)
    return {s: sum(losses[t] for t in steps[max(0, i + 1 - window):i + 1]) / min(window, i + 1)
            for i, s in enumerate(steps)}


def compare(a: dict[int, float], b: dict[int, float], window: int, skip: int,
            tolerance: float) -> dict:
    """Largest relative gap between the smoothed curves over the common steps >= skip."""
    sa, sb = smoothed(a, window), smoothed(b, window)
    common = sorted(s for s in set(sa) & set(sb) if s >= skip)
    if not common:
        raise ValueError(f"the runs share no logged step >= {skip}: lower --skip or check the "
                         f"run dirs")
    gaps = {s: abs(sb[s] - sa[s]) / abs(sa[s]) for s in common}
    worst, last = max(gaps, key=gaps.get), common[-1]
    return {"steps": len(common), "first": common[0], "last": last, "max_gap": gaps[worst],
            "max_gap_step": worst, "final_a": sa[last], "final_b": sb[last],
            "final_gap": gaps[last], "within": gaps[worst] <= tolerance}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", help="the reference run_dir (e.g. bf16)")
    p.add_argument("run_b", help="the run_dir compared with it (e.g. fp8)")
    p.add_argument("--window", type=int, default=20,
                   help="trailing mean over this many steps (default 20)")
    p.add_argument("--skip", type=int, default=20, help="compare from this step on (default 20)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="largest allowed relative gap (default 0.01)")
    args = p.parse_args(argv)
    try:
        if args.window < 1 or not args.tolerance > 0:
            raise ValueError(f"--window ({args.window}) must be >= 1 and --tolerance "
                             f"({args.tolerance}) > 0")
        a, b = read_losses(args.run_a), read_losses(args.run_b)
        r = compare(a, b, args.window, args.skip, args.tolerance)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    verdict = "within" if r["within"] else "NOT within"
    print(f"{args.run_b} vs {args.run_a}: loss (trailing mean of {args.window} steps) over steps "
          f"{r['first']}-{r['last']} ({r['steps']} logged): largest gap "
          f"{100 * r['max_gap']:.2f}% at step {r['max_gap_step']}; final {r['final_b']:.4f} vs "
          f"{r['final_a']:.4f} ({100 * r['final_gap']:.2f}%): {verdict} {100 * args.tolerance:g}%")
    return r


if __name__ == "__main__":
    main()
