"""Retrieval drafting: trie merging, source preference, and lossless decoding on a tiny model."""

from collections import Counter

import numpy as np
import pytest

from codeaccel.autoregressive import generate
from codeaccel.datastore import Retrieved, build_datastore, tokenizer_fingerprint
from codeaccel.draft_length import DraftLength
from codeaccel.drafters.retrieval import CandidateTrie, RetrievalDrafter, merge
from codeaccel.engines import load_engine
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
