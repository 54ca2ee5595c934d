"""Post-train a decoder: `python launchers/finetune.py CONFIG [key.sub=value ...] [--resume]`.

The pretraining loop with a post-training objective (task.kind): classify (GPT-1: a label per
text, L3 = L2 + task.lm_coef * L1), sft (response-only LM loss, packed examples with document
masking) or dpo (preference pairs against a frozen reference). Starts from checkpoint.init_from:
one of our checkpoints (a run_dir or a step_XXXXXXXX directory) or an HF directory. Every layout
of pretraining works, under torchrun or srun:
    torchrun --nproc_per_node 2 launchers/finetune.py configs/finetune-sft.yaml parallel.tp=2
See docs/post-training.md. Exit statuses as launchers/pretrain.py's: 0 finished; 2 a configuration,
layout, data (naming file:line) or checkpoint error, one line on stderr; 75 stopped by a signal
after saving (run again with --resume); 1 anything else.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launchers.pretrain import _launch_rank, main as train_main  # noqa: E402


def check(cfg) -> None:
    """A post-training task; a warning (rank 0) when it would start from random weights."""
    if cfg.task.kind == "lm":
        raise ValueError("task.kind is lm (pretraining): set task.kind to classify, sft or dpo, or "
                         "run launchers/pretrain.py")
    fresh = not cfg.checkpoint.init_from and cfg.checkpoint.resume == "none"
    if fresh and _launch_rank() == 0:
        print("warning: checkpoint.init_from is not set, so post-training starts from random "
              "weights: set it to a run_dir, a checkpoint or an HF directory", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, __doc__, check, prog="finetune.py")


if __name__ == "__main__":
    sys.exit(main())
