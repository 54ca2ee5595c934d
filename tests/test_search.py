"""Spec for train/search.py (launchers/plan.py --search): what fits is checked again with the
planner on every pipeline rank and, for the fastest layout, with the simulation of the real step."""

import subprocess
import sys
from pathlib import Path

import pytest

from train.config import load_config
from train.plan import GIB, plan_layout
from train.search import format_search, search_layouts
from train.simulate import simulate_rank

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BATCH = ["training.global_batch_size=32"]
BUDGET_GB = 0.03   # 30.7 MiB: tiny-moe fits only some ways on 4 GPUs


@pytest.fixture(scope="module")
def search():
    cfg = load_config(TINY, BATCH)
    return cfg, search_layouts(cfg, 1, 4, BUDGET_GB)


def test_every_listed_layout_fits_on_every_rank_fastest_first(search):
    cfg, result = search
    times = [c.step_s for c in result.fits]
    assert len(result.fits) > 10 and times == sorted(times)
    for c in result.fits[:8] + result.fits[-4:]:
        plan = plan_layout(load_config(TINY, [*BATCH, *c.overrides()]), 1, 4, BUDGET_GB)
        assert max(s.memory.total for s in plan.stages) == c.peak <= BUDGET_GB * GIB
        assert (plan.layout.tp, plan.layout.pp, plan.layout.ep) == (c.tp, c.pp, c.ep)


def test_rejected_families_say_why(search):
    _, result = search
    text = format_search(result)
    assert "tp  4 pp     1: invalid: model.n_kv_heads (2) must be divisible by parallel.tp" in text
    outcomes = [f.outcome(result.budget) for f in result.families.values()]
    assert any(o.startswith("fits") for o in outcomes)
    lean = format_search(search_layouts(search[0], 1, 4, 0.005))   # 5 MiB: nothing fits
    assert "0 layouts fit" in lean and "needs 0.0" in lean and "even with ZeRO-1" in lean


def test_recompute_costs_time_in_the_model(search):
    _, result = search
    same = {}
    for c in result.fits:
        key = (c.tp, c.pp, c.vpp, c.ep, c.fold, c.zero1, c.sequence_parallel, c.micro_batch)
        same.setdefault(key, {})[c.recompute] = c
    times = next(v for v in same.values() if len(v) == 3)
    assert times[None].step_s < times["selective"].step_s < times["full"].step_s


def test_headroom_keeps_a_share_of_memory_free(search):
    cfg, result = search
    half = search_layouts(cfg, 1, 4, BUDGET_GB, headroom=0.5)
    assert 0 < len(half.fits) < len(result.fits)
    assert all(c.peak <= 0.5 * BUDGET_GB * GIB for c in half.fits)
    assert {str(c.overrides()) for c in half.fits} < {str(c.overrides()) for c in result.fits}
    assert "less 50% headroom" in format_search(half)
    with pytest.raises(ValueError, match=r"--headroom \(1.0\) must be a fraction in \[0, 1\)"):
        search_layouts(cfg, 1, 4, BUDGET_GB, headroom=1.0)


def test_uneven_partitions_check_the_heaviest_rank():
    """10 blocks on 4 pipeline stages: the partitioner gives the first and last stages (embedding,
    head) fewer blocks, so the heaviest rank can be a middle one, which the search must find."""
    dense = ["model.preset=tiny", "model.n_layers=10", *BATCH]
    result = search_layouts(load_config(TINY, dense), 1, 4, 1.0)
    piped = [c for c in result.fits if c.pp == 4]
    assert piped
    heaviest = set()
    for c in piped[:6]:
        plan = plan_layout(load_config(TINY, [*dense, *c.overrides()]), 1, 4)
        peaks = [s.memory.total for s in plan.stages]
        assert c.peak == max(peaks)
        heaviest.add(peaks.index(max(peaks)))
    assert heaviest - {0, 3}   # a middle rank is the heaviest somewhere


@pytest.mark.slow
def test_the_fastest_layout_fits_in_simulation(search):
    _, result = search
    best = result.fits[0]
    cfg = load_config(TINY, [*BATCH, *best.overrides()])
    plan = plan_layout(cfg, 1, 4, BUDGET_GB)
    heaviest = max(plan.stages, key=lambda s: s.memory.total).rank
    sim = simulate_rank(cfg, 1, 4, next(c.rank for c in plan.grid if c.pp == heaviest))
    assert sim.peak <= BUDGET_GB * GIB and abs(sim.peak - best.peak) <= 0.03 * sim.peak


def test_cli_search():
    out = subprocess.run([sys.executable, str(ROOT / "launchers" / "plan.py"), "configs/tiny.yaml",
                          "--search", "--gpus-per-node", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "layouts fit; the fastest" in out.stdout
    assert "The fastest as overrides: parallel.tp=" in out.stdout
