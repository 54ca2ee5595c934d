"""Expert-parallel dispatch logic without processes: the rank-major <-> expert-major row permutation
(against hand-written tables, torchtitan TestPermute style) and the dispatcher's up-front validation."""
import pytest
import torch

from parallel.expert import AllToAllDispatcher, rank_major_to_expert_major

# counts_RE[r][e]: rows from source rank r for local expert e (2 ranks, 3 local experts).
# Rank-major rows:   r0e0 -> 0 1 | r0e1 -> (none) | r0e2 -> 2 | r1e0 -> 3 | r1e1 -> 4 5 6 | r1e2 -> (none)
# Expert-major order visits e0: r0 (0 1), r1 (3); e1: r1 (4 5 6); e2: r0 (2)
COUNTS = [[2, 0, 1],
          [1, 3, 0]]
TO_EXPERT_MAJOR = [0, 1, 3, 4, 5, 6, 2]
TO_RANK_MAJOR = [0, 1, 6, 2, 3, 4, 5]   # r0e0 <- 0 1, r0e2 <- 6, r1e0 <- 2, r1e1 <- 3 4 5

# 3 ranks, 2 local experts, with a rank that sends nothing and an expert that gets one row.
COUNTS_3 = [[0, 0],
            [2, 1],
            [1, 0]]
# rank-major rows: r1e0 -> 0 1 | r1e1 -> 2 | r2e0 -> 3;  expert-major: e0: r1 (0 1), r2 (3); e1: r1 (2)
TO_EXPERT_MAJOR_3 = [0, 1, 3, 2]


def _reference_index(counts_RE: list[list[int]]) -> list[int]:
    """Plain-Python loops over the blocks, independent of the vectorised helper."""
    starts, pos = {}, 0
    for r, row in enumerate(counts_RE):
        for e, n in enumerate(row):
            starts[r, e], pos = pos, pos + n
    return [starts[r, e] + i for e in range(len(counts_RE[0])) for r in range(len(counts_RE))
            for i in range(counts_RE[r][e])]


def test_rank_major_to_expert_major_hand_table():
    counts = torch.tensor(COUNTS)
    assert rank_major_to_expert_major(counts).tolist() == TO_EXPERT_MAJOR
    assert rank_major_to_expert_major(counts.t()).tolist() == TO_RANK_MAJOR  # the inverse, via the transpose
    assert rank_major_to_expert_major(torch.tensor(COUNTS_3)).tolist() == TO_EXPERT_MAJOR_3
    assert rank_major_to_expert_major(counts, total=7).tolist() == TO_EXPERT_MAJOR


def test_transpose_gives_the_inverse_permutation():
    g = torch.Generator().manual_seed(0)
    for R, E in [(2, 3), (4, 2), (3, 5)]:
        counts = torch.randint(0, 4, (R, E), generator=g)
        fwd, back = rank_major_to_expert_major(counts), rank_major_to_expert_major(counts.t())
        n = int(counts.sum())
        assert fwd[back].tolist() == list(range(n))
        assert back[fwd].tolist() == list(range(n))


def test_matches_loop_reference_on_random_counts():
    g = torch.Generator().manual_seed(1)
    for R, E in [(1, 4), (4, 1), (2, 2), (4, 3), (8, 2)]:
        counts = torch.randint(0, 3, (R, E), generator=g)
        assert rank_major_to_expert_major(counts).tolist() == _reference_index(counts.tolist())


def test_degenerate_layouts():
    assert rank_major_to_expert_major(torch.zeros(2, 3, dtype=torch.long)).tolist() == []
    # one source rank, or one local expert: both orders coincide
    assert rank_major_to_expert_major(torch.tensor([[2, 1, 3]])).tolist() == list(range(6))
    assert rank_major_to_expert_major(torch.tensor([[2], [0], [1]])).tolist() == list(range(3))


def test_permutation_moves_rows_with_their_labels():
    # Label each rank-major row by (rank, expert); after the gather the labels are expert-major.
    counts = torch.tensor(COUNTS)
    labels = [(r, e) for r in range(2) for e in range(3) for _ in range(COUNTS[r][e])]
    rows = torch.tensor(labels)  # [7, 2]
    moved = rows[rank_major_to_expert_major(counts)].tolist()
    assert moved == [[0, 0], [0, 0], [1, 0], [1, 1], [1, 1], [1, 1], [0, 2]]


def test_rejects_non_matrix_counts():
    with pytest.raises(ValueError, match=r"counts_RE must be 2-D"):
        rank_major_to_expert_major(torch.tensor([1, 2, 3]))


def test_dispatcher_validates_before_any_collective():
    with pytest.raises(ValueError, match=r"model.n_experts \(6\) must be divisible by parallel.ep \(4\)"):
        AllToAllDispatcher(6, None, 4)
    with pytest.raises(ValueError, match=r"ep_group has size None but parallel.ep is 2"):
        AllToAllDispatcher(8, None, 2)


def test_split_sizes_from_host_counts_equal_the_device_read():
    """Under forced routing every rank of the group sends the same counts, so the sizes the
    dispatcher takes from the host equal those it would read from the exchanged counts (here on
    torch's fake process group: rank 2 of an ep group of 4, 8 experts, 2 per rank)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=2, world_size=4)
    try:
        d = AllToAllDispatcher(8, dist.new_group([0, 1, 2, 3]), 4)
        for host in ([3, 1, 0, 4, 2, 2, 5, 0], [9, 1, 1, 1, 1, 1, 1, 1]):
            counts = torch.tensor(host)
            counts_RE = counts.view(4, 2)[2].repeat(4, 1)  # every source sends our experts the same
            assert d.split_sizes(counts, counts_RE, host) == d.split_sizes(counts, counts_RE, None)
        with pytest.raises(ValueError, match="host_counts has 3 entries"):
            d.split_sizes(counts, counts_RE, [1, 2, 3])
    finally:
        dist.destroy_process_group()
