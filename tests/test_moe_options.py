"""MoE options at the model level: which blocks are MoE, validation of the routing fields, the
gated shared expert, the expert-bias buffer as model state, and a model that uses every option."""
import pytest
import torch

from moe.config import ModelConfig, first_difference, get_preset
from moe.layers import DenseMLP
from moe.model import build_empty, build_model, load_full_state_dict
from moe.moe_layer import MoELayer
from parallel.context import ParallelContext


@pytest.mark.parametrize("kw, moe", [
    (dict(), [0, 1, 2, 3, 4, 5]),
    (dict(moe_every=2), [1, 3, 5]),                               # HF decoder_sparse_step 2
    (dict(first_k_dense=2), [2, 3, 4, 5]),                        # HF first_k_dense_replace 2
    (dict(dense_layers=[0, 4]), [1, 2, 3, 5]),                    # HF mlp_only_layers
    (dict(moe_every=2, dense_layers=[3]), [1, 5]),
    (dict(first_k_dense=1, moe_every=2), [1, 3, 5]),
    (dict(moe_layers=[0, 5]), [0, 5]),
])
def test_which_blocks_are_moe(kw, moe):
    cfg = get_preset("tiny-moe", n_layers=6, **kw)
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == moe
    model = build_model(cfg, device="meta")
    assert [i for i in range(6) if isinstance(model.layers[str(i)].mlp, MoELayer)] == moe
    assert all(isinstance(model.layers[str(i)].mlp, DenseMLP) for i in range(6) if i not in moe)


@pytest.mark.parametrize("kw, match", [
    (dict(first_k_dense=4), r"model\.n_experts \(8\) > 0 but no block is MoE"),
    (dict(moe_layers=[1, 4]),
     r"model\.moe_layers \(\[1, 4\]\) must list distinct block indices in \[0, n_layers = 4\)"),
    (dict(dense_layers=[1, 1]), r"model\.dense_layers \(\[1, 1\]\) must list distinct"),
    (dict(moe_layers=[1], first_k_dense=1), r"model\.moe_layers lists the MoE blocks itself"),
    (dict(first_k_dense=-1), r"model\.first_k_dense \(-1\) must be >= 0"),
    (dict(score_function="relu"),
     r"model\.score_function \('relu'\) is not one of \['softmax', 'sigmoid'\]"),
    (dict(aux_loss_scope="batch"), r"model\.aux_loss_scope \('batch'\) is not one of"),
    (dict(score_function="sigmoid", topk_before_softmax=True),
     r"model\.topk_before_softmax needs model\.score_function=softmax"),
    (dict(topk_before_softmax=True, norm_topk_prob=False), r"sum to 1 by construction"),
    (dict(routed_scaling_factor=0.0), r"model\.routed_scaling_factor \(0\.0\) must be > 0"),
    (dict(n_group=3), r"model\.n_group \(3\) must be >= 1 and divide model\.n_experts \(8\)"),
    (dict(n_group=4, topk_group=5), r"model\.topk_group \(5\) must be in \[1, n_group = 4\]"),
    (dict(n_group=4, topk_group=1, top_k=3), r"leave at least top_k \(3\) experts"),
    (dict(n_group=4, topk_group=2, group_score_topk=3),
     r"model\.group_score_topk \(3\) must be in \[1, n_experts / n_group = 2\]"),
    (dict(topk_group=2), r"model\.topk_group \(2\) must be in \[1, n_group = 1\]"),
    (dict(expert_bias_update_rate=-1e-3),
     r"model\.expert_bias_update_rate \(-0\.001\) must be >= 0"),
    (dict(router_input_jitter=1.0), r"model\.router_input_jitter \(1\.0\) must be in \[0, 1\)"),
    (dict(shared_expert_gate=True), r"model\.shared_expert_gate needs a shared expert"),
])
def test_bad_routing_config_is_a_one_line_error(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        ModelConfig.from_dict({"preset": "tiny-moe", **kw})
    assert "\n" not in str(err.value)


def test_first_difference_compares_derived_values():
    a, b = get_preset("tiny-moe"), lambda **kw: get_preset("tiny-moe", **kw)
    assert first_difference(a, b(norm_topk_prob=True)) is None  # None means True at k = 2
    assert first_difference(a, b(norm_topk_prob=False))[0] == "norm_topk_prob"
    assert first_difference(a, b(aux_loss_scope="sequence", router_input_jitter=0.1)) is None
    diff = first_difference(a, b(score_function="sigmoid"))
    assert diff == ("score_function", "softmax", "sigmoid")


def test_shared_expert_gate_scales_the_shared_output_per_token():
    """y = routed(x) + sigmoid(x . w_gate) * shared(x): with the shared expert's output projection
    zeroed the layer gives routed(x) alone, so y minus that is the gated shared output."""
    cfg = get_preset("tiny-moe", shared_expert_ffn_dim=64, shared_expert_gate=True,
                     expert_backend="loop")
    layer = MoELayer(cfg, ParallelContext.single())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x = torch.randn(2, 5, cfg.d_model, generator=gen)
    y, _ = layer(x)
    with torch.no_grad():
        gate = torch.sigmoid(x @ layer.shared_gate.weight.t())  # [B, S, 1]
        expect = gate * layer.shared(x)                          # [B, S, D]
        layer.shared.w2.weight.zero_()
        routed, _ = layer(x)
    torch.testing.assert_close(y - routed, expect, atol=1e-6, rtol=1e-5)
    assert gate.min() < 0.4 and gate.max() > 0.6  # the gate really varies per token
    assert dict(layer.named_parameters())["shared_gate.weight"].shape == (1, cfg.d_model)


MODERN = dict(n_layers=4, first_k_dense=1, score_function="sigmoid", n_group=2, topk_group=1,
              expert_bias=True, routed_scaling_factor=2.5, shared_expert_ffn_dim=64,
              shared_expert_gate=True, router_input_jitter=0.01, aux_loss_scope="sequence",
              aux_loss_coef=1e-3)


def test_model_with_every_routing_option_trains():
    cfg = get_preset("tiny-moe", **MODERN)
    model = build_model(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(tokens, tokens.roll(-1, 1))
    assert sorted(out.moe) == [1, 2, 3] and out.aux_loss > 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    grads = {n: p.grad.abs().max().item() for n, p in model.named_parameters()}
    assert grads["layers.1.mlp.router.weight"] > 0 and grads["layers.1.mlp.shared_gate.weight"] > 0


def test_expert_bias_is_model_state_zero_at_init_and_loaded_from_full_state():
    cfg = get_preset("tiny-moe", expert_bias=True)
    model = build_empty(cfg)  # uninitialised storage, as a checkpoint load or to_empty leaves it
    model.layers["0"].mlp.router.expert_bias.fill_(float("nan"))
    model.init_weights(0)
    keys = [k for k in model.state_dict() if k.endswith("expert_bias")]
    assert keys == [f"layers.{i}.mlp.router.expert_bias" for i in range(4)]
    assert all(model.state_dict()[k].eq(0).all() for k in keys)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    full["layers.2.mlp.router.expert_bias"] = torch.arange(8.0)
    other = build_model(cfg, seed=5)
    load_full_state_dict(other, full)
    assert other.layers["2"].mlp.router.expert_bias.tolist() == list(range(8))
    del full["layers.3.mlp.router.expert_bias"]
    with pytest.raises(ValueError, match="no tensor for layers.3.mlp.router.expert_bias"):
        load_full_state_dict(other, full)


@pytest.mark.parametrize("kw", [dict(score_function="sigmoid"), dict(n_group=2),
                                dict(expert_bias=True), dict(routed_scaling_factor=2.0),
                                dict(norm_topk_prob=False), dict(first_k_dense=1)])
def test_mixtral_export_refuses_routing_it_cannot_express(kw):
    from moe.hf import config_to_hf

    config_to_hf(get_preset("tiny-moe"), "mixtral")
    with pytest.raises(ValueError, match="cannot export to HF mixtral"):
        config_to_hf(get_preset("tiny-moe", **kw), "mixtral")


def test_mixtral_import_always_normalises_the_k_weights():
    """HF Mixtral divides the top-k probabilities by their sum even for top-1."""
    from moe.hf import config_from_hf

    hf = dict(model_type="mixtral", vocab_size=64, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=16,
              num_local_experts=4, num_experts_per_tok=1)
    assert config_from_hf(hf).normalizes_topk
