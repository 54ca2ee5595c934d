"""MoE training that does not depend on how the step is cut: the Trainer itself, end to end.

With model.aux_loss_scope=global_batch the balance loss uses the step's load fractions (counted in a
no-grad pre-pass through the same pipeline), so one process with micro-batch 8, one with
micro-batch 4, tp 2 x ep 2 (dp 2) and pp 2 x ep 2 (dp 2, 1F1B over 4 micro-batches) must give the
same per-step loss, lm, aux and z (relative 1e-5), read from each run's metrics.jsonl. Aux-loss-free
balancing (expert bias, updated from the step's loads summed over every micro-batch and rank) must
agree the same way, and its biases must come back identical from every layout's final checkpoint
(a DCP buffer, resharded to one process on load). A dense checkpoint upcycled into an MoE
(checkpoint.upcycle) must start every layout at the dense model's loss and train identically. As a
control, the micro_batch scope does change with the micro-batch size, so the comparison can fail.
One 4-rank spawn runs every layout.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from parallel.context import ParallelContext
from tests.distributed.harness import run_distributed
from tests.test_trainer import read_jsonl
from train.checkpoint import list_checkpoints, load_full_model_state
from train.config import load_config
from train.data import write_token_file
from train.trainer import Trainer

pytestmark = pytest.mark.slow
STEPS, RTOL = 3, 1e-5  # an odd step count: a bias that flips sign every step still ends non-zero
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss")
SHAPE = ["model.preset=tiny-moe", "model.n_layers=4", "model.d_model=64", "model.n_heads=4",
         "model.n_kv_heads=2", "model.ffn_dim=128", "model.expert_ffn_dim=32"]
MODELS = {
    "global": [*SHAPE, "model.n_experts=4", "model.aux_loss_scope=global_batch",
               "model.aux_loss_coef=0.1"],
    # transformers' balance loss (an imported Mixtral / Qwen-MoE / OLMoE): f pooled over the layers,
    # which pp 2 splits over two stages
    "pooled": [*SHAPE, "model.n_experts=4", "model.aux_loss_scope=global_batch",
               "model.aux_loss_pool_layers=true", "model.aux_loss_coef=0.1"],
    "bias": [*SHAPE, "model.n_experts=8", "model.score_function=sigmoid", "model.n_group=2",
             "model.topk_group=1", "model.expert_bias=true", "model.expert_bias_update_rate=0.01",
             "model.aux_loss_coef=0.0", "model.first_k_dense=1"],
    # the dense checkpoint the fixture trains, upcycled into 2 slices x 2 copies
    "upcycled": [*SHAPE, "model.n_experts=4", "model.expert_ffn_dim=64",
                 "model.aux_loss_scope=global_batch", "model.aux_loss_coef=0.01",
                 "checkpoint.init_from={dense}", "checkpoint.upcycle=true"],
}
DENSE = ["model.preset=tiny", *SHAPE[1:]]
LAYOUTS = {  # name -> (ParallelContext sizes, overrides)
    "tp2_ep2_dp2": (dict(tp=2, ep=2), ["parallel.tp=2", "parallel.ep=2",
                                       "training.micro_batch_size=4"]),
    "pp2_ep2_dp2": (dict(pp=2, ep=2), ["parallel.pp=2", "parallel.ep=2",
                                       "training.micro_batch_size=2"]),
}
QUIET = dict(log=lambda msg: None)


def _config(tokens: str, run_dir: Path, model: str | list, *extra: str):
    base = [f"data.paths=[{tokens}]", "data.seq_len=32", "training.precision=fp32",
            "training.device=cpu", "training.global_batch_size=16", f"training.max_steps={STEPS}",
            "training.eval_interval=0", "schedule.warmup_steps=1", "optimizer.lr=3.0e-3",
            "logging.tensorboard=false", "logging.interval=100", "checkpoint.interval=0",
            f"run_dir={run_dir}"]
    fields = MODELS[model] if isinstance(model, str) else model
    dense = _latest(Path(tokens).parent / "dense" / "checkpoints")
    return load_config(None, [f.format(dense=dense) for f in fields] + base + list(extra))


def _latest(root: Path) -> str:
    found = list_checkpoints(root)
    return str(found[-1]) if found else ""


def _losses(run_dir: Path) -> torch.Tensor:
    """[steps, 4] loss, lm, aux, z as the run logged them."""
    return torch.tensor([[r[k] for k in KEYS] for r in read_jsonl(run_dir) if "split" not in r],
                        dtype=torch.float64)


def _biases(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_full_model_state(list_checkpoints(run_dir / "checkpoints")[-1])
    return {k: v for k, v in state.items() if k.endswith("expert_bias")}


def _layout_worker(rank: int, world: int, tokens: str, root: Path) -> None:
    torch.set_num_threads(1)
    for layout, (sizes, extra) in LAYOUTS.items():
        for model in MODELS:
            ctx = ParallelContext.for_testing(rank, world, **sizes)
            cfg = _config(tokens, root / f"{model}_{layout}", model, *extra)
            Trainer(cfg, ctx, **QUIET).train()


def _single(tokens: str, run_dir: Path, model: str | list, *extra: str) -> None:
    Trainer(_config(tokens, run_dir, model, *extra), ParallelContext.single(), **QUIET).train()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance")
    rng = np.random.default_rng(3)
    write_token_file(root / "rand", [rng.integers(0, 256, 1000) for _ in range(60)], vocab_size=257)
    tokens = str(root / "rand")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _single(tokens, root / "dense", DENSE)
        run_distributed(_layout_worker, 4, tokens, root, timeout=600)
        for model in MODELS:
            for micro in (8, 4):
                _single(tokens, root / f"{model}_mb{micro}", model,
                        f"training.micro_batch_size={micro}")
        for micro in (8, 4):
            _single(tokens, root / f"control_mb{micro}", "global",
                    f"training.micro_batch_size={micro}", "model.aux_loss_scope=micro_batch")
    finally:
        torch.set_num_threads(threads)
    return root


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp(min=1e-12)).max().item()


@pytest.mark.parametrize("model", list(MODELS))
def test_losses_do_not_depend_on_micro_batch_size_or_layout(runs, model):
    ref = _losses(runs / f"{model}_mb8")
    assert ref.shape == (STEPS, 4) and (ref[:, 0] > 0).all()
    for other in ["mb4", *LAYOUTS]:
        got = _losses(runs / f"{model}_{other}")
        print(f"{model} {other} vs mb8: rel {_rel(got, ref):.2e}")
        assert _rel(got, ref) <= RTOL, f"{model} {other}: {got.tolist()} vs mb8 {ref.tolist()}"


def test_global_scope_is_live_and_micro_batch_scope_is_not_invariant(runs):
    """The control: the per-micro-batch loss changes with the micro-batch size (so the comparison
    above can fail), and the global scope's aux loss is not the micro-batch one."""
    control8, control4 = _losses(runs / "control_mb8"), _losses(runs / "control_mb4")
    print(f"control: micro_batch scope, micro-batch 4 vs 8: rel {_rel(control4, control8):.2e}")
    assert _rel(control4, control8) > 10 * RTOL, (control4, control8)
    glob = _losses(runs / "global_mb8")
    assert (glob[:, 2] > 0).all() and _rel(glob[:, 2], control8[:, 2]) > 10 * RTOL
    pooled = _losses(runs / "pooled_mb8")  # step 0: same weights and batch, only pooling differs
    assert pooled[0, 2] > 0 and _rel(pooled[:1, 2], glob[:1, 2]) > 10 * RTOL


def test_expert_biases_are_the_same_in_every_layout_and_checkpoint(runs):
    ref = _biases(runs / "bias_mb8")
    assert sorted(ref) == [f"layers.{i}.mlp.router.expert_bias" for i in (1, 2, 3)]
    assert all(b.abs().max() > 0 for b in ref.values())  # the updates really happened
    for other in ["mb4", *LAYOUTS]:
        got = _biases(runs / f"bias_{other}")
        assert sorted(got) == sorted(ref), other
        for name, b in ref.items():
            torch.testing.assert_close(got[name], b, rtol=0, atol=1e-7, msg=f"{other} {name}")


def test_upcycled_start_equals_the_dense_model_in_every_layout(runs):
    """Step 1's LM loss is the dense checkpoint's on the same first batch (a dense run started
    from that checkpoint, our own format, not upcycled); losses then agree in every layout."""
    start = f"checkpoint.init_from={_latest(runs / 'dense' / 'checkpoints')}"
    dense = Trainer(_config(str(runs / "rand"), runs / "dense_again", DENSE, start),
                    ParallelContext.single(), **QUIET)
    first_lm = dense.forward_backward()["lm"].item()
    for run in ["mb8", "mb4", *LAYOUTS]:
        lm = _losses(runs / f"upcycled_{run}")[0, 1].item()
        assert lm == pytest.approx(first_lm, rel=1e-5), run
