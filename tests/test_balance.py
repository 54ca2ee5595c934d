"""Balance-loss scopes and aux-loss-free balancing through the Trainer, on one process.

Oracles: with a global batch of 8 sequences, the micro_batch scope at micro-batch 8 (one micro-batch
per step) IS the global-batch objective, so the global_batch scope at micro-batch 2 must reproduce
its losses, grad norms and weights; the sequence scope must not depend on the micro-batch size; the
expert biases must follow b += rate * sign(mean load - load) of the step loads the trainer reports
(recomputed here in plain Python), reach TensorBoard as histograms beside the per-layer balance
losses, and survive a checkpoint (the resumed run equals the uninterrupted one).
"""
import pytest
import torch

from tests.test_trainer import make_cfg, make_trainer, params, read_jsonl
from tests.test_trainer import tokens  # noqa: F401 (a fixture)

SCOPE = ["model.aux_loss_coef=0.1"]  # large enough that a wrong f shows in the weights
BIAS = ["model.n_experts=8", "model.score_function=sigmoid", "model.expert_bias=true",
        "model.expert_bias_update_rate=0.01", "model.aux_loss_coef=0.0"]


def _run(tmp_path, tokens, run, *overrides, steps=2):
    t = make_trainer(make_cfg(tmp_path, tokens, *overrides, run=run))
    return t, [t.train_step() for _ in range(steps)]


def test_global_scope_equals_the_whole_step_as_one_micro_batch(tmp_path, tokens):
    whole, a = _run(tmp_path, tokens, "whole", *SCOPE, "training.micro_batch_size=8")
    split, b = _run(tmp_path, tokens, "split", *SCOPE, "training.micro_batch_size=2",
                    "model.aux_loss_scope=global_batch")
    assert split.n_micro == 4 and split.count_executor is not None and whole.count_executor is None
    for x, y in zip(a, b):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
    p_whole, p_split = params(whole), params(split)
    for name in p_whole:
        torch.testing.assert_close(p_split[name], p_whole[name], rtol=0, atol=1e-6, msg=name)
    _, c = _run(tmp_path, tokens, "local", *SCOPE, "training.micro_batch_size=2")  # scope matters
    assert abs(c[0]["aux_loss"] - a[0]["aux_loss"]) > 1e-5 * a[0]["aux_loss"]


def test_sequence_scope_does_not_depend_on_micro_batch_size(tmp_path, tokens):
    runs = [_run(tmp_path, tokens, f"s{m}", *SCOPE, f"training.micro_batch_size={m}",
                 "model.aux_loss_scope=sequence")[1] for m in (8, 2)]
    for x, y in zip(*runs):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["aux_loss"] == pytest.approx(x["aux_loss"], rel=1e-5)


def _bias_by_hand(loads: list[list[float]], rate: float) -> list[float]:
    bias = [0.0] * len(loads[0])
    for load in loads:
        mean = sum(load) / len(load)
        bias = [b + rate * ((mean > n) - (mean < n)) for b, n in zip(bias, load)]
    return bias


def test_expert_bias_follows_the_update_rule_and_reaches_tensorboard(tmp_path, tokens):
    """The step loads are read back from the run's own tokens-per-expert histograms."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging = ["logging.tensorboard=true", "logging.histograms=true", "training.max_steps=3"]
    t = make_trainer(make_cfg(tmp_path, tokens, *BIAS, *logging, "model.aux_loss_coef=0.01",
                              "model.aux_loss_scope=sequence", run="bias"))
    t.train()
    records = [r for r in read_jsonl(tmp_path / "bias") if "split" not in r]
    for r in records:
        per_layer = r["moe/layer0/aux_loss"] + r["moe/layer1/aux_loss"]
        assert r["aux_loss"] == pytest.approx(per_layer, rel=1e-6) and r["moe/layer0/aux_loss"] > 0
    ea = EventAccumulator(str(tmp_path / "bias" / "tb"),
                          size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    for layer in (0, 1):
        final = t.model.layers[str(layer)].mlp.router.expert_bias
        hists = ea.Histograms(f"moe/layer{layer}/tokens_per_expert")
        loads = [list(h.histogram_value.bucket) for h in hists]
        assert len(loads) == 3 and all(sum(load) == 8 * 32 * 2 for load in loads)
        assert final.tolist() == pytest.approx(_bias_by_hand(loads, 0.01), abs=1e-7)
        assert final.abs().max() > 0
        scalars = [e.value for e in ea.Scalars(f"moe/layer{layer}/aux_loss")]
        assert scalars == pytest.approx([r[f"moe/layer{layer}/aux_loss"] for r in records])
        hists = ea.Histograms(f"moe/layer{layer}/expert_bias")
        assert [h.step for h in hists] == [1, 2, 3]
        h = hists[-1].histogram_value
        assert h.num == 8 and h.sum == pytest.approx(final.sum().item(), abs=1e-6)
        assert (h.min, h.max) == pytest.approx((final.min().item(), final.max().item()))


def test_resume_restores_expert_biases_exactly(tmp_path, tokens):
    common = [*BIAS, "model.aux_loss_scope=global_batch", "model.aux_loss_coef=0.01",
              "training.max_steps=4", "checkpoint.interval=2"]
    full = make_trainer(make_cfg(tmp_path, tokens, *common, run="a"))
    full.train()
    first = make_trainer(make_cfg(tmp_path, tokens, *common, run="b"))
    for _ in range(2):
        first.train_step()
    first.save()
    again = make_trainer(make_cfg(tmp_path, tokens, *common, "checkpoint.resume=auto", run="b"))
    assert again.step == 2
    saved = first.model.layers["1"].mlp.router.expert_bias
    assert torch.equal(again.model.layers["1"].mlp.router.expert_bias, saved)
    assert saved.abs().max() > 0
    again.train()
    a = [r["loss"] for r in read_jsonl(tmp_path / "a") if "split" not in r]
    b = [r["loss"] for r in read_jsonl(tmp_path / "b") if "split" not in r]
    assert b[-2:] == a[-2:]
    for layer in (0, 1):
        assert torch.equal(again.model.layers[str(layer)].mlp.router.expert_bias,
                           full.model.layers[str(layer)].mlp.router.expert_bias)


def test_prepass_benchmark_runs_both_scopes(capsys):
    from benchmarks import balance_prepass

    result = balance_prepass.main(["--smoke"])
    prepass = {scope: r["prepass"] for scope, r in result.items()}
    assert prepass == {"micro_batch": False, "global_batch": True}
    assert all(r["wall_ms"] > 0 and r["cpu_ms"] > 0 for r in result.values())
    assert "global_batch / micro_batch: wall" in capsys.readouterr().out
