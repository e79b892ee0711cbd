"""Retrieval drafting (REST / CodeSwift): drafts are continuations of the context found in datastores.

Each step every datastore (general code, the user's repository) is searched in
parallel for the longest suffix of the context it contains; the continuations
that followed it there are merged into a trie weighted by how often they occur
(:mod:`codeaccel.retrieval.trie`). The draft is the heaviest path through the trie.

Retrieval drafts carry no probabilities: the target verifies them by
sample-and-compare, which is exact (see :mod:`codeaccel.decoding.verification`).

Worked example: context ``... for i in range(`` ; the repository holds
``range(len(items))`` twice and the general store ``range(n)`` five times, both after
a 4-token match. Weights: repository 2 × 4 (preference) = 8, general 5; the draft
is ``len(items))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from codeaccel.decoding.drafter import Draft, Lookup, StepTiming
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.stats import DrafterStats, RetrievalCounts
from codeaccel.decoding.verification import Verdict
from codeaccel.retrieval.acceptance_cache import AcceptanceCache
from codeaccel.retrieval.datastore import Datastore, Retrieved
from codeaccel.retrieval.timing import RetrievalTiming, TimingState
from codeaccel.retrieval.trie import merge


class RetrievalDrafter:
    """Proposes the heaviest retrieved continuation; searches all datastores in parallel.

    timing: a :class:`RetrievalTiming` deciding whether to look up and how much of the
    retrieved draft to verify (None: verify everything retrieved, as REST does).
    tree_branches: above 1, the draft is a token tree: the best path plus alternatives
    where the trie branches (verified in one target evaluation, see ``Engine.eval_tree``),
    when timing says the cost curve is flat enough for them (``RetrievalTiming.tree_pays``).
    cache: an :class:`AcceptanceCache` of what the target produced before in the same
    context (None: no preference), shared by every request. Both adapt in ``observe``.
    """

    name = "retrieval"

    def __init__(
        self,
        datastores: Sequence[Datastore],
        timing: RetrievalTiming | None = None,
        cache: AcceptanceCache | None = None,
        max_match: int = 16,
        min_match: int = 2,
        max_samples: int = 64,
        repository_weight: float = 4.0,
        cache_weight: float = 8.0,
        tree_branches: int = 1,
    ):
        self.datastores = list(datastores)
        self.timing = timing
        self.cache = cache
        self.max_match = max_match
        self.min_match = min_match
        self.max_samples = max_samples
        self.repository_weight = repository_weight
        self.cache_weight = cache_weight
        self.tree_branches = tree_branches  # > 1: propose a token tree of that many branches
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.datastores) - 1), thread_name_prefix="retrieve")

    def start(self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset()) -> RetrievalSession:
        return RetrievalSession(self, exclude_files)

    def retrieve(self, context: Sequence[int], k: int, exclude_files: frozenset[str] = frozenset()) -> list[Retrieved]:
        """Look the context's tail up in every datastore: all but the first on the pool, the first here."""
        tail = list(context[-self.max_match :])
        args = (tail, self.max_match, self.min_match, k, self.max_samples, exclude_files)
        jobs = [self._pool.submit(ds.lookup, *args) for ds in self.datastores[1:]]
        found = [self.datastores[0].lookup(*args), *(job.result() for job in jobs)]
        return [r for r in found if r is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class RetrievalSession:
    """One request's retrieval drafting: its timing state, its counters, the files it must not use."""

    def __init__(self, drafter: RetrievalDrafter, exclude_files: frozenset[str]):
        self.drafter = drafter
        self.exclude_files = exclude_files  # datastore files this request must not draft from
        self.timing: TimingState | None = drafter.timing.start() if drafter.timing is not None else None
        self.counts = RetrievalCounts()

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        d = self.drafter
        if self.timing is not None and not self.timing.should_retrieve():
            self.counts.skipped_lookups += 1
            return Draft(tokens=[], source="retrieval", lookup=Lookup(searched=False))
        self.counts.lookups += 1
        found = d.retrieve(context, k, self.exclude_files)
        trie = merge(found, d.repository_weight)
        cached = d.cache.lookup(context, k) if d.cache is not None else []
        if cached:
            self.counts.cache_hits += 1
            trie.add(cached, d.cache_weight)
        path, confidence = trie.best_path_with_confidence(k)
        if not path:
            return Draft(tokens=[], source="retrieval", lookup=Lookup(searched=True))
        self.counts.retrieved += 1
        match_len = max([r.match_len for r in found] + ([d.cache.key_len] if cached else []))
        lookup = Lookup(searched=True, match_len=match_len, kinds=tuple(r.kind for r in found))
        n = len(path) if self.timing is None else self.timing.draft_length(match_len, confidence, len(path))
        from_cache = bool(cached) and path[: len(cached)] == cached[: len(path)]
        source = "cache" if from_cache else "retrieval"
        if n == 0 or d.tree_branches <= 1:
            return Draft(tokens=path[:n], source=source, lookup=lookup)
        tokens, parents = trie.best_tree(n, d.tree_branches)
        if len(tokens) > n and d.timing is not None and not d.timing.tree_pays(n, len(tokens)):
            self.counts.trees_declined += 1  # the alternatives would cost more than they can save
            return Draft(tokens=path[:n], source=source, lookup=lookup)
        return Draft(tokens=tokens, source=source, parents=parents if len(tokens) > n else None, lookup=lookup)

    def observe(self, context: Sequence[int], draft: Draft, verdict: Verdict, timing: StepTiming) -> None:
        if self.timing is not None:
            lookup = draft.lookup or Lookup(searched=False)
            self.timing.update(lookup.match_len, len(draft.tokens), verdict.n_accepted, searched=lookup.searched)
        if self.drafter.cache is not None:
            self.drafter.cache.record(context, verdict.tokens)

    def stats(self) -> DrafterStats:
        return DrafterStats(retrieval=self.counts)
