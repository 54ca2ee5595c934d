"""HF interop for Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5 (glm4_moe), GLM-4 (glm4) and GPT-1
(openai-gpt), checked against transformers' own models.

Checkpoints are written by transformers itself (`save_pretrained` of a tiny randomly initialised
model) and the oracle is the HF model: its logits on the same tokens (within 1e-4 in float32), the
exact bytes of its checkpoint after HF -> ours -> HF, its balance loss and the gradients it gives
every parameter. Every parameter and GLM-4.5's expert-bias buffer is re-drawn at random first, so a
swapped, untransposed, dropped or zeroed tensor moves the logits far beyond the tolerance.
"""

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from moe.config import ModelConfig, first_difference  # noqa: E402
from moe.hf import check_matches_hf, config_from_hf, config_to_hf, convert_to_hf, hf_rules, \
    infer_arch, load_hf, read_hf_config, save_hf  # noqa: E402
from moe.model import build_model  # noqa: E402
from moe.stages import pool_loads_over_layers  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402
from tests.test_hf import TOL, V, max_diff, randomize, tokens  # noqa: E402

ATTN = dict(attn_implementation="sdpa")
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, pad_token_id=None,
             bos_token_id=0, eos_token_id=0)
# family -> (config class, model class, config kwargs): each exercises what makes the family itself
HF = {
    # gated shared expert, un-normalised top-k, block 1 dense (mlp_only_layers), q/k/v biases
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, mlp_only_layers=[1],
                       norm_topk_prob=False)),
    # 128 experts, top-8, normalised, per-head q/k norms
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=16,
                       norm_topk_prob=True)),
    # q/k norms over the whole projection, clip_qkv that bites after them
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.8)),
    # sigmoid scores + expert bias, 2 groups (1 per token), scaled weights, a shared expert, block 0
    # dense, per-head q/k norms, half of each head rotating
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                      use_qk_norm=True, n_shared_experts=1, attention_bias=True)),
    # sandwich norms, interleaved partial RoPE, fused gate_up_proj, head_dim != hidden / heads
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=24)),
    # post-norm, no final norm, learned positions, Conv1D weights, tied head
    "openai-gpt": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel",
                   dict(n_embd=64, n_layer=3, n_head=4, vocab_size=V, n_positions=64)),
}
MOE = ("qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe")


def hf_model(family: str, **extra) -> torch.nn.Module:
    cfg_cls, model_cls, kw = HF[family]
    base = {} if family == "openai-gpt" else SMALL
    gpt1 = family == "openai-gpt"
    attn = dict(attn_implementation="eager") if gpt1 else ATTN  # GPT-1 has no sdpa path
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**{**base, **kw, **extra}, **attn)
    return getattr(transformers, model_cls)(config)


@torch.no_grad()
def randomize_all(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """randomize() plus the expert-bias buffers (HF e_score_correction_bias, our expert_bias)."""
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for name, b in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "expert_bias")):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model


@torch.no_grad()
def spread_routing(model: torch.nn.Module, x: torch.Tensor) -> None:
    """With random weights a deep layer's router inputs share a few dominant directions, so a few
    of 128 experts take most tokens and some take none. Remove those directions (the top 4 singular
    vectors of each router's inputs on x) from the router weights, layer by layer, so that every
    expert of every layer gets tokens and the logits comparison exercises all of them."""
    for layer in model.model.layers:
        seen = []
        gate = layer.mlp.gate
        hook = gate.register_forward_hook(lambda m, inp, out: seen.append(inp[0].flatten(0, -2)))
        model(x)
        hook.remove()
        top = torch.linalg.svd(seen[0], full_matrices=False).Vh[:4]  # [4, D]
        gate.weight.sub_((gate.weight @ top.T) @ top)


def batch(family: str) -> torch.Tensor:
    """Enough tokens that each of Qwen3-MoE's 128 experts (top-8) gets some."""
    return tokens(batch=8, seq=64) if family == "qwen3_moe" else tokens()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (randomised HF model, its save_pretrained directory)."""
    out = {}
    for family in HF:
        model = randomize_all(hf_model(family), seed=2)
        if family == "qwen3_moe":
            spread_routing(model, batch(family))
        path = tmp_path_factory.mktemp(family.replace("-", "_"))
        model.save_pretrained(path, safe_serialization=True)
        out[family] = (model, str(path))
    return out


# ---------------------------------------------------------------- HF checkpoint -> load_hf
@pytest.mark.parametrize("family", list(HF))
def test_load_hf_matches_hf_logits(family, saved):
    hf, path = saved[family]
    ours = load_hf(path)
    x = batch(family)
    with torch.no_grad():
        want, out = hf.eval()(x).logits, ours(x)
    assert want.abs().max() > 1.0
    assert max_diff(out.logits, want) < TOL
    n_moe = sum(ours.cfg.is_moe_layer(i) for i in range(ours.cfg.n_layers))
    assert len(out.moe) == n_moe and (n_moe > 0) == (family in MOE)
    for layer, stats in out.moe.items():
        assert (stats.tokens_per_expert > 0).all(), f"layer {layer}: an expert got no tokens"


EXPECTED = {  # the fields each family's import must set
    "qwen2_moe": dict(shared_expert_ffn_dim=48, shared_expert_gate=True, dense_layers=[1],
                      normalizes_topk=False, use_qkv_bias=True, expert_ffn=32, ffn=96),
    "qwen3_moe": dict(n_experts=128, top_k=8, qk_norm="head", normalizes_topk=True,
                      use_qkv_bias=False),
    "olmoe": dict(qk_norm="full", qkv_clip=0.8, n_experts=4, shared_expert_ffn_dim=0),
    "glm4_moe": dict(score_function="sigmoid", expert_bias=True, n_group=2, topk_group=1,
                     group_score_topk=2, routed_scaling_factor=2.5, first_k_dense=1,
                     shared_expert_ffn_dim=32, qk_norm="head", rotary_fraction=0.5,
                     rope_interleaved=False, use_qkv_bias=True, aux_loss_coef=0.0),
    "glm4": dict(sandwich_norm=True, rope_interleaved=True, rotary_fraction=0.5, dim_head=24,
                 use_qkv_bias=True, bias=False),
    "openai-gpt": dict(norm_position="post", norm="layernorm", positions="learned",
                       gelu_approx="tanh", tie_embeddings=True, ffn=256),
}


@pytest.mark.parametrize("family", list(HF))
def test_config_from_hf_sets_the_family_features(family, saved):
    cfg = config_from_hf(read_hf_config(saved[family][1]))
    assert {k: getattr(cfg, k) for k in EXPECTED[family]} == EXPECTED[family]
    assert infer_arch(cfg) == family


# features without a tensor of their own: switching each off must move the logits far beyond TOL
# (so the parity above really tests them)
CONFIG_ONLY = [("olmoe", dict(qkv_clip=None)), ("glm4", dict(rope_interleaved=False)),
               ("glm4", dict(rotary_fraction=1.0)), ("glm4_moe", dict(routed_scaling_factor=1.0)),
               ("glm4_moe", dict(n_group=1, topk_group=1)),
               ("glm4_moe", dict(norm_topk_prob=False)), ("qwen2_moe", dict(norm_topk_prob=True)),
               ("qwen3_moe", dict(norm_topk_prob=False))]


@pytest.mark.parametrize("family,off", CONFIG_ONLY,
                         ids=[f"{f}-{next(iter(o))}" for f, o in CONFIG_ONLY])
def test_feature_under_test_changes_logits(family, off, saved):
    hf, path = saved[family]
    x = batch(family)
    with torch.no_grad():
        assert max_diff(load_hf(path, **off)(x).logits, hf(x).logits) > 100 * TOL


def test_expert_bias_changes_the_choice_not_the_weights(saved):
    """GLM-4.5's e_score_correction_bias arrives: zeroing it changes which experts are chosen."""
    hf, path = saved["glm4_moe"]
    ours = load_hf(path)
    want = {i: hf.model.layers[i].mlp.gate.e_score_correction_bias for i in (1, 2)}
    for i, b in want.items():
        assert torch.equal(ours.layers[str(i)].mlp.router.expert_bias, b) and b.abs().min() > 0
    x = batch("glm4_moe")
    with torch.no_grad():
        before = ours(x).moe[1].tokens_per_expert
        for i in want:
            ours.layers[str(i)].mlp.router.expert_bias.zero_()
        assert not torch.equal(ours(x).moe[1].tokens_per_expert, before)


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_fused_sharded_expert_checkpoints_load(family, saved, tmp_path):
    """transformers 5's in-memory layout (fused gate_up_proj / down_proj), sharded over files."""
    hf = saved[family][0]
    hf.save_pretrained(tmp_path, safe_serialization=True, save_original_format=False,
                       max_shard_size="200KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    x = batch(family)
    with torch.no_grad():
        assert max_diff(load_hf(str(tmp_path))(x).logits, hf(x).logits) < TOL


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", list(HF))
def test_hf_ours_hf_writes_the_same_tensors(family, saved, tmp_path):
    """HF -> ours -> HF: the same keys with bit-identical tensors (every expert, router, expert
    bias, q/k norm, sandwich norm), and a config.json that imports to the same model and
    coefficient."""
    path = saved[family][1]
    save_hf(load_hf(path), str(tmp_path))
    src = load_file(os.path.join(path, "model.safetensors"))
    back = load_file(tmp_path / "model.safetensors")
    assert sorted(back) == sorted(src)
    for name, t in src.items():
        assert torch.equal(back[name], t), name
    a, b = config_from_hf(read_hf_config(path)), config_from_hf(read_hf_config(str(tmp_path)))
    coef = ("aux_loss_coef", a.aux_loss_coef, b.aux_loss_coef)  # equal up to rounding
    assert first_difference(a, b, skip=frozenset()) in (None, coef)
    assert math.isclose(a.aux_loss_coef, b.aux_loss_coef, rel_tol=1e-12)


OURS = {  # our side of ours -> HF -> ours: each family's features, shapes HF does not default to
    "qwen2_moe": dict(n_layers=4, moe_every=2, n_experts=4, top_k=2, expert_ffn_dim=32,
                      shared_expert_ffn_dim=48, shared_expert_gate=True, qkv_bias=True,
                      norm_topk_prob=False, local_window=5, local_layers="even"),
    "qwen3_moe": dict(n_layers=3, dense_layers=[0], n_experts=8, top_k=2, expert_ffn_dim=32,
                      qk_norm="head", norm_topk_prob=True, local_window=6, local_layers="all"),
    "olmoe": dict(n_experts=4, top_k=2, expert_ffn_dim=96, qk_norm="full", qkv_clip=1.0,
                  norm_topk_prob=True),
    "glm4_moe": dict(n_layers=3, first_k_dense=1, n_experts=8, top_k=2, expert_ffn_dim=16,
                     shared_expert_ffn_dim=32, score_function="sigmoid", expert_bias=True,
                     n_group=4, topk_group=2, routed_scaling_factor=2.5, qk_norm="head",
                     qkv_bias=True, rotary_fraction=0.5, tie_embeddings=True),
    "glm4": dict(sandwich_norm=True, rope_interleaved=True, rotary_fraction=0.5, qkv_bias=True,
                 head_dim=24),
    "openai-gpt": dict(norm="layernorm", norm_position="post", positions="learned", mlp="gelu",
                       bias=True, tie_embeddings=True, ffn_dim=256),
}


def our_model(family: str) -> torch.nn.Module:
    base = dict(vocab_size=100, vocab_pad_multiple=64, d_model=64, n_layers=2, n_heads=4,
                n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    if family == "openai-gpt":
        base.pop("n_kv_heads")
    return randomize_all(build_model(ModelConfig(**{**base, **OURS[family]}), seed=0), seed=3)


@pytest.mark.parametrize("family", list(HF))
def test_ours_hf_ours_round_trip(family, tmp_path):
    ours = our_model(family)
    cfg = ours.cfg
    save_hf(ours, str(tmp_path))  # family inferred from the features
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    attn = "eager" if family == "openai-gpt" else "sdpa"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                 attn_implementation=attn)
    assert type(hf).__name__ == HF[family][1]
    problems = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    assert not any(info[k] for k in problems), info
    x = tokens(seed=4, vocab=cfg.vocab_size)
    with torch.no_grad():
        want, out = hf.eval()(x).logits, ours(x)
    assert max_diff(out.logits, want) < TOL
    back = load_hf(str(tmp_path), vocab_pad_multiple=cfg.vocab_pad_multiple)
    assert first_difference(cfg, back.cfg) is None
    sa, sb = ours.state_dict(), back.state_dict()  # parameters and expert biases
    assert sa.keys() == sb.keys()
    for name in sa:
        rows = cfg.vocab_size if name in ("tok_emb.weight", "head.weight") else None
        assert torch.equal(sa[name][:rows], sb[name][:rows]), name


# ---------------------------------------------------------------- the balance loss, exactly
AUX = {"mixtral": ("MixtralConfig", "MixtralForCausalLM",
                   dict(num_local_experts=4, num_experts_per_tok=2))}


def aux_hf_model(family: str) -> torch.nn.Module:
    if family not in AUX:
        return hf_model(family, router_aux_loss_coef=0.02)
    cfg_cls, model_cls, kw = AUX[family]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**SMALL, **kw, router_aux_loss_coef=0.02, **ATTN)
    return getattr(transformers, model_cls)(config)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_aux_loss_and_its_gradients_equal_transformers(family, tmp_path):
    """transformers' router_aux_loss_coef * aux_loss (output_router_logits=True) is our summed
    per-layer balance loss, with f pooled over the layers: the same value and the same gradient
    on every parameter (through the routers and, via later routers' inputs, everything before)."""
    hf = randomize_all(aux_hf_model(family), seed=2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf(str(tmp_path))
    cfg = ours.cfg
    assert cfg.aux_loss_pool_layers and cfg.aux_loss_scope == "global_batch"
    assert cfg.z_loss_coef == 0.0
    x = batch(family)
    want = hf.config.router_aux_loss_coef * hf(x, output_router_logits=True).aux_loss
    want.backward()
    with torch.no_grad():
        routed = ours(x, routing_only=True).moe
        counted = {i: s.tokens_per_expert.float() for i, s in routed.items()}
    pooled = pool_loads_over_layers(counted, ParallelContext.single(), cfg.n_experts)
    out = ours(x, global_loads=pooled)
    (0.0 * out.logits.sum()).backward()  # only the auxiliary loss's gradient flows
    assert out.aux_loss.item() == pytest.approx(want.item(), rel=1e-5)
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    compared = 0
    for rule in hf_rules(cfg, family, set(ours_grads), fused_experts=True):
        for name, g in zip(rule.hf, rule.save([ours_grads[o] for o in rule.ours])):
            if name in hf_grads:
                scale = hf_grads[name].abs().max().clamp(min=1e-12)
                assert max_diff(g, hf_grads[name]) / scale < 1e-4, name
                compared += 1
    assert compared == len(hf_grads) and any(".experts." in n for n in hf_grads)


def test_mixtral_8x7b_coefficient_is_per_layer():
    """Mixtral-8x7B's published router_aux_loss_coef 0.02, top-2, 32 layers: transformers weights
    the pooled loss once, so each of our 32 per-layer terms gets 0.02 * 2 / 32 (1/16 of 0.02)."""
    hf = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
              max_position_embeddings=32768, rope_theta=1e6)
    cfg = config_from_hf(hf)
    assert cfg.aux_loss_coef == pytest.approx(0.02 / 16, rel=1e-12)
    assert config_to_hf(cfg)["router_aux_loss_coef"] == pytest.approx(0.02, rel=1e-12)


def test_glm4_moe_trains_without_an_aux_loss(saved):
    hf, path = saved["glm4_moe"]
    assert hf(batch("glm4_moe"), output_router_logits=True).aux_loss is None
    cfg = load_hf(path).cfg
    assert cfg.aux_loss_coef == 0.0 and cfg.z_loss_coef == 0.0


# ---------------------------------------------------------------- refused or reshaped inputs
def test_glm4_moe_skips_multi_token_prediction_layers(saved, tmp_path):
    """Real GLM-4.5 checkpoints append num_nextn_predict_layers layers the causal LM never runs."""
    hf, path = saved["glm4_moe"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    n = hf.config.num_hidden_layers
    last = "model.layers.2."
    mtp = {k.replace(last, f"model.layers.{n}."): v.clone() for k, v in tensors.items()
           if k.startswith(last)}
    save_file({**tensors, **mtp}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf_cfg = dict(read_hf_config(path), num_nextn_predict_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.warns(UserWarning, match=rf"multi-token-prediction layers \[{n}\]"):
        ours = load_hf(str(tmp_path))
    with torch.no_grad():
        assert max_diff(ours(tokens()).logits, hf(tokens()).logits) < TOL
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_cfg, num_nextn_predict_layers=0)))
    with pytest.raises(ValueError, match=rf"unexpected key model\.layers\.{n}\."):
        load_hf(str(tmp_path))


def _hf_config(cls: str, **kw) -> dict:
    return getattr(transformers, cls)(**kw).to_dict()


@pytest.mark.parametrize("hf, match", [
    (lambda: _hf_config("DeepseekV3Config"),
     r"'deepseek_v3' needs multi-head latent attention \(MLA"),
    (lambda: _hf_config("DeepseekV2Config"), r"'deepseek_v2' needs multi-head latent attention"),
    (lambda: _hf_config("Glm4MoeLiteConfig"), r"'glm4_moe_lite' needs multi-head latent attention"),
    (lambda: dict(model_type="my_mla", kv_lora_rank=512), r"'my_mla' needs multi-head latent"),
    (lambda: _hf_config("Qwen3NextConfig"), r"'qwen3_next' needs gated DeltaNet linear attention"),
    (lambda: _hf_config("GptOssConfig"), r"'gpt_oss' needs attention sinks"),
    (lambda: dict(model_type="bert"),
     r"'bert' is not supported: use one of \['llama', 'gpt2', 'openai-gpt', "),
    (lambda: _hf_config("Qwen3MoeConfig", attention_bias=True),
     r"qwen3_moe attention_bias=True is not supported"),
    (lambda: _hf_config("OlmoeConfig", attention_bias=True),
     r"olmoe attention_bias=True is not supported"),
    (lambda: _hf_config("OpenAIGPTConfig", afn="relu"), r"openai-gpt afn 'relu' is not supported"),
    (lambda: _hf_config("Qwen2MoeConfig", use_sliding_window=True, max_window_layers=3,
                        num_hidden_layers=6),
     r"qwen2_moe sliding-window layers \[0, 2\] are not supported"),
])
def test_unsupported_hf_configs_are_one_line_errors(hf, match):
    with pytest.raises(ValueError, match=match) as err:
        config_from_hf(hf())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family, change, match", [
    ("glm4_moe", dict(group_score_topk=1), r"glm4_moe: model\.group_score_topk \(1\) must be 2"),
    ("glm4_moe", dict(shared_expert_ffn_dim=24), r"must be a multiple of the expert width \(16\)"),
    ("glm4_moe", dict(first_k_dense=0, dense_layers=[2]),
     r"the MoE blocks \(\[0, 1\]\) must be all blocks after"),
    ("qwen3_moe", dict(local_layers="odd"),
     r"qwen3_moe: model\.local_layers \('odd'\) must be 'none' or 'all'"),
    ("olmoe", dict(head_dim=8), r"olmoe: model\.head_dim \(8\) must be d_model / n_heads"),
    ("glm4", dict(sandwich_norm=False), r"glm4: model\.sandwich_norm \(False\) must be True"),
    ("openai-gpt", dict(ffn_dim=128),
     r"openai-gpt: model\.ffn_dim \(128\) must be 4 \* d_model \(256\)"),
    ("qwen2_moe", dict(capacity_factor=1.0),
     r"qwen2_moe: model\.capacity_factor \(1\.0\) must be None"),
])
def test_export_refuses_what_the_family_cannot_express(family, change, match):
    cfg = our_model(family).cfg
    config_to_hf(cfg, family)
    with pytest.raises(ValueError, match=match) as err:
        config_to_hf(ModelConfig(**{**cfg.to_dict(), **change}), family)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kw, match", [
    (dict(qk_norm="layer"),
     r"model\.qk_norm \('layer'\) is not one of \['none', 'head', 'full'\]"),
    (dict(qkv_clip=0.0), r"model\.qkv_clip \(0\.0\) must be > 0"),
    (dict(sandwich_norm=True, norm_position="post"),
     r"model\.sandwich_norm needs model\.norm_position=pre"),
    (dict(n_experts=4, aux_loss_pool_layers=True),
     r"model\.aux_loss_pool_layers needs model\.aux_loss_scope=global_batch \(got 'micro_batch'\)"),
])
def test_bad_attention_and_pooling_fields_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        ModelConfig(**kw)
    assert "\n" not in str(err.value)


def test_convert_to_hf_names_every_tensor_once(tmp_path):
    """The exported names are exactly those save_pretrained writes, expert biases included."""
    ours = our_model("glm4_moe")
    names = set(convert_to_hf(ours, "glm4_moe"))
    config = transformers.AutoConfig.for_model(**config_to_hf(ours.cfg))
    hf = transformers.Glm4MoeForCausalLM(config)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert names == set(load_file(tmp_path / "model.safetensors"))


def test_dense_first_blocks_export_as_a_layer_list_and_still_match(tmp_path):
    """Qwen2-MoE has no first_k_dense: our first_k_dense=1 is written as mlp_only_layers [0] and
    read back as dense_layers [0]; both say the same blocks are MoE, so starting a run from the
    export with the original config passes the config check."""
    base = our_model("qwen2_moe").cfg.to_dict()
    cfg = ModelConfig(**{**base, "moe_every": 1, "first_k_dense": 1})
    save_hf(build_model(cfg, seed=0), str(tmp_path), "qwen2_moe")
    assert read_hf_config(str(tmp_path))["mlp_only_layers"] == [0]
    back = config_from_hf(read_hf_config(str(tmp_path)))
    assert (back.first_k_dense, back.dense_layers, back.moe_layer_ids) == (0, [0], (1, 2, 3))
    check_matches_hf(cfg, str(tmp_path))
    with pytest.raises(ValueError, match=r"model\.first_k_dense is 2 here but 0 in its config"):
        check_matches_hf(ModelConfig(**{**cfg.to_dict(), "first_k_dense": 2}), str(tmp_path))
