"""Supervised fine-tuning (instruction tuning): the LM loss on response tokens only.

Each example - prompt/response, or a messages list rendered by the chat template (chat.py) - is a
token sequence whose targets are the assistant's tokens. With task.packing (the default) several
examples share a row: greedy packing in the (shuffled) data order, with the document ids of the row
passed to every pipeline stage so that attention stays inside each example and positions restart
at its first token (moe.layers.document_layout). A packed example therefore gets exactly the
per-token losses it would get alone in its own row. The loss is the mean over a micro-batch's
response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import MicroBatches
from .chat import ChatEncoder, messages_of
from .examples import IGNORE, Batch, fit, kept, pack, row_arrays, stack_rows
from .post import ExampleTask


def response_loss(token_losses: torch.Tensor, labels: torch.Tensor,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the per-token losses [B, S] at trained positions (labels != -100) of rows
    with weight > 0; the training loss is sum / count."""
    keep = labels != IGNORE
    if weight is not None:
        keep = keep & (weight[:, None] > 0)
    return (token_losses * keep).sum(), keep.sum()


def _fill(rows: list, seq_len: int) -> float:
    """Share of the rows' positions that hold a sequence (the rest is padding)."""
    return sum(len(s.tokens) - 1 for row in rows for s in row) / max(len(rows) * seq_len, 1)


@dataclass
class SFTTargets:
    labels: torch.Tensor  # [B, S] next-token targets, -100 outside responses
    weight: torch.Tensor  # [B] 1, or 0 for validation filler rows


class SFTTask(ExampleTask):
    kind = "sft"
    loss_key = "lm_loss"
    eval_names = ("loss_sum", "tokens")

    def build_data(self, trainer):
        streams = super().build_data(trainer)
        if self.cfg.task.packing:
            S = self.cfg.data.seq_len
            parts = [f"{split}: {sum(map(len, rows))} sequences in {len(rows)} rows of {S}, "
                     f"{100 * _fill(rows, S):.1f}% of positions used"
                     for split, rows in self.items.items()]
            trainer._log("sft packing: " + "; ".join(parts))
        return streams

    def encode(self, records: list, split: str) -> list:
        """Rows: lists of TokenSeq (one each without packing), every sequence within seq_len + 1."""
        if split == "train":
            self.chat = ChatEncoder(self.tokenizer, self.cfg.task.chat_template,
                                    self.cfg.data.tokenizer)
        S, count, cut = self.cfg.data.seq_len, self.truncation[split], self.cfg.task.truncate
        seqs = kept([fit(self.chat.encode(messages_of(src, obj), src), S + 1, src, cut, count)
                     for src, obj in records], records[0][0].path)
        if not self.cfg.task.packing:
            return [[s] for s in seqs]
        order = np.random.default_rng((self.cfg.training.seed, 17)).permutation(len(seqs))
        rows = pack([len(seqs[i].tokens) - 1 for i in order], S)
        return [[seqs[order[k]] for k in row] for row in rows]

    def collate(self, items: list, ids: list[int], weights: list[float]) -> Batch:
        S, pad = self.cfg.data.seq_len, self.tokenizer.eos_id
        return stack_rows([row_arrays(items[i], S, pad) for i in ids], weights)

    def micro_batches(self, batch: Batch, size: int) -> MicroBatches:
        parts = batch.split(size)
        side = [p["doc_ids"] for p in parts] if self.cfg.task.packing else None
        targets = [SFTTargets(p["labels"], p["weight"]) for p in parts]
        return MicroBatches([p["tokens"] for p in parts], targets, side)

    def last_stage(self, chunk, out, t: SFTTargets, mode: str):
        total, n = response_loss(chunk.token_losses(out.logits, t.labels), t.labels, t.weight)
        if mode == "eval":
            return torch.stack([total, n.float()]), None
        return total / n.clamp(min=1), None

    def eval_metrics(self, s: dict[str, float]) -> dict[str, float]:
        loss = s["loss_sum"] / max(s["tokens"], 1.0)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}

    def describe(self, v: dict) -> str:
        return f"response loss {v['loss']:.4f} | perplexity {v['perplexity']:.2f}"
