"""A draft given with a request (a remote client's draft model): verified in one step of the batch.

Contract: the prompt and the draft are evaluated in one prefill; the request ends with the accepted
draft prefix and one more token, the same rule as any draft (greedy: the target's argmax; sampling:
rejection sampling with the draft's probabilities, or sample-and-compare without them), so a client
that loops draft → verify → commit gets exactly the target's greedy text, and its distribution when
sampling; the sequence keeps the context and the accepted draft for the next call.
"""

import numpy as np
import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.batched import BatchDecoder
from codeaccel.decoding.generation import GivenDraft, Request
from codeaccel.decoding.sampling import SamplingParams, logits_to_probs
from codeaccel.engines import load_engine, open_sequences
from codeaccel.errors import CodeaccelError

PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def target(tiny_gguf):
    engine = load_engine(tiny_gguf, n_ctx=512)
    yield engine
    engine.close()


def _alone(engine, tokens, params, n):
    engine.reset()
    return generate(engine, tokens, params, n).tokens


def _client_loop(decoder, prompt, draft_for, n_tokens, params=None):
    """What a remote client does: draft, send, commit what comes back; the calls' stats too."""
    params = params or SamplingParams()
    context, calls = list(prompt), []
    while len(context) - len(prompt) < n_tokens:
        draft = draft_for(context)
        [gen] = decoder.run([Request(context, params, len(draft.tokens) + 1, draft=draft)])
        calls.append(gen)
        context += gen.tokens
    return context[len(prompt) : len(prompt) + n_tokens], calls


def test_greedy_client_loop_equals_the_target_alone_and_reuses_its_cache(target):
    prompt = target.tokenize(PROMPT)
    want = _alone(target, prompt, SamplingParams(), 44)
    with open_sequences(target, n_seq_max=2, n_ctx=1024, unified=False) as seqs:
        decoder = BatchDecoder(seqs, reuse_prefixes=True)

        def half_right(context):  # the target's next 4 tokens with the 3rd replaced: 2 accepted
            done = len(context) - len(prompt)
            good = want[done : done + 4]
            return GivenDraft(tuple(good[:2] + [(good[2] + 1) % target.n_vocab] + good[3:]))

        got, calls = _client_loop(decoder, prompt, half_right, 40)
        assert got == want[:40]
        accepted = [c.stats.speculation.accepted_tokens for c in calls]
        assert accepted[0] == 2 and sum(accepted) >= 2 * (len(calls) - 2)
        # the kept sequence held the context: later calls evaluate only the new token and the draft
        assert all(c.n_cached_prompt_tokens >= len(prompt) for c in calls[1:])


def test_a_right_draft_is_accepted_whole_with_a_bonus(target):
    prompt = target.tokenize(PROMPT)
    want = _alone(target, prompt, SamplingParams(), 9)
    with open_sequences(target, n_seq_max=2, n_ctx=1024, unified=False) as seqs:
        [gen] = BatchDecoder(seqs).run([Request(prompt, SamplingParams(), 9, draft=GivenDraft(tuple(want[:8])))])
    assert gen.tokens == want
    assert gen.stats.speculation.accepted_tokens == 8
    assert seqs.open_sequences == []


def test_given_drafts_beside_ordinary_requests_in_one_batch(target):
    prompts = [target.tokenize(p) for p in (PROMPT, "import json\n", "    for i in range(")]
    want = [_alone(target, p, SamplingParams(), 12) for p in prompts]
    with open_sequences(target, n_seq_max=4, n_ctx=2048, unified=False) as seqs:
        decoder = BatchDecoder(seqs, prefill_chunk=3)  # prompts in small chunks: the draft's rows in the last
        handles = [decoder.submit(Request(prompts[0], max_tokens=12)),
                   decoder.submit(Request(prompts[1], max_tokens=5, draft=GivenDraft(tuple(want[1][:4])))),
                   decoder.submit(Request(prompts[2], max_tokens=12))]  # fmt: skip
        done = {}
        while not decoder.idle:
            done.update(decoder.step())
    assert done[handles[0]].tokens == want[0] and done[handles[2]].tokens == want[2]
    assert done[handles[1]].tokens == want[1][:5]


def test_rejection_sampling_with_the_draft_probabilities_keeps_the_target_distribution(target):
    """First token of a 1-token draft from a made-up q: over seeds, the committed token ~ p (chi-square)."""
    prompt = target.tokenize(PROMPT)
    params = SamplingParams(temperature=1.0, top_k=5)
    target.reset()
    p = logits_to_probs(target.prefill(prompt), params)  # [vocab]
    support = np.flatnonzero(p)
    q = {int(t): 1.0 / len(support) for t in support}  # uniform over the target's support: often rejected
    draft_rng = np.random.default_rng(0)
    counts = dict.fromkeys(support.tolist(), 0)
    n = 600
    with open_sequences(target, n_seq_max=2, n_ctx=1024, unified=False) as seqs:
        decoder = BatchDecoder(seqs, reuse_prefixes=True)
        for seed in range(n):
            x = int(draft_rng.choice(support))
            draft = GivenDraft((x,), (q,))
            [gen] = decoder.run([Request(prompt, SamplingParams(1.0, top_k=5, seed=seed), 2, draft=draft)])
            counts[gen.tokens[0]] += 1
    observed = np.array([counts[t] for t in support])
    expected = p[support] * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom, p = 0.0004


def test_a_token_limit_cuts_the_accepted_draft_and_its_count(target):
    prompt = target.tokenize(PROMPT)
    want = _alone(target, prompt, SamplingParams(), 9)
    with open_sequences(target, n_seq_max=2, n_ctx=1024, unified=False) as seqs:
        [gen] = BatchDecoder(seqs).run([Request(prompt, SamplingParams(), 3, draft=GivenDraft(tuple(want[:8])))])
    assert gen.tokens == want[:3]
    assert gen.stats.speculation.accepted_tokens == 3 and gen.stats.speculation.drafted_tokens == 8


def test_a_draft_near_the_end_of_the_context_returns_every_accepted_token(target):
    prompt = target.tokenize(PROMPT)
    want = _alone(target, prompt, SamplingParams(), 9)
    with open_sequences(target, n_seq_max=1, n_ctx=len(prompt) + 10, unified=False) as seqs:
        [gen] = BatchDecoder(seqs).run([Request(prompt, SamplingParams(), 9, draft=GivenDraft(tuple(want[:8])))])
    assert gen.tokens == want  # the context holds prompt + 8 drafted; the 9th token is never cached


def test_probabilities_must_match_the_draft():
    with pytest.raises(CodeaccelError):
        GivenDraft((1, 2), ({1: 1.0},))
