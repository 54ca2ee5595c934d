"""Run one rank's real training step with nothing allocated, and measure its memory.

`simulate_rank(cfg, nodes, gpus_per_node, rank)` joins torch's fake process group as `rank` of
nodes x gpus_per_node (collectives return at once; Megatron's --fake-init-process-group does the
same), builds the trainer exactly as training does (its stage chunks, pipeline executor under the
configured schedule, gradient reducer, clipping, AdamW, ZeRO-1) under FakeTensorMode, feeds it
synthetic token batches through the trainer's `batches` hook, and runs one `Trainer.train_step`
under a `MemoryTracker` that follows every storage at the dispatcher (train/memory.py), from the
build on. The state the first AdamW step creates is added before that step, where every later
step holds it (`steady_peak`; warmup=True measures a real second step instead, the same answer).
So the peak by category is that of the real code on this rank, for any model size, on a CPU.

Data-dependent steps have to be known on the host, because fake tensors hold no values:
  * routing is forced (model.forced_routing_imbalance: 1 = every expert its fair share, F = the
    busiest expert at F times it) and the expert-parallel split sizes come from the router's host
    counts (moe.router.forced_counts); capacity dropping is not simulated (dropless only);
  * host reads of floating values (the logged losses, the gradient norm) return 1.0, a finite
    placeholder, so the step takes its normal path (clip, AdamW step); integer reads are refused;
  * grouped_mm's fake kernel accepts only bf16 (a CUDA rule); float32 calls, which the CPU path
    makes, take their output shape from bf16 stand-ins.
The simulated device is the CPU (fake CUDA tensors cannot carry autograd on a CPU-only torch), so
the operators are the CPU path's: the torch paths of our fused ops keep more than the Triton
kernels (SwiGLU keeps silu's output, RMSNorm x * rsqrt, RoPE its inputs), while CPU autocast
runs LayerNorm in bf16 where CUDA's runs it in float32: a CUDA run differs by these, mostly down.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from parallel.context import ParallelContext, RankCoords

from .config import TrainConfig, check_world
from .memory import CATEGORIES, WINDOWS, MemoryTracker
from .plan import check_pretraining, rank_kinds, sizing_model

_FLOAT_PLACEHOLDER = 1.0
_SHORT = ("weights", "grads", "optim", "activ", "temp")  # CATEGORIES, as the plan prints them


@dataclass(frozen=True)
class RankSimulation:
    """What one simulated rank measured (bytes)."""

    coords: RankCoords
    peak: int                     # the measured step's peak of live bytes
    at_peak: dict[str, int]       # by category, at that peak (sums to peak)
    at_end: dict[str, int]        # by category, after the step (what persists between steps)
    imbalance: float | None       # forced routing used (None for a dense model)
    seconds: float                # wall time of the whole simulation of this rank
    ops: int                      # operators dispatched during the two steps


class _SimulationMode(MemoryTracker):
    """The memory tracker plus the two things fake tensors cannot do by themselves (module doc)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.prim.device.default:  # most calls by far; creates nothing
            return func(*args)
        kwargs = kwargs or {}
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            if args[0].is_floating_point():
                return _FLOAT_PLACEHOLDER
            raise RuntimeError("the simulation read an integer from a tensor: a size that depends "
                               "on data; this path cannot be simulated (use forced, dropless "
                               "routing)")
        if func is torch.ops.aten._grouped_mm.default and args[0].dtype == torch.float32:
            out = _grouped_mm_float32(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        self.after_op(out)
        return out


def _grouped_mm_float32(func, args, kwargs) -> torch.Tensor:
    """A float32 grouped_mm under fake tensors: the shape from bf16 stand-ins, the dtype float32."""
    def stand_in(a):
        floating = isinstance(a, torch.Tensor) and a.is_floating_point()
        return a.to(torch.bfloat16) if floating else a

    stand_ins = [stand_in(a) for a in args]
    shaped = func(*stand_ins, **kwargs)
    return shaped.new_empty_strided(shaped.shape, shaped.stride(), dtype=torch.float32)


class _SyntheticBatches:
    """Token ids of the right shape (zeros: with forced routing no value changes a size)."""

    def __init__(self, rows: int, seq_len: int):
        self.rows, self.seq_len = rows, seq_len

    def next_batch(self) -> torch.Tensor:
        return torch.zeros(self.rows, self.seq_len + 1, dtype=torch.long)  # [G / dp, S + 1]


def simulation_config(cfg: TrainConfig) -> TrainConfig:
    """The config the simulation runs: the planner's sizing model (train.plan.sizing_model:
    model.forced_routing_imbalance when set, else routing evenly), CPU, nothing read from disk,
    no compile."""
    check_pretraining(cfg)
    m = cfg.model
    if m.n_experts and m.capacity_factor is not None:
        raise ValueError(f"model.capacity_factor ({m.capacity_factor}) cannot be simulated: "
                         f"capacity dropping compacts tokens by data-dependent sizes; simulate "
                         f"with model.capacity_factor=null (dropless is the upper bound)")
    if m.n_experts and m.expert_backend != "grouped_mm":
        raise ValueError(f"model.expert_backend ({m.expert_backend!r}) cannot be simulated (it "
                         f"reads expert sizes on the host): simulate with "
                         f"model.expert_backend=grouped_mm")
    model = sizing_model(cfg)
    training = dataclasses.replace(cfg.training, device="cpu", compile=False)
    checkpoint = dataclasses.replace(cfg.checkpoint, init_from=None, resume="none")
    return dataclasses.replace(cfg, model=model, training=training, checkpoint=checkpoint)


def check_rank(rank: int, world: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"--rank ({rank!r}) must be a global rank in [0, {world}) for this "
                         f"world of {world} GPUs, or 'all'")


def simulate_rank(cfg: TrainConfig, nodes: int, gpus_per_node: int, rank: int,
                  warmup: bool = False) -> RankSimulation:
    """Simulate global `rank` of nodes x gpus_per_node running cfg (see the module docstring).

    The measured step is a step after the first: optimizer state alive from the start. By default
    one step runs and the state that its optimizer step creates (and keeps) is added to the
    peak before that optimizer step, where a later step holds it; warmup=True runs a first step
    untracked and measures the second as it is (twice the time, the same answer).
    """
    world = nodes * gpus_per_node
    check_rank(rank, world)
    check_world(cfg, world)
    cfg = simulation_config(cfg)
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process: run the "
                           "simulation in a process of its own")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the fake backend

    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        with FakeTensorMode():
            mode, coords = _run_step(cfg, world, rank, warmup)
    finally:
        dist.destroy_process_group()
    peak, at_peak = steady_peak(mode)
    return RankSimulation(coords, peak, at_peak, mode.breakdown(),
                          cfg.model.forced_routing_imbalance, time.perf_counter() - start, mode.ops)


def _run_step(cfg: TrainConfig, world: int, rank: int,
              warmup: bool) -> tuple[_SimulationMode, RankCoords]:
    """Build the trainer on fake tensors and run its train_step under the tracker; the rank's
    coordinates with it."""
    from .trainer import Trainer  # the runtime, imported only when a simulation runs

    p = cfg.parallel
    ctx = ParallelContext(world_size=world, rank=rank, tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep,
                          vpp=p.vpp, sequence_parallel=p.sequence_parallel,
                          fold_experts=p.fold_experts, timeout_s=p.timeout_s)
    rows = cfg.training.global_batch_size // ctx.dp
    with _SimulationMode() as mode:  # from the build on: buffers made there are counted too
        batches = _SyntheticBatches(rows, cfg.data.seq_len)
        trainer = Trainer(cfg, ctx, log=lambda msg: None, batches=batches)
        if warmup:
            trainer.train_step()
        opt = trainer.optimizer  # parallel.optimizer.ParallelOptimizer: AdamW over main weights
        buffers = [b.buffer for r in opt.reducers for b in r.buckets]  # float32 accumulation
        mode.watch(list(trainer.model.parameters()), opt.adamw, buffers)
        trainer.train_step()
    return mode, ctx.coords


def steady_peak(mode: MemoryTracker) -> tuple[int, dict[str, int]]:
    """(peak, bytes by category at it) of a step that starts with the optimizer state alive.

    Each window's peak (before, during and after optimizer.step) is taken as measured, except that
    the state a first optimizer step creates and keeps is added to the peak before it."""
    kept = mode.created_in_optimizer_and_kept()
    best = (-1, {})
    for window, (live, clock) in mode.window_peaks.items():
        at = mode.breakdown(clock)
        if window == WINDOWS[0]:
            live, at["optimizer"] = live + kept, at["optimizer"] + kept
        best = max(best, (live, at), key=lambda pair: pair[0])
    return best


def ranks_to_simulate(plan, every_kind: bool = False) -> list[int]:
    """Global ranks worth simulating for a train.plan.Plan: the heaviest pipeline rank's first GPU
    (data-parallel rank 0, on ep rank 0, which holds expert 0, the busiest under forced routing),
    or with every_kind the first GPU of the first pipeline rank of each kind (train.plan.rank_kinds:
    the heaviest of the ranks holding the same blocks), plus one on ep rank 1 when routing is
    imbalanced (the other GPUs of a pipeline rank run the same step as one of these)."""
    lay = plan.layout
    heaviest = max(plan.stages, key=lambda s: s.memory.total).rank
    pipeline = rank_kinds(plan.cfg.model, plan.partition, lay.pp) if every_kind else [heaviest]
    kinds = [(r, 0) for r in pipeline]
    if every_kind and lay.ep > 1 and (plan.imbalance or 1.0) > 1.0:
        kinds += [(r, 1) for r in pipeline]
    return [next(c.rank for c in plan.grid if (c.pp, c.ep) == (r, e)) for r, e in kinds]


def format_simulation(plan, sims: list[RankSimulation]) -> str:
    """The measured peaks beside the planner's, in GiB (MiB for small models), with headroom."""
    budget = plan.gpu_mem_bytes
    unit, name = (2 ** 30, "GiB") if max(s.peak for s in sims) >= 2 ** 30 else (2 ** 20, "MiB")
    imb = sims[0].imbalance
    routing = "" if imb is None else f", forced routing imbalance {imb:g}"
    head = " ".join(f"{k:>7}" for k in _SHORT)
    rows = [f"Simulated step (fake process group + FakeTensorMode: the real train_step of each "
            f"rank, nothing allocated{routing}; {name}, budget {budget / 2 ** 30:g} GiB):",
            f"  {'rank':>5} {'pp':>3} {'dp':>4} {'tp':>3} {'ep':>3} {head} {'peak':>8} "
            f"{'planned':>8} {'diff':>6} {'headroom':>8}"]
    for sim in sims:
        c, planned = sim.coords, plan.stages[sim.coords.pp].memory.total
        cells = " ".join(f"{sim.at_peak[k] / unit:>7.2f}" for k in CATEGORIES)
        rows.append(f"  {c.rank:>5} {c.pp:>3} {c.dp:>4} {c.tp:>3} {c.ep:>3} {cells} "
                    f"{sim.peak / unit:>8.2f} {planned / unit:>8.2f} "
                    f"{(planned - sim.peak) / sim.peak:>+6.1%} {1 - sim.peak / budget:>8.1%}")
    rows.append("  peak: the measured step's highest live bytes (a step after the first: optimizer "
                "state alive); planned: train/plan.py for that pipeline rank (busiest ep rank)")
    return "\n".join(rows)
