"""Training objectives on the one model, loop and set of layouts: pretraining's language modelling
(LMTask) and post-training - GPT-1 classification, SFT, DPO (docs/post-training.md)."""

from __future__ import annotations

from .base import LMTask, MicroBatches, Task, TaskInfo
from .classify import ClassifyTask
from .dpo import DPOTask
from .sft import SFTTask

TASKS = {"lm": LMTask, "classify": ClassifyTask, "sft": SFTTask, "dpo": DPOTask}


def make_task(cfg) -> Task:
    """The Task for cfg.task.kind (validated by train.config)."""
    return TASKS[cfg.task.kind](cfg)


__all__ = ["ClassifyTask", "DPOTask", "LMTask", "MicroBatches", "SFTTask", "TASKS", "Task",
           "TaskInfo", "make_task"]
