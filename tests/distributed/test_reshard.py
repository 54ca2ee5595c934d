"""Checkpoints reshard across layouts: train in layout A, save, resume in layout B, continue exactly.

Oracle: one uninterrupted single-process run of STEPS steps (the reference). A run in layout A stops
at SAVE_AT and checkpoints; a run in layout B resumes from it and trains to STEPS. Exact continuation
means (1) the continued steps' losses equal the reference's (rel 1e-5: layouts only reorder float
sums), and (2) the final checkpoint - weights AND AdamW state (exp_avg, exp_avg_sq, step) - equals
the reference's final one. (2) is what catches lost optimizer state, which the next step's loss
alone barely shows: exp_avg at step 4 keeps 0.9^2 of the step-2 value.

Layouts: dp2 -> 1, 1 -> tp2, pp2 -> 1 and 1 -> pp2 (tied embeddings: the last stage's head is a
replica that is not saved and loads from tok_emb.weight), ZeRO-1 dp2 -> dp2 and back (only owners
save and load AdamW state), bf16 ZeRO-1 dp2 -> bf16 dp2 (float32 main weights saved by their owners,
the bf16 model written from them on load), tp2 x ep2 -> ep4 and folded experts to and from unfolded
ones (world 4, untied head).
The tiny MoE model and data are test_launch.py's. One spawn per world size runs every distributed
job in turn (a spawn costs seconds); single-process runs happen in the test process.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from parallel.context import ParallelContext
from tests.distributed.harness import run_distributed
from train.checkpoint import load_full_model_state, load_full_state, read_meta, rng_state
from train.config import load_config
from train.data import write_token_file
from train.trainer import Trainer

STEPS, SAVE_AT = 4, 2
LOSS_RTOL = 1e-5
# AdamW divides by sqrt(v) + eps: eps = 1e-6 keeps elements with a near-zero second moment from
# turning float summation-order noise into visible update differences (see equiv_workers.py).
ADAM_EPS = 1e-6
BF16 = ("training.precision=bf16",)


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny-MoE YAMLs (tied and untied embeddings) over a 50k-token random byte file."""
    root = tmp_path_factory.mktemp("reshard")
    rng = np.random.default_rng(2)
    write_token_file(root / "rand", [rng.integers(0, 256, 1000) for _ in range(50)], vocab_size=257)
    files = {}
    for kind in ("tied", "untied"):
        cfg = {"model": {"preset": "tiny-moe", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
                         "ffn_dim": 128, "expert_ffn_dim": 32, "n_experts": 4, "tie_embeddings": kind == "tied"},
               "data": {"paths": [str(root / "rand")], "seq_len": 32},
               "schedule": {"warmup_steps": 1, "decay_steps": STEPS},
               "optimizer": {"lr": 1.0e-3, "eps": ADAM_EPS},
               "training": {"precision": "fp32", "device": "cpu", "global_batch_size": 8, "micro_batch_size": 2,
                            "max_steps": STEPS, "eval_interval": 0},
               "checkpoint": {"interval": 0}, "logging": {"tensorboard": False, "interval": 1000}}
        files[kind] = root / f"{kind}.yaml"
        files[kind].write_text(yaml.safe_dump(cfg))
    return files


def _train(config: Path, overrides: list[str], ctx: ParallelContext) -> Trainer:
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, ctx, log=lambda msg: None)
    trainer.train()
    return trainer


def _train_single(config: Path, *overrides: str) -> Trainer:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, list(overrides), ParallelContext.single())
    finally:
        torch.set_num_threads(before)


def _jobs_worker(rank: int, world: int, jobs: list[tuple[str, list[str]]]) -> None:
    """Run each (config, overrides) job in turn on this rank, with the layout its overrides name."""
    for config, overrides in jobs:
        p = load_config(config, overrides).parallel
        ctx = ParallelContext.for_testing(rank, world, tp=p.tp, pp=p.pp, ep=p.ep, dp=p.dp, vpp=p.vpp,
                                          fold_experts=p.fold_experts)
        _train(Path(config), overrides, ctx)


def _save_at(run: Path, *layout: str) -> list[str]:
    return [f"run_dir={run}", f"training.max_steps={SAVE_AT}", *layout]


def _resume(run: Path, ckpt: Path, *layout: str) -> list[str]:
    return [f"run_dir={run}", f"checkpoint.resume={ckpt}", *layout]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def reference(configs, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted single-process runs (tied and untied), checkpointing at SAVE_AT and STEPS."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for kind, config in configs.items():
        runs[kind] = root / kind
        _train_single(config, f"run_dir={runs[kind]}", f"checkpoint.interval={SAVE_AT}")
    runs["tied_bf16"] = root / "tied_bf16"
    _train_single(configs["tied"], f"run_dir={runs['tied_bf16']}", f"checkpoint.interval={SAVE_AT}", *BF16)
    return runs


@pytest.fixture(scope="module")
def world2(configs, reference, tmp_path_factory) -> Path:
    """One 2-rank spawn: dp2, pp2 and ZeRO-1 dp2 save at SAVE_AT; tp2 and pp2 resume the reference's
    checkpoint; dp2 resumes the ZeRO-1 one and ZeRO-1 the dp2 one. The single-process resumes follow
    in the test process."""
    root, tied, ref = tmp_path_factory.mktemp("world2"), str(configs["tied"]), _ckpt(reference["tied"], SAVE_AT)
    jobs = [(tied, _save_at(root / "dp2")),
            (tied, _resume(root / "1_to_tp2", ref, "parallel.tp=2")),
            (tied, _resume(root / "1_to_pp2", ref, "parallel.pp=2")),
            (tied, _save_at(root / "pp2", "parallel.pp=2")),
            (tied, _save_at(root / "zero1", "parallel.zero1=true")),
            (tied, _resume(root / "zero1_to_dp2", _ckpt(root / "zero1", SAVE_AT))),
            (tied, _resume(root / "dp2_to_zero1", _ckpt(root / "dp2", SAVE_AT), "parallel.zero1=true")),
            (tied, _save_at(root / "zero1_bf16", "parallel.zero1=true", *BF16)),
            (tied, _resume(root / "zero1_bf16_to_dp2", _ckpt(root / "zero1_bf16", SAVE_AT), *BF16))]
    run_distributed(_jobs_worker, 2, jobs, timeout=300)
    for source in ("dp2", "pp2"):
        _train_single(configs["tied"], *_resume(root / f"{source}_to_1", _ckpt(root / source, SAVE_AT)))
    return root


# ---------------------------------------------------------------------------------------------- checks
def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "split" not in r}


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Weights and AdamW state, key by key (RNG is per rank and layout-specific: not compared)."""
    keys = sorted(k for k in want if not k.startswith("rng."))
    assert sorted(k for k in got if not k.startswith("rng.")) == keys
    assert any(k.endswith(".exp_avg_sq") for k in keys) and any(k.endswith(".step") for k in keys)
    for key in keys:
        if key.endswith(".step"):
            assert torch.equal(got[key], want[key]), key
        elif key.endswith(".exp_avg_sq"):  # ~g^2: values down to 1e-12
            torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-12, msg=key)
        else:  # weights (atol as the equivalence suite) and exp_avg (~g, down to 1e-6)
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5 if key.startswith("model.")
                                       else 1e-8, msg=key)


def _assert_continues(run: Path, ref: Path, source: Path | None = None) -> None:
    """run resumed at SAVE_AT and continued exactly like the reference; so did its source run."""
    got, want = _losses(run), _losses(ref)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(got)], rel=LOSS_RTOL)
    assert len({want[s] for s in want}) == STEPS  # the steps trained on different batches
    _assert_same_state(load_full_state(_ckpt(run, STEPS)), load_full_state(_ckpt(ref, STEPS)))
    if source is not None:
        first = _losses(source)
        assert [first[s] for s in range(1, SAVE_AT + 1)] == pytest.approx(
            [want[s] for s in range(1, SAVE_AT + 1)], rel=LOSS_RTOL)


@pytest.mark.slow
def test_dp2_resumes_in_one_process(world2, reference):
    _assert_continues(world2 / "dp2_to_1", reference["tied"], world2 / "dp2")
    assert read_meta(_ckpt(world2 / "dp2", SAVE_AT))["layout"]["world_size"] == 2


@pytest.mark.slow
def test_one_process_resumes_under_tp2(world2, reference):
    _assert_continues(world2 / "1_to_tp2", reference["tied"])


@pytest.mark.slow
def test_one_process_resumes_under_pp2_with_tied_head(world2, reference):
    """The last stage's head replica and its AdamW state load from tok_emb.weight's keys."""
    _assert_continues(world2 / "1_to_pp2", reference["tied"])


@pytest.mark.slow
def test_pp2_with_tied_head_resumes_in_one_process(world2, reference):
    """The last stage's head mirrors tok_emb.weight: saved once (by stage 0), loaded by both."""
    saved = load_full_state(_ckpt(world2 / "pp2", SAVE_AT))
    assert "model.tok_emb.weight" in saved and not any(k.startswith(("model.head", "optim.head")) for k in saved)
    _assert_continues(world2 / "pp2_to_1", reference["tied"], world2 / "pp2")


@pytest.mark.slow
def test_zero1_resumes_without_zero1(world2, reference):
    """Owners alone wrote the AdamW state, yet the checkpoint holds all of it: the same keys and
    values as the single-process checkpoint at SAVE_AT."""
    _assert_same_state(load_full_state(_ckpt(world2 / "zero1", SAVE_AT)),
                       load_full_state(_ckpt(reference["tied"], SAVE_AT)))
    _assert_continues(world2 / "zero1_to_dp2", reference["tied"], world2 / "zero1")


@pytest.mark.slow
def test_dp2_resumes_under_zero1(world2, reference):
    """Each rank loads the state of its owned parameters only; the final (owner-written) checkpoint
    is complete and equals the reference's."""
    _assert_continues(world2 / "dp2_to_zero1", reference["tied"])


@pytest.mark.slow
def test_bf16_zero1_saves_float32_main_weights_and_resumes(world2, reference):
    """Under bf16 + ZeRO-1 each float32 main weight lives on its owner only: the owners' pieces make
    a complete float32 checkpoint equal to the one-process bf16 run's, and a bf16 dp2 run resumes
    it exactly (the bf16 model written from the loaded main weights)."""
    saved = load_full_state(_ckpt(world2 / "zero1_bf16", SAVE_AT))
    assert all(t.dtype == torch.float32 for k, t in saved.items() if k.startswith("model."))
    _assert_same_state(saved, load_full_state(_ckpt(reference["tied_bf16"], SAVE_AT)))
    _assert_continues(world2 / "zero1_bf16_to_dp2", reference["tied_bf16"], world2 / "zero1_bf16")


FOLD4 = ("parallel.tp=2", "parallel.ep=4", "parallel.fold_experts=true")  # one expert per rank


@pytest.mark.slow
def test_tp2_ep2_resumes_under_ep4_and_folded_experts(configs, reference, tmp_path):
    """tp2 x ep2 (experts replicated over tp) -> ep4; tp2 x ep2 -> tp2 with the 4 experts folded over
    all 4 ranks; folded -> ep4 unfolded."""
    untied, tp2ep2, fold = str(configs["untied"]), _ckpt(tmp_path / "tp2ep2", SAVE_AT), _ckpt(tmp_path / "fold", SAVE_AT)
    jobs = [(untied, _save_at(tmp_path / "tp2ep2", "parallel.tp=2", "parallel.ep=2")),
            (untied, _resume(tmp_path / "ep4", tp2ep2, "parallel.ep=4")),
            (untied, _resume(tmp_path / "to_fold", tp2ep2, *FOLD4)),
            (untied, _save_at(tmp_path / "fold", *FOLD4)),
            (untied, _resume(tmp_path / "fold_to_ep4", fold, "parallel.ep=4"))]
    run_distributed(_jobs_worker, 4, jobs, timeout=300)
    saved = load_full_state(tp2ep2)
    assert saved["model.layers.0.mlp.experts.w_in"].shape[0] == 4  # the experts were reassembled whole
    assert "model.head.weight" in saved and "optim.head.weight.exp_avg" in saved
    assert read_meta(fold)["layout"]["fold_experts"] == 1
    _assert_same_state(load_full_state(fold), load_full_state(_ckpt(reference["untied"], SAVE_AT)))
    _assert_continues(tmp_path / "ep4", reference["untied"], tmp_path / "tp2ep2")
    _assert_continues(tmp_path / "to_fold", reference["untied"])
    _assert_continues(tmp_path / "fold_to_ep4", reference["untied"], tmp_path / "fold")


# ---------------------------------------------------------------------------------------------- quick
def _quick_trainer(config: Path, run: Path, *overrides: str) -> Trainer:
    cfg = load_config(config, [f"run_dir={run}", "training.max_steps=1", *overrides])
    return Trainer(cfg, ParallelContext.single(), log=lambda msg: None)


def test_full_model_state_is_the_trained_model_and_generate_loads_it(configs, tmp_path):
    from launchers.generate import load_model

    torch.set_num_threads(1)
    trainer = _quick_trainer(configs["untied"], tmp_path / "run")
    trainer.train()
    full = load_full_model_state(_ckpt(tmp_path / "run", 1))
    params = dict(trainer.model.named_parameters())
    assert sorted(full) == sorted(params)
    for name, p in params.items():
        assert torch.equal(full[name], p.detach()), name
    model, cfg = load_model(_ckpt(tmp_path / "run", 1))
    assert cfg["model"]["n_layers"] == 2
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name].detach()), name


def test_rng_is_restored_only_under_the_saved_layout(configs, tmp_path):
    """Same layout: the resumed run draws exactly the saved RNG stream. Saved layout != this one
    (meta.json edited to say dp=2): weights and step still load; the RNG keeps its seeded state."""
    torch.set_num_threads(1)
    trainer = _quick_trainer(configs["untied"], tmp_path / "a")
    torch.manual_seed(999)  # the saved stream differs from the one every Trainer seeds at start
    trainer.train()
    ckpt = _ckpt(tmp_path / "a", 1)
    saved_rng = load_full_state(ckpt, "rng.00000.")["cpu"]
    assert torch.equal(saved_rng, rng_state(torch.device("cpu"))["cpu"])
    torch.manual_seed(123)  # anything but the saved state
    _quick_trainer(configs["untied"], tmp_path / "b", f"checkpoint.resume={ckpt}")
    assert torch.equal(torch.get_rng_state(), saved_rng)

    meta = json.loads((ckpt / "meta.json").read_text())
    meta["layout"].update(world_size=2, dp=2)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    logs = []
    cfg = load_config(configs["untied"], [f"run_dir={tmp_path / 'c'}", f"checkpoint.resume={ckpt}"])
    resumed = Trainer(cfg, ParallelContext.single(), log=logs.append)
    assert resumed.step == 1 and not torch.equal(torch.get_rng_state(), saved_rng)
    assert any("resharded from layout" in m and "RNG state not restored" in m for m in logs), logs
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, dict(trainer.model.named_parameters())[name]), name


def test_other_model_and_unsafe_index_are_one_line_errors(configs, tmp_path):
    torch.set_num_threads(1)
    _quick_trainer(configs["untied"], tmp_path / "a").train()
    ckpt = _ckpt(tmp_path / "a", 1)
    for override, problem in (("model.expert_ffn_dim=64", "has shape"), ("model.n_layers=3", "has no tensor")):
        with pytest.raises(ValueError, match=problem) as info:
            _quick_trainer(configs["untied"], tmp_path / "b", f"checkpoint.resume={ckpt}", override)
        assert "\n" not in str(info.value) and "model config" in str(info.value)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="metadata is corrupt or unsafe .*not allowed") as info:
        load_full_model_state(ckpt)
    assert not marker.exists() and "\n" not in str(info.value)
