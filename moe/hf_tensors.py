"""HF tensor names and layouts <-> ours: one Rule per group of tensors, in both directions.

Why a table of rules rather than string rewriting: every one of our tensors is made from named HF
tensors by one rule (`Rule.load`) and written back by its inverse (`Rule.save`); moe/hf.py checks
that every tensor on each side is used exactly once, so a missing expert, a stray key or a wrong
shape is a one-line error naming the key, never a silent drop.

Layouts (HF Linear weights are [out, in] like ours; the GPTs' Conv1D weights are [in, out]):
  RoPE families  q/k/v/o_proj -> attn.wq/wk/wv/wo;  q_norm/k_norm -> attn.q_norm/k_norm
                 input_layernorm -> attn_norm;  post_attention_layernorm (pre-MLP) -> mlp_norm
                 dense mlp gate/up/down_proj -> mlp.w1/w3/w2 (GLM-4: gate_up_proj [2F, D] = w1 | w3)
  GLM-4          post_self_attn_layernorm / post_mlp_layernorm -> attn_out_norm / mlp_out_norm
  MoE            gate.weight -> mlp.router.weight
                 gate.e_score_correction_bias -> mlp.router.expert_bias
                 experts.{e}.gate/up/down_proj (Mixtral: w1/w3/w2; what save_pretrained writes)
                 or fused experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F] (transformers 5's
                 in-memory layout) -> experts.w_in [E, D, 2F] = cat(gate^T, up^T, -1),
                 experts.w_out [E, F, D] = down^T
                 shared_expert(s).* -> mlp.shared.w1/w3/w2;  shared_expert_gate -> mlp.shared_gate
  GPT-2, GPT-1   c_attn [D, 3D] -> (wq | wk | wv)^T;  c_proj, c_fc, mlp.c_proj transposed;
                 ln_1, ln_2 -> attn_norm, mlp_norm (GPT-1 is post-norm: they normalise the sums)
Padded vocabulary rows (ours: padded_vocab_size >= vocab_size) are zeros on load and cut on save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import ModelConfig

Convert = Callable[[list[torch.Tensor]], list[torch.Tensor]]
GPT_LIKE = ("gpt2", "openai-gpt")


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


def _split_rows(ours: tuple[str, ...], hf: str) -> Rule:
    """One HF tensor whose rows (dim 0) are ours stacked: [sum of n_i, ..] <-> n_i-row pieces."""
    def load(ts):
        return list(ts[0].chunk(len(ours)))

    return Rule(ours, (hf,), load, lambda ts: [torch.cat(ts)])


def _qkv_rule(ours: str, hf: str, d: int, kind: str) -> Rule:
    """GPT c_attn: one Conv1D [D, 3D] (bias [3D]) whose output columns are q | k | v."""
    names = tuple(f"{ours}.{w}.{kind}" for w in ("wq", "wk", "wv"))
    if kind == "weight":
        return Rule(names, (f"{hf}.weight",), lambda ts: [c.t() for c in ts[0].split(d, dim=1)],
                    lambda ts: [torch.cat([t.t() for t in ts], dim=1)])
    return Rule(names, (f"{hf}.bias",), lambda ts: list(ts[0].split(d)), lambda ts: [torch.cat(ts)])


def _expert_rules(ours: str, hf: str, n_experts: int, fused: bool, names: tuple[str, str, str],
                  ) -> list[Rule]:
    """Routed experts, per expert (`names` = gate, up, down: [F, D], [F, D], [D, F]) or fused
    gate_up_proj [E, 2F, D] / down_proj [E, D, F]  ->  w_in [E, D, 2F], w_out [E, F, D]."""
    if fused:
        swap = _swap_last_two  # [E, 2F, D] <-> [E, D, 2F] and [E, D, F] <-> [E, F, D]
        return [Rule((f"{ours}.w_in",), (f"{hf}.gate_up_proj",), swap, swap),
                Rule((f"{ours}.w_out",), (f"{hf}.down_proj",), swap, swap)]
    gate, up, down = names
    gate_up = tuple(f"{hf}.{e}.{w}.weight" for e in range(n_experts) for w in (gate, up))
    downs = tuple(f"{hf}.{e}.{down}.weight" for e in range(n_experts))

    def load_in(ts):  # [gate_0, up_0, gate_1, ...] -> [E, D, 2F]
        pairs = zip(ts[0::2], ts[1::2])
        return [torch.stack([torch.cat((gate.t(), up.t()), dim=1) for gate, up in pairs])]

    def save_in(ts):
        f = ts[0].shape[-1] // 2
        return [half.t() for w in ts[0] for half in (w[:, :f], w[:, f:])]

    return [Rule((f"{ours}.w_in",), gate_up, load_in, save_in),
            Rule((f"{ours}.w_out",), downs, lambda ts: [torch.stack([t.t() for t in ts])],
                 lambda ts: [t.t() for t in ts[0].unbind(0)])]


def _swiglu_rules(ours: str, hf: str, names=("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """A dense SwiGLU MLP (or shared expert): gate, up, down -> w1, w3, w2 (with biases if any)."""
    pairs = zip(("w1", "w3", "w2"), names)
    return [rule for w, h in pairs for rule in _linear(f"{ours}.{w}", f"{hf}.{h}")]


def _moe_rules(cfg: ModelConfig, arch: str, o: str, h: str, fused: bool) -> list[Rule]:
    """Router (+ expert bias), routed experts and the shared expert (+ gate) of one MoE block."""
    mixtral_unfused = arch == "mixtral" and not fused
    moe = f"{h}.block_sparse_moe" if mixtral_unfused else f"{h}.mlp"
    names = ("w1", "w3", "w2") if mixtral_unfused else ("gate_proj", "up_proj", "down_proj")
    rules = [_plain(f"{o}.mlp.router.weight", f"{moe}.gate.weight"),
             _plain(f"{o}.mlp.router.expert_bias", f"{moe}.gate.e_score_correction_bias"),
             *_expert_rules(f"{o}.mlp.experts", f"{moe}.experts", cfg.n_experts, fused, names)]
    shared = {"qwen2_moe": "shared_expert", "glm4_moe": "shared_experts"}.get(arch)
    if shared:
        rules += _swiglu_rules(f"{o}.mlp.shared", f"{moe}.{shared}")
        rules.append(_plain(f"{o}.mlp.shared_gate.weight", f"{moe}.shared_expert_gate.weight"))
    return rules


def _gpt_layer_rules(cfg: ModelConfig, i: int) -> list[Rule]:
    o, h = f"layers.{i}", f"transformer.h.{i}"
    return [*_linear(f"{o}.attn_norm", f"{h}.ln_1"), *_linear(f"{o}.mlp_norm", f"{h}.ln_2"),
            _qkv_rule(f"{o}.attn", f"{h}.attn.c_attn", cfg.d_model, "weight"),
            _qkv_rule(f"{o}.attn", f"{h}.attn.c_attn", cfg.d_model, "bias"),
            *_linear(f"{o}.attn.wo", f"{h}.attn.c_proj", conv1d=True),
            *_linear(f"{o}.mlp.w1", f"{h}.mlp.c_fc", conv1d=True),
            *_linear(f"{o}.mlp.w2", f"{h}.mlp.c_proj", conv1d=True)]


def _attention_rules(o: str, h: str) -> list[Rule]:
    """Pre-norms, q/k/v/o projections (+ biases) and q/k norms of a RoPE family's block."""
    rules = [_plain(f"{o}.attn_norm.weight", f"{h}.input_layernorm.weight"),
             _plain(f"{o}.mlp_norm.weight", f"{h}.post_attention_layernorm.weight"),
             _plain(f"{o}.attn.q_norm.weight", f"{h}.self_attn.q_norm.weight"),
             _plain(f"{o}.attn.k_norm.weight", f"{h}.self_attn.k_norm.weight"),
             _plain(f"{o}.attn_out_norm.weight", f"{h}.post_self_attn_layernorm.weight"),
             _plain(f"{o}.mlp_out_norm.weight", f"{h}.post_mlp_layernorm.weight")]
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        rules += _linear(f"{o}.attn.{ours}", f"{h}.self_attn.{theirs}")
    return rules


def _layer_rules(cfg: ModelConfig, arch: str, i: int, fused: bool) -> list[Rule]:
    if arch in GPT_LIKE:
        return _gpt_layer_rules(cfg, i)
    o, h = f"layers.{i}", f"model.layers.{i}"
    rules = _attention_rules(o, h)
    if cfg.is_moe_layer(i):
        return rules + _moe_rules(cfg, arch, o, h, fused)
    if arch == "glm4":
        gate_up = _split_rows((f"{o}.mlp.w1.weight", f"{o}.mlp.w3.weight"),
                              f"{h}.mlp.gate_up_proj.weight")
        return rules + [gate_up, *_linear(f"{o}.mlp.w2", f"{h}.mlp.down_proj")]
    return rules + _swiglu_rules(f"{o}.mlp", f"{h}.mlp")


def _top_rules(cfg: ModelConfig, arch: str) -> list[Rule]:
    """Embeddings, final norm and head. GPT-1 has no final norm; the GPTs learn positions."""
    rules = [_vocab("tok_emb.weight", embedding_key(arch), cfg),
             _vocab("head.weight", "lm_head.weight", cfg)]
    if arch == "gpt2":
        return rules + [*_linear("norm", "transformer.ln_f"),
                        _plain("pos_emb.weight", "transformer.wpe.weight")]
    if arch == "openai-gpt":
        return rules + [_plain("pos_emb.weight", "transformer.positions_embed.weight")]
    return rules + _linear("norm", "model.norm")


def embedding_key(arch: str) -> str:
    """The HF name of the input embedding (which a tied lm_head mirrors)."""
    emb = {"gpt2": "transformer.wte.weight", "openai-gpt": "transformer.tokens_embed.weight"}
    return emb.get(arch, "model.embed_tokens.weight")


def hf_rules(cfg: ModelConfig, arch: str, our_names: set[str], fused_experts: bool = False,
             ) -> list[Rule]:
    """Every rule for `arch` whose tensors our model has (bias, q/k-norm and expert-bias rules
    vanish for models without them)."""
    rules = _top_rules(cfg, arch)
    for i in range(cfg.n_layers):
        rules += _layer_rules(cfg, arch, i, fused_experts)
    return [r for r in rules if all(name in our_names for name in r.ours)]
