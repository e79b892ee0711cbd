"""Retrieval drafting: trie merging, source preference, and lossless decoding on a tiny model."""

from collections import Counter

import numpy as np
import pytest

from codeaccel.acceptance_cache import AcceptanceCache
from codeaccel.autoregressive import generate
from codeaccel.datastore import Retrieved, build_datastore, tokenizer_fingerprint
from codeaccel.draft_length import DraftLength
from codeaccel.drafters.retrieval import CandidateTrie, RetrievalDrafter, merge
from codeaccel.engines import load_engine
from codeaccel.retrieval_timing import RetrievalTiming
from codeaccel.sampling import SamplingParams
from codeaccel.speculative import speculative_generate
from test_speculative import flat_curve


def test_trie_follows_the_heaviest_branch():
    trie = CandidateTrie()
    trie.add([1, 2, 3], 1.0)
    trie.add([1, 2, 4], 1.0)
    trie.add([1, 5], 1.5)  # heavier than either [1, 2, x] alone, lighter than both together
    assert trie.best_path(5) == [1, 2, 3]  # ties between 3 and 4 go to the smaller id
    assert trie.best_path(1) == [1]
    assert CandidateTrie().best_path(4) == []


def test_merge_prefers_the_repository_and_longer_matches():
    general = Retrieved("g", "general", 4, 5, Counter({(10, 11): 5}))
    repo = Retrieved("r", "repository", 4, 2, Counter({(20, 21): 2}))
    assert merge([general, repo]).best_path(2) == [20, 21]  # the docstring's example: 4 × 1.0 vs 1.0
    assert merge([general, repo], repository_weight=0.5).best_path(2) == [10, 11]
    shorter_repo = Retrieved("r", "repository", 1, 2, Counter({(20, 21): 2}))
    assert merge([general, shorter_repo]).best_path(2) == [10, 11]  # 4 × 2^(1-4) = 0.5 < 1.0


@pytest.fixture(scope="module")
def target(tiny_gguf):
    with load_engine(tiny_gguf, n_ctx=1024) as eng:
        yield eng


@pytest.fixture(scope="module")
def repo_store(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    (root / "shapes.py").write_text(
        "class Square:\n    def __init__(self, side):\n        self.side = side\n\n"
        "    def area(self):\n        return self.side * self.side\n"
    )
    fp = tokenizer_fingerprint(target.n_vocab, target.tokenize)
    return build_datastore(tmp_path_factory.mktemp("ds") / "repo", "repo", "repository", [root], target.tokenize, fp)


def test_retrieval_drafter_proposes_what_the_repository_holds(target, repo_store):
    drafter = RetrievalDrafter([repo_store], min_match=2)
    context = target.tokenize("class Square:\n    def __init__(self, side):\n        self.")
    draft = drafter.propose(context, 12, SamplingParams(), np.random.default_rng(0))
    assert draft.probs is None and len(draft.tokens) == 12
    assert target.detokenize(draft.tokens).startswith("side = side")
    assert drafter.last[0].kind == "repository" and drafter.last[0].match_len >= 2


def test_retrieval_decoding_is_lossless(target, repo_store):
    drafter = RetrievalDrafter([repo_store], min_match=1)
    for text in ("class Square:\n    def area(self):\n        return self.", "def f(side):\n    return"):
        prompt = target.tokenize(text)
        ar = generate(target, prompt, SamplingParams(), 40)
        spec = speculative_generate(target, drafter, DraftLength(flat_curve(), fixed_k=6), prompt, SamplingParams(), 40)
        assert spec.tokens == ar.tokens
        assert spec.stats["drafts"] > 0  # the store matched something along the way
    drafter.close()


# ---- acceptance cache and timing control ---------------------------------------------------------
def test_acceptance_cache_chains_and_is_bounded():
    cache = AcceptanceCache(key_len=2, max_entries=3)
    cache.record([7, 1, 2], [3, 4])  # after (1, 2) the target produced 3 4
    cache.record([1, 2, 3, 4], [5])  # after (3, 4): 5
    assert cache.lookup([9, 1, 2], 5) == [3, 4, 5]  # chained
    assert cache.lookup([9, 1, 2], 1) == [3]
    assert cache.lookup([2, 1], 4) == []
    cache.record([0, 10, 11], [12])
    cache.record([0, 20, 21], [22])  # evicts the least recently used key
    assert len(cache) == 3


def test_timing_verifies_long_matches_and_backs_off_when_idle():
    from test_draft_length import LINEAR

    timing = RetrievalTiming(LINEAR, k_max=16)
    assert timing.draft_length(match_len=16, confidence=1.0, available=16) > 0  # prior 0.9: pays
    assert timing.draft_length(match_len=1, confidence=1.0, available=16) == 0  # prior 0.3: does not
    assert timing.draft_length(match_len=16, confidence=1.0, available=0) == 0
    for _ in range(30):  # long matches keep failing: stop verifying them
        timing.update(match_len=16, k=8, n_accepted=0)
    assert timing.draft_length(16, 1.0, 16) == 0
    assert all(timing.should_retrieve() for _ in range(3))
    for _ in range(3):
        timing.update(0, 0, 0)  # three idle steps
    assert [timing.should_retrieve() for _ in range(2)] == [False, True]  # skips one, then tries again
    timing.update(0, 0, 0)
    timing.update(0, 0, 0)
    timing.update(0, 0, 0)  # three more idle lookups: the skip doubles
    assert [timing.should_retrieve() for _ in range(3)] == [False, False, True]
    timing.reset_backoff()
    assert timing.should_retrieve()


@pytest.mark.parametrize("parts", [{"timing", "cache"}, set()], ids=["all-parts", "nothing"])
def test_retrieval_with_timing_and_cache_is_lossless(target, repo_store, parts):
    from test_draft_length import LINEAR

    timing = RetrievalTiming(LINEAR) if "timing" in parts else None
    cache = AcceptanceCache() if "cache" in parts else None
    drafter = RetrievalDrafter([repo_store], timing=timing, cache=cache, min_match=1)
    prompt = target.tokenize("class Square:\n    def area(self):\n        return self.")
    ar = generate(target, prompt, SamplingParams(), 48)
    for _ in range(2):  # the second request can use what the cache learned in the first
        spec = speculative_generate(
            target, drafter, DraftLength(flat_curve(), fixed_k=16), prompt, SamplingParams(), 48
        )
        assert spec.tokens == ar.tokens
        assert spec.stats["retrieval"]["lookups"] > 0
    if cache is not None:
        assert spec.stats["retrieval"].get("cache_hits", 0) > 0 and spec.stats["accepted_tokens"] > 0
    drafter.close()


def test_hybrid_uses_the_model_when_retrieval_has_nothing(target, tiny_gguf, tmp_path):
    from codeaccel.drafters.draft_model import DraftModelDrafter
    from codeaccel.drafters.hybrid import HybridDrafter

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.py").write_text("zzz\n")
    fp = tokenizer_fingerprint(target.n_vocab, target.tokenize)
    store = build_datastore(tmp_path / "ds", "empty", "repository", [empty], target.tokenize, fp)
    with load_engine(tiny_gguf, n_ctx=1024) as draft:
        drafter = HybridDrafter(
            RetrievalDrafter([store], min_match=4), DraftModelDrafter(draft), DraftLength(flat_curve(), fixed_k=3)
        )
        prompt = target.tokenize("def area(side):\n    return")
        ar = generate(target, prompt, SamplingParams(), 30)
        spec = speculative_generate(target, drafter, DraftLength(flat_curve(), fixed_k=8), prompt, SamplingParams(), 30)
    assert spec.tokens == ar.tokens
    assert spec.stats["draft_sources"].get("model", 0) > 0
    assert spec.stats["accepted_tokens"] == spec.stats["drafted_tokens"]  # the draft model is the target's twin
