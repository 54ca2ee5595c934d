"""Presets: every one builds (tiny variants for real, full sizes on the meta device), parameter counts
match published figures and an independent analytic formula, bad configs fail with one-line errors,
and every configs/*.yaml parses and names a preset that builds."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from moe.config import PRESET_TABLE, PRESETS, ModelConfig, get_preset, published_params
from moe.model import build_model, param_counts, validate_layout

FULL = [n for n in PRESET_TABLE if not n.startswith("tiny")]
SMALL = [n for n in PRESETS if n not in FULL]  # "-tiny" variants plus "tiny" and "tiny-moe"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


# ---------------------------------------------------------------- every preset builds
@pytest.mark.parametrize("name", SMALL)
def test_small_preset_builds_and_trains_one_step(name):
    cfg = get_preset(name)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(tokens, tokens.roll(-1, dims=1))
    assert out.logits.shape == (2, 8, cfg.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", FULL)
def test_full_preset_builds_on_meta(name):
    model = build_model(get_preset(name), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert len(model.layers) == get_preset(name).n_layers


STRUCTURE = ("norm", "norm_position", "positions", "rope_scaling", "rotary_fraction", "rope_interleaved", "mlp",
             "gelu_approx", "bias", "qkv_bias", "tie_embeddings", "local_layers", "top_k", "moe_every",
             "capacity_factor")


@pytest.mark.parametrize("name", FULL)
def test_tiny_variant_keeps_the_structure(name):
    full, tiny = get_preset(name), get_preset(f"{name}-tiny")
    for f in STRUCTURE:
        assert getattr(tiny, f) == getattr(full, f), f
    assert (tiny.n_experts > 0) == (full.n_experts > 0)
    assert (tiny.local_window is None) == (full.local_window is None)
    assert tiny.n_heads // tiny.kv_heads == min(tiny.n_heads, full.n_heads // full.kv_heads)
    assert tiny.d_model <= 128 and tiny.vocab_size <= 512


# ---------------------------------------------------------------- parameter counts
def analytic_params(cfg: ModelConfig) -> int:
    """Parameter count from the architecture, written independently of the modules:
    embeddings (+ untied head) + per block [attention + norms + dense MLP or (router + experts
    + shared expert)] + final norm."""
    D, V, dh = cfg.d_model, cfg.padded_vocab_size, cfg.dim_head
    H, K = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    norm = 2 * D if (cfg.norm == "layernorm" and cfg.bias) else D

    def mlp(F):  # GELU: W1, W2; SwiGLU: W1, W3, W2 (+ biases)
        n_in = 2 if cfg.mlp == "swiglu" else 1
        return n_in * D * F + F * D + (n_in * F + D if cfg.bias else 0)

    total = V * D + (cfg.max_seq_len * D if cfg.positions == "learned" else 0)
    total += 0 if cfg.tie_embeddings else V * D
    total += norm if cfg.norm_position == "pre" else 0
    for i in range(cfg.n_layers):
        attn = D * H * dh + 2 * D * K * dh + H * dh * D + ((H + 2 * K) * dh if qkv_bias else 0) + (D if cfg.bias else 0)
        total += attn + 2 * norm
        if cfg.n_experts and _moe_block(cfg, i):
            Fe = cfg.expert_ffn_dim or cfg.ffn
            experts = cfg.n_experts * (D * Fe * (2 if cfg.mlp == "swiglu" else 1) + Fe * D)
            total += cfg.n_experts * D + experts + (mlp(cfg.shared_expert_ffn_dim) if cfg.shared_expert_ffn_dim else 0)
            total += D if cfg.shared_expert_gate else 0
        else:
            total += mlp(cfg.ffn)
    return total


def _moe_block(cfg: ModelConfig, i: int) -> bool:
    """HF's rules: listed, or past first_k_dense_replace, not in mlp_only_layers, and
    (i + 1) % decoder_sparse_step == 0."""
    if cfg.moe_layers is not None:
        return i in cfg.moe_layers
    stride = (i + 1) % cfg.moe_every == 0
    return i >= cfg.first_k_dense and i not in (cfg.dense_layers or []) and stride


@pytest.mark.parametrize("name", [n for n in FULL if published_params(n) is not None])
def test_param_count_matches_published_figure(name):
    count = build_model(get_preset(name), device="meta").num_params()
    published = published_params(name)
    assert abs(count / published - 1) < 0.02, f"{name}: {count:,} vs published {published:,.0f}"


@pytest.mark.parametrize("name", FULL + ["tiny", "tiny-moe", "moe16x-tiny", "gpt1-tiny"])
def test_param_count_matches_analytic_formula(name):
    cfg = get_preset(name)
    assert build_model(cfg, device="meta").num_params() == analytic_params(cfg)


def test_exact_counts_of_released_checkpoints():
    """Counts of the released HF checkpoints (GPT-2 plus our 47 padding rows of 768)."""
    count = {n: build_model(get_preset(n), device="meta").num_params() for n in ("gpt2-small", "llama2-7b", "llama3-8b")}
    assert count["gpt2-small"] == 124_439_808 + (50304 - 50257) * 768
    assert count["llama2-7b"] == 6_738_415_616
    assert count["llama3-8b"] == 8_030_261_248


def test_moe16x_total_and_active_counts():
    """moe16x has no published size: 32 blocks x (GQA attention 32/8 of width 4096 + 16 SwiGLU
    experts of 6144 + router) + untied 100352 x 4096 embeddings: ~40.8B total, ~7.0B active (top-2)."""
    D, L, E, Fe, V = 4096, 32, 16, 6144, 100352
    attn = 2 * D * D + 2 * D * 1024
    block = attn + E * 3 * D * Fe + E * D + 2 * D
    total = 2 * V * D + L * block + D
    model = build_model(get_preset("moe16x"), device="meta")
    assert model.num_params() == total == 40_821_329_920
    active = total - L * E * 3 * D * Fe + L * 2 * 3 * D * Fe
    assert param_counts(model) == (total, active)
    assert abs(active / 7.0e9 - 1) < 0.02


def test_glm45_air_total_and_active_counts():
    """GLM-4.5-Air: 46 blocks of GQA attention (96 query / 8 kv heads of 128, q/k/v biases); block 0
    a dense SwiGLU MLP of 10944, blocks 1-45 a router, 128 experts and one shared expert of 1408;
    untied 151552 x 4096 embeddings. 106.85B total (published: 106B, the release's multi-token-
    prediction layer not counted); active 13.42B, of which 12.18B outside the embedding and head
    (published: 12B active)."""
    D, V, E, Fe, F = 4096, 151552, 128, 1408, 10944
    attn = D * 96 * 128 + 2 * D * 8 * 128 + 96 * 128 * D + (96 + 16) * 128
    moe = E * D + E * 3 * D * Fe + 3 * D * Fe
    total = 2 * V * D + 46 * (attn + 2 * D) + 3 * D * F + 45 * moe + D
    model = build_model(get_preset("glm4.5-air"), device="meta")
    assert model.num_params() == total == 106_852_245_504
    active = total - 45 * (E - 8) * 3 * D * Fe
    assert param_counts(model) == (total, active)
    assert abs((active - 2 * V * D) / 12e9 - 1) < 0.02


def test_gpt4_moe_total_and_active_counts():
    """The GPT-4 description: shared attention ~55B (120 blocks of MHA, 84 heads of 128 = width
    10752), 16 experts of ~111B each (120 blocks x SwiGLU 10752 -> 28672), top-2, untied
    100352 x 10752 embeddings: ~1.8T total, ~280B active."""
    D, L, E, Fe, V = 10752, 120, 16, 28672, 100352
    attention = L * 4 * D * D
    expert = L * 3 * D * Fe
    total = attention + E * expert + L * (E * D + 2 * D) + 2 * V * D + D
    model = build_model(get_preset("gpt4-moe"), device="meta")
    assert model.num_params() == total and param_counts(model) == (total, total - (E - 2) * expert)
    assert abs(attention / 55e9 - 1) < 0.02 and abs(expert / 111e9 - 1) < 0.02
    assert abs(total / 1.8e12 - 1) < 0.02 and abs((total - 14 * expert) / 280e9 - 1) < 0.02


def test_tied_embeddings_counted_once():
    cfg = get_preset("gpt2-small-tiny")
    model = build_model(cfg)
    assert cfg.tie_embeddings and not hasattr(model, "head")
    untied = build_model(get_preset("gpt2-small-tiny", tie_embeddings=False))
    assert untied.num_params() - model.num_params() == cfg.padded_vocab_size * cfg.d_model


def test_attention_width_equals_model_width():
    """heads x head_dim == d_model for every preset but GPT-3 13B, whose paper lists d_model 5140
    with 40 heads of 128 (5120), and GLM-4.5-Air, whose 96 heads of 128 are 3 x d_model wide."""
    for name in FULL:
        cfg = get_preset(name)
        if name not in ("gpt3-13b", "glm4.5-air"):
            assert cfg.n_heads * cfg.dim_head == cfg.d_model, name
    assert get_preset("glm4.5-air").n_heads * get_preset("glm4.5-air").dim_head == 3 * 4096


# ---------------------------------------------------------------- bad configs: one-line errors naming the field
BAD = [
    (dict(d_model=100, n_heads=3), r"model\.n_heads \(3\) must divide model\.d_model \(100\)"),
    (dict(n_experts=4, top_k=5), r"model\.top_k \(5\) must be between 1 and model\.n_experts \(4\)"),
    (dict(norm="batchnorm"), r"model\.norm \('batchnorm'\) is not one of \['layernorm', 'rmsnorm'\]"),
    (dict(n_heads=4, n_kv_heads=3), r"model\.n_kv_heads \(3\) must divide model\.n_heads \(4\)"),
    (dict(d_model=64, n_heads=4, rotary_fraction=0.3125), r"model\.rotary_fraction \(0\.3125\) must .* even rotary dim"),
    (dict(positions="alibi"), r"model\.positions \('alibi'\) is not one of"),
    (dict(n_layers=0), r"model\.n_layers \(0\) must be >= 1"),
    (dict(n_experts=4, capacity_factor=0.0), r"model\.capacity_factor \(0\.0\) must be > 0"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_config_raises_one_line_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        ModelConfig.from_dict(kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("d,match", [
    ({"d_model": "128"}, r"model\.d_model must be int, got '128' \(str\)"),
    ({"n_layers": True}, r"model\.n_layers must be int, got True \(bool\)"),
    ({"n_kv_heads": 2.5}, r"model\.n_kv_heads must be int or null, got 2\.5 \(float\)"),
    ({"n_head": 4}, r"unknown config key model\.n_head; did you mean model\.n_heads\?"),
    ({"preset": "llama3-8"}, r"unknown model preset 'llama3-8'; did you mean one of \[.*'llama3-8b'"),
])
def test_bad_dict_raises_one_line_error(d, match):
    with pytest.raises(ValueError, match=match) as err:
        ModelConfig.from_dict(d)
    assert "\n" not in str(err.value)


def test_from_dict_preset_with_overrides_and_int_to_float():
    cfg = ModelConfig.from_dict({"preset": "llama3-8b-tiny", "n_layers": 2, "rope_theta": 1000})
    assert cfg.n_layers == 2 and cfg.rope_theta == 1000.0 and isinstance(cfg.rope_theta, float)
    assert cfg.rope_scaling == "llama3"


def test_layout_errors_name_the_parallel_field():
    cfg = get_preset("llama3-8b")
    with pytest.raises(ValueError, match=r"parallel\.tp") as err:
        validate_layout(cfg, SimpleNamespace(tp=3, ep=1))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"parallel\.ep"):
        validate_layout(get_preset("moe16x"), SimpleNamespace(tp=1, ep=3))


# ---------------------------------------------------------------- configs/*.yaml
def test_every_full_preset_has_a_yaml():
    assert {p.stem for p in CONFIGS} >= set(FULL)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_yaml_parses_and_its_preset_builds_on_meta(path):
    d = yaml.safe_load(path.read_text())
    name = d["model"]["preset"]
    assert name in PRESETS
    cfg = ModelConfig.from_dict(d["model"])
    assert build_model(cfg, device="meta").num_params() > 0
    assert d["data"]["seq_len"] <= cfg.max_seq_len


ALLOWED = {"run_dir": None, "model": {"preset"},
           "parallel": {"tp", "pp", "ep", "vpp", "pp_schedule", "zero1", "sequence_parallel",
                        "fold_experts"},
           "data": {"paths", "seq_len"},
           "training": {"global_batch_size", "micro_batch_size", "precision", "max_steps",
                        "activation_checkpointing", "recompute"},
           "optimizer": {"lr"}}


@pytest.mark.parametrize("name", FULL)
def test_preset_yaml_keys_and_parallel_layout(name):
    d = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert set(d) <= set(ALLOWED)
    for section, keys in ALLOWED.items():
        if keys is not None and section in d:
            assert set(d[section]) <= keys, f"{section}: {set(d[section]) - keys}"
    assert d["model"] == {"preset": name} and d["run_dir"] == f"runs/{name}"
    cfg = get_preset(name)
    tp, pp, ep = (d.get("parallel", {}).get(k, 1) for k in ("tp", "pp", "ep"))
    assert tp <= 8 and cfg.n_heads % tp == 0 and cfg.kv_heads % tp == 0
    assert cfg.n_layers >= pp  # the partitioner balances uneven splits
    validate_layout(cfg, SimpleNamespace(tp=tp, ep=ep))  # vocab, ffn, experts divisible
    t = d["training"]
    assert t["global_batch_size"] % t["micro_batch_size"] == 0 and t["precision"] in ("bf16", "fp32")
    assert isinstance(d["optimizer"]["lr"], float) and 0 < d["optimizer"]["lr"] < 1e-2  # "3e-4" would be a str


def test_moe16x_yaml_fits_four_nodes_of_eight():
    d = yaml.safe_load((CONFIG_DIR / "moe16x.yaml").read_text())["parallel"]
    world = 4 * 8
    dp = world // (d["tp"] * d["pp"])
    domain = dp * d["tp"] if d.get("fold_experts") else dp   # folded experts shard tp x dp
    assert d["tp"] * d["pp"] * dp == world and domain % d["ep"] == 0
    assert 16 % d["ep"] == 0 and d["ep"] > 1
