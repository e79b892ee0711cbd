"""The batch's joint draft-length choice: exact cases, and optimality against exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from codeaccel.decoding.batch_draft_lengths import acceptance_estimate, choose_draft_lengths


def flat_to_4(m: int) -> float:  # llama.cpp's repacked Q4_K: 4 tokens cost one step, then rising
    return 1.0 if m <= 4 else 1.0 + 0.25 * (m - 4)


def throughput(alphas, lengths, base, cost) -> float:
    expected = sum(sum(a**j for j in range(k + 1)) for a, k in zip(alphas, lengths))
    return expected / cost(max(base + sum(lengths), 1))


def test_one_request_fills_the_tile_many_requests_draft_nothing():
    assert choose_draft_lengths([0.8], [16], 1, flat_to_4) == [3]
    assert choose_draft_lengths([0.8] * 16, [16] * 16, 16, flat_to_4) == [0] * 16


def test_where_evaluation_is_free_every_offered_token_is_taken_and_where_it_is_linear_none():
    assert choose_draft_lengths([0.9, 0.5], [8, 3], 2, lambda m: 1.0) == [8, 3]
    assert choose_draft_lengths([0.9, 0.5], [8, 3], 2, float) == [0, 0]


def test_the_likelier_request_drafts_first_and_caps_and_zero_alpha_hold():
    lengths = choose_draft_lengths([0.95, 0.3], [8, 8], 2, flat_to_4)
    assert lengths[0] > lengths[1]
    assert choose_draft_lengths([0.9, 0.9], [1, 0], 2, flat_to_4) == [1, 0]
    assert choose_draft_lengths([0.0, 0.9], [5, 2], 2, flat_to_4) == [0, 2]
    assert choose_draft_lengths([], [], 0, flat_to_4) == []
    with pytest.raises(ValueError):
        choose_draft_lengths([0.5], [1, 2], 1, flat_to_4)


def flat_to_8(m: int) -> float:
    return 1.0 if m <= 8 else m / 8


def test_a_padded_engine_drafts_evenly_where_an_unpadded_one_drafts_unevenly():
    # unpadded: 6 draft tokens fit the 8-token tile, the likelier request takes 4 of them
    assert choose_draft_lengths([0.9, 0.1], [4, 4], 2, flat_to_8) == [4, 2]
    # padded: 2 rows x (1 + 4) = 10 tokens cost 1.25, 2 x (1 + 3) = 8 cost 1: both draft 3, the second for free
    assert choose_draft_lengths([0.9, 0.1], [4, 4], 2, flat_to_8, padded=True) == [3, 3]
    assert choose_draft_lengths([0.8] * 8, [8] * 8, 8, flat_to_8, padded=True) == [0] * 8  # a full tile: none


def padded_throughput(alphas, lengths, base, cost) -> float:
    expected = sum(sum(a**j for j in range(k + 1)) for a, k in zip(alphas, lengths))
    return expected / cost(max(base + len(alphas) * max(lengths, default=0), 1))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_the_choice_is_optimal_against_exhaustive_search(seed, padded):
    rng = np.random.default_rng(seed + (100 if padded else 0))
    n = int(rng.integers(1, 4))
    alphas = list(rng.uniform(0, 0.95, n))
    caps = list(rng.integers(0, 5, n))
    base = int(rng.integers(1 if padded else 0, n + 1))
    slope = float(rng.uniform(0.05, 1.2))

    def cost(m: int) -> float:
        return 1.0 if m <= 4 else 1.0 + slope * (m - 4)

    value = padded_throughput if padded else throughput  # the step evaluates base + n * K tokens, or base + sum(k)
    got = choose_draft_lengths(alphas, caps, base, cost, padded=padded)
    assert all(0 <= k <= c for k, c in zip(got, caps))
    best = max(value(alphas, ks, base, cost) for ks in itertools.product(*(range(c + 1) for c in caps)))
    assert value(alphas, got, base, cost) == pytest.approx(best, rel=1e-12)


def test_acceptance_estimate_mixes_a_request_with_the_prior():
    assert acceptance_estimate(0, 0, 2.0, 4.0) == pytest.approx(0.5)
    assert acceptance_estimate(9, 10, 2.0, 4.0) == pytest.approx(11 / 14)
    assert acceptance_estimate(100, 100, 0.0, 0.0) == 0.99  # never certain
    assert acceptance_estimate(0, 0, 0.0, 0.0) == 0.0


def test_acceptance_counted_over_tested_tokens_recovers_the_per_token_rate():
    """Each draft token is accepted with probability α until the first rejection; tokens after it are never
    judged. accepted / tested recovers α; accepted / drafted (the old count) is biased low."""
    import numpy as np

    from codeaccel.decoding.stats import SpecStats, tested

    assert (tested(4, 4), tested(4, 2), tested(4, 0), tested(0, 0)) == (4, 3, 1, 0)
    rng = np.random.default_rng(0)
    stats = SpecStats()
    for _ in range(4000):
        n = 0
        while n < 4 and rng.random() < 0.8:
            n += 1
        stats.record(4, n)
    assert acceptance_estimate(stats.accepted_tokens, stats.tested_tokens, 0, 0) == pytest.approx(0.8, abs=0.02)
    assert stats.accepted_tokens / stats.drafted_tokens < 0.65  # what counting untested tokens gave
