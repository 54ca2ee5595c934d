"""ParallelContext layout logic without processes: rank grid, groups, validation, launcher env parsing."""
import pytest

import parallel.context as context
from parallel.context import (ParallelContext, RankCoords, check_divisible, expand_nodelist, group_ranks, rank_of,
                              launch_info, rank_grid, resolve_sizes)

# world 8, tp=2 pp=2 dp=2 ep=2, written out by hand: rank, pp, dp, tp, ep, edp
TABLE_8 = [
    (0, 0, 0, 0, 0, 0),
    (1, 0, 0, 1, 0, 0),
    (2, 0, 1, 0, 1, 0),
    (3, 0, 1, 1, 1, 0),
    (4, 1, 0, 0, 0, 0),
    (5, 1, 0, 1, 0, 0),
    (6, 1, 1, 0, 1, 0),
    (7, 1, 1, 1, 1, 0),
]


def test_rank_grid_matches_hand_table():
    assert rank_grid(8, tp=2, pp=2, dp=2, ep=2) == [RankCoords(*row) for row in TABLE_8]
    assert rank_grid(8, tp=2, pp=2, dp=0, ep=2) == [RankCoords(*row) for row in TABLE_8]  # dp derived


def test_rank_grid_expert_data_parallel_split():
    # dp=8, ep=2: ep ranks are consecutive dp ranks, dp_rank = edp_rank * 2 + ep_rank
    grid = rank_grid(8, tp=1, pp=1, dp=8, ep=2)
    assert [(c.ep, c.edp) for c in grid] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]


def test_rank_grid_inverts_the_layout_formula():
    tp, pp, dp, ep = 2, 3, 4, 2
    for c in rank_grid(tp * pp * dp, tp, pp, dp, ep):
        assert c.rank == c.pp * (dp * tp) + c.dp * tp + c.tp
        assert c.dp == c.edp * ep + c.ep


def test_group_ranks_by_hand():
    groups = group_ranks(8, tp=2, pp=1, dp=4, ep=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups["pp"] == [[r] for r in range(8)]
    assert groups["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    groups = group_ranks(8, tp=2, pp=2, dp=2, ep=1)
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["ep"] == [[r] for r in range(8)]
    assert groups["edp"] == groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_group_ranks_partition_the_world():
    for fold, ep in ((False, 2), (True, 4)):
        groups = group_ranks(24, tp=2, pp=3, dp=4, ep=ep, fold=fold)
        for kind in ("tp", "dp", "pp", "ep", "edp"):
            assert sorted(r for g in groups[kind] for r in g) == list(range(24)), (fold, kind)
        assert groups["tied"] == [[g[0], g[-1]] for g in groups["pp"]]  # first and last stage only


def test_folded_experts_by_hand():
    """tp 2 x dp 2 x pp 2, experts folded over the 4 ranks of a stage: the expert domain index is
    dp * tp + tp_rank, ep_rank = index % ep, edp_rank = index // ep."""
    groups = group_ranks(8, tp=2, pp=2, dp=2, ep=4, fold=True)
    assert groups["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["edp"] == [[r] for r in range(8)]
    groups = group_ranks(8, tp=2, pp=2, dp=2, ep=2, fold=True)
    assert groups["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]      # a tp pair holds both experts' halves
    assert groups["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]     # replicated over dp
    assert groups["tied"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    grid = rank_grid(8, tp=2, pp=2, dp=2, ep=4, fold=True)
    assert [(c.ep, c.edp) for c in grid[:4]] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert all(c.rank == rank_of(c.pp, c.dp, c.tp, dp=2, tp=2) for c in grid)


def test_folding_must_divide_tp_times_dp():
    with pytest.raises(ValueError, match=r"parallel.tp \(2\) \* parallel.dp \(2\) = 4 must be divisible by "
                                         r"parallel.ep \(8\).*use ep in \{1, 2, 4\}"):
        resolve_sizes(8, tp=2, pp=2, dp=0, ep=8, fold=True)
    assert resolve_sizes(4, tp=2, pp=1, dp=0, ep=4, fold=True) == 2  # without folding dp 2 < ep 4 fails
    with pytest.raises(ValueError, match=r"or parallel.fold_experts=true"):
        resolve_sizes(4, tp=2, pp=1, dp=0, ep=4)


def test_product_mismatch_message():
    with pytest.raises(ValueError, match=r"parallel.tp \(2\) \* parallel.pp \(2\) \* parallel.dp \(3\) = 12 "
                                         r"must equal world_size \(8\)"):
        resolve_sizes(8, tp=2, pp=2, dp=3, ep=1)
    with pytest.raises(ValueError, match=r"world_size \(6\) must be divisible by .* = 4"):
        rank_grid(6, tp=4, pp=1, dp=0, ep=1)


def test_dp_not_divisible_by_ep():
    with pytest.raises(ValueError, match=r"parallel.dp \(6\) must be divisible by parallel.ep \(4\).*"
                                         r"use ep in \{1, 2, 3, 6\}"):
        resolve_sizes(12, tp=2, pp=1, dp=0, ep=4)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(tp=0), r"parallel.tp \(0\) must be >= 1"),
    (dict(vpp=0), r"parallel.vpp \(0\) must be >= 1"),
    (dict(vpp=2), r"parallel.vpp \(2\) needs parallel.pp > 1"),
    (dict(backend="mpi"), r"backend \('mpi'\) must be 'gloo' or 'nccl'"),
])
def test_bad_layouts_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ParallelContext(world_size=1, rank=0, **kwargs)


def test_check_divisible_lists_divisors():
    check_divisible("n_heads", 8, "parallel.tp", 4)
    with pytest.raises(ValueError) as err:
        check_divisible("n_heads", 6, "parallel.tp", 4)
    assert str(err.value) == "n_heads (6) must be divisible by parallel.tp (4): use tp in {1, 2, 3, 6}"
    with pytest.raises(ValueError, match=r"parallel.ep \(0\) must be >= 1"):
        check_divisible("n_experts", 8, "parallel.ep", 0)


def test_single_context():
    ctx = ParallelContext.single()
    sizes = (ctx.world_size, ctx.tp, ctx.pp, ctx.dp, ctx.ep, ctx.edp, ctx.vpp)
    assert sizes == (1, 1, 1, 1, 1, 1, 1)
    assert (ctx.tp_rank, ctx.dp_rank, ctx.pp_rank, ctx.ep_rank, ctx.edp_rank) == (0, 0, 0, 0, 0)
    assert [ctx.tp_group, ctx.dp_group, ctx.pp_group, ctx.ep_group, ctx.edp_group] == [None] * 5
    assert ctx.is_first_stage and ctx.is_last_stage and ctx.pp_ranks == [0]
    assert not (ctx.tp_enabled or ctx.pp_enabled or ctx.dp_enabled or ctx.ep_enabled)
    assert ctx.backend == "gloo" and ctx.device.type == "cpu"
    ctx.destroy()  # no process group: a no-op


def test_sequence_parallel_ignored_at_tp1():
    assert ParallelContext(world_size=1, rank=0, sequence_parallel=True).sequence_parallel is False


def test_multi_rank_context_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        ParallelContext(world_size=8, rank=3, tp=2, pp=2, ep=2)


def test_from_env_validates_before_init(monkeypatch):
    # a bad layout must fail on every rank before the rendezvous (which would otherwise wait forever)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(context.dist, "init_process_group", lambda *a, **k: pytest.fail("init was called"))
    with pytest.raises(ValueError, match=r"world_size \(8\) must be divisible"):
        ParallelContext.from_env(tp=3, backend="gloo")


def test_from_env_without_launcher_is_single(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    ctx = ParallelContext.from_env(backend="gloo")
    assert ctx.world_size == 1 and ctx.tp_group is None


def test_expand_nodelist():
    assert expand_nodelist("node[01-03],other") == ["node01", "node02", "node03", "other"]
    assert expand_nodelist("gpu[8-10,12]") == ["gpu8", "gpu9", "gpu10", "gpu12"]
    assert expand_nodelist("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]
    assert expand_nodelist("single") == ["single"]
    for bad in ("node[01-03", "node]1[", "node[a-b]"):
        with pytest.raises(ValueError, match="SLURM nodelist"):
            expand_nodelist(bad)


def test_launch_info_torchrun():
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="h1", MASTER_PORT="1234")
    assert launch_info(env) == (4, 3, 1, "h1", 1234, "torchrun")
    with pytest.raises(ValueError, match=r"\['LOCAL_RANK'\] unset"):
        launch_info(dict(RANK="0", WORLD_SIZE="2"))


def test_launch_info_slurm(monkeypatch):
    monkeypatch.setattr(context.shutil, "which", lambda name: None)  # force our parser, not scontrol
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
               SLURM_JOB_NODELIST="gpu[07-08],cpu1")
    assert launch_info(env) == (8, 5, 1, "gpu07", 29500 + 456, "slurm")
    env.update(MASTER_ADDR="10.0.0.9", MASTER_PORT="4000")  # explicit values win
    assert launch_info(env)[3:5] == ("10.0.0.9", 4000)
    assert launch_info({}) == (1, 0, 0, None, None, "none")
