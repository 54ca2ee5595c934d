"""Sample text from a checkpoint: `python launchers/generate.py RUN_DIR_OR_CHECKPOINT --prompt "def "`.

Greedy (--temperature 0), temperature sampling and top-k. Single process; the checkpoint may come from
any parallel layout (its shards are read whole, see train/checkpoint.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moe.config import ModelConfig  # noqa: E402
from moe.model import Decoder, build_empty, load_full_state_dict  # noqa: E402
from train.checkpoint import find_checkpoint, load_full_model_state, read_meta  # noqa: E402
from train.data import load_tokenizer  # noqa: E402


def load_model(ckpt: Path) -> tuple[Decoder, dict]:
    """The whole model of a checkpoint saved under any layout, in one process, and the run's config."""
    meta = read_meta(ckpt)
    cfg = ModelConfig.from_dict(meta["config"]["model"])
    model = build_empty(cfg)
    load_full_state_dict(model, load_full_model_state(ckpt))
    return model.eval(), meta["config"]


@torch.no_grad()
def generate(model: Decoder, ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
             generator: torch.Generator) -> list[int]:
    """Autoregressive sampling; recomputes the (cropped) context each step - simple, no KV cache."""
    x = torch.tensor([ids], dtype=torch.long)
    for _ in range(max_new_tokens):
        logits = model(x[:, -model.cfg.max_seq_len:]).logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return x[0, len(ids):].tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint",
                   help="run_dir (its newest checkpoint that verifies) or a step_XXXXXXXX directory")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", default=None, help="override the run's data.tokenizer")
    args = p.parse_args(argv)
    try:
        model, cfg = load_model(find_checkpoint(Path(args.checkpoint)))
        tok = load_tokenizer(args.tokenizer or cfg["data"]["tokenizer"])
        ids = tok.encode(args.prompt)
        if not ids:
            raise ValueError(f"--prompt {args.prompt!r} gives no tokens: the model needs at least "
                             f"one to continue, e.g. --prompt 'def '")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, gen)
    print(args.prompt + tok.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
