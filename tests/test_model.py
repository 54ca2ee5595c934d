"""Whole-model properties: causality, aux/z-loss gradient injection, init determinism, vocab padding."""
import pytest
import torch
import torch.nn.functional as F

from moe.config import get_preset
from moe.model import build_model
from moe.router import TopKRouter


def _tokens(cfg, B=2, S=24, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- causality
# MoE presets run dropless (capacity_factor None): with a capacity limit, whether a token keeps its
# expert depends on how many other tokens (future ones included) chose that expert, which couples
# positions by design.
@pytest.mark.parametrize("preset", [
    "gpt3-125m-tiny",    # learned positions, banded local attention on odd layers (window 8 < S)
    "gpt1-tiny",         # post-norm
    "llama3-8b-tiny",    # RoPE with llama3 scaling, GQA
    "chatglm2-6b-tiny",  # partial interleaved RoPE, MQA in the tiny variant, qkv bias
    "tiny-moe",          # MoE every block, dropless
    "moe16x-tiny",
])
def test_future_tokens_do_not_change_past_logits(preset):
    cfg = get_preset(preset)
    assert cfg.capacity_factor is None
    model = build_model(cfg).eval()
    a = _tokens(cfg)
    b = a.clone()
    b[:, 12:] = (b[:, 12:] + 1 + torch.arange(12)) % cfg.vocab_size  # every future token changes
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :12], lb[:, :12], atol=1e-6, rtol=0)
    assert (la[:, 12:] - lb[:, 12:]).abs().amax(-1).min() > 1e-4  # and the future does see the change


# ---------------------------------------------------------------- aux/z-loss gradient injection
def _capture_router_inputs(model):
    """Forward pre-hooks that record each router's input tokens (still attached to the graph)."""
    seen = []
    for m in model.modules():
        if isinstance(m, TopKRouter):
            m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
    return seen


def _reference_router_losses(router, tokens, aux_coef, z_coef):
    """Switch aux and ST-MoE z loss recomputed here from the router's input and gate weight."""
    logits = tokens.float() @ router.weight.float().t()  # [T, E]
    probs = torch.softmax(logits, dim=-1)
    T, E, k = probs.shape[0], probs.shape[1], router.top_k
    chosen = probs.topk(k, dim=-1).indices
    f = torch.zeros(E).index_add_(0, chosen.flatten(), torch.ones(T * k)) / (T * k)
    aux = aux_coef * E * (f * probs.mean(dim=0)).sum()
    z = z_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
    return aux, z


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_aux_grad_scale_injects_scaled_aux_and_z_gradients():
    """backward(lm_loss) of a forward with aux_grad_scale=s must give the gradients of
    lm_loss + s * sum_layers(aux + z), the latter computed here independently (with scale 0 in the model)."""
    s = 0.37
    cfg = get_preset("tiny-moe", n_layers=2, aux_loss_coef=0.5, z_loss_coef=0.1)
    tokens, targets = _tokens(cfg, S=16), _tokens(cfg, S=16, seed=1)

    model = build_model(cfg, seed=3)
    out = model(tokens, targets, aux_grad_scale=s)
    out.loss.backward()
    injected = _grads(model)

    ref = build_model(cfg, seed=3)
    seen = _capture_router_inputs(ref)
    ref_out = ref(tokens, targets, aux_grad_scale=0.0)
    losses = [_reference_router_losses(r, x, cfg.aux_loss_coef, cfg.z_loss_coef) for r, x in seen]
    assert len(losses) == 2
    aux = sum(a for a, _ in losses)
    z = sum(b for _, b in losses)
    assert out.aux_loss.item() == pytest.approx(aux.item(), rel=1e-5)
    assert out.z_loss.item() == pytest.approx(z.item(), rel=1e-5)
    torch.testing.assert_close(out.loss, ref_out.loss)
    names, params = zip(*ref.named_parameters())
    g_lm = torch.autograd.grad(ref_out.loss, params, retain_graph=True, allow_unused=True)
    g_aux = torch.autograd.grad(aux + z, params, allow_unused=True)
    for name, a, b in zip(names, g_lm, g_aux):
        expected = (a if a is not None else 0) + s * (b if b is not None else 0)
        torch.testing.assert_close(injected[name], expected, atol=1e-7, rtol=1e-5, msg=name)
    router = names.index("layers.0.mlp.router.weight")
    assert g_aux[router].abs().max() > 0.01 * g_lm[router].abs().max()  # the aux terms really move it


def test_aux_losses_are_reported_detached_and_not_in_lm_loss():
    cfg = get_preset("tiny-moe", n_layers=2)
    model = build_model(cfg)
    tokens = _tokens(cfg, S=8)
    out = model(tokens, tokens)
    assert not out.aux_loss.requires_grad and not out.z_loss.requires_grad
    assert out.aux_loss > 0 and out.z_loss > 0 and sorted(out.moe) == [0, 1]
    ref = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), tokens.reshape(-1))
    torch.testing.assert_close(out.loss, ref)


# ---------------------------------------------------------------- init, padding
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "gpt2-small-tiny"])
def test_init_is_deterministic_per_seed(preset):
    cfg = get_preset(preset)
    a, b, c = build_model(cfg, seed=7), build_model(cfg, seed=7), build_model(cfg, seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim >= 2:
            assert not torch.allclose(pa, pc), f"{name} does not depend on the seed"


def test_init_statistics():
    """Matrices ~ N(0, 0.02^2), output projections 0.02 / sqrt(2 n_layers); norms 1; biases 0."""
    cfg = get_preset("gpt2-small-tiny")
    model = build_model(cfg)
    params = dict(model.named_parameters())
    assert params["tok_emb.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert params["layers.0.attn.wo.weight"].std().item() == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.1)
    assert torch.equal(params["layers.0.attn_norm.weight"], torch.ones(cfg.d_model))
    assert torch.equal(params["layers.0.mlp.w1.bias"], torch.zeros(cfg.ffn))


def test_padded_vocab_rows_are_masked_and_cut_from_logits():
    cfg = get_preset("tiny", vocab_pad_multiple=64)  # 257 -> 320 rows
    assert cfg.padded_vocab_size == 320
    model = build_model(cfg)
    assert model.tok_emb.weight.shape[0] == 320
    tokens = _tokens(cfg, S=8)
    out = model(tokens, tokens)
    assert out.logits.shape == (2, 8, 257)
    ref = F.cross_entropy(out.logits.reshape(-1, 257), tokens.reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_sequence_longer_than_max_seq_len_raises():
    cfg = get_preset("tiny", max_seq_len=16)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds model.max_seq_len \(16\)"):
        build_model(cfg)(_tokens(cfg, S=17))


def test_build_empty_fills_computed_buffers_and_build_model_matches_plain_init():
    """build_empty (used by HF loading, generate, convert) must not leave the sinusoidal table as
    uninitialised memory; build_model (built empty, then init_weights) gives the same weights as
    constructing the Decoder normally and calling init_weights."""
    from moe.layers import sinusoidal_table
    from moe.model import Decoder, build_empty

    cfg = get_preset("gpt2-small-tiny", positions="sinusoidal")
    assert torch.equal(build_empty(cfg).pos_table, sinusoidal_table(cfg.max_seq_len, cfg.d_model))
    plain = Decoder(cfg)
    plain.init_weights(3)
    built = build_model(cfg, seed=3)
    for (name, a), (_, b) in zip(plain.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("recompute", ["full", "selective"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(preset, recompute):
    """Recomputing blocks in backward (whole blocks, or all but the GEMM/attention outputs) changes
    memory, never the numbers: loss, aux losses and every gradient match the plain run."""
    cfg = get_preset(preset, capacity_factor=1.0) if preset == "tiny-moe" else get_preset(preset)
    tokens = _tokens(cfg)
    results = []
    for ckpt in (False, True):
        model = build_model(cfg, seed=3).train()
        model.activation_checkpointing, model.recompute = ckpt, recompute
        out = model(tokens[:, :-1], tokens[:, 1:], aux_grad_scale=0.5)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_decoder_built_directly_initialises_itself():
    """Decoder(cfg) is a usable model: every weight (experts, router and shared expert included)
    is the layout-independent init of build_model with the same seed, not torch.empty memory."""
    from moe.model import Decoder

    cfg = get_preset("tiny-moe", n_layers=2, shared_expert_ffn_dim=64)
    for seed in (0, 5):
        plain, built = Decoder(cfg, seed=seed), build_model(cfg, seed=seed)
        for (name, a), (_, b) in zip(plain.named_parameters(), built.named_parameters()):
            assert torch.equal(a, b), name
    names = {n for n, _ in plain.named_parameters()}
    assert {"layers.1.mlp.experts.w_in", "layers.1.mlp.router.weight",
            "layers.1.mlp.shared.w1.weight"} <= names
    tokens = _tokens(cfg)
    assert torch.isfinite(Decoder(cfg)(tokens[:, :-1], tokens[:, 1:]).loss)
    with torch.device("meta"):
        assert Decoder(cfg).layers["0"].mlp.router.weight.is_meta  # placeholders stay uninitialised
