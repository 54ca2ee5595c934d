"""Forced routing under expert parallelism on real gloo ranks: the all-to-all then takes its split
sizes from the router's host-side counts (moe.router.forced_counts, no device read), which the
planner's simulation also relies on. The MoE layer on 2 ep ranks must match one process holding
every expert, balanced and imbalanced, and the sizes it used must be those of the device counts."""
import pytest
import torch

from moe.config import ModelConfig
from moe.moe_layer import MoELayer
from parallel.context import ParallelContext
from parallel.expert import AllToAllDispatcher
from tests.distributed.harness import run_distributed

pytestmark = pytest.mark.slow
D, E, T = 16, 8, 12   # width, experts, tokens per rank (forced routing: the same on every rank)


def _layer(cfg: ModelConfig, ctx: ParallelContext, rank_of_experts: int, n_local: int) -> MoELayer:
    """A layer holding experts [rank_of_experts * n_local, ...) of one fixed set of full weights."""
    g = torch.Generator().manual_seed(3)
    full = (torch.randn(E, D, generator=g), torch.randn(E, D, 2 * cfg.expert_ffn, generator=g) / 4,
            torch.randn(E, cfg.expert_ffn, D, generator=g) / 4)
    layer = MoELayer(cfg, ctx)
    shard = slice(rank_of_experts * n_local, (rank_of_experts + 1) * n_local)
    with torch.no_grad():
        layer.router.weight.copy_(full[0])
        layer.experts.w_in.copy_(full[1][shard])
        layer.experts.w_out.copy_(full[2][shard])
    return layer


def _forward_backward(layer: MoELayer, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + q)
    x = torch.randn(1, T, D, generator=g).requires_grad_(True)
    y, _ = layer(x)
    (y * torch.randn(y.shape, generator=g)).sum().backward()
    return y.detach(), x.grad


def _case(rank: int, world: int, imbalance: float) -> dict:
    torch.set_num_threads(1)
    cfg = ModelConfig(d_model=D, n_heads=2, n_experts=E, top_k=2, expert_ffn_dim=8,
                      forced_routing_imbalance=imbalance)
    ctx = ParallelContext.for_testing(rank, world, ep=world)
    y, x_grad = _forward_backward(_layer(cfg, ctx, ctx.ep_rank, E // world), rank)
    y_ref, x_grad_ref = _forward_backward(_layer(cfg, ParallelContext.single(), 0, E), rank)
    routing = MoELayer(cfg, ParallelContext.single()).router(torch.zeros(T, D))
    counts = torch.tensor(routing.host_counts)
    disp = AllToAllDispatcher(E, ctx.ep_group, world)
    device = disp.split_sizes(counts, disp.exchange_counts(counts), None)
    return {"y": (y - y_ref).abs().max().item(), "x_grad": (x_grad - x_grad_ref).abs().max().item(),
            "host_sizes_match": disp.split_sizes(counts, None, routing.host_counts) == device,
            "busiest": max(routing.host_counts)}


@pytest.mark.parametrize("imbalance", [1.0, 2.5])
def test_forced_routing_under_expert_parallelism(imbalance):
    results = run_distributed(_case, 2, imbalance, timeout=120)
    for r in results:
        assert r["y"] < 1e-5 and r["x_grad"] < 1e-5 and r["host_sizes_match"], r
    assert results[0]["busiest"] == round(imbalance * T * 2 / E)   # expert 0 at F x its share
