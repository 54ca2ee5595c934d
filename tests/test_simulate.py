"""Spec for train/memory.py, train/simulate.py and the planner's agreement with them.

The tracker is checked on real tensors against sizes worked out by hand; the simulation runs the
real train_step of one rank on torch's fake process group under FakeTensorMode; the planner
(train/footprint.py via train/plan.py) must agree with it within 3% on a matrix of layouts. The
simulation is the independent reference here: it measures the code, the planner derives it from
shapes.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launchers import plan as plan_cli
from train.config import load_config
from train.memory import CATEGORIES, MemoryTracker
from train.plan import plan_layout
from train.simulate import ranks_to_simulate, simulate_rank

ROOT = Path(__file__).resolve().parents[1]
# tiny-moe: 4 blocks, d 128, 4/2 heads, 8 experts top-2; 2 micro-batches of 8 x 128 tokens
BASE = ["training.precision=fp32", "training.device=cpu"]


def _cfg(*overrides):
    return load_config(ROOT / "configs" / "tiny.yaml", [*BASE, *overrides])


# ------------------------------------------------------------------ the tracker, by hand
def test_tracker_labels_a_known_step():
    """y = tanh(x W1^T) W2^T, loss = sum(y): the sizes below are worked out from the shapes."""
    w1 = torch.nn.Parameter(torch.randn(32, 16))   # 2048 bytes
    w2 = torch.nn.Parameter(torch.randn(8, 32))    # 1024 bytes
    x = torch.randn(4, 16)                         # made before tracking: not counted
    opt = torch.optim.AdamW([w1, w2], foreach=False)
    with MemoryTracker() as mem:
        mem.watch([w1, w2], opt)
        a = x @ w1.t()                             # [4, 32]: freed within the forward
        with_a = mem.clock
        t = torch.tanh(a)                          # tanh keeps its output for backward
        del a
        loss = (t @ w2.t()).sum()                  # [4, 8] freed; the scalar loss stays
        after_forward = mem.breakdown()
        t.register_hook(lambda g: during.append(mem.breakdown()))
        during = []
        loss.backward()                            # the hook sees t's gradient [4, 32] alive
        del t
        after_backward = mem.breakdown()
        opt.step()
        after_step = mem.breakdown()
        live = mem.live
    def sizes(params, grads, optim, acts, temps):
        return dict(zip(CATEGORIES, (params, grads, optim, acts, temps)))

    assert mem.breakdown(with_a) == sizes(3072, 0, 0, 0, 512)
    assert after_forward == sizes(3072, 0, 0, 4 * 32 * 4 + 4, 0)
    # in backward: W2's gradient [8, 32] and t's [4, 32] (the loss's 4-byte seed gradient aside)
    assert during[0]["gradients"] == 1024 and during[0]["temporaries"] == 512
    assert after_backward == sizes(3072, 3072, 0, 4, 0)
    # AdamW: exp_avg and exp_avg_sq per parameter and a float32 step count each
    assert after_step["optimizer"] == 2 * 3072 + 2 * 4 and after_step["gradients"] == 3072
    assert live == sum(after_step.values()) and mem.peak >= sum(during[0].values())
    assert mem.created_in_optimizer_and_kept() == 2 * 3072 + 2 * 4


# ------------------------------------------------------------------ the simulation
def test_simulation_runs_the_step_and_agrees_with_the_planner():
    cfg = _cfg()
    sim = simulate_rank(cfg, 1, 1, 0)
    plan = plan_layout(cfg, 1, 1)
    mem = plan.stages[0].memory
    assert sum(sim.at_peak.values()) == sim.peak and sim.ops > 1000
    assert sim.at_peak["parameters"] == mem.parameters and sim.at_peak["optimizer"] == mem.optimizer
    # the float32 gradient buffers stay between steps; the activations are gone
    assert sim.at_end["gradients"] == mem.gradients and sim.at_end["activations"] < 0.01 * sim.peak
    assert abs(mem.total - sim.peak) <= 0.03 * sim.peak


def test_one_step_equals_a_measured_second_step():
    """The optimizer state that a first step creates is added before its optimizer step; a real
    second step (warmup=True) must measure the same peak."""
    piped = ("parallel.pp=2", "parallel.zero1=true", "parallel.ep=2",
             "training.global_batch_size=64")
    for overrides, world, rank in [((), 1, 0), (piped, 8, 4)]:
        cfg = _cfg(*overrides)
        one = simulate_rank(cfg, 1, world, rank)
        two = simulate_rank(cfg, 1, world, rank, warmup=True)
        assert one.peak == two.peak and one.at_peak == two.at_peak


BF16 = "training.precision=bf16"
G32, PP2, TP2 = "training.global_batch_size=32", "parallel.pp=2", "parallel.tp=2"
SP, RECOMPUTE = "parallel.sequence_parallel=true", "training.activation_checkpointing=true"
FOLD, DENSE = "parallel.fold_experts=true", "model.preset=tiny"
MATRIX = [  # (world, rank, overrides): dense and MoE; tp, pp, vpp, ep (folded too), dp, ZeRO-1, SP,
    # recompute full / selective; float32 (the default here) and bf16; dropout, q/k and sandwich
    # norms, a gated shared expert, GLM-4.5-Air's routing (sigmoid, expert bias, first dense)
    (1, 0, [DENSE]),
    (1, 0, [BF16]),
    (2, 0, [TP2]),
    (2, 1, [TP2, SP, DENSE, BF16]),
    (2, 0, ["parallel.ep=2", G32, BF16]),
    (4, 0, ["parallel.ep=2", "parallel.zero1=true", G32, "model.forced_routing_imbalance=2.5"]),
    (4, 0, [TP2, "parallel.ep=2", G32, BF16, "parallel.zero1=true"]),
    (4, 1, [TP2, "parallel.ep=4", FOLD, G32]),
    (8, 0, [PP2, TP2, "parallel.ep=2", FOLD, BF16, G32, "model.forced_routing_imbalance=3"]),
    (2, 0, [PP2, G32]),
    (2, 1, [PP2, G32, DENSE, BF16]),
    (4, 2, [PP2, TP2, SP, G32]),
    (4, 0, [PP2, "parallel.vpp=2", "parallel.pp_schedule=interleaved", "model.n_layers=8", G32,
            "training.micro_batch_size=4", BF16]),
    (2, 0, [PP2, "parallel.pp_schedule=gpipe", G32]),
    (1, 0, [RECOMPUTE]),
    (1, 0, [RECOMPUTE, "training.recompute=selective", DENSE, BF16]),
    (2, 0, [TP2, SP, RECOMPUTE, BF16]),
    (2, 0, [PP2, G32, RECOMPUTE, "training.recompute=selective"]),
    (2, 1, ["model.preset=gpt2-small-tiny", "data.seq_len=64", PP2, G32, BF16]),
    (2, 0, [PP2, G32, BF16, "model.fp32_residual=true"]),
    (2, 0, ["model.preset=gpt2-small-tiny", "data.seq_len=64", "model.dropout=0.1", PP2, G32,
            BF16]),
    (1, 0, [BF16, "model.qk_norm=head", "model.shared_expert_ffn_dim=128",
            "model.shared_expert_gate=true"]),
    (2, 1, [TP2, "model.sandwich_norm=true", "model.qk_norm=full"]),
    (1, 0, ["model.preset=glm4.5-air-tiny", "data.seq_len=64", BF16]),
]


@pytest.mark.slow
@pytest.mark.parametrize("world, rank, overrides", MATRIX, ids=[" ".join(o) for *_, o in MATRIX])
def test_planner_agrees_with_the_simulation(world, rank, overrides):
    cfg = _cfg(*overrides)
    sim = simulate_rank(cfg, 1, world, rank)
    planned = plan_layout(cfg, 1, world).stages[sim.coords.pp].memory
    assert abs(planned.total - sim.peak) <= 0.03 * sim.peak, (planned, sim.at_peak)
    for kind in ("parameters", "gradients", "optimizer"):  # the state, exactly, in its categories
        assert getattr(planned, kind) == sim.at_peak[kind], kind


def test_ranks_to_simulate():
    cfg = _cfg("parallel.pp=2", "parallel.ep=2", "training.global_batch_size=64",
               "model.forced_routing_imbalance=2.0")
    plan = plan_layout(cfg, 1, 8)  # tp 1, pp 2, dp 4: pipeline rank r starts at global rank 4 r
    heaviest = max(plan.stages, key=lambda s: s.memory.total).rank
    assert ranks_to_simulate(plan) == [4 * heaviest]
    assert ranks_to_simulate(plan, every_kind=True) == [0, 4, 1, 5]   # + ep rank 1 (imbalanced)
    folded = plan_layout(_cfg("parallel.tp=2", "parallel.ep=4", "parallel.fold_experts=true",
                              "training.global_batch_size=64",
                              "model.forced_routing_imbalance=2.0"), 1, 4)
    assert ranks_to_simulate(folded, every_kind=True) == [0, 1]  # ep over (dp, tp): tp rank 1


# ------------------------------------------------------------------ bad input, one line each
@pytest.mark.parametrize("overrides, rank, match", [
    ([], 1, r"--rank \(1\) must be a global rank in \[0, 1\)"),
    ([], -1, r"--rank \(-1\) must be a global rank"),
    (["model.capacity_factor=1.0"], 0, r"model.capacity_factor \(1.0\) cannot be simulated"),
    (["model.expert_backend=padded"], 0, r"model.expert_backend \('padded'\) cannot be simulated"),
])
def test_bad_simulations_fail_before_any_work(overrides, rank, match):
    with pytest.raises(ValueError, match=match) as info:
        simulate_rank(_cfg(*overrides), 1, 1, rank)
    assert "\n" not in str(info.value)


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "launchers" / "plan.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_simulate():
    out = _cli("configs/tiny.yaml", "--simulate", "--imbalance", "2")
    assert out.returncode == 0, out.stderr
    table = out.stdout[out.stdout.index("Simulated step"):]
    assert "forced routing imbalance 2" in table and "headroom" in table
    row = table.splitlines()[2].split()   # rank pp dp tp ep, 5 categories, peak, planned, diff, ..
    assert row[:5] == ["0", "0", "0", "0", "0"] and abs(float(row[-2].rstrip("%"))) <= 3.0


@pytest.mark.parametrize("args, message", [
    (["--simulate", "--rank", "3"], "error: --rank (3) must be a global rank in [0, 1)"),
    (["--rank", "0"], "error: --rank needs --simulate"),
    (["--simulate", "--rank", "x"], "error: --rank ('x') must be a global rank (an integer)"),
    (["model.preset=tiny", "--imbalance", "2"], "error: --imbalance applies to MoE models"),
    (["--imbalance", "9"], "error: model.forced_routing_imbalance (9.0) must be in [1, n_experts"),
    (["--headroom", "0.1"], "error: --headroom needs --search"),
    (["parallel.tp=2", "parallel.ep=3", "parallel.fold_experts=true", "--gpus-per-node", "4",
      "--simulate"], "error: parallel.tp (2) * parallel.dp (2) = 4 must be divisible by"),
])
def test_cli_bad_flags_exit_2_with_one_line(args, message, capsys):
    code = plan_cli.main([str(ROOT / "configs" / "tiny.yaml"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
