"""The training loop: micro-batches, mixed precision, gradient reduction, clipping, logging,
validation, checkpoints, non-finite steps (skip, then stop or roll back) and a stop with a final
checkpoint on SIGTERM / SIGUSR1 (preemption; the launcher exits with status 75 to be requeued).

One optimizer step (global batch G sequences, dp data-parallel ranks, micro-batch m):
    n_micro = G / (dp * m);  for each micro-batch: loss_i / n_micro -> backward
    (MoE aux losses get the same 1/n_micro through aux_grad_scale)
    reduce grads (tp partial sums, dp / edp means) -> clip by global norm -> AdamW step
so every layout computes the gradient of the same objective: the mean LM loss over the G sequences
(plus the aux losses averaged over micro-batches), exactly what one process computes. The objective
is a Task (train/tasks/): pretraining's LM loss, or a post-training one (classify, sft, dpo) that
supplies its data, micro-batches, last-stage loss, logged scalars and validation.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from moe.model import Decoder, build_model, enable_float8, load_full_state_dict, param_counts
from moe.stages import (build_stage_chunks, expert_bias_table, merge_stage_stats, plan_stages,
                        pool_loads_over_layers, reduce_loads_over_dp, routing_count_fn,
                        update_expert_biases)
from parallel.context import ParallelContext
from parallel.fp8 import ALIGN, check_float8_device, float8_recipe
from parallel.layout import LayoutTable
from parallel.pipeline import PipelineExecutor

from .checkpoint import (choose_checkpoint, restore_training_state, rng_state, save_checkpoint,
                         step_of, training_state)
from .config import TrainConfig, check_world, save_config
from .data import PretrainData, TokenFile, resolve_data_paths, tokenizer_for
from .init_from import initial_state
from .metrics import MetricsLogger, Throughput, format_eta, model_flops_per_token, peak_flops
from .optim import LRSchedule, apply_lr, build_parallel_optimizer
from .rundir import RunStart, start_run
from .tasks import make_task

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption (SLURM: #SBATCH --signal=USR1@120)


def pick_device(cfg: TrainConfig, ctx: ParallelContext) -> torch.device:
    if ctx.device.type == "cuda" or cfg.training.device == "cpu":
        return ctx.device
    if cfg.training.device == "cuda" or (cfg.training.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device=cuda but CUDA is not available: use training.device=cpu")
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: ParallelContext, log=print, batches=None):
        """batches: instead of the configured token files, an object whose next_batch() returns
        this data-parallel rank's [global_batch / dp, seq_len + 1] token ids; such a trainer reads
        and writes no files (no metrics, no resume); the planner's simulation runs its steps."""
        self.cfg, self.ctx, self.log_fn = cfg, ctx, log
        self.dp = check_world(cfg, ctx.world_size)
        t = cfg.training
        self.n_micro = t.global_batch_size // (self.dp * t.micro_batch_size)
        self.device = pick_device(cfg, ctx)
        self.fp8 = self._float8_recipe()  # checked before any work
        self.is_logger = ctx.rank == 0
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.in_memory = batches is not None  # pretraining rows (train.simulate checks the task)
        self.run_start = RunStart("in-memory", None, 0, None) if self.in_memory else self._start_run()
        torch.manual_seed(t.seed)
        self.task = make_task(cfg)  # the objective: pretraining's LM, or a post-training task
        self.model = self._build_model()
        if self.in_memory:
            self.train_data = self.valid_data = batches
        else:
            self.train_data, self.valid_data = self.task.build_data(self)
        self.task.attach(self.chunks, t.seed)  # heads (a classifier: one output per label)
        self._build_optimizer()
        self.step = 0
        self.bad_steps = 0
        self.stop_requested = False
        self.stopped_by: str | None = None  # the signal that ended the run before max_steps
        self.last_saved_step = -1
        self.rolled_back_to = -1
        self.logger = self._open_logger(self.run_start.purge_step)
        whole = build_model(cfg.model, device="meta")  # the whole model, any layout: counts only
        _, self.active_params = param_counts(whole)
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len, whole)  # matmuls
        self.peak = peak_flops(self.device)
        self.task.prepare(self)
        if not self.in_memory:
            self._maybe_resume()

    # ------------------------------------------------------------ setup
    def _build_model(self) -> torch.nn.Module:
        """This rank's chunks (one Decoder without pipelining; its virtual stages with pp > 1).
        self.model is that Decoder, or a ModuleList of the chunks."""
        c, p = self.cfg, self.cfg.parallel
        partition = plan_stages(c.model, p.pp, p.vpp, c.data.seq_len, stage_layers=p.stage_layers,
                                first_stage_layers=p.first_stage_layers, last_stage_layers=p.last_stage_layers)
        start = c.checkpoint.init_from  # loads every weight: no random init to throw away
        self.chunks = build_stage_chunks(c.model, self.ctx, partition, seed=c.training.seed,
                                         device=self.device, init=not start)
        if start:
            self._init_from(self.chunks, c.checkpoint.init_from)
        if self.fp8 is not None:
            self._enable_float8()
        for chunk in self.chunks:
            chunk.activation_checkpointing = c.training.activation_checkpointing
            chunk.recompute = c.training.recompute
            if c.training.compile:
                for key in list(chunk.layers):
                    chunk.layers[key] = torch.compile(chunk.layers[key])
        if p.pp > 1:
            self._log(f"pipeline: {p.pp} stages x {p.vpp} virtual, layers per virtual stage "
                      f"{[len(ids) for ids in partition]}, schedule {self._schedule_kind()}")
        return self.chunks[0] if len(self.chunks) == 1 and p.pp == 1 else torch.nn.ModuleList(self.chunks)

    def _float8_recipe(self):
        """training.fp8's torchao recipe (None when off), after checking what float8 GEMMs need:
        the device, torchao, and tokens per micro-batch (the weight gradient's inner GEMM dim)
        a multiple of 16."""
        t = self.cfg.training
        if t.fp8 == "off":
            return None
        check_float8_device(t.fp8, self.device, t.fp8_emulate)
        tokens = t.micro_batch_size * self.cfg.data.seq_len
        if tokens % ALIGN and not t.fp8_emulate:
            raise ValueError(f"training.fp8={t.fp8}: training.micro_batch_size x data.seq_len "
                             f"({tokens} tokens, an inner dim of the weight-gradient GEMM) must "
                             f"be a multiple of {ALIGN}")
        return float8_recipe(t.fp8, t.fp8_emulate)

    def _enable_float8(self) -> None:
        """Give the blocks' linears of every chunk the float8 recipe (before compile) and say so."""
        names = [name for chunk in self.chunks for name in enable_float8(chunk, self.fp8)]
        emulated = ", emulated" if self.fp8.emulate else ""
        self._log(f"float8 ({self.fp8.name}{emulated}): {len(names)} linears of the blocks; the LM "
                  f"head, router and experts stay in {self.cfg.training.precision}")

    def _schedule_kind(self) -> str:
        p = self.cfg.parallel
        if p.pp == 1:
            return "1f1b"  # one stage: F0 B0 F1 B1 ..., one micro-batch's activations alive at a time
        return "interleaved" if p.vpp > 1 else p.pp_schedule

    def _init_from(self, chunks: list[Decoder], path: str) -> None:
        """Start from an HF checkpoint or one of ours (upcycled when checkpoint.upcycle): whole
        tensors are read on every rank and cut to its shards."""
        c = self.cfg
        full = initial_state(path, c.model, c.checkpoint.upcycle, c.training.seed)
        for chunk in chunks:
            load_full_state_dict(chunk, full)
        how = " (upcycled from a dense model)" if c.checkpoint.upcycle else ""
        self._log(f"initialised weights from {path}{how}")

    def _build_data(self) -> tuple[PretrainData, PretrainData]:
        c = self.cfg
        tok = tokenizer_for(c)
        prefixes = self._prepare_corpus(c, tok)
        kw = dict(prefixes=prefixes, weights=c.data.weights, seq_len=c.data.seq_len,
                  seed=c.training.seed, valid_fraction=c.data.valid_fraction,
                  dp_rank=self.ctx.dp_rank, dp_size=self.dp,
                  files=[TokenFile(p) for p in prefixes])  # opened (and checked) once
        train = PretrainData(global_batch_size=c.training.global_batch_size, split="train", **kw)
        valid = PretrainData(global_batch_size=c.training.global_batch_size, split="valid", **kw)  # layout-independent
        if train.vocab_size > c.model.vocab_size:
            raise ValueError(f"token files have vocab_size {train.vocab_size} > model.vocab_size "
                             f"{c.model.vocab_size}: use a matching tokenizer or model")
        return train, valid

    def _prepare_corpus(self, c: TrainConfig, tok) -> list[str]:
        """Resolve data paths; the embedded corpus is built once (a file lock serialises ranks)."""
        return resolve_data_paths(c.data.paths, c.data.cache_dir, tok, max_bytes=c.data.stdlib_max_bytes)

    def _build_optimizer(self) -> None:
        """The layout table of this rank's parameters, then AdamW over float32 main parameters
        (the model held in bf16 under precision=bf16; ZeRO-1 owners per the table), the schedule
        and the pipeline executor."""
        o, c = self.cfg.optimizer, self.cfg
        self.layout = LayoutTable(self.chunks, self.ctx, zero1=c.parallel.zero1 and self.dp > 1)
        model_dtype = torch.bfloat16 if c.training.precision == "bf16" else None
        self.optimizer = build_parallel_optimizer(self.chunks, self.layout, o.lr, o.weight_decay,
                                                  (o.beta1, o.beta2), o.eps, o.fused, model_dtype)
        s = c.schedule
        decay = s.decay_steps if s.decay_steps is not None else c.training.max_steps
        self.schedule = LRSchedule(s.kind, o.lr, min(o.min_lr, o.lr), min(s.warmup_steps, decay), decay)
        self.step_loads: dict[int, torch.Tensor] = {}  # global_batch scope: refilled before each step
        fns = [self.task.chunk_fn(c, 1.0 / self.n_micro, self.step_loads) for c in self.chunks]
        self.executor = self.make_executor(fns, before_backward=self.optimizer.prepare)
        self._build_load_counter()

    def make_executor(self, chunk_fns: list, before_backward=None) -> PipelineExecutor:
        """A PipelineExecutor over this rank's chunks with the run's schedule and activation shape
        [micro_batch x the task's rows per example, seq_len (/tp under sequence parallel), D]."""
        seq = self.cfg.data.seq_len // (self.ctx.tp if self.ctx.sequence_parallel else 1)
        rows = self.cfg.training.micro_batch_size * self.task.rows_per_example
        return PipelineExecutor(chunk_fns, self.ctx, self._schedule_kind(), self.n_micro,
                                act_shape=(rows, seq, self.cfg.model.d_model),
                                act_dtype=self._residual_dtype(), before_backward=before_backward)

    def _build_load_counter(self) -> None:
        """model.aux_loss_scope=global_batch: a second executor over the same chunks that only
        counts routing (routing_count_fn), run before each step by _count_step_loads."""
        self.count_executor, self._counted = None, {}
        if self.cfg.model.n_experts and self.cfg.model.aux_loss_scope == "global_batch":
            self.count_executor = self.make_executor(
                [routing_count_fn(chunk, self._counted) for chunk in self.chunks])

    # ------------------------------------------------------------ one step
    def _residual_dtype(self) -> torch.dtype:
        """What flows between pipeline stages: bf16 under bf16 precision unless model.fp32_residual."""
        bf16 = self.cfg.training.precision == "bf16" and not self.cfg.model.fp32_residual
        return torch.bfloat16 if bf16 else torch.float32

    def _autocast(self):
        if self.cfg.training.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self) -> dict[str, torch.Tensor]:
        """Run the step's micro-batches through this rank's chunks (the pipeline schedule; with
        pp = 1 simply one after another), reduce gradients, and return the step's loss statistics:
        means over micro-batches, summed over pipeline stages (not yet averaged over dp)."""
        batch = self.train_data.next_batch().to(self.device, non_blocking=True)
        mb = self.task.micro_batches(batch, self.cfg.training.micro_batch_size)
        self._start_dropout_step()
        with self._autocast():
            self._count_step_loads(mb.inputs, mb.targets, mb.side)
            self._start_dropout_step()  # the training pass redraws the counting pass's masks
            result = self.executor.step(mb.inputs, mb.targets, mb.side)
        self.optimizer.finish()
        return self._step_stats(result)

    def _start_dropout_step(self) -> None:
        """Dropout masks are a function of (seed, coordinates, step, chunk, forward call): start
        counting this step's forward calls (parallel/rng.py)."""
        for chunk in self.chunks:
            chunk.rng.start_step(self.step)

    def _count_step_loads(self, inputs, targets, side=None) -> None:
        """The global_batch balance loss needs the step's routed slots per expert F before the first
        backward (under 1F1B micro-batch 0's backward precedes micro-batch 1's forward): count them
        in a no-grad forward of every micro-batch through the same pipeline, sum over dp, and refill
        step_loads, which the training chunks read. Exact (the weights and inputs are the same)
        for one extra forward per step: dropout keys restart for the training pass
        (_start_dropout_step) and the RNG is forked, so router jitter draws the same noise."""
        if self.count_executor is None:
            return
        self._counted.clear()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.count_executor.forward_only(self.n_micro, inputs, targets, side)
        self.step_loads.clear()
        self.step_loads.update(reduce_loads_over_dp(self._counted, self.ctx))
        if self.cfg.model.aux_loss_pool_layers:  # one total over every MoE layer (docs/hf.md)
            loads = pool_loads_over_layers(self.step_loads, self.ctx, self.cfg.model.n_experts,
                                           self.device)
            self.step_loads.update(loads)

    def _step_stats(self, result) -> dict[str, torch.Tensor]:
        """lm, aux, z, dropped (mean over micro-batches and MoE layers) and per-layer expert loads,
        gathered over the pipeline stages (each holds only its own layers and only the last the loss)."""
        m = self.cfg.model
        merged = merge_stage_stats(result.infos, m.n_layers, m.n_experts, self.device)
        lm = sum((loss.float() for loss in result.losses), torch.zeros((), device=self.device))
        scalars = torch.stack([lm, merged["aux_loss"], merged["z_loss"], merged["dropped"]])
        task = self.task.step_sums(result.infos, self.device)  # the task's scalars (none for LM)
        capacity = m.capacity_factor is not None  # per-layer dropped shares exist only then
        dropped_layers = merged["dropped_layers"] if capacity else merged["dropped_layers"][:0]
        sums = torch.cat([scalars, merged["aux_layers"], dropped_layers, task])
        loads = merged["loads"]
        if self.ctx.pp > 1:
            dist.all_reduce(sums, group=self.ctx.pp_group)
            dist.all_reduce(loads, group=self.ctx.pp_group)
        moe_layers = list(m.moe_layer_ids)
        sums[3] /= max(len(moe_layers), 1)
        sums /= self.n_micro
        lm, aux, z, dropped = sums[:4].unbind(0)
        drop_at = 4 + m.n_layers  # capacity mode: each layer's dropped share of its routed slots
        return {"lm": lm, "aux": aux, "z": z, "dropped": dropped,
                "loads": {i: loads[i].long() for i in moe_layers},
                "aux_layers": {i: sums[4 + i] for i in moe_layers},
                "dropped_layers": {i: sums[drop_at + i] for i in moe_layers} if capacity else {},
                "task": list(sums[drop_at + len(dropped_layers):].unbind(0))}

    def train_step(self) -> dict[str, float]:
        lr = self.schedule.lr_at(self.step)
        apply_lr(self.optimizer.adamw, lr)
        stats = self.forward_backward()
        per_layer, dropped_layers = stats["aux_layers"], stats["dropped_layers"]
        lm, aux, z, dropped, *rest = self._mean_over_dp(
            stats["lm"], stats["aux"], stats["z"], stats["dropped"], *per_layer.values(),
            *dropped_layers.values(), *stats["task"])
        n_aux, n_drop = len(per_layer), len(dropped_layers)
        aux_layers, task = rest[:n_aux], rest[n_aux + n_drop:]
        dropped_layers = dict(zip(dropped_layers, rest[n_aux:n_aux + n_drop]))
        loads = self._sum_loads_over_dp(stats["loads"])
        grad_norm = self.optimizer.clip(self.cfg.optimizer.grad_clip)
        loss = lm + aux + z
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            update_expert_biases(self.chunks, loads)  # from the step's loads: identical on every rank
            self.bad_steps = 0
        else:
            self._skip_bad_step(loss, grad_norm)
        self.optimizer.zero_grad()
        self.step += 1
        return {"loss": loss, self.task.loss_key: lm, "aux_loss": aux, "z_loss": z, "lr": lr,
                "grad_norm": grad_norm, "dropped_fraction": dropped,
                **dict(zip(self.task.scalar_names, task)), "loads": loads,
                "expert_bias": self._expert_biases(), "dropped_layers": dropped_layers,
                **{f"moe/layer{i}/aux_loss": v for i, v in zip(per_layer, aux_layers)}}

    def _expert_biases(self) -> dict[int, torch.Tensor]:
        """Every layer's expert bias for TensorBoard (gathered over pipeline stages: all ranks take
        part, the condition being the same everywhere)."""
        m, log = self.cfg.model, self.cfg.logging
        if not (m.n_experts and m.expert_bias and log.tensorboard and log.histograms):
            return {}
        table = expert_bias_table(self.chunks, m.n_layers, m.n_experts, self.device)
        if self.ctx.pp > 1:
            dist.all_reduce(table, group=self.ctx.pp_group)
        return {i: table[i].cpu() for i in m.moe_layer_ids}

    def _skip_bad_step(self, loss: float, grad_norm: float) -> None:
        """The update is not applied. Past training.max_bad_steps in a row: stop with an error, or
        (on_bad_steps=rollback) mark a rollback that the loop carries out after logging the step."""
        self.bad_steps += 1
        t, what = self.cfg.training, _non_finite(loss, grad_norm)
        if self.bad_steps <= t.max_bad_steps:
            warnings.warn(f"step {self.step}: {what}; skipping the update "
                          f"({self.bad_steps}/{t.max_bad_steps})")
        elif t.on_bad_steps == "stop":
            raise FloatingPointError(
                f"{self.bad_steps} consecutive steps were non-finite (step {self.step}: {what}): "
                f"lower optimizer.lr, use training.precision=fp32, set training.on_bad_steps="
                f"rollback, or resume from an earlier checkpoint (training.max_bad_steps="
                f"{t.max_bad_steps})")
        else:
            warnings.warn(f"step {self.step}: {what}; {self.bad_steps} non-finite steps in a row: "
                          f"rolling back")

    def _rollback(self) -> None:
        """training.on_bad_steps=rollback, collective: reload the newest verified checkpoint saved
        before the run of bad steps began (its weights predate them), keep the data stream where it
        is (the batches since that checkpoint are skipped, the bad ones among them) and log from the
        checkpoint's step again (metrics rows past it move aside, TensorBoard purges them). Newer
        checkpoints move aside. Rolling back twice to one checkpoint means no progress: stop."""
        n_bad = self.bad_steps
        first_bad = self.step - n_bad  # updates applied before the bad run began
        choice = choose_checkpoint("auto", self.ckpt_dir, self.ctx, max_step=first_bad)
        if choice.path is None or step_of(choice.path) == self.rolled_back_to:
            why = "no verified checkpoint precedes them" if choice.path is None else \
                f"the run already rolled back to {choice.path.name} once"
            raise FloatingPointError(f"{n_bad} consecutive steps were non-finite from step "
                                     f"{first_bad} and {why}: lower optimizer.lr or use "
                                     f"training.precision=fp32")
        position = self.train_data.state_dict()
        self.run_start = start_run(self.cfg, self.ckpt_dir, choice, self.ctx, self._log)
        restore_training_state(choice.path, self.chunks, self.optimizer, self.ctx, self.device)
        self.train_data.load_state_dict(position)
        skipped = self.step - self.run_start.step
        self.step = self.last_saved_step = self.rolled_back_to = self.run_start.step
        self.bad_steps = 0
        self.logger.close()
        self.logger = self._open_logger(self.run_start.purge_step)
        self._log(f"rolled back to {choice.path} (step {self.step}); skipping the {skipped} "
                  f"batches drawn since, the last {n_bad} of them non-finite")

    def _mean_over_dp(self, *values: torch.Tensor) -> list[float]:
        t = torch.stack([v.float() for v in values])
        if self.dp > 1:
            dist.all_reduce(t, group=self.ctx.dp_group)
            t /= self.dp
        return t.tolist()

    def _sum_loads_over_dp(self, loads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {k: v.long().cpu() for k, v in reduce_loads_over_dp(loads, self.ctx).items()}

    # ------------------------------------------------------------ validation
    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics (pretraining: evaluate_lm)."""
        return self.task.evaluate(self)

    @torch.no_grad()
    def evaluate_lm(self) -> dict[str, float]:
        """Mean LM loss and perplexity over training.eval_steps validation batches."""
        self.model.eval()
        self.valid_data.reset()
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.training.eval_steps):
            batch = self.valid_data.next_batch().to(self.device)
            mb = self.task.micro_batches(batch, self.cfg.training.micro_batch_size)
            with self._autocast():
                losses = self.executor.forward_only(len(mb.inputs), mb.inputs, mb.targets)
            total += sum(loss.float() for loss in losses) / len(mb.inputs) if losses else 0.0
        self.model.train()
        if self.ctx.pp > 1:
            dist.all_reduce(total, group=self.ctx.pp_group)
        (loss,) = self._mean_over_dp(total / self.cfg.training.eval_steps)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Collective: model, AdamW state and RNG under global names (train/checkpoint.py), resumable
        under any layout; the data position and config go to meta.json."""
        state = training_state(self.chunks, self.optimizer, self.ctx, rng_state(self.device))
        meta = {"data": self.train_data.state_dict(), "config": self.cfg.to_dict(),
                "run_id": self.run_start.run_id}
        path = save_checkpoint(self.ckpt_dir, self.step, self.ctx, state, meta, self.cfg.checkpoint.keep_last)
        self._log(f"saved checkpoint {path}")
        return path

    def _start_run(self) -> RunStart:
        """Collective, before any model is built (a refused run_dir or another model fails in
        seconds): the checkpoint to continue from, verified (resume=auto: the newest that verifies,
        each skipped one logged), and run_dir claimed for this run (train/rundir.py)."""
        choice = choose_checkpoint(self.cfg.checkpoint.resume, self.ckpt_dir, self.ctx)
        return start_run(self.cfg, self.ckpt_dir, choice, self.ctx, self._log)

    def _open_logger(self, purge_step: int | None) -> MetricsLogger:
        c = self.cfg.logging
        images = c.interval if c.expert_load_images else 0  # expert-load pictures every interval
        top_k = self.cfg.model.top_k if self.cfg.model.n_experts else None
        return MetricsLogger(self.run_dir, self.is_logger and not self.in_memory, c.tensorboard,
                             c.histograms, purge_step=purge_step, image_interval=images, top_k=top_k)

    def _maybe_resume(self) -> None:
        path = self.run_start.resume_from
        if path is None:
            if self.cfg.checkpoint.resume == "auto":
                self._log(f"no checkpoint under {self.ckpt_dir}: starting from scratch")
            return
        meta, same_layout = restore_training_state(path, self.chunks, self.optimizer, self.ctx, self.device)
        self.train_data.load_state_dict(meta["data"])
        self.step = self.last_saved_step = int(meta["step"])
        note = "" if same_layout else f" (resharded from layout {meta.get('layout')}; RNG state not restored)"
        self._log(f"resumed from {path} at step {self.step}{note}")

    # ------------------------------------------------------------ loop
    def _log(self, msg: str) -> None:
        if self.is_logger:
            self.log_fn(msg)

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop_requested = signum

    def _should_stop(self) -> bool:
        """A stop signal on any rank stops every rank at the same step, unless that step ended
        the run; every rank learns which signal it was (self.stopped_by)."""
        flag = torch.tensor([float(self.stop_requested or 0)])
        if self.ctx.world_size > 1:
            flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
        if flag.item() and self.step < self.cfg.training.max_steps:
            self.stopped_by = signal.Signals(int(flag.item())).name
        return self.stopped_by is not None

    def train(self) -> dict[str, float]:
        c = self.cfg
        if self.in_memory:
            raise RuntimeError("a trainer on in-memory batches (the planner's simulation) runs "
                               "train_step only: train() writes a run directory and checkpoints")
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(c, self.run_dir / "config.yaml")
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        self._log(f"training {self.active_params:,} active parameters on {self.device}, "
                  f"{self.ctx.world_size} process(es), {self.n_micro} micro-batch(es) per step")
        meter, start_step, t0, last = Throughput(), self.step, time.perf_counter(), {}
        try:
            while self.step < c.training.max_steps:
                last = self.train_step()
                rows = c.training.global_batch_size * self.task.rows_per_example
                meter.add(rows * c.data.seq_len)
                self._after_step(last, meter, start_step, t0)
                if self.bad_steps > c.training.max_bad_steps:
                    self._rollback()
                if self._should_stop():
                    self._log(f"{self.stopped_by}: stopping at step {self.step} with a final "
                              f"checkpoint; resume with --resume")
                    break
            if self.last_saved_step != self.step:  # decided from shared state, not a directory listing
                self.save()
                self.last_saved_step = self.step
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.logger.close()
        return last

    def _after_step(self, s: dict, meter: Throughput, start_step: int, t0: float) -> None:
        c = self.cfg
        tok_s, _ = meter.rate()
        mfu = tok_s * self.flops_per_token / (self.peak * self.ctx.world_size) if self.peak else None
        scalars = {k: v for k, v in s.items() if k not in ("loads", "expert_bias", "dropped_layers")}
        scalars.update(tokens_per_s=tok_s, mfu=mfu, memory_gb=memory_gb(self.device))
        self.logger.log(self.step, scalars, s["loads"], dropped=s["dropped_layers"])
        biases = {f"moe/layer{i}/expert_bias": b for i, b in s["expert_bias"].items()}
        self.logger.log_histograms(self.step, biases)
        if self.step % c.logging.interval == 0 or self.step == c.training.max_steps:
            done = self.step - start_step
            eta = (time.perf_counter() - t0) / max(done, 1) * (c.training.max_steps - self.step)
            self._log(f"step {self.step}/{c.training.max_steps} | loss {s['loss']:.4f} | "
                      f"{self.task.console(s)} | "
                      f"lr {s['lr']:.2e} | grad {s['grad_norm']:.3f} | {tok_s / 1e3:.1f}k tok/s | "
                      f"mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | mem {scalars['memory_gb']:.2f} GB | "
                      f"eta {format_eta(eta)}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the next line reports this window's peak
        if c.training.eval_interval and self.step % c.training.eval_interval == 0:
            v = self.evaluate()
            self.logger.log(self.step, v, prefix="valid")
            self._log(f"validation at step {self.step}: {self.task.describe(v)}")
        if c.checkpoint.interval and self.step % c.checkpoint.interval == 0:
            self.save()
            self.last_saved_step = self.step
        meter.rate()  # restart the window: evaluation and saving do not count as training time


def _non_finite(loss: float, grad_norm: float) -> str:
    """Which of the step's loss and gradient norm were non-finite, with the other's value."""
    values = (("loss", loss), ("grad norm", grad_norm))
    bad = [f"{name} ({v})" for name, v in values if not math.isfinite(v)]
    good = [f"{name} {v:.4g}" for name, v in values if math.isfinite(v)]
    return f"non-finite {' and '.join(bad)}" + (f" (finite {good[0]})" if good else "")


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (GPU) or peak resident set size of this process (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KB on Linux


def run(cfg: TrainConfig, ctx: ParallelContext) -> dict[str, float]:
    return Trainer(cfg, ctx).train()


