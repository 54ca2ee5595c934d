"""benchmarks/loss_curves.py: the float8-vs-bf16 loss-curve check of docs/performance.md, on
metrics.jsonl files written here with known gaps (the smoothed gap is computed by hand)."""

import json

import pytest

from benchmarks import loss_curves


def write_run(path, losses, extra=()):
    path.mkdir(parents=True)
    lines = [{"step": s, "loss": v, "lr": 1e-3} for s, v in enumerate(losses, 1)] + list(extra)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_gap_of_smoothed_curves_and_verdict(tmp_path, capsys):
    a = [4.0 - 0.01 * s for s in range(60)]
    b = list(a)
    b[39] = a[39] * 1.10  # one noisy step 40: 10% off alone, 10% / 5 = 2% in a 5-step mean
    valid = {"step": 50, "split": "valid", "loss": 9.0}  # validation lines are not the curve
    ra = write_run(tmp_path / "a", a, [valid])
    rb = write_run(tmp_path / "b", b)
    r = loss_curves.main([ra, rb, "--window", "5", "--skip", "10", "--tolerance", "0.01"])
    # steps 40-44 hold the noisy step in their 5-step mean; the falling loss makes step 44's mean
    # the smallest
    assert r["max_gap_step"] == 44
    assert r["max_gap"] == pytest.approx(0.1 * a[39] / 5 / (sum(a[39:44]) / 5))
    assert r["first"] == 10 and r["last"] == 60 and not r["within"]
    assert "NOT within 1%" in capsys.readouterr().out
    r = loss_curves.main([ra, rb, "--window", "20", "--tolerance", "0.01"])  # 20-step mean: 0.5%
    assert r["within"] and r["max_gap_step"] == 59
    assert r["max_gap"] == pytest.approx(0.1 * a[39] / 20 / (sum(a[39:59]) / 20))


def test_a_resumed_step_counts_once_the_later_line(tmp_path):
    a = write_run(tmp_path / "a", [2.0] * 30)
    first = [2.0] * 24 + [9.0] + [2.0] * 5  # step 25 diverged, then was logged again after a resume
    b = write_run(tmp_path / "b", first, [{"step": 25, "loss": 2.0}])
    gap = loss_curves.compare(loss_curves.read_losses(a), loss_curves.read_losses(b), 1, 0, 0.01)
    assert gap["max_gap"] == 0.0


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, r"metrics\.jsonl not found"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("{not json\n")),
     r"metrics\.jsonl:1 is not a JSON line"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), r"has no training loss lines"),
])
def test_bad_run_dirs_are_one_line_errors(tmp_path, setup, message):
    good = write_run(tmp_path / "good", [1.0] * 30)
    setup(tmp_path / "bad")
    with pytest.raises(SystemExit, match=message) as err:
        loss_curves.main([good, str(tmp_path / "bad")])
    assert "\n" not in str(err.value)
