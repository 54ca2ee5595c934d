"""The training loop: micro-batches, mixed precision, gradient reduction, clipping, logging,
validation, checkpoints, NaN handling and a clean stop on SIGTERM.

One optimizer step (global batch G sequences, dp data-parallel ranks, micro-batch m):
    n_micro = G / (dp * m);  for each micro-batch: loss_i / n_micro -> backward
    (MoE aux losses get the same 1/n_micro through aux_grad_scale)
    reduce grads (tp partial sums, dp / edp means) -> clip by global norm -> AdamW step
so every layout computes the gradient of the same objective: the mean LM loss over the G sequences
(plus the aux losses averaged over micro-batches), exactly what one process computes.
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

from moe.model import Decoder, build_model, load_full_state_dict, param_counts
from moe.stages import (build_stage_chunks, expert_bias_table, merge_stage_stats, plan_stages,
                        pool_loads_over_layers, reduce_loads_over_dp, routing_count_fn, stage_chunk_fn,
                        update_expert_biases)
from parallel.context import ParallelContext
from parallel.layout import LayoutTable
from parallel.pipeline import PipelineExecutor

from .checkpoint import resolve_resume_everywhere, restore_training_state, rng_state, save_checkpoint, \
    training_state
from .config import TrainConfig, check_world, save_config
from .data import PretrainData, load_tokenizer, resolve_data_paths
from .init_from import initial_state
from .metrics import MetricsLogger, Throughput, flops_per_token, format_eta, peak_flops
from .optim import LRSchedule, apply_lr, build_parallel_optimizer


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
        self.is_logger = ctx.rank == 0
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        torch.manual_seed(t.seed)
        self.model = self._build_model()
        in_memory = batches is not None
        self.train_data, self.valid_data = (batches, batches) if in_memory else self._build_data()
        self._build_optimizer()
        self.step = 0
        self.bad_steps = 0
        self.stop_requested = False
        self.last_saved_step = -1
        self.logger = MetricsLogger(self.run_dir, self.is_logger and not in_memory,
                                    cfg.logging.tensorboard, cfg.logging.histograms)
        _, self.active_params = param_counts(build_model(cfg.model, device="meta"))  # whole model, any layout
        self.flops_per_token = flops_per_token(self.active_params, cfg.model.n_layers,
                                               cfg.model.n_heads * cfg.model.dim_head, cfg.data.seq_len)
        self.peak = peak_flops(self.device)
        if not in_memory:
            self._maybe_resume()

    # ------------------------------------------------------------ setup
    def _build_model(self) -> torch.nn.Module:
        """This rank's chunks (one Decoder without pipelining; its virtual stages with pp > 1).
        self.model is that Decoder, or a ModuleList of the chunks."""
        c, p = self.cfg, self.cfg.parallel
        partition = plan_stages(c.model, p.pp, p.vpp, c.data.seq_len, stage_layers=p.stage_layers,
                                first_stage_layers=p.first_stage_layers, last_stage_layers=p.last_stage_layers)
        self.chunks = build_stage_chunks(c.model, self.ctx, partition, seed=c.training.seed, device=self.device)
        if c.checkpoint.init_from:
            self._init_from(self.chunks, c.checkpoint.init_from)
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
        tok = load_tokenizer(c.data.tokenizer)
        if tok.vocab_size > c.model.vocab_size:
            raise ValueError(f"tokenizer {c.data.tokenizer!r} has {tok.vocab_size} ids but model.vocab_size is "
                             f"{c.model.vocab_size}: raise model.vocab_size")
        prefixes = self._prepare_corpus(c, tok)
        kw = dict(prefixes=prefixes, weights=c.data.weights, seq_len=c.data.seq_len,
                  seed=c.training.seed, valid_fraction=c.data.valid_fraction,
                  dp_rank=self.ctx.dp_rank, dp_size=self.dp)
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
        seq = c.data.seq_len // (self.ctx.tp if self.ctx.sequence_parallel else 1)
        self.step_loads: dict[int, torch.Tensor] = {}  # global_batch scope: refilled before each step
        self.executor = PipelineExecutor(
            [stage_chunk_fn(chunk, 1.0 / self.n_micro, self.step_loads) for chunk in self.chunks],
            self.ctx, self._schedule_kind(), self.n_micro,
            act_shape=(c.training.micro_batch_size, seq, c.model.d_model),
            act_dtype=self._residual_dtype(), before_backward=self.optimizer.prepare)
        self._build_load_counter()

    def _build_load_counter(self) -> None:
        """model.aux_loss_scope=global_batch: a second executor over the same chunks that only
        counts routing (routing_count_fn), run before each step by _count_step_loads."""
        self.count_executor, self._counted = None, {}
        if self.cfg.model.n_experts and self.cfg.model.aux_loss_scope == "global_batch":
            self.count_executor = PipelineExecutor(
                [routing_count_fn(chunk, self._counted) for chunk in self.chunks], self.ctx,
                self._schedule_kind(), self.n_micro, act_shape=self.executor.act_shape,
                act_dtype=self.executor.act_dtype)

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
        micro = batch.split(self.cfg.training.micro_batch_size)
        with self._autocast():
            self._count_step_loads([mb[:, :-1] for mb in micro], [mb[:, 1:] for mb in micro])
            result = self.executor.step([mb[:, :-1] for mb in micro], [mb[:, 1:] for mb in micro])
        self.optimizer.finish()
        return self._step_stats(result)

    def _count_step_loads(self, inputs, targets) -> None:
        """The global_batch balance loss needs the step's routed slots per expert F before the first
        backward (under 1F1B micro-batch 0's backward precedes micro-batch 1's forward): count them
        in a no-grad forward of every micro-batch through the same pipeline, sum over dp, and refill
        step_loads, which the training chunks read. Exact (the weights and inputs are the same)
        for one extra forward per step; the RNG is forked so training draws the same dropout."""
        if self.count_executor is None:
            return
        self._counted.clear()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.count_executor.forward_only(self.n_micro, inputs, targets)
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
        sums = torch.cat([scalars, merged["aux_layers"]])
        loads = merged["loads"]
        if self.ctx.pp > 1:
            dist.all_reduce(sums, group=self.ctx.pp_group)
            dist.all_reduce(loads, group=self.ctx.pp_group)
        moe_layers = [i for i in range(m.n_layers) if m.is_moe_layer(i)]
        sums[3] /= max(len(moe_layers), 1)
        sums /= self.n_micro
        lm, aux, z, dropped = sums[:4].unbind(0)
        return {"lm": lm, "aux": aux, "z": z, "dropped": dropped,
                "loads": {i: loads[i].long() for i in moe_layers},
                "aux_layers": {i: sums[4 + i] for i in moe_layers}}

    def train_step(self) -> dict[str, float]:
        lr = self.schedule.lr_at(self.step)
        apply_lr(self.optimizer.adamw, lr)
        stats = self.forward_backward()
        per_layer = stats["aux_layers"]
        lm, aux, z, dropped, *aux_layers = self._mean_over_dp(
            stats["lm"], stats["aux"], stats["z"], stats["dropped"], *per_layer.values())
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
        return {"loss": loss, "lm_loss": lm, "aux_loss": aux, "z_loss": z, "lr": lr, "grad_norm": grad_norm,
                "dropped_fraction": dropped, "loads": loads, "expert_bias": self._expert_biases(),
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
        return {i: table[i].cpu() for i in range(m.n_layers) if m.is_moe_layer(i)}

    def _skip_bad_step(self, loss: float, grad_norm: float) -> None:
        self.bad_steps += 1
        limit = self.cfg.training.max_bad_steps
        if self.bad_steps > limit:
            raise FloatingPointError(f"{self.bad_steps} consecutive steps had a non-finite loss ({loss}) or grad norm "
                                     f"({grad_norm}) at step {self.step}: lower optimizer.lr, use precision=fp32, or "
                                     f"resume from an earlier checkpoint (training.max_bad_steps={limit})")
        warnings.warn(f"step {self.step}: non-finite loss ({loss}) or grad norm ({grad_norm}); "
                      f"skipping the update ({self.bad_steps}/{limit})")

    def _mean_over_dp(self, *values: torch.Tensor) -> list[float]:
        t = torch.stack([v.float() for v in values])
        if self.dp > 1:
            dist.all_reduce(t, group=self.ctx.dp_group)
            t /= self.dp
        return t.tolist()

    def _sum_loads_over_dp(self, loads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if self.dp > 1 and loads:
            keys = sorted(loads)
            t = torch.stack([loads[k].float() for k in keys])
            dist.all_reduce(t, group=self.ctx.dp_group)
            loads = dict(zip(keys, t.long().unbind(0)))
        return {k: v.cpu() for k, v in loads.items()}

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        self.valid_data.reset()
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.training.eval_steps):
            micro = self.valid_data.next_batch().to(self.device).split(self.cfg.training.micro_batch_size)
            with self._autocast():
                losses = self.executor.forward_only(len(micro), [mb[:, :-1] for mb in micro],
                                                    [mb[:, 1:] for mb in micro])
            total += sum(loss.float() for loss in losses) / len(micro) if losses else 0.0
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
        meta = {"data": self.train_data.state_dict(), "config": self.cfg.to_dict()}
        path = save_checkpoint(self.ckpt_dir, self.step, self.ctx, state, meta, self.cfg.checkpoint.keep_last)
        self._log(f"saved checkpoint {path}")
        return path

    def _maybe_resume(self) -> None:
        path = resolve_resume_everywhere(self.cfg.checkpoint.resume, self.ckpt_dir, self.ctx)
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

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _should_stop(self) -> bool:
        """SIGTERM on any rank stops every rank at the same step."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        if self.ctx.world_size > 1:
            flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
        return bool(flag.item())

    def train(self) -> dict[str, float]:
        c = self.cfg
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(c, self.run_dir / "config.yaml")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._log(f"training {self.active_params:,} active parameters on {self.device}, "
                  f"{self.ctx.world_size} process(es), {self.n_micro} micro-batch(es) per step")
        meter, start_step, t0, last = Throughput(), self.step, time.perf_counter(), {}
        try:
            while self.step < c.training.max_steps:
                last = self.train_step()
                meter.add(c.training.global_batch_size * c.data.seq_len)
                self._after_step(last, meter, start_step, t0)
                if self._should_stop():
                    self._log(f"SIGTERM: stopping at step {self.step} with a final checkpoint")
                    break
            if self.last_saved_step != self.step:  # decided from shared state, not a directory listing
                self.save()
                self.last_saved_step = self.step
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.logger.close()
        return last

    def _after_step(self, s: dict, meter: Throughput, start_step: int, t0: float) -> None:
        c = self.cfg
        tok_s, _ = meter.rate()
        mfu = tok_s * self.flops_per_token / (self.peak * self.ctx.world_size) if self.peak else None
        scalars = {k: v for k, v in s.items() if k not in ("loads", "expert_bias")}
        scalars.update(tokens_per_s=tok_s, mfu=mfu, memory_gb=memory_gb(self.device))
        self.logger.log(self.step, scalars, s["loads"])
        biases = {f"moe/layer{i}/expert_bias": b for i, b in s["expert_bias"].items()}
        self.logger.log_histograms(self.step, biases)
        if self.step % c.logging.interval == 0 or self.step == c.training.max_steps:
            done = self.step - start_step
            eta = (time.perf_counter() - t0) / max(done, 1) * (c.training.max_steps - self.step)
            self._log(f"step {self.step}/{c.training.max_steps} | loss {s['loss']:.4f} | lm {s['lm_loss']:.4f} | "
                      f"lr {s['lr']:.2e} | grad {s['grad_norm']:.3f} | {tok_s / 1e3:.1f}k tok/s | "
                      f"mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | mem {scalars['memory_gb']:.2f} GB | "
                      f"eta {format_eta(eta)}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the next line reports this window's peak
        if c.training.eval_interval and self.step % c.training.eval_interval == 0:
            v = self.evaluate()
            self.logger.log(self.step, {"loss": v["loss"], "perplexity": v["perplexity"]}, prefix="valid")
            self._log(f"validation at step {self.step}: loss {v['loss']:.4f} | perplexity {v['perplexity']:.2f}")
        if c.checkpoint.interval and self.step % c.checkpoint.interval == 0:
            self.save()
            self.last_saved_step = self.step
        meter.rate()  # restart the window: evaluation and saving do not count as training time


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (GPU) or peak resident set size of this process (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KB on Linux


def run(cfg: TrainConfig, ctx: ParallelContext) -> dict[str, float]:
    return Trainer(cfg, ctx).train()


