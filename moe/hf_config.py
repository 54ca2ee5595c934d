"""HF transformers config.json <-> our ModelConfig, one pair of functions per model family.

Every family maps its config keys to our fields on import (`FROM_HF`) and back on export
(`TO_HF`); `export_problems` lists what a family cannot express, so an export either writes a
checkpoint transformers reproduces exactly or fails with a one-line error naming the field.
Families whose attention we do not have (DeepSeek's multi-head latent attention, linear attention,
attention sinks) are refused on import with a one-line error that says so. docs/hf.md has the
key-by-key table.

The balance-loss coefficient is not copied across. transformers applies `router_aux_loss_coef`
once, to E * sum_e f_e P_e with f and P pooled over the tokens of every MoE layer and f counting
all k slots of a token (sum_e f_e = k); our `aux_loss_coef` weights each MoE layer's
E * sum_e f_le P_le, with sum_e f_le = 1. With f pooled over the layers (aux_loss_pool_layers)
and over the whole batch (aux_loss_scope=global_batch), the sum of our per-layer terms is exactly
transformers' loss, value and gradient, when
    aux_loss_coef = router_aux_loss_coef * top_k / n_moe_layers
(Mixtral-8x7B: 0.02 * 2 / 32 = 0.00125, 1/16 of the coefficient copied as it was).
"""

from __future__ import annotations

from typing import Any, Callable

from .config import ModelConfig

# Export tries the families in this order and takes the first that expresses the model exactly.
FAMILIES = ("llama", "gpt2", "openai-gpt", "glm4",
            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe")
MOE_FAMILIES = FAMILIES[4:]
HF_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
            "openai-gpt": "OpenAIGPTLMHeadModel", "glm4": "Glm4ForCausalLM",
            "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
            "glm4_moe": "Glm4MoeForCausalLM"}
# transformers' own defaults for router_aux_loss_coef (used when config.json omits the key)
HF_AUX_COEF = {"mixtral": 0.001, "qwen2_moe": 0.001, "qwen3_moe": 0.001, "olmoe": 0.01}
_MLA = "multi-head latent attention (MLA: low-rank compressed keys and values)"
_DSA = f"{_MLA} with DeepSeek sparse attention"
REFUSED = {
    "deepseek_v2": _MLA, "deepseek_v3": _MLA, "kimi_k2": _MLA, "glm4_moe_lite": _MLA,
    "minicpm3": _MLA, "deepseek_v32": _DSA, "glm_moe_dsa": _DSA,
    "qwen3_next": "gated DeltaNet linear attention in most layers",
    "gpt_oss": "attention sinks (a learned per-head softmax term) and a clamped SwiGLU",
}


# ---------------------------------------------------------------- import: HF -> ours
def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Our ModelConfig for an HF config.json mapping; `overrides` set our own fields on top
    (e.g. expert_backend="loop", vocab_pad_multiple=64)."""
    arch = hf.get("model_type")
    refuse_unsupported(hf)
    try:
        fields = FROM_HF[arch](hf)
    except KeyError as e:
        raise ValueError(f"HF {arch} config lacks {e.args[0]!r}: config.json is incomplete"
                         ) from None
    if arch in HF_AUX_COEF:
        coef = hf.get("router_aux_loss_coef", HF_AUX_COEF[arch])
        fields.update(aux_fields_from_hf(ModelConfig(**fields), coef))
    return ModelConfig(**{**fields, **overrides})


def refuse_unsupported(hf: dict[str, Any]) -> None:
    """One-line error for a model_type we cannot import, naming the attention it needs if known."""
    arch = hf.get("model_type")
    if arch in FROM_HF:
        return
    need = REFUSED.get(arch)
    if need is None and "kv_lora_rank" in hf:
        need = _MLA
    if need is None and "linear_attention" in (hf.get("layer_types") or ()):
        need = "linear attention layers"
    what = f"needs {need}, which moeframe does not have" if need else "is not supported"
    raise ValueError(f"HF model_type {arch!r} {what}: use one of {list(FAMILIES)}")


def n_moe_layers(cfg: ModelConfig) -> int:
    return len(cfg.moe_layer_ids)


def aux_fields_from_hf(cfg: ModelConfig, hf_coef: float) -> dict[str, Any]:
    """transformers' pooled balance loss, exactly (module docstring): our per-layer coefficient,
    f pooled over the MoE layers and the whole batch; transformers has no z-loss."""
    return dict(aux_loss_coef=float(hf_coef) * cfg.top_k / n_moe_layers(cfg),
                aux_loss_scope="global_batch", aux_loss_pool_layers=True, z_loss_coef=0.0)


def aux_coef_to_hf(cfg: ModelConfig) -> float:
    """router_aux_loss_coef for our aux_loss_coef (the inverse of aux_fields_from_hf)."""
    return cfg.aux_loss_coef * n_moe_layers(cfg) / cfg.top_k


def _first(hf: dict[str, Any], *names: str) -> Any:
    """The value of the first of `names` in config.json: transformers maps aliases (attribute_map)
    and writes whichever its version calls the field (Qwen3-MoE num_experts / num_local_experts)."""
    for name in names:
        if name in hf:
            return hf[name]
    raise KeyError(names[0])


def _silu(hf: dict[str, Any], arch: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{arch} hidden_act {act!r} is not supported: only 'silu' (SwiGLU) maps "
                         f"to our model")


def _no_attention_bias(hf: dict[str, Any], arch: str) -> None:
    if hf.get("attention_bias", False):
        raise ValueError(f"{arch} attention_bias=True is not supported: it puts a bias on o_proj "
                         f"too, which our model.bias would also put on the MLP; use a checkpoint "
                         f"without attention biases")


def _decoder_fields(hf: dict[str, Any], arch: str, partial: float | None = None,
                    ) -> dict[str, Any]:
    """Fields shared by the RoPE families: RMSNorm pre-norm, RoPE, SwiGLU, GQA. `partial`: the
    family's default partial_rotary_factor when its RoPE honours one (GLM), else None."""
    _silu(hf, arch)
    out = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
               n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
               n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
               max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
               norm_position="pre", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), positions="rope",
               mlp="swiglu", dropout=float(hf.get("attention_dropout", 0.0)),
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
               **_rope_from_hf(hf, 1e6 if arch == "mixtral" else 10000.0))
    if partial is not None:
        params = hf.get("rope_parameters") or {}
        fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", partial))
        out["rotary_fraction"] = float(fraction)
    return out


def _rope_from_hf(hf: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """RoPE fields from transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`.
    Dynamic NTK changes the base with the running sequence length: no static field expresses it."""
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
    raise ValueError(f"HF rope type {kind!r} is not supported: use 'default', 'linear' or "
                     f"'llama3' ('dynamic' rescales with sequence length and has no static "
                     f"equivalent)")


def _window(sliding: list[bool], window: int | None, arch: str) -> dict[str, Any]:
    """local_window / local_layers for the layers flagged as sliding-window layers."""
    n = len(sliding)
    pattern = {"none": not any(sliding), "all": all(sliding),
               "even": sliding == [i % 2 == 0 for i in range(n)],
               "odd": sliding == [i % 2 == 1 for i in range(n)]}
    kind = next((k for k, ok in pattern.items() if ok), None)
    if kind is None:
        layers = [i for i, s in enumerate(sliding) if s]
        raise ValueError(f"{arch} sliding-window layers {layers} are not supported: "
                         f"model.local_layers covers none, all, odd or even layers")
    if kind != "none" and not window:
        raise ValueError(f"{arch} has sliding-window layers but sliding_window is {window!r}: "
                         f"set a window size")
    return dict(local_window=window if kind != "none" else None, local_layers=kind)


def _llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError(f"llama attention_bias ({attn_bias}) != mlp_bias ({mlp_bias}) is not "
                         f"supported: our model.bias covers both; use a checkpoint with equal "
                         f"flags")
    return dict(_decoder_fields(hf, "llama"), bias=attn_bias, ffn_dim=hf["intermediate_size"])


def _mixtral_fields(hf: dict[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window")
    return dict(_decoder_fields(hf, "mixtral"), bias=False, ffn_dim=hf["intermediate_size"],
                expert_ffn_dim=hf["intermediate_size"],
                n_experts=_first(hf, "num_local_experts", "num_experts"),
                top_k=hf["num_experts_per_tok"], moe_every=1, capacity_factor=None,
                norm_topk_prob=True,
                **_window([bool(window)] * hf["num_hidden_layers"], window, "mixtral"))


def _qwen_moe_common(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """Qwen2-MoE and Qwen3-MoE: softmax top-k (normalised or not), dense blocks by stride or by
    list."""
    return dict(_decoder_fields(hf, arch), bias=False, ffn_dim=hf["intermediate_size"],
                expert_ffn_dim=hf["moe_intermediate_size"],
                n_experts=_first(hf, "num_experts", "num_local_experts"),
                top_k=hf["num_experts_per_tok"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                moe_every=hf.get("decoder_sparse_step", 1),
                dense_layers=sorted(hf.get("mlp_only_layers") or []) or None, capacity_factor=None)


def _qwen2_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    last = hf.get("max_window_layers", n)
    types = hf.get("layer_types") or [  # transformers' own default when config.json has none
        "sliding_attention" if (i + 1) % 2 and i < last and window else "full_attention"
        for i in range(n)]
    shared = hf.get("shared_expert_intermediate_size", 0)
    return dict(_qwen_moe_common(hf, "qwen2_moe"), qkv_bias=bool(hf.get("qkv_bias", True)),
                shared_expert_ffn_dim=shared, shared_expert_gate=shared > 0,
                **_window([t == "sliding_attention" for t in types], window, "qwen2_moe"))


def _qwen3_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    _no_attention_bias(hf, "qwen3_moe")
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return dict(_qwen_moe_common(hf, "qwen3_moe"), qkv_bias=False, qk_norm="head",
                **_window([bool(window)] * hf["num_hidden_layers"], window, "qwen3_moe"))


def _olmoe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    _no_attention_bias(hf, "olmoe")
    per_head = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, per_head):
        raise ValueError(f"olmoe head_dim ({hf['head_dim']}) != hidden_size / num_attention_heads "
                         f"({per_head}) is not supported: OLMoE's q_norm spans hidden_size "
                         f"features")
    clip = hf.get("clip_qkv")
    return dict(_decoder_fields(hf, "olmoe"), bias=False, qkv_bias=False, qk_norm="full",
                qkv_clip=float(clip) if clip is not None else None,
                ffn_dim=hf["intermediate_size"], expert_ffn_dim=hf["intermediate_size"],
                n_experts=_first(hf, "num_experts", "num_local_experts"),
                top_k=hf["num_experts_per_tok"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                capacity_factor=None)


def _glm4_fields(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(_decoder_fields(hf, "glm4", partial=0.5), bias=False,
                ffn_dim=hf["intermediate_size"], qkv_bias=bool(hf.get("attention_bias", True)),
                rope_interleaved=True, sandwich_norm=True)


def _glm4_moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """GLM-4.5: sigmoid scores, an expert score-correction bias, groups of experts, scaled weights,
    shared experts and dense first blocks; transformers trains it with no auxiliary loss."""
    f = hf["moe_intermediate_size"]
    return dict(_decoder_fields(hf, "glm4_moe", partial=0.5), bias=False,
                ffn_dim=hf["intermediate_size"], qkv_bias=bool(hf.get("attention_bias", False)),
                qk_norm="head" if hf.get("use_qk_norm") else "none",
                n_experts=_first(hf, "n_routed_experts", "num_local_experts"),
                top_k=hf["num_experts_per_tok"], expert_ffn_dim=f,
                shared_expert_ffn_dim=hf.get("n_shared_experts", 1) * f,
                first_k_dense=hf.get("first_k_dense_replace", 1), score_function="sigmoid",
                expert_bias=True, norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                n_group=hf.get("n_group", 1), topk_group=hf.get("topk_group", 1),
                group_score_topk=2,
                capacity_factor=None, aux_loss_coef=0.0, z_loss_coef=0.0)


def _gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    acts = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
    act = hf.get("activation_function", "gelu_new")
    if act not in acts:
        raise ValueError(f"gpt2 activation_function {act!r} is not supported: use one of "
                         f"{list(acts)}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("gpt2 scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True is "
                         "not supported: our attention always scales by 1/sqrt(head_dim)")
    if hf.get("add_cross_attention", False):
        raise ValueError("gpt2 add_cross_attention=True is not supported: our model is "
                         "decoder-only")
    return dict(_gpt_fields(hf, 1024), ffn_dim=hf.get("n_inner"), norm_position="pre",
                gelu_approx=acts[act], dropout=float(hf.get("resid_pdrop", 0.0)))


def _openai_gpt_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """GPT-1: post-norm blocks, no final norm, a 4d MLP whose 'gelu' is the tanh form."""
    act = hf.get("afn", "gelu")
    if act != "gelu":
        raise ValueError(f"openai-gpt afn {act!r} is not supported: only 'gelu' "
                         f"(tanh-approximated) maps to our model")
    return dict(_gpt_fields(hf, 512), norm_position="post", gelu_approx="tanh",
                dropout=float(hf.get("resid_pdrop", 0.1)))


def _gpt_fields(hf: dict[str, Any], positions: int) -> dict[str, Any]:
    """GPT-1 and GPT-2: LayerNorm with biases, learned positions, GELU MLP, tied head."""
    return dict(vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
                n_heads=hf["n_head"], max_seq_len=hf.get("n_positions", positions),
                norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                positions="learned", mlp="gelu", bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


FROM_HF: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama_fields, "gpt2": _gpt2_fields, "openai-gpt": _openai_gpt_fields,
    "glm4": _glm4_fields, "mixtral": _mixtral_fields, "qwen2_moe": _qwen2_moe_fields,
    "qwen3_moe": _qwen3_moe_fields, "olmoe": _olmoe_fields, "glm4_moe": _glm4_moe_fields}


# ---------------------------------------------------------------- export: what a family needs
Problems = list[tuple[bool, str]]  # (condition, what is wrong and the fix)


def _same(cfg: ModelConfig, **want: Any) -> Problems:
    return [(getattr(cfg, k) == v, f"model.{k} ({getattr(cfg, k)!r}) must be {v!r}")
            for k, v in want.items()]


def _rope_swiglu(cfg: ModelConfig, interleaved: bool = False, partial: bool = False,
                 biases: bool = False) -> Problems:
    """What every RoPE family needs; `partial`: the family's RoPE honours partial_rotary_factor;
    `biases`: it has biases on every linear layer when asked (Llama's attention_bias, mlp_bias)."""
    out = _same(cfg, norm="rmsnorm", norm_position="pre", positions="rope", mlp="swiglu",
                rope_interleaved=interleaved)
    out += [] if biases else _same(cfg, bias=False)
    return out + [(partial or cfg.rotary_fraction == 1.0,
                   f"model.rotary_fraction ({cfg.rotary_fraction}) must be 1.0 (whole heads "
                   f"rotate)")]


def _dense(cfg: ModelConfig) -> Problems:
    return [(cfg.n_experts == 0,
             f"model.n_experts ({cfg.n_experts}) must be 0: export an MoE model as an MoE family")]


def _moe(cfg: ModelConfig, every_layer: bool, shared: bool) -> Problems:
    """MoE basics: dropless, every block MoE when the family has no dense blocks, and a shared
    expert exactly when the family has one."""
    need = "> 0 (the family always has a shared expert)" if shared else "0"
    return [(cfg.n_experts > 0, "model.n_experts (0) must be > 0: export a dense model as a dense "
                                "family"),
            (cfg.capacity_factor is None,
             f"model.capacity_factor ({cfg.capacity_factor}) must be None: HF MoE models are "
             f"dropless (replace(model.cfg, capacity_factor=None) to export anyway)"),
            (not every_layer or len(cfg.moe_layer_ids) == cfg.n_layers,
             "every block must be MoE (model.moe_every 1, model.first_k_dense 0, no "
             "model.dense_layers)"),
            ((cfg.shared_expert_ffn_dim > 0) == shared,
             f"model.shared_expert_ffn_dim ({cfg.shared_expert_ffn_dim}) must be {need}")]


def _softmax_routing(cfg: ModelConfig) -> Problems:
    ok = (cfg.score_function == "softmax" and not cfg.topk_before_softmax and not cfg.expert_bias
          and cfg.routed_scaling_factor == 1.0 and cfg.n_group == 1)
    return [(ok, "the routing must be softmax then top-k: model.score_function softmax, "
                 "model.topk_before_softmax false, model.routed_scaling_factor 1, model.n_group 1, "
                 "no model.expert_bias")]


def _attention(cfg: ModelConfig, qk_norm: str = "none", clip: bool = False,
               qkv_bias: bool = True) -> Problems:
    """q/k norm kind, no sandwich norms, clip only where the family has one, q/k/v biases only
    where it has them."""
    return _same(cfg, qk_norm=qk_norm, sandwich_norm=False) + [
        (clip or cfg.qkv_clip is None, f"model.qkv_clip ({cfg.qkv_clip}) must be None"),
        (qkv_bias or not cfg.use_qkv_bias,
         "model.qkv_bias (True) must be False (the family has no q/k/v biases)")]


def _window_all(cfg: ModelConfig) -> Problems:
    return [(cfg.local_layers in ("none", "all"),
             f"model.local_layers ({cfg.local_layers!r}) must be 'none' or 'all'")]


def _glm4_moe_routing(cfg: ModelConfig) -> Problems:
    moe, first = list(cfg.moe_layer_ids), cfg.n_layers - len(cfg.moe_layer_ids)
    return _same(cfg, score_function="sigmoid", expert_bias=True, topk_before_softmax=False,
                 shared_expert_gate=False) + [
        (cfg.n_group == 1 or cfg.group_score_topk == 2,
         f"model.group_score_topk ({cfg.group_score_topk}) must be 2"),
        (cfg.shared_expert_ffn_dim % cfg.expert_ffn == 0,
         f"model.shared_expert_ffn_dim ({cfg.shared_expert_ffn_dim}) must be a multiple of the "
         f"expert width ({cfg.expert_ffn})"),
        (moe == list(range(first, cfg.n_layers)),
         f"the MoE blocks ({moe}) must be all blocks after the first dense ones (set "
         f"model.first_k_dense only)"),
        (cfg.qk_norm in ("none", "head"),
         f"model.qk_norm ({cfg.qk_norm!r}) must be 'none' or 'head'"),
        *_same(cfg, sandwich_norm=False, qkv_clip=None)]


def _gpt_like(cfg: ModelConfig) -> Problems:
    return [(cfg.norm == "layernorm" and cfg.bias,
             f"model.norm ({cfg.norm!r}) must be 'layernorm' with model.bias True"),
            *_same(cfg, positions="learned", mlp="gelu", local_layers="none", n_experts=0),
            (cfg.use_qkv_bias, "model.qkv_bias (False) must be True or None (c_attn has a bias)"),
            (cfg.kv_heads == cfg.n_heads,
             f"model.n_kv_heads ({cfg.kv_heads}) must equal n_heads ({cfg.n_heads})"),
            (cfg.dim_head * cfg.n_heads == cfg.d_model,
             f"model.head_dim ({cfg.dim_head}) must be d_model / n_heads"),
            *_attention(cfg)]


def _export_checks(cfg: ModelConfig) -> dict[str, Callable[[], Problems]]:
    """Per family, what it needs of our model."""
    rope, moe, soft, att = _rope_swiglu, _moe, _softmax_routing, _attention
    no_window = _same(cfg, local_layers="none")
    llama_bias = [(cfg.use_qkv_bias == cfg.bias,
                   f"model.qkv_bias ({cfg.qkv_bias}) must equal model.bias ({cfg.bias})")]
    head_dim = [(cfg.dim_head * cfg.n_heads == cfg.d_model,
                 f"model.head_dim ({cfg.dim_head}) must be d_model / n_heads")]
    four_d = [(cfg.ffn == 4 * cfg.d_model,
               f"model.ffn_dim ({cfg.ffn}) must be 4 * d_model ({4 * cfg.d_model})")]
    normalised = [(cfg.normalizes_topk, "the k weights must be normalised (model.norm_topk_prob)")]
    return {
        "llama": lambda: rope(cfg, biases=True) + _dense(cfg) + no_window + att(cfg) + llama_bias,
        "gpt2": lambda: _gpt_like(cfg) + _same(cfg, norm_position="pre"),
        "openai-gpt": lambda: _gpt_like(cfg) + _same(cfg, norm_position="post", gelu_approx="tanh")
        + four_d,
        "glm4": lambda: rope(cfg, interleaved=True, partial=True) + _dense(cfg) + no_window
        + _same(cfg, qk_norm="none", sandwich_norm=True, qkv_clip=None),
        "mixtral": lambda: rope(cfg) + moe(cfg, True, False) + soft(cfg) + normalised
        + _window_all(cfg) + att(cfg, qkv_bias=False),
        "qwen2_moe": lambda: rope(cfg) + moe(cfg, False, True) + soft(cfg) + att(cfg)
        + [(cfg.shared_expert_gate, "model.shared_expert_gate must be True")],
        "qwen3_moe": lambda: rope(cfg) + moe(cfg, False, False) + soft(cfg) + _window_all(cfg)
        + att(cfg, "head", qkv_bias=False),
        "olmoe": lambda: rope(cfg) + moe(cfg, True, False) + soft(cfg) + no_window
        + att(cfg, "full", clip=True, qkv_bias=False) + head_dim,
        "glm4_moe": lambda: rope(cfg, partial=True) + moe(cfg, False, True) + no_window
        + _glm4_moe_routing(cfg),
    }


def export_problems(cfg: ModelConfig, arch: str) -> Problems:
    """Everything `arch` needs of our model, as (ok, problem) pairs."""
    checks = _export_checks(cfg)
    if arch not in checks:
        raise ValueError(f"arch {arch!r} is not supported: use one of {list(FAMILIES)}")
    return checks[arch]()


def infer_arch(cfg: ModelConfig) -> str:
    """The first family (in FAMILIES order; MoE families for an MoE model, dense ones otherwise)
    that expresses the model exactly; when none does, the one with the fewest problems, so that
    the export error names what to change."""
    kind = [arch for arch in FAMILIES if (arch in MOE_FAMILIES) == (cfg.n_experts > 0)]
    return min(kind, key=lambda arch: sum(not ok for ok, _ in export_problems(cfg, arch)))


# ---------------------------------------------------------------- export: ours -> HF
def config_to_hf(cfg: ModelConfig, arch: str | None = None) -> dict[str, Any]:
    """The HF config.json mapping for `cfg` as `arch` (inferred when None). Raises when the family
    cannot express the model exactly (e.g. partial rotary as llama, post-norm as gpt2)."""
    arch = arch or infer_arch(cfg)
    for ok, problem in export_problems(cfg, arch):
        if not ok:
            raise ValueError(f"cannot export to HF {arch}: {problem}")
    return {"architectures": [HF_CLASS[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32", **TO_HF[arch](cfg)}


def _rope_decoder_config(cfg: ModelConfig) -> dict[str, Any]:
    """The RoPE families' shared keys. pad_token_id null: a family default (GLM's 151329) may lie
    outside a small vocabulary, and transformers makes it the embedding's padding row."""
    return dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.dim_head, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout, intermediate_size=cfg.ffn,
                pad_token_id=None, **_rope_to_hf(cfg))


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Both the transformers 5 `rope_parameters` and the 4.x `rope_theta`/`rope_scaling` keys.
    Static NTK scaling is only a larger base, theta * factor^(d/(d-2)): it exports as default
    RoPE."""
    theta, params = cfg.rope_theta, {}
    if cfg.rope_scaling == "ntk":
        d = cfg.rotary_dim
        theta = theta * cfg.rope_scaling_factor ** (d / (d - 2))
    elif cfg.rope_scaling == "linear":
        params = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        params = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                  "low_freq_factor": cfg.rope_low_freq_factor,
                  "high_freq_factor": cfg.rope_high_freq_factor,
                  "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    rope, partial = {"rope_type": "default", **params, "rope_theta": theta}, {}
    if cfg.rotary_fraction != 1.0:
        rope["partial_rotary_factor"] = partial["partial_rotary_factor"] = cfg.rotary_fraction
    return {"rope_theta": theta, "rope_scaling": params or None, "rope_parameters": rope, **partial}


def _mixtral_config(cfg: ModelConfig) -> dict[str, Any]:
    window = cfg.local_window if cfg.local_layers == "all" else None
    return dict(_rope_decoder_config(cfg), intermediate_size=cfg.expert_ffn,
                num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                router_aux_loss_coef=aux_coef_to_hf(cfg), sliding_window=window)


def _qwen_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    """Dense blocks as decoder_sparse_step + mlp_only_layers when our config says it that way,
    else as the list of every dense block (first_k_dense, moe_layers)."""
    step, dense = cfg.moe_every, cfg.dense_layers or []
    if cfg.first_k_dense or cfg.moe_layers is not None:
        step, dense = 1, [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    window = cfg.local_window if cfg.local_layers != "none" else None
    return dict(_rope_decoder_config(cfg), num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                router_aux_loss_coef=aux_coef_to_hf(cfg), norm_topk_prob=cfg.normalizes_topk,
                moe_intermediate_size=cfg.expert_ffn, decoder_sparse_step=step,
                mlp_only_layers=dense,
                use_sliding_window=window is not None, sliding_window=window)


def _qwen2_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    types = ["sliding_attention" if cfg.is_local_layer(i) else "full_attention"
             for i in range(cfg.n_layers)]
    return dict(_qwen_moe_config(cfg), qkv_bias=cfg.use_qkv_bias, layer_types=types,
                max_window_layers=cfg.n_layers,
                shared_expert_intermediate_size=cfg.shared_expert_ffn_dim)


def _olmoe_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_rope_decoder_config(cfg), intermediate_size=cfg.expert_ffn,
                num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                router_aux_loss_coef=aux_coef_to_hf(cfg), norm_topk_prob=cfg.normalizes_topk,
                clip_qkv=cfg.qkv_clip, attention_bias=False)


def _glm4_moe_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(_rope_decoder_config(cfg), num_experts_per_tok=cfg.top_k,
                norm_topk_prob=cfg.normalizes_topk, n_routed_experts=cfg.n_experts,
                moe_intermediate_size=cfg.expert_ffn,
                n_shared_experts=cfg.shared_expert_ffn_dim // cfg.expert_ffn,
                first_k_dense_replace=cfg.n_layers - n_moe_layers(cfg),
                routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group,
                topk_group=cfg.topk_group, use_qk_norm=cfg.qk_norm == "head",
                attention_bias=cfg.use_qkv_bias, num_nextn_predict_layers=0)


def _gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    act = {"tanh": "gelu_new", "none": "gelu"}[cfg.gelu_approx]
    return dict(_gpt_config(cfg), n_inner=cfg.ffn, activation_function=act,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)


def _gpt_config(cfg: ModelConfig) -> dict[str, Any]:
    return dict(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)


TO_HF: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {
    "llama": lambda c: dict(_rope_decoder_config(c), attention_bias=c.bias, mlp_bias=c.bias),
    "gpt2": _gpt2_config,
    "openai-gpt": lambda c: dict(_gpt_config(c), afn="gelu"),
    "glm4": lambda c: dict(_rope_decoder_config(c), attention_bias=c.use_qkv_bias),
    "mixtral": _mixtral_config,
    "qwen2_moe": _qwen2_moe_config,
    "qwen3_moe": lambda c: dict(_qwen_moe_config(c), attention_bias=False),
    "olmoe": _olmoe_config,
    "glm4_moe": _glm4_moe_config,
}
