"""Spec for train/plan.py and launchers/plan.py: the layout planner.

References are computed here independently of the planner: parameter counts from the layer shapes
written out by hand, activation bytes from Korthikanti et al.'s formula with the numbers plugged in,
FLOPs from 6 N tokens + 12 L d S tokens (N the active matmul parameters), the 1F1B bubble as
(p - 1) / (m + p - 1).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from launchers import plan as plan_cli
from moe.model import build_model, param_counts
from moe.stages import plan_stages
from train.config import load_config
from train.plan import GIB, format_plan, plan_layout

ROOT = Path(__file__).resolve().parents[1]
MOE16X = ROOT / "configs" / "moe16x.yaml"
TINY_DENSE = ["model.preset=tiny", "model.n_layers=4", "data.seq_len=64", "training.precision=fp32",
              "training.global_batch_size=8", "training.micro_batch_size=4"]


def load(path, overrides=()):
    return load_config(path, list(overrides))


UNFOLDED = ["parallel.fold_experts=false", "parallel.zero1=false",
            "parallel.sequence_parallel=false"]


@pytest.fixture(scope="module")
def moe16x():
    """moe16x's shapes on its 4 x 8 grid with experts sharded over dp only (ep 8 = dp, edp 1), no
    ZeRO-1 and no sequence parallelism: the plain layout the references below are written for."""
    cfg = load(MOE16X, UNFOLDED)
    return cfg, plan_layout(cfg, nodes=4, gpus_per_node=8)


def moe16x_gpu_params(cfg, layers, first, last, tp, ep):
    """(params, expert params) on one GPU holding `layers`, from the moe16x shapes written out."""
    m = cfg.model
    d, dh, H, K, E, f, V = m.d_model, m.dim_head, m.n_heads, m.kv_heads, m.n_experts, m.expert_ffn, m.padded_vocab_size
    assert (d, dh, H, K, E, f, V) == (4096, 128, 32, 8, 16, 6144, 100352)  # the shapes this reference assumes
    attention = (d * H * dh + 2 * d * K * dh + H * dh * d) // tp     # wq, wk, wv column-split; wo row-split
    experts = (E // ep) * (d * 2 * f + f * d)                        # w_in (SwiGLU gate+up) and w_out
    per_layer = attention + 2 * d + E * d + experts                  # + two RMSNorms + the router
    total = len(layers) * per_layer + (V * d // tp if first else 0) + (d + V * d // tp if last else 0)
    return total, len(layers) * experts


# ------------------------------------------------------------------ moe16x on 4 nodes x 8 GPUs
def test_moe16x_layout_and_groups(moe16x):
    _, plan = moe16x
    lay = plan.layout
    assert (lay.world, lay.tp, lay.pp, lay.dp, lay.ep, lay.edp, lay.n_micro) == (32, 2, 2, 8, 8, 1, 64)
    assert all(len({r // 8 for r in g}) == 1 for g in plan.groups["tp"])   # tp stays inside a node
    assert sorted(plan.groups["pp"]) == [[r, r + 16] for r in range(16)]
    assert sorted(r for g in plan.groups["dp"] for r in g) == list(range(32))
    assert [c.rank for c in plan.grid] == list(range(32))
    assert plan.grid[19] == (19, 1, 1, 1, 1, 0)  # rank 19 = pp 1, dp 1, tp 1 (rank, pp, dp, tp, ep, edp)


def test_moe16x_every_layer_placed_once(moe16x):
    cfg, plan = moe16x
    placed = [i for s in plan.stages for chunk in s.chunks for i in chunk]
    assert sorted(placed) == list(range(32))
    by_vstage = sorted((v, c) for s in plan.stages for v, c in zip(s.vstages, s.chunks))
    assert [i for _, c in by_vstage for i in c] == list(range(32))
    assert sorted(i for s in plan.stages for i in s.moe_layers) == list(range(32))  # every block is MoE
    assert all(len(s.chunks[0]) >= 1 for s in plan.stages)


def test_moe16x_parameters_sum_to_the_model_and_match_the_shapes(moe16x):
    cfg, plan = moe16x
    total, active = param_counts(build_model(cfg.model, device="meta"))
    assert plan.total_params == total and plan.active_params == active and plan.tied_replica_params == 0
    assert sum(s.full_params for s in plan.stages) == total
    for s in plan.stages:
        layers = [i for c in s.chunks for i in c]
        want = moe16x_gpu_params(cfg, layers, s.rank == 0, s.rank == 1, tp=2, ep=8)
        assert (s.params, s.expert_params) == want
        unsharded = moe16x_gpu_params(cfg, layers, s.rank == 0, s.rank == 1, tp=1, ep=1)
        assert s.full_params == unsharded[0]


def test_moe16x_memory(moe16x):
    cfg, plan = moe16x
    for s in plan.stages:
        mem = s.memory
        router = sum(len(c) for c in s.chunks) * 16 * 4096              # the gate stays float32
        chunk = build_model(cfg.model, device="meta", layer_ids=s.chunks[0], pre=s.rank == 0,
                            post=s.rank == 1)
        assert min(mem.parameters, mem.optimizer, mem.activations, mem.temporaries) > 0
        assert mem.parameters == 2 * (s.params - router) + 4 * router  # a bf16 model
        assert mem.gradients == 4 * s.params                            # float32 accumulation
        # float32 main weights of the bf16 parameters, AdamW's two moments and a step per tensor
        n_tensors = len(list(chunk.parameters()))
        assert mem.optimizer == 12 * (s.params - router) + 8 * router + 4 * n_tensors
        assert s.in_flight == 2 - s.rank                                # 1F1B: pp - rank
        assert mem.total == sum((mem.parameters, mem.gradients, mem.optimizer, mem.activations,
                                 mem.temporaries))
    # two micro-batches of 17 blocks in flight on rank 0, one of 15 (plus the logits) on rank 1
    assert plan.stages[0].memory.activations > 2 * plan.stages[1].memory.activations
    assert plan.gpu_mem_bytes == 80 * GIB


def test_moe16x_flops_and_bubble(moe16x):
    cfg, plan = moe16x
    tokens = 512 * 8192
    m = cfg.model  # matmuls only: the embedding lookup [V, d] and the 2 L + 1 norms do not count
    assert not m.tie_embeddings and not m.bias and m.norm == "rmsnorm"
    matmul = plan.active_params - m.padded_vocab_size * m.d_model - (2 * m.n_layers + 1) * m.d_model
    want = 6 * matmul * tokens + 12 * 32 * 4096 * 8192 * tokens
    assert plan.tokens_per_step == tokens
    assert plan.flops_per_step == pytest.approx(want, rel=1e-12)
    assert plan.flops_per_gpu == pytest.approx(want / 32, rel=1e-12)
    assert plan.bubble == pytest.approx(1 / 65)   # (p - 1) / (m + p - 1), p = 2, m = 64


def test_moe16x_partition_is_the_pipeline_builders(moe16x):
    cfg, plan = moe16x
    assert plan.partition == plan_stages(cfg.model, 2, 1, 8192)
    n0, n1 = (sum(len(c) for c in s.chunks) for s in plan.stages)
    assert n0 + n1 == 32 and n0 > n1   # equal MoE blocks; the LM head weighs on the last stage


def test_moe16x_zero1_and_sequence_parallel(moe16x):
    _, base = moe16x
    cfg = load(MOE16X, [*UNFOLDED, "parallel.zero1=true", "parallel.sequence_parallel=true"])
    plan = plan_layout(cfg, nodes=4, gpus_per_node=8)
    for s, b in zip(plan.stages, base.stages):
        dense, expert = s.params - s.expert_params, s.expert_params
        # main weights and AdamW: dense over dp 8 in whole parameters (rank 0's share within half
        # an embedding shard of an eighth), experts over edp 1
        tolerance = 12 * 100352 * 4096 / 4 + 4 * 1000
        assert abs(s.memory.optimizer - 12 * (dense / 8 + expert)) <= tolerance
        assert s.memory.activations < b.memory.activations  # norms and residuals split over tp


def test_moe16x_report_text(moe16x):
    _, plan = moe16x
    text = format_plan(plan)
    grid0 = text[text.index("pipeline rank 0"):text.index("pipeline rank 1")]
    assert grid0.index("-- node 0 --") < grid0.index("-- node 1 --") and "-- node 2 --" not in grid0
    assert "-- node 3 --" in text and "Pipeline bubble: 1.5%" in text
    assert "M" * len(plan.stages[0].chunks[0]) in text


# ------------------------------------------------------------------ small configs
def test_dense_tiny_on_one_gpu():
    cfg = load(None, TINY_DENSE)
    plan = plan_layout(cfg, nodes=1, gpus_per_node=1)
    (stage,) = plan.stages
    total, active = param_counts(build_model(cfg.model, device="meta"))
    assert stage.chunks == [[0, 1, 2, 3]] and stage.moe_layers == [] and stage.expert_params == 0
    assert stage.params == stage.full_params == total == active
    assert stage.in_flight == 1 and plan.bubble == 0.0 and plan.layout.schedule == "none"
    mem = stage.memory
    n_tensors = len(list(build_model(cfg.model, device="meta").parameters()))
    assert mem.parameters == mem.gradients == 4 * total
    assert mem.optimizer == 8 * total + 4 * n_tensors
    V, h = 320, 128  # byte vocab 257 padded to a multiple of 64
    matmul = total - V * h - (2 * 4 + 1) * h  # no embedding lookup [V, h], no RMSNorm vectors
    assert plan.flops_per_step == pytest.approx((6 * matmul + 12 * 4 * 128 * 64) * 8 * 64)


def test_tied_embeddings_are_replicated_on_the_last_stage():
    cfg = load(None, ["model.preset=gpt2-small-tiny", "data.seq_len=32", "parallel.pp=2",
                      "training.global_batch_size=4", "training.micro_batch_size=1"])
    plan = plan_layout(cfg, nodes=1, gpus_per_node=2)
    m = cfg.model
    assert plan.tied_replica_params == m.padded_vocab_size * m.d_model
    assert sum(s.full_params for s in plan.stages) == plan.total_params + plan.tied_replica_params


def test_interleaved_chunks_and_in_flight():
    cfg = load(None, TINY_DENSE + ["model.n_layers=8", "parallel.pp=2", "parallel.vpp=2",
                                   "parallel.pp_schedule=interleaved", "training.micro_batch_size=2"])
    plan = plan_layout(cfg, nodes=1, gpus_per_node=2)
    assert [s.vstages for s in plan.stages] == [[0, 2], [1, 3]]
    assert [[i for c in s.chunks for i in c] for s in plan.stages] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # Megatron's interleaved warmup 2 (p - r - 1) + (v - 1) p, plus one: rank 0 -> 5, rank 1 -> 3
    assert [s.in_flight for s in plan.stages] == [5, 3]
    assert plan.bubble == pytest.approx(1 / (2 * 4 + 1))   # (p - 1) / (v m + p - 1), m = 4


def test_recompute_keeps_less():
    acts = {}
    for mode in ("none", "selective", "full"):
        extra = ["training.activation_checkpointing=true", f"training.recompute={mode}"]
        extra = [] if mode == "none" else extra
        acts[mode] = plan_layout(load(None, TINY_DENSE + extra), 1, 1).stages[0].memory.activations
    assert acts["full"] < acts["selective"] < acts["none"]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("overrides, nodes, gpus, match", [
    ([], 3, 1, r"world_size \(3\) must be divisible by parallel.tp \(2\)"),
    (["parallel.tp=3"], 1, 6, r"n_heads \(4\) must be divisible by parallel.tp \(3\)"),
    (["parallel.pp=8"], 1, 16, r"parallel.pp \(8\) x parallel.vpp \(1\) = 8 pipeline stages exceed model.n_layers \(4\)"),
    (["parallel.ep=4", "model.preset=tiny-moe", "model.n_experts=6"], 1, 8, r"n_experts \(6\) must be divisible"),
    (["parallel.ep=3"], 1, 8, r"parallel.dp \(4\) must be divisible by parallel.ep \(3\)"),
    (["training.global_batch_size=12"], 1, 4, r"global_batch_size \(12\) must be divisible by dp \(2\)"),
    (["parallel.pp=2", "parallel.vpp=2"], 1, 4, r"pp_schedule=interleaved"),
    (["parallel.pp=4", "parallel.pp_schedule=interleaved", "training.micro_batch_size=1",
      "training.global_batch_size=6"], 1, 8,
     r"multiple of parallel.pp \(4\)"),
    ([], 0, 8, r"--nodes \(0\) must be an integer >= 1"),
])
def test_invalid_layouts_raise_one_line(overrides, nodes, gpus, match):
    cfg = load(None, TINY_DENSE + ["parallel.tp=2", "model.vocab_pad_multiple=8"] + overrides)
    with pytest.raises(ValueError, match=match) as info:
        plan_layout(cfg, nodes, gpus)
    assert "\n" not in str(info.value)


def test_cli_bad_layout_exits_2_with_one_line(capsys):
    code = plan_cli.main([str(ROOT / "configs" / "tiny.yaml"), "parallel.tp=3", "--gpus-per-node", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: model.n_heads (4)") and err.count("\n") == 1
    assert plan_cli.main([str(ROOT / "configs" / "tiny.yaml"), "--nodes", "2"]) == 2
    assert "--gpus-per-node is required" in capsys.readouterr().err


# ------------------------------------------------------------------ the CLI as a process
def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "launchers" / "plan.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_runs_tiny_config_in_a_subprocess():
    out = _run_cli("configs/tiny.yaml", "--gpu-mem-gb", "16")
    assert out.returncode == 0, out.stderr
    for part in ("Rank grid, pipeline rank 0", "vstage  0 (rank 0): layers 0-3     MMMM", "budget 16 GiB",
                 "Pipeline bubble: none"):
        assert part in out.stdout


def test_cli_plans_moe16x_on_four_nodes_of_eight():
    out = _run_cli(str(MOE16X), "--nodes", "4", "--gpus-per-node", "8")
    assert out.returncode == 0, out.stderr
    assert "tp 2 x pp 2 x dp 8" in out.stdout and "-- node 3 --" in out.stdout


def test_rank_grid_names_each_gpus_expert_rank_when_folded():
    """Folded over tp x dp, the two tp ranks of one dp row hold different experts: each cell says
    which expert-parallel rank it is (unfolded, the row's (ep, edp) covers its tp ranks)."""
    over = ["model.preset=tiny-moe", "model.n_experts=4", "parallel.tp=2", "parallel.ep=4",
            "training.global_batch_size=4", "training.micro_batch_size=1"]
    folded = format_plan(plan_layout(load(None, [*over, "parallel.fold_experts=true"]), 1, 4))
    assert "cells: global rank:e<ep rank>" in folded
    assert [line.split() for line in folded.splitlines() if line.strip().startswith(("0 ", "1 "))
            and ":e" in line] == [["0", "0:e0", "1:e1"], ["1", "2:e2", "3:e3"]]
    unfolded = format_plan(plan_layout(load(None, [*over[:3], "parallel.ep=2",
                                                   *over[4:]]), 1, 4))
    assert "1 (1, 0)           2   3" in unfolded


@pytest.mark.parametrize("kind", ["classify", "sft", "dpo"])
def test_post_training_configs_are_refused_not_planned_wrong(kind):
    """A post-training step is not the pretraining step the planner sizes (dpo: two rows per
    example): plan, search and simulate refuse it in one line naming the key."""
    from train.search import search_layouts
    from train.simulate import simulate_rank

    cfg = load(None, [*TINY_DENSE, f"task.kind={kind}"])
    for run in (lambda: plan_layout(cfg, 1, 1), lambda: search_layouts(cfg, 1, 1),
                lambda: simulate_rank(cfg, 1, 1, 0)):
        with pytest.raises(ValueError, match=f"task.kind={kind}: the planner sizes pretraining"):
            run()
