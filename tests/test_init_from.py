"""checkpoint.init_from: a run starts from an HF checkpoint written by transformers itself, in any
layout (whole tensors cut to each rank's tp/ep shards)."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from moe.hf import config_from_hf, read_hf_config  # noqa: E402
from tests.distributed.harness import run_distributed  # noqa: E402
from tests.test_hf import randomize, tokens  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import write_token_file  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=258, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    model = randomize(MixtralForCausalLM(MixtralConfig(**SMALL, attn_implementation="sdpa")), seed=3)
    model.save_pretrained(path, safe_serialization=True)
    with torch.no_grad():
        logits = model(tokens(vocab=256)).logits
    return path, logits


def _config(tmp, hf_dir, *extra):
    prefix = tmp / "corpus"
    write_token_file(prefix, [np.arange(3000).astype(int) % 256], vocab_size=257)
    model = config_from_hf(read_hf_config(str(hf_dir)))
    fields = ["n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size", "n_experts", "top_k", "expert_ffn_dim",
              "ffn_dim", "rope_theta", "norm_eps", "max_seq_len"]
    overrides = [f"model.{f}={getattr(model, f)}" for f in fields] + [
        "model.preset=tiny-moe", "model.aux_loss_coef=0.02", "model.z_loss_coef=0.0",
        f"data.paths=[{prefix}]", "data.seq_len=16", "training.precision=fp32", "training.device=cpu",
        "training.global_batch_size=2", "training.micro_batch_size=2", "logging.tensorboard=false",
        f"checkpoint.init_from={hf_dir}", f"run_dir={tmp / 'run'}", *extra]
    return load_config(None, overrides)


def test_init_from_hf_reproduces_hf_logits(tmp_path, mixtral_dir):
    from parallel.context import ParallelContext
    from train.trainer import Trainer

    hf_dir, ref = mixtral_dir
    trainer = Trainer(_config(tmp_path, hf_dir), ParallelContext.single())
    with torch.no_grad():
        ours = trainer.model.eval()(tokens(vocab=256)).logits
    assert (ours - ref).abs().max().item() < 1e-4


def test_init_from_hf_with_mismatched_model_names_the_field(tmp_path, mixtral_dir):
    from parallel.context import ParallelContext
    from train.trainer import Trainer

    with pytest.raises(ValueError, match=r"model\.rope_theta .* set model\.rope_theta=1000000\.0"):
        Trainer(_config(tmp_path, mixtral_dir[0], "model.rope_theta=500000.0"), ParallelContext.single())

    # the mismatch is found from config.json alone, before any weight is read
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((mixtral_dir[0] / "config.json").read_bytes())
    with pytest.raises(ValueError, match=r"model\.rope_theta .* in its config\.json"):
        Trainer(_config(tmp_path, config_only, "model.rope_theta=500000.0"), ParallelContext.single())


def _tp_ep_worker(rank, world, tmp, hf_dir):
    from parallel.context import ParallelContext
    from train.trainer import Trainer

    torch.set_num_threads(1)
    ctx = ParallelContext.for_testing(rank, world, tp=2, ep=2)
    trainer = Trainer(_config(tmp / f"r{rank}", hf_dir, "parallel.tp=2", "parallel.ep=2", "training.micro_batch_size=1"), ctx)
    from parallel.tensor import gather_from_tp

    with torch.no_grad():
        local = trainer.model.eval()(tokens(vocab=256)).logits  # this rank's vocab shard
        return gather_from_tp(local, ctx.tp_group, dim=-1)[..., :trainer.cfg.model.vocab_size]  # drop padding


@pytest.mark.slow
def test_init_from_hf_sharded_tp2_ep2(tmp_path, mixtral_dir):
    hf_dir, ref = mixtral_dir
    for r in range(4):
        (tmp_path / f"r{r}").mkdir()
    outs = run_distributed(_tp_ep_worker, 4, tmp_path, hf_dir)
    for out in outs:
        assert (out - ref).abs().max().item() < 1e-4


def test_imported_balance_loss_is_transformers_over_the_step(tmp_path):
    """A run started from an HF Qwen2-MoE checkpoint with its imported model fields: step 0's aux
    loss (and loss) is what transformers computes with output_router_logits=True on the step's whole
    batch, although the step runs as 4 micro-batches: router_aux_loss_coef 0.02 becomes
    0.02 * top_k 2 / 3 MoE blocks per block, with f pooled over the blocks and the step."""
    import json

    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from parallel.context import ParallelContext
    from train.trainer import Trainer

    torch.manual_seed(0)
    hf = randomize(Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=258, max_position_embeddings=64, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        mlp_only_layers=[1], router_aux_loss_coef=0.02, attn_implementation="sdpa")), seed=3)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    imported = config_from_hf(read_hf_config(str(tmp_path / "hf")))
    assert imported.aux_loss_coef == pytest.approx(0.02 * 2 / 3)
    fields = {k: v for k, v in imported.to_dict().items() if k not in ("vocab_pad_multiple",)}
    prefix = tmp_path / "corpus"
    docs = [np.random.default_rng(0).integers(0, 256, 1000) for _ in range(8)]
    write_token_file(prefix, docs, vocab_size=257)
    cfg = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in fields.items()] + [
        f"data.paths=[{prefix}]", "data.seq_len=16", "training.precision=fp32",
        "training.device=cpu", "training.global_batch_size=8", "training.micro_batch_size=2",
        "logging.tensorboard=false", f"checkpoint.init_from={tmp_path / 'hf'}",
        f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, ParallelContext.single(), log=lambda m: None)
    seen = []
    next_batch = trainer.train_data.next_batch
    trainer.train_data.next_batch = lambda: seen.append(next_batch()) or seen[-1]
    stats = trainer.train_step()
    assert trainer.n_micro == 4 and seen[0].shape == (8, 17)
    with torch.no_grad():  # HF shifts labels itself: its LM loss from all 17 ids, routing from 16
        want = 0.02 * hf(seen[0][:, :-1], output_router_logits=True).aux_loss.item()
        lm = hf(seen[0], labels=seen[0].clone()).loss.item()
    assert float(stats["aux_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(stats["lm_loss"]) == pytest.approx(lm, rel=1e-5)
    assert float(stats["z_loss"]) == 0.0
