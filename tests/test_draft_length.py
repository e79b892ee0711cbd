"""Choosing k from the cost curve: the expected-throughput model and its online estimates."""

import pytest

from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.draft_length import DraftLength, expected_tokens
from codeaccel.engines.cost_curve import CostCurve


def curve(relative):
    return CostCurve("m", "e", None, 0, 1, list(range(1, len(relative) + 1)), [0.01 * r for r in relative], relative)


LINEAR = curve([1 + 0.3 * (k - 1) for k in range(1, 33)])  # verifying k tokens costs 1 + 0.3(k-1) steps
FLAT = curve([1.0] * 32)


def planner(curve, *, t_target_s=None, t_draft_s=None, **policy):
    """One request's draft-length state on fresh learned costs (``.policy``, ``.costs``)."""
    return DraftLength(curve, **policy).start(LearnedCosts(curve, t_target_s=t_target_s, t_draft_s=t_draft_s))


def step(state, k, n_accepted, target_s, draft_s, n_evaluated=None):
    """What the decode loop and a draft-model drafter record for one step."""
    state.record(k, n_accepted)
    state.costs.record_draft(k, draft_s)
    state.costs.record_verification(k, target_s, n_evaluated)


def best_k(state, alpha):
    return state.policy.best_k(state.costs.snapshot(), alpha)


def min_survival(state, i, draft_step):
    return state.policy.min_survival(state.costs.snapshot(), i, draft_step)


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 5) == 1.0  # only the recovered token
    assert expected_tokens(1.0, 5) == 6.0  # all accepted + bonus
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_longer_drafts_when_acceptance_is_higher():
    policy = planner(LINEAR, k_max=16)
    ks = [best_k(policy, alpha) for alpha in (0.1, 0.5, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] >= 4


def test_falls_back_to_plain_decoding_when_drafting_cannot_pay():
    policy = planner(LINEAR, t_target_s=0.01, t_draft_s=0.02)  # a draft token costs two target steps
    assert policy.choose(room=100) == 0
    assert best_k(policy, alpha=1.0) == 0


def test_target_objective_ignores_the_drafts_cost():
    end_to_end = planner(FLAT, t_target_s=0.01, t_draft_s=0.02)
    client = planner(FLAT, objective="target", t_target_s=0.01, t_draft_s=0.02)
    assert end_to_end.choose(100) == 0
    assert client.choose(100) == 16  # on a flat curve a longer draft is free for the target


def test_room_and_fixed_k():
    assert planner(FLAT).choose(room=3) == 3
    assert planner(FLAT).choose(room=0) == 0
    assert planner(LINEAR, fixed_k=5).choose(room=100) == 5
    assert planner(LINEAR, fixed_k=5).choose(room=2) == 2


def test_update_learns_acceptance_and_decays_back_to_the_prior():
    policy = planner(LINEAR)
    for _ in range(20):
        step(policy, k=4, n_accepted=0, target_s=0.01, draft_s=0.004)
    assert policy.alpha < 0.15
    assert policy.costs.snapshot().t_draft_s == pytest.approx(0.001)
    low = policy.alpha
    for _ in range(30):  # plain decoding steps: the evidence fades, the prior returns
        step(policy, k=0, n_accepted=0, target_s=0.01, draft_s=0.0)
    assert low < policy.alpha < policy.policy.prior_alpha + 1e-9
    assert policy.alpha > 0.6


def test_target_step_time_is_measured_online():
    policy = planner(LINEAR)  # the curve says 10 ms per step
    for _ in range(50):
        step(policy, k=0, n_accepted=0, target_s=0.04, draft_s=0.0)  # plain steps take 40 ms here
    assert policy.costs.snapshot().t_target_s == pytest.approx(0.04, rel=1e-3)
    assert policy.costs.snapshot().batch_scale == 1.0  # one-token steps say nothing about batches


def test_verification_cost_is_learned_when_batches_got_dearer_than_profiled():
    """The profile says 16 tokens cost 5.5 steps; they now cost 10: the policy sees it and drafts shorter."""
    policy = planner(LINEAR, k_max=16, objective="target", t_target_s=0.01)
    before = best_k(policy, alpha=0.9)
    true_steps = [1 + 0.6 * (n - 1) for n in range(1, 33)]  # twice the curve's excess
    for k in (15, 7, 3):
        for _ in range(20):
            step(policy, k=k, n_accepted=k, target_s=0.01 * true_steps[k], draft_s=0.0)
    assert policy.costs.snapshot().batch_scale == pytest.approx(2.0, rel=1e-3)
    assert policy.costs.snapshot().steps(16) == pytest.approx(
        true_steps[15], rel=1e-3
    )  # predictions match what was measured
    assert best_k(policy, alpha=0.9) < before


def test_a_stale_batch_scale_relaxes_so_drafting_is_tried_again():
    """Verifications got 5x dearer than profiled: drafting stops, then plain decoding lets s relax and re-try."""
    policy = planner(LINEAR, k_max=16, objective="target", t_target_s=0.01)
    slow = 1 + 5 * (LINEAR.cost(8) - 1)  # steps an 8-token verification costs in the slow stretch
    for _ in range(30):
        step(policy, k=7, n_accepted=7, target_s=0.01 * slow, draft_s=0.0)
    assert policy.costs.snapshot().batch_scale > 4.5
    assert policy.choose(100) == 0  # not even a draft accepted in full pays now
    for _ in range(10):  # a few plain steps do not erase a measurement
        step(policy, k=0, n_accepted=0, target_s=0.01, draft_s=0.0)
    assert policy.costs.snapshot().batch_scale > 4.0 and policy.choose(100) == 0
    for _ in range(1000):  # a long stretch of plain decoding: s is stale, it returns toward the profile
        step(policy, k=0, n_accepted=0, target_s=0.01, draft_s=0.0)
    assert policy.costs.snapshot().batch_scale == pytest.approx(1.0, abs=0.05)
    assert policy.choose(100) > 0  # so a trial draft measures it afresh
    step(policy, k=7, n_accepted=7, target_s=0.01 * slow, draft_s=0.0)  # still slow: s goes back up
    assert policy.costs.snapshot().batch_scale > 1.7


def test_a_first_step_without_an_evaluation_teaches_nothing():
    policy = planner(LINEAR, t_target_s=0.01)
    step(policy, k=0, n_accepted=0, target_s=1e-6, draft_s=0.0, n_evaluated=0)
    step(policy, k=4, n_accepted=4, target_s=0.01 * LINEAR.cost(4), draft_s=0.0, n_evaluated=4)
    assert policy.costs.snapshot().t_target_s == 0.01 and policy.costs.snapshot().batch_scale == pytest.approx(1.0)


def test_min_survival_prices_a_draft_token_in_target_steps():
    # LINEAR: each extra verified token costs 0.3 steps; a draft step costs 0.4 target steps
    e2e = planner(LINEAR, t_target_s=0.01, t_draft_s=0.004)
    assert min_survival(e2e, 0, draft_step=False) == pytest.approx(0.3)
    assert min_survival(e2e, 5, draft_step=True) == pytest.approx(0.7)
    client = planner(LINEAR, objective="target", t_target_s=0.01, t_draft_s=0.004)
    assert min_survival(client, 5, draft_step=True) == pytest.approx(0.3)  # the client pays the draft step
    assert min_survival(planner(FLAT, t_target_s=0.01, t_draft_s=0.004), 0, draft_step=False) == 0.0


def test_confidence_stopping_turns_k_into_a_cap():
    plain = planner(LINEAR, k_max=16, t_target_s=0.01, t_draft_s=0.001)
    capped = planner(LINEAR, k_max=16, t_target_s=0.01, t_draft_s=0.001, stop_by_confidence=True)
    assert capped.choose(100) == best_k(capped, alpha=1.0) > plain.choose(100) > 0  # prior α = 0.8
    for _ in range(30):  # drafts keep failing: the measured acceptance stops drafting altogether
        step(capped, k=4, n_accepted=0, target_s=0.022, draft_s=0.004)  # costs as profiled
    assert capped.choose(100) == 0


def test_a_profile_dip_below_one_step_is_not_planned_on():
    # hf bf16 profiles small batches below one step (C(2) = 0.69); decoding never saw it
    dip = curve([1.0, 0.69, 0.74, 0.78] + [1.0] * 11 + [1.07] * 17)
    policy = planner(dip, t_target_s=0.2)
    assert [policy.costs.snapshot().steps(n) for n in (1, 2, 4)] == [1.0, 1.0, 1.0]
    step(policy, k=3, n_accepted=3, target_s=0.3, draft_s=0.03)  # n = 4: priced at one step
    assert policy.costs.snapshot().t_target_s == pytest.approx(0.8 * 0.2 + 0.2 * 0.3)  # so it measures the step time
    assert policy.costs.snapshot().batch_scale == 1.0


def test_a_request_learns_its_own_acceptance_while_costs_are_shared():
    """Two requests of one method: the second starts from the prior α, but keeps the measured step time."""
    policy = DraftLength(LINEAR)
    costs = LearnedCosts(LINEAR)  # the curve says 10 ms per step
    first = policy.start(costs)
    for _ in range(20):
        step(first, k=4, n_accepted=0, target_s=0.04, draft_s=0.004)
    assert first.alpha < 0.15
    second = policy.start(costs)
    assert second.alpha == pytest.approx(policy.prior_alpha)  # nothing the first request learned about its drafts
    assert costs.snapshot().batch_scale > 1.5 and costs.snapshot().t_draft_s == pytest.approx(0.001)
