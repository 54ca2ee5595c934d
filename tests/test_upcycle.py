"""Dense -> MoE upcycling: the upcycled model computes the dense model's function (logits and LM
loss) for copies and for fine-grained slices, with every routing option that keeps it exact; what
cannot be exact is a one-line error naming the field."""
import pytest
import torch

from moe.config import get_preset
from moe.model import build_empty, build_model, load_full_state_dict
from moe.upcycle import check_upcycle, upcycle_state

DENSE = dict(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=257,
             vocab_pad_multiple=64)
MOE = dict(DENSE, n_experts=4, top_k=2, expert_ffn_dim=128)


def _dense(**kw):
    return get_preset("tiny", **{**DENSE, **kw})


def _upcycled(dense_cfg, seed=0, **moe_kw):
    dense = build_model(dense_cfg, seed=3)
    with torch.no_grad():  # a "trained" dense model: norms and everything away from their init
        for p in dense.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    mlp = dict(mlp=dense_cfg.mlp, gelu_approx=dense_cfg.gelu_approx)
    cfg = get_preset("tiny-moe", **{**MOE, **mlp, **moe_kw})
    moe = build_empty(cfg)
    load_full_state_dict(moe, upcycle_state(dense.state_dict(), dense_cfg, cfg, seed))
    return dense.eval(), moe.eval()


@pytest.mark.parametrize("moe_kw", [
    dict(),                                             # 4 copies, top-2 (Mixtral-style)
    dict(n_experts=8, expert_ffn_dim=64),               # 2 slices x 4 copies, top-2 = one copy
    dict(n_experts=8, top_k=4, expert_ffn_dim=32, score_function="sigmoid", norm_topk_prob=True,
         n_group=2, topk_group=1, routed_scaling_factor=2.5, expert_bias=True,
         first_k_dense=1),                              # 4 slices x 2 copies, DeepSeek-style
    dict(top_k=1, norm_topk_prob=True),                 # top-1 with its weight normalised to 1
    dict(moe_every=2, topk_before_softmax=True),
    dict(n_experts=6, top_k=2, expert_ffn_dim=64, mlp="gelu"),  # GELU MLP, 2 slices x 3 copies
])
def test_upcycled_model_computes_the_dense_function(moe_kw):
    dense_cfg = _dense(mlp=moe_kw.pop("mlp", "swiglu"))
    dense, moe = _upcycled(dense_cfg, **moe_kw)
    tokens = torch.randint(0, 257, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dense(tokens, tokens.roll(-1, 1)), moe(tokens, tokens.roll(-1, 1))
    assert b.moe and b.aux_loss > 0  # the MoE blocks really ran
    for name, t in moe.state_dict().items():
        if name.endswith("expert_bias"):
            assert t.eq(0).all(), name  # balancing starts from the learned scores alone
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=1e-5)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)


def test_router_rows_are_small_and_shared_within_a_copy():
    _, moe = _upcycled(_dense(), n_experts=8, expert_ffn_dim=32, top_k=4)  # 4 slices x 2 copies
    w = moe.layers["0"].mlp.router.weight
    assert torch.equal(w[0], w[3]) and torch.equal(w[4], w[7]) and not torch.equal(w[0], w[4])
    assert 0 < w.std() < 0.02 / 64 ** 0.5 * 1.5
    _, other_seed = _upcycled(_dense(), seed=1, n_experts=8, expert_ffn_dim=32, top_k=4)
    assert not torch.equal(other_seed.layers["0"].mlp.router.weight, w)


def test_training_the_upcycled_model_breaks_the_symmetry():
    """Slices of a copy get different router gradients (they compute different parts)."""
    _, moe = _upcycled(_dense(), n_experts=8, expert_ffn_dim=64)
    moe.train()
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    moe(tokens, tokens.roll(-1, 1)).loss.backward()
    g = moe.layers["1"].mlp.router.weight.grad
    assert not torch.allclose(g[0], g[1]) and g.abs().max() > 0


@pytest.mark.parametrize("dense_kw, moe_kw, match", [
    (dict(), dict(expert_ffn_dim=96),
     r"model\.expert_ffn_dim \(96\) must divide the dense MLP width \(128\)"),
    (dict(), dict(n_experts=6, expert_ffn_dim=32, top_k=4),
     r"with 4 slices per dense MLP, model\.n_experts \(6\)"),
    (dict(), dict(shared_expert_ffn_dim=64), r"set model\.shared_expert_ffn_dim=0"),
    (dict(), dict(norm_topk_prob=False), r"must sum to 1: set model\.norm_topk_prob=true"),
    (dict(), dict(n_heads=8),
     r"model\.n_heads is 8 here but 4 in the dense checkpoint: set model\.n_heads=4"),
    (dict(bias=True), dict(bias=True), r"the dense MLP has biases"),
    (dict(), dict(n_experts=8, top_k=4, expert_ffn_dim=32, n_group=4, topk_group=2),
     r"whole copies of 4 slices"),
])
def test_what_cannot_be_exact_is_refused(dense_kw, moe_kw, match):
    dense = _dense(**dense_kw)
    with pytest.raises(ValueError, match=match) as err:
        check_upcycle(dense, get_preset("tiny-moe", **{**MOE, **moe_kw}))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="turns a dense checkpoint into an MoE model"):
        check_upcycle(get_preset("tiny-moe", **MOE), get_preset("tiny-moe", **MOE))


# ---------------------------------------------------------------- through the trainer
def _corpus(tmp_path) -> str:
    """Byte tokens of real text (a standard-library source file): patterns a tiny model learns."""
    import json.decoder

    import numpy as np

    from train.data import write_token_file

    text = open(json.decoder.__file__, "rb").read() * 4
    prefix = str(tmp_path / "text")
    write_token_file(prefix, [np.frombuffer(text, dtype=np.uint8).astype(np.int64)], vocab_size=257)
    return prefix


SHRUNK = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
          "model.ffn_dim=128"]
TO_MOE = ["model.preset=tiny-moe", *SHRUNK, "model.n_experts=8", "model.expert_ffn_dim=64",
          "model.top_k=2"]


def _trainer(tmp_path, data, run, *overrides):
    from tests.test_trainer import make_cfg, make_trainer

    common = ["training.eval_steps=2", "optimizer.lr=3.0e-3", "schedule.warmup_steps=2"]
    return make_trainer(make_cfg(tmp_path, data, *common, *overrides, run=run,
                                 model=["model.preset=tiny", *SHRUNK]))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense model trained 20 steps and saved; its validation loss."""
    from train.checkpoint import list_checkpoints

    tmp = tmp_path_factory.mktemp("dense")
    data = _corpus(tmp)
    t = _trainer(tmp, data, "dense", "training.max_steps=20")
    t.train()
    return tmp, data, list_checkpoints(tmp / "dense" / "checkpoints")[-1], t.evaluate()["loss"]


def test_upcycled_run_starts_at_the_dense_loss_and_keeps_learning(dense_run):
    tmp, data, ckpt, dense_loss = dense_run
    t = _trainer(tmp, data, "up", *TO_MOE, f"checkpoint.init_from={ckpt}",
                 "checkpoint.upcycle=true", "training.max_steps=30",
                 "model.aux_loss_scope=global_batch")
    assert t.evaluate()["loss"] == pytest.approx(dense_loss, rel=1e-5)
    losses = [t.train_step()["lm_loss"] for _ in range(30)]
    assert losses[0] < 4.0  # it starts where the dense model was, far below a fresh model's ~5.6
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, losses
    assert t.evaluate()["loss"] < dense_loss - 0.05


def test_init_from_our_checkpoint_and_its_errors(dense_run):
    tmp, data, ckpt, dense_loss = dense_run
    same = _trainer(tmp, data, "same", f"checkpoint.init_from={ckpt}")  # ours, not upcycled
    assert same.step == 0 and same.evaluate()["loss"] == pytest.approx(dense_loss, rel=1e-6)
    start = f"checkpoint.init_from={ckpt}"
    with pytest.raises(ValueError, match=r"model\.n_experts is 8 here but 0 in that checkpoint: "
                                         r"set model\.n_experts=0 \(or set checkpoint\.upcycle"):
        _trainer(tmp, data, "moe", *TO_MOE, start)
    with pytest.raises(ValueError,
                       match=r"checkpoint\.upcycle: model\.expert_ffn_dim \(96\) must divide"):
        _trainer(tmp, data, "moe", *TO_MOE, "model.expert_ffn_dim=96", start,
                 "checkpoint.upcycle=true")
    with pytest.raises(FileNotFoundError,
                       match=r"neither one of our checkpoints .* nor an HF directory"):
        _trainer(tmp, data, "moe", f"checkpoint.init_from={tmp}")
    with pytest.raises(ValueError, match=r"checkpoint\.upcycle needs checkpoint\.init_from"):
        _trainer(tmp, data, "moe", *TO_MOE, "checkpoint.upcycle=true")


def test_upcycling_an_hf_llama_checkpoint_keeps_its_logits(tmp_path):
    """transformers writes a tiny Llama; upcycled into 4 slices x 2 copies its logits stay HF's."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_hf import randomize, tokens
    from tests.test_trainer import make_cfg, make_trainer

    hf_cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=257,
                         max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = randomize(LlamaForCausalLM(hf_cfg), seed=5)
    hf.save_pretrained(tmp_path / "llama", safe_serialization=True)
    x = tokens(vocab=257)
    with torch.no_grad():
        ref = hf(x).logits
    model = ["model.preset=tiny-moe", *SHRUNK, "model.vocab_size=257", "model.rope_theta=10000.0",
             "model.norm_eps=1e-6", "model.max_seq_len=64", "model.n_experts=8",
             "model.expert_ffn_dim=32", "model.top_k=4"]
    start = [f"checkpoint.init_from={tmp_path / 'llama'}", "checkpoint.upcycle=true"]
    t = make_trainer(make_cfg(tmp_path, _corpus(tmp_path), *start, run="up", model=model))
    with torch.no_grad():
        ours = t.model.eval()(x).logits
    assert (ours - ref).abs().max().item() < 1e-4
    assert isinstance(t.model.layers["0"].mlp.router.weight, torch.nn.Parameter)
