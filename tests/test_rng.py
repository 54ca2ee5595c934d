"""parallel/rng.py in one process: which coordinates enter which stream, masks as a pure function of
(seed, coordinates, step, call, site), inverted-dropout statistics, a generator fork that leaves no
trace, and the properties the trainer relies on: activation recompute and resume reproduce the
masks. The multi-process checks on the model's own sites are tests/distributed/test_dropout.py."""
import itertools
from types import SimpleNamespace

import pytest
import torch

from moe.config import get_preset
from moe.model import build_model
from parallel.rng import REPLICATED, TP_LOCAL, ParallelRNG


def _rng(pp: int = 0, dp: int = 0, tp: int = 0, seed: int = 0) -> ParallelRNG:
    return ParallelRNG(seed, SimpleNamespace(pp_rank=pp, dp_rank=dp, tp_rank=tp))


def test_stream_bases_follow_the_coordinates():
    """replicated: equal over tp ranks, different over pp and dp; tp_local: different everywhere."""
    grid = {c: _rng(*c) for c in itertools.product(range(2), range(3), range(2))}
    for (a, ra), (b, rb) in itertools.combinations(grid.items(), 2):
        same_replica = a[:2] == b[:2]  # (pp, dp) equal: tp ranks of one replica group
        assert (ra.bases[REPLICATED] == rb.bases[REPLICATED]) == same_replica, (a, b)
        assert ra.bases[TP_LOCAL] != rb.bases[TP_LOCAL], (a, b)
    assert _rng(seed=1).bases != _rng(seed=2).bases


def test_masks_are_a_function_of_step_call_and_site():
    x = torch.ones(4096)
    a, b = _rng(), _rng()
    a.start_step(3)
    b.start_step(3)
    ka, kb = a.next_key(), b.next_key()
    assert torch.equal(ka.dropout(x, 0.5, REPLICATED, "s"), kb.dropout(x, 0.5, REPLICATED, "s"))
    masks = [ka.dropout(x, 0.5, REPLICATED, "s"), ka.dropout(x, 0.5, REPLICATED, "t"),
             ka.dropout(x, 0.5, TP_LOCAL, "s"), a.next_key().dropout(x, 0.5, REPLICATED, "s")]
    a.start_step(4)
    masks.append(a.next_key().dropout(x, 0.5, REPLICATED, "s"))
    for m, n in itertools.combinations(masks, 2):  # site, stream, call and step all change the mask
        assert 0.4 < (m == n).float().mean() < 0.6


def test_inverted_dropout_statistics():
    """Keep rate 1 - p and E[out] = x, within 5 standard errors over 10^6 elements."""
    key, p, n = _rng().next_key(), 0.3, 1_000_000
    x = torch.full((n,), 2.0)
    out = key.dropout(x, p, TP_LOCAL, "s")
    kept = (out != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert out.unique().tolist() == [0.0, pytest.approx(2.0 / (1 - p))]
    assert abs(out.mean().item() - 2.0) < 5 * 2.0 * (p / (1 - p) / n) ** 0.5
    assert key.dropout(x, 0.0, TP_LOCAL, "s") is x


def test_fork_seeds_the_default_generator_and_restores_it():
    key = _rng().next_key()
    torch.manual_seed(0)
    with key.fork(TP_LOCAL, "s", torch.device("cpu")):
        inside = torch.rand(8)
    after = torch.rand(8)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(8))  # the fork left no trace
    torch.manual_seed(123)
    with key.fork(TP_LOCAL, "s", torch.device("cpu")):
        assert torch.equal(torch.rand(8), inside)  # and depends on the key only
    with pytest.raises(ValueError, match="dropout stream 'shared' is not one of"):
        key.seed("shared", "s")


@pytest.mark.parametrize("recompute", ["full", "selective"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_activation_checkpointing_with_dropout_gives_the_same_gradients(preset, recompute):
    """A recomputed block must draw the masks of its first forward (residual and attention)."""
    cfg = get_preset(preset, n_layers=2, dropout=0.2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for ckpt in (False, True):
        model = build_model(cfg, seed=3).train()
        model.activation_checkpointing, model.recompute = ckpt, recompute
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    assert loss0 == loss1
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_dropout_is_live_in_training_and_off_in_eval():
    cfg = get_preset("tiny", n_layers=2, dropout=0.2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    model = build_model(cfg, seed=0)
    train = [model.train()(tokens).logits for _ in range(2)]
    evals = [model.eval()(tokens).logits for _ in range(2)]
    assert not torch.equal(train[0], train[1]) and torch.equal(evals[0], evals[1])
    assert model.rng.calls == {model.rng_chunk: 2}  # one key per training forward, none in eval
    plain = build_model(get_preset("tiny", n_layers=2), seed=0).train()
    torch.testing.assert_close(plain(tokens).logits, evals[0], rtol=0, atol=0)  # p = 0: untouched


def test_block_without_a_key_refuses_to_drop_silently():
    model = build_model(get_preset("tiny", n_layers=1, dropout=0.1), seed=0).train()
    x = torch.randn(1, 4, model.cfg.d_model)
    attention = r"attention dropout at layers\.0\.attn\.probs needs a DropoutKey"
    with pytest.raises(ValueError, match=attention):
        model.layers["0"](x, model._rope(x), 1.0)
    with pytest.raises(ValueError, match=r"^dropout at layers\.0\.mlp_out needs a DropoutKey"):
        model.layers["0"].drop(x, None, "layers.0.mlp_out")
