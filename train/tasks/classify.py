"""GPT-1 task fine-tuning: a linear head on the final hidden state of each example's last token.

Radford et al. 2018, section 3.2: with h_l the final block's state at the last input token (our
final norm applied, for pre-norm models), P(y | x) = softmax(h_l W_y); the objective is
    L3 = L2 + lambda * L1,   L2 = mean_i -log P(y_i | x_i),   L1 = the LM loss on the same texts
(mean over their next-token targets), lambda = task.lm_coef (0.5 in the paper; 0 leaves L2).
Input rows are the text's tokens then EOS, the "extract" token whose state is classified; one
example per row, right-padded. The head lives on the last pipeline stage, replicated over tensor-
parallel ranks. Without sequence parallelism every tp rank holds the whole sequence and computes
the head alike (full gradients, as for any tp-replicated weight). With it, a rank holds a
sequence shard: it applies the head to the rows whose extract token is in its shard, zeros the
others and the logits are summed over tp - so its head gradient is a partial sum over tp, the
rule parallel.layout applies to every tp-replicated weight under sequence parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.tensor import reduce_from_tp

from .base import MicroBatches
from .examples import IGNORE, Batch, Source, TokenSeq, fit, stack_rows, text_field
from .post import ExampleTask

HEAD = "cls_head"
NEEDS = "task.kind=classify reads text and label"


def classify_objective(cls_logits: torch.Tensor, labels: torch.Tensor, lm_loss: torch.Tensor,
                       lm_coef: float,
                       weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L3, L2): L2 the (weighted) mean cross-entropy of cls_logits [B, C] at labels [B],
    L3 = L2 + lm_coef * lm_loss."""
    per_example = F.cross_entropy(cls_logits.float(), labels, reduction="none")  # [B]
    w = torch.ones_like(per_example) if weight is None else weight.to(per_example.dtype)
    l2 = (per_example * w).sum() / w.sum().clamp(min=1)
    return l2 + lm_coef * lm_loss, l2


def classifier_logits(head: nn.Module, h: torch.Tensor, last: torch.Tensor, ctx) -> torch.Tensor:
    """head(h at each row's position last[b]) [B, C] from h [B, S(/tp), D]; under sequence
    parallelism from the rank holding that position, summed over tp (see the module docstring)."""
    rows = torch.arange(h.shape[0], device=h.device)
    if not (ctx.sequence_parallel and ctx.tp > 1):
        return head(h[rows, last])
    local = last - ctx.tp_rank * h.shape[1]  # [B] position in this rank's shard
    mine = (local >= 0) & (local < h.shape[1])
    logits = head(h[rows, local.clamp(0, h.shape[1] - 1)]) * mine[:, None]  # [B, C], 0 elsewhere
    return reduce_from_tp(logits, ctx.tp_group)


@dataclass
class ClassifyTargets:
    lm_labels: torch.Tensor  # [B, S] next-token targets of the text, -100 past its end
    last: torch.Tensor       # [B] position of the EOS (extract) token
    labels: torch.Tensor     # [B] class index
    weight: torch.Tensor     # [B] 1, or 0 for validation filler rows


class ClassifyTask(ExampleTask):
    kind = "classify"
    loss_key = "l3_loss"
    scalar_names = ("cls_loss", "lm_loss", "accuracy")
    eval_names = ("cls_loss_sum", "correct", "examples", "lm_loss_sum", "lm_tokens")

    def encode(self, records: list, split: str) -> list:
        """(token ids + EOS, class index) per record; labels: task.labels, or the train split's."""
        if split == "train":
            found = sorted({str(obj.get("label")) for _, obj in records if "label" in obj})
            self.labels = [str(x) for x in self.cfg.task.labels] if self.cfg.task.labels else found
        index = {name: i for i, name in enumerate(self.labels)}
        items = []
        for src, obj in records:
            text = text_field(src, obj, "text", NEEDS)
            if "label" not in obj:
                raise ValueError(f"{src}: missing field 'label' ({NEEDS})")
            label = str(obj["label"])
            if label not in index:
                raise ValueError(f"{src}: unknown label {label!r}: the labels are {self.labels} "
                                 f"(task.labels, or those of the training split); add it there or "
                                 f"fix the line")
            seq = self._sequence(self.tokenizer.encode(text), src, split)
            items.append((seq.tokens, index[label]))
        return items

    def _sequence(self, ids: list[int], src: Source, split: str) -> TokenSeq:
        """text + EOS, cut (counted) to keep its start and the EOS within a row."""
        limit = self.cfg.data.seq_len - 1
        seq = fit(TokenSeq(ids, [True] * len(ids)), limit, src, self.cfg.task.truncate,
                  self.truncation[split])
        return TokenSeq(seq.tokens + [self.tokenizer.eos_id], seq.loss + [True])

    def collate(self, items: list, ids: list[int], weights: list[float]) -> Batch:
        S, rows = self.cfg.data.seq_len, []
        for i in ids:
            tokens, label = items[i]
            n = len(tokens)
            row = np.full(S, self.tokenizer.eos_id, dtype=np.int64)
            row[:n] = tokens
            lm = np.full(S, IGNORE, dtype=np.int64)
            lm[:n - 1] = tokens[1:]
            rows.append({"tokens": row, "lm_labels": lm, "last": n - 1, "label": label})
        return stack_rows(rows, weights)

    def attach(self, chunks: list, seed: int) -> None:
        """The classifier [C, D] (+ bias) on the last stage's chunk."""
        for chunk in chunks:
            if chunk.post:
                head = nn.Linear(chunk.cfg.d_model, len(self.labels), bias=True)
                chunk.add_head(HEAD, head.to(next(chunk.parameters()).device), seed)

    def micro_batches(self, batch: Batch, size: int) -> MicroBatches:
        parts = batch.split(size)
        targets = [ClassifyTargets(p["lm_labels"], p["last"], p["label"], p["weight"])
                   for p in parts]
        return MicroBatches([p["tokens"] for p in parts], targets, None)

    def last_stage(self, chunk, out, t: ClassifyTargets, mode: str):
        head = getattr(chunk, HEAD)
        logits = classifier_logits(head, chunk.norm(out.hidden), t.last, chunk.ctx)  # [B, C]
        logits = logits.float()
        # L1 is computed even with lm_coef 0, so every weight gets a gradient (zero) in every layout
        tokens = chunk.token_losses(out.logits, t.lm_labels)  # [B, S]
        lm_loss = tokens.sum() / (t.lm_labels != IGNORE).sum().clamp(min=1)
        l3, l2 = classify_objective(logits, t.labels, lm_loss, self.cfg.task.lm_coef, t.weight)
        correct = ((logits.argmax(-1) == t.labels).float() * t.weight).sum()
        if mode == "eval":
            return self._eval_sums(logits, tokens, correct, t), None
        accuracy = correct / t.weight.sum().clamp(min=1)
        return l3, torch.stack([l2, lm_loss, accuracy]).detach()

    @staticmethod
    def _eval_sums(logits, tokens, correct, t: ClassifyTargets) -> torch.Tensor:
        """[cls loss sum, correct, examples, LM loss sum, LM tokens] over the rows of weight 1."""
        real = t.weight[:, None] > 0
        per_example = F.cross_entropy(logits, t.labels, reduction="none")
        lm_n = ((t.lm_labels != IGNORE) & real).sum().float()
        return torch.stack([(per_example * t.weight).sum(), correct, t.weight.sum(),
                            (tokens * real).sum(), lm_n])

    def eval_metrics(self, s: dict[str, float]) -> dict[str, float]:
        n = max(s["examples"], 1.0)
        return {"loss": s["cls_loss_sum"] / n, "accuracy": s["correct"] / n,
                "lm_loss": s["lm_loss_sum"] / max(s["lm_tokens"], 1.0)}
