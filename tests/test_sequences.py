"""Several sequences in one evaluation (engines/sequences) and continuous batching (decoding/batched).

The contract: every sequence gets what the single-sequence engine gives for its tokens
(logits; greedy tokens; sampled tokens for the same seed), whatever else is in the
batch, whenever it joined, and after the sequences it was copied from are gone.
"""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.batched import BatchDecoder
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams, logits_to_probs
from codeaccel.engines import load_engine, open_sequences
from codeaccel.engines.cost_curve import CostCurve
from codeaccel.engines.sequences import ContextFull, SequentialSequences
from codeaccel.errors import InternalError, UserError
from codeaccel.retrieval.drafter import RetrievalDrafter

PROMPTS = [
    "def add(a, b):\n    return",
    "import json\n\nclass Decoder:",
    "    for i in range(",
    "x = [1, 2, 3]\nprint(",
]
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=11)


@pytest.fixture(scope="module", params=["llama.cpp", "hf"])
def engine(request, tiny_gguf, tiny_hf):
    path = tiny_gguf if request.param == "llama.cpp" else tiny_hf
    eng = load_engine(path, request.param, n_ctx=512, dtype="float32")
    yield eng
    eng.close()


@pytest.fixture
def seqs(engine):
    with open_sequences(engine, n_seq_max=8, n_ctx=1024) as s:
        yield s


def _alone(engine, prompt_tokens, params=None, max_tokens=24, stop=()):
    engine.reset()
    return generate(engine, prompt_tokens, params or SamplingParams(), max_tokens, stop)


def test_open_sequences_gives_the_engines_own_kind(engine, seqs):
    assert seqs.kind == engine.kind
    assert seqs.n_vocab == engine.n_vocab and seqs.eog_token_ids == engine.eog_token_ids


def test_each_sequence_gets_its_single_sequence_logits(engine, seqs):
    prompts = [engine.tokenize(p) for p in PROMPTS]
    opened = [seqs.open() for _ in prompts]
    got = seqs.eval(dict(zip(opened, prompts)))
    for seq, toks in zip(opened, prompts):
        engine.reset()
        want = engine.eval(toks)  # [n, vocab]
        assert got[seq].shape == want.shape
        np.testing.assert_allclose(got[seq], want, atol=2e-3, rtol=1e-3)
        assert seqs.tokens(seq) == toks
    # one more token each, different lengths in one batch: still each sequence's own continuation
    nxt = {seq: [int(got[seq][-1].argmax())] for seq in opened}
    step = seqs.eval(nxt, all_logits=False)
    for seq, toks in zip(opened, prompts):
        engine.reset()
        want = engine.eval(toks + nxt[seq])[-1]
        np.testing.assert_allclose(step[seq][-1], want, atol=2e-3, rtol=1e-3)


def test_a_copy_outlives_its_source_and_rewinds_on_its_own(engine, seqs):
    toks = engine.tokenize(PROMPTS[0])
    src = seqs.open()
    seqs.eval({src: toks})
    copy = seqs.open(copy_of=src)
    assert seqs.tokens(copy) == toks
    seqs.close(src)
    extra = engine.tokenize(" a + b")
    got = seqs.eval({copy: extra})[copy]
    engine.reset()
    want = engine.eval(toks + extra)[len(toks) :]
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
    seqs.rewind(copy, len(toks))
    again = seqs.eval({copy: extra})[copy]
    np.testing.assert_allclose(again, want, atol=2e-3, rtol=1e-3)


def test_contract_errors(seqs):
    with pytest.raises(InternalError):
        seqs.eval({0: [1]})  # not open
    seq = seqs.open()
    with pytest.raises(InternalError):
        seqs.eval({seq: []})
    with pytest.raises(InternalError):
        seqs.eval({seq: [seqs.n_vocab]})
    with pytest.raises(ContextFull):
        seqs.eval({seq: [1] * (seqs.n_ctx + 1)})
    assert seqs.tokens(seq) == []  # a refused batch leaves nothing behind
    while seqs.n_free:
        seqs.open()
    with pytest.raises(InternalError):
        seqs.open()


def test_batched_greedy_equals_each_request_alone(engine, seqs):
    prompts = [engine.tokenize(p) for p in PROMPTS] + [engine.tokenize(PROMPTS[0])] * 2  # two share a prompt
    limits = [24, 5, 17, 24, 9, 24]
    requests = [Request(p, SamplingParams(), max_tokens=m) for p, m in zip(prompts, limits)]
    decoder = BatchDecoder(seqs)
    got = decoder.run(requests)
    for request, generation in zip(requests, got):
        alone = _alone(engine, request.prompt_tokens, max_tokens=request.max_tokens)
        assert generation.tokens == alone.tokens
        assert generation.text == alone.text and generation.finish_reason == alone.finish_reason
    assert decoder.stats.shared_prompt_tokens == len(prompts[0]) * 2  # the copies did not prefill again
    assert decoder.stats.max_batch == len(requests)
    assert seqs.open_sequences == []  # every finished request freed its sequence
    assert all(g.cost_s is not None and 0 < g.cost_s <= g.prefill_s + g.decode_s for g in got)


def test_batched_sampling_with_a_seed_equals_the_same_seed_alone(engine, seqs):
    prompt = engine.tokenize(PROMPTS[1])
    requests = [Request(prompt, SamplingParams(temperature=0.8, top_p=0.95, seed=s), max_tokens=20) for s in range(4)]
    got = BatchDecoder(seqs).run(requests)
    for request, generation in zip(requests, got):
        assert generation.tokens == _alone(engine, prompt, request.params, 20).tokens
    assert len({tuple(g.tokens) for g in got}) > 1  # the seeds do draw different samples


def test_requests_join_and_leave_between_steps(engine, seqs):
    decoder = BatchDecoder(seqs)
    first = decoder.submit(Request(engine.tokenize(PROMPTS[2]), max_tokens=20))
    done = {}
    for _ in range(6):
        done.update(decoder.step())
    assert decoder.n_active == 1
    second = decoder.submit(Request(engine.tokenize(PROMPTS[3]), max_tokens=20, stop=[")"]))
    while not decoder.idle:
        done.update(decoder.step())
    assert done[first].tokens == _alone(engine, engine.tokenize(PROMPTS[2]), max_tokens=20).tokens
    alone = _alone(engine, engine.tokenize(PROMPTS[3]), max_tokens=20, stop=[")"])
    assert (done[second].tokens, done[second].text) == (alone.tokens, alone.text)


def test_a_small_cache_makes_requests_wait_not_fail(engine):
    prompt = engine.tokenize(PROMPTS[0])
    with open_sequences(engine, n_seq_max=4, n_ctx=256) as small:  # llama.cpp rounds n_ctx up to 256
        decoder = BatchDecoder(small)
        limit = small.n_ctx // 2 - len(prompt) - 2  # two requests' reservations fit, four do not
        requests = [Request(prompt + engine.tokenize(f" {i}"), max_tokens=limit) for i in range(4)]
        got = decoder.run(requests)
        assert decoder.stats.max_batch == 2
    for request, generation in zip(requests, got):
        assert generation.tokens == _alone(engine, request.prompt_tokens, max_tokens=limit).tokens


def test_cancel_frees_the_sequence(engine, seqs):
    decoder = BatchDecoder(seqs)
    handle = decoder.submit(Request(engine.tokenize(PROMPTS[0]), max_tokens=50))
    decoder.step()
    assert seqs.open_sequences and decoder.cancel(handle)
    assert seqs.open_sequences == [] and decoder.idle
    assert not decoder.cancel(handle)


def test_bad_requests_are_refused_at_submit(engine, seqs):
    decoder = BatchDecoder(seqs)
    with pytest.raises(UserError):
        decoder.submit(Request([], max_tokens=4))
    with pytest.raises(UserError):
        decoder.submit(Request([1], max_tokens=0))
    with pytest.raises(UserError):
        decoder.submit(Request([1] * seqs.n_ctx, max_tokens=4))
    assert decoder.idle


def test_copies_sample_the_target_distribution(engine):
    """Chi-square: first tokens of 400 seeded copies of one prompt follow softmax(logits / T)."""
    prompt = engine.tokenize(PROMPTS[3])
    engine.reset()
    probs = logits_to_probs(engine.prefill(prompt), SamplingParams(temperature=1.0))
    n = 400
    counts = np.zeros(engine.n_vocab)
    with open_sequences(engine, n_seq_max=16, n_ctx=len(prompt) * 2 + 64) as s:
        decoder = BatchDecoder(s)
        for start in range(0, n, 16):
            reqs = [Request(prompt, SamplingParams(temperature=1.0, seed=start + i), max_tokens=1) for i in range(16)]
            for g in decoder.run(reqs):
                counts[g.tokens[0]] += 1
    expected = probs * n
    big = expected >= 5  # chi-square needs >= 5 expected per cell: pool the rest
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    p = scipy_stats.chisquare(observed[keep], expected[keep]).pvalue
    assert p > 1e-3


def test_sequential_fallback_on_the_scripted_engine(scripted):
    seqs = SequentialSequences(scripted, n_seq_max=3)
    prompts = [scripted.tokenize(t) for t in ("a", "b", "x")]
    got = BatchDecoder(seqs).run([Request(p, max_tokens=7, stop=["END"]) for p in prompts])
    for p, g in zip(prompts, got):
        scripted.reset()
        alone = generate(scripted, p, SamplingParams(), 7, ["END"])
        assert (g.tokens, g.text, g.finish_reason) == (alone.tokens, alone.text, alone.finish_reason)
    assert [g.finish_reason for g in got] == ["stop", "stop", "eos"]


def _flat_curve(k_max: int = 32) -> CostCurve:
    """Verification as cheap as one step up to 16 tokens, then rising: where a batch of 5 still drafts."""
    relative = [1.0 if k <= 16 else 1.0 + 0.2 * (k - 16) for k in range(1, k_max + 1)]
    return CostCurve("m", "e", None, 0, 1, list(range(1, k_max + 1)), [0.01] * k_max, relative)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95, seed=5)])
def test_drafts_verified_in_the_batch_change_no_token(engine, seqs, params):
    """Drafts from each request's own text and prediction, lengths chosen for the whole batch: every
    request's tokens are the ones it gets alone (greedy, and seeded sampling: sample-and-compare keeps
    autoregressive sampling's random stream). Two requests predict their own output: long drafts, accepted."""
    prompts = [engine.tokenize(p) for p in PROMPTS]
    alone = [_alone(engine, p, params, 60).tokens for p in prompts]
    predictions = [alone[0], alone[1][:-5] + [7, 7, 7], (), ()]  # one exact, one wrong at the end, two none
    requests = [Request(p, params, max_tokens=60, prediction_tokens=pr) for p, pr in zip(prompts, predictions)]
    decoder = BatchDecoder(seqs, RetrievalDrafter([], timing=None, context=True), _flat_curve())
    got = decoder.run(requests)
    assert [g.tokens for g in got] == alone
    spec = got[0].stats.speculation
    assert spec.accepted_tokens >= len(alone[0]) // 2  # the prediction was drafted and kept
    assert got[0].stats.steps < len(alone[0]) // 2
    assert got[1].stats.speculation.drafted_tokens > got[1].stats.speculation.accepted_tokens  # the wrong end rejected
    assert seqs.open_sequences == []


def test_a_batch_on_a_linear_curve_drafts_nothing(engine, seqs):
    linear = CostCurve("m", "e", None, 0, 1, list(range(1, 33)), [0.01] * 32, [float(k) for k in range(1, 33)])
    prompts = [engine.tokenize(p) for p in PROMPTS[:2]]
    alone = [_alone(engine, p, max_tokens=40).tokens for p in prompts]
    requests = [Request(p, max_tokens=40, prediction_tokens=a) for p, a in zip(prompts, alone)]
    got = BatchDecoder(seqs, RetrievalDrafter([], context=True), linear).run(requests)
    assert [g.tokens for g in got] == alone
    assert all(g.stats.speculation.drafted_tokens == 0 for g in got)


def test_a_drafter_needs_a_cost_curve(seqs):
    with pytest.raises(InternalError):
        BatchDecoder(seqs, RetrievalDrafter([], context=True))


def test_per_request_lengths_ignore_the_batch_and_joint_ones_do_not(engine, seqs):
    """On a curve flat to 4 tokens then steep, each of four requests alone would draft 3 tokens;
    chosen together they draft far less, because the batch's own pending tokens already fill the tile.
    Both keep every request's tokens."""
    relative = [1.0 if k <= 4 else 1.0 + 0.5 * (k - 4) for k in range(1, 33)]
    steep = CostCurve("m", "e", None, 0, 1, list(range(1, 33)), [0.01] * 32, relative)
    prompts = [engine.tokenize(p) for p in PROMPTS]
    alone = [_alone(engine, p, max_tokens=30).tokens for p in prompts]
    drafted = {}
    for joint in (True, False):
        requests = [Request(p, max_tokens=30, prediction_tokens=a) for p, a in zip(prompts, alone)]
        got = BatchDecoder(seqs, RetrievalDrafter([], context=True), steep, joint_lengths=joint).run(requests)
        assert [g.tokens for g in got] == alone
        drafted[joint] = sum(g.stats.speculation.drafted_tokens for g in got)
    assert len(PROMPTS) == 4
    assert drafted[False] > 2 * drafted[True]
