"""Direct preference optimisation (Rafailov et al. 2023), TRL's "sigmoid" loss and metric names.

For a prompt x with a preferred completion y_w and a rejected one y_l, log pi(y|x) is the sum of
the completion tokens' log-probabilities (EOS included), and with a frozen reference pi_ref:
    r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)),   r_l = beta (log pi(y_l|x) - log pi_ref(y_l|x))
    loss = mean over pairs of -log sigmoid(r_w - r_l)
logged as rewards/chosen = mean r_w, rewards/rejected = mean r_l, rewards/accuracies = mean
[r_w > r_l], rewards/margins = mean (r_w - r_l), logps/chosen and logps/rejected (TRL's names).
A micro-batch of m pairs is one pass over 2m rows: the m chosen rows, then the m rejected ones.

The reference: its log-probabilities are computed once, before training, by a forward-only pass
of the same pipeline under the same layout - the starting weights themselves (task.reference
null), or the weights of task.reference loaded into the same chunks for that pass and swapped
back - and kept beside each example (two floats per pair). So no second model is held in memory
and each step costs what SFT's does; a (re)start recomputes them from the starting weights before
any checkpoint is restored. The MoE auxiliary losses of the policy are attached where computed,
as in pretraining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe.model import load_full_state_dict

from ..init_from import initial_state
from .base import MicroBatches
from .chat import ChatEncoder
from .examples import Batch, fit, kept, row_arrays, stack_rows, text_field
from .post import ExampleTask


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair [P]: (loss = -log sigmoid(r_w - r_l), r_w, r_l) from sequence log-probs [P]."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def dpo_metrics(loss, chosen, rejected, weight) -> torch.Tensor:
    """Weighted sums [loss, r_w, r_l, r_w > r_l, r_w - r_l] over pairs (detached)."""
    chosen, rejected = chosen.detach(), rejected.detach()
    values = torch.stack([loss.detach(), chosen, rejected, (chosen > rejected).float(),
                          chosen - rejected])
    return (values * weight).sum(dim=1)


@dataclass
class DPOTargets:
    labels: torch.Tensor  # [2P, S] completion targets of the chosen rows then the rejected rows
    ref: torch.Tensor     # [P, 2] reference log-probabilities (chosen, rejected)
    weight: torch.Tensor  # [P] 1, or 0 for validation filler pairs


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
NEEDS = "task.kind=dpo reads prompt, chosen and rejected"


class DPOTask(ExampleTask):
    kind = "dpo"
    loss_key = "dpo_loss"
    rows_per_example = 2
    scalar_names = (*REWARDS, "logps/chosen", "logps/rejected")
    eval_names = ("loss", *REWARDS, "pairs")
    console_keys = ("dpo_loss", *REWARDS)

    def encode(self, records: list, split: str) -> list:
        """[chosen TokenSeq, rejected TokenSeq, reference log-probs (set by prepare)] per record."""
        if split == "train":
            self.chat = ChatEncoder(self.tokenizer, self.cfg.task.chat_template,
                                    self.cfg.data.tokenizer)
        limit, count, items = self.cfg.data.seq_len + 1, self.truncation[split], []
        for src, obj in records:
            prompt = text_field(src, obj, "prompt", NEEDS, allow_empty=True)
            user = {"role": "user", "content": prompt}
            pair = [self.chat.encode([user, {"role": "assistant",
                                             "content": text_field(src, obj, key, NEEDS)}], src)
                    for key in ("chosen", "rejected")]
            fitted = [fit(s, limit, src, self.cfg.task.truncate, count) for s in pair]
            items.append(None if None in fitted else fitted + [np.zeros(2)])
        return kept(items, records[0][0].path)

    def collate(self, items: list, ids: list[int], weights: list[float]) -> Batch:
        S, pad, rows = self.cfg.data.seq_len, self.tokenizer.eos_id, []
        for i in ids:
            chosen, rejected, ref = items[i]
            w, r = row_arrays([chosen], S, pad), row_arrays([rejected], S, pad)
            rows.append({"chosen": w["tokens"], "chosen_labels": w["labels"],
                         "rejected": r["tokens"], "rejected_labels": r["labels"],
                         "ref": ref.astype(np.float32)})
        return stack_rows(rows, weights)

    def micro_batches(self, batch: Batch, size: int) -> MicroBatches:
        """m pairs -> one pass over 2m rows: the chosen rows, then the rejected rows."""
        parts = batch.split(size)
        inputs = [torch.cat([p["chosen"], p["rejected"]]) for p in parts]
        targets = [DPOTargets(torch.cat([p["chosen_labels"], p["rejected_labels"]]), p["ref"],
                              p["weight"]) for p in parts]
        return MicroBatches(inputs, targets, None)

    def last_stage(self, chunk, out, t: DPOTargets, mode: str):
        logps = -chunk.token_losses(out.logits, t.labels).sum(dim=-1)  # [2P] sequence log-probs
        if mode == "reference":
            return logps.detach(), None
        pol_w, pol_l = logps.chunk(2)
        loss, chosen, rejected = dpo_loss(pol_w, pol_l, t.ref[:, 0], t.ref[:, 1],
                                          self.cfg.task.beta)
        sums = dpo_metrics(loss, chosen, rejected, t.weight)
        if mode == "eval":
            return torch.cat([sums, t.weight.sum()[None]]), None
        n = t.weight.sum().clamp(min=1)
        logp_sums = torch.stack([(pol_w.detach() * t.weight).sum(),
                                 (pol_l.detach() * t.weight).sum()])
        return (loss * t.weight).sum() / n, torch.cat([sums[1:], logp_sums]) / n

    def eval_metrics(self, s: dict[str, float]) -> dict[str, float]:
        n = max(s["pairs"], 1.0)
        return {k: s[k] / n for k in self.eval_names if k != "pairs"}

    # ------------------------------------------------------------ the reference
    def prepare(self, trainer) -> None:
        """Reference log-probabilities of every train and valid pair, then ExampleTask.prepare."""
        ref_path = self.cfg.task.reference
        if ref_path:  # the policy's own weights are kept aside while the reference is loaded
            saved = [{k: v.detach().clone() for k, v in c.state_dict().items()}
                     for c in trainer.chunks]
            full = _reference_state(ref_path, trainer.cfg.model)
            for chunk in trainer.chunks:
                load_full_state_dict(chunk, full)
        fns = [self.chunk_fn(c, 1.0, mode="reference") for c in trainer.chunks]
        executor = trainer.make_executor(fns)
        for split in ("train", "valid"):
            logps = self._reference_logps(trainer, executor, split)
            for item, row in zip(self.items[split], logps):
                item[2] = row
        if ref_path:  # the policy starts from its own weights
            for chunk, state in zip(trainer.chunks, saved):
                chunk.load_state_dict(state)
        trainer._log(f"dpo reference: log-probabilities of {len(self.items['train'])} + "
                     f"{len(self.items['valid'])} pairs from {ref_path or 'the starting weights'}")
        super().prepare(trainer)

    @torch.no_grad()
    def _reference_logps(self, trainer, executor, split: str) -> np.ndarray:
        """[N, 2] (chosen, rejected) log-probs. Micro-batch j (pairs j*m ..) runs on dp rank
        j % dp and the last stage's results are gathered over dp: any rank may draw any pair."""
        ctx, m, items = trainer.ctx, trainer.cfg.training.micro_batch_size, self.items[split]
        per_rank = math.ceil(math.ceil(len(items) / m) / ctx.dp)
        out = torch.zeros(per_rank, 2 * m, device=trainer.device)
        trainer.model.eval()
        for lo in range(0, per_rank, trainer.n_micro):
            mbs = [self._micro(trainer, items, (j * ctx.dp + ctx.dp_rank) * m, m)
                   for j in range(lo, min(lo + trainer.n_micro, per_rank))]
            with trainer._autocast():
                got = executor.forward_only(len(mbs), [b.inputs[0] for b in mbs],
                                            [b.targets[0] for b in mbs])
            for k, logps in enumerate(got):
                out[lo + k] = logps.float()
        trainer.model.train()
        out = _gather_over_dp(out, ctx)  # [dp, per_rank, 2m]: micro-batch j * dp + d at [d, j]
        pairs = out.transpose(0, 1).reshape(-1, 2, m).transpose(1, 2)  # [micro-batch, m, 2]
        return pairs.reshape(-1, 2)[:len(items)].double().cpu().numpy()

    def _micro(self, trainer, items: list, start: int, m: int) -> MicroBatches:
        ids = [i if i < len(items) else 0 for i in range(start, start + m)]
        return self.micro_batches(self.collate(items, ids, [1.0] * m).to(trainer.device), m)


def _reference_state(path: str, cfg) -> dict[str, torch.Tensor]:
    """The reference's whole-model state (checkpoint.init_from's reader and checks); its errors
    name task.reference instead of checkpoint.init_from."""
    try:
        return initial_state(path, cfg)
    except (ValueError, FileNotFoundError) as e:
        text = str(e).replace(f"checkpoint.init_from={path}: ", "")
        raise type(e)(f"task.reference={path}: {text}") from None


def _gather_over_dp(t: torch.Tensor, ctx) -> torch.Tensor:
    """t [..] of every data-parallel rank -> [dp, ..] (on the last pipeline stage, the only one
    that reads targets, these are the log-probabilities; elsewhere zeros nobody reads)."""
    parts = [t.clone() for _ in range(ctx.dp)]
    if ctx.dp > 1:
        dist.all_gather(parts, t.contiguous(), group=ctx.dp_group)
    return torch.stack(parts)
