"""TrainConfig: a YAML file plus `key.sub=value` overrides -> nested, validated dataclasses.

Every field is documented where it is defined (docs/configuration.md is the long form). Unknown keys
and wrong types are one-line errors naming the key, with a close-match suggestion; cross-field rules
(batch sizes, schedule lengths) are checked here, before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe.config import ModelConfig, dataclass_from_dict
from moe.model import RECOMPUTE
from parallel.fp8 import RECIPES as FP8_RECIPES


@dataclass
class ParallelConfig:
    tp: int = 1                       # tensor-parallel size (Megatron column/row split); 1 = off
    pp: int = 1                       # pipeline stages
    vpp: int = 1                      # virtual stages per pipeline rank (interleaved 1F1B when > 1)
    ep: int = 1                       # expert-parallel size; must divide dp (tp x dp with fold_experts)
    fold_experts: bool = False        # cut experts over the tp x dp ranks of a stage instead of replicating them over tp (Megatron's Parallel Folding): with tp 2 each GPU holds half as many experts
    dp: int = 0                       # data-parallel size; 0 = world_size / (tp * pp)
    sequence_parallel: bool = False   # shard norms/dropout activations along the sequence across tp
    zero1: bool = False               # shard optimizer state across data-parallel ranks (ZeRO-1)
    pp_schedule: str = "1f1b"         # gpipe | 1f1b | interleaved (used when pp > 1)
    stage_layers: list | None = None  # explicit decoder layers per virtual stage, e.g. [5, 6, 6, 5]
    first_stage_layers: int | None = None  # fix the first stage's layer count, balance the rest
    last_stage_layers: int | None = None   # fix the last stage's layer count, balance the rest
    backend: str = "auto"             # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 600              # collective timeout: a hung collective becomes an error after this


@dataclass
class DataConfig:
    paths: list = field(default_factory=lambda: ["stdlib"])  # token-file prefixes (from launchers/preprocess.py) or "stdlib"
    weights: list | None = None       # blend weights, one per path; None = in proportion to each file's number of seq_len windows (as if the files were concatenated)
    tokenizer: str = "byte"           # byte | path to a HF tokenizer.json (must match the token files)
    seq_len: int = 256                # tokens per training sequence
    valid_fraction: float = 0.02      # last fraction of each file held out for validation
    cache_dir: str = "data_cache"     # where the embedded "stdlib" corpus is tokenised on first use
    stdlib_max_bytes: int = 8_000_000  # how much of the standard library the embedded corpus takes


@dataclass
class OptimizerConfig:
    lr: float = 3e-4                  # peak learning rate
    min_lr: float = 3e-5              # floor of the decay
    weight_decay: float = 0.1         # AdamW decay on >= 2-D weights (not biases / norms)
    beta1: float = 0.9                # AdamW first-moment decay
    beta2: float = 0.95               # AdamW second-moment decay
    eps: float = 1e-8                 # AdamW denominator epsilon
    grad_clip: float = 1.0            # max global gradient norm; 0 = no clipping
    fused: bool | None = None         # fused AdamW kernel; null = when supported


@dataclass
class ScheduleConfig:
    kind: str = "cosine"              # cosine | linear | constant
    warmup_steps: int = 100           # linear warmup length
    decay_steps: int | None = None    # end of the decay; null = training.max_steps


@dataclass
class TrainingConfig:
    max_steps: int = 1000             # optimizer steps
    seed: int = 1234                  # model init and data order
    precision: str = "bf16"           # bf16 (bf16 compute, float32 master weights) | fp32
    fp8: str | bool = "off"           # off | tensorwise | rowwise: float8 GEMMs in the blocks' linears through torchao (pip install torchao), needs precision bf16 and a GPU of compute capability >= 8.9; the LM head, router and experts stay bf16 (YAML reads a bare off as false: same)
    fp8_emulate: bool = False         # with fp8: float32 GEMMs on the float8-rounded operands, on any device (checks float8 numerics without float8 hardware; slow)
    global_batch_size: int = 32       # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8         # sequences per forward/backward on one rank
    activation_checkpointing: bool = False  # recompute each block in backward to save memory
    recompute: str = "full"           # with activation_checkpointing: full (whole blocks) | selective (keep GEMM and attention outputs, recompute the rest)
    compile: bool = False             # torch.compile each block
    eval_interval: int = 200          # steps between validation runs; 0 = never
    eval_steps: int = 10              # validation batches (of global_batch_size sequences, any layout) per run
    max_bad_steps: int = 5            # consecutive non-finite steps (loss or grad norm) skipped, update not applied
    on_bad_steps: str = "stop"        # after more than max_bad_steps in a row: stop (error) | rollback (reload the newest verified checkpoint from before them and skip their batches)
    device: str = "auto"              # auto | cpu | cuda


@dataclass
class CheckpointConfig:
    interval: int = 500               # steps between checkpoints; 0 = only at the end
    keep_last: int = 3                # checkpoints kept (older ones deleted)
    resume: str = "none"              # none | auto (newest checkpoint in run_dir/checkpoints that verifies) | path to a checkpoint
    overwrite: bool = False           # a new run where checkpoints exist moves them to checkpoints/aside/ (never deletes); false = refuse the run
    dir: str | None = None            # null = <run_dir>/checkpoints
    init_from: str | None = None      # weights that start the run (step 0, fresh optimizer), sharded for any layout: an HF directory (safetensors; a family in docs/hf.md) or one of our checkpoints (a step_XXXXXXXX directory, or a run_dir: its newest that verifies)
    upcycle: bool = False             # with init_from: a dense checkpoint becomes this MoE model (each expert a copy or a slice of the dense MLP, router drawn small); the step-0 loss equals the dense model's


@dataclass
class LoggingConfig:
    interval: int = 10                # steps between console lines
    tensorboard: bool = True          # write <run_dir>/tb/
    histograms: bool = True           # per-layer tokens-per-expert histograms in TensorBoard
    expert_load_images: bool = True   # every logging.interval steps, a picture of all MoE layers x experts (share of routed tokens over those steps) in TensorBoard


TASK_KINDS = ("lm", "classify", "sft", "dpo")


@dataclass
class TaskConfig:
    kind: str = "lm"                  # lm (pretraining on data.paths) | classify (GPT-1: text -> label) | sft (prompt/response or messages) | dpo (prompt/chosen/rejected); see docs/post-training.md
    data: str = "stdlib"              # classify/sft/dpo: JSONL of examples; "stdlib" = the embedded dataset of this kind, built under data.cache_dir
    valid_data: str | None = None     # held-out JSONL; null = the last task.valid_fraction of task.data
    valid_fraction: float = 0.1       # share of task.data held out when task.valid_data is null
    labels: list | None = None        # classify: label names, list order = class index; null = the sorted labels of task.data
    lm_coef: float = 0.5              # classify: lambda in L3 = L2 + lambda * L1 (L1 the LM loss on the same text; GPT-1: 0.5); 0 = off
    chat_template: str = "auto"       # sft/dpo: auto (chat_template of a tokenizer_config.json beside data.tokenizer, else builtin) | builtin | none (prompt + response, no template) | path to a tokenizer_config.json or .jinja file
    packing: bool = True              # sft: pack several examples per sequence; attention stays inside each, positions restart
    truncate: bool = True             # cut examples longer than data.seq_len at the end (counted and reported; one left without a response token is dropped and counted); false = an error naming file:line
    beta: float = 0.1                 # dpo: beta, the weight of the implicit KL penalty towards the reference
    reference: str | None = None      # dpo: frozen reference model (HF directory or checkpoint); null = the starting weights


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"     # everything a run writes goes under here
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(c: TrainConfig) -> None:
    t, p = c.training, c.parallel
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "eval_steps"):
        _check(getattr(t, name) >= 1, f"training.{name} ({getattr(t, name)}) must be >= 1")
    _check(t.precision in ("fp32", "bf16"), f"training.precision ({t.precision!r}) must be fp32 or bf16")
    _check(t.device in ("auto", "cpu", "cuda"), f"training.device ({t.device!r}) must be auto, cpu or cuda")
    _check(t.on_bad_steps in ("stop", "rollback"),
           f"training.on_bad_steps ({t.on_bad_steps!r}) must be stop or rollback")
    _check(t.max_bad_steps >= 0, f"training.max_bad_steps ({t.max_bad_steps}) must be >= 0")
    _check_fp8(t)
    _check(t.recompute in RECOMPUTE, f"training.recompute ({t.recompute!r}) must be one of {list(RECOMPUTE)}")
    _check(t.global_batch_size % t.micro_batch_size == 0,
           f"training.global_batch_size ({t.global_batch_size}) must be a multiple of training.micro_batch_size "
           f"({t.micro_batch_size})")
    for name in ("tp", "pp", "vpp", "ep"):
        _check(getattr(p, name) >= 1, f"parallel.{name} ({getattr(p, name)}) must be >= 1")
    _check(p.dp >= 0, f"parallel.dp ({p.dp}) must be >= 0 (0 = derive from the world size)")
    _check(p.pp_schedule in ("gpipe", "1f1b", "interleaved"),
           f"parallel.pp_schedule ({p.pp_schedule!r}) must be gpipe, 1f1b or interleaved")
    _check(p.backend in ("auto", "nccl", "gloo"), f"parallel.backend ({p.backend!r}) must be auto, nccl or gloo")
    _check(c.data.seq_len <= c.model.max_seq_len,
           f"data.seq_len ({c.data.seq_len}) exceeds model.max_seq_len ({c.model.max_seq_len}): lower data.seq_len")
    _check(c.data.weights is None or len(c.data.weights) == len(c.data.paths),
           f"data.weights has {len(c.data.weights or [])} entries but data.paths has {len(c.data.paths)}")
    _check(0.0 < c.data.valid_fraction < 1.0, f"data.valid_fraction ({c.data.valid_fraction}) must be in (0, 1)")
    _check(c.schedule.kind in ("cosine", "linear", "constant"),
           f"schedule.kind ({c.schedule.kind!r}) must be cosine, linear or constant")
    _check(c.checkpoint.keep_last >= 1, f"checkpoint.keep_last ({c.checkpoint.keep_last}) must be >= 1")
    _check(not c.checkpoint.upcycle or c.checkpoint.init_from,
           "checkpoint.upcycle needs checkpoint.init_from: the dense checkpoint (ours or HF) to "
           "upcycle")
    _check(c.logging.interval >= 1, f"logging.interval ({c.logging.interval}) must be >= 1")
    validate_task(c.task)


def validate_task(k: TaskConfig) -> None:
    _check(k.kind in TASK_KINDS, f"task.kind ({k.kind!r}) must be one of {list(TASK_KINDS)}")
    _check(0.0 < k.valid_fraction < 1.0,
           f"task.valid_fraction ({k.valid_fraction}) must be in (0, 1)")
    _check(k.lm_coef >= 0, f"task.lm_coef ({k.lm_coef}) must be >= 0 (0 turns the LM term off)")
    _check(k.beta > 0, f"task.beta ({k.beta}) must be > 0")
    labels = k.labels
    _check(labels is None or (len(labels) >= 2 and len(set(map(str, labels))) == len(labels)),
           f"task.labels ({labels}) must name at least 2 distinct labels, or be null to take them "
           f"from task.data")


def _check_fp8(t: TrainingConfig) -> None:
    """training.fp8: off (a YAML false too), tensorwise or rowwise; float8 GEMMs take bf16
    operands."""
    if t.fp8 is False:
        t.fp8 = "off"
    _check(t.fp8 in ("off", *FP8_RECIPES),
           f"training.fp8 ({t.fp8!r}) must be off, tensorwise or rowwise")
    _check(t.fp8 == "off" or t.precision == "bf16",
           f"training.fp8={t.fp8} needs training.precision=bf16 (got {t.precision}): float8 GEMMs "
           f"take bf16 operands; set training.precision=bf16 or training.fp8=off")


def check_world(c: TrainConfig, world_size: int) -> int:
    """Data-parallel size for this world; checks the batch divides over dp. Returns dp."""
    p = c.parallel
    dp = p.dp or world_size // (p.tp * p.pp)
    _check(p.tp * p.pp * dp == world_size,
           f"parallel.tp ({p.tp}) x parallel.pp ({p.pp}) x parallel.dp ({dp}) = {p.tp * p.pp * dp} "
           f"must equal the world size ({world_size}): change the sizes or the number of processes")
    per_dp = c.training.global_batch_size
    _check(per_dp % (dp * c.training.micro_batch_size) == 0,
           f"training.global_batch_size ({per_dp}) must be divisible by dp ({dp}) x training.micro_batch_size "
           f"({c.training.micro_batch_size})")
    return dp


# ---------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 floats (PyYAML, YAML 1.1, reads `1e-3` without a dot as a string,
    which would make `optimizer.lr=1e-3` a type error) and duplicate keys refused (PyYAML keeps the
    last one silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first[key] + 1}): keep one",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass: no object construction


def _yaml_error(e: yaml.YAMLError) -> str:
    """'line L, column C: problem' from PyYAML's multi-line message (whose first line has no
    position)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 3 -> int, true -> bool, [1,2] -> list)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value (e.g. training.max_steps=100)")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key part")
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = d
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return d


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML (safe_load), apply overrides, build and validate the TrainConfig."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found: pass a YAML file such as configs/tiny.yaml")
        try:
            d = _yaml(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {_yaml_error(e)}") from None
        if d is None:
            raise ValueError(f"config file {p} is empty: give at least one section, e.g. "
                             f"model: {{preset: tiny-moe}}")
        if not isinstance(d, dict):
            raise ValueError(f"config file {p} must hold a mapping of sections, got {type(d).__name__}")
    d = apply_overrides(d, list(overrides))
    return dataclass_from_dict(TrainConfig, d, "")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
