"""Layout search: every (tp, pp, vpp, ep and folding, ZeRO-1, sequence parallel, recompute,
micro-batch) that a config's model and global batch allow on a cluster, the ones that fit in
memory, ranked by a predicted step time.

Memory is the planner's (train/plan.py, tensor by tensor in train/footprint.py), checked on the
first pipeline rank of each kind (the same blocks per chunk, the embedding, the head): the
schedules keep the most micro-batches in flight on the lowest rank of a kind. Run
`launchers/plan.py --simulate` on the layout you pick to measure it on the real step.

Step time, per optimizer step (a model for ranking, not a promise):
    t_mb   = (3 + r) F_stage / (tp peak eff)       the slowest stage's compute per micro-batch
             + tensor-parallel all-reduces  5 per block x 2 (tp-1)/tp T D c / bw(tp group)
             + expert all-to-alls          4 per MoE block x (ep-1)/ep N D c / bw(ep group)
             + pipeline send/receive        2 T_n D c / bw(inter-node)
    t_step = n_micro t_mb / (1 - bubble) + data-parallel gradient reduction 2 (n-1)/n x 4 bytes x
             gradients / bw(dp or edp group)   (not overlapped: an upper bound)
F_stage: the heaviest stage's forward FLOPs per micro-batch (moe.stages costs), r = 1 under full
recompute (forward again), 0.1 under selective (the memory-bound ops again; Korthikanti et al.
measured 2.7% of a step), 0 otherwise; bubble from parallel.partition.bubble_fraction; a group
inside one node uses NVLink bandwidth, across nodes the network's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from parallel.partition import bubble_fraction, chunk_specs, chunks_of_rank, stage_loads

from .config import TrainConfig
from .footprint import rank_params
from .metrics import model_flops_per_token
from .plan import (GIB, Layout, check_pretraining, plan_partition, rank_kinds, resolve_layout,
                   sizing_model, stage_memory)

PEAK_FLOPS = 989e12        # H100 SXM dense bf16 (float32 runs at half: TF32)
EFFICIENCY = 0.5           # fraction of peak the GEMMs reach
INTRA_NODE_BW = 300e9      # bytes/s per GPU inside a node (NVLink, collective algorithm bandwidth)
INTER_NODE_BW = 40e9       # bytes/s per GPU across nodes (400 Gb/s InfiniBand, effective)
RECOMPUTE = (None, "selective", "full")
_RECOMPUTE_COST = {"full": 1.0, "selective": 0.1}  # extra forwards: all, or the memory-bound ops
MICRO_BATCHES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Candidate:
    """One layout that fits, with its heaviest checked rank's peak and the predicted step time."""

    tp: int
    pp: int
    vpp: int
    ep: int
    fold: bool
    dp: int
    zero1: bool
    sequence_parallel: bool
    recompute: str | None
    micro_batch: int
    peak: int
    step_s: float
    mfu: float

    def overrides(self) -> list[str]:
        """The key=value overrides that select this layout."""
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.vpp={self.vpp}",
               f"parallel.ep={self.ep}", f"parallel.fold_experts={str(self.fold).lower()}",
               f"parallel.zero1={str(self.zero1).lower()}",
               f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
               f"training.micro_batch_size={self.micro_batch}",
               f"training.activation_checkpointing={str(self.recompute is not None).lower()}"]
        if self.vpp > 1:
            out.append("parallel.pp_schedule=interleaved")
        return out + ([f"training.recompute={self.recompute}"] if self.recompute else [])


@dataclass
class Family:
    """What became of one (tp, pp): how many layouts fit, else the best reason they do not."""

    fits: int = 0
    least: int | None = None        # the smallest peak over the budget, bytes
    least_rank: int = 0
    invalid: str | None = None      # a planner error, when no variant was even valid

    def outcome(self, budget: int) -> str:
        if self.fits:
            return f"fits: {self.fits} layout(s)"
        if self.least is not None:
            return (f"needs {self.least / GIB:.1f} GiB > {budget / GIB:g} on pipeline rank "
                    f"{self.least_rank} even with ZeRO-1, full recompute and micro-batch 1")
        return f"invalid: {self.invalid}"


@dataclass
class Search:
    cfg: TrainConfig
    nodes: int
    gpus_per_node: int
    budget: int
    fits: list[Candidate] = field(default_factory=list)
    families: dict[tuple[int, int], Family] = field(default_factory=dict)   # (tp, pp) -> outcome
    partitions: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (pp, vpp) -> split
    flops: float = 0.0       # model FLOPs of one step
    headroom: float = 0.0    # the share of each GPU kept free


def search_layouts(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu_mem_gb: float = 80.0,
                   headroom: float = 0.0) -> Search:
    """Layouts whose heaviest rank fits gpu_mem_gb less `headroom` (a fraction). Every family
    (tp, pp, vpp, ep, folding) is first tried with the least memory it can use (ZeRO-1, sequence
    parallelism, full recompute, micro-batch 1); a family that does not fit then is rejected with
    its peak, one that is invalid with the planner's error, and the variants of the others are
    sized and timed."""
    check_pretraining(cfg)
    world = nodes * gpus_per_node
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"--headroom ({headroom}) must be a fraction in [0, 1), e.g. 0.05")
    budget = int(gpu_mem_gb * (1 - headroom) * GIB)
    search = Search(cfg, nodes, gpus_per_node, budget, flops=model_flops(cfg), headroom=headroom)
    for fam in _families(cfg, world, gpus_per_node):
        family = search.families.setdefault(fam[:2], Family())
        lean = _try(_config(cfg, fam, True, fam[0] > 1, "full", 1), nodes, gpus_per_node, search)
        if not isinstance(lean, Candidate):
            _reject(family, lean)
            continue
        for variant in _variants(cfg, fam, lean.dp):
            result = _try(variant, nodes, gpus_per_node, search)
            if isinstance(result, Candidate):
                search.fits.append(result)
                family.fits += 1
    search.fits.sort(key=lambda c: (c.step_s, c.peak))
    return search


def _reject(family: Family, why: str | tuple[int, int]) -> None:
    if isinstance(why, tuple):
        if family.least is None or why[0] < family.least:
            family.least, family.least_rank = why
    elif family.invalid is None:
        family.invalid = why


def _families(cfg: TrainConfig, world: int, gpus_per_node: int):
    """(tp, pp, vpp, ep, fold): ep divides dp, or with folding (tp > 1) tp x dp."""
    m = cfg.model
    for tp in (d for d in _divisors(gpus_per_node) if world % d == 0):
        for pp in (d for d in _divisors(world // tp) if d <= m.n_layers):
            for vpp in (1, 2, 4) if pp > 1 else (1,):
                if pp * vpp > m.n_layers:
                    continue
                dp = world // (tp * pp)
                for fold in ((False, True) if tp > 1 and m.n_experts else (False,)):
                    for ep in _expert_sizes(m.n_experts, dp * tp if fold else dp):
                        yield tp, pp, vpp, ep, fold


def _expert_sizes(n_experts: int, domain: int) -> list[int]:
    """ep sizes that divide the expert domain (dp, or tp x dp folded) and the experts."""
    if not n_experts:
        return [1]
    return [e for e in _divisors(domain) if n_experts % e == 0]


def _variants(cfg: TrainConfig, fam: tuple, dp: int):
    rows = cfg.training.global_batch_size // dp
    for zero1 in ((False, True) if dp > 1 else (False,)):
        for sp in ((False, True) if fam[0] > 1 else (False,)):
            for recompute in RECOMPUTE:
                for micro in (b for b in MICRO_BATCHES if rows % b == 0):
                    yield _config(cfg, fam, zero1, sp, recompute, micro)


def _config(cfg: TrainConfig, fam: tuple, zero1: bool, sp: bool, recompute: str | None,
            micro: int) -> TrainConfig | str:
    """cfg with this layout, or the one-line reason it is not a valid config."""
    tp, pp, vpp, ep, fold = fam
    schedule = cfg.parallel.pp_schedule
    if vpp > 1 or schedule == "interleaved":  # interleaving needs vpp > 1; vpp 1 runs 1F1B
        schedule = "interleaved" if vpp > 1 else "1f1b"
    parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, vpp=vpp, ep=ep, dp=0,
                                   fold_experts=fold, zero1=zero1, sequence_parallel=sp,
                                   pp_schedule=schedule, stage_layers=None,
                                   first_stage_layers=None, last_stage_layers=None)
    training = dataclasses.replace(cfg.training, micro_batch_size=micro,
                                   activation_checkpointing=recompute is not None,
                                   recompute=recompute or "full")
    try:
        return dataclasses.replace(cfg, parallel=parallel, training=training)
    except ValueError as e:
        return str(e)


def _try(cfg: TrainConfig | str, nodes: int, gpus_per_node: int,
         search: Search) -> Candidate | str | tuple[int, int]:
    """The candidate; or why not: the planner's message when invalid, (peak, rank) when too big."""
    if isinstance(cfg, str):
        return cfg
    try:
        layout = resolve_layout(cfg, nodes, gpus_per_node)
        key = (layout.pp, layout.vpp)
        if key not in search.partitions:
            search.partitions[key] = plan_partition(cfg)
    except ValueError as e:
        return str(e)
    partition, costs, first, last = search.partitions[key]
    ranks = rank_kinds(cfg.model, partition, layout.pp)
    peaks = {r: stage_memory(cfg, layout, partition, r).total for r in ranks}
    heaviest = max(peaks, key=peaks.get)
    if peaks[heaviest] > search.budget:
        return peaks[heaviest], heaviest
    t = cfg.training
    step = step_seconds(cfg, layout, partition, costs, first, last)
    return Candidate(layout.tp, layout.pp, layout.vpp, layout.ep, cfg.parallel.fold_experts,
                     layout.dp, cfg.parallel.zero1, layout.sequence_parallel,
                     t.recompute if t.activation_checkpointing else None,
                     layout.micro_batch, peaks[heaviest], step,
                     search.flops / (layout.world * step * PEAK_FLOPS))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------


def _bandwidth(span: int, gpus_per_node: int) -> float:
    """A group of `span` consecutive ranks (its first to its last) stays inside a node or not."""
    return INTRA_NODE_BW if span <= gpus_per_node else INTER_NODE_BW


def step_seconds(cfg: TrainConfig, layout: Layout, partition, costs, first: float,
                 last: float) -> float:
    """The module docstring's model, for the slowest pipeline stage."""
    lay, fp32 = layout, cfg.training.precision == "fp32"
    peak = PEAK_FLOPS / (2 if fp32 else 1) * EFFICIENCY
    loads = stage_loads(partition, costs, first, last)  # + the embedding and the head
    per_rank = [sum(loads[r::lay.pp]) for r in range(lay.pp)]
    slow = max(range(lay.pp), key=lambda r: per_rank[r])
    layers = [i for chunk in chunks_of_rank(partition, lay.pp, slow) for i in chunk]
    redo = _RECOMPUTE_COST[cfg.training.recompute] if cfg.training.activation_checkpointing else 0.0
    t_mb = (3 + redo) * lay.micro_batch * per_rank[slow] / lay.tp / peak
    t_mb += _comm_per_micro_batch(cfg, lay, layers, 4 if fp32 else 2)
    bubble = bubble_fraction(lay.schedule, lay.pp, lay.vpp, lay.n_micro) if lay.pp > 1 else 0.0
    return lay.n_micro * t_mb / (1 - bubble) + _grad_reduce_seconds(cfg, lay, partition, slow)


def _comm_per_micro_batch(cfg: TrainConfig, lay: Layout, layers: list[int], c: int) -> float:
    """Tensor-parallel all-reduces, expert all-to-alls and pipeline sends of one micro-batch
    through `layers` (forward and backward; see the module docstring)."""
    m, gpn = sizing_model(cfg), lay.gpus_per_node
    width = lay.micro_batch * lay.seq_len * m.d_model * c     # bytes of [T, D]
    out = 0.0
    if lay.tp > 1:
        out += 5 * len(layers) * 2 * (lay.tp - 1) / lay.tp * width / _bandwidth(lay.tp, gpn)
    if lay.ep > 1:
        n_moe = sum(m.is_moe_layer(i) for i in layers)
        span = lay.ep if cfg.parallel.fold_experts else lay.tp * lay.ep  # consecutive ranks
        rows = width // lay.tp * m.top_k                                  # N D c bytes
        out += 4 * n_moe * (lay.ep - 1) / lay.ep * rows / _bandwidth(span, gpn)
    if lay.pp > 1:
        out += 2 * width // (lay.tp if lay.sequence_parallel else 1) / INTER_NODE_BW
    return out


def _grad_reduce_seconds(cfg: TrainConfig, lay: Layout, partition, rank: int) -> float:
    """All-reduce (or reduce + broadcast under ZeRO-1: the same bytes) of the float32 gradients:
    dense ones over dp, expert ones over edp (both span tp x dp consecutive ranks)."""
    specs = chunk_specs(partition, lay.pp, rank)
    params = [p for chunk in rank_params(sizing_model(cfg), specs, lay.tp, lay.ep) for p in chunk]
    expert = sum(p.n for p in params if p.expert)
    dense = sum(p.n for p in params) - expert
    bw = _bandwidth(lay.tp * lay.dp, lay.gpus_per_node)
    out = 2 * (lay.dp - 1) / lay.dp * 4 * dense / bw
    return out + 2 * (lay.edp - 1) / lay.edp * 4 * expert / bw


def model_flops(cfg: TrainConfig) -> float:
    """Matmul FLOPs of one step: 6 N + 12 L d S per token, N the active matmul parameters
    (train.metrics.flops_per_token; recompute not counted)."""
    tokens = cfg.training.global_batch_size * cfg.data.seq_len
    return model_flops_per_token(cfg.model, cfg.data.seq_len) * tokens


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def format_search(search: Search, top: int = 15) -> str:
    """The fitting layouts, fastest first, then each (tp, pp) family's outcome."""
    m, t = search.cfg.model, search.cfg.training
    world, gpu = search.nodes * search.gpus_per_node, search.budget / (1 - search.headroom)
    kind = f"{m.n_experts} experts top-{m.top_k}" if m.n_experts else "dense"
    less = f" less {search.headroom:.0%} headroom" if search.headroom else ""
    rows = [f"Layout search: {m.n_layers} layers, d_model {m.d_model}, {kind}; global batch "
            f"{t.global_batch_size} x {search.cfg.data.seq_len} tokens, precision {t.precision}; "
            f"{search.nodes} node(s) x {search.gpus_per_node} GPUs = {world}, {gpu / GIB:g} GiB "
            f"each{less}",
            f"{len(search.fits)} layouts fit; the fastest {min(top, len(search.fits))} by "
            f"predicted step time (peak: the heaviest pipeline rank; ep 16f: folded over tp x dp):",
            f"  {'tp':>3} {'pp':>3} {'vpp':>3} {'ep':>4} {'dp':>4} {'zero1':>5} {'sp':>3} "
            f"{'recompute':>9} {'micro':>5} {'peak GiB':>8} {'headroom':>8} {'step s':>7} "
            f"{'MFU':>5}"]
    rows += [_candidate_row(c, gpu) for c in search.fits[:top]]
    rows.append("By (tp, pp) family (over vpp, ep, folding and the memory options):")
    rows += _family_rows(search)
    if search.fits:
        rows.append("The fastest as overrides: " + " ".join(search.fits[0].overrides()))
    rows.append(f"Step time: FLOPs at {EFFICIENCY:.0%} of {PEAK_FLOPS / 1e12:g} TFLOP/s, NVLink "
                f"{INTRA_NODE_BW / 1e9:g} GB/s, network {INTER_NODE_BW / 1e9:g} GB/s per GPU, no "
                f"overlap (train/search.py); check the pick with --simulate")
    return "\n".join(rows)


def _candidate_row(c: Candidate, gpu: float) -> str:
    def on(flag: bool) -> str:
        return "on" if flag else "off"

    ep = f"{c.ep}{'f' if c.fold else ''}"
    return (f"  {c.tp:>3} {c.pp:>3} {c.vpp:>3} {ep:>4} {c.dp:>4} {on(c.zero1):>5} "
            f"{on(c.sequence_parallel):>3} {c.recompute or 'none':>9} {c.micro_batch:>5} "
            f"{c.peak / GIB:>8.2f} {1 - c.peak / gpu:>8.1%} {c.step_s:>7.3g} {c.mfu:>5.1%}")


def _family_rows(search: Search) -> list[str]:
    """One row per (tp, pp); the pp values of one tp that fail for the same reason share a row."""
    rows, run = [], []
    for (tp, pp), family in sorted(search.families.items()) + [((0, 0), None)]:
        text = family.outcome(search.budget) if family is not None else None
        if run and (tp != run[0][0] or text != run[0][2] or text.startswith("needs")):
            pps = f"{run[0][1]}" if len(run) == 1 else f"{run[0][1]}-{run[-1][1]}"
            rows.append(f"  tp {run[0][0]:>2} pp {pps:>5}: {run[0][2]}")
            run = []
        run.append((tp, pp, text))
    return rows
