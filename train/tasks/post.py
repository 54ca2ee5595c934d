"""What classify, sft and dpo share: examples from JSONL (or the embedded stdlib datasets), the
truncation report, a chunk function whose last stage runs the task's loss, and validation over
the held-out split.

Losses are means over each micro-batch (over its response tokens for SFT, its examples for
classify and DPO), and the step's objective is their mean over micro-batches and data-parallel
ranks - pretraining's convention, so every layout computes the same objective as one process
with the same micro_batch_size. Validation instead sums over the whole held-out split (at most
training.eval_steps global batches, each example once; the last batch is filled up with
weight-0 rows), so accuracies are exact counts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..data import tokenizer_for
from .base import Task, TaskInfo
from .embedded import embedded_dataset
from .examples import ExampleStream, Truncation, read_jsonl, split_records


class ExampleTask(Task):
    """Base of the post-training tasks; subclasses define encode, collate, micro_batches,
    last_stage, eval_names and eval_metrics."""

    eval_names: tuple[str, ...] = ()  # the sums the last stage returns in "eval" mode
    console_keys: tuple[str, ...] = ()  # step scalars on the console; () = loss and scalar_names

    # ------------------------------------------------------------ data
    def build_data(self, trainer) -> tuple[ExampleStream, ExampleStream]:
        c, ctx = trainer.cfg, trainer.ctx
        self.tokenizer = tokenizer_for(c)
        train, valid = self._records(c)
        self.truncation = {"train": Truncation(), "valid": Truncation()}
        self.items = {"train": self.encode(train, "train"), "valid": self.encode(valid, "valid")}
        report = "; ".join(t.summary(s) for s, t in self.truncation.items())
        trainer._log(f"{self.kind} data: {report}")
        kw = dict(global_batch_size=c.training.global_batch_size, seed=c.training.seed,
                  dp_rank=ctx.dp_rank, dp_size=trainer.dp)
        return (ExampleStream(len(self.items["train"]), self._collate("train"), name="train", **kw),
                ExampleStream(len(self.items["valid"]), self._collate("valid"), name="valid", **kw))

    def _records(self, c) -> tuple[list, list]:
        k = c.task
        path = embedded_dataset(self.kind, c.data.cache_dir) if k.data == "stdlib" else k.data
        valid = read_jsonl(k.valid_data) if k.valid_data else None
        return split_records(read_jsonl(path), valid, k.valid_fraction, str(path))

    def _collate(self, split: str):
        return lambda ids, weights: self.collate(self.items[split], ids, weights)

    def encode(self, records: list, split: str) -> list:
        raise NotImplementedError

    def collate(self, items: list, ids: list[int], weights: list[float]):
        raise NotImplementedError

    # ------------------------------------------------------------ the last stage
    def chunk_fn(self, chunk, aux_grad_scale: float, global_loads: dict | None = None,
                 mode: str = "train"):
        """chunk(x, target[, doc_ids]) -> (output, TaskInfo): hidden states on non-last chunks; on
        the last, last_stage's value - the loss ("train"), the eval sums ("eval") or another
        per-row output a task defines - with the MoE aux losses attached where computed."""

        def run(x: torch.Tensor, target: Any, doc_ids: torch.Tensor | None = None):
            out = chunk(x, None, aux_grad_scale=aux_grad_scale, global_loads=global_loads,
                        doc_ids=doc_ids)
            info = TaskInfo(logits=None, aux_loss=out.aux_loss, z_loss=out.z_loss, moe=out.moe)
            if not chunk.post:
                return out.hidden, info
            value, info.task = self.last_stage(chunk, out, target, mode)
            info.loss = value.detach() if mode == "train" else None
            return value, info

        return run

    def last_stage(self, chunk, out, target, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    # ------------------------------------------------------------ before the loop, validation
    def prepare(self, trainer) -> None:
        """Executors for validation (every rank, same order); for a run that starts at step 0 (not
        a resumed one, whose metrics already hold them), the truncation report in metrics and a
        validation at step 0, the baseline the learning is measured against."""
        fns = [self.chunk_fn(c, 1.0, mode="eval") for c in trainer.chunks]
        self.eval_executor = trainer.make_executor(fns)
        if trainer.run_start.resume_from is not None:
            return
        fractions = {f"truncated_fraction/{s}": t.fraction for s, t in self.truncation.items()}
        trainer.logger.log(0, fractions, prefix="data")
        if trainer.cfg.training.eval_interval:
            v = trainer.evaluate()
            trainer.logger.log(0, v, prefix="valid")
            trainer._log(f"validation at step 0: {self.describe(v)}")

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, float]:
        """eval_names sums over the held-out split (forward only), reduced over pp and dp."""
        m, ctx = trainer.cfg.training.micro_batch_size, trainer.ctx
        trainer.model.eval()
        total = torch.zeros(len(self.eval_names), device=trainer.device)
        for batch in trainer.valid_data.ordered_batches(trainer.cfg.training.eval_steps):
            mb = self.micro_batches(batch.to(trainer.device), m)
            with trainer._autocast():
                outs = self.eval_executor.forward_only(len(mb.inputs), mb.inputs, mb.targets,
                                                       mb.side)
            for o in outs:
                total += o.float()
        trainer.model.train()
        if ctx.pp > 1:
            dist.all_reduce(total, group=ctx.pp_group)
        if ctx.dp > 1:
            dist.all_reduce(total, group=ctx.dp_group)
        return self.eval_metrics(dict(zip(self.eval_names, total.tolist())))

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def console(self, s: dict) -> str:
        keys = self.console_keys or (self.loss_key, *self.scalar_names)
        return " | ".join(f"{k} {s[k]:.4f}" for k in keys)

    def describe(self, v: dict) -> str:
        return " | ".join(f"{k} {x:.4f}" for k, x in v.items())
