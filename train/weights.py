"""Starting weights for a run (`checkpoint.init_from`) and for a frozen reference model: an HF
directory or one of our own checkpoints, read whole on every rank and cut to its shards.

Our checkpoints are found the way generate/convert find them (a step_XXXXXXXX directory, or the
latest under RUN_DIR/checkpoints); the model config saved in their meta.json must describe the
same network as this run's (fields that only change training - dropout, aux-loss weights,
capacity, expert backend - may differ), checked field by field before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe.config import ModelConfig
from moe.hf import check_matches_hf, hf_state_dict, network_difference
from moe.model import Decoder, load_full_state_dict

from .checkpoint import find_checkpoint, load_full_model_state, read_meta


def starting_state(path: str, cfg: ModelConfig,
                   key: str = "checkpoint.init_from") -> dict[str, torch.Tensor]:
    """The whole-model state dict {name: full tensor} at `path` (HF directory with config.json,
    or a checkpoint / run_dir of ours), checked against `cfg`; `key` names the field in errors."""
    if (Path(path) / "config.json").is_file():
        check_matches_hf(cfg, path)
        return hf_state_dict(path, cfg)
    try:
        ckpt = find_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}={path}: neither an HF directory (config.json) nor a "
                                f"checkpoint (step_XXXXXXXX/meta.json, or a run_dir holding "
                                f"checkpoints/)") from None
    saved = read_meta(ckpt).get("config", {}).get("model")
    if not isinstance(saved, dict):
        raise ValueError(f"{key}={path}: {ckpt}/meta.json has no model config; use a checkpoint "
                         f"saved by launchers/pretrain.py or launchers/finetune.py")
    diff = network_difference(cfg, ModelConfig.from_dict(saved, f"{ckpt}/meta.json model"))
    if diff is not None:
        name, ours, theirs = diff
        raise ValueError(f"{key}={path}: model.{name} is {ours!r} here but {theirs!r} in {ckpt}: "
                         f"set model.{name}={theirs!r} (or start from a matching checkpoint)")
    return load_full_model_state(ckpt)


def load_starting_weights(chunks: list[Decoder], path: str,
                          key: str = "checkpoint.init_from") -> None:
    """Copy the weights at `path` into this rank's chunks (each keeps its tp/ep shards, stage)."""
    full = starting_state(path, chunks[0].cfg, key)
    for chunk in chunks:
        load_full_state_dict(chunk, full)
