"""MFU's numerator: train.metrics.flops_per_token counts the matmul FLOPs of a training step, and
nothing else (no embedding lookup, no norm or bias).

The oracle is torch's own FlopCounterMode around a real forward + backward of the model on CPU, with
scaled_dot_product_attention forced onto its math backend (plain batched matmuls the counter
sees; the fused CPU kernel is not counted). The MoE model runs the float32 per-expert loop backend
(plain matmuls; the counter has no formula for grouped_mm), dropless, so every token runs exactly k
experts.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moe.config import get_preset
from moe.model import build_model, matmul_params, param_counts
from train.metrics import flops_per_token, model_flops_per_token

B, S = 2, 32

CASES = {
    "llama_untied": ("tiny", dict(n_layers=2)),
    "gpt_tied_biases_learned_positions_local_window": (
        "gpt3-125m", dict(n_layers=2, d_model=64, n_heads=4, vocab_size=300, max_seq_len=64,
                          local_window=8)),
    "moe_top2": ("tiny-moe", dict(n_layers=2, expert_backend="loop")),
}


def counted_flops(model) -> tuple[int, int]:
    """(every FLOP torch counts in one forward + backward, the part the MoE combine contributes).

    The combine (moe_layer unpermute's torch path) sums each token's k expert rows weighted by the
    gates as a [1, k] x [k, D] batched matmul: a weighted sum, not a parameter matmul, 4 k D FLOPs
    per token that MFU conventions leave out (under 0.001% of a real MoE step)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=gen)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    combine = sum(n for module, ops in counter.get_flop_counts().items() if module.endswith(".mlp")
                  for op, n in ops.items() if "bmm" in str(op))
    return counter.get_total_flops(), combine


@pytest.mark.parametrize("case", list(CASES))
def test_flops_per_token_is_exactly_the_matmuls_torch_counts(case):
    preset, kw = CASES[case]
    cfg = get_preset(preset, **kw)
    model = build_model(cfg, seed=0)
    total, combine = counted_flops(model)
    d_attn = cfg.n_heads * cfg.dim_head
    want = flops_per_token(matmul_params(model), cfg.n_layers, d_attn, S) * B * S
    assert total - combine == want
    assert (combine > 0) == bool(cfg.n_experts)
    assert model_flops_per_token(cfg, S) * B * S == want  # the same count from the config alone


def test_lookups_and_vectors_are_not_counted_and_a_tied_embedding_counts_once():
    """Hand counts from the shapes: untied, the head counts and the embedding does not; tied, the
    shared [V, d] matrix counts once (as the head); experts at top_k / n_experts; norms never."""
    dense = get_preset("tiny", n_layers=2)
    V, d, L, f = dense.padded_vocab_size, dense.d_model, dense.n_layers, dense.ffn
    kv = dense.kv_heads
    attn = d * d + 2 * d * kv * dense.dim_head + d * d
    per_layer = attn + 3 * d * f
    assert matmul_params(build_model(dense, device="meta")) == L * per_layer + V * d
    tied = get_preset("tiny", n_layers=2, tie_embeddings=True)
    assert matmul_params(build_model(tied, device="meta")) == L * per_layer + V * d
    moe = get_preset("tiny-moe", n_layers=2)
    E, k, fe = moe.n_experts, moe.top_k, moe.expert_ffn_dim
    moe_layer = attn + E * d + k * 3 * d * fe  # router gate + k of E SwiGLU experts
    V_moe = moe.padded_vocab_size
    assert matmul_params(build_model(moe, device="meta")) == L * moe_layer + V_moe * d
    _, active = param_counts(build_model(moe, device="meta"))
    lookups_and_norms = V_moe * d + (2 * L + 1) * d
    assert active - matmul_params(build_model(moe, device="meta")) == lookups_and_norms


def test_a_pipeline_stage_counts_only_what_it_multiplies():
    """Tied over two stages: the first stage's embedding is a lookup, the last stage's head
    replica is a matmul; together they count the tied matrix once, like the whole model."""
    from moe.model import Decoder

    cfg = get_preset("tiny", n_layers=2, tie_embeddings=True)
    with torch.device("meta"):
        whole, first, last = Decoder(cfg), Decoder(cfg, layer_ids=[0], post=False), \
            Decoder(cfg, layer_ids=[1], pre=False)
    assert matmul_params(first) + matmul_params(last) == matmul_params(whole)
    assert matmul_params(last) - matmul_params(first) == cfg.padded_vocab_size * cfg.d_model
