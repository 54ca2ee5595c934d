"""checkpoint.init_from: the whole-model weights a run starts from (fresh optimizer, step 0).

A source is an HF directory (config.json + safetensors, moe/hf.py) or one of our checkpoints (a
step_XXXXXXXX directory with meta.json, or a run_dir / checkpoints folder: its newest checkpoint
that verifies; any layout, read whole by train/checkpoint.py). Without checkpoint.upcycle the
source must describe the same network as model (training-only fields may differ); with it, the
source is a dense model upcycled into model's MoE shape (moe/upcycle.py). Every rank reads the
whole tensors and cuts its own shards (moe.model.load_full_state_dict).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from moe.config import ModelConfig, first_difference
from moe.upcycle import upcycle_state

from .checkpoint import find_checkpoint, load_full_model_state, read_meta


def _is_ours(path: str) -> bool:
    return (Path(path) / "meta.json").is_file()


def resolve_source(path: str) -> str:
    """A run_dir or checkpoints folder of ours -> its newest step_XXXXXXXX directory that verifies
    (train.checkpoint.find_checkpoint); a checkpoint, an HF directory or anything else
    (read_source_config names what it expected) unchanged."""
    if _is_ours(path) or (Path(path) / "config.json").is_file():
        return path
    try:
        return str(find_checkpoint(path))
    except FileNotFoundError:
        return path


def read_source_config(path: str, pad_multiple: int = 1) -> ModelConfig:
    """The source's model config (meta.json or config.json alone: cheap, read before the
    weights), its vocabulary padded to a multiple of `pad_multiple` (the run's
    model.vocab_pad_multiple)."""
    if _is_ours(path):
        saved = ModelConfig.from_dict(read_meta(path)["config"]["model"],
                                      where="checkpoint.init_from model")
        return replace(saved, vocab_pad_multiple=pad_multiple)
    if (Path(path) / "config.json").is_file():
        from moe.hf import config_from_hf, read_hf_config

        return config_from_hf(read_hf_config(path), vocab_pad_multiple=pad_multiple)
    raise FileNotFoundError(f"checkpoint.init_from={path}: neither one of our checkpoints (a "
                            f"step_XXXXXXXX directory with meta.json) nor an HF directory "
                            f"(config.json): point at one")


def read_source_state(path: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The source's whole-model state dict under our names, for its config `cfg`
    (read_source_config), vocabulary rows re-padded to cfg's multiple."""
    if _is_ours(path):
        return _repad_vocab(load_full_model_state(path), cfg)
    from moe.hf import hf_state_dict

    return hf_state_dict(path, cfg)


def _repad_vocab(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Embedding / head rows [V_saved, D] -> [V_padded, D]: the vocab_size real rows, then zeros."""
    for name in ("tok_emb.weight", "head.weight"):
        if name in state:
            rows = state[name][: cfg.vocab_size]
            pad = cfg.padded_vocab_size - cfg.vocab_size
            state[name] = torch.nn.functional.pad(rows, (0, 0, 0, pad))
    return state


def initial_state(path: str, cfg: ModelConfig, upcycle: bool = False,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole-model state dict that starts a run of model `cfg` from `path`; a source that
    describes another network is refused from its config, before any weight is read."""
    path = resolve_source(path)
    source_cfg = read_source_config(path, cfg.vocab_pad_multiple)
    if not upcycle:
        _check_same_network(cfg, source_cfg, path)
    state = read_source_state(path, source_cfg)
    return upcycle_state(state, source_cfg, cfg, seed) if upcycle else state


def _check_same_network(cfg: ModelConfig, source_cfg: ModelConfig, path: str) -> None:
    if not _is_ours(path):
        from moe.hf import check_matches_hf  # its message names config.json

        check_matches_hf(cfg, path)
        return
    diff = first_difference(cfg, source_cfg)
    if diff is None:
        return
    name, ours, theirs = diff
    hint = " (or set checkpoint.upcycle=true to turn a dense model into this MoE)" \
        if source_cfg.n_experts == 0 and cfg.n_experts else ""
    raise ValueError(f"checkpoint.init_from={path}: model.{name} is {ours!r} here but "
                     f"{theirs!r} in that checkpoint: set model.{name}={theirs!r}{hint}")
