"""Pipeline planning math: which decoder layers each pipeline stage holds, and what a schedule costs.

Model-agnostic by design: the partitioner sees one cost per decoder block (a MoE block weighs more
than a dense one) plus the extra cost of the embedding (first stage) and of the final norm + LM head
(last stage); it never sees modules. The pipeline builder then constructs only its own layers.

Vocabulary (Megatron's interleaving):
    S = pp * vpp virtual stages in pipeline order; virtual stage v lives on rank v % pp, as that
    rank's chunk v // pp. So rank r holds chunks r, r + pp, r + 2 pp, ... of the model.
    A partition is a list of S lists of layer indices, each contiguous and in order; concatenated
    they are exactly 0 .. n_layers - 1 (`check_partition` enforces this, the anchors' pitfall being
    uneven splits that silently drop layers).
    load(stage) = sum of its layer costs (+ first_extra on stage 0, + last_extra on stage S - 1).
"""

import itertools
import math
from collections import Counter
from numbers import Integral, Real

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "interleaved")
_REL_TOL = 1e-9  # ties in the float objective are decided by layer counts, not by rounding noise


# ---------------------------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------------------------


def partition_layers(
    costs: list[float],
    pp: int,
    vpp: int = 1,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    stage_layers: list[int] | None = None,
    first_extra: float = 0.0,
    last_extra: float = 0.0,
) -> list[list[int]]:
    """Split decoder layers into pp * vpp contiguous virtual stages, balancing the stage loads.

    Objective, in priority order (over all splits into S = pp * vpp non-empty contiguous runs):
      1. minimise the bottleneck max_s load(s): the slowest stage sets the pipeline's pace;
      2. among those, minimise sum_s load(s)^2: spread the remaining slack evenly instead of
         packing some stages to the bottleneck and starving others;
      3. among those, the lexicographically smallest layer-count vector, i.e. earlier virtual
         stages get fewer layers. Why: under 1F1B rank r keeps up to pp - r micro-batches of
         activations alive, so the early ranks are the memory-hungry ones (and stage 0 also holds
         the embedding). Example: 10 equal layers on 4 stages -> counts [2, 2, 3, 3].
    Solved exactly by dynamic programming over (stage, first layer) in O(S * n^2) (numpy; n <= ~200).

    Overrides:
      first_stage_layers / last_stage_layers fix the count on the first / last virtual stage; the
        other stages are balanced over the remaining layers. 0 is allowed here: an embedding-only
        first stage or a head-only last stage, as Megatron allows.
      stage_layers gives every virtual stage's count (sum = n_layers); 0 only on the first or last;
        no balancing happens, so the extras do not matter then.
    Every other stage holds >= 1 layer. Costs must be finite and >= 0.
    """
    costs = _check_costs(costs)
    _check_degrees(pp, vpp)
    _check_extra("first_extra", first_extra)
    _check_extra("last_extra", last_extra)
    n_stages = pp * vpp
    if stage_layers is not None:
        if first_stage_layers is not None or last_stage_layers is not None:
            raise ValueError("pass either stage_layers or first_stage_layers/last_stage_layers, "
                             "not both: put the first/last counts into stage_layers")
        counts = _check_stage_layers(stage_layers, n_stages, len(costs))
    else:
        counts = _override_counts(costs, n_stages, first_stage_layers, last_stage_layers,
                                  first_extra, last_extra)
    partition = _counts_to_partition(counts)
    check_partition(partition, len(costs))
    return partition


def _override_counts(costs, n_stages, first, last, first_extra, last_extra) -> list[int]:
    """Fix the requested end counts, balance the middle; the extras follow their end stage."""
    n = len(costs)
    head, tail = _check_end_overrides(first, last, n_stages, n)
    if n_stages == 1:
        return [n]
    n_free = n_stages - len(head) - len(tail)
    if n_free == 0:
        return head + tail
    middle = costs[sum(head):n - sum(tail)]
    head_extra = 0.0 if head else first_extra
    tail_extra = 0.0 if tail else last_extra
    return head + _balanced_counts(middle, n_free, head_extra, tail_extra) + tail


def _check_end_overrides(first, last, n_stages, n) -> tuple[list[int], list[int]]:
    """Validate first/last_stage_layers against n layers and S stages; return them as lists."""
    for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        if value is not None:
            _check_int(name, value, 0, "pass a layer count >= 0, or None to balance it")
    if n_stages == 1:
        for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
            if value is not None and value != n:
                raise ValueError(f"{name} ({value}) must equal n_layers ({n}) when pp*vpp is 1: "
                                 f"the only stage holds every layer; drop the override")
        return [], []
    if first is None and last is None and n_stages > n:
        raise ValueError(f"pp*vpp ({n_stages}) virtual stages exceed n_layers ({n}): every stage "
                         f"needs >= 1 layer; lower pp or vpp (or allow an empty end stage via "
                         f"first_stage_layers=0 / last_stage_layers=0)")
    head = [] if first is None else [first]
    tail = [] if last is None else [last]
    n_free, free_layers = n_stages - len(head) - len(tail), n - sum(head) - sum(tail)
    given = f"first_stage_layers ({first}) and last_stage_layers ({last})"
    if n_free == 0 and free_layers != 0:
        raise ValueError(f"{given} must add up to n_layers ({n}) when pp*vpp is 2: "
                         f"adjust the overrides")
    if n_free > 0 and free_layers < n_free:
        raise ValueError(f"{given} leave {free_layers} of n_layers ({n}) for {n_free} other "
                         f"virtual stages, which need >= 1 layer each: lower the overrides or pp*vpp")
    return head, tail


def _check_stage_layers(stage_layers, n_stages, n) -> list[int]:
    """Validate an explicit per-virtual-stage count list (0 only on the two end stages)."""
    counts = list(stage_layers)
    if len(counts) != n_stages:
        raise ValueError(f"stage_layers has {len(counts)} entries but pp*vpp is {n_stages}: "
                         f"give one layer count per virtual stage")
    for s, count in enumerate(counts):
        _check_int(f"stage_layers[{s}]", count, 0, "layer counts cannot be negative")
        if count == 0 and 0 < s < n_stages - 1:
            raise ValueError(f"stage_layers[{s}] is 0: only the first or last virtual stage may "
                             f"hold 0 layers (embedding- or head-only); give it >= 1")
    if sum(counts) != n:
        raise ValueError(f"stage_layers sums to {sum(counts)} but n_layers is {n}: "
                         f"the counts must add up to the number of decoder layers")
    return [int(c) for c in counts]


def _balanced_counts(costs, n_stages, head_extra, tail_extra) -> list[int]:
    """Layer counts of the optimal split of `costs` into n_stages non-empty runs (see objective)."""
    load_JK = _segment_loads(costs, head_extra, tail_extra)
    bound = _min_bottleneck(load_JK, n_stages)
    return _min_square_counts(load_JK, n_stages, bound)


def _segment_loads(costs, head_extra, tail_extra) -> np.ndarray:
    """load_JK[j, k] = load of a stage holding layers j .. k-1 (inf unless j < k).

    A run starting at layer 0 is the first stage and one ending at n is the last, so the extras
    are a function of (j, k) alone; every later comparison uses these very floats (no rounding drift).
    """
    n = len(costs)
    prefix_K = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])  # (n+1,)
    load_JK = prefix_K[None, :] - prefix_K[:, None]                                     # (n+1, n+1)
    load_JK[0, :] += head_extra
    load_JK[:, n] += tail_extra
    j_idx, k_idx = np.indices(load_JK.shape)
    load_JK[k_idx <= j_idx] = np.inf  # every balanced stage holds >= 1 layer
    return load_JK


def _terminal(n: int) -> np.ndarray:
    """Value of placing layers j.. into zero stages: 0 if nothing is left (j == n), else impossible."""
    value_J = np.full(n + 1, np.inf)
    value_J[n] = 0.0
    return value_J


def _min_bottleneck(load_JK: np.ndarray, n_stages: int) -> float:
    """min over splits of max stage load: best_t[j] = min_k max(load[j, k], best_{t-1}[k])."""
    best_J = _terminal(load_JK.shape[0] - 1)
    for _ in range(n_stages):
        best_J = np.maximum(load_JK, best_J[None, :]).min(axis=1)
    return float(best_J[0])


def _min_square_counts(load_JK: np.ndarray, n_stages: int, bound: float) -> list[int]:
    """Counts minimising sum load^2 with every load <= bound; ties -> fewest layers up front.

    tables[t][j] = min over placements of layers j.. into t stages of sum load^2, then a forward
    trace picks, stage by stage, the smallest end k that still attains the optimum.
    """
    n = load_JK.shape[0] - 1
    square_JK = np.where(load_JK <= bound, load_JK * load_JK, np.inf)
    tables = [_terminal(n)]
    for _ in range(n_stages):
        tables.append((square_JK + tables[-1][None, :]).min(axis=1))
    counts, j = [], 0
    for t in range(n_stages, 0, -1):
        total_K = square_JK[j] + tables[t - 1]
        k = int(np.flatnonzero(total_K <= tables[t][j] * (1.0 + _REL_TOL))[0])
        counts.append(k - j)
        j = k
    return counts


def _counts_to_partition(counts: list[int]) -> list[list[int]]:
    """[2, 3] -> [[0, 1], [2, 3, 4]]."""
    starts = [0, *itertools.accumulate(counts)]
    return [list(range(starts[s], starts[s + 1])) for s in range(len(counts))]


def check_partition(partition: list[list[int]], n_layers: int) -> None:
    """Raise unless the stages, concatenated in order, are exactly layers 0 .. n_layers - 1.

    This is the guard against the anchors' pitfall (uneven splits silently dropping layers); any
    code that receives a partition from elsewhere (a config, a checkpoint) should call it.
    """
    flat = [layer for stage in partition for layer in stage]
    if flat == list(range(n_layers)):
        return
    seen = set(flat)
    missing = sorted(set(range(n_layers)) - seen)
    twice = sorted(layer for layer, times in Counter(flat).items() if times > 1)
    foreign = sorted(seen - set(range(n_layers)))
    if missing or twice or foreign:
        raise ValueError(f"partition must place each of the {n_layers} layers exactly once: "
                         f"missing {missing}, placed twice {twice}, out of range {foreign}")
    raise ValueError(f"partition places every layer once but not contiguously in order ({flat}): "
                     f"stages must hold consecutive runs of layers in pipeline order")


# ---------------------------------------------------------------------------------------------
# Reading a partition
# ---------------------------------------------------------------------------------------------


def stage_of_layer(partition: list[list[int]], pp: int) -> dict[int, tuple[int, int]]:
    """layer -> (virtual_stage, rank), with rank = virtual_stage % pp (Megatron interleaving)."""
    _check_chunking(partition, pp)
    return {layer: (v, v % pp) for v, stage in enumerate(partition) for layer in stage}


def chunks_of_rank(partition: list[list[int]], pp: int, rank: int) -> list[list[int]]:
    """The layer lists rank `rank` builds, chunk by chunk: virtual stages rank, rank + pp, ..."""
    _check_chunking(partition, pp)
    _check_int("rank", rank, 0, f"ranks are 0 .. pp - 1 ({pp - 1})")
    if rank >= pp:
        raise ValueError(f"rank ({rank}) must be < pp ({pp}): ranks are 0 .. {pp - 1}")
    return [list(stage) for stage in partition[rank::pp]]


def chunk_specs(partition: list[list[int]], pp: int, rank: int) -> list[tuple[list[int], bool, bool]]:
    """(layers, holds the embedding, holds the head) of each chunk rank `rank` builds."""
    last = len(partition) - 1
    return [(layers, v == 0, v == last)
            for v, layers in zip(range(rank, len(partition), pp), chunks_of_rank(partition, pp, rank))]


def stage_loads(partition: list[list[int]], costs: list[float], first_extra: float = 0.0,
                last_extra: float = 0.0) -> list[float]:
    """load(s) = sum of costs of stage s's layers, + first_extra on stage 0, + last_extra on the last."""
    check_partition(partition, len(costs))
    loads = [float(sum(costs[layer] for layer in stage)) for stage in partition]
    loads[0] += first_extra
    loads[-1] += last_extra
    return loads


def format_partition(partition: list[list[int]], costs: list[float], pp: int, vpp: int,
                     first_extra: float = 0.0, last_extra: float = 0.0) -> str:
    """A small table for the planning tool: one row per virtual stage, then the imbalance.

    imbalance = max load / mean load; 1.00 is perfect, and the pipeline runs at the pace of the max.
    """
    _check_degrees(pp, vpp)
    if len(partition) != pp * vpp:
        raise ValueError(f"partition has {len(partition)} virtual stages but pp*vpp is {pp * vpp}: "
                         f"pass the pp and vpp the partition was made with")
    loads = stage_loads(partition, costs, first_extra, last_extra)
    rows = [f"{'vstage':>6} {'rank':>4} {'chunk':>5}  {'layers':<9} {'count':>5} {'load':>10}"]
    for v, (stage, load) in enumerate(zip(partition, loads)):
        span = f"{stage[0]}-{stage[-1]}" if stage else "-"
        rows.append(f"{v:>6} {v % pp:>4} {v // pp:>5}  {span:<9} {len(stage):>5} {load:>10.4g}")
    mean = sum(loads) / len(loads)
    ratio = max(loads) / mean if mean > 0 else 1.0
    rows.append(f"max load {max(loads):.4g}, mean {mean:.4g}, imbalance (max/mean) {ratio:.2f}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Schedule math
# ---------------------------------------------------------------------------------------------


def bubble_fraction(schedule: str, pp: int, vpp: int, n_microbatches: int) -> float:
    """Idle fraction of a pipeline step: bubble time / (bubble time + useful time), ideal case.

    With p stages, m micro-batches and per-micro-batch stage times t_f, t_b (Narayanan et al. 2021,
    "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", sec. 2.2):
      gpipe, 1f1b:  bubble = (p - 1)(t_f + t_b), useful = m (t_f + t_b)
                    -> fraction = (p - 1) / (m + p - 1)
      interleaved:  each rank's v chunks shrink the bubble v-fold: bubble = (p - 1)(t_f + t_b) / v
                    -> fraction = (p - 1) / (v m + p - 1)
    The paper quotes bubble / useful = (p - 1) / m (resp. (p - 1) / (v m)); this is bubble / total.
    1F1B has GPipe's bubble (it only caps activation memory). The interleaved derivation assumes
    m is a multiple of p, as Megatron's schedule does. vpp must be 1 unless schedule="interleaved".
    """
    _check_schedule_args(schedule, pp, vpp, n_microbatches)
    chunks = vpp if schedule == "interleaved" else 1
    return (pp - 1) / (chunks * n_microbatches + pp - 1)


def activation_microbatches_in_flight(schedule: str, pp: int, vpp: int, n_microbatches: int,
                                      stage_rank: int) -> int:
    """Peak number of forward passes whose activations rank `stage_rank` holds at once.

      gpipe:       m: every forward runs before any backward.
      1f1b:        min(m, pp - r): Megatron's warmup of pp - r - 1 forwards, then one more forward
                   before the first backward frees one (steady state 1F1B).
      interleaved: min(m * vpp, 2 (pp - r - 1) + (vpp - 1) pp + 1): Megatron-Core's warmup count
                   (get_pp_rank_microbatches with microbatch_group_size_per_vp_stage = pp) plus
                   the steady-state forward. The unit here is one micro-batch through ONE chunk
                   (about 1/vpp of the rank's layers), not through the whole rank. Older Megatron
                   special-cased m == pp as all-warmup (m * vpp); we follow the current count.
    """
    _check_schedule_args(schedule, pp, vpp, n_microbatches)
    _check_int("stage_rank", stage_rank, 0, f"ranks are 0 .. pp - 1 ({pp - 1})")
    if stage_rank >= pp:
        raise ValueError(f"stage_rank ({stage_rank}) must be < pp ({pp}): ranks are 0 .. {pp - 1}")
    if schedule == "gpipe":
        return n_microbatches
    if schedule == "1f1b":
        return min(n_microbatches, pp - stage_rank)
    warmup = 2 * (pp - stage_rank - 1) + (vpp - 1) * pp
    return min(n_microbatches * vpp, warmup + 1)


# ---------------------------------------------------------------------------------------------
# Validation (one-line errors naming the field and the fix)
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value, low: int, fix: str) -> None:
    """Raise unless value is an integer >= low."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}): {fix}")
    if value < low:
        raise ValueError(f"{name} ({value}) must be >= {low}: {fix}")


def _check_degrees(pp, vpp) -> None:
    """pp >= 1, vpp >= 1, and interleaving (vpp > 1) needs a real pipeline (pp >= 2)."""
    _check_int("pp", pp, 1, "use pp=1 for no pipeline parallelism")
    _check_int("vpp", vpp, 1, "use vpp=1 for no interleaving")
    if vpp > 1 and pp < 2:
        raise ValueError(f"vpp ({vpp}) > 1 needs pp >= 2 (interleaving spreads chunks over "
                         f"pipeline ranks): set vpp=1 or pp >= 2")


def _check_costs(costs) -> list[float]:
    """Costs: a non-empty sequence of finite numbers >= 0 (one per decoder block)."""
    costs = list(costs)
    if not costs:
        raise ValueError("costs is empty: pass one cost per decoder layer (n_layers >= 1)")
    for i, cost in enumerate(costs):
        if isinstance(cost, bool) or not isinstance(cost, Real):
            raise TypeError(f"costs[{i}] must be a number, got {type(cost).__name__}: "
                            f"pass one float per decoder layer")
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"costs[{i}] ({cost}) must be finite and >= 0: "
                             f"use a relative cost such as 1.0 for a dense block")
    return [float(c) for c in costs]


def _check_extra(name: str, value) -> None:
    """An embedding/head extra cost: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: pass 0.0 for none")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} ({value}) must be finite and >= 0: pass 0.0 for none")


def _check_chunking(partition, pp) -> None:
    """The partition's virtual stages must spread evenly over pp ranks."""
    _check_int("pp", pp, 1, "use pp=1 for no pipeline parallelism")
    if len(partition) % pp != 0:
        raise ValueError(f"partition has {len(partition)} virtual stages, not a multiple of "
                         f"pp ({pp}): pass the pp the partition was made with")


def _check_schedule_args(schedule, pp, vpp, n_microbatches) -> None:
    """Known schedule name, sane degrees, vpp > 1 only for the interleaved schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule ({schedule!r}) must be one of {', '.join(SCHEDULES)}: "
                         f"pick one of those names")
    _check_degrees(pp, vpp)
    _check_int("n_microbatches", n_microbatches, 1, "use at least one micro-batch")
    if vpp > 1 and schedule != "interleaved":
        raise ValueError(f"vpp ({vpp}) > 1 applies only to schedule 'interleaved', not "
                         f"{schedule!r}: set vpp=1 or schedule='interleaved'")
