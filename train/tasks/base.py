"""The task interface: what the one training loop asks of an objective.

The trainer (train/trainer.py) owns the model, the layouts, the optimizer, checkpoints and
logging; a Task says what differs between objectives, and nothing else:

    attach(chunks, seed)        heads the objective adds to the last stage (a classifier)
    build_data(trainer)         (train, valid) streams: next_batch(), reset(), state_dict()
    micro_batches(batch, m)     a batch -> inputs (first stage), targets (last stage) and side
                                inputs every stage reads (document ids of packed rows)
    chunk_fn(chunk, scale, ..)  the executor's chunk(x, target[, side]) -> (output, info); the last
                                stage returns the loss, info carries Task.scalar_names' values
    prepare(trainer)            work before the loop (DPO: the reference log-probabilities)
    step_sums / evaluate        what gets logged per step and per validation

Pretraining is LMTask: the trainer's own corpus and token windows, shift-by-one targets,
moe.stages.stage_chunk_fn and the mean LM loss / perplexity validation - exactly the loop as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe.model import DecoderOutput
from moe.stages import stage_chunk_fn


@dataclass
class TaskInfo(DecoderOutput):
    """A task chunk's info: DecoderOutput's detached aux/z losses and MoE statistics (for
    merge_stage_stats) plus `task`, the detached values of Task.scalar_names for this micro-batch
    (last stage only)."""

    task: torch.Tensor | None = None


@dataclass
class MicroBatches:
    """One step's micro-batches in the executor's terms (parallel.pipeline's PipelineExecutor)."""

    inputs: list[torch.Tensor]       # token ids [rows, S] each, read by the first stage
    targets: list[Any]               # what the last stage's loss needs
    side: list[torch.Tensor] | None  # read by every stage (doc ids [rows, S]), or None


class Task:
    """An objective on the one model and loop (the interface is the module docstring's)."""

    kind = "lm"
    loss_key = "lm_loss"             # metrics name of the last stage's loss (before aux losses)
    scalar_names: tuple[str, ...] = ()  # per-step means reported besides it, in TaskInfo.task order
    rows_per_example = 1             # sequences per example (DPO: chosen + rejected)

    def __init__(self, cfg):
        self.cfg = cfg

    def attach(self, chunks: list, seed: int) -> None:
        """Add the objective's heads to the chunks (after the starting weights and the data)."""

    def prepare(self, trainer) -> None:
        """Work on every rank after the model, data and executor exist and before any resume."""

    def build_data(self, trainer):
        raise NotImplementedError

    def micro_batches(self, batch, size: int) -> MicroBatches:
        raise NotImplementedError

    def chunk_fn(self, chunk, aux_grad_scale: float, global_loads: dict | None = None,
                 mode: str = "train"):
        """`global_loads`: the step's expert loads (model.aux_loss_scope=global_batch), refilled
        by the trainer before each step; `mode`: "train" (the loss) or a task's other outputs."""
        raise NotImplementedError

    def evaluate(self, trainer) -> dict[str, float]:
        raise NotImplementedError

    def step_sums(self, infos: list[list[Any]], device: torch.device) -> torch.Tensor:
        """Sum of TaskInfo.task over this rank's chunks and micro-batches, [len(scalar_names)]
        (zeros where the last stage is elsewhere), for the trainer to reduce with the losses."""
        total = torch.zeros(len(self.scalar_names), device=device)
        for per_micro in infos:
            for info in per_micro:
                if getattr(info, "task", None) is not None:
                    total = total + info.task.float().to(device)
        return total

    def console(self, s: dict) -> str:
        """The task's part of the console line of a step."""
        return f"lm {s['lm_loss']:.4f}"

    def describe(self, v: dict) -> str:
        """The console line of a validation run."""
        return f"loss {v['loss']:.4f} | perplexity {v['perplexity']:.2f}"


class LMTask(Task):
    """Pretraining: next-token prediction on the token windows of data.paths."""

    def build_data(self, trainer):
        return trainer._build_data()

    def micro_batches(self, batch: torch.Tensor, size: int) -> MicroBatches:
        """Windows [B, S + 1] -> inputs [:, :-1] and targets [:, 1:] per micro-batch of `size`."""
        micro = batch.split(size)
        return MicroBatches([mb[:, :-1] for mb in micro], [mb[:, 1:] for mb in micro], None)

    def chunk_fn(self, chunk, aux_grad_scale: float, global_loads: dict | None = None,
                 mode: str = "train"):
        return stage_chunk_fn(chunk, aux_grad_scale, global_loads)

    def evaluate(self, trainer) -> dict[str, float]:
        return trainer.evaluate_lm()
