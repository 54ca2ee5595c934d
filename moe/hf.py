"""Hugging Face transformers interop: checkpoints in and out (safetensors, no network) for
Llama, GPT-2, GPT-1 (openai-gpt), GLM-4 (glm4), Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and GLM-4.5
(glm4_moe).

    load_hf(dir)                 a Decoder from an HF directory (config.json + model.safetensors)
    hf_state_dict(dir, cfg)      its tensors under our names, for any layout (checkpoint.init_from)
    save_hf(model, dir[, arch])  the inverse, loadable by AutoModelForCausalLM.from_pretrained

config.json <-> ModelConfig lives in moe/hf_config.py (with the exact mapping of the auxiliary-loss
coefficient and the families we refuse), tensor names and layouts in moe/hf_tensors.py; docs/hf.md
lists every family's keys. Reading and writing checks that every tensor on each side is used exactly
once. transformers and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

import torch

from .config import ModelConfig, first_difference
from .hf_config import FAMILIES, HF_CLASS, aux_coef_to_hf, aux_fields_from_hf, config_from_hf, \
    config_to_hf, export_problems, infer_arch
from .hf_tensors import Rule, embedding_key, hf_rules
from .model import Decoder, build_empty

ARCHS = FAMILIES
# Non-parameter buffers some older checkpoints carry (the GPTs' causal masks, Llama's inv_freq).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# ---------------------------------------------------------------- reading checkpoints
def read_hf_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path}: point at a directory written by save_pretrained/save_hf")
    with open(file) as f:
        return json.load(f)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json.
    Pickle checkpoints (pytorch_model.bin) are refused: loading them can run arbitrary code."""
    from safetensors.torch import load_file

    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}: "
                                f"re-save the model with safe_serialization=True")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"shard {shard} listed in model.safetensors.index.json is missing from {path}")
        tensors.update(load_file(file))
    return tensors


def _normalise_keys(sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str,
                    hf: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Drop known non-parameter buffers and GLM-4.5's multi-token-prediction layers; add the GPTs'
    'transformer.' prefix that the original hub checkpoints lack; drop an lm_head that a tied
    checkpoint also stores, if it equals the embedding."""
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    if arch in ("gpt2", "openai-gpt") and not any(k.startswith("transformer.") for k in sd):
        sd = {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in sd.items()}
    if arch == "glm4_moe":
        sd = _drop_mtp_layers(sd, cfg.n_layers, _mtp_layers(hf or {}))
    emb = embedding_key(arch)
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        if emb in sd and not torch.equal(sd["lm_head.weight"], sd[emb]):
            raise ValueError(f"tie_word_embeddings is true but lm_head.weight differs from {emb}: "
                             f"set tie_word_embeddings false in config.json")
        sd.pop("lm_head.weight")
    return sd


def _mtp_layers(hf: dict[str, Any]) -> int:
    return int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)


def _drop_mtp_layers(sd: dict[str, torch.Tensor], n_layers: int, n_mtp: int,
                     ) -> dict[str, torch.Tensor]:
    """GLM-4.5 checkpoints append num_nextn_predict_layers multi-token-prediction layers
    (model.layers.{N}..) that the causal LM never runs; transformers skips them on load, and so do
    we, with a warning. Any other layer index past N stays in and fails as an unexpected key."""
    mtp = range(n_layers, n_layers + n_mtp)
    pattern = re.compile(r"model\.layers\.(\d+)\.")
    dropped = {k for k in sd if (m := pattern.match(k)) and int(m.group(1)) in mtp}
    if dropped:
        warnings.warn(f"skipping {len(dropped)} tensors of the multi-token-prediction layers "
                      f"{list(mtp)}: the causal LM does not use them (as in transformers)",
                      stacklevel=3)
    return {k: v for k, v in sd.items() if k not in dropped}


def convert_from_hf(sd: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Apply every rule; each HF key must be used exactly once."""
    ours: dict[str, torch.Tensor] = {}
    for rule in rules:
        missing = [k for k in rule.hf if k not in sd]
        if missing:
            raise ValueError(f"checkpoint is missing {missing[0]} (needed for our {rule.ours[0]}): "
                           f"the checkpoint is incomplete or config.json does not match it")
        try:
            ours.update(zip(rule.ours, rule.load([sd[k] for k in rule.hf]), strict=True))
        except RuntimeError as e:
            raise ValueError(f"cannot convert {rule.hf[0]} to our {rule.ours[0]}: {str(e).splitlines()[0]}") from e
    used = {k for rule in rules for k in rule.hf}
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"unexpected key {unexpected[0]} in checkpoint ({len(unexpected)} unused): "
                       f"config.json does not describe these weights")
    return ours


def _check_shapes(model: Decoder, ours: dict[str, torch.Tensor], rules: list[Rule]) -> None:
    source = {o: r.hf[0] for r in rules for o in r.ours}
    for name, p in model.state_dict().items():
        if name not in ours:
            raise ValueError(f"no checkpoint tensor maps to our {name}: the conversion table lacks it")
        if ours[name].shape != p.shape:
            raise ValueError(f"shape mismatch for our {name} (from {source[name]}): checkpoint gives "
                             f"{tuple(ours[name].shape)}, config.json implies {tuple(p.shape)}")


def load_hf(path: str, **overrides: Any) -> Decoder:
    """A Decoder (eval mode, float32, single process) from an HF directory of a supported family:
    config.json + model.safetensors (or a sharded index). `overrides` set our ModelConfig fields
    (e.g. expert_backend, vocab_pad_multiple). Every checkpoint tensor must land, strictly."""
    cfg = config_from_hf(read_hf_config(path), **overrides)
    model = build_empty(cfg)
    model.load_state_dict(hf_state_dict(path, cfg, model), strict=True)
    return model.eval()


def check_matches_hf(cfg: ModelConfig, path: str) -> None:
    """Raise if `cfg` describes a different network than the HF checkpoint's config.json."""
    diff = first_difference(cfg, config_from_hf(read_hf_config(path)))
    if diff is not None:
        name, a, b = diff
        raise ValueError(f"checkpoint.init_from={path}: model.{name} is {a!r} here but {b!r} in "
                         f"its config.json: set model.{name}={b!r} (or use a matching checkpoint)")


def hf_state_dict(path: str, cfg: ModelConfig, model: Decoder | None = None) -> dict[str, torch.Tensor]:
    """The HF checkpoint at `path` as our whole-model state dict (our names, full tensors) for `cfg`,
    checked tensor by tensor: every checkpoint key used once, every parameter present, shapes equal."""
    hf = read_hf_config(path)
    arch = hf["model_type"]
    sd = _normalise_keys(read_safetensors(path), cfg, arch, hf)
    model = model if model is not None else build_empty(cfg, device="meta")
    fused = any(k.endswith("experts.gate_up_proj") for k in sd)
    rules = hf_rules(cfg, arch, set(model.state_dict()), fused_experts=fused)
    ours = convert_from_hf(sd, rules)
    _check_shapes(model, ours, rules)
    return ours


# ---------------------------------------------------------------- writing checkpoints
def convert_to_hf(model: Decoder, arch: str) -> dict[str, torch.Tensor]:
    """HF-named contiguous tensors for the whole single-process model; tied weights appear once."""
    sd = model.state_dict()
    rules = hf_rules(model.cfg, arch, set(sd))
    uncovered = sorted(set(sd) - {o for r in rules for o in r.ours})
    if uncovered:
        raise ValueError(f"our {uncovered[0]} has no HF {arch} name: this model cannot be exported as {arch}")
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensors = rule.save([sd[o].detach() for o in rule.ours])
        out.update((k, t.contiguous()) for k, t in zip(rule.hf, tensors, strict=True))
    return out


def save_hf(model: Decoder, path: str, arch: str | None = None) -> None:
    """Write config.json + model.safetensors that transformers' AutoModelForCausalLM.from_pretrained
    loads with no missing or unexpected keys. Experts are written per expert, as save_pretrained
    writes them; GLM-4.5's expert biases as its e_score_correction_bias buffers. The model must
    be whole: one process, all pipeline stages."""
    from safetensors.torch import save_file

    ctx, cfg = model.ctx, model.cfg
    if ctx.tp != 1 or ctx.ep != 1 or not (model.pre and model.post) or len(model.layers) != cfg.n_layers:
        raise ValueError("save_hf needs the whole single-process model (tp=1, ep=1, every pipeline stage): "
                         "gather a full checkpoint into one Decoder first")
    arch = arch or infer_arch(cfg)
    hf_cfg = config_to_hf(cfg, arch)
    hf_cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    tensors = convert_to_hf(model, arch)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)


__all__ = ["ARCHS", "HF_CLASS", "Rule", "config_from_hf", "config_to_hf", "infer_arch",
           "export_problems", "hf_rules", "aux_fields_from_hf", "aux_coef_to_hf", "read_hf_config",
           "read_safetensors", "convert_from_hf", "convert_to_hf", "load_hf", "hf_state_dict",
           "check_matches_hf", "save_hf"]
