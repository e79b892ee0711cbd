"""Retrieval drafting: trie merging, source preference, and lossless decoding on a tiny model."""

from collections import Counter

import numpy as np
import pytest

from codeaccel.decoding.autoregressive import generate
from codeaccel.decoding.draft_length import DraftLength
from codeaccel.decoding.drafter import Draft
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.speculative import speculative_generate
from codeaccel.decoding.stats import DrafterStats
from codeaccel.engines import load_engine
from codeaccel.engines.tokenizer import tokenizer_fingerprint
from codeaccel.retrieval.acceptance_cache import AcceptanceCache
from codeaccel.retrieval.datastore import Retrieved, build_datastore
from codeaccel.retrieval.drafter import RetrievalDrafter
from codeaccel.retrieval.timing import RetrievalTiming
from codeaccel.retrieval.trie import CandidateTrie, merge
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
    assert merge([general, repo], {"repository": 0.5}).best_path(2) == [10, 11]
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


def test_retrieval_drafter_proposes_a_tree_where_the_repository_branches(target, tmp_path):
    root = tmp_path / "getters"
    root.mkdir()
    (root / "g.py").write_text(
        "    def get_x(self):\n        return self.x\n\n    def get_y(self):\n        return self.y\n"
    )
    fp = tokenizer_fingerprint(target.n_vocab, target.tokenize)
    store = build_datastore(tmp_path / "ds", "getters", "repository", [root], target.tokenize, fp)
    drafter = RetrievalDrafter([store], min_match=1, tree_branches=3)
    session = drafter.start([])
    draft = session.propose(target.tokenize("\n    def get_"), 6, SamplingParams(), np.random.default_rng(0))
    assert draft.parents is not None and draft.parents.count(-1) >= 2  # x... and y... both proposed
    assert len(draft.tokens) > 6  # the best path plus an alternative
    drafter.close()
    # with timing control, the tree is kept only where the cost curve is flat
    from test_draft_length import FLAT, LINEAR

    context = target.tokenize("\n    def get_")
    for curve, tree in [(FLAT, True), (LINEAR, False)]:
        timing = RetrievalTiming(curve)
        drafter = RetrievalDrafter([store], timing=timing, min_match=1, tree_branches=3)
        session = drafter.start([])
        draft = session.propose(context, 6, SamplingParams(), np.random.default_rng(0))
        assert (draft.parents is not None) == tree and len(draft.tokens) >= 1
        assert session.stats().retrieval.trees_declined == (not tree)
        drafter.close()
    assert RetrievalTiming(LINEAR).tree_pays(4, 4) and not RetrievalTiming(LINEAR).tree_pays(2, 6)
    assert RetrievalTiming(FLAT).tree_pays(2, 12)


def test_retrieval_drafter_proposes_what_the_repository_holds(target, repo_store):
    drafter = RetrievalDrafter([repo_store], min_match=2)
    context = target.tokenize("class Square:\n    def __init__(self, side):\n        self.")
    draft = drafter.start([]).propose(context, 12, SamplingParams(), np.random.default_rng(0))
    assert draft.probs is None and len(draft.tokens) == 12
    assert target.detokenize(draft.tokens).startswith("side = side")
    assert draft.lookup.kinds == ("repository",) and draft.lookup.match_len >= 2


def test_retrieval_decoding_is_lossless(target, repo_store):
    drafter = RetrievalDrafter([repo_store], min_match=1)
    for text in ("class Square:\n    def area(self):\n        return self.", "def f(side):\n    return"):
        prompt = target.tokenize(text)
        ar = generate(target, prompt, SamplingParams(), 40)
        spec = speculative_generate(target, drafter, DraftLength(flat_curve(), fixed_k=6), prompt, SamplingParams(), 40)
        assert spec.tokens == ar.tokens
        assert spec.stats.speculation.drafts > 0  # the store matched something along the way
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

    policy = RetrievalTiming(LINEAR, k_max=16)
    timing = policy.start()  # one request's state
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
    assert timing.alpha(16) < 0.2
    fresh = policy.start()  # the next request: no backoff, and acceptance from the priors again
    assert fresh.should_retrieve() and fresh.alpha(16) == pytest.approx(0.9)
    timing.update(0, 0, 0)
    timing.update(0, 0, 0)  # two idle lookups
    timing.update(0, 0, 0, searched=False)  # a step whose lookup was skipped says nothing: not a third
    assert timing.should_retrieve()
    timing.update(0, 0, 0)  # the third
    assert not timing.should_retrieve()


def test_learned_costs_grant_rare_trials_after_plain_steps():
    from codeaccel.decoding.costs import LearnedCosts
    from test_draft_length import LINEAR

    costs = LearnedCosts(LINEAR, explore_after=4, explore_max=16)

    def plain(n):
        for _ in range(n):
            costs.record_verification(0, 0.01)

    plain(3)
    assert not costs.claim_trial()  # 3 plain steps: not yet
    plain(1)
    assert costs.claim_trial() and costs.claim_trial()  # granted for this step (a batch and its drafter share it)
    costs.record_verification(2, 0.012)  # the trial's step is over
    plain(7)
    assert not costs.claim_trial()  # the interval doubled to 8
    plain(1)
    assert costs.claim_trial()
    costs.skip_step()  # a step not learned from (prompt chunks): the trial is given back
    assert costs.claim_trial()  # claimable again at once
    costs.record_verification(1, 0.012)
    for interval in (16, 16):  # 8 → 16, then capped at explore_max (16), not 32
        plain(interval - 1)
        assert not costs.claim_trial()
        plain(1)
        assert costs.claim_trial()
        costs.record_verification(1, 0.012)
    costs.record_verification(3, 0.012)  # a draft verified on a policy's own account: back to the first interval
    plain(4)
    assert costs.claim_trial()


def test_plain_batches_measure_the_step_time_and_only_drafts_measure_the_scale():
    """A batch of several requests' plain tokens is not a verification: it prices the step at the believed
    S(n) (here 1.3 steps for 2 tokens), so a machine uniformly slower than its profile slows every step
    and leaves the scale alone."""
    from codeaccel.decoding.costs import LearnedCosts
    from test_draft_length import LINEAR

    costs = LearnedCosts(LINEAR, t_target_s=0.01)
    for _ in range(40):
        costs.record_verification(0, 0.026, n_evaluated=2)  # 2 tokens in 2 × 1.3 × 0.01 s: twice as slow
    snap = costs.snapshot()
    assert snap.t_target_s == pytest.approx(0.02, rel=0.01) and snap.batch_scale == pytest.approx(1.0)
    for _ in range(40):
        costs.record_verification(3, 0.02 * 1.45, n_evaluated=4)  # 4 tokens at half the profile's excess
    assert costs.snapshot().batch_scale == pytest.approx(0.5, rel=0.05)


def test_timing_reads_learned_costs_and_a_too_steep_profile_cannot_stop_drafting_for_good():
    """A profile measured under load prices n tokens at n steps: no draft pays on it. A trial verifies one
    anyway; its timing (4 tokens for the price of one) rescales the curve, and drafting goes on."""
    from codeaccel.decoding.costs import LearnedCosts
    from test_draft_length import curve

    steep = curve([float(k) for k in range(1, 33)])  # C(n) = n: verification never pays
    costs = LearnedCosts(steep, t_target_s=0.1, explore_after=8)
    timing = RetrievalTiming(steep, costs=costs).start()
    static = RetrievalTiming(steep).start()  # the profile alone, as before
    for _ in range(8):  # eight steps decoded plainly: nothing verified
        assert timing.draft_length(match_len=1, confidence=1.0, available=16) == 0  # α 0.3: never a trial
        assert timing.draft_length(match_len=16, confidence=1.0, available=16) == 0
        costs.record_verification(0, 0.1)
    assert timing.draft_length(match_len=1, confidence=1.0, available=16) == 0  # α 0.3: no trial even when due
    trial = timing.draft_length(match_len=16, confidence=1.0, available=16)
    assert 1 <= trial <= 4  # a short trial draft
    costs.record_verification(trial, 0.1)  # the trial's k + 1 tokens cost one step: batches are cheap here
    assert costs.snapshot().batch_scale < 0.9
    for _ in range(5):
        costs.record_verification(3, 0.11)
    assert timing.draft_length(16, 1.0, 16) > 0  # drafting pays on what verification was measured to cost
    assert static.draft_length(16, 1.0, 16) == 0  # the static profile never learns it


@pytest.mark.parametrize("parts", [{"timing", "cache"}, set()], ids=["all-parts", "nothing"])
def test_retrieval_with_timing_and_cache_is_lossless(target, repo_store, parts):
    from test_draft_length import LINEAR

    timing = RetrievalTiming(LINEAR) if "timing" in parts else None
    cache = AcceptanceCache() if "cache" in parts else None
    branches = 3 if parts else 1  # all parts: token trees too
    drafter = RetrievalDrafter([repo_store], timing=timing, cache=cache, min_match=1, tree_branches=branches)
    prompt = target.tokenize("class Square:\n    def area(self):\n        return self.")
    ar = generate(target, prompt, SamplingParams(), 48)
    for _ in range(2):  # the second request can use what the cache learned in the first
        spec = speculative_generate(
            target, drafter, DraftLength(flat_curve(), fixed_k=16), prompt, SamplingParams(), 48
        )
        assert spec.tokens == ar.tokens
        assert spec.stats.drafter.retrieval.lookups > 0
    if cache is not None:
        assert spec.stats.drafter.retrieval.cache_hits > 0 and spec.stats.speculation.accepted_tokens > 0
    drafter.close()


def test_hybrid_uses_the_model_when_retrieval_has_nothing(target, tiny_gguf, tmp_path):
    from codeaccel.decoding.costs import LearnedCosts
    from codeaccel.decoding.draft_model import DraftModelDrafter
    from codeaccel.retrieval.hybrid import HybridDrafter

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.py").write_text("zzz\n")
    fp = tokenizer_fingerprint(target.n_vocab, target.tokenize)
    store = build_datastore(tmp_path / "ds", "empty", "repository", [empty], target.tokenize, fp)
    with load_engine(tiny_gguf, n_ctx=1024) as draft:
        costs = LearnedCosts(flat_curve())
        drafter = HybridDrafter(
            RetrievalDrafter([store], min_match=4),
            DraftModelDrafter(draft),
            DraftLength(flat_curve(), fixed_k=3),
            costs,
        )
        prompt = target.tokenize("def area(side):\n    return")
        ar = generate(target, prompt, SamplingParams(), 30)
        loop = DraftLength(flat_curve(), fixed_k=8)
        spec = speculative_generate(target, drafter, loop, prompt, SamplingParams(), 30, costs=costs)
    assert spec.tokens == ar.tokens
    assert spec.stats.drafter.draft_sources.get("model", 0) > 0
    st = spec.stats.speculation
    assert st.accepted_tokens == st.drafted_tokens  # the draft model is the target's twin


def test_best_tree_docstring_example_and_alternatives():
    trie = CandidateTrie()
    trie.add([1, 2], 3.0)  # a b
    trie.add([1, 3], 2.0)  # a c
    trie.add([4], 1.0)  # d
    assert trie.best_tree(2, 2) == ([1, 2, 3], [-1, 0, 0])
    assert trie.best_tree(2, 3) == ([1, 2, 3, 4], [-1, 0, 0, -1])
    assert trie.best_tree(2, 1) == ([1, 2], [-1, 0])
    assert trie.best_tree(1, 3) == ([1, 4], [-1, -1])  # depth 1: only roots


class TreeDrafter:
    """Proposes a random token tree (three branches) to exercise tree verification."""

    name = "random-tree"

    def __init__(self, vocab: int, seed: int):
        self.vocab, self.rng = vocab, np.random.default_rng(seed)

    def start(self, prompt, exclude_files=frozenset(), prediction=()):
        return self  # a test drafter: one request at a time

    def propose(self, context, k, params, rng):
        n = min(k, 6)
        parents = [-1, 0, -1, 1, 0, 2][:n]
        return Draft(tokens=[int(t) for t in self.rng.integers(0, self.vocab, n)], parents=parents)

    def observe(self, context, draft, verdict, timing):
        pass

    def stats(self):
        return DrafterStats()

    def close(self):
        pass


@pytest.mark.parametrize("engine_kind", ["llama.cpp", "hf"])
def test_tree_drafts_are_lossless_in_the_decode_loop(tiny_gguf, tiny_hf, engine_kind):
    path = tiny_gguf if engine_kind == "llama.cpp" else tiny_hf
    with load_engine(path, engine_kind, n_ctx=512, dtype="float32") as eng:
        prompt = eng.tokenize("def f(x):\n    return")
        ar = generate(eng, prompt, SamplingParams(), 30)
        # a drafter that knows the answer at one branch: trees whose first root is right
        right = ar.tokens

        class OracleTree(TreeDrafter):
            def propose(self, context, k, params, rng):
                done = len(context) - len(prompt)
                tokens = right[done : done + 3] + [int(t) for t in self.rng.integers(0, self.vocab, 3)]
                return Draft(tokens=tokens[:6], parents=[-1, 0, 1, -1, 0, 3][: len(tokens[:6])])

        for drafter in (TreeDrafter(eng.n_vocab, 0), OracleTree(eng.n_vocab, 1)):
            spec = speculative_generate(
                eng, drafter, DraftLength(flat_curve(), fixed_k=6), prompt, SamplingParams(), 30
            )
            assert spec.tokens == ar.tokens
        assert spec.stats.speculation.accepted_tokens > 10  # the oracle's right branch was taken through the tree


def test_tree_sampling_matches_target_distribution(tiny_gguf):
    from scipy import stats as scipy_stats

    from test_speculative import _exact_sequence_probs

    class TopTree(TreeDrafter):
        """Two roots, the target's two most likely next tokens, each with the target's best child: inside the
        sampled support (top-k 3), so branches are accepted often and sampling runs through accepted nodes."""

        def __init__(self, engine):
            super().__init__(engine.n_vocab, 0)
            self.engine = engine

        def propose(self, context, k, params, rng):
            self.engine.reset()
            row = self.engine.eval(list(context))[-1]
            tokens, parents = [], []
            for root in (int(t) for t in np.argsort(-row)[:2]):
                tokens.append(root)
                parents.append(-1)
                child = int(np.argmax(self.engine.eval([root])[-1]))
                self.engine.rewind(len(context))
                tokens.append(child)
                parents.append(len(tokens) - 2)
            n = min(k, len(tokens))
            return Draft(tokens=tokens[:n], parents=parents[:n])

    params = SamplingParams(temperature=1.5, top_k=3)
    with load_engine(tiny_gguf, n_ctx=256) as eng, load_engine(tiny_gguf, n_ctx=256) as drafts:
        prompt = eng.tokenize("def f(x):\n    return")
        exact = _exact_sequence_probs(eng, prompt, params, 3)
        counts = dict.fromkeys(exact, 0)
        drafter = TopTree(drafts)
        n, accepted, verified = 2000, 0, 0
        for seed in range(n):
            gen = speculative_generate(
                eng, drafter, DraftLength(flat_curve(), fixed_k=6), prompt, SamplingParams(1.5, top_k=3, seed=seed), 3
            )
            counts[tuple(gen.tokens)] += 1
            accepted += gen.stats.speculation.accepted_tokens
            verified += gen.stats.speculation.drafts
        assert accepted / verified > 0.5  # sampling really went through accepted tree nodes
        seqs = list(exact)
        assert scipy_stats.chisquare([counts[s] for s in seqs], [exact[s] * n for s in seqs]).pvalue > 1e-3


def test_ablation_methods_switch_off_one_part_each(target, repo_store):
    from codeaccel.engines.pool import EnginePool
    from codeaccel.errors import CodeaccelError
    from codeaccel.methods.registry import MethodOptions, build_method, parse_methods

    names = parse_methods("retrieval,retrieval-without-tree,retrieval-without-cache")
    options = MethodOptions(datastores=(str(repo_store.path),))
    with EnginePool() as pool:
        built = [build_method(n, target, options, pool) for n in names]
        try:
            assert [m.name for m in built] == names  # each stored under its own name
            assert [m.settings.get("ablate") for m in built] == [None, ["tree"], ["cache"]]
            assert len({m.variant for m in built}) == 3  # stored and reported as separate rows
            assert built[1].drafter.tree_branches == 1 and built[1].drafter.cache is not None
            assert built[2].drafter.cache is None and built[2].drafter.tree_branches > 1
        finally:
            for m in built:
                m.close()
    with pytest.raises(CodeaccelError, match="unknown method 'retrieval-without-magic'"):
        parse_methods("retrieval-without-magic")


def test_draft_model_methods_record_the_draft_dtype(tiny_hf, tiny_hf_draft, tmp_path, monkeypatch):
    """speculative and hybrid store the hf draft's dtype with their settings: a bf16 and a float32 draft
    are two settings, so a run resumed with the other dtype does not reuse the first one's records."""
    from codeaccel.engines.pool import EnginePool
    from codeaccel.methods.registry import MethodOptions, build_method

    monkeypatch.setenv("CODEACCEL_CACHE_DIR", str(tmp_path))  # the tiny target's cost curve is measured there
    root = tmp_path / "repo"
    root.mkdir()
    (root / "a.py").write_text("def f():\n    return 1\n")
    with load_engine(tiny_hf, "hf", n_ctx=512, dtype="float32") as target, EnginePool() as pool:
        fp = tokenizer_fingerprint(target.n_vocab, target.tokenize)
        store = build_datastore(tmp_path / "ds", "repo", "repository", [root], target.tokenize, fp)
        options = MethodOptions(draft_model=tiny_hf_draft, datastores=(str(store.path),))
        built = [build_method(name, target, options, pool) for name in ("speculative", "hybrid")]
        try:
            assert [m.settings.get("draft_dtype") for m in built] == ["float32", "float32"]
        finally:
            for m in built:
                m.close()
