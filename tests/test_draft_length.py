"""Choosing k from the cost curve: the expected-throughput model and its online estimates."""

import pytest

from codeaccel.cost_curve import CostCurve
from codeaccel.draft_length import DraftLength, expected_tokens


def curve(relative):
    return CostCurve("m", "e", None, 0, 1, list(range(1, len(relative) + 1)), [0.01 * r for r in relative], relative)


LINEAR = curve([1 + 0.3 * (k - 1) for k in range(1, 33)])  # verifying k tokens costs 1 + 0.3(k-1) steps
FLAT = curve([1.0] * 32)


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 5) == 1.0  # only the recovered token
    assert expected_tokens(1.0, 5) == 6.0  # all accepted + bonus
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_longer_drafts_when_acceptance_is_higher():
    policy = DraftLength(LINEAR, k_max=16)
    ks = [policy.best_k(alpha) for alpha in (0.1, 0.5, 0.8, 0.95)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] >= 4


def test_falls_back_to_plain_decoding_when_drafting_cannot_pay():
    policy = DraftLength(LINEAR, t_target_s=0.01, t_draft_s=0.02)  # a draft token costs two target steps
    assert policy.choose(room=100) == 0
    assert policy.best_k(alpha=1.0) == 0


def test_target_objective_ignores_the_drafts_cost():
    end_to_end = DraftLength(FLAT, t_target_s=0.01, t_draft_s=0.02)
    client = DraftLength(FLAT, objective="target", t_target_s=0.01, t_draft_s=0.02)
    assert end_to_end.choose(100) == 0
    assert client.choose(100) == 16  # on a flat curve a longer draft is free for the target


def test_room_and_fixed_k():
    assert DraftLength(FLAT).choose(room=3) == 3
    assert DraftLength(FLAT).choose(room=0) == 0
    assert DraftLength(LINEAR, fixed_k=5).choose(room=100) == 5
    assert DraftLength(LINEAR, fixed_k=5).choose(room=2) == 2


def test_update_learns_acceptance_and_decays_back_to_the_prior():
    policy = DraftLength(LINEAR)
    for _ in range(20):
        policy.update(k=4, n_accepted=0, target_s=0.01, draft_s=0.004)
    assert policy.alpha < 0.15
    assert policy.t_draft_s == pytest.approx(0.001)
    low = policy.alpha
    for _ in range(30):  # plain decoding steps: the evidence fades, the prior returns
        policy.update(k=0, n_accepted=0, target_s=0.01, draft_s=0.0)
    assert low < policy.alpha < policy.prior_alpha + 1e-9
    assert policy.alpha > 0.6


def test_target_step_time_is_measured_online():
    policy = DraftLength(LINEAR)  # the curve says 10 ms per step
    for _ in range(50):
        policy.update(k=0, n_accepted=0, target_s=0.04, draft_s=0.0)  # plain steps take 40 ms here
    assert policy.t_target_s == pytest.approx(0.04, rel=1e-3)
    assert policy.batch_scale == 1.0  # one-token steps say nothing about batches


def test_verification_cost_is_learned_when_batches_got_dearer_than_profiled():
    """The profile says 16 tokens cost 5.5 steps; they now cost 10: the policy sees it and drafts shorter."""
    policy = DraftLength(LINEAR, k_max=16, objective="target", t_target_s=0.01)
    before = policy.best_k(alpha=0.9)
    true_steps = [1 + 0.6 * (n - 1) for n in range(1, 33)]  # twice the curve's excess
    for k in (15, 7, 3):
        for _ in range(20):
            policy.update(k=k, n_accepted=k, target_s=0.01 * true_steps[k], draft_s=0.0)
    assert policy.batch_scale == pytest.approx(2.0, rel=1e-3)
    assert policy.steps(16) == pytest.approx(true_steps[15], rel=1e-3)  # predictions match what was measured
    assert policy.best_k(alpha=0.9) < before


def test_a_stale_batch_scale_relaxes_so_drafting_is_tried_again():
    """Verifications got 5x dearer than profiled: drafting stops, then plain decoding lets s relax and re-try."""
    policy = DraftLength(LINEAR, k_max=16, objective="target", t_target_s=0.01)
    slow = 1 + 5 * (LINEAR.cost(8) - 1)  # steps an 8-token verification costs in the slow stretch
    for _ in range(30):
        policy.update(k=7, n_accepted=7, target_s=0.01 * slow, draft_s=0.0)
    assert policy.batch_scale > 4.5
    assert policy.choose(100) == 0  # not even a draft accepted in full pays now
    for _ in range(10):  # a few plain steps do not erase a measurement
        policy.update(k=0, n_accepted=0, target_s=0.01, draft_s=0.0)
    assert policy.batch_scale > 4.0 and policy.choose(100) == 0
    for _ in range(1000):  # a long stretch of plain decoding: s is stale, it returns toward the profile
        policy.update(k=0, n_accepted=0, target_s=0.01, draft_s=0.0)
    assert policy.batch_scale == pytest.approx(1.0, abs=0.05)
    assert policy.choose(100) > 0  # so a trial draft measures it afresh
    policy.update(k=7, n_accepted=7, target_s=0.01 * slow, draft_s=0.0)  # still slow: s goes back up
    assert policy.batch_scale > 1.7


def test_a_first_step_without_an_evaluation_teaches_nothing():
    policy = DraftLength(LINEAR, t_target_s=0.01)
    policy.update(k=0, n_accepted=0, target_s=1e-6, draft_s=0.0, n_evaluated=0)
    policy.update(k=4, n_accepted=4, target_s=0.01 * LINEAR.cost(4), draft_s=0.0, n_evaluated=4)
    assert policy.t_target_s == 0.01 and policy.batch_scale == pytest.approx(1.0)


def test_min_survival_prices_a_draft_token_in_target_steps():
    # LINEAR: each extra verified token costs 0.3 steps; a draft step costs 0.4 target steps
    e2e = DraftLength(LINEAR, t_target_s=0.01, t_draft_s=0.004)
    assert e2e.min_survival(0, draft_step=False) == pytest.approx(0.3)
    assert e2e.min_survival(5, draft_step=True) == pytest.approx(0.7)
    client = DraftLength(LINEAR, objective="target", t_target_s=0.01, t_draft_s=0.004)
    assert client.min_survival(5, draft_step=True) == pytest.approx(0.3)  # the client pays the draft step
    assert DraftLength(FLAT, t_target_s=0.01, t_draft_s=0.004).min_survival(0, draft_step=False) == 0.0


def test_confidence_stopping_turns_k_into_a_cap():
    plain = DraftLength(LINEAR, k_max=16, t_target_s=0.01, t_draft_s=0.001)
    capped = DraftLength(LINEAR, k_max=16, t_target_s=0.01, t_draft_s=0.001, stop_by_confidence=True)
    assert capped.choose(100) == capped.best_k(alpha=1.0) > plain.choose(100) > 0  # prior α = 0.8
    for _ in range(30):  # drafts keep failing: the measured acceptance stops drafting altogether
        capped.update(k=4, n_accepted=0, target_s=0.022, draft_s=0.004)  # costs as profiled
    assert capped.choose(100) == 0


def test_a_profile_dip_below_one_step_is_not_planned_on():
    # hf bf16 profiles small batches below one step (C(2) = 0.69); decoding never saw it
    dip = curve([1.0, 0.69, 0.74, 0.78] + [1.0] * 11 + [1.07] * 17)
    policy = DraftLength(dip, t_target_s=0.2)
    assert [policy.steps(n) for n in (1, 2, 4)] == [1.0, 1.0, 1.0]
    policy.update(k=3, n_accepted=3, target_s=0.3, draft_s=0.03)  # n = 4: priced at one step
    assert policy.t_target_s == pytest.approx(0.8 * 0.2 + 0.2 * 0.3)  # so it measures the step time
    assert policy.batch_scale == 1.0
