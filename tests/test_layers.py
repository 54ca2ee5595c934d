"""Layers against independent references: RoPE frequencies and scaling (plain-Python formulas and
transformers' own llama3 code), rotary application (complex numbers), sinusoidal table, GQA
(explicit repeat_interleave attention), local windows, and pre/post-norm block structure."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe.config import ModelConfig, get_preset
from moe.layers import Attention, RMSNorm, apply_rope, banded_causal_mask, rope_cos_sin, rope_inv_freq, \
    sinusoidal_table
from moe.model import Block, build_model
from parallel.context import ParallelContext

CTX = ParallelContext.single()


def _base_inv(dim, theta):
    """theta^(-2i/dim), i = 0 .. dim/2 - 1, in plain Python."""
    return [theta ** (-2 * i / dim) for i in range(dim // 2)]


def _rope_cfg(**kw):
    return ModelConfig(**{**dict(d_model=64, n_heads=4, rope_theta=10000.0), **kw})  # head_dim 16


# ---------------------------------------------------------------- RoPE frequencies
def test_rope_inv_freq_unscaled():
    torch.testing.assert_close(rope_inv_freq(_rope_cfg()), torch.tensor(_base_inv(16, 10000.0)))


def test_rope_linear_scaling_divides_every_frequency():
    inv = rope_inv_freq(_rope_cfg(rope_scaling="linear", rope_scaling_factor=4.0))
    torch.testing.assert_close(inv, torch.tensor([f / 4.0 for f in _base_inv(16, 10000.0)]))


def test_rope_ntk_scaling_changes_the_base():
    """NTK-aware: base' = base * s^(d/(d-2)); the highest frequency is kept and the lowest one is
    divided by exactly s (base'^(-(d-2)/d) = base^(-(d-2)/d) / s)."""
    s, d = 4.0, 16
    inv = rope_inv_freq(_rope_cfg(rope_scaling="ntk", rope_scaling_factor=s))
    torch.testing.assert_close(inv, torch.tensor(_base_inv(d, 10000.0 * s ** (d / (d - 2)))))
    base = _base_inv(d, 10000.0)
    assert inv[0].item() == pytest.approx(1.0)
    assert inv[-1].item() == pytest.approx(base[-1] / s, rel=1e-5)


def _llama3_reference(dim, theta, factor, lo, hi, orig):
    """LLaMA 3.1 scaling written from the Meta reference: wavelength < orig/hi kept, > orig/lo
    divided by factor, in between a linear blend in orig/wavelength."""
    out = []
    for f in _base_inv(dim, theta):
        wavelen = 2 * math.pi / f
        if wavelen < orig / hi:
            out.append(f)
        elif wavelen > orig / lo:
            out.append(f / factor)
        else:
            smooth = (orig / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


LLAMA3 = dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
              rope_high_freq_factor=4.0, rope_original_max_seq_len=32)


def test_rope_llama3_scaling_matches_reference_formula_in_all_three_bands():
    inv = rope_inv_freq(_rope_cfg(**LLAMA3))
    ref = _llama3_reference(16, 10000.0, 8.0, 1.0, 4.0, 32)
    torch.testing.assert_close(inv, torch.tensor(ref))
    base = _base_inv(16, 10000.0)
    bands = {"kept": 0, "scaled": 0, "blended": 0}
    for got, b in zip(inv.tolist(), base):
        key = "kept" if got == pytest.approx(b) else "scaled" if got == pytest.approx(b / 8) else "blended"
        bands[key] += 1
    assert all(bands.values()), f"test frequencies must cover every band, got {bands}"


def test_rope_llama3_scaling_matches_transformers():
    pytest.importorskip("transformers")
    try:
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:
        pytest.skip("this transformers has no ROPE_INIT_FUNCTIONS")
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                     rope_theta=10000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=32))
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    torch.testing.assert_close(rope_inv_freq(_rope_cfg(**LLAMA3)), hf_inv.float(), rtol=1e-6, atol=0)


def test_rope_inv_freq_uses_only_the_rotary_dims():
    """ChatGLM rotates half of each head: frequencies are theta^(-2i/r) over r = rotary dims."""
    inv = rope_inv_freq(_rope_cfg(rotary_fraction=0.5))
    torch.testing.assert_close(inv, torch.tensor(_base_inv(8, 10000.0)))


# ---------------------------------------------------------------- applying RoPE
def _complex_rope_reference(x, inv, interleaved):
    """Rotate pairs as complex numbers: z_i * exp(i * pos * inv_i). Pairs are (2i, 2i+1) when
    interleaved, else (i, i + r/2); x [B, H, S, r] with r = 2 * len(inv)."""
    r = 2 * inv.shape[0]
    if interleaved:
        z = torch.complex(x[..., 0:r:2].double(), x[..., 1:r:2].double())
    else:
        z = torch.complex(x[..., : r // 2].double(), x[..., r // 2: r].double())
    pos = torch.arange(x.shape[-2], dtype=torch.float64)[:, None]
    z = z * torch.polar(torch.ones_like(pos * inv.double()), pos * inv.double())
    out = torch.empty(x.shape[:-1] + (r,), dtype=torch.float64)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        out[..., : r // 2], out[..., r // 2:] = z.real, z.imag
    return out.float()


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rope_matches_complex_rotation(interleaved):
    cfg = _rope_cfg()
    x = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(cfg, 10, torch.device("cpu"))
    got = apply_rope(x, cos, sin, interleaved)
    torch.testing.assert_close(got, _complex_rope_reference(x, rope_inv_freq(cfg), interleaved), atol=1e-5, rtol=1e-5)
    other = apply_rope(x, cos, sin, not interleaved)
    assert not torch.allclose(got[:, :, 1:], other[:, :, 1:], atol=1e-3)  # the two layouts really differ


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_leaves_other_dims_unchanged(interleaved):
    cfg = _rope_cfg(rotary_fraction=0.5)  # head_dim 16, rotary dims 8
    x = torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_cos_sin(cfg, 6, torch.device("cpu"))
    assert cos.shape == (6, 4)
    got = apply_rope(x, cos, sin, interleaved)
    assert torch.equal(got[..., 8:], x[..., 8:])
    torch.testing.assert_close(got[..., :8], _complex_rope_reference(x[..., :8], rope_inv_freq(cfg), interleaved),
                               atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    """<R(m) q, R(n) k> is a function of m - n: shifting both positions leaves the score unchanged."""
    cfg = _rope_cfg()
    cos, sin = rope_cos_sin(cfg, 12, torch.device("cpu"))
    q, k = torch.randn(2, 16, generator=torch.Generator().manual_seed(2)).unbind(0)
    rq = apply_rope(q.expand(1, 1, 12, 16), cos, sin, False)[0, 0]
    rk = apply_rope(k.expand(1, 1, 12, 16), cos, sin, False)[0, 0]
    assert (rq[7] @ rk[3]).item() == pytest.approx((rq[10] @ rk[6]).item(), abs=1e-5)
    assert (rq[7] @ rk[3]).item() != pytest.approx((rq[7] @ rk[6]).item(), abs=1e-3)


# ---------------------------------------------------------------- sinusoidal positions
def test_sinusoidal_table_matches_formula():
    """PE[p, 2i] = sin(p / 10000^(2i/d)),  PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    S, d = 9, 12
    ref = [[(math.sin if c % 2 == 0 else math.cos)(p / 10000 ** ((c - c % 2) / d)) for c in range(d)]
           for p in range(S)]
    torch.testing.assert_close(sinusoidal_table(S, d), torch.tensor(ref), atol=1e-6, rtol=1e-5)


def test_sinusoidal_model_adds_the_table_to_token_embeddings():
    cfg = get_preset("tiny", positions="sinusoidal")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.embed(tokens), model.tok_emb(tokens) + sinusoidal_table(7, cfg.d_model))


# ---------------------------------------------------------------- attention: GQA, MHA, local windows
def _attn_reference(attn, x, rope, window=None):
    """Explicit attention: K/V repeated with repeat_interleave to H heads, softmax(q k^T / sqrt(Dh))
    with a causal (optionally banded) mask, then the output projection."""
    B, S, _ = x.shape
    q = attn.wq(x).view(B, S, attn.h_local, attn.dh).transpose(1, 2)
    k = attn.wk(x).view(B, S, attn.kv_local, attn.dh).transpose(1, 2)
    v = attn.wv(x).view(B, S, attn.kv_local, attn.dh).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope, False), apply_rope(k, *rope, False)
    rep = attn.h_local // attn.kv_local
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.dh)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (j > i - window)
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    return attn.wo(out.transpose(1, 2).reshape(B, S, -1))


def _init(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # MQA, GQA, MHA
def test_attention_matches_repeat_interleave_reference(kv_heads):
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=kv_heads)
    attn = _init(Attention(cfg, CTX, 0))
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    rope = rope_cos_sin(cfg, 9, x.device)
    torch.testing.assert_close(attn(x, rope), _attn_reference(attn, x, rope), atol=1e-5, rtol=1e-5)


def test_gqa_with_kv_heads_equal_heads_is_mha():
    mha = _init(Attention(ModelConfig(d_model=32, n_heads=4), CTX, 0))
    gqa = Attention(ModelConfig(d_model=32, n_heads=4, n_kv_heads=4), CTX, 0)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))
    rope = rope_cos_sin(mha_cfg := ModelConfig(d_model=32, n_heads=4), 9, x.device)
    assert mha_cfg.kv_heads == 4
    assert torch.equal(gqa(x, rope), mha(x, rope))


def test_local_window_attention_matches_banded_reference_and_ignores_far_tokens():
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, local_window=3, local_layers="odd", positions="learned")
    assert not cfg.is_local_layer(0) and cfg.is_local_layer(1)
    attn = _init(Attention(cfg, CTX, 1))
    x = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(6))
    y = attn(x, None)
    torch.testing.assert_close(y, _attn_reference(attn, x, None, window=3), atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[:, 2] += 1.0  # position 2 is outside the window of positions >= 5
    y2 = attn(x2, None)
    assert torch.equal(y2[:, 5:], y[:, 5:])
    assert not torch.allclose(y2[:, 2:5], y[:, 2:5])
    full = _init(Attention(cfg, CTX, 0))  # layer 0 is not local: position 2 reaches every later token
    assert not torch.allclose(full(x2, None)[:, 5:], full(x, None)[:, 5:])


def test_banded_causal_mask_by_hand():
    expect = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(banded_causal_mask(4, 2, torch.device("cpu")), expect)


# ---------------------------------------------------------------- norms and block structure
def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), ref)


def _block_io(preset):
    cfg = get_preset(preset)
    block = Block(cfg, CTX, 0).eval()
    _init(block, seed=8)
    x = torch.randn(2, 6, cfg.d_model, generator=torch.Generator().manual_seed(9))
    rope = rope_cos_sin(cfg, 6, x.device) if cfg.positions == "rope" else None
    return cfg, block, x, rope


def test_post_norm_block_structure_gpt1():
    """GPT-1: h = LN1(x + attn(x)); out = LN2(h + mlp(h)); the final model norm is the identity."""
    cfg, b, x, rope = _block_io("gpt1-tiny")
    assert cfg.norm_position == "post" and get_preset("gpt1").norm_position == "post"
    h = b.attn_norm(x + b.attn(x, rope))
    ref = b.mlp_norm(h + b.mlp(h))
    out, _ = b(x, rope, 1.0)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():  # with unit gain and zero shift, every output row is standardised
        b.mlp_norm.weight.fill_(1.0)
        b.mlp_norm.bias.zero_()
    out, _ = b(x, rope, 1.0)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    assert isinstance(build_model(cfg, device="meta").norm, torch.nn.Identity)


def test_pre_norm_block_structure_gpt2():
    """GPT-2 onward: h = x + attn(LN1(x)); out = h + mlp(LN2(h)); a final norm before the head."""
    cfg, b, x, rope = _block_io("gpt2-small-tiny")
    assert cfg.norm_position == "pre"
    h = x + b.attn(b.attn_norm(x), rope)
    ref = h + b.mlp(b.mlp_norm(h))
    out, _ = b(x, rope, 1.0)
    torch.testing.assert_close(out, ref)
    h_post = b.attn_norm(x + b.attn(x, rope))
    assert not torch.allclose(out, b.mlp_norm(h_post + b.mlp(h_post)), atol=1e-3)
    assert isinstance(build_model(cfg, device="meta").norm, torch.nn.LayerNorm)


def test_gelu_and_swiglu_dense_mlps():
    cfg, b, x, _ = _block_io("gpt2-small-tiny")
    m = b.mlp
    ref = F.gelu(x @ m.w1.weight.T + m.w1.bias, approximate="tanh") @ m.w2.weight.T + m.w2.bias
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    cfg, b, x, _ = _block_io("llama2-7b-tiny")
    m = b.mlp
    ref = (F.silu(x @ m.w1.weight.T) * (x @ m.w3.weight.T)) @ m.w2.weight.T
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
