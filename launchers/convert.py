"""Export a training checkpoint as an HF transformers checkpoint (the families of docs/hf.md):

    python launchers/convert.py RUN_DIR_OR_CHECKPOINT OUT_DIR [--arch FAMILY]

OUT_DIR then loads with `AutoModelForCausalLM.from_pretrained(OUT_DIR)`. The other direction needs
no conversion step: set `checkpoint.init_from=HF_DIR` in a training config (any parallel layout).
The checkpoint may come from any parallel layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launchers.generate import load_model  # noqa: E402
from moe.hf import ARCHS, save_hf  # noqa: E402
from train.checkpoint import find_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run_dir (latest checkpoint) or a step_XXXXXXXX directory")
    p.add_argument("out", help="output directory for config.json + model.safetensors")
    p.add_argument("--arch", choices=sorted(ARCHS), default=None,
                   help="HF model_type; default: the first family that expresses the model "
                        "exactly (docs/hf.md)")
    args = p.parse_args(argv)
    try:
        ckpt = find_checkpoint(Path(args.checkpoint))
        model, _ = load_model(ckpt)
        save_hf(model, args.out, args.arch)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} from {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
