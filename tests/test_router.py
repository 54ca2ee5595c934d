"""Router math against hand-computed values (3 tokens, 4 experts, fixed logits).

The router's gate is set to the identity, so its logits are exactly the input rows. Every expected
number below was computed independently with plain Python `math` (exp / log, no torch):
    p[t, e]  = exp(l[t, e] - lse_t),   lse_t = log sum_e exp(l[t, e])
    top-2    by p, weights renormalised over the two chosen experts (= sigmoid of the logit gap)
    f_e      = routed slots to e / (T k),  P_e = mean_t p[t, e]
    aux      = 0.01 * E * sum_e f_e P_e,   z = 1e-3 * mean_t lse_t^2
"""
import math

import pytest
import torch

from moe.router import TopKRouter, load_balancing_loss, z_loss

LOGITS = [[1.0, 2.0, 0.0, -1.0],
          [0.0, 1.0, 3.0, 0.5],
          [2.0, -1.0, 0.0, 1.5]]
PROBS = [[0.2368828181, 0.6439142599, 0.0871443187, 0.0320586033],
         [0.0392888096, 0.1067980573, 0.7891368369, 0.0647762962],
         [0.5581437888, 0.0277883430, 0.0755365477, 0.3385313205]]
TOP2 = [[1, 0], [2, 1], [0, 3]]
WEIGHTS = [[0.7310585786, 0.2689414214],   # sigmoid(2 - 1)
           [0.8807970780, 0.1192029220],   # sigmoid(3 - 1)
           [0.6224593312, 0.3775406688]]   # sigmoid(2 - 1.5)
COUNTS = [2, 2, 1, 1]
LSE = [2.4401896986, 3.2368155424, 2.5831386637]
MEAN_PROB = [0.2781051389, 0.2595002201, 0.3172725678, 0.1451220733]
AUX = 0.010250702393   # 0.01 * 4 * sum([2,2,1,1]/6 * MEAN_PROB)
Z = 0.007701368659     # 1e-3 * mean(LSE^2)


def _route(aux_coef=0.01, z_coef=1e-3):
    router = TopKRouter(d_model=4, n_experts=4, top_k=2, aux_coef=aux_coef, z_coef=z_coef)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.tensor(LOGITS, requires_grad=True)
    return router, x, router(x)


def test_router_probs_topk_and_weights_match_hand_values():
    _, _, r = _route()
    assert r.experts.tolist() == TOP2
    torch.testing.assert_close(r.weights, torch.tensor(WEIGHTS), atol=1e-7, rtol=0)
    assert r.weights.dtype == torch.float32
    assert r.tokens_per_expert.tolist() == COUNTS


def test_router_losses_match_hand_values():
    _, _, r = _route()
    assert r.aux_loss.item() == pytest.approx(AUX, rel=1e-6)
    assert r.z_loss.item() == pytest.approx(Z, rel=1e-6)
    # the hand numbers are consistent with each other (guards against a typo in the constants)
    f = [c / 6 for c in COUNTS]
    assert 0.01 * 4 * sum(a * b for a, b in zip(f, MEAN_PROB)) == pytest.approx(AUX, rel=1e-9)
    assert 1e-3 * sum(v * v for v in LSE) / 3 == pytest.approx(Z, rel=1e-9)


def test_router_loss_gradients_match_analytic_formulas():
    """d aux / d l[t,j] = c E / T * p_tj (f_j - sum_e f_e p_te)   (f carries no gradient)
    d z   / d l[t,j]   = c_z * 2 lse_t p_tj / T.   With the identity gate, x.grad = dL/dlogits."""
    _, x, r = _route()
    (r.aux_loss + r.z_loss).backward()
    f = [c / 6 for c in COUNTS]
    expect = []
    for t, p in enumerate(PROBS):
        fp = sum(fe * pe for fe, pe in zip(f, p))
        expect.append([0.01 * 4 / 3 * p[j] * (f[j] - fp) + 1e-3 * 2 * LSE[t] * p[j] / 3 for j in range(4)])
    torch.testing.assert_close(x.grad, torch.tensor(expect), atol=1e-8, rtol=1e-5)


def test_router_coefficients_scale_losses_linearly():
    _, _, r = _route(aux_coef=1.0, z_coef=1.0)
    assert r.aux_loss.item() == pytest.approx(AUX / 0.01, rel=1e-6)
    assert r.z_loss.item() == pytest.approx(Z / 1e-3, rel=1e-6)


def test_balanced_routing_gives_aux_equal_to_coef():
    """Uniform probabilities and an even split: f_e = P_e = 1/E, so aux = coef * E * E/E^2 = coef."""
    probs = torch.full((8, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3]] * 4)
    loss, counts = load_balancing_loss(probs, experts, 4, coef=0.3)
    assert loss.item() == pytest.approx(0.3, rel=1e-6)
    assert counts.tolist() == [4, 4, 4, 4]


def test_collapsed_routing_gives_aux_equal_to_coef_times_E():
    """All tokens to expert 0 with certainty (top-1): f_0 = P_0 = 1, so aux = coef * E."""
    probs = torch.zeros(5, 4)
    probs[:, 0] = 1.0
    loss, _ = load_balancing_loss(probs, torch.zeros(5, 1, dtype=torch.long), 4, coef=0.5)
    assert loss.item() == pytest.approx(2.0, rel=1e-6)


def test_z_loss_of_uniform_zero_logits():
    """logits 0 over E experts: lse = log E for every token, so z = coef * log(E)^2."""
    assert z_loss(torch.zeros(6, 8), coef=2.0).item() == pytest.approx(2.0 * math.log(8) ** 2, rel=1e-6)


def test_router_logits_are_float32_for_bf16_input():
    router, _, ref = _route()
    r = router(torch.tensor(LOGITS).bfloat16())  # these logits are exactly representable in bf16
    assert r.weights.dtype == torch.float32
    torch.testing.assert_close(r.weights, ref.weights)
    assert r.aux_loss.dtype == torch.float32 and r.z_loss.item() == pytest.approx(Z, rel=1e-6)


@pytest.mark.parametrize("T,E,k,F,expected", [
    (8, 4, 2, 1.0, [4, 4, 4, 4]),        # fair share T k / E = 4
    (8, 4, 1, 2.0, [4, 2, 1, 1]),        # busiest 2 x 2; the other 4 slots round-robin over 1..3
    (16, 8, 2, 4.0, [16, 3, 3, 2, 2, 2, 2, 2]),
])
def test_forced_experts_load(T, E, k, F, expected):
    """The fixed choice gives the busiest expert F times its fair share, spreads the rest evenly
    over the others, and never repeats an expert inside one token."""
    from moe.router import expert_counts, forced_experts

    experts = forced_experts(T, E, k, F)
    assert experts.shape == (T, k)
    assert all(len(set(row)) == k for row in experts.tolist())
    counts = expert_counts(experts, E).tolist()
    assert counts[0] == round(F * T * k / E)
    assert max(counts[1:]) - min(counts[1:]) <= 1
    if expected is not None:
        assert counts == expected


def test_forced_routing_keeps_learned_weights():
    """Forced routing replaces the choice only: gate weights are the router's probabilities at the
    forced experts, renormalised, so the router keeps a gradient."""
    router = TopKRouter(d_model=4, n_experts=4, top_k=2, aux_coef=0.01, z_coef=0.0, forced_imbalance=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.tensor(LOGITS, requires_grad=True)
    r = router(x)
    assert r.experts.tolist() == [[0, 1], [2, 3], [0, 1]]
    p = torch.tensor(PROBS)
    chosen = p.gather(1, r.experts)
    assert torch.allclose(r.weights, chosen / chosen.sum(-1, keepdim=True), atol=1e-6)
    (r.weights[:, 0].sum() + r.aux_loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_forced_routing_imbalance_validated():
    from moe.config import ModelConfig

    with pytest.raises(ValueError, match=r"model.forced_routing_imbalance \(5.0\) must be in \[1, n_experts / top_k = 4\]"):
        ModelConfig(n_experts=8, top_k=2, forced_routing_imbalance=5.0)
    with pytest.raises(ValueError, match="forced_routing_imbalance"):
        ModelConfig(n_experts=8, top_k=2, forced_routing_imbalance=0.5)
    ModelConfig(n_experts=8, top_k=2, forced_routing_imbalance=4.0)
