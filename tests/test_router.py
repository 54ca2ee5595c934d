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

from moe.router import (TopKRouter, expert_counts, forced_counts, forced_experts,
                        load_balancing_loss, z_loss)

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


# ---------------------------------------------------------------- router options (hand values)
# Every number below was computed with plain Python `math` from LOGITS (sigmoid(v) = 1/(1+exp(-v))).
SIGMOID = [[0.7310585786, 0.8807970780, 0.5, 0.2689414214],
           [0.5, 0.7310585786, 0.9525741268, 0.6224593312],
           [0.8807970780, 0.2689414214, 0.5, 0.8175744762]]


def _router(**opts):
    from moe.router import RouterOptions

    top_k = opts.pop("top_k", 2)
    aux = opts.pop("aux_coef", 0.01)
    router = TopKRouter(d_model=4, n_experts=4, top_k=top_k, aux_coef=aux, z_coef=1e-3,
                        opts=RouterOptions(**opts))
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    return router


def test_sigmoid_scores_normalised_and_scaled():
    """sigmoid scores, top-2, divided by their sum, times routed_scaling_factor 2.5."""
    r = _router(score_function="sigmoid", normalize=True, scaling_factor=2.5)(torch.tensor(LOGITS))
    assert r.experts.tolist() == [[1, 0], [2, 1], [0, 3]]
    expect = [[1.3661227579, 1.1338772421], [1.4144624949, 1.0855375051],
              [1.2965317804, 1.2034682196]]
    torch.testing.assert_close(r.weights, torch.tensor(expect), atol=1e-7, rtol=1e-6)
    # balance probabilities are the sigmoid scores over their sum: P = [.2807, .2465, .2507, .2220]
    assert r.aux_loss.item() == pytest.approx(0.010181602017911769, rel=1e-6)


def test_sigmoid_without_normalising_keeps_raw_scores():
    r = _router(score_function="sigmoid", normalize=False)(torch.tensor(LOGITS))
    expect = [[SIGMOID[t][e] for e in row] for t, row in enumerate([[1, 0], [2, 1], [0, 3]])]
    torch.testing.assert_close(r.weights, torch.tensor(expect), atol=1e-7, rtol=0)


def test_softmax_norm_topk_prob_off_keeps_probabilities():
    """Qwen2-MoE's norm_topk_prob=False: the chosen softmax probabilities as they are."""
    r = _router(normalize=False)(torch.tensor(LOGITS))
    expect = [[0.6439142599, 0.2368828181], [0.7891368369, 0.1067980573],
              [0.5581437888, 0.3385313205]]
    torch.testing.assert_close(r.weights, torch.tensor(expect), atol=1e-7, rtol=0)
    assert r.aux_loss.item() == pytest.approx(AUX, rel=1e-6)  # the loss does not depend on the weights


def test_topk_before_softmax_is_softmax_over_the_chosen_logits():
    """exp(l_i) / sum of the 2 chosen exp(l_j): token 0 chose logits 2 and 1, so sigmoid(1)."""
    r = _router(topk_before_softmax=True)(torch.tensor(LOGITS))
    assert r.experts.tolist() == TOP2
    torch.testing.assert_close(r.weights, torch.tensor(WEIGHTS), atol=1e-7, rtol=0)
    one = _router(topk_before_softmax=True, top_k=1)(torch.tensor(LOGITS))
    assert one.weights.tolist() == [[1.0], [1.0], [1.0]]  # a softmax over one logit


def test_top1_keeps_probability_unless_normalised():
    assert _router(top_k=1)(torch.tensor(LOGITS)).weights[:, 0].tolist() == pytest.approx(
        [0.6439142599, 0.7891368369, 0.5581437888], abs=1e-7)
    normalised = _router(top_k=1, normalize=True)(torch.tensor(LOGITS))
    assert normalised.weights.tolist() == [[1.0], [1.0], [1.0]]


@pytest.mark.parametrize("group_score_topk, chosen", [
    (2, [[1, 0], [2, 3], [3, 2]]),   # group score = sum of the 2 best (DeepSeek-V3): token 2 -> group {2, 3}
    (1, [[1, 0], [2, 3], [0, 1]]),   # group score = the best one (DeepSeek-V2): token 2 -> group {0, 1}
])
def test_group_limited_routing(group_score_topk, chosen):
    """Sigmoid scores, groups {0, 1} and {2, 3}, one group per token, top-2 inside it. Token 2 would
    choose experts 0 and 3 without groups; its group sums are 0.881 + 0.269 = 1.150 and
    0.5 + 0.818 = 1.318, its group maxima 0.881 and 0.818."""
    router = _router(score_function="sigmoid", normalize=True, n_group=2, topk_group=1,
                     group_score_topk=group_score_topk)
    r = router(torch.tensor(LOGITS))
    assert r.experts.tolist() == chosen
    s = torch.tensor(SIGMOID).gather(1, torch.tensor(chosen))
    torch.testing.assert_close(r.weights, s / s.sum(-1, keepdim=True), atol=1e-7, rtol=0)


def test_expert_bias_changes_the_choice_not_the_weights():
    """bias +0.5 on expert 2: token 0 picks 1 and 2 (0.644, 0.087 + 0.5) instead of 1 and 0; token 2
    picks 2 (0.076 + 0.5 > 0.558) first. The weights are the unbiased probabilities,
    renormalised."""
    router = _router(expert_bias=True)
    assert router.expert_bias.dtype == torch.float32 and router.expert_bias.tolist() == [0.0] * 4
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))
    r = router(torch.tensor(LOGITS))
    assert r.experts.tolist() == [[1, 2], [2, 1], [2, 0]]
    expect = [[0.8807970780, 0.1192029220], [0.8807970780, 0.1192029220],
              [0.1192029220, 0.8807970780]]
    torch.testing.assert_close(r.weights, torch.tensor(expect), atol=1e-7, rtol=0)
    assert r.tokens_per_expert.tolist() == [1, 2, 3, 0]
    assert "expert_bias" in router.state_dict()  # persistent: saved in checkpoints


def test_expert_bias_update_rule():
    """bias += rate * sign(mean load - load): loads [5, 1, 3, 3] (mean 3) -> [-r, +r, 0, 0]."""
    from moe.router import expert_bias_step

    step = expert_bias_step(torch.tensor([5, 1, 3, 3]), 0.01)
    assert step.tolist() == pytest.approx([-0.01, 0.01, 0, 0])
    router = _router(expert_bias=True, bias_update_rate=0.25)
    router.update_bias(torch.tensor([5, 1, 3, 3]))
    router.update_bias(torch.tensor([6, 0, 0, 2]))  # mean 2: [-, +, +, 0]
    assert router.expert_bias.tolist() == [-0.5, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="model.expert_bias=true"):
        _router().update_bias(torch.tensor([1, 1, 1, 1]))


def test_input_jitter_scales_the_router_input_in_training_only():
    """Training: logits = (x * u) W with u ~ U(1 - eps, 1 + eps) drawn from the default generator;
    evaluation: no jitter. The identity gate makes the logits the jittered input itself."""
    router = _router(input_jitter=0.5, aux_coef=0.0)
    x = torch.tensor(LOGITS)
    torch.manual_seed(7)
    u = torch.empty_like(x).uniform_(0.5, 1.5)
    torch.manual_seed(7)
    r = router(x)
    assert (u - 1).abs().max() > 0.1 and ((u >= 0.5) & (u <= 1.5)).all()
    jittered_z = 1e-3 * torch.logsumexp(x * u, -1).square().mean().item()
    assert r.z_loss.item() == pytest.approx(jittered_z, rel=1e-6)
    router.eval()
    assert router(x).z_loss.item() == pytest.approx(Z, rel=1e-6)


SEQ2 = [[0.5, 0.4, 0.3, 0.2], [3.0, 0.2, 0.0, -0.2], [0.1, 3.0, 0.0, -0.5]]  # a second sequence


def test_sequence_scope_averages_per_sequence_losses():
    """Two sequences of 3 tokens. Sequence 0 (LOGITS) alone: E sum f P = 1.025070239; sequence 1
    (SEQ2, top-2 = {0, 1} for all three tokens): 1.600478703; the loss is 0.01 x their mean. The
    micro-batch scope over the same 6 tokens gives a different value, 0.0122522981."""
    x = torch.tensor(LOGITS + SEQ2)
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    r = _router(aux_scope="sequence")(x, seq_ids=seq_ids, n_seqs=2)
    assert r.aux_loss.item() == pytest.approx(0.013127744712175149, rel=1e-6)
    assert r.tokens_per_expert.tolist() == [5, 5, 1, 1]
    assert _router()(x).aux_loss.item() == pytest.approx(0.01225229806997591, rel=1e-6)
    with pytest.raises(ValueError, match="aux_loss_scope=sequence"):
        _router(aux_scope="sequence")(x)


def test_global_scope_uses_the_step_counts_and_its_gradient():
    """F = step counts [10, 2, 3, 9] / 24 with this micro-batch's P (MEAN_PROB):
    aux = 0.01 * 4 * sum F_e P_e = 0.0092632803; the gradient is the micro-batch scope's with F
    in place of f."""
    G = [10, 2, 3, 9]
    router = _router(aux_scope="global_batch")
    x = torch.tensor(LOGITS, requires_grad=True)
    r = router(x, global_counts=torch.tensor(G))
    assert r.aux_loss.item() == pytest.approx(0.009263280319534477, rel=1e-6)
    assert r.tokens_per_expert.tolist() == COUNTS  # the micro-batch's own counts, for statistics
    r.aux_loss.backward()
    F_ = [g / 24 for g in G]
    expect = [[0.01 * 4 / 3 * p[j] * (F_[j] - sum(a * b for a, b in zip(F_, p))) for j in range(4)]
              for p in PROBS]
    torch.testing.assert_close(x.grad, torch.tensor(expect), atol=1e-9, rtol=1e-5)
    with pytest.raises(ValueError, match="global_batch needs the step's expert loads"):
        router(torch.tensor(LOGITS))
    with torch.no_grad():  # a no-grad pass (the counting pre-pass, evaluation) uses its own counts
        assert router(torch.tensor(LOGITS)).aux_loss.item() == pytest.approx(AUX, rel=1e-6)


def test_forced_routing_with_sigmoid_scaling_and_groups():
    """The forced choice overrides groups and bias; the weights follow the options."""
    from moe.router import RouterOptions

    opts = RouterOptions(score_function="sigmoid", normalize=True, scaling_factor=2.0, n_group=2,
                         topk_group=1, expert_bias=True)
    router = TopKRouter(4, 4, 2, 0.01, 0.0, forced_imbalance=1.0, opts=opts)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    r = router(torch.tensor(LOGITS))
    assert r.experts.tolist() == [[0, 1], [2, 3], [0, 1]]
    s = torch.tensor(SIGMOID).gather(1, r.experts)
    torch.testing.assert_close(r.weights, 2.0 * s / s.sum(-1, keepdim=True), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("T, E, k, imbalance", [(7, 4, 2, 1.0), (16, 8, 2, 1.0), (5, 3, 1, 1.0),
                                                (1, 4, 2, 1.0), (64, 8, 2, 2.5), (10, 4, 2, 2.0),
                                                (9, 16, 2, 8.0), (33, 6, 3, 1.7)])
def test_forced_counts_match_the_device_choice(T, E, k, imbalance):
    """The host-side counts (the expert all-to-all's split sizes without a device read, and the
    only sizes a fake-tensor simulation has) equal the counts of the device's forced choice."""
    experts = forced_experts(T, E, k, imbalance)
    assert forced_counts(T, E, k, imbalance) == expert_counts(experts, E).tolist()
    r = TopKRouter(8, E, k, 0.01, 1e-3, forced_imbalance=imbalance)
    torch.nn.init.normal_(r.weight)
    assert r(torch.randn(T, 8)).host_counts == expert_counts(experts, E).tolist()
    learned = TopKRouter(8, E, k, 0.01, 1e-3)(torch.randn(T, 8))
    assert learned.host_counts is None  # learned routing: unknown until read from the device
