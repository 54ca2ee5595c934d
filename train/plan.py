"""Layout planning: what a (config, cluster) pair puts on every GPU, before any process starts.

`plan_layout(cfg, nodes, gpus_per_node)` returns a `Plan` (pure data): the rank grid and process
groups, the pipeline partition (which decoder layers each virtual stage holds, MoE or dense), the
parameters each GPU holds after tensor/expert sharding, an estimate of each GPU's memory, the FLOPs
of one step and the pipeline bubble. `format_plan(plan)` turns it into the text the planning CLI
(launchers/plan.py) prints; nothing here prints or touches files.

Memory, per GPU of pipeline rank r (train/footprint.py has the tensor-by-tensor model): the
parameters, their gradients, the AdamW state (divided by dp, experts by edp, under parallel.zero1),
the activations the schedule keeps alive at the rank's peak and the transient tensors at that
moment, found by replaying the rank's pipeline schedule action by action. The categories are those
`train/simulate.py` measures on the real step (`launchers/plan.py --simulate`). MoE layouts are
sized for forced routing (model.forced_routing_imbalance, 1 = balanced when unset) on the busiest
ep rank. Not counted: the CUDA context and allocator fragmentation (typically 1-3 GiB) and the
caching allocator's 512-byte rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

from moe.config import ModelConfig
from moe.model import build_model, param_counts, validate_layout
from moe.stages import embedding_cost, head_cost, layer_costs, plan_stages
from parallel.context import (GROUP_KINDS, RankCoords, expert_dp_size, group_ranks, rank_grid, rank_of,
                              resolve_sizes)
from parallel.partition import (activation_microbatches_in_flight, bubble_fraction, check_partition,
                                chunk_specs, chunks_of_rank, format_partition)

from .config import TrainConfig, check_world
from .footprint import rank_memory, rank_params
from .metrics import model_flops_per_token

GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The resolved parallel layout of one run (dp derived as the trainer derives it)."""

    nodes: int
    gpus_per_node: int
    world: int
    tp: int
    pp: int
    vpp: int
    dp: int
    ep: int
    edp: int
    schedule: str            # gpipe | 1f1b | interleaved; "none" when pp == 1
    n_micro: int             # micro-batches per step on each data-parallel rank
    micro_batch: int
    seq_len: int
    sequence_parallel: bool  # effective: requested and tp > 1


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU at its peak, by the categories the simulation measures."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    temporaries: int

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + self.temporaries)


@dataclass(frozen=True)
class StagePlan:
    """One pipeline rank: its virtual stages, their layers, and what each of its GPUs holds."""

    rank: int                   # pipeline rank (0 = holds the embedding)
    vstages: list[int]          # virtual stages on this rank: rank, rank + pp, ...
    chunks: list[list[int]]     # decoder layers of each of those virtual stages
    moe_layers: list[int]       # which of this rank's layers are MoE blocks
    full_params: int            # parameters of this rank's modules before tp/ep sharding
    params: int                 # parameters on each GPU of this rank (after tp/ep sharding)
    expert_params: int          # the expert part of `params` (sharded by ep)
    in_flight: int              # schedule units whose activations are alive at the peak
    memory: Memory


@dataclass(frozen=True)
class Plan:
    cfg: TrainConfig
    layout: Layout
    grid: list[RankCoords]                # index = global rank
    groups: dict[str, list[list[int]]]    # kind -> every group's global ranks
    partition: list[list[int]]            # virtual stage -> decoder layers
    costs: list[float]                    # forward FLOPs of one sequence through each decoder block
    first_extra: float                    # embedding cost, same unit (moe.stages.embedding_cost)
    last_extra: float                     # final norm + LM head cost, same unit (moe.stages.head_cost)
    stages: list[StagePlan]
    total_params: int                     # whole model, unsharded
    active_params: int                    # whole model, top_k of n_experts expert weights
    tied_replica_params: int              # a tied head replicated on the last stage (pp > 1)
    tokens_per_step: int
    flops_per_step: float
    flops_per_gpu: float
    bubble: float
    gpu_mem_bytes: int
    imbalance: float | None               # forced routing the MoE memory is sized for
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def check_pretraining(cfg: TrainConfig) -> None:
    """The planner sizes pretraining steps (one row of seq_len tokens per example, causal
    attention): a post-training task's step differs (DPO runs two rows per example, packed SFT
    rows carry a [B, 1, S, S] document mask), so it is refused rather than planned wrong."""
    if cfg.task.kind != "lm":
        raise ValueError(f"task.kind={cfg.task.kind}: the planner sizes pretraining steps only "
                         f"(dpo runs two rows per example, packed sft rows a document mask); "
                         f"plan the same model and layout with task.kind=lm")


def resolve_layout(cfg: TrainConfig, nodes: int, gpus_per_node: int) -> Layout:
    """Validate the config against nodes x gpus_per_node GPUs; one-line ValueError on a bad layout."""
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
    p, t, world = cfg.parallel, cfg.training, nodes * gpus_per_node
    dp = resolve_sizes(world, p.tp, p.pp, p.dp, p.ep, p.fold_experts)
    validate_layout(cfg.model, SimpleNamespace(tp=p.tp, ep=p.ep))  # heads, ffn, vocab, experts
    check_world(cfg, world)                                        # the batch splits over dp
    n_micro = t.global_batch_size // (dp * t.micro_batch_size)
    _check_pipeline(cfg, n_micro)
    schedule = p.pp_schedule if p.pp > 1 else "none"
    edp = expert_dp_size(p.tp, dp, p.ep, p.fold_experts)
    return Layout(nodes, gpus_per_node, world, p.tp, p.pp, p.vpp, dp, p.ep, edp, schedule,
                  n_micro, t.micro_batch_size, cfg.data.seq_len, p.sequence_parallel and p.tp > 1)


def _check_pipeline(cfg: TrainConfig, n_micro: int) -> None:
    """Schedule rules the pipeline runtime enforces, named by their config keys."""
    p, n_layers = cfg.parallel, cfg.model.n_layers
    if p.vpp > 1 and p.pp == 1:
        raise ValueError(f"parallel.vpp ({p.vpp}) needs parallel.pp > 1: set vpp=1 or raise pp")
    if p.vpp > 1 and p.pp_schedule != "interleaved":
        raise ValueError(f"parallel.vpp ({p.vpp}) > 1 needs parallel.pp_schedule=interleaved "
                         f"(got {p.pp_schedule!r}): set the schedule or vpp=1")
    ends = (p.first_stage_layers, p.last_stage_layers, p.stage_layers)
    if all(e is None for e in ends) and p.pp * p.vpp > n_layers:
        raise ValueError(f"parallel.pp ({p.pp}) x parallel.vpp ({p.vpp}) = {p.pp * p.vpp} pipeline "
                         f"stages exceed model.n_layers ({n_layers}): every stage needs >= 1 layer; "
                         f"lower pp or vpp")
    if p.pp > 1 and p.pp_schedule == "interleaved" and n_micro % p.pp:
        raise ValueError(f"parallel.pp_schedule=interleaved needs the micro-batch count ({n_micro} = "
                         f"global / (dp x micro)) to be a multiple of parallel.pp ({p.pp}): adjust "
                         f"training.global_batch_size or training.micro_batch_size")


def plan_partition(cfg: TrainConfig) -> tuple[list[list[int]], list[float], float, float]:
    """(partition, layer costs, embedding cost, head cost): the split the pipeline builder makes.

    The costs and the split come from moe.stages (forward FLOPs of one sequence per block, the
    embedding and the LM head as the first/last stage extras), so the plan shows exactly the layers
    training will build on each stage.
    """
    p, m, seq_len = cfg.parallel, cfg.model, cfg.data.seq_len
    partition = plan_stages(m, p.pp, p.vpp, seq_len, stage_layers=p.stage_layers,
                            first_stage_layers=p.first_stage_layers, last_stage_layers=p.last_stage_layers)
    check_partition(partition, m.n_layers)
    return partition, layer_costs(m, seq_len), embedding_cost(m, seq_len), head_cost(m, seq_len)


# ---------------------------------------------------------------------------------------------
# Parameters and memory
# ---------------------------------------------------------------------------------------------


def stage_param_counts(cfg: ModelConfig, chunks: list[tuple[list[int], bool, bool]], tp: int,
                       ep: int) -> tuple[int, int, int]:
    """(unsharded, per-GPU, per-GPU expert) parameters of a rank holding `chunks`, from the
    memory model's per-parameter sizes (train.footprint.rank_params: each piece built once on the
    meta device and cut as its layout records say)."""
    local = [p for chunk in rank_params(cfg, chunks, tp, ep) for p in chunk]
    full = sum(p.n for chunk in rank_params(cfg, chunks, 1, 1) for p in chunk)
    return full, sum(p.n for p in local), sum(p.n for p in local if p.expert)


def stage_memory(cfg: TrainConfig, layout: Layout, partition: list[list[int]], rank: int) -> Memory:
    """Pipeline rank `rank`'s bytes at its peak (train/footprint.py), on data-parallel rank 0 and
    the busiest ep rank."""
    t = cfg.training
    recompute = t.recompute if t.activation_checkpointing else None
    mem = rank_memory(sizing_model(cfg), layout, chunk_specs(partition, layout.pp, rank), rank,
                      recompute, cfg.parallel.zero1, t.precision)
    return Memory(**mem)


def rank_kinds(m: ModelConfig, partition: list[list[int]], pp: int) -> list[int]:
    """The first pipeline rank of each kind. Ranks whose chunks hold the same blocks (MoE or dense,
    and neither the embedding nor the head) keep the same tensors, and every schedule keeps the
    most micro-batches in flight on the lowest of them, so it is the heaviest of its kind."""
    seen, ranks = set(), []
    for r in range(pp):
        blocks = tuple(tuple(m.is_moe_layer(i) for i in chunk) for chunk in partition[r::pp])
        kind = (r == 0, r == pp - 1, blocks)
        if kind not in seen:
            seen.add(kind)
            ranks.append(r)
    return ranks


def _in_flight(layout: Layout, rank: int) -> int:
    """Schedule units alive at the peak: with pp = 1 the trainer runs each micro-batch's backward
    right after its forward, so one."""
    if layout.pp == 1:
        return 1
    return activation_microbatches_in_flight(layout.schedule, layout.pp, layout.vpp,
                                             layout.n_micro, rank)


def sizing_model(cfg: TrainConfig) -> ModelConfig:
    """The model as the planner and the simulation size it: routing forced (balanced when
    model.forced_routing_imbalance is unset), so the expert all-to-all has known sizes."""
    m = cfg.model
    if not m.n_experts or m.forced_routing_imbalance is not None:
        return m
    return dataclasses.replace(m, forced_routing_imbalance=1.0)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def plan_layout(cfg: TrainConfig, nodes: int = 1, gpus_per_node: int = 1,
                gpu_mem_gb: float = 80.0) -> Plan:
    """Everything the planner reports for cfg on nodes x gpus_per_node GPUs (see the module doc)."""
    if not (isinstance(gpu_mem_gb, (int, float)) and gpu_mem_gb > 0):
        raise ValueError(f"--gpu-mem-gb ({gpu_mem_gb!r}) must be a number > 0 (GiB per GPU)")
    check_pretraining(cfg)
    layout = resolve_layout(cfg, nodes, gpus_per_node)
    partition, costs, first_extra, last_extra = plan_partition(cfg)
    stages = [_stage_plan(cfg, layout, partition, r) for r in range(layout.pp)]
    whole = build_model(cfg.model, device="meta")
    total, active = param_counts(whole)
    replica = sum(s.full_params for s in stages) - total
    tokens = cfg.training.global_batch_size * layout.seq_len
    m = cfg.model
    step = model_flops_per_token(m, layout.seq_len, whole) * tokens
    bubble = 0.0 if layout.pp == 1 else bubble_fraction(layout.schedule, layout.pp, layout.vpp,
                                                       layout.n_micro)
    fold = cfg.parallel.fold_experts
    plan = Plan(cfg, layout, rank_grid(layout.world, layout.tp, layout.pp, layout.dp, layout.ep, fold),
                group_ranks(layout.world, layout.tp, layout.pp, layout.dp, layout.ep, fold), partition,
                costs, first_extra, last_extra, stages, total, active, replica, tokens, step,
                step / layout.world, bubble, int(gpu_mem_gb * GIB),
                sizing_model(cfg).forced_routing_imbalance)
    plan.notes.extend(_notes(plan))
    return plan


def _stage_plan(cfg: TrainConfig, layout: Layout, partition: list[list[int]],
                rank: int) -> StagePlan:
    """Layers, parameter counts and memory of pipeline rank `rank`."""
    vstages = list(range(rank, len(partition), layout.pp))
    chunks = chunks_of_rank(partition, layout.pp, rank)
    specs = chunk_specs(partition, layout.pp, rank)
    full, local, expert = stage_param_counts(sizing_model(cfg), specs, layout.tp, layout.ep)
    layers = [i for chunk in chunks for i in chunk]
    moe_layers = [i for i in layers if cfg.model.is_moe_layer(i)]
    return StagePlan(rank, vstages, chunks, moe_layers, full, local, expert,
                     _in_flight(layout, rank), stage_memory(cfg, layout, partition, rank))


def _notes(plan: Plan) -> list[str]:
    """Warnings worth a line: groups crossing nodes that should not, memory over budget, bubbles."""
    lay, notes = plan.layout, []
    if lay.tp > 1 and any(_nodes_of(g, lay.gpus_per_node) > 1 for g in plan.groups["tp"]):
        notes.append(f"tp groups span nodes (tp {lay.tp} vs {lay.gpus_per_node} GPUs per node): "
                     f"tensor parallelism needs the intra-node links; use tp <= gpus per node")
    for s in plan.stages:
        if s.memory.total > plan.gpu_mem_bytes:
            notes.append(f"pipeline rank {s.rank} needs ~{s.memory.total / GIB:.1f} GiB > "
                         f"{plan.gpu_mem_bytes / GIB:g} GiB: raise tp/pp/ep, enable parallel.zero1, "
                         f"training.activation_checkpointing, or lower training.micro_batch_size")
        elif s.memory.total > 0.9 * plan.gpu_mem_bytes:
            notes.append(f"pipeline rank {s.rank} uses {s.memory.total / plan.gpu_mem_bytes:.0%} of "
                         f"{plan.gpu_mem_bytes / GIB:g} GiB before the CUDA context and fragmentation "
                         f"(1-3 GiB): tight; consider parallel.sequence_parallel or parallel.zero1")
    if lay.pp > 1 and lay.n_micro < lay.pp:
        notes.append(f"{lay.n_micro} micro-batches < {lay.pp} pipeline stages: most of the step is "
                     f"bubble; raise training.global_batch_size or lower micro_batch_size")
    return notes


def _nodes_of(ranks: list[int], gpus_per_node: int) -> int:
    return len({r // gpus_per_node for r in ranks})


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def format_plan(plan: Plan, max_rows: int = 16) -> str:
    """The planner's report: layout, groups, rank grid, partition, memory, FLOPs, bubble, notes."""
    parts = [_format_header(plan), _format_groups(plan)]
    parts += [_format_grid(plan, r, max_rows) for r in range(plan.layout.pp)]
    parts += [_format_partition(plan), _format_memory(plan), _format_compute(plan)]
    if plan.notes:
        parts.append("Notes:\n" + "\n".join(f"  ! {n}" for n in plan.notes))
    return "\n\n".join(parts)


def _format_header(plan: Plan) -> str:
    lay, m, t = plan.layout, plan.cfg.model, plan.cfg.training
    kind = (f"MoE {m.n_experts} experts top-{m.top_k} ({m.n_experts // lay.ep} per GPU)"
            if m.n_experts else "dense")
    sched = f"schedule {lay.schedule}" + (f" (vpp {lay.vpp})" if lay.vpp > 1 else "")
    return "\n".join([
        f"Model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.kv_heads} kv), {kind}; "
        f"{_count(plan.total_params)} parameters, {_count(plan.active_params)} active",
        f"Layout: {lay.nodes} node(s) x {lay.gpus_per_node} GPUs = {lay.world} ranks; tp {lay.tp} x "
        f"pp {lay.pp} x dp {lay.dp} (dp = ep {lay.ep} x edp {lay.edp}); {sched}; sequence parallel "
        f"{'on' if lay.sequence_parallel else 'off'}; zero1 {'on' if plan.cfg.parallel.zero1 else 'off'}",
        f"Batch: global {t.global_batch_size} = dp {lay.dp} x micro {lay.micro_batch} x {lay.n_micro} "
        f"micro-batches; seq_len {lay.seq_len}; {plan.tokens_per_step:,} tokens per step; precision "
        f"{t.precision}; activation checkpointing {'on' if t.activation_checkpointing else 'off'}",
    ])


def _format_groups(plan: Plan) -> str:
    """One line per group kind: count, size, the first group, how many stay inside one node."""
    g = plan.layout.gpus_per_node
    rows = ["Process groups (global rank = pp_rank*dp*tp + dp_rank*tp + tp_rank; tp innermost):",
            f"  {'kind':<4} {'groups':>6} {'size':>4}  {'inside one node':>15}  first group"]
    for kind in GROUP_KINDS:
        groups = plan.groups[kind]
        inside = sum(_nodes_of(grp, g) == 1 for grp in groups)
        first = _short_list(groups[0])
        rows.append(f"  {kind:<4} {len(groups):>6} {len(groups[0]):>4}  {f'{inside}/{len(groups)}':>15}  {first}")
    return "\n".join(rows)


def _count(n: int) -> str:
    """1234567 -> '1.235M', 40.8e9 -> '40.82B'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{2 if suffix == 'B' else 3}f}{suffix}"
    return str(n)


def _short_list(ranks: list[int], keep: int = 8) -> str:
    if len(ranks) <= keep:
        return str(ranks)
    return "[" + ", ".join(map(str, ranks[:keep - 2])) + f", ..., {ranks[-1]}]"


def _format_grid(plan: Plan, pp_rank: int, max_rows: int) -> str:
    """Global ranks of one pipeline stage: a row per dp rank, a column per tp rank, node lines.
    Unfolded, a row's (ep, edp) is its dp rank's; with experts folded over tp x dp every cell
    carries its own expert-parallel rank (rank:e<ep>)."""
    lay, g = plan.layout, plan.layout.gpus_per_node
    folded = plan.cfg.parallel.fold_experts
    coords = {c.rank: c for c in plan.grid}
    width = max(len(str(lay.world - 1)), 3) + (len(str(lay.ep - 1)) + 2 if folded else 0)
    head = " ".join(f"{f'tp{t}':>{width}}" for t in range(lay.tp))
    what = ("rows: dp rank; columns: tp rank; cells: global rank:e<ep rank>, experts folded over "
            "tp x dp" if folded else "rows: dp rank = edp*ep + ep; columns: tp rank")
    rows = [f"Rank grid, pipeline rank {pp_rank} ({what}):",
            f"  {'dp' if folded else 'dp (ep, edp)':<16} {head}"]
    shown = _shown_rows(lay.dp, max_rows)
    last_node = None
    for d in range(lay.dp):
        ranks = [rank_of(pp_rank, d, t, lay.dp, lay.tp) for t in range(lay.tp)]
        nodes = sorted({r // g for r in ranks})
        if nodes[0] != last_node and d in shown:
            rows.append(f"  -- node {nodes[0]} --")
        last_node = nodes[-1]
        if d not in shown:
            if d - 1 in shown:
                rows.append(f"  ... ({lay.dp - len(shown)} rows)")
            continue
        label = f"{d}" if folded else f"{d} ({d % lay.ep}, {d // lay.ep})"
        texts = [f"{r}:e{coords[r].ep}" if folded else str(r) for r in ranks]
        cells = " ".join(f"{t:>{width}}" for t in texts)
        split = "  (row spans nodes " + ", ".join(map(str, nodes)) + ")" if len(nodes) > 1 else ""
        rows.append(f"  {label:<16} {cells}{split}")
    return "\n".join(rows)


def _shown_rows(n: int, max_rows: int) -> set[int]:
    if n <= max_rows:
        return set(range(n))
    return set(range(max_rows - max_rows // 4)) | set(range(n - max_rows // 4, n))


def _format_partition(plan: Plan) -> str:
    """format_partition's load table, then each virtual stage's layers marked M (MoE) / D (dense)."""
    lay, m = plan.layout, plan.cfg.model
    table = format_partition(plan.partition, [c / 1e12 for c in plan.costs], lay.pp, lay.vpp,
                             plan.first_extra / 1e12, plan.last_extra / 1e12)
    rows = ["Pipeline partition (load = forward TFLOP per sequence, moe.stages costs; the first stage "
            "adds the embedding, the last the LM head):",
            *("  " + line for line in table.splitlines()), "Layers per virtual stage (M = MoE block, D = dense block):"]
    for v, layers in enumerate(plan.partition):
        marks = "".join("M" if m.is_moe_layer(i) else "D" for i in layers) or "-"
        span = f"{layers[0]}-{layers[-1]}" if layers else "none"
        extra = (" + embedding" if v == 0 else "") + (" + norm/head" if v == len(plan.partition) - 1 else "")
        rows.append(f"  vstage {v:>2} (rank {v % lay.pp}): layers {span:<7} {marks}{extra}")
    return "\n".join(rows)


def _format_memory(plan: Plan) -> str:
    """Per-GPU parameters and memory at each pipeline rank's peak, in GiB (MiB for small models)."""
    lay = plan.layout
    unit, name = (GIB, "GiB") if max(s.memory.total for s in plan.stages) >= GIB else (2 ** 20, "MiB")
    rows = [f"Per GPU at its peak, by pipeline rank (parameters after tp {lay.tp} / ep {lay.ep} "
            f"sharding; memory in {name}, budget {plan.gpu_mem_bytes / GIB:g} GiB per GPU):",
            f"  {'rank':>4} {'layers':>6} {'params':>8} {'experts':>8} {'weights':>7} {'grads':>6} "
            f"{'optim':>6} {'activ':>7} {'temp':>6} {'inflight':>8} {'total':>7} {'fits':>4}"]
    for s in plan.stages:
        mem, n_layers = s.memory, sum(len(c) for c in s.chunks)
        widths = ((mem.parameters, 7), (mem.gradients, 6), (mem.optimizer, 6),
                  (mem.activations, 7), (mem.temporaries, 6))
        cells = " ".join(f"{v / unit:>{w}.2f}" for v, w in widths)
        fits = "yes" if mem.total <= plan.gpu_mem_bytes else "NO"
        rows.append(f"  {s.rank:>4} {n_layers:>6} {_count(s.params):>8} {_count(s.expert_params):>8} "
                    f"{cells} {s.in_flight:>8} {mem.total / unit:>7.2f} {fits:>4}")
    routing = "" if plan.imbalance is None else (f"; MoE sized for forced routing, imbalance "
                                                 f"{plan.imbalance:g}, on the busiest ep rank")
    rows.append(f"  tensor by tensor (train/footprint.py): activations alive at the peak of the "
                f"replayed schedule, temporaries of the loss or of the first backward op{routing}")
    if plan.tied_replica_params:
        rows.append(f"  the tied LM head is replicated on the last stage (+{plan.tied_replica_params:,} parameters)")
    return "\n".join(rows)


def _format_compute(plan: Plan) -> str:
    lay = plan.layout
    bubble = (f"{plan.bubble:.1%} ({lay.schedule}, pp {lay.pp}, vpp {lay.vpp}, {lay.n_micro} micro-batches)"
              if lay.pp > 1 else "none (pp 1)")
    return "\n".join([
        f"FLOPs per step: {plan.flops_per_step:.4g} (matmuls only: 6 N tokens + 12 L d S tokens, N "
        f"the active matmul parameters); per GPU {plan.flops_per_gpu:.4g}",
        f"Pipeline bubble: {bubble}",
    ])
