"""Loss baselines: short training runs of the tiny dense and tiny MoE presets on the embedded corpus
(the Python standard library's source), whose per-step losses are stored in
tests/assets/loss_baselines.json and compared by tests/test_loss_baselines.py.

    python tools/loss_baselines.py                 # run both, print losses and the largest drift
    python tools/loss_baselines.py --write --force # regenerate tests/assets/loss_baselines.json

Each run is the Trainer's own step (float32, CPU, one thread) on the first BASELINE_BYTES of the
corpus. The stored file also records a fingerprint of the corpus source files, so a Python install
whose standard library differs is recognised instead of being reported as a regression.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from parallel.context import ParallelContext  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import stdlib_files  # noqa: E402
from train.trainer import Trainer  # noqa: E402

BASELINE_FILE = REPO / "tests" / "assets" / "loss_baselines.json"
BASELINE_BYTES = 1_000_000
STEPS = 30
PRESETS = {"tiny": [], "tiny-moe": []}
SETTINGS = ["data.paths=[stdlib]", "data.tokenizer=byte", "data.seq_len=64",
            f"data.stdlib_max_bytes={BASELINE_BYTES}", "training.precision=fp32",
            "training.device=cpu", "training.global_batch_size=8", "training.micro_batch_size=8",
            f"training.max_steps={STEPS}", "training.seed=1234", "training.eval_interval=0",
            "optimizer.lr=2e-3", "optimizer.min_lr=2e-4", "schedule.warmup_steps=5",
            "logging.tensorboard=false"]


def corpus_fingerprint(max_bytes: int = BASELINE_BYTES) -> str:
    """sha256 over the names and bytes of the standard-library files the corpus takes."""
    h = hashlib.sha256()
    for path in stdlib_files(max_bytes):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run(preset: str, work: str | Path, threads: int = 1,
        micro_batch: int | None = None) -> dict[str, list[float]]:
    """STEPS optimizer steps of `preset`; per-step loss and LM loss. `micro_batch` splits each step
    into accumulated micro-batches (for a dense model the same objective in another float order)."""
    overrides = [f"model.preset={preset}", *PRESETS[preset], *SETTINGS,
                 f"run_dir={Path(work) / preset}", f"data.cache_dir={Path(work) / 'data_cache'}"]
    if micro_batch is not None:
        overrides.append(f"training.micro_batch_size={micro_batch}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = load_config(None, overrides)
        trainer = Trainer(cfg, ParallelContext.single(), log=lambda msg: None)
        steps = [trainer.train_step() for _ in range(STEPS)]
    finally:
        torch.set_num_threads(before)
    return {"loss": [s["loss"] for s in steps], "lm_loss": [s["lm_loss"] for s in steps]}


def max_rel_drift(got: list[float], want: list[float]) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help=f"write {BASELINE_FILE.relative_to(REPO)}")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the baseline file if it exists")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (the baseline uses 1)")
    args = parser.parse_args(argv)
    if args.write and BASELINE_FILE.exists() and not args.force:
        raise SystemExit(f"error: {BASELINE_FILE} exists: pass --force to overwrite it")
    stored = json.loads(BASELINE_FILE.read_text()) if BASELINE_FILE.exists() else {}
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "corpus_sha256": corpus_fingerprint(), "settings": SETTINGS, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="loss_baselines_") as work:
        for preset in PRESETS:
            out["runs"][preset] = run(preset, work, threads=args.threads)
            losses = out["runs"][preset]["loss"]
            drift = ""
            if preset in stored.get("runs", {}):
                worst = max_rel_drift(losses, stored["runs"][preset]["loss"])
                drift = f", max drift from stored {worst:.2e}"
            print(f"{preset}: loss {losses[0]:.4f} -> {losses[-1]:.4f}{drift}")
    if args.write:
        BASELINE_FILE.parent.mkdir(parents=True, exist_ok=True)
        BASELINE_FILE.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {BASELINE_FILE}")


if __name__ == "__main__":
    main()
