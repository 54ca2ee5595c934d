"""Faults a user meets in the first week, each reproduced and shown fixed (docs/faults.md):
a new run in a run_dir that holds another run's checkpoints (README's own command sequence), random
bytes inside a checkpoint shard, a 2-layer resume of a 4-layer run, random bytes in a token file,
curves drawn twice after a resume, non-finite steps (accurate messages, rollback), generate.py with
an empty prompt. Single process, the ~80k-parameter model of tests/test_trainer.py."""

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from benchmarks import checkpoint_io
from launchers import generate as generate_cli
from launchers import pretrain as pretrain_cli
from parallel.context import ParallelContext
from tests.test_trainer import (MOE, make_cfg, read_jsonl, tokens,  # noqa: F401  (fixture)
                                train_losses)
from train.checkpoint import choose_checkpoint, list_checkpoints, load_full_state, read_meta
from train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = str(REPO / "configs" / "tiny.yaml")


def _trainer(cfg, logs=None) -> Trainer:
    log = logs.append if logs is not None else (lambda msg: None)
    return Trainer(cfg, ParallelContext.single(), log=log)


def _launch(capsys, tokens, run_dir, *args) -> tuple[int, str, str]:  # noqa: F811
    """README's `python launchers/pretrain.py configs/tiny.yaml ...`, in this process, on a shrunk
    model and the test corpus (the real one trains for 2 minutes)."""
    shrink = [*MOE, f"data.paths=[{tokens}]", "data.seq_len=32", "training.global_batch_size=8",
              "training.micro_batch_size=8", "training.eval_interval=0", "training.device=cpu",
              "logging.tensorboard=false", "checkpoint.interval=2", "training.max_steps=4",
              f"run_dir={run_dir}"]
    code = pretrain_cli.main([TINY_YAML, *shrink, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _inodes(root: Path) -> dict[str, int]:
    return {p.name: os.stat(p).st_ino for p in list_checkpoints(root)}


# ------------------------------------------------------------------------------ run directories
def test_readme_command_sequence_never_loses_a_checkpoint(tmp_path, tokens, capsys):  # noqa: F811
    """Quick start, then --resume, then a new run in the same run_dir (README): the new run is
    refused with one line naming the fixes; checkpoint.overwrite=true moves the old run aside."""
    run = tmp_path / "runs" / "tiny"
    ckpts = run / "checkpoints"
    assert _launch(capsys, tokens, run)[0] == 0
    before, rows = _inodes(ckpts), (run / "metrics.jsonl").read_text()
    assert sorted(before) == ["step_00000002", "step_00000004"]
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert read_meta(ckpts / "step_00000004")["run_id"] == run_id

    code, out, _ = _launch(capsys, tokens, run, "--resume")  # already at max_steps: nothing to do
    assert code == 0 and "resumed from" in out and (run / "metrics.jsonl").read_text() == rows

    code, _, err = _launch(capsys, tokens, run, "training.max_steps=6", "training.seed=7")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {ckpts} already holds checkpoints of run {run_id} "
                          f"(step_00000002 .. step_00000004)")
    assert "--resume" in err and "new run_dir" in err and "checkpoint.overwrite=true" in err
    assert _inodes(ckpts) == before  # nothing touched
    assert (run / "metrics.jsonl").read_text() == rows

    code, out, _ = _launch(capsys, tokens, run, "training.max_steps=6", "training.seed=7",
                           "checkpoint.overwrite=true")
    assert code == 0, out
    (moved,) = (ckpts / "aside").iterdir()
    assert {p.name: os.stat(p).st_ino for p in moved.iterdir()} == before  # renamed, not deleted
    (logs,) = (run / "aside").iterdir()
    assert (logs / "metrics.jsonl").read_text() == rows and (logs / "run.json").is_file()
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004", "step_00000006"]
    new_id = json.loads((run / "run.json").read_text())["run_id"]
    assert new_id != run_id and read_meta(ckpts / "step_00000006")["run_id"] == new_id
    assert sorted(train_losses(run)) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------ checkpoints
def _random_bytes_inside(path: Path) -> None:
    """Overwrite 64 bytes in the middle of a file with random bytes: same size, same name."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_random_bytes_in_a_shard_fail_the_checksum_and_auto_resume_takes_the_previous(
        tmp_path, tokens):  # noqa: F811
    common = ["training.micro_batch_size=8", "checkpoint.interval=2", "checkpoint.keep_last=5"]
    _trainer(make_cfg(tmp_path, tokens, *common)).train()
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = train_losses(run)
    shard = ckpts / "step_00000004" / "__0_0.distcp"
    size = shard.stat().st_size
    _random_bytes_inside(shard)
    assert shard.stat().st_size == size

    with pytest.raises(ValueError) as info:  # the damaged checkpoint, named explicitly
        _trainer(make_cfg(tmp_path, tokens, *common, f"checkpoint.resume={shard.parent}"))
    msg = str(info.value)
    assert "\n" not in msg and "corrupt" in msg
    assert "step_00000004: __0_0.distcp fails its checksum" in msg
    with pytest.raises(ValueError, match="__0_0.distcp fails its checksum"):
        load_full_state(ckpts / "step_00000004")  # generate / convert read through the same check

    logs = []
    resumed = _trainer(make_cfg(tmp_path, tokens, *common, "checkpoint.resume=auto"), logs)
    assert resumed.step == 2
    skipped = "warning: skipped checkpoint step_00000004: __0_0.distcp fails its checksum"
    assert any(m.startswith(skipped) for m in logs), logs
    resumed.train()
    assert train_losses(run) == first  # steps 3 and 4 again, bit-exact
    (moved,) = (ckpts / "aside").iterdir()
    assert (moved / "step_00000004" / "__0_0.distcp").read_bytes() != (ckpts / "step_00000004" /
                                                                        "__0_0.distcp").read_bytes()
    # every checkpoint damaged: auto-resume refuses instead of starting over
    for ckpt in list_checkpoints(ckpts):
        _random_bytes_inside(ckpt / "__0_0.distcp")
    with pytest.raises(ValueError, match=r"none of the 2 checkpoints under .* verifies"):
        choose_checkpoint("auto", ckpts)


def test_meta_json_edited_after_the_save_fails_its_checksum(tmp_path, tokens):  # noqa: F811
    _trainer(make_cfg(tmp_path, tokens, "training.max_steps=1",
                      "training.micro_batch_size=8")).train()
    meta_path = tmp_path / "run" / "checkpoints" / "step_00000001" / "meta.json"
    meta_path.write_text(meta_path.read_text().replace('"step": 1', '"step": 7'))
    with pytest.raises(ValueError, match="meta.json fails its checksum"):
        read_meta(meta_path.parent)
    meta = json.loads(meta_path.read_text().replace('"step": 7', '"step": 1'))
    del meta["files"], meta["meta_checksum"]  # as saved before checksums were recorded
    meta_path.write_text(json.dumps(meta))
    logs = []
    resumed = _trainer(make_cfg(tmp_path, tokens, "training.max_steps=1",
                                "training.micro_batch_size=8", "checkpoint.resume=auto"), logs)
    assert resumed.step == 1
    assert f"warning: {meta_path.parent} predates checksums: its files are used unverified" in logs


def test_resume_with_another_model_is_refused_and_training_fields_may_change(
        tmp_path, tokens):  # noqa: F811
    four = ["model.n_layers=4", "training.max_steps=2", "training.micro_batch_size=8"]
    _trainer(make_cfg(tmp_path, tokens, *four)).train()
    run = tmp_path / "run"
    rows, ckpts = (run / "metrics.jsonl").read_text(), _inodes(run / "checkpoints")
    with pytest.raises(ValueError) as info:
        _trainer(make_cfg(tmp_path, tokens, *four, "model.n_layers=2", "model.d_model=32",
                          "checkpoint.resume=auto"))
    msg = str(info.value)
    assert "\n" not in msg and "holds another model" in msg
    assert "model.n_layers is 4 there, 2 here" in msg
    assert "model.d_model is 64 there, 32 here" in msg
    assert (run / "metrics.jsonl").read_text() == rows and _inodes(run / "checkpoints") == ckpts

    logs = []
    t = _trainer(make_cfg(tmp_path, tokens, *four, "checkpoint.resume=auto", "training.max_steps=3",
                          "optimizer.lr=1e-4", "model.aux_loss_coef=0.02"), logs)
    assert t.step == 2
    (line,) = [m for m in logs if m.startswith("resume: settings changed")]
    assert "model.aux_loss_coef 0.01 -> 0.02" in line and "optimizer.lr 0.0003 -> 0.0001" in line
    assert "training.max_steps 2 -> 3" in line and "checkpoint.resume" not in line


# ------------------------------------------------------------------------------ logs after a resume
def test_resume_truncates_metrics_and_tensorboard_purges_the_rest(tmp_path, tokens):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["training.micro_batch_size=8", "checkpoint.interval=2", "logging.tensorboard=true",
              "logging.histograms=false", "training.eval_interval=2", "training.eval_steps=1"]
    _trainer(make_cfg(tmp_path, tokens, *common)).train()
    run = tmp_path / "run"
    first = read_jsonl(run)
    step_2 = run / "checkpoints" / "step_00000002"
    _trainer(make_cfg(tmp_path, tokens, *common, f"checkpoint.resume={step_2}")).train()
    rows = read_jsonl(run)
    assert [(r["step"], r.get("split")) for r in rows] == [
        (1, None), (2, None), (2, "valid"), (3, None), (4, None), (4, "valid")]
    assert [r["loss"] for r in rows] == [r["loss"] for r in first]
    (kept,) = (run / "aside").iterdir()
    assert kept.name.endswith("resumed-at-step-2")
    assert [json.loads(line) for line in (kept / "metrics.jsonl").read_text().splitlines()] == first
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4]  # 3 and 4 once, not twice
    train = [r["loss"] for r in rows if "split" not in r]
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx(train)
    assert [e.step for e in ea.Scalars("valid/loss")] == [2, 4]


def test_resuming_another_directory_s_checkpoint_sets_this_one_s_old_logs_aside(
        tmp_path, tokens):  # noqa: F811
    """A run continued elsewhere (checkpoint.resume=<another run's step>) does not mix its rows into
    the logs an earlier, checkpoint-less run left in this run_dir: those move aside."""
    common = ["training.micro_batch_size=8", "training.max_steps=2"]
    _trainer(make_cfg(tmp_path, tokens, *common, run="a")).train()
    _trainer(make_cfg(tmp_path, tokens, *common, "checkpoint.interval=0", run="b")).train()
    shutil.rmtree(tmp_path / "b" / "checkpoints")  # b: logs without checkpoints (e.g. moved away)
    step_2 = tmp_path / "a" / "checkpoints" / "step_00000002"
    _trainer(make_cfg(tmp_path, tokens, "training.micro_batch_size=8", "training.max_steps=3",
                      f"checkpoint.resume={step_2}", run="b")).train()
    assert [r["step"] for r in read_jsonl(tmp_path / "b")] == [3]
    (moved,) = (tmp_path / "b" / "aside").iterdir()
    assert moved.name.endswith("earlier-run")
    assert [r["step"] for r in read_jsonl(moved)] == [1, 2]
    run_id = json.loads((tmp_path / "a" / "run.json").read_text())["run_id"]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["run_id"] == run_id  # its lineage


def test_a_torn_last_metrics_row_is_dropped_on_resume(tmp_path, tokens):  # noqa: F811
    common = ["training.micro_batch_size=8", "checkpoint.interval=2", "training.max_steps=2"]
    _trainer(make_cfg(tmp_path, tokens, *common)).train()
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"st')  # killed mid-write
    _trainer(make_cfg(tmp_path, tokens, *common, "training.max_steps=3",
                      "checkpoint.resume=auto")).train()
    assert [r["step"] for r in read_jsonl(tmp_path / "run")] == [1, 2, 3]


# ------------------------------------------------------------------------------ data
def test_random_bytes_in_a_token_file_are_one_line(tmp_path, tokens, capsys):  # noqa: F811
    for ext in ("bin", "idx"):
        shutil.copy(f"{tokens}.{ext}", tmp_path / f"bad.{ext}")
    size = (tmp_path / "bad.bin").stat().st_size
    noise = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    (tmp_path / "bad.bin").write_bytes(noise.tobytes())
    with pytest.raises(ValueError) as info:
        _trainer(make_cfg(tmp_path, str(tmp_path / "bad")))
    msg = str(info.value)
    assert "\n" not in msg and "bad.bin: token 0 (document 0) has id" in msg
    assert "outside the vocabulary 0..256" in msg and "preprocess.py" in msg
    code, _, err = _launch(capsys, str(tmp_path / "bad"), tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "bad.bin" in err


# ------------------------------------------------------------------------------ non-finite steps
def _poison(trainer: Trainer, bad_calls: set[int], kind: str) -> None:
    """On the given forward calls (0-based), make the loss NaN or only the gradients infinite."""
    calls = [0]

    def hook(module, args, out):
        if calls[0] in bad_calls:
            if kind == "loss":
                out.loss = out.loss * float("nan")
            else:
                out.loss.register_hook(lambda g: g * float("inf"))
        calls[0] += 1
        return out

    trainer.model.register_forward_hook(hook)


def test_non_finite_messages_name_what_was_non_finite(tmp_path, tokens):  # noqa: F811
    t = _trainer(make_cfg(tmp_path, tokens, "training.micro_batch_size=8",
                          "training.max_bad_steps=1"))
    _poison(t, {0, 1}, "grad")
    with pytest.warns(UserWarning) as record:
        s = t.train_step()
    assert math.isfinite(s["loss"]) and not math.isfinite(s["grad_norm"])
    msg = str(record[0].message)
    assert msg.startswith("step 0: non-finite grad norm (")
    assert f"(finite loss {s['loss']:.4g})" in msg
    assert "non-finite loss" not in msg
    with pytest.raises(FloatingPointError) as info:
        t.train_step()
    assert "non-finite grad norm" in str(info.value) and "non-finite loss" not in str(info.value)
    assert "training.on_bad_steps=rollback" in str(info.value)


def test_rollback_reloads_the_checkpoint_before_the_bad_steps_and_skips_their_batches(
        tmp_path, tokens):  # noqa: F811
    """Steps 5 and 6 (forward calls 4, 5) are NaN with max_bad_steps=1: the run reloads step_4 and
    continues on the batches after the bad ones. Oracle: an independent run resumed from its own
    step_4 that discards two batches gives the same losses for steps 5..8."""
    common = ["training.micro_batch_size=8", "training.max_steps=8", "checkpoint.interval=2",
              "checkpoint.keep_last=10", "training.max_bad_steps=1", "schedule.decay_steps=8"]
    logs = []
    t = _trainer(make_cfg(tmp_path, tokens, *common, "training.on_bad_steps=rollback"), logs)
    _poison(t, {4, 5}, "loss")
    with pytest.warns(UserWarning, match="non-finite loss"):
        t.train()
    run = tmp_path / "run"
    said = ("step_00000004 (step 4); skipping the 2 batches drawn since, the last 2 of them "
            "non-finite")
    assert any(m.startswith("rolled back to") and said in m for m in logs), logs
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    (moved,) = (run / "checkpoints" / "aside").iterdir()  # step_6, saved during the bad run
    assert [p.name for p in moved.iterdir()] == ["step_00000006"]
    (kept,) = (run / "aside").iterdir()
    earlier = (kept / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in earlier][4:] == [None, None]

    _trainer(make_cfg(tmp_path, tokens, *common, "training.max_steps=4", run="ref")).train()
    ref = _trainer(make_cfg(tmp_path, tokens, *common, "checkpoint.resume=auto", run="ref"))
    ref.train_data.next_batch(), ref.train_data.next_batch()  # the two batches the bad steps drew
    ref.train()
    ref_losses = train_losses(tmp_path / "ref")
    assert [losses[s] for s in range(1, 9)] == [ref_losses[s] for s in range(1, 9)]


def test_rollback_without_an_earlier_checkpoint_stops(tmp_path, tokens):  # noqa: F811
    t = _trainer(make_cfg(tmp_path, tokens, "training.micro_batch_size=8",
                          "training.max_bad_steps=0", "training.on_bad_steps=rollback",
                          "checkpoint.interval=0"))
    _poison(t, {0}, "loss")
    with pytest.warns(UserWarning):
        with pytest.raises(FloatingPointError, match="no verified checkpoint precedes them"):
            t.train()


# ------------------------------------------------------------------------------ signals
def test_a_stop_signal_while_the_trainer_is_built_stops_after_one_step_with_75(
        tmp_path, tokens, capsys, monkeypatch):  # noqa: F811
    """Preemption can come while a (requeued) job is still loading: the launcher keeps the signal,
    so the run saves after its first step and exits 75 (requeue), not 143 (killed)."""
    class SignalledWhileBuilt(pretrain_cli.Trainer):
        def __init__(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGUSR1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pretrain_cli, "Trainer", SignalledWhileBuilt)
    code, out, _ = _launch(capsys, tokens, tmp_path / "run")
    assert code == 75 and "SIGUSR1: stopping at step 1 with a final checkpoint" in out
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000001"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


# ------------------------------------------------------------------------------ generate
def test_generate_with_an_empty_prompt_is_one_line(tmp_path, tokens, capsys):  # noqa: F811
    _trainer(make_cfg(tmp_path, tokens, "training.max_steps=1",
                      "training.micro_batch_size=8")).train()
    code = generate_cli.main([str(tmp_path / "run"), "--prompt", "", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--prompt '' gives no tokens" in err
    assert generate_cli.main([str(tmp_path / "run"), "--prompt", "ab",
                              "--max-new-tokens", "2"]) == 0


def test_checkpoint_io_benchmark_prints_its_table(tmp_path, capsys):
    """benchmarks/checkpoint_io.py (the figures in docs/faults.md) in a small smoke run."""
    assert checkpoint_io.main(["--mib", "4", "--tokens-m", "1", "--repeats", "1", "--cache-dir",
                               str(tmp_path), "--stdlib-max-bytes", "200000"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0].strip() for r in rows][:5] == ["checkpoint save (DCP + checksums)",
                                                "of which CRC-32 of its files",
                                                "for comparison: SHA-256 of its files",
                                                "for comparison: BLAKE2b of its files",
                                                "verification before a resume"]
    assert rows[0][1].strip() == "4.0 MiB" and rows[6][1].strip() == "1.9 MiB"  # 1 M uint16 tokens
    save, sums = (float(r[2].split()[0]) for r in rows[:2])
    assert 0 < sums < save
