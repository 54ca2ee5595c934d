"""ModelConfig: one dataclass that spans the decoder-only family, plus the preset registry.

Every field is documented where it is defined; `validate()` checks cross-field rules and raises a
one-line ValueError naming the field, its value and the fix. Presets are plain dicts of overrides
(nanoGPT style) registered in PRESETS; `tiny_variant()` shrinks a preset while keeping its structure
(norm, positions, GQA ratio, MoE layout) so tests exercise the same code paths cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post"),
    "positions": ("learned", "sinusoidal", "rope"),
    "rope_scaling": (None, "linear", "ntk", "llama3"),
    "mlp": ("gelu", "swiglu"),
    "gelu_approx": ("none", "tanh"),
    "local_layers": ("none", "all", "odd", "even"),
    "expert_backend": ("grouped_mm", "padded", "loop", "megablocks"),
    "score_function": ("softmax", "sigmoid"),
    "aux_loss_scope": ("micro_batch", "sequence", "global_batch"),
    "qk_norm": ("none", "head", "full"),
}


@dataclass
class ModelConfig:
    # --- shape ---
    vocab_size: int = 257                 # tokenizer vocabulary (byte-level default: 256 bytes + EOS)
    vocab_pad_multiple: int = 1           # embedding/head rows padded up to a multiple of this (Megatron's make-vocab-divisible)
    d_model: int = 128                    # residual stream width
    n_layers: int = 4                     # decoder blocks
    n_heads: int = 4                      # query heads
    n_kv_heads: int | None = None         # key/value heads: None = n_heads (MHA), 1 = MQA, else GQA
    head_dim: int | None = None           # None = d_model // n_heads (GPT-3 13B uses 128 with d_model 5140)
    ffn_dim: int | None = None            # dense MLP width; None = 4*d_model (gelu) or LLaMA's 2/3*4*d rounded to 256 (swiglu)
    max_seq_len: int = 256                # longest sequence (learned/sinusoidal table size, RoPE cache)
    # --- norms ---
    norm: str = "rmsnorm"                 # layernorm | rmsnorm
    norm_position: str = "pre"            # pre (GPT-2 onward) | post (GPT-1, original Transformer)
    norm_eps: float = 1e-5                # epsilon inside the norm's square root
    sandwich_norm: bool = False           # pre-norm only: also normalise each sublayer's output before its residual add (GLM-4's post_self_attn_layernorm / post_mlp_layernorm)
    # --- positions ---
    positions: str = "rope"               # learned | sinusoidal | rope
    rope_theta: float = 10000.0           # RoPE base
    rotary_fraction: float = 1.0          # fraction of each head's dims that rotate (ChatGLM: 0.5)
    rope_interleaved: bool = False        # rotate (x0,x1),(x2,x3).. pairs (GLM) instead of halves (LLaMA/HF)
    rope_scaling: str | None = None       # None | linear | ntk | llama3 (3.1-style per-frequency)
    rope_scaling_factor: float = 1.0      # context extension factor for rope_scaling
    rope_original_max_seq_len: int = 8192  # llama3 scaling: the pre-extension context
    rope_low_freq_factor: float = 1.0     # llama3 scaling
    rope_high_freq_factor: float = 4.0    # llama3 scaling
    # --- attention ---
    local_window: int | None = None       # banded (local) attention width in tokens; None = full causal
    local_layers: str = "none"            # which layers use the band: none | all | odd | even (GPT-3 alternates)
    qk_norm: str = "none"                 # RMSNorm of queries and keys before RoPE: none | head (each head's Dh features, one [Dh] weight per q and k: Qwen3, GLM-4.5 use_qk_norm) | full (the whole projection, [H*Dh] and [K*Dh] weights: OLMoE; under tp its statistics are summed over the tp group)
    qkv_clip: float | None = None         # clamp q, k and v to [-c, c] after the q/k norms (OLMo / OLMoE clip_qkv); None = off
    # --- MLP / linear layers ---
    mlp: str = "swiglu"                   # gelu (GPT) | swiglu (LLaMA, GLM)
    gelu_approx: str = "tanh"             # tanh (GPT-1/2 "gelu_new") | none (exact erf)
    bias: bool = False                    # biases on linear layers (GPT: True; LLaMA: False)
    qkv_bias: bool | None = None          # bias on q/k/v only; None = same as `bias` (GLM: True with bias False)
    tie_embeddings: bool = False          # LM head shares the input embedding matrix
    dropout: float = 0.0                  # residual/attention dropout probability
    fp32_residual: bool = False           # under bf16 autocast keep the residual stream in float32 (Megatron's fp32_residual_connection); False = bf16, half the bytes
    init_std: float = 0.02                # normal init std; output projections use std/sqrt(2*n_layers)
    # --- mixture of experts ---
    n_experts: int = 0                    # 0 = dense model
    top_k: int = 2                        # experts per token
    moe_every: int = 1                    # 1 = every block is MoE; 2 = every other block (blocks 1, 3, 5, ...) (HF decoder_sparse_step)
    first_k_dense: int = 0                # the first k blocks keep a dense MLP (HF first_k_dense_replace: DeepSeek, GLM-4.5)
    dense_layers: list | None = None      # block indices that keep a dense MLP (HF mlp_only_layers: Qwen-MoE); None = none
    moe_layers: list | None = None        # the MoE block indices, explicitly; when set, moe_every / first_k_dense / dense_layers stay at their defaults
    expert_ffn_dim: int | None = None     # expert MLP width; None = ffn_dim
    shared_expert_ffn_dim: int = 0        # width of an always-on shared expert added to the routed output; 0 = none
    capacity_factor: float | None = None  # None = dropless; else each expert keeps ceil(cf*T*k/E) slots, drops the rest
    aux_loss_coef: float = 0.01           # Switch/GShard load-balancing loss weight, applied in every MoE layer; the layers' losses are summed (each equals the coefficient at perfect balance)
    z_loss_coef: float = 1e-3             # router z-loss weight (ST-MoE), per MoE layer, summed over layers like aux_loss_coef
    expert_backend: str = "grouped_mm"    # grouped_mm | padded | loop (fp32 reference) | megablocks (optional)
    forced_routing_imbalance: float | None = None  # None = learned routing; 1 = every expert its fair share (benchmarks); F > 1 = busiest expert at F x its share (worst-case sizing)
    shared_expert_gate: bool = False      # scale the shared expert's output per token by sigmoid(x . w_gate) (HF Qwen2-MoE shared_expert_gate); needs shared_expert_ffn_dim > 0
    # --- routing (the math is in moe/router.py) ---
    score_function: str = "softmax"       # softmax | sigmoid (DeepSeek-V3, GLM-4.5): router logits -> expert scores (HF scoring_func)
    topk_before_softmax: bool = False     # softmax only: choose the k largest logits, then softmax over those k (Megatron's default order); False = softmax over all experts, then top-k
    norm_topk_prob: bool | None = None    # divide the k chosen scores by their sum (HF norm_topk_prob); None = when top_k > 1 (Mixtral), top-1 keeps its probability (Switch)
    routed_scaling_factor: float = 1.0    # multiplies the k gate weights after any normalising (HF routed_scaling_factor; DeepSeek-V3: 2.5)
    n_group: int = 1                      # group-limited routing: experts in n_group contiguous groups of n_experts / n_group (HF n_group); 1 = off
    topk_group: int = 1                   # groups each token may route to, the best by group score (HF topk_group); 1 when n_group is 1
    group_score_topk: int = 2             # a group's score is the sum of its best this-many expert scores (DeepSeek-V3, GLM-4.5: 2; DeepSeek-V2's group max: 1)
    expert_bias: bool = False             # per-expert bias added to the scores only to choose experts (aux-loss-free balancing, DeepSeek-V3; HF e_score_correction_bias); a checkpointed buffer
    expert_bias_update_rate: float = 1e-3  # after each optimizer step: bias += rate * sign(mean load - load), loads over the whole step (every micro-batch and rank); 0 = frozen
    router_input_jitter: float = 0.0      # training only: multiply the router's input by U(1 - eps, 1 + eps) (Switch; Megatron moe_input_jitter_eps); the experts see the clean input; 0 = off
    aux_loss_scope: str = "micro_batch"   # micro_batch (Switch/GShard) | sequence (DeepSeek-V2/V3: per sequence, averaged) | global_batch (f over the whole step: the same loss for every micro-batch size and layout)
    aux_loss_pool_layers: bool = False    # every MoE layer's balance loss uses f pooled over all MoE layers, as transformers' load_balancing_loss_func does (Mixtral, Qwen-MoE, OLMoE; docs/hf.md); needs aux_loss_scope=global_batch

    def __post_init__(self) -> None:
        self.validate()

    # ----- derived sizes -----
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def ffn(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 256 * math.ceil(int(8 * self.d_model / 3) / 256)

    @property
    def expert_ffn(self) -> int:
        return self.expert_ffn_dim if self.expert_ffn_dim is not None else self.ffn

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return m * math.ceil(self.vocab_size / m)

    @property
    def use_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_head * self.rotary_fraction)

    @property
    def normalizes_topk(self) -> bool:
        """Whether the k chosen scores are divided by their sum (a softmax over the k chosen logits
        is normalised by construction)."""
        if self.topk_before_softmax:
            return True
        return self.top_k > 1 if self.norm_topk_prob is None else self.norm_topk_prob

    def is_moe_layer(self, i: int) -> bool:
        """Block i has an MoE MLP: listed in moe_layers, or else past the first_k_dense blocks, not
        in dense_layers and on the moe_every stride (HF Qwen-MoE's
        (i + 1) % decoder_sparse_step == 0)."""
        if self.n_experts == 0:
            return False
        if self.moe_layers is not None:
            return i in self.moe_layers
        if i < self.first_k_dense or i in (self.dense_layers or ()):
            return False
        return i % self.moe_every == self.moe_every - 1

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """The MoE blocks, however the config names them (moe_every, first_k_dense, ...)."""
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

    def is_local_layer(self, i: int) -> bool:
        if self.local_window is None or self.local_layers == "none":
            return False
        return {"all": True, "odd": i % 2 == 1, "even": i % 2 == 0}[self.local_layers]

    # ----- validation -----
    def validate(self) -> None:
        """Check every field and cross-field rule; raise one ValueError naming field, value and fix."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} ({getattr(self, name)!r}) is not one of {list(allowed)}")
        for name in ("vocab_size", "vocab_pad_multiple", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} ({getattr(self, name)}) must be >= 1")
        _check(self.d_model % self.n_heads == 0 or self.head_dim is not None,
               f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model}), or set model.head_dim")
        _check(self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0,
               f"model.n_kv_heads ({self.kv_heads}) must divide model.n_heads ({self.n_heads}) (MHA: equal, MQA: 1)")
        _check(self.dim_head % 2 == 0 or self.positions != "rope",
               f"model.head_dim ({self.dim_head}) must be even for RoPE")
        _check(0.0 < self.rotary_fraction <= 1.0 and self.rotary_dim % 2 == 0,
               f"model.rotary_fraction ({self.rotary_fraction}) must be in (0, 1] and give an even rotary dim "
               f"(head_dim {self.dim_head} x fraction = {self.dim_head * self.rotary_fraction})")
        _check(self.positions != "sinusoidal" or self.d_model % 2 == 0,
               f"model.d_model ({self.d_model}) must be even for sinusoidal positions")
        _check(self.rope_scaling is None or self.rope_scaling_factor >= 1.0,
               f"model.rope_scaling_factor ({self.rope_scaling_factor}) must be >= 1 when rope_scaling is set")
        _check(self.local_layers == "none" or (self.local_window or 0) >= 1,
               f"model.local_layers ({self.local_layers!r}) needs model.local_window >= 1")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout ({self.dropout}) must be in [0, 1)")
        _check(self.qkv_clip is None or self.qkv_clip > 0,
               f"model.qkv_clip ({self.qkv_clip}) must be > 0, or null for no clipping")
        _check(not self.sandwich_norm or self.norm_position == "pre",
               f"model.sandwich_norm needs model.norm_position=pre (got {self.norm_position!r}): "
               f"a post-norm block already normalises each sublayer's sum")
        self._validate_moe()

    def _validate_moe(self) -> None:
        if self.n_experts == 0:
            return
        _check(self.n_experts >= 1, f"model.n_experts ({self.n_experts}) must be >= 0")
        _check(1 <= self.top_k <= self.n_experts,
               f"model.top_k ({self.top_k}) must be between 1 and model.n_experts ({self.n_experts})")
        _check(self.capacity_factor is None or self.capacity_factor > 0,
               f"model.capacity_factor ({self.capacity_factor}) must be > 0, or null for dropless")
        _check(self.shared_expert_ffn_dim >= 0, f"model.shared_expert_ffn_dim ({self.shared_expert_ffn_dim}) must be >= 0")
        _check(self.aux_loss_coef >= 0 and self.z_loss_coef >= 0,
               "model.aux_loss_coef and model.z_loss_coef must be >= 0")
        f, top = self.forced_routing_imbalance, self.n_experts / self.top_k
        # an expert takes at most one slot per token, so the busiest gets at most E / k its share
        _check(f is None or 1.0 <= f <= top and (f == 1.0 or self.top_k < self.n_experts),
               f"model.forced_routing_imbalance ({f}) must be in [1, n_experts / top_k = {top:g}] "
               f"(1 = perfectly balanced), or null for learned routing")
        self._validate_moe_layers()
        self._validate_routing()

    def _validate_moe_layers(self) -> None:
        """Which blocks are MoE: indices in range, no conflicting ways to say it, at least one."""
        _check(self.first_k_dense >= 0, f"model.first_k_dense ({self.first_k_dense}) must be >= 0")
        for name in ("dense_layers", "moe_layers"):
            ids = getattr(self, name)
            ok = ids is None or (all(type(i) is int and 0 <= i < self.n_layers for i in ids)
                                 and len(set(ids)) == len(ids))
            _check(ok, f"model.{name} ({ids}) must list distinct block indices in "
                       f"[0, n_layers = {self.n_layers})")
        explicit = self.moe_layers is not None
        defaults = (self.moe_every, self.first_k_dense, self.dense_layers) == (1, 0, None)
        _check(not explicit or defaults,
               "model.moe_layers lists the MoE blocks itself: leave model.moe_every (1), "
               "model.first_k_dense (0) and model.dense_layers (null) at their defaults")
        _check(any(self.is_moe_layer(i) for i in range(self.n_layers)),
               f"model.n_experts ({self.n_experts}) > 0 but no block is MoE: check "
               f"model.moe_every, model.first_k_dense, model.dense_layers and model.moe_layers "
               f"against model.n_layers ({self.n_layers})")
        _check(not self.shared_expert_gate or self.shared_expert_ffn_dim > 0,
               "model.shared_expert_gate needs a shared expert: set "
               "model.shared_expert_ffn_dim > 0")

    def _validate_routing(self) -> None:
        E, k, g = self.n_experts, self.top_k, self.n_group
        _check(self.score_function == "softmax" or not self.topk_before_softmax,
               "model.topk_before_softmax needs model.score_function=softmax")
        _check(not (self.topk_before_softmax and self.norm_topk_prob is False),
               "model.topk_before_softmax gives weights that sum to 1 by construction: "
               "leave model.norm_topk_prob null")
        _check(self.routed_scaling_factor > 0,
               f"model.routed_scaling_factor ({self.routed_scaling_factor}) must be > 0")
        _check(g >= 1 and E % g == 0,
               f"model.n_group ({g}) must be >= 1 and divide model.n_experts ({E})")
        per_group = E // g
        _check(1 <= self.topk_group <= g and self.topk_group * per_group >= k,
               f"model.topk_group ({self.topk_group}) must be in [1, n_group = {g}] and leave at "
               f"least top_k ({k}) experts (topk_group x n_experts / n_group = "
               f"{self.topk_group * per_group})")
        _check(g == 1 or 1 <= self.group_score_topk <= per_group,
               f"model.group_score_topk ({self.group_score_topk}) must be in "
               f"[1, n_experts / n_group = {per_group}]")
        _check(self.expert_bias_update_rate >= 0,
               f"model.expert_bias_update_rate ({self.expert_bias_update_rate}) must be >= 0 "
               f"(0 = frozen)")
        _check(0.0 <= self.router_input_jitter < 1.0,
               f"model.router_input_jitter ({self.router_input_jitter}) must be in [0, 1)")
        _check(not self.aux_loss_pool_layers or self.aux_loss_scope == "global_batch",
               f"model.aux_loss_pool_layers needs model.aux_loss_scope=global_batch (got "
               f"{self.aux_loss_scope!r}): every layer's loads are counted before the first "
               f"backward")

    # ----- construction -----
    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> "ModelConfig":
        """Build from a YAML mapping: `preset: NAME` supplies defaults, other keys override them."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a mapping (e.g. {{preset: tiny-moe}}), got {type(d).__name__}")
        d = dict(d)
        preset = d.pop("preset", None)
        base = preset_overrides(preset) if preset is not None else {}
        return dataclass_from_dict(cls, {**base, **d}, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# Fields that change how a model trains, not the function its weights compute: a checkpoint made
# under other values still fits (starting from a checkpoint, ours or HF's, and resuming one:
# train/rundir.py; a change that alters a tensor's shape is still refused by the checkpoint loader).
TRAINING_ONLY = frozenset({
    "dropout", "init_std", "expert_backend", "capacity_factor", "aux_loss_coef", "z_loss_coef",
    "vocab_pad_multiple", "max_seq_len", "aux_loss_scope", "expert_bias_update_rate",
    "router_input_jitter", "forced_routing_imbalance", "aux_loss_pool_layers", "fp32_residual"})
# Fields compared through a value derived from them (a None that stands for a derived default, or
# one of several ways of saying which blocks are MoE).
_DERIVED = {"ffn_dim": "ffn", "n_kv_heads": "kv_heads", "head_dim": "dim_head",
            "qkv_bias": "use_qkv_bias", "norm_topk_prob": "normalizes_topk",
            **dict.fromkeys(("moe_every", "first_k_dense", "dense_layers", "moe_layers"),
                            "moe_layer_ids")}


def first_difference(a: ModelConfig, b: ModelConfig,
                     skip=TRAINING_ONLY) -> tuple[str, Any, Any] | None:
    """(field, a's value, b's value) of the first field, in definition order and outside `skip`, on
    which a and b describe different networks; None when they describe the same one."""
    for f in fields(ModelConfig):
        if f.name in skip:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        derived = _DERIVED.get(f.name)
        if va != vb and (derived is None or getattr(a, derived) != getattr(b, derived)):
            return f.name, va, vb
    return None


# ---------------------------------------------------------------- strict dict -> dataclass
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def dataclass_from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    """Strictly build dataclass `cls` from `d`: unknown keys and wrong types are one-line errors
    naming `where.key`, with a close-match suggestion for misspelt keys. Nested dataclass fields are
    built recursively from nested mappings."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping of fields, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    kwargs = {}
    for key, value in d.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            prefix = f"{where}." if where else ""
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(known)}"
            raise ValueError(f"unknown config key {name}{hint}")
        tp = hints[key]
        if hasattr(tp, "from_dict"):  # e.g. ModelConfig: presets resolved first
            kwargs[key] = tp.from_dict(value or {}, name)
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[key] = dataclass_from_dict(tp, value or {}, name)
            continue
        if isinstance(value, int) and not isinstance(value, bool) and tp is float:
            value = float(value)
        if not _type_ok(value, tp):
            raise ValueError(f"{name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        kwargs[key] = value
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------- presets
# GPT vocabularies (50257 = 29 x 1733, 40478 = 2 x 20239) divide by no useful tp size: pad the
# embedding/head rows to a multiple of 128 as Megatron does (50257 -> 50304), so tp in {2, 4, 8} works.
_GPT = dict(norm="layernorm", positions="learned", mlp="gelu", gelu_approx="tanh", bias=True,
            tie_embeddings=True, norm_eps=1e-5, vocab_pad_multiple=128)
_GPT2 = dict(_GPT, vocab_size=50257, max_seq_len=1024)
_GPT3 = dict(_GPT, vocab_size=50257, max_seq_len=2048, local_window=256, local_layers="odd")
_LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, tie_embeddings=False)
_LLAMA1 = dict(_LLAMA, vocab_size=32000, max_seq_len=2048, norm_eps=1e-6)
_LLAMA2 = dict(_LLAMA, vocab_size=32000, max_seq_len=4096, norm_eps=1e-5)
_LLAMA3 = dict(_LLAMA, vocab_size=128256, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_seq_len=8192,
               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
_GLM = dict(_LLAMA, n_kv_heads=2, rotary_fraction=0.5, rope_interleaved=True, qkv_bias=True, ffn_dim=13696,
            d_model=4096, n_heads=32, norm_eps=1e-5)


def _shape(n_layers: int, d_model: int, n_heads: int, **kw: Any) -> dict[str, Any]:
    return dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, **kw)


# name -> (overrides, published parameter count or None). Counts from the GPT-1/2/3, LLaMA 1/2/3,
# ChatGLM2, GLM-4 and GLM-4.5 papers / model cards; checked (within 2%) by tests/test_presets.py.
PRESET_TABLE: dict[str, tuple[dict[str, Any], float | None]] = {
    "gpt1": (dict(_GPT, norm_position="post", vocab_size=40478, max_seq_len=512, **_shape(12, 768, 12)), 117e6),
    "gpt2-small": (dict(_GPT2, **_shape(12, 768, 12)), 124e6),
    "gpt2-medium": (dict(_GPT2, **_shape(24, 1024, 16)), 355e6),
    "gpt2-large": (dict(_GPT2, **_shape(36, 1280, 20)), 774e6),
    "gpt2-xl": (dict(_GPT2, **_shape(48, 1600, 25)), 1558e6),
    "gpt3-125m": (dict(_GPT3, **_shape(12, 768, 12)), 125e6),
    "gpt3-350m": (dict(_GPT3, **_shape(24, 1024, 16)), 350e6),
    "gpt3-760m": (dict(_GPT3, **_shape(24, 1536, 16)), 760e6),
    # The GPT-3 paper's "24 heads x 128" for 1.3B is inconsistent with d_model 2048 (24*128 = 3072,
    # +17% parameters); 16 heads x 128 = 2048 gives the published 1.3B (as GPT-Neo 1.3B does).
    "gpt3-1.3b": (dict(_GPT3, **_shape(24, 2048, 16)), 1.3e9),
    "gpt3-2.7b": (dict(_GPT3, **_shape(32, 2560, 32)), 2.7e9),
    "gpt3-6.7b": (dict(_GPT3, **_shape(32, 4096, 32)), 6.7e9),
    "gpt3-13b": (dict(_GPT3, **_shape(40, 5140, 40, head_dim=128)), 13.0e9),
    "gpt3-175b": (dict(_GPT3, **_shape(96, 12288, 96)), 175.0e9),
    "llama1-7b": (dict(_LLAMA1, **_shape(32, 4096, 32, ffn_dim=11008)), 6.7e9),
    "llama1-13b": (dict(_LLAMA1, **_shape(40, 5120, 40, ffn_dim=13824)), 13.0e9),
    "llama1-33b": (dict(_LLAMA1, **_shape(60, 6656, 52, ffn_dim=17920)), 32.5e9),
    "llama1-65b": (dict(_LLAMA1, **_shape(80, 8192, 64, ffn_dim=22016)), 65.2e9),
    "llama2-7b": (dict(_LLAMA2, **_shape(32, 4096, 32, ffn_dim=11008)), 6.74e9),
    "llama2-13b": (dict(_LLAMA2, **_shape(40, 5120, 40, ffn_dim=13824)), 13.0e9),
    "llama2-70b": (dict(_LLAMA2, **_shape(80, 8192, 64, n_kv_heads=8, ffn_dim=28672)), 69.0e9),
    "llama3-8b": (dict(_LLAMA3, **_shape(32, 4096, 32, n_kv_heads=8, ffn_dim=14336)), 8.03e9),
    "llama3-70b": (dict(_LLAMA3, **_shape(80, 8192, 64, n_kv_heads=8, ffn_dim=28672)), 70.6e9),
    "chatglm2-6b": (dict(_GLM, n_layers=28, vocab_size=65024, max_seq_len=32768), 6.24e9),
    "chatglm3-6b": (dict(_GLM, n_layers=28, vocab_size=65024, max_seq_len=32768), 6.24e9),
    "glm4-9b": (dict(_GLM, n_layers=40, vocab_size=151552, max_seq_len=131072), 9.40e9),
    # GPT-4-style MoE: shared (dense) attention in every block, 16 SwiGLU experts, top-2, dropless.
    # No published size: ~40.9B total / ~7.0B active parameters, sized for 4 nodes x 8 GPUs.
    "moe16x": (dict(_LLAMA, vocab_size=100277, vocab_pad_multiple=128, max_seq_len=8192, rope_theta=500000.0,
                    n_experts=16, top_k=2, expert_ffn_dim=6144, **_shape(32, 4096, 32, n_kv_heads=8)), None),
    # GLM-4.5-Air (Zhipu AI, 2025): the first block dense (ffn 10944), then 128 routed SwiGLU experts
    # of 1408 (top-8 by sigmoid score, weights normalised, group-limited routing off) plus one shared
    # expert, balanced by the expert bias (rate 1e-3) and a sequence-wise balance loss of 1e-4 (the
    # GLM-4.5 report; no z-loss); GQA 96/8 heads of 128, RoPE on half of each head, q/k/v biases.
    # Published 106B total / 12B active; the released checkpoint's extra multi-token-prediction
    # layer is not part of this preset.
    "glm4.5-air": (dict(_LLAMA, vocab_size=151552, max_seq_len=131072, rope_theta=1e6,
                        rotary_fraction=0.5, qkv_bias=True, ffn_dim=10944, n_experts=128, top_k=8,
                        expert_ffn_dim=1408, shared_expert_ffn_dim=1408, first_k_dense=1,
                        score_function="sigmoid", norm_topk_prob=True, expert_bias=True,
                        expert_bias_update_rate=1e-3, aux_loss_scope="sequence", aux_loss_coef=1e-4,
                        z_loss_coef=0.0, **_shape(46, 4096, 96, n_kv_heads=8, head_dim=128)),
                   106e9),
    # The GPT-4 description in our source material: 120 blocks of shared (dense) MHA attention, 84
    # heads of 128 (~55B over all blocks), 16 SwiGLU experts of width 28672 (~111B each over all
    # blocks), top-2, 8K context, a ~100K vocabulary: ~1.83T total, ~280B active. No published size.
    "gpt4-moe": (dict(_LLAMA, vocab_size=100277, vocab_pad_multiple=128, max_seq_len=8192,
                      rope_theta=500000.0, n_experts=16, top_k=2, expert_ffn_dim=28672,
                      **_shape(120, 10752, 84)), None),
    # CPU-sized defaults for the quick start and tests.
    "tiny": (dict(_LLAMA, vocab_size=257, vocab_pad_multiple=64, max_seq_len=256, **_shape(4, 128, 4, n_kv_heads=2, ffn_dim=344)), None),
    "tiny-moe": (dict(_LLAMA, vocab_size=257, vocab_pad_multiple=64, max_seq_len=256, n_experts=8, top_k=2, expert_ffn_dim=128,
                      **_shape(4, 128, 4, n_kv_heads=2, ffn_dim=344)), None),
}


def tiny_variant(overrides: dict[str, Any]) -> dict[str, Any]:
    """Shrink a preset's shape while keeping its structure: norm type and placement, positions and
    RoPE scaling, MHA/GQA/MQA ratio, rotary fraction, local-attention layout and MoE layout."""
    heads = 8
    full = ModelConfig(**overrides)
    kv = max(1, heads * full.kv_heads // full.n_heads)
    tiny = dict(overrides, n_layers=4, d_model=64, n_heads=heads, n_kv_heads=kv, head_dim=None, ffn_dim=128,
                vocab_size=min(full.vocab_size, 512), vocab_pad_multiple=min(full.vocab_pad_multiple, 64),
                max_seq_len=128, rope_original_max_seq_len=32)
    if full.local_window is not None:
        tiny["local_window"] = 8
    if full.n_experts:  # at least twice top_k experts, so top-8 routing still chooses
        tiny.update(n_experts=min(full.n_experts, max(8, 2 * full.top_k)), expert_ffn_dim=64)
        if full.shared_expert_ffn_dim:
            tiny["shared_expert_ffn_dim"] = 64
    return tiny


PRESETS: dict[str, dict[str, Any]] = {}
for _name, (_over, _count) in PRESET_TABLE.items():
    PRESETS[_name] = _over
    if not _name.startswith("tiny"):
        PRESETS[f"{_name}-tiny"] = tiny_variant(_over)


def preset_overrides(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        raise ValueError(f"unknown model preset {name!r}; did you mean one of {close or sorted(PRESETS)}?")
    return dict(PRESETS[name])


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset as a validated ModelConfig, with optional field overrides."""
    return ModelConfig.from_dict({"preset": name, **overrides})


def published_params(name: str) -> float | None:
    return PRESET_TABLE[name][1] if name in PRESET_TABLE else None


__all__ = ["ModelConfig", "PRESETS", "PRESET_TABLE", "get_preset", "published_params", "tiny_variant",
           "dataclass_from_dict", "first_difference", "TRAINING_ONLY", "replace", "field"]
