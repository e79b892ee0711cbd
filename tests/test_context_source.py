"""The request's own text as a drafting source, predicted outputs, and drafts sized to the curve's tiles."""

import json

import numpy as np
import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.costs import Costs
from codeaccel.decoding.draft_length import DraftLength
from codeaccel.decoding.drafter import StepTiming
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.speculative import speculative_generate
from codeaccel.decoding.verification import Verdict
from codeaccel.engines import load_engine
from codeaccel.engines.cost_curve import cost_curve_for, load_cost_curve, save_cost_curve
from codeaccel.engines.pool import EnginePool
from codeaccel.engines.tokenizer import tokenizer_fingerprint
from codeaccel.methods.registry import MethodOptions, build_method
from codeaccel.retrieval.context import LocalSources, NgramIndex
from codeaccel.retrieval.datastore import build_datastore
from codeaccel.retrieval.drafter import RetrievalDrafter
from codeaccel.retrieval.hybrid import HybridDrafter
from codeaccel.retrieval.timing import RetrievalTiming
from test_draft_length import LINEAR, curve
from test_speculative import flat_curve

A, B, C, D = 1, 2, 3, 4
TILED = curve([1.0, 1.5, 1.9, 1.8, 2.4, 2.7, 3.0, 3.2] + [3.2 + 0.25 * i for i in range(1, 25)])  # C(4) < C(3)


@pytest.fixture(scope="module")
def target(tiny_gguf):
    with load_engine(tiny_gguf, n_ctx=1024) as eng:
        yield eng


# ---- the n-gram index ---------------------------------------------------------------------------
def test_ngram_index_docstring_example():
    index = NgramIndex("context", min_n=2, max_n=4)
    index.extend([A, B, C, D, A, B])
    found = index.lookup([A, B, C, D, A, B], cont_len=4)
    assert found.kind == "context" and found.match_len == 2
    assert list(found.continuations) == [(C, D, A, B)]
    assert index.lookup([D, C], cont_len=4) is None  # never seen
    assert index.lookup([A, B], cont_len=0) is None


def test_ngram_index_is_incremental_and_constant_work_per_token():
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 5, 300)]
    whole, grown = NgramIndex("context", 2, 6), NgramIndex("context", 2, 6)
    whole.extend(tokens)
    for i, t in enumerate(tokens):
        before = sum(len(v) for v in grown._ends.values())
        grown.extend([t])
        assert sum(len(v) for v in grown._ends.values()) - before == max(0, min(6, i + 1) - 1)  # n = 2..min(6, len)
    assert grown._ends == whole._ends
    for end in range(10, 300, 7):  # every lookup agrees with a brute-force scan for the longest earlier match
        index, seen = NgramIndex("context", 2, 6), tokens[:end]
        index.extend(seen)
        earlier = [n for n in range(2, 7) if any(seen[i : i + n] == seen[-n:] for i in range(len(seen) - n))]
        found = index.lookup(seen, 3)
        if not earlier:
            assert found is None
            continue
        n = max(earlier)
        assert found.match_len == n
        expected = {tuple(seen[i + n : i + n + 3]) for i in range(len(seen) - n) if seen[i : i + n] == seen[-n:]}
        assert set(found.continuations) <= expected and found.continuations


def test_tokens_before_a_prediction_are_never_drafted():
    local = LocalSources([8, 7, 8, 7], prediction=[8, 7, 5])
    found = {r.kind: r for r in local.lookup([8, 7, 8, 7], 4)}
    # from the prediction's start and from its own (8, 7); never the prompt's (8, 7, 8, 7) behind it
    assert set(found["prediction"].continuations) == {(8, 7, 5), (5,)}
    assert list(found["context"].continuations) == [(8, 7)]  # the prompt's own earlier (8, 7) is context


def test_ngram_index_prefers_the_most_recent_occurrence():
    index = NgramIndex("context", 2, 2)
    index.extend([A, B, C, A, B, D, A, B])  # after (A, B): C first, D later
    found = index.lookup([A, B], 1)
    assert found.continuations[(D,)] > found.continuations[(C,)]  # a tie in counts goes to the latest
    index.extend([A, B, C, A, B, C])  # now C twice more: frequency wins over recency
    found = index.lookup([A, B], 1)
    assert max(found.continuations, key=found.continuations.get) == (C,)


def test_prediction_is_found_right_after_the_prompt():
    prompt = [9, 8, 7]
    local = LocalSources(prompt, prediction=[A, B, C, D])
    found = local.lookup(prompt, 3)  # nothing generated yet: the prediction's first tokens
    assert [(r.kind, list(r.continuations)) for r in found] == [("prediction", [(A, B, C)])]
    found = local.lookup([*prompt, A, B], 2)  # generation follows the prediction
    assert found[0].kind == "prediction" and list(found[0].continuations) == [(C, D)]
    without = LocalSources(prompt, prediction=[], use_context=False)
    assert not without.searches and without.lookup([*prompt, A], 3) == []


# ---- drafting from the request's own text -----------------------------------------------------
def test_context_drafts_are_lossless_and_used(target):
    drafter = RetrievalDrafter([], timing=None, context=True)
    text = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add("
    prompt = target.tokenize(text)
    ar = generate(target, prompt, SamplingParams(), 40)
    spec = speculative_generate(target, drafter, DraftLength(flat_curve(), fixed_k=6), prompt, SamplingParams(), 40)
    assert spec.tokens == ar.tokens
    counts = spec.stats.drafter.retrieval
    assert counts.context_matches > 0 and counts.lookups == 0  # no datastore was searched
    assert spec.stats.speculation.drafts > 0


def test_a_right_prediction_saves_steps_and_a_wrong_one_changes_nothing(target):
    prompt = target.tokenize("def area(side):\n    return")
    ar = generate(target, prompt, SamplingParams(), 48)
    drafter = RetrievalDrafter([], timing=RetrievalTiming(flat_curve()), context=True)
    length = DraftLength(flat_curve(), fixed_k=16)
    right = speculative_generate(target, drafter, length, prompt, SamplingParams(), 48, prediction=ar.tokens)
    wrong_tokens = [int(t) for t in np.random.default_rng(1).integers(3, target.n_vocab, 48)]
    wrong = speculative_generate(target, drafter, length, prompt, SamplingParams(), 48, prediction=wrong_tokens)
    plain = speculative_generate(target, drafter, length, prompt, SamplingParams(), 48)
    assert right.tokens == wrong.tokens == plain.tokens == ar.tokens
    assert right.stats.steps <= 4 < plain.stats.steps  # 48 tokens in a few verifications
    assert right.stats.drafter.retrieval.prediction_matches > 0
    assert not plain.stats.drafter.retrieval.prediction_matches
    off = RetrievalDrafter([], timing=RetrievalTiming(flat_curve()), context=False)  # the ablation: neither source
    ablated = speculative_generate(target, off, length, prompt, SamplingParams(), 48, prediction=ar.tokens)
    assert ablated.tokens == ar.tokens and ablated.stats.steps == len(ar.tokens)


def test_prediction_sampling_keeps_the_target_distribution(target):
    """Sample-and-compare with a partly wrong prediction: the same tokens as autoregressive sampling, seed by seed."""
    prompt = target.tokenize("def area(side):\n    return")
    drafter = RetrievalDrafter([], timing=None, context=True)
    length = DraftLength(flat_curve(), fixed_k=8)
    accepted = 0
    for seed in range(6):
        params = SamplingParams(temperature=0.8, seed=seed)
        ar = generate(target, prompt, params, 32)
        prediction = list(ar.tokens)
        prediction[len(prediction) // 2 :] = [3] * (len(prediction) - len(prediction) // 2)  # its second half wrong
        spec = speculative_generate(target, drafter, length, prompt, params, 32, prediction=prediction)
        assert spec.tokens == ar.tokens
        accepted += spec.stats.speculation.accepted_tokens
    assert accepted > 0  # the right half was drafted and kept


# ---- tiles ---------------------------------------------------------------------------------------
def test_tiles_skip_draft_lengths_a_longer_draft_verifies_as_cheaply():
    assert TILED.tiles(7) == [1, 3, 4, 5, 6, 7]  # C(3) = 1.9 > C(4) = 1.8: a draft of 2 is dominated by 3
    assert TILED.tiles(2) == [1, 2]  # nothing longer than 2 allowed: 2 is the longest there is
    assert LINEAR.tiles(8) == list(range(1, 9))  # a strictly rising curve: every length is a tile
    assert flat_curve().tiles(8) == [8]  # all cost the same: only the longest
    target_only = DraftLength(TILED, k_max=7, objective="target")
    costs = Costs(t_target_s=0.05, batch_scale=1.0, t_draft_s=0.02, curve=TILED)
    assert target_only.candidates(costs, 7) == TILED.tiles(7)  # target-seconds only: the curve's tiles
    for alpha in np.linspace(0.05, 0.99, 40):  # the argmax over all lengths is never a dominated one
        rates = {k: target_only.tokens_per_s(costs, k, float(alpha)) for k in range(8)}
        best = max(rates.values())
        assert rates[target_only.best_k(costs, float(alpha))] == pytest.approx(best)
        assert target_only.best_k(costs, float(alpha), cap=2) in (0, 1, 2)  # a cap below the tile is kept


def test_a_draft_models_own_cost_keeps_short_drafts_on_a_flat_curve():
    """End to end, drafted tokens cost draft steps: a flat verification curve does not make 16 as cheap as 3."""
    flat = flat_curve()
    end_to_end = DraftLength(flat, k_max=16)
    costs = Costs(t_target_s=0.05, batch_scale=1.0, t_draft_s=0.025, curve=flat)  # a draft step = half a target step
    assert end_to_end.candidates(costs, 16) == list(range(1, 17))  # every length costs more than the one before
    # tokens per second: k = 0: 1 / 0.05 = 20; k = 2: 2.44 / 0.1 = 24.4 (the best); k = 16: 4.89 / 0.45 = 10.9
    assert end_to_end.best_k(costs, 0.8) == 2
    assert DraftLength(flat, k_max=16, objective="target").candidates(costs, 16) == [16]


def test_timing_chooses_tiles_and_learns_local_and_datastore_acceptance_apart():
    timing = RetrievalTiming(TILED, k_max=7).start()
    for match_len in range(1, 20):
        for available in range(3, 8):
            assert timing.draft_length(match_len, 1.0, available) != 2
    assert timing.draft_length(16, 1.0, 2) == 2  # only 2 retrieved: verify those
    for _ in range(30):
        timing.update(match_len=8, k=3, n_accepted=0, local=False)  # datastore drafts fail
    assert timing.draft_length(8, 1.0, 7, local=False) == 0
    assert timing.draft_length(8, 1.0, 7, local=True) > 0  # the request's own text keeps its prior
    assert timing.alpha(8, local=True) == pytest.approx(0.85)


# ---- the cost curve follows the CPU ----------------------------------------------------------------
def test_cost_curve_is_remeasured_when_it_was_profiled_on_another_cpu(target, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))
    stale = curve([1.0] * 16)
    stale.model, stale.engine = target.model_name, target.kind
    path = save_cost_curve(stale)[0]
    doc = json.loads(path.read_text())
    doc["machine"]["cpu_model"] = "Some Other CPU"
    path.write_text(json.dumps(doc))
    fresh = cost_curve_for(target)
    assert fresh.seconds != stale.seconds  # measured here
    assert load_cost_curve(target.kind, target.model_name).seconds == fresh.seconds  # and saved for next time
    assert cost_curve_for(target).seconds == fresh.seconds  # same CPU now: reused, not re-measured


# ---- the methods that use it -----------------------------------------------------------------------
def test_methods_search_the_request_first(target, tiny_gguf_draft, tmp_path, monkeypatch):

    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def f(x):\n    return x + 1\n")
    fp = tokenizer_fingerprint(target.n_vocab, target.tokenize)
    store = build_datastore(tmp_path / "ds", "repo", "repository", [tmp_path / "src"], target.tokenize, fp)
    options = MethodOptions(datastores=(str(store.path),), draft_model=tiny_gguf_draft)
    with EnginePool() as pool:
        context = build_method("context", target, options, pool)
        retrieval = build_method("retrieval", target, options, pool)
        ablated = build_method("retrieval-without-context", target, options, pool)
        spec = build_method("speculative", target, options, pool)
        fixed = build_method("speculative", target, MethodOptions(draft_model=tiny_gguf_draft, draft_k=3), pool)
        capped = build_method("retrieval", target, MethodOptions(datastores=(str(store.path),), draft_k=4), pool)
        try:
            # a fixed k is a setting of its own: records of two ks never share a key or a report row
            assert fixed.settings["draft_k"] == 3 and capped.settings["draft_k"] == 4
            assert "draft_k" not in retrieval.settings and spec.settings["draft_k"] == "auto"
            assert context.drafter.datastores == [] and context.drafter.context
            assert context.settings == {"datastores": [], "context": True}
            assert retrieval.drafter.context and len(retrieval.drafter.datastores) == 1
            # a rebuilt datastore of the same name is another setting; its fingerprint stays out of the label
            assert retrieval.settings["datastore_content"] == {"repo": store.fingerprint}
            assert store.fingerprint not in retrieval.variant and "datastore_content" not in retrieval.variant
            assert not ablated.drafter.context and ablated.settings["ablate"] == ["context"]
            assert isinstance(spec.drafter, HybridDrafter) and spec.drafter.retrieval.datastores == []
            assert spec.settings["context"] is True and spec.variant.endswith(", context")
            assert (
                not isinstance(fixed.drafter, HybridDrafter) and "context" not in fixed.settings
            )  # k fixed: model only
            prompt = target.tokenize("def add(a, b):\n    return a + b\n\n\ndef add(")
            ar = generate(target, prompt, SamplingParams(), 24)
            for method in (context, retrieval, ablated, spec):
                assert method.generate(Request(prompt, SamplingParams(), 24)).tokens == ar.tokens
        finally:
            for m in (context, retrieval, ablated, spec, fixed, capped):
                m.close()


def test_datastore_backoff_recovers_while_the_context_is_searched_every_step(target, tmp_path):
    """Steps that skipped the datastores are not idle lookups: the backoff stays bounded (at most 8 skips)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def f(x):\n    return x + 1\n")
    fp = tokenizer_fingerprint(target.n_vocab, target.tokenize)
    store = build_datastore(tmp_path / "ds", "repo", "repository", [tmp_path / "src"], target.tokenize, fp)
    drafter = RetrievalDrafter([store], timing=RetrievalTiming(LINEAR), context=True)
    context = [int(t) for t in np.random.default_rng(3).integers(5000, 6000, 8)]  # nothing anywhere matches
    session = drafter.start(context)
    rng = np.random.default_rng(0)
    for step in range(120):
        draft = session.propose(context, 8, SamplingParams(), rng)
        assert draft.tokens == []
        token = 6000 + step  # a new token each step: the context never repeats either
        session.observe(context, draft, Verdict([token], 0, 0, False), StepTiming(0.05, 0.0, 1))
        context.append(token)
    counts = session.stats().retrieval
    assert counts.lookups + counts.skipped_lookups == 120
    assert counts.lookups >= 120 // (8 + 3)  # searched again after every backoff of at most 8 steps
    drafter.close()
