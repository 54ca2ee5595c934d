"""Spec for train/optim.py: AdamW groups, fused choice, LR schedule, clipping (1 process and 2 on gloo)."""

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.optim import LRSchedule, apply_lr, build_optimizer, clip_grad_norm_, param_groups


class TinyMoEish(torch.nn.Module):
    """Every parameter kind the grouping rule must sort: embedding, linear (+bias), norm, experts, 1-D gate."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.proj = torch.nn.Linear(8, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.experts_w1 = torch.nn.Parameter(torch.randn(3, 6, 4) * 0.1)  # [E, d, f]
        self.expert_bias = torch.nn.Parameter(torch.zeros(3))  # 1-D, not named "bias"
        self.frozen = torch.nn.Parameter(torch.ones(5, 5), requires_grad=False)
        self.head = torch.nn.Linear(6, 11, bias=False)

    def forward(self, ids):
        h = self.norm(self.proj(self.embed(ids)))  # [B, T, 6]
        h = h + torch.einsum("btd,edf->btf", h, self.experts_w1).sum(-1, keepdim=True) + self.expert_bias.sum()
        return self.head(h)


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    return model(ids).square().mean()


# ----------------------------------------------------------------------------- param groups / optimizer


def test_param_groups_membership_and_order():
    model = TinyMoEish()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    # named_parameters order: a module's own params before its children's
    assert decay["names"] == ["experts_w1", "embed.weight", "proj.weight", "head.weight"]
    assert no_decay["names"] == ["expert_bias", "proj.bias", "norm.weight", "norm.bias"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    named = dict(model.named_parameters())
    for group in (decay, no_decay):
        assert [id(p) for p in group["params"]] == [id(named[n]) for n in group["names"]]
    assert all(p is not model.frozen for g in (decay, no_decay) for p in g["params"])


def test_param_groups_tied_weight_counted_once_and_errors():
    model = TinyMoEish()
    model.head.weight = model.embed.weight  # tied [11, 8] weight (shape only matters for grouping)
    decay, _ = param_groups(model, 0.1)
    assert decay["names"] == ["experts_w1", "embed.weight", "proj.weight"]
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -0.1)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen, 0.1)


def test_weight_decay_applied_only_to_decay_group():
    """With zero grads AdamW's Adam term is 0, so only decoupled decay moves p: p *= (1 - lr * wd)."""
    model = TinyMoEish()
    opt = build_optimizer(model, lr=0.5, weight_decay=0.2, betas=(0.9, 0.95), eps=1e-8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 0.9 if n in ("embed.weight", "proj.weight", "experts_w1", "head.weight") else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0)


def test_fused_auto_on_cpu_matches_foreach():
    """fused=None picks the fused kernel on CPU; it must track the foreach kernel within fp32 tolerance."""
    torch.manual_seed(0)
    ref_model = TinyMoEish()
    models = {"auto": ref_model, "foreach": TinyMoEish(), "fused": TinyMoEish()}
    for m in models.values():
        m.load_state_dict(ref_model.state_dict())
    opts = {k: build_optimizer(m, 1e-2, 0.1, (0.9, 0.95), 1e-8, fused={"auto": None, "foreach": False, "fused": True}[k])
            for k, m in models.items()}
    assert [g["fused"] for g in opts["auto"].param_groups] == [True, True]
    assert [g["foreach"] for g in opts["foreach"].param_groups] == [True, True]
    assert opts["foreach"].param_groups[0]["fused"] in (None, False)
    for step in range(5):
        for m, o in zip(models.values(), opts.values()):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    ref = dict(models["foreach"].named_parameters())
    for key in ("auto", "fused"):
        for n, p in models[key].named_parameters():
            torch.testing.assert_close(p, ref[n], rtol=1e-5, atol=1e-6, msg=f"{key} {n}")


def test_build_optimizer_errors():
    model = TinyMoEish()
    with pytest.raises(ValueError, match=r"lr \(0\.0\)"):
        build_optimizer(model, lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(model, lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(model, lr=1e-3, betas=(-0.1, 0.9))
    with pytest.raises(ValueError, match="eps"):
        build_optimizer(model, lr=1e-3, eps=0.0)
    meta_model = torch.nn.Module()
    meta_model.p = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64).to("meta"))
    with pytest.raises(ValueError, match="fused=True"):
        build_optimizer(meta_model, lr=1e-3, fused=True)


# ----------------------------------------------------------------------------- schedule


# lr=1.0, min_lr=0.1, warmup 4, decay 12: p = (s - 4) / 8; hand-computed values
# cosine(s=6): 0.1 + 0.45 * (1 + cos(pi/4)) = 0.1 + 0.45 * 1.7071067812 = 0.8681980515
# cosine(s=10): 0.1 + 0.45 * (1 + cos(3pi/4)) = 0.1 + 0.45 * 0.2928932188 = 0.2318019485
EXPECTED = {
    "cosine": {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 0.8681980515, 8: 0.55, 10: 0.2318019485, 12: 0.1, 13: 0.1, 1000: 0.1},
    "linear": {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 0.775, 8: 0.55, 10: 0.325, 12: 0.1, 13: 0.1, 1000: 0.1},
    "constant": {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 1.0, 8: 1.0, 10: 1.0, 12: 1.0, 13: 1.0, 1000: 1.0},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_schedule_values(kind):
    sched = LRSchedule(kind, lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=12)
    got = {s: sched.lr_at(s) for s in EXPECTED[kind]}
    assert got == pytest.approx(EXPECTED[kind], abs=1e-9)


def test_schedule_edges():
    assert LRSchedule("cosine", lr=2.0, warmup_steps=0, decay_steps=4).lr_at(0) == 2.0  # no warmup
    assert LRSchedule("cosine", lr=2.0, warmup_steps=0, decay_steps=4).lr_at(2) == pytest.approx(1.0)  # min_lr 0
    jump = LRSchedule("linear", lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=2)
    assert [jump.lr_at(s) for s in range(4)] == pytest.approx([0.5, 1.0, 0.1, 0.1])


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"warmup_steps \(5\) must be <= decay_steps \(4\)"):
        LRSchedule("cosine", lr=1.0, warmup_steps=5, decay_steps=4)
    with pytest.raises(ValueError, match=r"min_lr \(2\.0\)"):
        LRSchedule("cosine", lr=1.0, min_lr=2.0, decay_steps=4)
    with pytest.raises(ValueError, match="cosine, linear, constant"):
        LRSchedule("wsd", lr=1.0, decay_steps=4)
    with pytest.raises(ValueError, match="lr"):
        LRSchedule("cosine", lr=0.0, decay_steps=4)
    with pytest.raises(ValueError, match="step"):
        LRSchedule("cosine", lr=1.0, decay_steps=4).lr_at(-1)


def test_apply_lr_sets_every_group():
    opt = build_optimizer(TinyMoEish(), lr=1e-3)
    apply_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    with pytest.raises(ValueError, match="lr"):
        apply_lr(opt, float("nan"))


# ----------------------------------------------------------------------------- clipping, one process


def _model_with_grads(seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = TinyMoEish()
    (_loss(model, seed) * scale).backward()
    return model


@pytest.mark.parametrize("max_norm", [1e-3, 1e6, 0.0])
def test_clip_matches_torch(max_norm):
    ours, ref = _model_with_grads(), _model_with_grads()
    norm = clip_grad_norm_([(ours.parameters(), [])], max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad],
                                              max_norm if max_norm > 0 else float("inf"))
    assert isinstance(norm, float)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=n)
    clipped = math.sqrt(sum(p.grad.square().sum().item() for p in ours.parameters() if p.grad is not None))
    assert clipped == pytest.approx(min(norm, max_norm) if max_norm > 0 else norm, rel=1e-5)


def test_clip_buckets_add_up_and_norm_in_fp32():
    model = _model_with_grads()
    params = [p for p in model.parameters() if p.grad is not None]
    expected = math.sqrt(sum(p.grad.double().square().sum().item() for p in params))
    assert clip_grad_norm_([(params[:2], []), (params[2:], [None])], 0.0) == pytest.approx(expected, rel=1e-6)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    assert clip_grad_norm_([([p], [])], 0.0) == pytest.approx(math.sqrt(3.0), rel=1e-6)  # bf16 sqrt(3) = 1.734


def test_clip_nonfinite_returned_unscaled_and_errors():
    model = _model_with_grads()
    model.proj.weight.grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert clip_grad_norm_([(model.parameters(), [])], 1e-3) == float("inf")
    for g, b in zip([p.grad for p in model.parameters() if p.grad is not None], before):
        assert torch.equal(g, b)
    with pytest.raises(ValueError, match="repeats a parameter"):
        clip_grad_norm_([([model.proj.weight], []), ([model.proj.weight], [])], 1.0)
    with pytest.raises(ValueError, match="groups must be a list"):
        clip_grad_norm_([([model.proj.weight], None)], 1.0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="not initialized"):
            clip_grad_norm_([([model.proj.weight], [object()])], 1.0)


# ----------------------------------------------------------------------------- clipping, 2 ranks on gloo


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank, world, port):
    """Each rank holds half of G's grad; R's grad is replicated. Checks run inside one launch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        _sharded_checks(rank, world)
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _sharded_checks(rank, world):
    gen = torch.Generator().manual_seed(7)
    full_g = torch.randn(6, 4, generator=gen)  # [6, 4], identical on both ranks
    rep_g = torch.randn(5, generator=gen)
    full_sq, rep_sq = full_g.double().square().sum().item(), rep_g.double().square().sum().item()
    singles = [dist.new_group([r]) for r in range(world)]  # every rank must create every group

    def params():
        shard = torch.nn.Parameter(torch.zeros(3, 4))
        shard.grad = full_g.chunk(world)[rank].clone()  # [3, 4]
        rep = torch.nn.Parameter(torch.zeros(5))
        rep.grad = rep_g.clone()
        return shard, rep

    shard, rep = params()
    norm = clip_grad_norm_([([shard], [dist.group.WORLD]), ([rep], [])], 0.0)
    assert norm == pytest.approx(math.sqrt(full_sq + rep_sq), rel=1e-6), (rank, norm)

    shard, rep = params()  # clipping: every rank scales its piece by the same global coefficient
    norm = clip_grad_norm_([([shard], [None, singles[rank], dist.group.WORLD]), ([rep], [])], 1.0)
    coef = 1.0 / (math.sqrt(full_sq + rep_sq) + 1e-6)
    torch.testing.assert_close(shard.grad, full_g.chunk(world)[rank] * coef)
    torch.testing.assert_close(rep.grad, rep_g * coef)
    norms = [None] * world
    dist.all_gather_object(norms, norm)
    assert norms[0] == norms[1], norms

    shard, rep = params()  # a rank with no grad still joins the all_reduce (contributes 0)
    if rank == 1:
        shard.grad = None
    norm = clip_grad_norm_([([shard], [dist.group.WORLD]), ([rep], [])], 0.0)
    half_sq = full_g.chunk(world)[0].double().square().sum().item()
    assert norm == pytest.approx(math.sqrt(half_sq + rep_sq), rel=1e-6), (rank, norm)


@pytest.mark.slow
def test_clip_two_ranks_sharded_param_counted_once():
    mp.spawn(_sharded_worker, args=(2, _free_port()), nprocs=2, join=True)
