"""A draft model for the whole batch (decoding/batch_draft_model) behind the continuous batch.

Contract: every request's tokens are the ones it gets alone (greedy, and seeded sampling:
the batch verifies by sample-and-compare), whatever draft lengths the batch chose; each
request's draft sequence is freed when it ends; the draft's cost weighs the lengths.
"""

import itertools

import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.batch_draft_lengths import choose_draft_lengths, expected_tokens
from codeaccel.decoding.batch_draft_model import BatchDraftModel, draft_cost_steps
from codeaccel.decoding.batched import BatchDecoder
from codeaccel.decoding.drafter import BatchDrafter
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine, open_sequences
from codeaccel.engines.cost_curve import CostCurve
from codeaccel.errors import InternalError

PROMPTS = [
    "def add(a, b):\n    return",
    "import json\n\nclass Decoder:",
    "    for i in range(",
    "x = [1, 2, 3]\nprint(",
]


def _curve(relative: list[float]) -> CostCurve:
    n = len(relative)
    return CostCurve("m", "e", None, 0, 1, list(range(1, n + 1)), [0.01] * n, relative)


FLAT = _curve([1.0 if k <= 16 else 1.0 + 0.2 * (k - 16) for k in range(1, 33)])


@pytest.fixture(scope="module", params=["same", "other"])
def pair(request, tiny_gguf, tiny_gguf_draft):
    """Target and draft: the same weights (every draft token accepted) or other weights (often rejected)."""
    target = load_engine(tiny_gguf, n_ctx=512)
    draft = load_engine(tiny_gguf if request.param == "same" else tiny_gguf_draft, n_ctx=512)
    yield request.param, target, draft
    draft.close()
    target.close()


def _alone(engine, tokens, params, max_tokens):
    engine.reset()
    return generate(engine, tokens, params, max_tokens).tokens


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95, seed=3)])
@pytest.mark.parametrize("joint", [True, False])
def test_batch_drafts_change_no_token_and_free_their_sequences(pair, params, joint):
    kind, target, draft = pair
    prompts = [target.tokenize(p) for p in PROMPTS]
    alone = [_alone(target, p, params, 40) for p in prompts]
    with open_sequences(target, n_seq_max=4, n_ctx=1024) as seqs, open_sequences(draft, 4, 1024) as dseqs:
        drafter = BatchDraftModel(dseqs, FLAT, relative_speed=0.05)
        assert isinstance(drafter, BatchDrafter)
        got = BatchDecoder(seqs, drafter, FLAT, joint_lengths=joint).run([Request(p, params, 40) for p in prompts])
        assert [g.tokens for g in got] == alone
        assert dseqs.open_sequences == [] and seqs.open_sequences == []
    drafted = sum(g.stats.speculation.drafted_tokens for g in got)
    accepted = sum(g.stats.speculation.accepted_tokens for g in got)
    assert drafted > 0
    if kind == "same" and params.greedy:  # the target's own greedy tokens: all accepted, long steps
        assert accepted == drafted
        assert all(g.stats.steps < len(g.tokens) // 2 for g in got)


def test_a_cancelled_request_frees_its_draft_sequence(pair):
    _, target, draft = pair
    prompts = [target.tokenize(p) for p in PROMPTS[:2]]
    with open_sequences(target, n_seq_max=2, n_ctx=1024) as seqs, open_sequences(draft, 2, 1024) as dseqs:
        decoder = BatchDecoder(seqs, BatchDraftModel(dseqs, FLAT, 0.05), FLAT)
        handles = [decoder.submit(Request(p, max_tokens=200)) for p in prompts]
        decoder.step()  # both admitted, each with its draft sequence (neither can finish in one step)
        assert len(dseqs.open_sequences) == 2
        assert decoder.cancel(handles[0])
        assert len(dseqs.open_sequences) == 1
        while not decoder.idle:
            decoder.step()
        assert dseqs.open_sequences == []


def test_an_expensive_draft_drafts_nothing(pair):
    _, target, draft = pair
    prompts = [target.tokenize(p) for p in PROMPTS]
    with open_sequences(target, n_seq_max=4, n_ctx=1024) as seqs, open_sequences(draft, 4, 1024) as dseqs:
        got = BatchDecoder(seqs, BatchDraftModel(dseqs, FLAT, relative_speed=5.0), FLAT).run(
            [Request(p, max_tokens=20) for p in prompts]
        )
    assert all(g.stats.speculation.drafted_tokens == 0 for g in got)


def test_a_too_steep_profile_gets_a_trial_and_then_draft_model_drafts(pair, monkeypatch):
    """The target's profile prices n tokens at n steps: no draft pays on it. Learning (on a clock where
    batches are nearly free), the decoder verifies a trial draft after 64 steps without one and then
    drafts; with the profile fixed it never does. Every token is kept."""
    from test_sequences import cheap_batches_clock

    kind, target, draft = pair
    linear = _curve([float(k) for k in range(1, 33)])
    prompt = max((target.tokenize(p) for p in PROMPTS), key=lambda p: len(_alone(target, p, SamplingParams(), 100)))
    alone = _alone(target, prompt, SamplingParams(), 100)
    assert len(alone) >= 80  # room for 64 plain steps, the trial, and drafts after it
    with open_sequences(target, n_seq_max=1, n_ctx=1024) as seqs, open_sequences(draft, 1, 1024) as dseqs:
        cheap_batches_clock(monkeypatch, seqs)
        fixed = BatchDecoder(seqs, BatchDraftModel(dseqs, linear, 0.05), linear, learn_costs=False)
        (got,) = fixed.run([Request(prompt, max_tokens=100)])
        assert got.tokens == alone and got.stats.speculation.drafted_tokens == 0
        learning = BatchDecoder(seqs, BatchDraftModel(dseqs, linear, 0.05), linear)
        (got,) = learning.run([Request(prompt, max_tokens=100)])
    assert got.tokens == alone and got.stats.speculation.drafted_tokens > 0
    if kind == "same":  # every draft accepted: the trial shows batches cheap, and drafting goes on after it
        assert got.stats.speculation.drafted_tokens > 4 and learning.costs.snapshot().batch_scale < 1.0


def test_draft_cost_counts_one_batched_evaluation_per_position():
    drafter = BatchDraftModel(None, _curve([1.0, 1.5, 2.0, 2.5]), relative_speed=0.5)
    assert drafter.position_cost(2) == pytest.approx(0.75)
    assert draft_cost_steps([], drafter.position_cost) == 0.0
    assert draft_cost_steps([0, 0], drafter.position_cost) == 0.0
    # positions 1-2: both requests (C(2) = 1.5 each); position 3: one request (C(1) = 1)
    assert draft_cost_steps([3, 2], drafter.position_cost) == pytest.approx(0.5 * (1.5 + 1.5 + 1.0))
    with pytest.raises(InternalError):
        BatchDraftModel(None, drafter.curve, 0.0)


@pytest.mark.parametrize("seed", range(12))
def test_lengths_with_a_draft_cost_match_exhaustive_search(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    alphas = list(rng.uniform(0, 0.95, n))
    caps = list(rng.integers(0, 5, n))
    slope = float(rng.uniform(0.05, 1.0))
    r = float(rng.uniform(0.0, 0.6))

    def cost(m: int) -> float:
        return 1.0 if m <= 3 else 1.0 + slope * (m - 3)

    def position(m: int) -> float:
        return r  # a draft position costs the same for any number of requests

    def value(ks) -> float:
        drafted = draft_cost_steps(ks, position)
        return sum(expected_tokens(a, k) for a, k in zip(alphas, ks)) / (cost(n + sum(ks)) + drafted)

    got = choose_draft_lengths(alphas, caps, n, cost, position)
    assert all(0 <= k <= c for k, c in zip(got, caps))
    best = max(value(ks) for ks in itertools.product(*(range(c + 1) for c in caps)))
    # exact: this draft cost depends on the longest draft only
    assert draft_cost_steps(got, position) == pytest.approx(r * max(got, default=0))
    assert value(got) == pytest.approx(best, rel=1e-12)
