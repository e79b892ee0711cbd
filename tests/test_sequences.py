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
from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams, logits_to_probs
from codeaccel.engines import load_engine, open_sequences
from codeaccel.engines.cost_curve import CostCurve
from codeaccel.engines.sequences import ContextFull, SequentialSequences
from codeaccel.errors import InternalError, UserError
from codeaccel.retrieval.drafter import RetrievalDrafter
from codeaccel.retrieval.timing import RetrievalTiming

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
    fixed = BatchDecoder(seqs, RetrievalDrafter([], context=True), linear, learn_costs=False)
    got = fixed.run(requests)
    assert [g.tokens for g in got] == alone
    assert all(g.stats.speculation.drafted_tokens == 0 for g in got)
    # learning (the default), the decoder measures what its batches cost on this tiny model (about one step
    # for a few tokens, far below the linear profile) and may draft: the tokens stay the same
    learning = BatchDecoder(seqs, RetrievalDrafter([], context=True), linear)
    assert [g.tokens for g in learning.run(requests)] == alone


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


def test_rows_picks_the_logits_rows_each_sequence_returns(engine, seqs):
    """``rows``: the last n rows of one sequence (0: none), the others as all_logits says."""
    a, b, c = seqs.open(), seqs.open(), seqs.open()
    ta, tb, tc = (engine.tokenize(p) for p in PROMPTS[:3])
    got = seqs.eval({a: ta, b: tb, c: tc}, all_logits=True, rows={a: 0, b: 2})
    assert got[a].shape == (0, engine.n_vocab)
    assert got[b].shape == (2, engine.n_vocab) and got[c].shape == (len(tc), engine.n_vocab)
    engine.reset()
    np.testing.assert_allclose(got[b], engine.eval(tb)[-2:], atol=2e-3, rtol=1e-3)
    assert seqs.tokens(a) == ta  # a sequence whose rows nobody reads still holds its tokens
    with pytest.raises(InternalError):
        seqs.eval({a: [1, 2]}, rows={a: 3})


def test_a_sequence_per_stream_holds_its_own_share_of_the_cells(tiny_gguf):
    """llama.cpp without a unified cache: n_ctx / n_seq_max cells per sequence, copies copy, each
    sequence's logits still its own."""
    engine = load_engine(tiny_gguf, "llama.cpp", n_ctx=512)
    try:
        with open_sequences(engine, n_seq_max=4, n_ctx=1024, unified=False) as per_seq:
            assert per_seq.n_ctx_seq == per_seq.n_ctx // 4
            toks = engine.tokenize(PROMPTS[1])
            src = per_seq.open()
            first = per_seq.eval({src: toks})[src]
            copy = per_seq.open(copy_of=src)
            per_seq.close(src)
            extra = engine.tokenize(" x = 1")
            got = per_seq.eval({copy: extra})[copy]
            engine.reset()
            want = engine.eval(toks + extra)
            np.testing.assert_allclose(first, want[: len(toks)], atol=2e-3, rtol=1e-3)
            np.testing.assert_allclose(got, want[len(toks) :], atol=2e-3, rtol=1e-3)
            with pytest.raises(ContextFull):  # the pool would have room; the sequence's stream has not
                per_seq.eval({copy: [1] * per_seq.n_ctx_seq})
            decoder = BatchDecoder(per_seq)
            with pytest.raises(UserError):
                decoder.submit(Request([1] * per_seq.n_ctx_seq, max_tokens=4))
            prompts = [engine.tokenize(p) for p in PROMPTS]
            got = decoder.run([Request(p, max_tokens=20) for p in prompts])
            assert [g.tokens for g in got] == [_alone(engine, p, max_tokens=20).tokens for p in prompts]
    finally:
        engine.close()


def test_prompts_are_evaluated_in_chunks_beside_the_running_requests(engine, seqs):
    """A long prompt arriving while a request runs is evaluated a chunk per step; the running request
    gains a token in each of those steps, and both get exactly what they get alone."""
    short = engine.tokenize(PROMPTS[2])
    long_prompt = engine.tokenize(" ".join(PROMPTS) * 3)
    decoder = BatchDecoder(seqs, prefill_chunk=8)
    first = decoder.submit(Request(short, max_tokens=40))
    done = {}
    while decoder.progress(first) is None or not decoder.progress(first)[0]:
        done.update(decoder.step())
    second = decoder.submit(Request(long_prompt, max_tokens=12))
    before = len(decoder.progress(first)[0])
    chunk_steps = 0
    while decoder.progress(second) is None and not decoder.idle:
        done.update(decoder.step())
        chunk_steps += 1
    assert chunk_steps == -(-len(long_prompt) // 8)  # ceil: one chunk of 8 prompt tokens per step
    if first not in done:
        assert len(decoder.progress(first)[0]) >= before + chunk_steps - 1  # it kept decoding meanwhile
    while not decoder.idle:
        done.update(decoder.step())
    assert done[first].tokens == _alone(engine, short, max_tokens=40).tokens
    assert done[second].tokens == _alone(engine, long_prompt, max_tokens=12).tokens
    assert decoder.stats.prefilled_tokens == len(short) + len(long_prompt)
    assert done[second].prefill_s > 0 and seqs.open_sequences == []


def test_cancel_while_the_prompt_is_evaluated_frees_everything(engine, seqs):
    decoder = BatchDecoder(seqs, prefill_chunk=4)
    prompt = engine.tokenize(" ".join(PROMPTS))
    handles = [decoder.submit(Request(prompt, max_tokens=10)) for _ in range(3)]  # one prompt, three requests
    decoder.step()
    assert decoder.n_prefilling == 3 and len(seqs.open_sequences) == 1
    assert decoder.cancel(handles[1])
    assert decoder.n_prefilling == 2
    got = {}
    while not decoder.idle:
        got.update(decoder.step())
    assert sorted(got) == [handles[0], handles[2]]
    assert got[handles[0]].tokens == got[handles[2]].tokens == _alone(engine, prompt, max_tokens=10).tokens
    for h in handles[::2]:
        assert not decoder.cancel(h)
    late = decoder.submit(Request(prompt, max_tokens=10))
    decoder.step()  # its first chunk
    assert decoder.n_prefilling == 1 and decoder.cancel(late)
    assert seqs.open_sequences == [] and decoder.idle and decoder._reserved == 0


def cheap_batches_clock(monkeypatch, seqs) -> None:
    """The batch decoder's clock made a counter that only ``seqs``' evaluations advance, by 0.01 s ×
    (1 + 0.02 (n - 1)) for n tokens (batches nearly free, as on a tiny model): what a decoder learns
    from its timings then depends on nothing else running on the machine."""
    from codeaccel.decoding import batched

    class Clock:
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock, evaluate = Clock(), seqs.eval

    def timed_eval(batch, **kwargs):
        clock.now += 0.01 * (1 + 0.02 * (sum(len(t) for t in batch.values()) - 1))
        return evaluate(batch, **kwargs)

    monkeypatch.setattr(batched, "time", clock)
    monkeypatch.setattr(seqs, "eval", timed_eval)


def test_a_too_steep_profile_gets_a_trial_and_then_drafts(engine, seqs, monkeypatch):
    """A profile where n tokens cost n steps: no draft ever pays on it, even a request's own predicted
    output. Learning, the decoder verifies one trial draft after 64 steps without one, which measures
    what a batch really costs (on a clock where n tokens cost 1 + 0.02 (n - 1) steps, as on a tiny model,
    so no other job on the machine can change the outcome), and drafts from then on; with the profile
    fixed it never drafts. Both keep every token."""
    cheap_batches_clock(monkeypatch, seqs)
    linear = CostCurve("m", "e", None, 0, 1, list(range(1, 33)), [0.01] * 32, [float(k) for k in range(1, 33)])
    prompt = engine.tokenize(PROMPTS[0])
    alone = _alone(engine, prompt, max_tokens=120).tokens
    assert len(alone) >= 90  # room for 64 plain steps, the trial, and drafts after it
    request = Request(prompt, max_tokens=120, prediction_tokens=alone)
    drafter = RetrievalDrafter([], timing=RetrievalTiming(linear), context=True)
    fixed = BatchDecoder(seqs, drafter, linear, learn_costs=False).run([request])[0]
    assert fixed.tokens == alone and fixed.stats.speculation.drafted_tokens == 0
    costs = LearnedCosts(linear)  # shared by the drafter's timing and the batch, as the server wires them
    drafter = RetrievalDrafter([], timing=RetrievalTiming(linear, costs=costs), context=True)
    learning = BatchDecoder(seqs, drafter, linear, costs=costs)
    got = learning.run([request])[0]
    assert got.tokens == alone
    assert got.stats.speculation.drafted_tokens > 4  # the trial (4 tokens at most) and drafts after it
    assert learning.costs.snapshot().batch_scale < 1.0


def test_a_batch_believes_a_drafters_estimate_of_its_own_draft(engine, seqs):
    """On a steep curve (the AMD EPYC VM's: C(2) = 1.57, C(4) = 2.85) no draft pays at the batch's
    blind prior of 0.5, but a long match in the request's own predicted output is expected to be
    accepted (the retrieval timing's prior by source and match length): the request drafts from its
    first step and keeps its tokens. The curve is taken as profiled (learn_costs=False): what a
    verification measures on a loaded machine must not decide a test of the estimate."""
    relative = [1.0, 1.57, 2.11, 2.85, 3.3, 3.9, 4.4, 5.0] + [5.0 + 0.5 * k for k in range(1, 25)]
    steep = CostCurve("m", "e", None, 0, 1, list(range(1, 33)), [0.01] * 32, relative)
    prompt = engine.tokenize(PROMPTS[0])
    alone = _alone(engine, prompt, max_tokens=40).tokens
    timed = RetrievalDrafter([], timing=RetrievalTiming(steep), context=True)
    request = Request(prompt, max_tokens=40, prediction_tokens=alone)
    got = BatchDecoder(seqs, timed, steep, learn_costs=False).run([request])[0]
    assert got.tokens == alone
    assert got.stats.speculation.accepted_tokens >= len(alone) // 2
    assert got.stats.steps < len(alone) // 2
    blind = RetrievalDrafter([], timing=None, context=True)  # no estimate: the batch's prior decides
    request = Request(prompt, max_tokens=40, prediction_tokens=alone)
    got = BatchDecoder(seqs, blind, steep, learn_costs=False).run([request])[0]
    assert got.tokens == alone and got.stats.speculation.drafted_tokens == 0


def test_a_kept_sequence_serves_the_next_prompt_that_extends_it(engine):
    """reuse_prefixes: a finished request's sequence is kept; a later prompt that continues it (an editor
    sending the file again, a little further on) evaluates only its new tokens, and gets what it gets
    alone. A prompt that shares nothing takes a fresh sequence; with none free, the least recently used
    kept one is closed for it."""
    with open_sequences(engine, n_seq_max=2, n_ctx=1024, unified=False) as per_seq:
        decoder = BatchDecoder(per_seq, reuse_prefixes=True)
        first_prompt = engine.tokenize(PROMPTS[1])
        first = decoder.run([Request(first_prompt, max_tokens=12)])[0]
        assert first.n_cached_prompt_tokens == 0 and per_seq.open_sequences  # kept, not closed
        typed_on = first_prompt + first.tokens[:-1] + engine.tokenize("\n    def")
        second = decoder.run([Request(typed_on, max_tokens=12)])[0]
        assert second.n_cached_prompt_tokens >= len(first_prompt)
        assert decoder.stats.reused_prompt_tokens == second.n_cached_prompt_tokens
        assert second.tokens == _alone(engine, typed_on, max_tokens=12).tokens
        assert len(per_seq.open_sequences) == 1  # the second took the first's sequence
        others = [engine.tokenize(p) for p in (PROMPTS[0], PROMPTS[3], PROMPTS[2])]
        got = [decoder.run([Request(p, max_tokens=8)])[0] for p in others]  # two sequences, three prompts
        assert [g.tokens for g in got] == [_alone(engine, p, max_tokens=8).tokens for p in others]
        assert all(g.n_cached_prompt_tokens == 0 for g in got[:2])
        assert len(per_seq.open_sequences) == 2
        decoder.clear_kept()
        assert per_seq.open_sequences == []


def test_a_short_shared_prefix_takes_a_free_sequence_not_another_prompts_cache(engine):
    """Two prompts share their first few tokens (an import line): while a sequence is free the second
    takes it, so the first prompt, sent again, still finds its whole cache; with none free the kept
    sequence sharing the most is reused."""
    common = engine.tokenize("import os\n")
    a = common + engine.tokenize(PROMPTS[1] + PROMPTS[3])
    b = common + engine.tokenize(PROMPTS[2] + PROMPTS[3])
    assert len(common) < min(64, len(b) / 2) and len(common) >= 0.1 * len(b)  # was enough to take a's cache
    with open_sequences(engine, n_seq_max=2, n_ctx=1024, unified=False) as two:
        decoder = BatchDecoder(two, reuse_prefixes=True)
        decoder.run([Request(a, max_tokens=6)])
        (second,) = decoder.run([Request(b, max_tokens=6)])
        assert second.n_cached_prompt_tokens == 0 and len(two.open_sequences) == 2  # a fresh one
        (again,) = decoder.run([Request(a, max_tokens=6)])
        assert again.n_cached_prompt_tokens == len(a) - 1  # its cache was kept whole
        c = common + engine.tokenize(PROMPTS[0] + PROMPTS[3])
        (third,) = decoder.run([Request(c, max_tokens=6)])  # none free: the common part is reused
        assert third.n_cached_prompt_tokens == len(common)
        assert third.tokens == _alone(engine, c, max_tokens=6).tokens
        decoder.clear_kept()


def test_prefix_reuse_needs_a_cache_per_sequence(tiny_gguf):
    engine = load_engine(tiny_gguf, "llama.cpp", n_ctx=512)
    try:
        with open_sequences(engine, n_seq_max=2, n_ctx=512) as pooled:
            assert pooled.pooled
            with pytest.raises(InternalError):
                BatchDecoder(pooled, reuse_prefixes=True)
    finally:
        engine.close()


def test_sequences_promised_to_copies_are_not_given_away_while_their_prompt_is_evaluated(engine):
    """Three requests share a long prompt (one sequence now, two copies when it is done); two more
    arrive while it is evaluated in chunks, with four sequences in all: they wait for a free one."""
    with open_sequences(engine, n_seq_max=4, n_ctx=2048, unified=False) as four:
        decoder = BatchDecoder(four, prefill_chunk=2, reuse_prefixes=not four.pooled)
        shared = engine.tokenize(" ".join(PROMPTS))
        group = [decoder.submit(Request(shared, max_tokens=6)) for _ in range(3)]
        decoder.step()
        assert decoder.n_prefilling == 3
        late = [engine.tokenize(p) for p in PROMPTS[:2]]
        handles = [decoder.submit(Request(p, max_tokens=6)) for p in late]
        done = {}
        while not decoder.idle:
            done.update(decoder.step())
        for h, p in zip(handles, late):
            assert done[h].tokens == _alone(engine, p, max_tokens=6).tokens
        # greedy: a prompt evaluated 2 tokens at a time has other float noise than whole, which a sampled
        # token near a boundary of its draw can show
        assert [done[h].tokens for h in group] == [_alone(engine, shared, max_tokens=6).tokens] * 3


def test_a_warm_up_evaluates_the_prompt_only_and_keeps_it(engine):
    """max_tokens 0 (llama.vim's n_predict 0): the prompt goes into a kept cache, nothing is generated;
    the request that follows finds it there. Without kept caches a warm-up would be wasted: refused."""
    with open_sequences(engine, n_seq_max=2, n_ctx=1024, unified=False) as per_seq:
        decoder = BatchDecoder(per_seq, reuse_prefixes=True)
        prompt = engine.tokenize(PROMPTS[1] + "\n    def decode(self, text):")
        (warm,) = decoder.run([Request(prompt, max_tokens=0)])
        assert warm.tokens == [] and warm.text == "" and warm.finish_reason == "length"
        assert decoder.stats.prefilled_tokens == len(prompt) and decoder.stats.generated_tokens == 0
        (real,) = decoder.run([Request(prompt, max_tokens=10)])
        assert real.n_cached_prompt_tokens == len(prompt) - 1  # the last token is evaluated again: it predicts
        assert real.tokens == _alone(engine, prompt, max_tokens=10).tokens
        with pytest.raises(UserError):
            BatchDecoder(per_seq).submit(Request(prompt, max_tokens=0))
        decoder.clear_kept()


def test_hf_pads_sequences_of_different_lengths_into_one_forward_pass(tiny_hf):
    with load_engine(tiny_hf, "hf", n_ctx=512, dtype="float32") as engine, open_sequences(engine, n_seq_max=4) as seqs:
        prompts = [engine.tokenize(p) for p in PROMPTS[:3]]
        opened = [seqs.open() for _ in prompts]
        for seq, toks in zip(opened, prompts):
            seqs.eval({seq: toks})  # caches of different lengths
        extra = [[5], [6, 7, 8, 9], [10, 11]]  # steps of different lengths, as drafts being verified are
        before = seqs.n_forward
        got = seqs.eval(dict(zip(opened, extra)), rows={opened[0]: 1, opened[1]: 4, opened[2]: 0})
        assert seqs.n_forward == before + 1  # one padded batch, not one pass per sequence
        assert seqs.evaluated_tokens([1, 4, 2]) == 12  # what that pass computed: 3 rows x 4
        assert seqs.evaluated_tokens([1] * 15 + [8]) == 15 + 8  # two passes: 15 x 1 and 1 x 8
        for seq, toks, more in zip(opened, prompts, extra):
            engine.reset()
            want = engine.eval(toks + more)[len(toks) :]
            n_rows = {opened[0]: 1, opened[1]: 4, opened[2]: 0}[seq]
            assert got[seq].shape == (n_rows, engine.n_vocab)
            np.testing.assert_allclose(got[seq], want[len(want) - n_rows :], atol=2e-3, rtol=1e-3)
            assert seqs.tokens(seq) == toks + more
        # the caches kept after the padded pass hold only each sequence's own positions, in tensors of their own
        keys = seqs._kv[opened[0]][0][0]  # first layer's keys  # [1, heads, length, head_dim]
        assert keys.shape[2] == len(prompts[0]) + 1
        assert keys.untyped_storage().nbytes() == keys.numel() * keys.element_size()  # not a view of the batch
        step = seqs.eval({seq: [12] for seq in opened}, all_logits=False)
        for seq, toks, more in zip(opened, prompts, extra):
            engine.reset()
            np.testing.assert_allclose(step[seq][-1], engine.eval(toks + more + [12])[-1], atol=2e-3, rtol=1e-3)


def test_hf_batches_pad_only_where_padding_is_cheap():
    from codeaccel.engines.hf_sequences import plan_batches

    assert plan_batches([(0, 1), (1, 2), (2, 3), (3, 4)]) == [[0, 1, 2, 3]]  # 16 padded tokens: one pass
    assert plan_batches([(s, 1) for s in range(15)] + [(15, 8)]) == [list(range(15)), [15]]  # not 128 for 23
    assert plan_batches([(0, 1), (1, 1), (2, 300)]) == [[0, 1], [2]]  # a prompt chunk runs on its own
    assert plan_batches([(0, 200), (1, 300)]) == [[0, 1]]  # 600 evaluated for 500 real: within 2x
    assert plan_batches([(0, 20), (1, 20), (2, 100)]) == [[0, 1], [2]]  # 300 for 140: more than 2x
    assert sorted(s for b in plan_batches([(s, s % 7 + 1) for s in range(40)]) for s in b) == list(range(40))


def test_an_evaluation_that_fails_leaves_every_cache_as_its_tokens_say(engine, seqs, monkeypatch):
    """A pass that raises (memory, Ctrl-C) part-way: the sequences evaluated in an earlier pass of the same eval,
    and the layers reached in the failing one, keep nothing of it; the next eval continues correctly."""
    if engine.kind != "hf":
        pytest.skip("the llama.cpp set removes a failed batch's cells itself (its own test)")
    prompts = [engine.tokenize(p) for p in PROMPTS]
    opened = [seqs.open() for _ in prompts]
    seqs.eval(dict(zip(opened, prompts)))
    long_step = engine.tokenize(" while True: pass  # a long step of its own") * 2
    steps = {opened[0]: long_step, **{s: [int(engine.tokenize(" x")[0])] for s in opened[1:]}}
    real = type(seqs)._forward_batch
    calls = []

    def second_pass_fails(self, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise MemoryError("out of memory in the second pass")
        return real(self, rows)

    monkeypatch.setattr(type(seqs), "_forward_batch", second_pass_fails)
    with pytest.raises(MemoryError):
        seqs.eval(steps)
    assert len(calls) == 2  # the first pass had succeeded
    for seq in opened:  # every cache as long as its tokens: the first pass's growth was not kept
        assert seqs._kv[seq][0][0].shape[-2] == len(seqs.tokens(seq))
    monkeypatch.setattr(type(seqs), "_forward_batch", real)
    got = seqs.eval(steps)
    for seq, toks in zip(opened, prompts):
        assert seqs.tokens(seq) == toks + steps[seq]
        engine.reset()
        np.testing.assert_allclose(got[seq][-1], engine.eval(toks + steps[seq])[-1], atol=2e-3, rtol=1e-3)
    layer = engine.model.model.layers[1]
    real_layer = type(layer).forward
    engine.reset()
    engine.eval(prompts[0])
    monkeypatch.setattr(type(layer), "forward", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # layer 0 has grown by then, the engine's token list has not
        engine.eval(steps[opened[0]])
    assert {layer.keys.shape[-2] for layer in engine._cache.layers} == {len(prompts[0])}  # layer 0 cut back
    monkeypatch.setattr(type(layer), "forward", real_layer)
    after = engine.eval(steps[opened[0]])[-1]
    engine.reset()
    np.testing.assert_allclose(after, engine.eval(prompts[0] + steps[opened[0]])[-1], atol=2e-3, rtol=1e-3)
