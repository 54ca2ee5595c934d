"""Spec for parallel/partition.py: layer partitioning and pipeline schedule math.

The balancing oracle is an independent brute force over every contiguous split (small n), which
applies the documented objective literally: min max load, then min sum of squared loads, then the
lexicographically smallest count vector (earlier stages fewer layers).
"""

import itertools
import random

import pytest

from parallel.partition import (
    activation_microbatches_in_flight,
    bubble_fraction,
    check_partition,
    chunks_of_rank,
    format_partition,
    partition_layers,
    stage_loads,
    stage_of_layer,
)


# --- independent reference -------------------------------------------------------------------


def all_splits(n, n_stages):
    """Every way to cut n layers into n_stages non-empty contiguous runs, as count tuples."""
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(n_stages))


def loads_of(counts, costs, first_extra=0.0, last_extra=0.0):
    loads, start = [], 0
    for count in counts:
        loads.append(sum(costs[start:start + count]))
        start += count
    loads[0] += first_extra
    loads[-1] += last_extra
    return loads


def brute_force(costs, n_stages, first_extra=0.0, last_extra=0.0):
    """The documented objective, applied literally over all splits (integer costs: exact)."""
    splits = list(all_splits(len(costs), n_stages))
    lo = {s: loads_of(s, costs, first_extra, last_extra) for s in splits}
    best_max = min(max(lo[s]) for s in splits)
    splits = [s for s in splits if max(lo[s]) == best_max]
    best_sq = min(sum(x * x for x in lo[s]) for s in splits)
    return min(s for s in splits if sum(x * x for x in lo[s]) == best_sq), best_max


def counts(partition):
    return [len(stage) for stage in partition]


# --- balancing -------------------------------------------------------------------------------


def test_uniform_costs_split_evenly():
    assert partition_layers([1.0] * 8, pp=4) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_uniform_uneven_split_differs_by_one_and_puts_fewer_layers_first():
    part = partition_layers([1.0] * 10, pp=4)
    assert counts(part) == [2, 2, 3, 3]  # documented tie-break: earlier stages get fewer layers
    assert max(stage_loads(part, [1.0] * 10)) == 3  # ceil(10 / 4): optimal


def test_moe_heavy_tail_moves_the_boundary():
    # 4 dense (1) then 4 MoE (3) blocks. The count split 4|4 has loads 4|12; the optimum is 7|9.
    costs = [1, 1, 1, 1, 3, 3, 3, 3]
    part = partition_layers(costs, pp=2)
    assert part == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert stage_loads(part, costs) == [7, 9]


@pytest.mark.parametrize("n, n_stages", [(7, 2), (8, 3), (9, 3), (9, 4), (6, 6), (5, 1)])
def test_alternating_dense_moe_costs_match_brute_force(n, n_stages):
    costs = [1.0 if i % 2 == 0 else 3.0 for i in range(n)]
    expected, best_max = brute_force(costs, n_stages)
    part = partition_layers(costs, pp=n_stages)
    assert max(stage_loads(part, costs)) == best_max
    assert tuple(counts(part)) == expected


def test_random_costs_and_extras_match_brute_force():
    rng = random.Random(1234)
    for _ in range(60):
        n = rng.randint(1, 9)
        n_stages = rng.randint(1, n)
        costs = [float(rng.randint(1, 5)) for _ in range(n)]
        first_extra, last_extra = float(rng.randint(0, 4)), float(rng.randint(0, 6))
        expected, _ = brute_force(costs, n_stages, first_extra, last_extra)
        part = partition_layers(costs, pp=n_stages, first_extra=first_extra, last_extra=last_extra)
        assert tuple(counts(part)) == expected, (costs, n_stages, first_extra, last_extra)


def test_first_and_last_extras_shift_layers_off_the_end_stages():
    # embedding/head worth 2 layers: total 10 over 4 stages -> bottleneck 3, end stage 1 layer.
    assert counts(partition_layers([1.0] * 8, pp=4, first_extra=2.0)) == [1, 2, 2, 3]
    assert counts(partition_layers([1.0] * 8, pp=4, last_extra=2.0)) == [2, 2, 3, 1]
    part = partition_layers([1.0] * 8, pp=4, first_extra=2.0, last_extra=2.0)
    assert counts(part) == [1, 3, 3, 1]
    assert stage_loads(part, [1.0] * 8, 2.0, 2.0) == [3, 3, 3, 3]


def test_every_layer_exactly_once_for_random_costs():
    rng = random.Random(7)
    for _ in range(40):
        n = rng.randint(1, 60)
        pp = rng.randint(1, min(n, 8))
        vpp = rng.randint(1, max(1, n // pp)) if pp > 1 else 1
        costs = [rng.uniform(0.0, 4.0) for _ in range(n)]
        part = partition_layers(costs, pp=pp, vpp=vpp, first_extra=rng.uniform(0, 3))
        assert len(part) == pp * vpp
        assert [layer for stage in part for layer in stage] == list(range(n))
        assert all(stage for stage in part)


def test_large_plan_is_fast_and_complete():
    rng = random.Random(3)
    costs = [rng.choice([1.0, 2.5]) for _ in range(200)]
    part = partition_layers(costs, pp=32, vpp=4, first_extra=1.0, last_extra=2.0)
    assert [layer for stage in part for layer in stage] == list(range(200))
    # bottleneck can never beat the largest single layer nor the average load
    assert max(stage_loads(part, costs, 1.0, 2.0)) >= max(max(costs), (sum(costs) + 3.0) / 128)


def test_zero_cost_layers_are_still_placed():
    part = partition_layers([0.0] * 5, pp=2)
    assert counts(part) == [1, 4]  # all splits tie on load; fewest layers first
    assert [layer for stage in part for layer in stage] == list(range(5))


# --- overrides -------------------------------------------------------------------------------


def test_first_and_last_stage_layers_fix_the_ends_and_balance_the_rest():
    assert counts(partition_layers([1.0] * 10, pp=4, first_stage_layers=1, last_stage_layers=1)) \
        == [1, 4, 4, 1]
    assert counts(partition_layers([1.0] * 10, pp=4, first_stage_layers=4)) == [4, 2, 2, 2]
    # the fixed last stage takes last_extra with it, so the middle balances without it
    assert counts(partition_layers([1.0] * 9, pp=3, last_stage_layers=1, last_extra=5.0)) \
        == [4, 4, 1]


def test_embedding_only_and_head_only_stages():
    part = partition_layers([1.0] * 6, pp=4, first_stage_layers=0, last_stage_layers=0)
    assert part == [[], [0, 1, 2], [3, 4, 5], []]
    assert partition_layers([1.0] * 3, pp=2, first_stage_layers=0) == [[], [0, 1, 2]]


def test_stage_layers_is_taken_verbatim():
    assert counts(partition_layers([1.0] * 10, pp=2, vpp=2, stage_layers=[3, 2, 2, 3])) \
        == [3, 2, 2, 3]
    assert counts(partition_layers([1.0] * 4, pp=3, stage_layers=[0, 4, 0])) == [0, 4, 0]


# --- interleaving and helpers ----------------------------------------------------------------


def test_vpp2_chunks_interleave_over_ranks():
    part = partition_layers([1.0] * 8, pp=2, vpp=2)
    assert part == [[0, 1], [2, 3], [4, 5], [6, 7]]
    where = stage_of_layer(part, pp=2)
    assert [where[layer] for layer in range(8)] == [
        (0, 0), (0, 0), (1, 1), (1, 1), (2, 0), (2, 0), (3, 1), (3, 1)]
    assert chunks_of_rank(part, pp=2, rank=0) == [[0, 1], [4, 5]]
    assert chunks_of_rank(part, pp=2, rank=1) == [[2, 3], [6, 7]]


def test_format_partition_table():
    costs = [1.0, 1.0, 3.0, 3.0]
    text = format_partition([[0, 1, 2], [3]], costs, pp=2, vpp=1, first_extra=1.0)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[1].split() == ["0", "0", "0", "0-2", "3", "6"]
    assert lines[2].split() == ["1", "1", "0", "3-3", "1", "3"]
    assert "imbalance (max/mean) 1.33" in lines[3]  # 6 / 4.5
    with_empty = format_partition([[], [0, 1, 2, 3]], costs, pp=2, vpp=1)
    assert with_empty.splitlines()[1].split()[3] == "-"


def test_check_partition_catches_dropped_duplicated_and_reordered_layers():
    check_partition([[0, 1], [2]], 3)
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        check_partition([[0], [1]], 3)
    with pytest.raises(ValueError, match=r"placed twice \[1\]"):
        check_partition([[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError, match="out of range"):
        check_partition([[0, 1], [2, 3]], 3)
    with pytest.raises(ValueError, match="contiguously"):
        check_partition([[0, 2], [1]], 3)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(costs=[1.0] * 3, pp=4), r"pp\*vpp \(4\) virtual stages exceed n_layers \(3\)"),
    (dict(costs=[1.0] * 5, pp=3, vpp=2), r"pp\*vpp \(6\) virtual stages exceed n_layers \(5\)"),
    (dict(costs=[1.0] * 4, pp=1, vpp=2), r"vpp \(2\) > 1 needs pp >= 2"),
    (dict(costs=[1.0] * 4, pp=2, vpp=0), r"vpp \(0\) must be >= 1"),
    (dict(costs=[1.0] * 4, pp=0), r"pp \(0\) must be >= 1"),
    (dict(costs=[], pp=1), "costs is empty"),
    (dict(costs=[1.0, -1.0], pp=1), r"costs\[1\] \(-1.0\) must be finite and >= 0"),
    (dict(costs=[1.0, float("nan")], pp=1), r"costs\[1\]"),
    (dict(costs=[1.0] * 4, pp=2, first_extra=-1.0), r"first_extra \(-1.0\)"),
    (dict(costs=[1.0] * 10, pp=4, stage_layers=[3, 3, 3]), "stage_layers has 3 entries"),
    (dict(costs=[1.0] * 10, pp=4, stage_layers=[3, 3, 3, 3]), "stage_layers sums to 12"),
    (dict(costs=[1.0] * 10, pp=4, stage_layers=[5, -1, 3, 3]), r"stage_layers\[1\] \(-1\)"),
    (dict(costs=[1.0] * 10, pp=4, stage_layers=[5, 0, 2, 3]), r"stage_layers\[1\] is 0"),
    (dict(costs=[1.0] * 10, pp=4, stage_layers=[4, 2, 2, 2], first_stage_layers=4), "not both"),
    (dict(costs=[1.0] * 10, pp=4, first_stage_layers=-2), r"first_stage_layers \(-2\)"),
    (dict(costs=[1.0] * 10, pp=4, first_stage_layers=5, last_stage_layers=4),
     "leave 1 of n_layers"),
    (dict(costs=[1.0] * 10, pp=2, first_stage_layers=5, last_stage_layers=4), "add up to n_layers"),
    (dict(costs=[1.0] * 10, pp=1, first_stage_layers=4), "must equal n_layers"),
])
def test_bad_inputs_raise_one_line_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        partition_layers(**kwargs)
    assert "\n" not in str(info.value)


def test_non_integer_counts_raise_type_error():
    with pytest.raises(TypeError, match="first_stage_layers must be an int"):
        partition_layers([1.0] * 4, pp=2, first_stage_layers=1.5)


# --- schedule math ---------------------------------------------------------------------------


def test_bubble_fraction_hand_values():
    assert bubble_fraction("gpipe", pp=4, vpp=1, n_microbatches=8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", pp=4, vpp=1, n_microbatches=8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved", pp=4, vpp=2, n_microbatches=8) == pytest.approx(3 / 19)
    assert bubble_fraction("1f1b", pp=8, vpp=1, n_microbatches=1) == pytest.approx(7 / 8)
    assert bubble_fraction("gpipe", pp=1, vpp=1, n_microbatches=4) == 0.0


def test_bubble_fraction_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule .'zb'. must be one of"):
        bubble_fraction("zb", pp=4, vpp=1, n_microbatches=8)
    with pytest.raises(ValueError, match="applies only to schedule 'interleaved'"):
        bubble_fraction("1f1b", pp=4, vpp=2, n_microbatches=8)
    with pytest.raises(ValueError, match=r"n_microbatches \(0\)"):
        bubble_fraction("gpipe", pp=4, vpp=1, n_microbatches=0)


def test_activations_in_flight_hand_values():
    assert activation_microbatches_in_flight("gpipe", 4, 1, 8, stage_rank=3) == 8
    assert [activation_microbatches_in_flight("1f1b", 4, 1, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert activation_microbatches_in_flight("1f1b", 4, 1, 2, stage_rank=0) == 2
    # Megatron-Core interleaved warmup 2(p-r-1) + (v-1)p, +1 steady forward, capped at m*v
    assert [activation_microbatches_in_flight("interleaved", 4, 2, 8, r) for r in range(4)] \
        == [11, 9, 7, 5]
    assert activation_microbatches_in_flight("interleaved", 4, 2, 2, stage_rank=0) == 4
    with pytest.raises(ValueError, match=r"stage_rank \(4\) must be < pp \(4\)"):
        activation_microbatches_in_flight("1f1b", 4, 1, 8, stage_rank=4)
