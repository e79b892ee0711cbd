import numpy as np
import pytest

from codeaccel.decoding.sampling import NUCLEUS_CANDIDATES, SamplingParams, logits_to_probs, next_token, sample
from codeaccel.errors import UserError


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"seed": -3}],
)
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(UserError, match=next(iter(kwargs))):  # a user error naming the setting
        SamplingParams(**kwargs)


def test_greedy_is_one_hot_on_argmax():
    logits = np.array([[1.0, 3.0, 2.0], [5.0, 0.0, 5.0]])
    probs = logits_to_probs(logits, SamplingParams())
    np.testing.assert_array_equal(probs, [[0, 1, 0], [1, 0, 0]])  # ties: the first index


def test_temperature_softmax_exact():
    logits = np.log(np.array([0.5, 0.25, 0.25]))
    np.testing.assert_allclose(logits_to_probs(logits, SamplingParams(temperature=1.0)), [0.5, 0.25, 0.25])
    # temperature 0.5 squares the probabilities before renormalising
    np.testing.assert_allclose(
        logits_to_probs(logits, SamplingParams(temperature=0.5)), np.array([0.25, 0.0625, 0.0625]) / 0.375
    )


@pytest.mark.parametrize("top_k", [0, 2])
def test_a_vanishing_temperature_is_the_argmax_never_nan(top_k):
    """logits / 1e-310 overflowed to inf and inf - inf to NaN: the sampler then took the last token."""
    logits = np.array([[1.0, 3.0, 2.0], [5.0, 0.0, 5.0]])
    probs = logits_to_probs(logits, SamplingParams(temperature=1e-310, top_k=top_k))
    np.testing.assert_array_equal(probs, [[0, 1, 0], [0.5, 0, 0.5]])  # exact ties share the mass
    assert next_token(logits[0], SamplingParams(temperature=1e-310), np.random.default_rng(3)) == 1


def test_top_k_keeps_k_largest():
    logits = np.log(np.array([0.1, 0.4, 0.3, 0.2]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(probs, [0, 0.4 / 0.7, 0.3 / 0.7, 0])


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = np.log(np.array([0.1, 0.4, 0.3, 0.2]))
    # 0.4 < 0.65, 0.4 + 0.3 >= 0.65: keep {1, 2}
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.65))
    np.testing.assert_allclose(probs, [0, 0.4 / 0.7, 0.3 / 0.7, 0])
    # the most likely token is always kept
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.01))
    np.testing.assert_allclose(probs, [0, 1, 0, 0])


def test_top_k_then_top_p_on_batch_rows():
    logits = np.log(np.array([[0.1, 0.4, 0.3, 0.2], [0.7, 0.1, 0.1, 0.1]]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.5))
    np.testing.assert_allclose(probs, [[0, 0.4 / 0.7, 0.3 / 0.7, 0], [1, 0, 0, 0]])


def test_seeded_sampling_is_deterministic():
    logits = np.random.default_rng(1).standard_normal(50)
    params = SamplingParams(temperature=0.8, seed=123)
    a = [next_token(logits, params, rng) for rng in [params.rng()] for _ in range(20)]
    b = [next_token(logits, params, rng) for rng in [params.rng()] for _ in range(20)]
    assert a == b
    assert len(set(a)) > 1


def test_sampling_matches_distribution():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    rng = np.random.default_rng(0)
    n = 40_000
    counts = np.bincount([sample(p, rng) for _ in range(n)], minlength=len(p))
    assert counts[-1] == 0  # zero-probability tokens are never drawn
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert tv < 0.01


def _top_p_by_full_sort(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The specification of the top-p set: sort the whole row (stable, ties by id), keep while the mass
    before a token is < top_p, renormalise."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("shape", ["peaked", "ties", "flat", "batch"])
def test_top_p_equals_the_full_sort_bit_for_bit(shape):
    """Only the most likely tokens are sorted (the whole row when they hold < top_p): the kept set and the
    probabilities must be exactly those of sorting the whole vocabulary, whichever path is taken."""
    rng = np.random.default_rng(7)
    vocab = 20_000
    for _ in range(40):
        if shape == "peaked":  # a code model's usual row: a few likely tokens
            logits = rng.standard_normal(vocab) * 2.5
            logits[rng.integers(vocab, size=5)] += 12
        elif shape == "ties":  # coarse logits: many equal probabilities at the cut
            logits = np.round(rng.standard_normal(vocab) * 3) + (rng.random(vocab) < 0.002) * 8
        elif shape == "flat":  # the nucleus holds more than NUCLEUS_CANDIDATES tokens: the full sort
            logits = rng.standard_normal(vocab) * 0.3
        else:
            logits = rng.standard_normal((3, vocab)) * rng.uniform(0.3, 4.0, size=(3, 1))
        for top_p in (0.1, 0.5, 0.9, 0.95, 0.999):
            for top_k in (0, 40):  # top-k first leaves most probabilities 0 (llama.cpp's defaults: 40, 0.95)
                params = SamplingParams(temperature=float(rng.choice([0.2, 0.8, 1.3])), top_p=top_p, top_k=top_k)
                plain = logits_to_probs(logits, SamplingParams(temperature=params.temperature, top_k=top_k))
                np.testing.assert_array_equal(logits_to_probs(logits, params), _top_p_by_full_sort(plain, top_p))
    if shape == "flat":  # the fallback was taken
        assert (logits_to_probs(logits, SamplingParams(temperature=1.3, top_p=0.9)) > 0).sum() > NUCLEUS_CANDIDATES
