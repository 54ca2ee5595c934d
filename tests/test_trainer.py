"""Spec tests for the training runtime: train/trainer.py, train/checkpoint.py, train/metrics.py and
the pretrain launcher's SIGTERM path.

Everything runs a ~80k-parameter model (2 blocks, d_model 64, 4 experts) on a 50k-token random byte
file, in float32 on CPU with one thread, so each step takes ~0.1 s. Oracles are independent runs:
one big batch vs accumulated micro-batches, an uninterrupted run vs a resumed one, the metrics
written to disk vs the values the trainer returned.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import train.checkpoint as ckpt_mod
from parallel.context import ParallelContext
from train.checkpoint import STEP_DIR, choose_checkpoint, list_checkpoints, load_full_state, read_meta, save_checkpoint
from train.config import load_config
from train.data import write_token_file
from train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SHRINK = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128"]
MOE = ["model.preset=tiny-moe", *SHRINK, "model.expert_ffn_dim=32", "model.n_experts=4"]
DENSE = ["model.preset=tiny", *SHRINK]



@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    """A 50k-token byte-level file (50 random docs of 1000 ids in 0..255): the prefix."""
    prefix = str(tmp_path_factory.mktemp("data") / "rand")
    rng = np.random.default_rng(0)
    write_token_file(prefix, [rng.integers(0, 256, 1000) for _ in range(50)], vocab_size=257)
    return prefix


def make_cfg(tmp_path: Path, tokens: str, *overrides: str, run: str = "run", model=MOE):
    base = [*model, f"data.paths=[{tokens}]", "data.seq_len=32", "training.precision=fp32", "training.device=cpu",
            "training.global_batch_size=8", "training.micro_batch_size=2", "training.max_steps=4",
            "training.eval_interval=0", "logging.tensorboard=false", "logging.interval=1000",
            "checkpoint.interval=0", f"run_dir={tmp_path / run}"]
    return load_config(None, base + list(overrides))


def make_trainer(cfg) -> Trainer:
    return Trainer(cfg, ParallelContext.single(), log=lambda msg: None)


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir) if "split" not in r}


# ------------------------------------------------------------------------------ gradient accumulation
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_grad_accumulation_equals_one_big_batch(tmp_path, tokens, model):
    """4 micro-batches of 2, each loss scaled by 1/4, give the gradient of the mean loss over all 8
    sequences: the same losses and updated weights as one micro-batch of 8.
    For MoE the aux and z losses are computed per micro-batch (the load fractions f_e and mean
    probabilities P_e of 2 sequences differ from those of 8, and the mean of products is not the
    product of means), so the two objectives differ by design; with both coefficients 0 the
    routing is the same per token and only the LM loss remains, which must match."""
    extra = DENSE if model == "dense" else [*MOE, "model.aux_loss_coef=0", "model.z_loss_coef=0"]
    runs = []
    for micro in (2, 8):
        t = make_trainer(make_cfg(tmp_path, tokens, f"training.micro_batch_size={micro}", run=f"m{micro}",
                                  model=extra))
        assert t.n_micro == 8 // micro
        before = params(t)
        losses = [t.train_step() for _ in range(2)]
        runs.append((losses, params(t)))
    (small, p_small), (big, p_big) = runs
    for a, b in zip(small, big):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert small[0]["loss"] != small[1]["loss"]  # two different batches were drawn
    moved = 0
    for name in p_big:
        torch.testing.assert_close(p_small[name], p_big[name], rtol=0, atol=1e-6, msg=name)
        moved += int(not torch.equal(p_big[name], before[name]))
    assert moved > len(p_big) // 2  # the steps really updated the weights


def test_accumulated_gradient_includes_aux_losses_scaled_per_micro_batch(tmp_path, tokens):
    """forward_backward's gradient = (1/n) sum_i grad(lm_i + aux_i + z_i) over the n micro-batches.
    Reference: a second trainer (same seed, same data) backpropagates each micro-batch unscaled
    (aux_grad_scale 1) and divides the summed gradients by n afterwards. Large aux/z coefficients
    make a wrong aux-gradient scale visible in the router weights."""
    over = ["model.aux_loss_coef=1.0", "model.z_loss_coef=0.1"]
    t = make_trainer(make_cfg(tmp_path, tokens, *over, run="t"))
    ref = make_trainer(make_cfg(tmp_path, tokens, *over, run="r"))
    stats = t.forward_backward()
    batch = ref.train_data.next_batch()
    lm, aux = [], []
    for mb in batch.split(2):  # [2, seq_len + 1]
        out = ref.model(mb[:, :-1], mb[:, 1:])
        out.loss.backward()
        lm.append(out.loss.item())
        aux.append(out.aux_loss.item())
    ref.optimizer.finish()  # the summed float32 gradients (one process: nothing to divide)
    assert stats["lm"].item() == pytest.approx(sum(lm) / 4, rel=1e-6)
    assert stats["aux"].item() == pytest.approx(sum(aux) / 4, rel=1e-6)
    ref_grads = dict(ref.model.named_parameters())
    for name, p in t.model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad / 4, rtol=1e-5, atol=1e-8, msg=name)
    assert "layers.0.mlp.router.weight" in ref_grads  # the aux gradient's target was compared


def test_moe_aux_loss_is_averaged_per_micro_batch(tmp_path, tokens):
    """With aux losses on, loss = lm + aux + z and each term is the mean over micro-batches."""
    t = make_trainer(make_cfg(tmp_path, tokens))
    s = t.train_step()
    assert s["aux_loss"] > 0 and s["z_loss"] > 0
    assert s["loss"] == pytest.approx(s["lm_loss"] + s["aux_loss"] + s["z_loss"], rel=1e-12)
    # balanced routing gives aux ~ coef * E * sum_e (1/E)(1/E) = coef = 0.01 per MoE layer (2 layers)
    assert 0.015 < s["aux_loss"] < 0.03
    assert sorted(s["loads"]) == [0, 1] and all(int(v.sum()) == 8 * 32 * 2 for v in s["loads"].values())


# ------------------------------------------------------------------------------ resume
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tokens):
    common = ["training.max_steps=6", "schedule.warmup_steps=2", "schedule.decay_steps=6", "checkpoint.interval=3"]
    make_trainer(make_cfg(tmp_path, tokens, *common, run="a")).train()
    make_trainer(make_cfg(tmp_path, tokens, *common, "training.max_steps=3", run="b")).train()
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000003"]
    resumed = make_trainer(make_cfg(tmp_path, tokens, *common, "checkpoint.resume=auto", run="b"))
    assert resumed.step == 3
    resumed.train()
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]  # bit-exact, not approx
    assert len(set(a.values())) == 6
    final_a = load_full_state(tmp_path / "a" / "checkpoints" / "step_00000006")
    final_b = load_full_state(tmp_path / "b" / "checkpoints" / "step_00000006")
    assert sorted(final_a) == sorted(final_b) and "optim.layers.0.mlp.experts.w_in.exp_avg_sq" in final_a
    for name, value in final_a.items():  # weights, AdamW state and RNG
        assert torch.equal(value, final_b[name]), name


def test_resume_with_dropout_draws_the_uninterrupted_runs_masks(tmp_path, tokens):
    """Dropout masks are a function of (seed, coordinates, step, call): a run resumed at step 2
    draws exactly the masks of the uninterrupted run and reproduces its losses bit for bit."""
    common = ["model.dropout=0.2", "training.max_steps=4", "schedule.decay_steps=4",
              "checkpoint.interval=2"]
    make_trainer(make_cfg(tmp_path, tokens, *common, run="a")).train()
    make_trainer(make_cfg(tmp_path, tokens, *common, "training.max_steps=2", run="b")).train()
    make_trainer(make_cfg(tmp_path, tokens, *common, "checkpoint.resume=auto", run="b")).train()
    no_dropout = make_trainer(make_cfg(tmp_path, tokens, "training.max_steps=1", run="c"))
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]
    assert a[1] != no_dropout.train()["loss"]  # dropout was live


def test_global_batch_routing_count_draws_the_training_passes_dropout(tmp_path, tokens):
    """model.aux_loss_scope=global_batch counts the step's routing in a no-grad pre-pass. With
    dropout on, the training pass must draw the pre-pass's masks, or the counted loads (the f of
    the balance loss) are not the step's: they equal the training pass's own, step after step."""
    t = make_trainer(make_cfg(tmp_path, tokens, "model.dropout=0.2",
                              "model.aux_loss_scope=global_batch"))
    for _ in range(2):
        s = t.train_step()
        assert sorted(t.step_loads) == sorted(s["loads"]) == [0, 1]
        for layer, counted in t.step_loads.items():
            assert torch.equal(counted.long(), s["loads"][layer]), layer


def test_resume_auto_without_checkpoints_starts_from_scratch(tmp_path, tokens):
    t = make_trainer(make_cfg(tmp_path, tokens, "checkpoint.resume=auto"))
    assert t.step == 0
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        make_trainer(make_cfg(tmp_path, tokens, f"checkpoint.resume={tmp_path / 'nothing'}"))


# ------------------------------------------------------------------------------ checkpoints
def _step_dirs_without_meta(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if STEP_DIR.match(p.name) and not (p / "meta.json").is_file()]


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, tokens, monkeypatch):
    real_save, calls = ckpt_mod.dcp.save, []

    def flaky_save(state, *, storage_writer, **kw):
        calls.append(str(storage_writer.path))
        if len(calls) == 2:
            (Path(storage_writer.path) / "__0_0.distcp").write_bytes(b"half")  # a partial file, then the "crash"
            raise OSError("simulated crash: disk full")
        return real_save(state, storage_writer=storage_writer, **kw)

    monkeypatch.setattr(ckpt_mod.dcp, "save", flaky_save)
    with pytest.raises(OSError, match="simulated crash"):
        make_trainer(make_cfg(tmp_path, tokens, "checkpoint.interval=2")).train()
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    root = tmp_path / "run" / "checkpoints"
    assert len(calls) == 2 and "step_00000004.tmp" in calls[1]
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    assert (root / "step_00000004.tmp").is_dir() and not (root / "step_00000004").exists()
    assert _step_dirs_without_meta(root) == []
    shard, meta = load_full_state(root / "step_00000002"), read_meta(root / "step_00000002")
    assert meta["step"] == 2 and "model.layers.0.attn.wq.weight" in shard
    assert choose_checkpoint("auto", root).path == root / "step_00000002"

    # resume picks step 2; a later save (at another step) removes the stale step_4 temp dir
    t = make_trainer(make_cfg(tmp_path, tokens, "checkpoint.resume=auto", "training.max_steps=3"))
    assert t.step == 2
    t.train()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert not list(root.glob("*.tmp")), "stale temp dir survived a later save"


def test_keep_last_prunes_oldest(tmp_path):
    ctx, root = ParallelContext.single(), tmp_path / "ck"
    for step in (1, 2, 3, 4, 5):
        path = save_checkpoint(root, step, ctx, {"w": torch.full((2,), float(step))}, {"note": "x"}, keep_last=2)
        assert path == root / f"step_{step:08d}"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    shard, meta = load_full_state(root / "step_00000005"), read_meta(root / "step_00000005")
    assert torch.equal(shard["w"], torch.full((2,), 5.0)) and meta["note"] == "x" and meta["step"] == 5
    assert meta["layout"] == {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "ep": 1, "fold_experts": 0}


def test_keep_last_in_a_training_run(tmp_path, tokens):
    make_trainer(make_cfg(tmp_path, tokens, "checkpoint.interval=1", "checkpoint.keep_last=2")).train()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard_is_a_clear_error(tmp_path, damage):
    ctx, root = ParallelContext.single(), tmp_path / "ck"
    path = save_checkpoint(root, 1, ctx, {"w": torch.randn(64, 64)}, {}, keep_last=1)
    (shard,) = path.glob("*.distcp")  # DCP's data file; .metadata indexes it
    if damage == "garbage":
        shard.write_bytes(b"this is not a torch file" * 10)
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"step_00000001: __0_0.distcp has \d+ bytes but \d+ were written") as info:
        load_full_state(path)
    assert "\n" not in str(info.value) and "earlier checkpoint" in str(info.value)


def _as_unverified(path: Path) -> None:
    """Rewrite meta.json as a checkpoint saved before checksums were recorded."""
    meta = read_meta(path)
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))


def test_missing_files_and_bad_meta_are_clear_errors(tmp_path):
    ctx, root = ParallelContext.single(), tmp_path / "ck"
    path = save_checkpoint(root, 1, ctx, {"w": torch.zeros(2)}, {}, keep_last=1)
    (data,) = path.glob("*.distcp")
    data.unlink()
    with pytest.raises(ValueError, match="step_00000001: __0_0.distcp is missing; resume from an earlier") as info:
        load_full_state(path)
    assert "\n" not in str(info.value)
    _as_unverified(path)  # without checksums, DCP's own reading still fails with one line
    with pytest.raises(ValueError, match="is corrupt or incomplete .*FileNotFoundError") as info:
        load_full_state(path)
    assert "\n" not in str(info.value)
    (path / ".metadata").unlink()
    with pytest.raises(FileNotFoundError, match="no DCP index"):
        load_full_state(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is unreadable"):
        read_meta(path)


# ------------------------------------------------------------------------------ metrics
def test_metrics_jsonl_and_tensorboard(tmp_path, tokens):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, tokens, "logging.tensorboard=true", "logging.histograms=true",
                   "training.eval_interval=2", "training.eval_steps=2", "schedule.warmup_steps=2")
    t = make_trainer(cfg)
    last = t.train()
    run = tmp_path / "run"
    records = read_jsonl(run)
    train = [r for r in records if "split" not in r]
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in valid] == [2, 4]
    keys = {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "memory_gb",
            "mfu", "moe/layer0/load_max", "moe/layer0/load_min", "moe/layer1/load_max", "moe/layer1/load_min"}
    for r in train:
        assert keys <= set(r), keys - set(r)
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"] + r["z_loss"], rel=1e-9)
        assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0 and r["grad_norm"] > 0
    # lr of 0-based step i: warmup 3e-4 * (i + 1) / 2 for i < 2, then cosine from 3e-4 to 3e-5 over steps 2..4
    cosine = [3e-5 + 0.5 * 2.7e-4 * (1 + math.cos(math.pi * (i - 2) / 2)) for i in (2, 3)]
    assert [r["lr"] for r in train] == pytest.approx([1.5e-4, 3e-4, *cosine])
    assert train[-1]["loss"] == last["loss"]
    for r in valid:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9) and 4.0 < r["loss"] < 7.0

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.step for e in ea.Scalars("valid/perplexity")] == [2, 4]
    for layer in (0, 1):
        load_max = ea.Scalars(f"moe/layer{layer}/load_max")
        assert [e.value for e in load_max] == pytest.approx([r[f"moe/layer{layer}/load_max"] for r in train])
        assert f"moe/layer{layer}/tokens_per_expert" in tags["histograms"]
        hists = ea.Histograms(f"moe/layer{layer}/tokens_per_expert")
        assert [h.step for h in hists] == [1, 2, 3, 4]
        counts = np.asarray(hists[-1].histogram_value.bucket)
        assert counts.shape == (4,) and counts.sum() == 8 * 32 * 2  # every token routed to top-2 of 4
        assert counts.max() / counts.mean() == pytest.approx(train[-1][f"moe/layer{layer}/load_max"])
    for tag in ("train/lm_loss", "train/aux_loss", "train/z_loss", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "train/memory_gb"):
        assert tag in tags["scalars"], tag


def _route_recorder(trainer: Trainer) -> tuple[dict, dict]:
    """Forward hooks on every MoE layer: each call's routed expert ids and dropped fraction."""
    routed, dropped = {}, {}

    def record(layer: int):
        def on_router(m, args, out):
            routed.setdefault(layer, []).append(out.experts.detach().clone())  # [T, k]

        def on_layer(m, args, out):
            dropped.setdefault(layer, []).append(float(out[1].dropped_fraction))
        return on_router, on_layer

    for key, block in trainer.model.layers.items():
        on_router, on_layer = record(int(key))
        block.mlp.router.register_forward_hook(on_router)
        block.mlp.register_forward_hook(on_layer)
    return routed, dropped


def test_expert_load_figures_and_pictures_match_the_routers_choices(tmp_path, tokens):
    """Every logged load figure is checked against the experts the routers really chose (forward
    hooks, counted here with bincount): the tokens-per-expert histograms, load_max / load_min /
    load_cv / experts_under_half per layer and step, the per-layer dropped fraction in capacity
    mode, the descriptions TensorBoard shows, and one picture per logging window (2 steps) whose
    every cell has the colour of that expert's share of its layer's tokens over the window."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.expert_load import DESCRIPTIONS

    t = make_trainer(make_cfg(tmp_path, tokens, "logging.tensorboard=true", "logging.interval=2",
                              "model.capacity_factor=1.0", "model.n_experts=8"))
    routed, dropped = _route_recorder(t)
    t.train()
    n_micro, steps, E = t.n_micro, 4, 8
    def per_step(calls: list[torch.Tensor]) -> np.ndarray:  # [steps, E] routed slots per expert
        chosen = [torch.cat(calls[s * n_micro:(s + 1) * n_micro]).flatten().numpy()
                  for s in range(steps)]
        return np.stack([np.bincount(c, minlength=E) for c in chosen])

    counts = {layer: per_step(calls) for layer, calls in routed.items()}
    records = [r for r in read_jsonl(tmp_path / "run") if "split" not in r]
    sizes = {"scalars": 0, "histograms": 0, "images": 0}  # keep every event
    ea = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance=sizes)
    ea.Reload()
    for layer, c in counts.items():
        mean = c.mean(axis=1)
        want = {"load_max": c.max(axis=1) / mean, "load_min": c.min(axis=1) / mean,
                "load_cv": c.std(axis=1) / mean,
                "experts_under_half": (c < mean[:, None] / 2).mean(axis=1),
                "dropped_fraction": np.array(dropped[layer]).reshape(steps, n_micro).mean(axis=1)}
        for name, values in want.items():
            tag = f"moe/layer{layer}/{name}"
            expected = pytest.approx(values.tolist(), rel=1e-6, abs=1e-9)
            assert [r[tag] for r in records] == expected, tag
            assert ea.SummaryMetadata(tag).summary_description == DESCRIPTIONS[name]
        events = ea.Histograms(f"moe/layer{layer}/tokens_per_expert")
        hists = [np.asarray(h.histogram_value.bucket) for h in events]
        assert np.array_equal(np.stack(hists), c)
    assert any(r["moe/layer0/dropped_fraction"] > 0 for r in records)  # capacity 1.0 dropped slots
    _check_pictures(ea.Images("moe/expert_load"), counts, window=2)


def _check_pictures(images: list, counts: dict[int, np.ndarray], window: int) -> None:
    """One picture per window of steps; each cell the colour of the expert's share of its layer's
    routed slots summed over the window (counts: layer -> [steps, E])."""
    from tests.test_expert_load import cell_colors, decode_png
    from train.expert_load import ratio_colors

    n_steps, E = next(iter(counts.values())).shape
    assert [im.step for im in images] == list(range(window, n_steps + 1, window))
    layers = sorted(counts)
    for im in images:
        summed = np.stack([counts[layer][im.step - window:im.step].sum(axis=0) for layer in layers])
        img = decode_png(im.encoded_image_string)
        assert img.shape == (im.height, im.width, 3)
        expected = ratio_colors(summed * E / summed.sum(axis=1, keepdims=True))  # [L, E, 3]
        assert np.array_equal(cell_colors(img, layers, E), expected)


def test_no_tensorboard_when_disabled(tmp_path, tokens):
    make_trainer(make_cfg(tmp_path, tokens, "training.max_steps=1")).train()
    assert not (tmp_path / "run" / "tb").exists() and len(read_jsonl(tmp_path / "run")) == 1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["max_steps"] == 1


# ------------------------------------------------------------------------------ NaN handling
def _nan_loss_on(trainer: Trainer, bad_calls: set[int]) -> list[int]:
    """Make the model's loss NaN on the given forward calls (0-based); NaN reaches the gradients too."""
    calls = [0]

    def hook(module, args, out):
        if calls[0] in bad_calls:
            out.loss = out.loss * float("nan")
        calls[0] += 1
        return out

    trainer.model.register_forward_hook(hook)
    return calls


def test_nan_step_is_skipped_with_a_warning(tmp_path, tokens):
    t = make_trainer(make_cfg(tmp_path, tokens, "training.micro_batch_size=8"))  # one forward per step
    _nan_loss_on(t, {1})
    t.train_step()
    after_good = params(t)
    adam_state = {k: v["exp_avg"].clone() for k, v in zip(range(10**6), t.optimizer.adamw.state.values())}
    with pytest.warns(UserWarning, match=r"step 1: non-finite loss \(nan\).*skipping the update \(1/5\)"):
        s = t.train_step()
    assert math.isnan(s["loss"]) and t.bad_steps == 1 and t.step == 2
    for name, value in params(t).items():
        assert torch.equal(value, after_good[name]), name
    for k, v in zip(range(10**6), t.optimizer.adamw.state.values()):
        assert torch.equal(v["exp_avg"], adam_state[k])
    assert all(p.grad is None for p in t.model.parameters())  # the NaN gradients were dropped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = t.train_step()  # finite again: a normal update, the counter resets
    assert math.isfinite(s["loss"]) and t.bad_steps == 0
    assert any(not torch.equal(v, after_good[k]) for k, v in params(t).items())


def test_nan_step_is_logged_as_null(tmp_path, tokens):
    t = make_trainer(make_cfg(tmp_path, tokens, "training.micro_batch_size=8", "training.max_steps=3"))
    _nan_loss_on(t, {1})
    with pytest.warns(UserWarning, match="non-finite"):
        t.train()
    losses = train_losses(tmp_path / "run")
    assert losses[2] is None and math.isfinite(losses[1]) and math.isfinite(losses[3])


def test_too_many_bad_steps_raise(tmp_path, tokens):
    t = make_trainer(make_cfg(tmp_path, tokens, "training.micro_batch_size=8", "training.max_bad_steps=2",
                              "training.max_steps=10"))
    start = params(t)
    _nan_loss_on(t, set(range(100)))
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(FloatingPointError) as info:
        t.train()
    msg = str(info.value)
    assert "\n" not in msg and "3 consecutive steps" in msg and "max_bad_steps=2" in msg and "lower" in msg
    for name, value in params(t).items():
        assert torch.equal(value, start[name]), name
    assert len(train_losses(tmp_path / "run")) == 2  # steps 1 and 2 logged (null), step 3 raised


# ------------------------------------------------------------------------------ SIGTERM
@pytest.mark.slow
def test_sigterm_stops_with_a_final_checkpoint_and_exit_status_75(tmp_path, tokens):
    run = tmp_path / "run"
    cfg = {"run_dir": str(run),
           "model": {"preset": "tiny-moe", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
                     "ffn_dim": 128, "expert_ffn_dim": 32, "n_experts": 4},
           "data": {"paths": [tokens], "seq_len": 32},
           "training": {"precision": "fp32", "device": "cpu", "global_batch_size": 8, "micro_batch_size": 4,
                        "eval_interval": 0},
           "checkpoint": {"interval": 1000}, "logging": {"tensorboard": False, "interval": 1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "launchers" / "pretrain.py"), str(path),
                             "training.max_steps=100000"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None, f"launcher died early: {proc.communicate()}"
            assert time.monotonic() < deadline, "no metrics after 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, err  # stopped early with a checkpoint: a scheduler requeues, not "finished"
    assert "SIGTERM: stopping at step" in out and "resume with --resume" in out
    last_step = train_losses(run)
    last = max(last_step)
    assert 2 <= last < 100000
    final = list_checkpoints(run / "checkpoints")
    assert [p.name for p in final] == [f"step_{last:08d}"]
    assert json.loads((final[0] / "meta.json").read_text())["step"] == last


def test_each_token_file_is_read_once_at_start(tmp_path, tokens, monkeypatch):
    """Opening a token file checks every id (a full pass over it): the train and valid splits
    share one opening, so a run's start reads each file once."""
    from train import data

    checked = []
    check = data.TokenFile._check_ids
    monkeypatch.setattr(data.TokenFile, "_check_ids",
                        lambda self, *a, **k: (checked.append(self.prefix), check(self, *a, **k)))
    make_trainer(make_cfg(tmp_path, tokens))
    assert checked == [tokens]


def test_a_tokenizer_larger_than_the_model_is_refused_in_one_line(tmp_path, tokens):
    with pytest.raises(ValueError, match=r"tokenizer 'byte' has 257 ids but model\.vocab_size is "
                                         r"200: raise model\.vocab_size"):
        make_trainer(make_cfg(tmp_path, tokens, "model.vocab_size=200"))
