"""A reduced draft vocabulary (FR-Spec): ranking, the rewritten GGUF, the engine on it, and lossless speculation."""

import numpy as np
import pytest
from scipy import stats

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.draft_length import DraftLength
from codeaccel.decoding.draft_model import DraftModelDrafter
from codeaccel.decoding.generation import Request
from codeaccel.decoding.sampling import SamplingParams, logits_to_probs
from codeaccel.decoding.speculative import speculative_generate
from codeaccel.engines import load_engine
from codeaccel.engines.pool import EnginePool
from codeaccel.engines.tokenizer import tokenizer_fingerprint
from codeaccel.errors import UserError
from codeaccel.methods import registry
from codeaccel.methods.registry import MethodOptions, build_method
from codeaccel.models.draft_vocab import draft_vocabulary, rank_vocabulary, token_counts
from codeaccel.retrieval.datastore import build_datastore, default_datastore_dir
from test_speculative import _exact_sequence_probs, flat_curve

KEEP = 256  # of the tiny models' 400 tokens


def test_ranking_keeps_forced_tokens_then_the_most_counted_ties_by_id():
    counts = np.zeros(300, dtype=np.int64)
    counts[[5, 7, 9]] = [10, 30, 30]
    ids = rank_vocabulary(counts, 256, always=[299, 1000])  # 1000 is outside the vocabulary: ignored
    assert ids.dtype == np.int64 and list(ids) == sorted(ids) and len(ids) == 256
    assert {299, 5, 7, 9} <= set(ids.tolist())
    # 4 chosen by count or force; the other 252 are the smallest ids among the uncounted (ties by id)
    assert set(ids.tolist()) - {299, 5, 7, 9} == set(range(255)) - {5, 7, 9}
    assert list(rank_vocabulary(counts, 256, always=[299])) == list(ids)  # a pure function of its inputs
    with pytest.raises(UserError, match="256 to 300"):
        rank_vocabulary(counts, 100)
    with pytest.raises(UserError, match="256 to 300"):
        rank_vocabulary(counts, 301)


def test_token_counts_ignore_ids_outside_the_vocabulary():
    sep = np.uint32(0xFFFFFFFF)  # a datastore's document separator
    counts = token_counts([np.array([1, 1, 2, sep], dtype=np.uint32), np.array([2, 3])], n_vocab=4)
    assert counts.tolist() == [0, 2, 2, 1]


@pytest.fixture(scope="module")
def reduced(tiny_gguf_draft, tmp_path_factory):
    """The tiny draft with 256 of its 400 tokens: the 144 largest ids dropped, the EOG tokens kept."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CODEACCEL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        with load_engine(tiny_gguf_draft, n_ctx=256) as full:
            counts = np.arange(full.n_vocab, 0, -1)  # small ids most frequent
            eog = sorted(full.eog_token_ids)
        return draft_vocabulary(tiny_gguf_draft, counts, KEEP, eog, corpus="test counts")


def test_reduced_engine_gives_the_full_models_logits_on_the_kept_tokens(tiny_gguf_draft, reduced):
    with (
        load_engine(tiny_gguf_draft, n_ctx=256) as full,
        load_engine(tiny_gguf_draft, n_ctx=256, vocabulary=reduced) as small,
    ):
        assert small.n_vocab == full.n_vocab and small.model_name.endswith(f"-vocab{KEEP}")
        assert small.tokenize("def f(x):") == full.tokenize("def f(x):")  # text from the original
        assert small.eog_token_ids == full.eog_token_ids and small.eog_token_ids <= set(reduced.token_ids.tolist())
        # inputs include tokens the reduced output layer dropped: embeddings come from the original
        prompt = full.tokenize("def f(x):\n    return x") + [int(reduced.token_ids.max()) + 1, 399]
        a, b = full.eval(prompt), small.eval(prompt)  # [n, vocab] each
        dropped = np.setdiff1d(np.arange(full.n_vocab), reduced.token_ids)
        np.testing.assert_allclose(b[:, reduced.token_ids], a[:, reduced.token_ids], rtol=1e-5, atol=1e-5)
        assert np.isneginf(b[:, dropped]).all()  # probability 0 outside the subset
        small.rewind(3)  # the cache still works: re-evaluating the tail gives the same rows
        np.testing.assert_allclose(small.eval(prompt[3:]), b[3:], rtol=1e-5, atol=1e-5)


def test_reduced_model_file_is_written_once_and_reused(tiny_gguf_draft, reduced, monkeypatch):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(reduced.path.parents[1]))
    mtime = reduced.path.stat().st_mtime_ns
    counts = np.arange(400, 0, -1)
    again = draft_vocabulary(tiny_gguf_draft, counts, KEEP, [], corpus="test counts")
    # another forced set, same ids (the EOG tokens are among the smallest): the same file
    assert again.path == reduced.path and reduced.path.stat().st_mtime_ns == mtime
    other = draft_vocabulary(tiny_gguf_draft, counts[::-1].copy(), KEEP, [], corpus="test counts")
    assert other.path != reduced.path  # another ranking: another file


def test_hf_engine_refuses_a_reduced_vocabulary(tiny_hf, reduced):
    with pytest.raises(UserError, match="llama.cpp"):
        load_engine(tiny_hf, "hf", vocabulary=reduced)


def test_speculation_with_the_reduced_draft_is_lossless_greedy(tiny_gguf, tiny_gguf_draft, reduced):
    with (
        load_engine(tiny_gguf, n_ctx=256) as target,
        load_engine(tiny_gguf_draft, n_ctx=256, vocabulary=reduced) as draft,
    ):
        prompt = target.tokenize("def add(a, b):\n    return")
        ar = generate(target, prompt, SamplingParams(), 40)
        policy = DraftLength(flat_curve(), fixed_k=3)
        gen = speculative_generate(
            target, DraftModelDrafter(draft), policy, prompt, SamplingParams(), 40, costs=LearnedCosts(policy.curve)
        )
        assert gen.tokens == ar.tokens
        assert gen.stats.speculation.drafted_tokens > 0


def test_speculative_sampling_with_the_reduced_draft_keeps_the_target_distribution(tiny_gguf, tmp_path, monkeypatch):
    """Chi-square over all 3-token continuations where the draft cannot name the target's favourite tokens.

    The draft is the target's own weights cut to a vocabulary without the target's two
    likeliest first tokens: it can only propose the third, so those two come from the residual.
    """
    params = SamplingParams(temperature=1.5, top_k=3)
    with load_engine(tiny_gguf, n_ctx=256) as target:
        prompt = target.tokenize("def f(x):\n    return")
        first = logits_to_probs(target.prefill(prompt), params)  # [vocab]
        favourites = np.argsort(-first)[:2]  # two of the target's three candidates: draft probability 0
        counts = np.ones(target.n_vocab, dtype=np.int64)
        counts[favourites] = 0
        monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))
        vocab = draft_vocabulary(tiny_gguf, counts, KEEP, [], corpus="test counts")
        assert not set(favourites.tolist()) & set(vocab.token_ids.tolist())
        exact = _exact_sequence_probs(target, prompt, params, 3)
        with load_engine(tiny_gguf, n_ctx=256, vocabulary=vocab) as draft:
            policy = DraftLength(flat_curve(), fixed_k=2)
            costs = LearnedCosts(policy.curve)
            drafter = DraftModelDrafter(draft)
            n = 3000
            seen = dict.fromkeys(exact, 0)
            accepted = 0
            for seed in range(n):
                gen = speculative_generate(
                    target, drafter, policy, prompt, SamplingParams(1.5, top_k=3, seed=seed), 3, costs=costs
                )
                seen[tuple(gen.tokens)] += 1  # a KeyError is a sequence the target cannot produce
                accepted += gen.stats.speculation.accepted_tokens
    assert accepted > 0  # the draft still gets tokens accepted
    seqs = list(exact)
    observed = np.array([seen[s] for s in seqs])
    expected = np.array([exact[s] for s in seqs]) * n
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_draft_vocab_is_refused_where_it_cannot_apply(tiny_gguf, tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))  # no general datastore: refused before ranking
    with pytest.raises(UserError, match="at least 256"):
        MethodOptions(draft_vocab=100)
    with load_engine(tiny_gguf, n_ctx=256) as target, EnginePool() as pool:
        for name in ("llama.cpp-draft-simple", "hf-assisted"):
            with pytest.raises(UserError, match="does not apply"):
                build_method(name, target, MethodOptions(draft_vocab=KEEP), pool)
        hf_draft = MethodOptions(draft_model=tiny_hf, draft_engine="hf", draft_vocab=KEEP)
        with pytest.raises(UserError, match="GGUF draft on the llama.cpp engine"):
            build_method("speculative", target, hf_draft, pool)


def test_draft_vocab_option_ranks_by_the_general_datastore(tiny_gguf, tiny_gguf_draft, tmp_path, monkeypatch):
    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))
    with load_engine(tiny_gguf, n_ctx=256) as target:
        options = MethodOptions(draft_model=tiny_gguf_draft, draft_vocab=KEEP, draft_k=3)
        with EnginePool() as pool, pytest.raises(UserError, match="codeaccel index build"):
            build_method("speculative", target, options, pool)  # no general datastore to rank by
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "a.py").write_text("def f(x):\n    return x + 1\n" * 5)
        fp = tokenizer_fingerprint(target.n_vocab, target.tokenize)
        build_datastore(
            default_datastore_dir(f"general-{fp}"), "general", "general", [tmp_path / "src"], target.tokenize, fp
        )
        ranked = []
        monkeypatch.setattr(registry, "token_counts", lambda *a: ranked.append(1) or token_counts(*a))
        with EnginePool() as pool:
            method = build_method("speculative", target, options, pool)
            again = build_method("speculative-client-draft", target, options, pool)
            assert len(ranked) == 1 and again.drafter.engine is method.drafter.engine  # ranked and loaded once
            again.close()
            plain = build_method("speculative", target, MethodOptions(draft_model=tiny_gguf_draft, draft_k=3), pool)
            assert method.settings["draft_model"].endswith(f"-vocab{KEEP}")
            assert method.variant != plain.variant  # stored as its own row
            vocabulary = method.drafter.engine._vocabulary
            assert (
                method.settings["draft_vocab"] == KEEP and method.settings["draft_vocab_ids"] == vocabulary.fingerprint
            )
            assert vocabulary.fingerprint not in method.variant  # in the record's key, not in its table label
            kept = method.drafter.engine._vocabulary.token_ids.tolist()
            assert set(target.tokenize("def f(x):\n    return x + 1\n")) <= set(kept)  # the counted tokens
            assert target.eog_token_ids <= set(kept)
            prompt = target.tokenize("def f(x):\n    return")
            ar = generate(target, prompt, SamplingParams(), 24)
            assert method.generate(Request(prompt, SamplingParams(), 24)).tokens == ar.tokens
            method.close()
            plain.close()


def test_the_vocabulary_fingerprint_tells_kept_tokens_apart():
    from pathlib import Path

    from codeaccel.models.draft_vocab import DraftVocabulary

    def vocab(ids):
        return DraftVocabulary(Path("x.gguf"), np.array(ids, dtype=np.int64), "test")

    assert vocab([0, 1, 5]).fingerprint == vocab([0, 1, 5]).fingerprint
    assert vocab([0, 1, 5]).fingerprint != vocab([0, 1, 6]).fingerprint  # one size, other tokens
