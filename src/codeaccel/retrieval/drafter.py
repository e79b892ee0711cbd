"""Retrieval drafting (REST / CodeSwift): drafts are continuations of the context found in sources.

Each step the request's own text (its prompt and generated tokens, and its predicted
output if it has one: :mod:`codeaccel.retrieval.context`) and every datastore
(general code, the user's repository, searched in parallel) are searched for the
longest suffix of the context they contain; the continuations that followed it
there are merged into a trie weighted by how often they occur and by their source
(:mod:`codeaccel.retrieval.trie`). The draft is the heaviest path through the trie.

Retrieval drafts carry no probabilities: the target verifies them by
sample-and-compare, which is exact (see :mod:`codeaccel.decoding.verification`).

Worked example: context ``... for i in range(`` ; the repository holds
``range(len(items))`` twice and the general store ``range(n)`` five times, both after
a 4-token match. Weights (each source's share of its samples, times its kind's
weight): repository 1.0 × 4 = 4, general 1.0 × 1 = 1; the draft is ``len(items))``.
Had the request itself written ``range(len(values))`` earlier, after the same 4
tokens, its context adds 1.0 × 8 = 8: ``len(`` is shared (weight 12), and after it
``values`` (8) beats ``items`` (4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from codeaccel.decoding.drafter import Draft, Lookup, StepTiming
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.stats import DrafterStats, RetrievalCounts
from codeaccel.decoding.verification import Verdict
from codeaccel.retrieval.acceptance_cache import AcceptanceCache
from codeaccel.retrieval.context import LOCAL_KINDS, LocalSources
from codeaccel.retrieval.datastore import Datastore, Retrieved
from codeaccel.retrieval.timing import RetrievalTiming, TimingState
from codeaccel.retrieval.trie import SOURCE_WEIGHTS, merge


class RetrievalDrafter:
    """Proposes the heaviest retrieved continuation; searches all datastores in parallel.

    datastores: general code and the user's repository (may be empty: the request's own
    text only). context: also search the request's own text, its prompt and what it
    generated so far, and its predicted output if it has one (False: neither)
    (:mod:`codeaccel.retrieval.context`; searched first, every step).
    timing: a :class:`RetrievalTiming` deciding whether to look up and how much of the
    retrieved draft to verify (None: verify everything retrieved, as REST does).
    tree_branches: above 1, the draft is a token tree: the best path plus alternatives
    where the trie branches (verified in one target evaluation, see ``Engine.eval_tree``),
    when timing says the cost curve is flat enough for them (``RetrievalTiming.tree_pays``).
    cache: an :class:`AcceptanceCache` of what the target produced before in the same
    context (None: no preference), shared by every request. Both adapt in ``observe``.
    weights: each source kind's weight in the merged trie (:data:`SOURCE_WEIGHTS`).
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
        weights: Mapping[str, float] = SOURCE_WEIGHTS,
        cache_weight: float = 8.0,
        tree_branches: int = 1,
        context: bool = True,
    ):
        self.datastores = list(datastores)
        self.timing = timing
        self.cache = cache
        self.max_match = max_match
        self.min_match = min_match
        self.max_samples = max_samples
        self.weights = weights
        self.cache_weight = cache_weight
        self.tree_branches = tree_branches  # > 1: propose a token tree of that many branches
        self.context = context
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.datastores) - 1), thread_name_prefix="retrieve")

    def start(
        self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset(), prediction: Sequence[int] = ()
    ) -> RetrievalSession:
        # the request's own text: its context and its prediction (both off with context=False)
        local = LocalSources(prompt, prediction if self.context else (), use_context=self.context)
        return RetrievalSession(self, exclude_files, local)

    def retrieve(self, context: Sequence[int], k: int, exclude_files: frozenset[str] = frozenset()) -> list[Retrieved]:
        """Look the context's tail up in every datastore: all but the first on the pool, the first here."""
        if not self.datastores:
            return []
        tail = list(context[-self.max_match :])
        args = (tail, self.max_match, self.min_match, k, self.max_samples, exclude_files)
        jobs = [self._pool.submit(ds.lookup, *args) for ds in self.datastores[1:]]
        found = [self.datastores[0].lookup(*args), *(job.result() for job in jobs)]
        return [r for r in found if r is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class RetrievalSession:
    """One request's retrieval drafting: its own text's index, its timing state, its counters, its exclusions."""

    def __init__(self, drafter: RetrievalDrafter, exclude_files: frozenset[str], local: LocalSources):
        self.drafter = drafter
        self.exclude_files = exclude_files  # datastore files this request must not draft from
        self.local = local  # the request's prompt + generated tokens, and its prediction
        self.timing: TimingState | None = drafter.timing.start() if drafter.timing is not None else None
        self.counts = RetrievalCounts()

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        d = self.drafter
        found = self.local.lookup(context, k)  # every step: a few dictionary lookups
        # "searched" drives the datastores' backoff: only a step that searched them can be idle
        searched = not d.datastores and self.local.searches
        if d.datastores:
            if self.timing is not None and not self.timing.should_retrieve():
                self.counts.skipped_lookups += 1
            else:
                self.counts.lookups += 1
                found += d.retrieve(context, k, self.exclude_files)
                searched = True
        if not found and not searched:
            return Draft(tokens=[], source="retrieval", lookup=Lookup(searched=False))
        trie = merge(found, d.weights)
        cached = d.cache.lookup(context, k) if d.cache is not None else []
        if cached:
            self.counts.cache_hits += 1
            trie.add(cached, d.cache_weight)
        path, confidence = trie.best_path_with_confidence(k)
        if not path:
            return Draft(tokens=[], source="retrieval", lookup=Lookup(searched=searched))
        self.counts.retrieved += 1
        match_len = max([r.match_len for r in found] + ([d.cache.key_len] if cached else []))
        longest = [r.kind for r in found if r.match_len == match_len]
        local = any(kind in LOCAL_KINDS for kind in longest)
        self.counts.prediction_matches += "prediction" in longest
        self.counts.context_matches += "context" in longest and "prediction" not in longest
        lookup = Lookup(searched=searched, match_len=match_len, kinds=tuple(r.kind for r in found), local=local)
        n = len(path) if self.timing is None else self.timing.draft_length(match_len, confidence, len(path), local)
        # what the timing expects of this draft (by source and match length): a batch sizes drafts by it
        acceptance = None if self.timing is None else min(self.timing.alpha(match_len, local) * confidence, 0.99)
        from_cache = bool(cached) and path[: len(cached)] == cached[: len(path)]
        source = "cache" if from_cache else "retrieval"
        if n == 0 or d.tree_branches <= 1:
            return Draft(tokens=path[:n], source=source, lookup=lookup, acceptance=acceptance)
        tokens, parents = trie.best_tree(n, d.tree_branches)
        if len(tokens) > n and d.timing is not None and not d.timing.tree_pays(n, len(tokens)):
            self.counts.trees_declined += 1  # the alternatives would cost more than they can save
            return Draft(tokens=path[:n], source=source, lookup=lookup, acceptance=acceptance)
        return Draft(tokens=tokens, source=source, parents=parents if len(tokens) > n else None, lookup=lookup,
                     acceptance=acceptance)  # fmt: skip

    def observe(self, context: Sequence[int], draft: Draft, verdict: Verdict, timing: StepTiming) -> None:
        if self.timing is not None:
            lookup = draft.lookup or Lookup(searched=False)
            n = verdict.judged if draft.tokens else 0  # a tree: the path the target took, not its every node
            self.timing.update(lookup.match_len, n, verdict.n_accepted, searched=lookup.searched, local=lookup.local)
        if self.drafter.cache is not None:
            self.drafter.cache.record(context, verdict.tokens)

    def stats(self) -> DrafterStats:
        return DrafterStats(retrieval=self.counts)
