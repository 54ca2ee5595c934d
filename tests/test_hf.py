"""Spec for moe/hf.py: HF transformers interop, checked against transformers' own models.

Checkpoints are written by transformers itself (`save_pretrained`, safetensors) and the oracle is the
HF model's logits on the same tokens. Every parameter (norm gains and biases included) is re-drawn
at random before comparing, so a swapped, untransposed or dropped tensor changes the logits by far
more than the 1e-4 tolerance. MoE tests also assert that every expert received tokens, so every
expert tensor is exercised.
"""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MixtralConfig, MixtralForCausalLM)

from moe.config import ModelConfig  # noqa: E402
from moe.hf import config_from_hf, config_to_hf, load_hf, save_hf  # noqa: E402
from moe.model import Decoder, build_model  # noqa: E402

TOL = 1e-4
V = 128
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: matrices and biases N(0, 0.15^2), 1-D weights (norm gains) 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if p.ndim == 1 and name.endswith("weight") else 0.15 * noise)
    return model.eval()


def tokens(seed: int = 1, vocab: int = V, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def hf_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    attn = dict(attn_implementation="sdpa")
    if kind == "llama_gqa":
        return LlamaForCausalLM(LlamaConfig(**SMALL, **attn))
    if kind == "llama3_rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8, "rope_theta": 10000.0}
        return LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=rope, **attn))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=32,
                                          bos_token_id=0, eos_token_id=0, **attn))
    moe = dict(num_local_experts=4, num_experts_per_tok=2, **attn)
    if kind == "mixtral_window":
        return MixtralForCausalLM(MixtralConfig(**SMALL, sliding_window=5, **moe))
    return MixtralForCausalLM(MixtralConfig(**SMALL, **moe))


# ---------------------------------------------------------------- HF checkpoint -> load_hf
CASES = {  # name -> (HF model kind, save_pretrained kwargs, load_hf overrides)
    "llama_gqa": ("llama_gqa", {}, {}),
    "llama3_rope": ("llama3_rope", {}, {}),
    "gpt2": ("gpt2", {}, {}),
    "mixtral_grouped_mm": ("mixtral", {}, dict(expert_backend="grouped_mm")),
    "mixtral_loop": ("mixtral", {}, dict(expert_backend="loop")),
    "mixtral_window": ("mixtral_window", {}, dict(expert_backend="loop")),
    "mixtral_fused_sharded": ("mixtral", dict(save_original_format=False, max_shard_size="100KB"), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_hf_matches_hf_logits(case, tmp_path):
    kind, save_kw, overrides = CASES[case]
    hf = randomize(hf_model(kind), seed=2)
    hf.save_pretrained(tmp_path, safe_serialization=True, **save_kw)
    if "sharded" in case:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = load_hf(str(tmp_path), **overrides)
    assert not ours.training
    x = tokens()
    with torch.no_grad():
        want, out = hf(x).logits, ours(x)
    assert want.abs().max() > 1.0  # logits large enough that a mapping error cannot hide under TOL
    assert max_diff(out.logits, want) < TOL
    for layer, stats in out.moe.items():
        assert (stats.tokens_per_expert > 0).all(), f"layer {layer}: an expert got no tokens"
    if kind.startswith("mixtral"):
        assert len(out.moe) == 2


@pytest.mark.parametrize("kind,off", [("llama3_rope", dict(rope_scaling=None)),
                                      ("mixtral_window", dict(local_window=None, local_layers="none"))])
def test_feature_under_test_changes_logits(kind, off, tmp_path):
    """The llama3-scaling and sliding-window cases above are only meaningful if switching the
    feature off moves the logits far beyond the tolerance."""
    hf = randomize(hf_model(kind), seed=2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        diff = max_diff(load_hf(str(tmp_path), **off)(tokens()).logits, hf(tokens()).logits)
    assert diff > 100 * TOL


def test_config_from_hf_legacy_keys():
    """transformers 4.x writes rope_theta + rope_scaling {"type": ...} instead of rope_parameters."""
    hf = dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=4, head_dim=48, max_position_embeddings=512,
              rms_norm_eps=1e-6, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0},
              tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    cfg = config_from_hf(hf)
    assert (cfg.vocab_size, cfg.d_model, cfg.ffn, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.dim_head) == \
        (1000, 256, 512, 3, 8, 4, 48)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (5e5, "linear", 4.0)
    assert cfg.norm_eps == 1e-6 and cfg.tie_embeddings and cfg.bias and cfg.max_seq_len == 512
    mix = config_from_hf(dict(hf, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2,
                              router_aux_loss_coef=0.02, rope_scaling=None))
    assert (mix.n_experts, mix.top_k, mix.expert_ffn, mix.ffn, mix.moe_every) == (8, 2, 512, 512, 1)
    # transformers' pooled loss: 0.02 * top_k / MoE layers per layer, f pooled (test_hf_families.py)
    want = (0.02 * 2 / 3, 0.0, False, None)
    assert (mix.aux_loss_coef, mix.z_loss_coef, mix.bias, mix.rope_scaling) == want
    assert (mix.aux_loss_scope, mix.aux_loss_pool_layers) == ("global_batch", True)
    gpt = config_from_hf(dict(model_type="gpt2", vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                              activation_function="gelu", layer_norm_epsilon=1e-3))
    assert (gpt.gelu_approx, gpt.ffn, gpt.positions, gpt.norm, gpt.tie_embeddings) == ("none", 128, "learned",
                                                                                        "layernorm", True)


# ---------------------------------------------------------------- ours -> save_hf -> HF and back
OURS = {
    # padded vocab, tied head, biases, static NTK (exported as a larger rope_theta), GQA
    "llama": dict(vocab_size=100, vocab_pad_multiple=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  ffn_dim=96, tie_embeddings=True, bias=True, rope_scaling="ntk", rope_scaling_factor=2.0,
                  max_seq_len=64),
    # untied head, exact-erf GELU
    "gpt2": dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, norm="layernorm", positions="learned",
                 mlp="gelu", gelu_approx="none", bias=True, ffn_dim=128, max_seq_len=32),
    "mixtral": dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, n_experts=4,
                    top_k=2, expert_ffn_dim=32, rope_scaling="linear", rope_scaling_factor=2.0, max_seq_len=64,
                    expert_backend="loop"),
}
HF_CLASSES = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "mixtral": MixtralForCausalLM}


@pytest.mark.parametrize("arch", list(OURS))
def test_save_hf_round_trip(arch, tmp_path):
    cfg = ModelConfig(**OURS[arch])
    ours = randomize(build_model(cfg, seed=0), seed=3)
    save_hf(ours, str(tmp_path))  # arch inferred
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="sdpa")
    assert type(hf) is HF_CLASSES[arch]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    x = tokens(seed=4, vocab=cfg.vocab_size)
    with torch.no_grad():
        want, out = hf.eval()(x).logits, ours(x)
    assert max_diff(out.logits, want) < TOL
    for stats in out.moe.values():
        assert (stats.tokens_per_expert > 0).all()
    back = load_hf(str(tmp_path), vocab_pad_multiple=cfg.vocab_pad_multiple, expert_backend=cfg.expert_backend)
    assert_same_weights(ours, back, cfg)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, cfg: ModelConfig) -> None:
    """Identical state dicts (every expert tensor), except padded vocab rows, which come back as zeros."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        if name in ("tok_emb.weight", "head.weight"):
            assert torch.equal(sa[name][: cfg.vocab_size], sb[name][: cfg.vocab_size]), name
            assert not sb[name][cfg.vocab_size:].any(), name
        else:
            assert torch.equal(sa[name], sb[name]), name


def test_save_hf_writes_tied_weights_once_and_experts_per_expert(tmp_path):
    ours = build_model(ModelConfig(**OURS["mixtral"], tie_embeddings=True), seed=0)
    save_hf(ours, str(tmp_path))
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    experts = {k for k in keys if ".experts." in k}
    assert len(experts) == 2 * 4 * 3  # layers x experts x (w1, w2, w3)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"


# ---------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    hf_model("mixtral").save_pretrained(path, safe_serialization=True)
    return path


def rewrite(src, dst, edit) -> str:
    """Copy checkpoint `src` to `dst` with edit(tensors) applied to its tensors."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return str(dst)


def test_loaded_parameters_keep_their_layout(mixtral_dir):
    """The layout records (tp dim, ep dim, tied partner) drive sharding and gradient reduction: a
    loaded model's must equal a freshly built one's."""
    loaded = load_hf(str(mixtral_dir))
    assert loaded.layouts() == Decoder(loaded.cfg).layouts()
    assert loaded.layouts()["layers.0.mlp.experts.w_in"].ep_dim == 0


def test_missing_expert_tensor_is_named(mixtral_dir, tmp_path):
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    path = rewrite(mixtral_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"missing {key.replace('.', '[.]')} .*layers\.1\.mlp\.experts\.w_out"):
        load_hf(path)


def test_unexpected_and_misshapen_tensors_are_named(mixtral_dir, tmp_path):
    extra = rewrite(mixtral_dir, tmp_path / "a", lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected key model\.layers\.0\.extra\.weight"):
        load_hf(extra)
    key = "model.layers.0.self_attn.q_proj.weight"
    bad = rewrite(mixtral_dir, tmp_path / "b", lambda t: t.update({key: t[key][:32]}))
    with pytest.raises(ValueError, match=r"shape mismatch .*layers\.0\.attn\.wq\.weight.*\(32, 64\).*\(64, 64\)"):
        load_hf(bad)


def test_original_gpt2_hub_layout(tmp_path):
    """The original GPT-2 checkpoints lack the 'transformer.' prefix, carry the causal-mask buffers
    h.{i}.attn.bias, and store the tied lm_head too: all accepted; a differing tied head is refused."""
    hf = randomize(hf_model("gpt2"), seed=5)
    hf.save_pretrained(tmp_path / "new", safe_serialization=True)

    def to_hub(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        t.update({f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32) for i in range(2)})
        t["lm_head.weight"] = t["wte.weight"].clone()

    path = rewrite(tmp_path / "new", tmp_path / "hub", to_hub)
    with torch.no_grad():
        assert max_diff(load_hf(path)(tokens()).logits, hf(tokens()).logits) < TOL
    untied = rewrite(path, tmp_path / "bad", lambda t: t["lm_head.weight"].add_(1.0))
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        load_hf(untied)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="llama", **SMALL)))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(str(tmp_path))


def test_unsupported_configs():
    supported = (r"use one of \['llama', 'gpt2', 'openai-gpt', 'glm4', 'mixtral', 'qwen2_moe', "
                 r"'qwen3_moe', 'olmoe', 'glm4_moe'\]")
    with pytest.raises(ValueError, match=rf"model_type 'bert' is not supported: {supported}"):
        config_from_hf({"model_type": "bert"})
    dynamic = dict(model_type="llama", rope_scaling={"type": "dynamic", "factor": 2.0}, **SMALL)
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        config_from_hf(dynamic)
    with pytest.raises(ValueError, match="HF gpt2 config lacks 'n_embd'"):
        config_from_hf({"model_type": "gpt2", "vocab_size": 10})
    with pytest.raises(ValueError, match="llama: model.rotary_fraction"):
        config_to_hf(ModelConfig(rotary_fraction=0.5), "llama")
    post = ModelConfig(norm="layernorm", positions="learned", mlp="gelu", bias=True, norm_position="post")
    with pytest.raises(ValueError, match="gpt2: model.norm_position"):
        config_to_hf(post, "gpt2")
    assert config_to_hf(post)["model_type"] == "openai-gpt"  # inferred: the family expressing it
    with pytest.raises(ValueError, match="mixtral: model.capacity_factor"):
        config_to_hf(ModelConfig(n_experts=4, capacity_factor=1.25))
