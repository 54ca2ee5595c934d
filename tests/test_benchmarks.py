"""Spec tests for benchmarks/moe_layer.py and benchmarks/train_step.py in CPU smoke mode.

The figures themselves only mean something on a GPU; here we check that both scripts run end to
end, print the tables the docs promise (rows, columns, positive numbers) and write parseable JSON,
and - against independent oracles - that what they count is right: the expert FLOP formula against
torch's FlopCounterMode, the naive reference against our MoELayer's output, tokens/s and MFU against
hand-computed values, and HF's model against ours for the same parameter count.
"""

import importlib.util
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import moe_layer, train_step
from benchmarks.moe_layer import DenseChain, NaiveMoE, Shape, build_layer

SMOKE_LABEL = "T=64 d=32 f=16 E=4 k=2"



def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in `text` as (headers, rows of cells)."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            blocks.append(current)
            current = []
    for block in blocks:
        assert set("".join(block[1])) <= set("-"), f"second table line is not a separator: {block[1]}"
    return [(block[0], block[2:]) for block in blocks]


def positive(cell: str) -> float:
    value = float(cell)  # raises on 'error', '-', or a '*' (warning) mark
    assert value > 0, cell
    return value


# ---------------------------------------------------------------- moe_layer
def test_moe_layer_smoke_prints_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "moe.json"
    result = moe_layer.main(["--smoke", "--json", str(out_json)])
    stdout = capsys.readouterr().out
    backends = moe_layer.available_backends()
    assert backends[:3] == ["grouped_mm", "padded", "loop"]
    [(headers, rows)] = tables(stdout)
    assert headers == ["shape", *backends, "naive loop", "dense limit", "best / limit (%)"]
    assert [row[0] for row in rows] == [SMOKE_LABEL]
    cells = dict(zip(headers[1:], map(positive, rows[0][1:])))

    saved = json.loads(out_json.read_text())
    assert saved == json.loads(json.dumps(result))
    [run] = saved["runs"]
    assert run["precision"] == "fp32" and saved["iters"] == 2 and saved["device"] == "cpu"
    flops = 3 * 2 * 64 * 2 * 3 * 32 * 16  # (fwd + bwd) x 2 T k x 3 matmuls x d f
    assert run["expert_flops"] == flops
    for name in [*backends, "naive loop", "dense limit"]:
        case = run["cases"][name]
        assert case["tflops"] == pytest.approx(flops / (case["ms"] * 1e-3) / 1e12)
        assert cells[name] == pytest.approx(case["tflops"], rel=5e-3)  # printed to 3 significant digits
    best = max(run["cases"][b]["tflops"] for b in backends)
    assert cells["best / limit (%)"] == pytest.approx(100 * best / run["cases"]["dense limit"]["tflops"], rel=5e-3)


def test_moe_layer_amp_and_bf16_tables_on_cpu(capsys):
    """The GPU precisions run on CPU too: one table per precision, titled by it."""
    moe_layer.main(["--smoke", "--precision", "amp,bf16", "--backends", "grouped_mm,padded", "--iters", "1",
                    "--warmup", "0"])
    stdout = capsys.readouterr().out
    found = tables(stdout)
    assert len(found) == 2
    assert stdout.index("### amp:") < stdout.index("### bf16:")
    for headers, rows in found:
        assert headers == ["shape", "grouped_mm", "padded", "naive loop", "dense limit", "best / limit (%)"]
        assert len(rows) == 1 and all(positive(c) for c in rows[0][1:])


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "padded"])
def test_naive_reference_computes_the_same_layer(backend):
    """The naive loop is a fair reference only if it routes and computes exactly what MoELayer does."""
    shape = Shape(T=40, d=16, f=8, E=4, k=2)
    layer = build_layer(shape, backend, "fp32", torch.device("cpu"), seed=3)
    x = torch.randn(shape.T, shape.d, generator=torch.Generator().manual_seed(0))
    ours, _ = layer(x)
    torch.testing.assert_close(NaiveMoE(layer)(x), ours, rtol=1e-5, atol=1e-6)


def test_flop_formula_matches_flop_counter():
    """expert_flops = 3 x 2 T k 3 d f: what torch counts for the dense chain's forward + backward,
    and for the naive loop minus its router (forward, dX and dW of [T, d] x [d, E]: 3 x 2 T d E)."""
    shape = Shape(T=24, d=16, f=8, E=4, k=2)
    dense = DenseChain(shape, seed=0)
    x = torch.randn(shape.T * shape.k, shape.d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        dense(x).backward(torch.randn(shape.T * shape.k, shape.d))
    assert counter.get_total_flops() == shape.expert_flops()

    naive = NaiveMoE(build_layer(shape, "loop", "fp32", torch.device("cpu"), seed=0))
    x = torch.randn(shape.T, shape.d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        naive(x).backward(torch.randn(shape.T, shape.d))
    assert counter.get_total_flops() == shape.expert_flops() + 3 * 2 * shape.T * shape.d * shape.E


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "64x32x16"], "--shapes entry '64x32x16' must be TxDxFxExK"),
    (["--shapes", "64x32x16x2x4"], r"k \(4\) must be <= E \(2\)"),
    (["--backends", "grouped_mm,fast"], "--backends 'grouped_mm,fast'"),
    (["--precision", "fp8"], "--precision 'fp8'"),
    (["--iters", "0"], r"--iters \(0\) must be >= 1"),
])
def test_moe_layer_rejects_bad_options_in_one_line(argv, message):
    with pytest.raises(SystemExit, match=message) as info:
        moe_layer.main(["--smoke", *argv])
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- train_step
def smoke_active_params() -> int:
    """Hand count for the smoke MoE config: V 256, d 64, 2 layers, 4 q / 2 kv heads of 16, 4 experts
    top-2 of width 32. Embedding + head, then per layer attention (q, k, v, o), two norms, router and
    the top-2 share of the experts, then the final norm."""
    V, d, L, kv_dim, E, k, f = 256, 64, 2, 2 * 16, 4, 2, 32
    per_layer = (d * d + 2 * d * kv_dim + d * d) + 2 * d + E * d + k * 3 * d * f
    return 2 * V * d + L * per_layer + d


def test_train_step_smoke_prints_table_and_json(tmp_path, capsys):
    hf = importlib.util.find_spec("transformers") is not None  # --hf whenever transformers is installed
    out_json = tmp_path / "step.json"
    peak_tflops = 1e-3
    result = train_step.main(["--smoke", "--peak-tflops", str(peak_tflops), "--json", str(out_json)]
                             + (["--hf"] if hf else []))
    stdout = capsys.readouterr().out
    [(headers, rows)] = tables(stdout)
    assert headers == ["config", "impl", "precision", "tok/s", "MFU (%)", "peak mem (GiB)", "step (ms)"]
    impls = [(r[0], r[1].split(" (")[0]) for r in rows]
    expected = [("dense-1.1b", "ours"), ("moe-16x", "ours")]
    if hf:
        expected = [("dense-1.1b", "ours"), ("dense-1.1b", "hf LlamaForCausalLM"),
                    ("moe-16x", "ours"), ("moe-16x", "hf MixtralForCausalLM")]
    assert impls == expected
    for row in rows:
        assert row[2] == "fp32" and row[5] == "-"  # CPU: no CUDA memory statistics
        positive(row[3]), positive(row[4]), positive(row[6])

    saved = json.loads(out_json.read_text())
    assert saved == json.loads(json.dumps(result))
    moe = next(r for r in saved["results"] if r["config"] == "moe-16x")
    assert moe["active_params"] == smoke_active_params()
    assert moe["flops_per_token"] == 6 * smoke_active_params() + 12 * 2 * 64 * 32
    tokens = 2 * 32  # B x S
    for res in saved["results"]:
        for row in res["rows"]:
            assert row["tokens_per_s"] == pytest.approx(tokens / (row["ms"] * 1e-3))
            assert row["mfu"] == pytest.approx(res["flops_per_token"] * row["tokens_per_s"] / (peak_tflops * 1e12))
        if hf:  # same shapes: HF's model has exactly our parameter count
            assert res["rows"][0]["params"] == res["rows"][1]["params"] == res["params"]


@pytest.mark.parametrize("argv, message", [
    (["--configs", "dense-7b"], "--configs 'dense-7b'"),
    (["--seq-len", "0"], r"--seq-len \(0\) must be >= 1"),
    (["--peak-tflops", "-1"], r"--peak-tflops \(-1.0\) must be a positive number"),
    (["--precision", "fp16"], "--precision 'fp16'"),
])
def test_train_step_rejects_bad_options_in_one_line(argv, message):
    with pytest.raises(SystemExit, match=message) as info:
        train_step.main(["--smoke", *argv])
    assert "\n" not in str(info.value)


def test_profile_option_writes_one_operator_table_per_case(tmp_path):
    moe_layer.main(["--smoke", "--backends", "grouped_mm", "--profile", str(tmp_path / "moe")])
    train_step.main(["--smoke", "--configs", "moe-16x", "--activation-checkpointing", "--recompute", "selective",
                     "--profile", str(tmp_path / "step")])
    moe_files = sorted(p.name for p in (tmp_path / "moe").iterdir())
    assert moe_files == ["moe_fp32_64x32x16x4x2_dense.txt", "moe_fp32_64x32x16x4x2_grouped_mm.txt"]
    [step_file] = (tmp_path / "step").iterdir()
    assert step_file.name == "step_moe-16x_ours_fp32_ckpt_selective.txt"
    for path in [*(tmp_path / "moe").iterdir(), step_file]:
        text = path.read_text()
        assert text.startswith("3 steps\n") and "Self CPU" in text and "aten::" in text


def test_train_step_mixed_precision_runs_the_trainers_optimizer(capsys):
    """'mixed' (the default on GPU) times the trainer's bf16 layout: bf16 parameters and the
    ParallelOptimizer's float32 main weights; on CPU it runs too."""
    result = train_step.main(["--smoke", "--configs", "moe-16x", "--precision", "mixed,fp32"])
    rows = {row["precision"]: row for row in result["results"][0]["rows"]}
    assert set(rows) == {"mixed", "fp32"} and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["mixed"]["params"] == rows["fp32"]["params"]
