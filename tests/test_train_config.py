"""Spec tests for train/config.py (TrainConfig from YAML + overrides) and the launcher's exit code 2.

Every bad input must raise a ONE-line error (no newline in str(e)) that names the field and the fix;
good overrides are parsed as YAML values and reach the nested dataclasses.
"""

from pathlib import Path

import pytest
import yaml

from launchers import pretrain as pretrain_cli
from train.config import TrainConfig, apply_overrides, check_world, load_config, parse_override, save_config

TINY = ["model.preset=tiny-moe", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
        "model.expert_ffn_dim=32", "model.ffn_dim=128", "model.n_experts=4", "data.seq_len=32",
        "training.precision=fp32", "training.device=cpu"]


def _error(exc_type, overrides=(), path=None) -> str:
    """Load a config that must fail; return the message after checking it is one line."""
    with pytest.raises(exc_type) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert msg and "\n" not in msg, f"error is not one line: {msg!r}"
    return msg


# ------------------------------------------------------------------------------ errors
def test_unknown_key_suggests_the_close_match():
    msg = _error(ValueError, ["training.max_step=5"])
    assert "training.max_step" in msg and "did you mean" in msg and "training.max_steps" in msg
    msg = _error(ValueError, ["trainig.max_steps=5"])  # misspelt section
    assert "trainig" in msg and "training" in msg.split("did you mean")[1]
    msg = _error(ValueError, ["model.n_layer=2"])  # model fields go through ModelConfig
    assert "did you mean model.n_layers" in msg


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    msg = _error(ValueError, ["checkpoint.zzzzzz=1"])
    assert "checkpoint.zzzzzz" in msg and "keep_last" in msg and "interval" in msg


@pytest.mark.parametrize("override, field, got", [
    ("training.max_steps=abc", "training.max_steps", "'abc'"),
    ("training.max_steps=1.5", "training.max_steps", "1.5"),   # float is not an int
    ("training.seed=true", "training.seed", "True"),           # bool is not an int either
    ("optimizer.lr=[1, 2]", "optimizer.lr", "[1, 2]"),
    ("logging.tensorboard=3", "logging.tensorboard", "3"),
])
def test_wrong_type_names_field_type_and_value(override, field, got):
    msg = _error(ValueError, [override])
    assert field in msg and "must be" in msg and got in msg


def test_a_section_given_a_scalar_is_rejected():
    msg = _error(ValueError, ["training=5"])
    assert "training" in msg and "mapping" in msg


@pytest.mark.parametrize("override, needle", [
    ("training.max_steps", "key.sub=value"),
    ("=5", "empty key part"),
    ("training..max_steps=5", "empty key part"),
    ("training.max_steps=[1", "not valid YAML"),
])
def test_bad_override_syntax(override, needle):
    msg = _error(ValueError, [override])
    assert needle in msg and repr(override) in msg


def test_missing_config_file(tmp_path):
    msg = _error(FileNotFoundError, path=tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


@pytest.mark.parametrize("text, needle", [
    ("training: {max_steps: 3\nmodel: [\n", "not valid YAML: line 2, column 6: expected ',' or '}'"),
    ("- just\n- a list\n", "mapping"),
    ("# only a comment\n", "is empty"),
    ("training:\n  max_steps: 3\n  seed: 1\n  max_steps: 30\n",
     "line 4, column 3: duplicate key 'max_steps' (first at line 2)"),
    ("training: {max_steps: 3}\nmodel: {preset: tiny}\ntraining: {seed: 2}\n",
     "line 3, column 1: duplicate key 'training' (first at line 1)"),
])
def test_bad_yaml_files_name_line_and_column(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert needle in _error(ValueError, path=path)


def test_global_batch_not_divisible_by_micro_batch():
    msg = _error(ValueError, ["training.global_batch_size=10", "training.micro_batch_size=4"])
    assert "training.global_batch_size (10)" in msg and "training.micro_batch_size (4)" in msg


def test_global_batch_not_divisible_over_data_parallel_ranks():
    cfg = load_config(None, TINY + ["training.global_batch_size=8", "training.micro_batch_size=8"])
    assert check_world(cfg, 1) == 1
    with pytest.raises(ValueError, match=r"divisible by dp \(2\)") as info:
        check_world(cfg, 2)  # 8 sequences cannot be 2 ranks x 8
    assert "\n" not in str(info.value)
    cfg = load_config(None, TINY + ["parallel.tp=2"])
    with pytest.raises(ValueError, match=r"must equal the world size \(3\)"):
        check_world(cfg, 3)


def test_unknown_model_preset_suggests_names():
    msg = _error(ValueError, ["model.preset=tiny-mo"])
    assert "'tiny-mo'" in msg and "tiny-moe" in msg


def test_seq_len_longer_than_the_model_context():
    msg = _error(ValueError, ["model.preset=tiny", "model.max_seq_len=64", "data.seq_len=65"])
    assert "data.seq_len (65)" in msg and "model.max_seq_len (64)" in msg
    assert load_config(None, ["model.preset=tiny", "model.max_seq_len=64", "data.seq_len=64"]).data.seq_len == 64


@pytest.mark.parametrize("override, needle", [
    ("training.precision=fp16", "training.precision"),
    ("training.micro_batch_size=0", "training.micro_batch_size (0)"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last (0)"),
    ("data.valid_fraction=1.0", "data.valid_fraction"),
    ("schedule.kind=step", "schedule.kind"),
    ("data.weights=[1, 2]", "data.weights has 2 entries"),
])
def test_cross_field_and_range_rules(override, needle):
    assert needle in _error(ValueError, [override])


# ------------------------------------------------------------------------------ good input
def test_overrides_parse_yaml_values():
    assert parse_override("training.max_steps=7") == (["training", "max_steps"], 7)
    assert parse_override("logging.tensorboard=false") == (["logging", "tensorboard"], False)
    assert parse_override("data.paths=[a, b/c]") == (["data", "paths"], ["a", "b/c"])
    assert parse_override("checkpoint.dir=null") == (["checkpoint", "dir"], None)
    assert parse_override("run_dir='7'") == (["run_dir"], "7")  # quoted: stays a string
    assert parse_override("checkpoint.resume=") == (["checkpoint", "resume"], "")
    assert parse_override("a=b=c") == (["a"], "b=c")  # only the first '=' splits


def test_scientific_floats_without_a_dot_are_floats():
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; a learning rate override must still work."""
    assert parse_override("optimizer.lr=1e-3")[1] == pytest.approx(1e-3)
    assert parse_override("optimizer.lr=-2E+2")[1] == -200.0
    assert parse_override("x=1e")[1] == "1e"
    cfg = load_config(None, ["optimizer.lr=1e-3", "optimizer.min_lr=1e-5"])
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (pytest.approx(1e-3), pytest.approx(1e-5))


def test_nested_overrides_reach_the_dataclasses():
    cfg = load_config(None, TINY + ["training.max_steps=7", "logging.tensorboard=false", "data.paths=[x, y]",
                                    "training.global_batch_size=6", "training.micro_batch_size=3",
                                    "optimizer.lr=0.01", "run_dir=somewhere"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_experts) == (2, 64, 4)
    assert cfg.model.top_k == 2 and cfg.model.norm == "rmsnorm"  # the rest still comes from tiny-moe
    assert cfg.training.max_steps == 7 and cfg.logging.tensorboard is False
    assert cfg.data.paths == ["x", "y"] and cfg.run_dir == "somewhere"
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 0.01
    assert cfg.checkpoint.keep_last == 3  # untouched default


def test_int_is_accepted_where_a_float_is_expected():
    cfg = load_config(None, ["optimizer.lr=1", "optimizer.min_lr=0"])
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 1.0


def test_yaml_file_plus_overrides_and_save_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny-moe, n_layers: 3}\ntraining: {max_steps: 9, seed: 5}\n"
                    "optimizer: {lr: 2e-3}\n")
    cfg = load_config(path, ["training.max_steps=11", "model.d_model=64"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_experts) == (3, 64, 8)
    assert (cfg.training.max_steps, cfg.training.seed, cfg.optimizer.lr) == (11, 5, 2e-3)
    out = tmp_path / "saved.yaml"
    save_config(cfg, out)
    assert yaml.safe_load(out.read_text())["training"]["max_steps"] == 11
    assert load_config(out).to_dict() == cfg.to_dict()  # the saved config rebuilds the same run


def test_override_into_a_value_is_rejected():
    with pytest.raises(ValueError, match="not a section") as info:
        apply_overrides({"run_dir": "x"}, ["run_dir.sub=1"])
    assert "\n" not in str(info.value)


def test_repo_tiny_config_loads():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert cfg.model.n_experts == 8 and cfg.training.global_batch_size % cfg.training.micro_batch_size == 0


# ------------------------------------------------------------------------------ launcher
def test_launcher_config_error_exits_2_with_one_line(tmp_path, capsys):
    code = pretrain_cli.main([str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing.yaml" in err
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny-moe}\n")
    code = pretrain_cli.main([str(path), "training.max_step=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did you mean" in err and err.startswith("error: ")


def test_launcher_takes_overrides_anywhere_and_says_so(tmp_path, capsys):
    args = pretrain_cli.parse_args(["c.yaml", "--resume", "training.max_steps=3", "training.seed=2"])
    assert args.config == "c.yaml" and args.resume
    assert args.overrides == ["training.max_steps=3", "training.seed=2"]
    args = pretrain_cli.parse_args(["--resume", "c.yaml", "training.max_steps=3"])
    assert args.config == "c.yaml" and args.resume and args.overrides == ["training.max_steps=3"]
    with pytest.raises(SystemExit) as info:
        pretrain_cli.parse_args([])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: pretrain.py CONFIG [KEY.SUB=VALUE ...] [--resume]\n")
