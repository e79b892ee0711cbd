"""Acceptance rules, three ways: exact hand-built cases, seeded determinism, and statistics."""

import numpy as np
import pytest
from scipy import stats

from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.verification import (
    verify,
    verify_greedy,
    verify_rejection,
    verify_sample_and_compare,
    verify_tree,
)


def one_hot_logits(ids, vocab=8):
    """Logits  # [len(ids), vocab] whose argmax in row i is ids[i] (by a clear margin)."""
    logits = np.zeros((len(ids), vocab), np.float32)
    logits[np.arange(len(ids)), ids] = 5.0
    return logits


def one_hot(i, vocab=4):
    p = np.zeros(vocab)
    p[i] = 1.0
    return p


# ---- exact cases -----------------------------------------------------------------------
def test_greedy_accepts_matching_prefix_then_targets_token():
    v = verify_greedy([1, 2, 3], one_hot_logits([1, 2, 5, 7]))
    assert v.tokens == [1, 2, 5] and v.n_accepted == 2 and not v.bonus


def test_greedy_all_accepted_adds_bonus_token():
    v = verify_greedy([1, 2, 3], one_hot_logits([1, 2, 3, 7]))
    assert v.tokens == [1, 2, 3, 7] and v.n_accepted == 3 and v.bonus


def test_greedy_first_token_rejected():
    v = verify_greedy([4, 2], one_hot_logits([6, 2, 3]))
    assert v.tokens == [6] and v.n_accepted == 0


def test_greedy_empty_draft_is_one_autoregressive_step():
    v = verify_greedy([], one_hot_logits([3]))
    assert v.tokens == [3] and v.n_accepted == 0 and v.bonus


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="k\\+1"):
        verify_greedy([1, 2], one_hot_logits([1, 2]))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_rejection([1], np.ones((2, 4)) / 4, np.ones((2, 4)) / 4, np.random.default_rng(0))


def test_rejection_accepts_when_target_agrees_exactly():
    p = np.array([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]])
    rng = np.random.default_rng(0)
    for _ in range(50):  # p == q: min(1, p/q) = 1 for every drafted token
        v = verify_rejection([1, 3], p[:2], p, rng)
        assert v.tokens == [1, 3, 2] and v.bonus


def test_rejection_of_impossible_token_recovers_from_residual():
    # the target never emits token 0; the residual max(0, p - q) is all on token 2
    q = np.array([one_hot(0)])  # [k=1, vocab]
    p = np.array([one_hot(2), one_hot(1)])  # [k+1, vocab]
    v = verify_rejection([0], q, p, np.random.default_rng(0))
    assert v.tokens == [2] and v.n_accepted == 0


def test_rejection_residual_excludes_overlap():
    # p = (.5, .5, 0, 0), q = (1, 0, 0, 0): accept token 0 w.p. .5; else residual is all on token 1
    q = np.array([one_hot(0)])
    p = np.array([[0.5, 0.5, 0.0, 0.0], one_hot(3)])
    rng = np.random.default_rng(1)
    outcomes = {tuple(verify_rejection([0], q, p, rng).tokens) for _ in range(200)}
    assert outcomes == {(0, 3), (1,)}


def test_sample_and_compare_greedy_equals_verify_greedy():
    logits = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    draft = list(logits.argmax(-1)[:3]) + [int(logits[3].argmin())]
    greedy = SamplingParams()
    v1 = verify_sample_and_compare(draft, logits, greedy, np.random.default_rng(0))
    v2 = verify_greedy(draft, logits)
    assert v1 == v2 and v1.n_accepted == 3


def test_verify_dispatches_by_temperature_and_probs():
    logits = one_hot_logits([1, 2, 3])
    assert verify([1, 2], None, logits, SamplingParams(), np.random.default_rng(0)).tokens == [1, 2, 3]
    sampled = SamplingParams(temperature=1e-3)  # warped to one-hot: same outcome, through the sampling rules
    assert verify([1, 2], None, logits, sampled, np.random.default_rng(0)).tokens == [1, 2, 3]
    q = np.stack([one_hot(1, 8), one_hot(2, 8)])
    assert verify([1, 2], q, logits, sampled, np.random.default_rng(0)).tokens == [1, 2, 3]


# ---- seeded determinism -------------------------------------------------------------------
def _random_case(seed, k=4, vocab=16):
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(vocab), size=k)  # [k, vocab]
    p = rng.dirichlet(np.ones(vocab), size=k + 1)  # [k+1, vocab]
    draft = [int(rng.choice(vocab, p=row)) for row in q]
    return draft, q, p


def test_rejection_is_deterministic_under_a_seed():
    draft, q, p = _random_case(3)
    runs = [[verify_rejection(draft, q, p, np.random.default_rng(s)).tokens for s in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) > 1  # and the seed does matter


def test_sample_and_compare_reproduces_autoregressive_sampling_stream():
    """Same random stream: sample-and-compare emits what token-by-token sampling would."""
    params = SamplingParams(temperature=0.9, top_p=0.95)
    logits = np.random.default_rng(5).normal(size=(4, 50)).astype(np.float32)
    from codeaccel.decoding.sampling import next_token

    stream = np.random.default_rng(11)
    ar = [next_token(row, params, stream) for row in logits]  # token by token, one random stream: [4]
    # a draft that is the autoregressive stream itself: accepted whole, the bonus the stream's next token
    v = verify_sample_and_compare(ar[:3], logits, params, np.random.default_rng(11))
    assert v.tokens == ar and v.n_accepted == 3 and v.bonus
    # a draft that leaves it at position 1: the first token kept, then exactly the stream's second draw
    wrong = (ar[1] + 1) % 50
    v = verify_sample_and_compare([ar[0], wrong, ar[2]], logits, params, np.random.default_rng(11))
    assert v.tokens == ar[:2] and v.n_accepted == 1 and not v.bonus


# ---- statistics: the output distribution is the target's ----------------------------------------
def _chi_square_pvalue(samples, p):
    counts = np.bincount(samples, minlength=len(p))
    keep = p > 0
    assert counts[~keep].sum() == 0, "sampled a token the target gives zero probability"
    return stats.chisquare(counts[keep], f_exp=p[keep] * len(samples)).pvalue


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rejection_sampling_first_token_follows_target(seed):
    vocab = 6
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(vocab) * 0.7, size=3)  # [k+1=3, vocab]
    q = rng.dirichlet(np.ones(vocab) * 0.7, size=2)  # [k=2, vocab]
    p[0, 0] = 0.0  # the draft proposes a token the target forbids
    p[0] /= p[0].sum()
    n = 20_000
    firsts = np.empty(n, np.int64)
    for i in range(n):
        draft = [int(rng.choice(vocab, p=row)) for row in q]
        firsts[i] = verify_rejection(draft, q, p, rng).tokens[0]
    assert _chi_square_pvalue(firsts, p[0]) > 1e-3


def test_rejection_sampling_total_variation_shrinks_with_samples():
    vocab = 5
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.ones(vocab), size=2)
    q = rng.dirichlet(np.ones(vocab), size=1)
    tv = {}
    for n in (500, 50_000):
        firsts = []
        for _ in range(n):
            draft = [int(rng.choice(vocab, p=q[0]))]
            firsts.append(verify_rejection(draft, q, p, rng).tokens[0])
        freq = np.bincount(firsts, minlength=vocab) / n
        tv[n] = 0.5 * np.abs(freq - p[0]).sum()
    assert tv[50_000] < tv[500] and tv[50_000] < 0.01


def test_sample_and_compare_first_token_follows_target():
    vocab = 8
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=5)
    from codeaccel.decoding.sampling import logits_to_probs

    p0 = logits_to_probs(logits[0], params)
    n = 20_000
    firsts = np.array(
        [verify_sample_and_compare([3, 1], logits, params, rng).tokens[0] for _ in range(n)], dtype=np.int64
    )
    assert _chi_square_pvalue(firsts, p0) > 1e-3


# ---- token trees ----------------------------------------------------------------------------
def test_tree_walk_follows_the_targets_choices():
    # nodes: 0 "a" (root), 1 "b" (under a), 2 "c" (under a), 3 "d" (root); the target says a, c, then 7
    tokens, parents = [1, 2, 3, 4], [-1, 0, 0, -1]
    logits = one_hot_logits([1, 5, 5, 7, 5])  # row 0: roots; row i+1: after node i
    v = verify_tree(tokens, parents, logits, SamplingParams(), np.random.default_rng(0))
    assert v.path == [0] and v.tokens == [1, 5]  # after "a" the target wants 5: no child holds it
    assert not v.bonus and v.judged == 2  # "a" accepted, then one rejection
    logits = one_hot_logits([1, 3, 5, 7, 5])  # now the target picks c (node 2) after a, then 7
    v = verify_tree(tokens, parents, logits, SamplingParams(), np.random.default_rng(0))
    assert v.path == [0, 2] and v.tokens == [1, 3, 7] and v.n_accepted == 2
    assert v.bonus and v.judged == 2  # branch a-c accepted whole: 2 judged of 4 nodes, no rejection
    logits = one_hot_logits([6, 3, 5, 7, 5])  # the target rejects every root
    assert verify_tree(tokens, parents, logits, SamplingParams(), np.random.default_rng(0)).tokens == [6]


def test_tree_with_one_branch_equals_the_chain_rule():
    logits = np.random.default_rng(3).normal(size=(4, 16)).astype(np.float32)
    chain = list(logits.argmax(-1)[:2]) + [0]
    tree = verify_tree(chain, [-1, 0, 1], logits, SamplingParams(), np.random.default_rng(0))
    assert tree.tokens == verify_greedy(chain, logits).tokens


def test_tree_walk_samples_follow_the_target():
    vocab = 6
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(4, vocab)).astype(np.float32)
    params = SamplingParams(temperature=1.0)
    from codeaccel.decoding.sampling import logits_to_probs

    p0 = logits_to_probs(logits[0], params)
    tokens, parents = [2, 4, 1], [-1, -1, 0]  # two roots (2 and 4), one child under 2
    firsts = np.array([verify_tree(tokens, parents, logits, params, rng).tokens[0] for _ in range(20_000)])
    assert _chi_square_pvalue(firsts, p0) > 1e-3
