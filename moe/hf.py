"""Hugging Face transformers interop: Llama, GPT-2 and Mixtral checkpoints in and out (safetensors, no network).

Why a table of rules rather than string rewriting: every one of our parameters is made from named
HF tensors by one rule (`Rule.load`) and written back by its inverse (`Rule.save`), and both
directions check that every tensor on each side is used exactly once. A checkpoint with a missing
expert, a stray key or a wrong shape is a one-line error naming the key, never a silent drop.

Layouts (HF Linear weights are [out, in] like ours; GPT-2's Conv1D weights are [in, out]):
    Llama/Mixtral  q/k/v/o_proj -> attn.wq/wk/wv/wo;  mlp gate/up/down_proj -> mlp.w1/w3/w2
    GPT-2          c_attn [D, 3D] -> (wq | wk | wv)^T;  c_proj, c_fc, mlp.c_proj transposed;  wpe -> pos_emb
    Mixtral        gate -> router.weight;  experts.{e}.w1/w3/w2 (what save_pretrained writes) or fused
                   experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F] (transformers 5 in memory)
                   -> experts.w_in [E, D, 2F] = cat(w1^T, w3^T, -1),  experts.w_out [E, F, D] = w2^T
Padded vocabulary rows (ours: padded_vocab_size >= vocab_size) are zeros on load and cut on save.
transformers and safetensors are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import ModelConfig, first_difference
from .model import Decoder, build_empty

ARCHS = ("llama", "gpt2", "mixtral")
HF_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM"}
# Non-parameter buffers some older checkpoints carry (GPT-2's causal mask, Llama's inv_freq).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# ---------------------------------------------------------------- config: HF -> ours
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Our ModelConfig for an HF config.json mapping; `overrides` set our own fields on top
    (e.g. expert_backend="loop", vocab_pad_multiple=64)."""
    arch = hf.get("model_type")
    if arch not in ARCHS:
        raise ValueError(f"HF model_type {arch!r} is not supported: use one of {list(ARCHS)}")
    try:
        fields = {"llama": _llama_fields, "gpt2": _gpt2_fields, "mixtral": _mixtral_fields}[arch](hf)
    except KeyError as e:
        raise ValueError(f"HF {arch} config lacks {e.args[0]!r}: config.json is incomplete") from None
    return ModelConfig(**{**fields, **overrides})


def _llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"llama hidden_act {act!r} is not supported: only 'silu' (SwiGLU) maps to our model")
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(f"llama attention_bias ({attn_bias}) != mlp_bias ({mlp_bias}) is not supported: "
                         f"our model.bias covers both; use a checkpoint with equal flags")
    return dict(_decoder_fields(hf), bias=attn_bias, ffn_dim=hf["intermediate_size"],
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_from_hf(hf, 10000.0))


def _mixtral_fields(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"mixtral hidden_act {act!r} is not supported: only 'silu' (SwiGLU) maps to our model")
    window = hf.get("sliding_window")
    return dict(_decoder_fields(hf), bias=False, ffn_dim=hf["intermediate_size"],
                expert_ffn_dim=hf["intermediate_size"], n_experts=hf["num_local_experts"],
                top_k=hf["num_experts_per_tok"], moe_every=1, capacity_factor=None,
                norm_topk_prob=True,
                aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), z_loss_coef=0.0,
                local_window=window, local_layers="all" if window else "none",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_from_hf(hf, 1e6))


def _decoder_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Fields shared by Llama and Mixtral: RMSNorm pre-norm, RoPE, SwiGLU, GQA."""
    return dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim"), max_seq_len=hf.get("max_position_embeddings", 2048),
                norm="rmsnorm", norm_position="pre", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                positions="rope", mlp="swiglu", dropout=float(hf.get("attention_dropout", 0.0)))


def _rope_from_hf(hf: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """RoPE fields from transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`.
    Dynamic NTK changes the base with the running sequence length, which no static field expresses."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = dict(rope_theta=theta)
    if kind == "default":
        return out
    if kind == "linear":
        return dict(out, rope_scaling="linear", rope_scaling_factor=float(params["factor"]))
    if kind == "llama3":
        return dict(out, rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
                    rope_low_freq_factor=float(params["low_freq_factor"]),
                    rope_high_freq_factor=float(params["high_freq_factor"]),
                    rope_original_max_seq_len=int(params["original_max_position_embeddings"]))
    raise ValueError(f"HF rope type {kind!r} is not supported: use 'default', 'linear' or 'llama3' "
                     f"('dynamic' rescales with sequence length and has no static equivalent)")


def _gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    acts = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
    act = hf.get("activation_function", "gelu_new")
    if act not in acts:
        raise ValueError(f"gpt2 activation_function {act!r} is not supported: use one of {list(acts)}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("gpt2 scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True is not "
                         "supported: our attention always scales by 1/sqrt(head_dim)")
    if hf.get("add_cross_attention", False):
        raise ValueError("gpt2 add_cross_attention=True is not supported: our model is decoder-only")
    return dict(vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
                ffn_dim=hf.get("n_inner"), max_seq_len=hf.get("n_positions", 1024), norm="layernorm",
                norm_position="pre", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), positions="learned",
                mlp="gelu", gelu_approx=acts[act], bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                dropout=float(hf.get("resid_pdrop", 0.0)))


# ---------------------------------------------------------------- config: ours -> HF
def infer_arch(cfg: ModelConfig) -> str:
    """MoE -> mixtral; learned positions with LayerNorm -> gpt2; anything else -> llama."""
    if cfg.n_experts:
        return "mixtral"
    return "gpt2" if cfg.positions == "learned" and cfg.norm == "layernorm" else "llama"


def config_to_hf(cfg: ModelConfig, arch: str | None = None) -> dict[str, Any]:
    """The HF config.json mapping for `cfg` as `arch` (inferred when None). Raises when the
    architecture cannot express the model exactly (e.g. partial rotary as llama, post-norm as gpt2)."""
    arch = arch or infer_arch(cfg)
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not supported: use one of {list(ARCHS)}")
    for ok, problem in _export_checks(cfg)[arch]:
        if not ok:
            raise ValueError(f"cannot export to HF {arch}: {problem}")
    body = _gpt2_config(cfg) if arch == "gpt2" else _rope_decoder_config(cfg, arch)
    return {"architectures": [HF_CLASS[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32", **body}


def _export_checks(cfg: ModelConfig) -> dict[str, list[tuple[bool, str]]]:
    """(condition, what is wrong and the fix) per architecture."""
    rope_swiglu = [
        (cfg.norm == "rmsnorm", f"model.norm ({cfg.norm!r}) must be 'rmsnorm'"),
        (cfg.norm_position == "pre", f"model.norm_position ({cfg.norm_position!r}) must be 'pre'"),
        (cfg.positions == "rope", f"model.positions ({cfg.positions!r}) must be 'rope'"),
        (cfg.rotary_fraction == 1.0, f"model.rotary_fraction ({cfg.rotary_fraction}) must be 1.0 (whole heads rotate)"),
        (not cfg.rope_interleaved, "model.rope_interleaved (True) must be False (HF rotates halves)"),
        (cfg.mlp == "swiglu", f"model.mlp ({cfg.mlp!r}) must be 'swiglu'"),
        (cfg.shared_expert_ffn_dim == 0, f"model.shared_expert_ffn_dim ({cfg.shared_expert_ffn_dim}) must be 0"),
    ]
    llama = rope_swiglu + [
        (cfg.n_experts == 0, f"model.n_experts ({cfg.n_experts}) must be 0: export an MoE model as mixtral"),
        (cfg.local_layers == "none", f"model.local_layers ({cfg.local_layers!r}) must be 'none' (no sliding window)"),
        (cfg.use_qkv_bias == cfg.bias, f"model.qkv_bias ({cfg.qkv_bias}) must equal model.bias ({cfg.bias})"),
    ]
    mixtral = rope_swiglu + [
        (cfg.n_experts > 0, "model.n_experts (0) must be > 0: export a dense model as llama"),
        (cfg.moe_every == 1, f"model.moe_every ({cfg.moe_every}) must be 1 (every Mixtral block is MoE)"),
        (all(cfg.is_moe_layer(i) for i in range(cfg.n_layers)),
         "every block must be MoE (model.first_k_dense 0, model.dense_layers and "
         "model.moe_layers null)"),
        (_mixtral_routing(cfg), "the routing must be Mixtral's: model.score_function softmax, "
                                "the k weights normalised, model.routed_scaling_factor 1, "
                                "model.n_group 1, no model.expert_bias"),
        (not cfg.bias and not cfg.use_qkv_bias, "model.bias and model.qkv_bias must be False (Mixtral has no biases)"),
        (cfg.capacity_factor is None, f"model.capacity_factor ({cfg.capacity_factor}) must be None: Mixtral is "
                                      f"dropless (replace(model.cfg, capacity_factor=None) to export anyway)"),
        (cfg.local_layers in ("none", "all"), f"model.local_layers ({cfg.local_layers!r}) must be 'none' or 'all'"),
    ]
    gpt2 = [
        (cfg.norm == "layernorm" and cfg.bias, f"model.norm ({cfg.norm!r}) must be 'layernorm' with model.bias True"),
        (cfg.norm_position == "pre", f"model.norm_position ({cfg.norm_position!r}) must be 'pre' (GPT-2 is pre-norm)"),
        (cfg.positions == "learned", f"model.positions ({cfg.positions!r}) must be 'learned'"),
        (cfg.mlp == "gelu", f"model.mlp ({cfg.mlp!r}) must be 'gelu'"),
        (cfg.use_qkv_bias, "model.qkv_bias (False) must be True or None (GPT-2 c_attn has a bias)"),
        (cfg.kv_heads == cfg.n_heads, f"model.n_kv_heads ({cfg.kv_heads}) must equal n_heads ({cfg.n_heads})"),
        (cfg.dim_head * cfg.n_heads == cfg.d_model, f"model.head_dim ({cfg.dim_head}) must be d_model / n_heads"),
        (cfg.n_experts == 0, f"model.n_experts ({cfg.n_experts}) must be 0"),
        (cfg.local_layers == "none", f"model.local_layers ({cfg.local_layers!r}) must be 'none'"),
    ]
    return {"llama": llama, "mixtral": mixtral, "gpt2": gpt2}


def _mixtral_routing(cfg: ModelConfig) -> bool:
    return (cfg.score_function == "softmax" and cfg.normalizes_topk
            and cfg.routed_scaling_factor == 1.0 and cfg.n_group == 1 and not cfg.expert_bias)


def _rope_decoder_config(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    out = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_head, hidden_act="silu",
               max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
               attention_dropout=cfg.dropout, **_rope_to_hf(cfg))
    if arch == "llama":
        return dict(out, intermediate_size=cfg.ffn, attention_bias=cfg.bias, mlp_bias=cfg.bias)
    window = cfg.local_window if cfg.local_layers == "all" else None
    return dict(out, intermediate_size=cfg.expert_ffn, num_local_experts=cfg.n_experts,
                num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_coef, sliding_window=window)


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Both the transformers 5 `rope_parameters` and the 4.x `rope_theta`/`rope_scaling` keys. Static
    NTK scaling is only a larger base, theta * factor^(d/(d-2)), so it exports as default RoPE."""
    theta, params = cfg.rope_theta, {}
    if cfg.rope_scaling == "ntk":
        d = cfg.rotary_dim
        theta = theta * cfg.rope_scaling_factor ** (d / (d - 2))
    elif cfg.rope_scaling == "linear":
        params = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        params = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                  "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                  "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    return {"rope_theta": theta, "rope_scaling": params or None,
            "rope_parameters": {"rope_type": "default", **params, "rope_theta": theta}}


def _gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    act = {"tanh": "gelu_new", "none": "gelu"}[cfg.gelu_approx]
    return dict(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn,
                n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps, activation_function=act,
                resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)


# ---------------------------------------------------------------- name/layout rules
Convert = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class Rule:
    """Our tensors `ours` are `load(hf tensors)`; the HF tensors `hf` are `save(our tensors)`."""
    ours: tuple[str, ...]
    hf: tuple[str, ...]
    load: Convert
    save: Convert


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(ts)


def _transposed(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.t() for t in ts]


def _swap_last_two(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.transpose(-2, -1) for t in ts]


def _plain(ours: str, hf: str, conv1d: bool = False) -> Rule:
    fn = _transposed if conv1d else _same
    return Rule((ours,), (hf,), fn, fn)


def _linear(ours: str, hf: str, conv1d: bool = False) -> list[Rule]:
    """Weight and bias of one linear layer (the bias rule is dropped later if we have no bias)."""
    return [_plain(f"{ours}.weight", f"{hf}.weight", conv1d), _plain(f"{ours}.bias", f"{hf}.bias")]


def _vocab(ours: str, hf: str, cfg: ModelConfig) -> Rule:
    """[V, D] in HF; [V_padded, D] here with zero padding rows."""
    pad = cfg.padded_vocab_size - cfg.vocab_size
    return Rule((ours,), (hf,), lambda ts: [torch.nn.functional.pad(ts[0], (0, 0, 0, pad))],
                lambda ts: [ts[0][: cfg.vocab_size]])


def _qkv_rule(ours: str, hf: str, d: int, kind: str) -> Rule:
    """GPT-2 c_attn: one Conv1D [D, 3D] (bias [3D]) whose output columns are q | k | v."""
    names = tuple(f"{ours}.{w}.{kind}" for w in ("wq", "wk", "wv"))
    if kind == "weight":
        return Rule(names, (f"{hf}.weight",), lambda ts: [c.t() for c in ts[0].split(d, dim=1)],
                    lambda ts: [torch.cat([t.t() for t in ts], dim=1)])
    return Rule(names, (f"{hf}.bias",), lambda ts: list(ts[0].split(d)), lambda ts: [torch.cat(ts)])


def _expert_rules(ours: str, hf: str, n_experts: int, fused: bool) -> list[Rule]:
    """Mixtral experts: per-expert w1 (gate), w3 (up) [F, D], w2 (down) [D, F], or fused
    gate_up_proj [E, 2F, D] / down_proj [E, D, F]  ->  w_in [E, D, 2F], w_out [E, F, D]."""
    if fused:
        swap = _swap_last_two  # [E, 2F, D] <-> [E, D, 2F] and [E, D, F] <-> [E, F, D]
        return [Rule((f"{ours}.experts.w_in",), (f"{hf}.experts.gate_up_proj",), swap, swap),
                Rule((f"{ours}.experts.w_out",), (f"{hf}.experts.down_proj",), swap, swap),
                _plain(f"{ours}.router.weight", f"{hf}.gate.weight")]
    gate_up = tuple(f"{hf}.experts.{e}.{w}.weight" for e in range(n_experts) for w in ("w1", "w3"))
    down = tuple(f"{hf}.experts.{e}.w2.weight" for e in range(n_experts))

    def load_in(ts):  # [w1_0, w3_0, w1_1, ...] -> [E, D, 2F]
        return [torch.stack([torch.cat((ts[i].t(), ts[i + 1].t()), dim=1) for i in range(0, len(ts), 2)])]

    def save_in(ts):
        f = ts[0].shape[-1] // 2
        return [half.t() for e in range(ts[0].shape[0]) for half in (ts[0][e, :, :f], ts[0][e, :, f:])]

    return [Rule((f"{ours}.experts.w_in",), gate_up, load_in, save_in),
            Rule((f"{ours}.experts.w_out",), down, lambda ts: [torch.stack([t.t() for t in ts])],
                 lambda ts: [t.t() for t in ts[0].unbind(0)]),
            _plain(f"{ours}.router.weight", f"{hf}.gate.weight")]


def _layer_rules(cfg: ModelConfig, arch: str, i: int, fused: bool) -> list[Rule]:
    o = f"layers.{i}"
    if arch == "gpt2":
        h = f"transformer.h.{i}"
        return [*_linear(f"{o}.attn_norm", f"{h}.ln_1"), *_linear(f"{o}.mlp_norm", f"{h}.ln_2"),
                _qkv_rule(f"{o}.attn", f"{h}.attn.c_attn", cfg.d_model, "weight"),
                _qkv_rule(f"{o}.attn", f"{h}.attn.c_attn", cfg.d_model, "bias"),
                *_linear(f"{o}.attn.wo", f"{h}.attn.c_proj", conv1d=True),
                *_linear(f"{o}.mlp.w1", f"{h}.mlp.c_fc", conv1d=True),
                *_linear(f"{o}.mlp.w2", f"{h}.mlp.c_proj", conv1d=True)]
    h = f"model.layers.{i}"
    rules = [_plain(f"{o}.attn_norm.weight", f"{h}.input_layernorm.weight"),
             _plain(f"{o}.mlp_norm.weight", f"{h}.post_attention_layernorm.weight")]
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        rules += _linear(f"{o}.attn.{ours}", f"{h}.self_attn.{theirs}")
    if arch == "mixtral":
        return rules + _expert_rules(f"{o}.mlp", f"{h}.mlp" if fused else f"{h}.block_sparse_moe",
                                     cfg.n_experts, fused)
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        rules += _linear(f"{o}.mlp.{ours}", f"{h}.mlp.{theirs}")
    return rules


def hf_rules(cfg: ModelConfig, arch: str, our_names: set[str], fused_experts: bool = False) -> list[Rule]:
    """Every rule for `arch` whose tensors our model has (bias rules vanish for bias-free models)."""
    gpt2 = arch == "gpt2"
    rules = [_vocab("tok_emb.weight", "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight", cfg),
             _vocab("head.weight", "lm_head.weight", cfg),
             *_linear("norm", "transformer.ln_f" if gpt2 else "model.norm"),
             _plain("pos_emb.weight", "transformer.wpe.weight")]
    for i in range(cfg.n_layers):
        rules += _layer_rules(cfg, arch, i, fused_experts)
    return [r for r in rules if all(name in our_names for name in r.ours)]


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


def _normalise_keys(sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Drop known non-parameter buffers; add GPT-2's 'transformer.' prefix that the original hub
    checkpoints lack; drop an lm_head that a tied checkpoint also stores, if it equals the embedding."""
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    if arch == "gpt2" and not any(k.startswith("transformer.") for k in sd):
        sd = {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in sd.items()}
    emb = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        if emb in sd and not torch.equal(sd["lm_head.weight"], sd[emb]):
            raise ValueError(f"tie_word_embeddings is true but lm_head.weight differs from {emb}: "
                             f"set tie_word_embeddings false in config.json")
        sd.pop("lm_head.weight")
    return sd


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
    """A Decoder (eval mode, float32, single process) from an HF Llama/GPT-2/Mixtral directory:
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
    arch = read_hf_config(path)["model_type"]
    sd = _normalise_keys(read_safetensors(path), cfg, arch)
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
    loads with no missing or unexpected keys. Mixtral experts are written per expert, as
    save_pretrained writes them. The model must be whole: one process, all pipeline stages."""
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


__all__ = ["ARCHS", "Rule", "config_from_hf", "config_to_hf", "infer_arch", "hf_rules", "read_hf_config",
           "read_safetensors", "convert_from_hf", "convert_to_hf", "load_hf", "hf_state_dict", "check_matches_hf", "save_hf"]
