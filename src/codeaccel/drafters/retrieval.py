"""Retrieval drafting (REST / CodeSwift): drafts are continuations of the context found in datastores.

Each step every datastore (general code, the user's repository) is searched in
parallel for the longest suffix of the context it contains; the continuations
that followed it there are merged into a trie weighted by how often they occur.
Longer matches dominate shorter ones, and the repository is preferred when both
match equally well. The draft is the heaviest path through the trie.

Retrieval drafts carry no probabilities: the target verifies them by
sample-and-compare, which is exact (see :mod:`codeaccel.verification`).

Worked example: context ``... for i in range(`` ; the repository holds
``range(len(items))`` twice and the general store ``range(n)`` five times, both after
a 4-token match. Weights: repository 2 × 4 (preference) = 8, general 5; the draft
is ``len(items))``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from codeaccel.acceptance_cache import AcceptanceCache
from codeaccel.datastore import Datastore, Retrieved
from codeaccel.drafters.base import Draft
from codeaccel.retrieval_timing import RetrievalTiming
from codeaccel.sampling import SamplingParams


@dataclass
class TrieNode:
    weight: float = 0.0
    children: dict[int, TrieNode] = field(default_factory=dict)


class CandidateTrie:
    """Continuations merged by shared prefix; a node's weight is the total weight of those through it."""

    def __init__(self) -> None:
        self.root = TrieNode()

    def add(self, tokens: Sequence[int], weight: float) -> None:
        node = self.root
        for t in tokens:
            node = node.children.setdefault(int(t), TrieNode())
            node.weight += weight

    def best_path(self, k: int) -> list[int]:
        """Follow the heaviest child from the root for at most k tokens (ties: the smaller token id)."""
        return self.best_path_with_confidence(k)[0]

    def best_path_with_confidence(self, k: int) -> tuple[list[int], float]:
        """The heaviest path, and its first token's share of the root's weight (1.0: no alternative)."""
        path, node = [], self.root
        total = sum(c.weight for c in self.root.children.values())
        confidence = 0.0
        while node.children and len(path) < k:
            token, node = max(node.children.items(), key=lambda kv: (kv[1].weight, -kv[0]))
            if not path:
                confidence = node.weight / total if total > 0 else 0.0
            path.append(token)
        return path, confidence

    def best_tree(self, depth: int, branches: int, alt_len: int = 2) -> tuple[list[int], list[int]]:
        """The heaviest path cut at ``depth``, plus up to ``branches - 1`` alternatives, as (tokens, parents).

        Each alternative leaves the tree at the heaviest trie child not yet in it (a
        sibling of a chosen node), then follows the heaviest children for at most
        ``alt_len`` tokens in all (verification costs nearly linear in nodes on a CPU,
        so alternatives hedge the uncertain next tokens only). Worked example:
        continuations ``a b`` ×3, ``a c`` ×2, ``d`` ×1, depth 2, 2 branches: tokens
        ``a b c``, parents ``-1 0 0``.
        """
        tokens: list[int] = []
        parents: list[int] = []
        chosen: list[tuple[TrieNode, int, int]] = [(self.root, -1, 0)]  # (trie node, draft node, depth)

        def descend(node: TrieNode, index: int, level: int, limit: int) -> None:
            while node.children and level < limit:
                token, node = max(node.children.items(), key=lambda kv: (kv[1].weight, -kv[0]))
                tokens.append(token)
                parents.append(index)
                index, level = len(tokens) - 1, level + 1
                chosen.append((node, index, level))

        descend(self.root, -1, 0, depth)
        for _ in range(branches - 1):
            taken = {(p, t) for p, t in zip(parents, tokens)}
            best = None  # (weight, -token, trie child, draft parent, level)
            for node, index, level in chosen:
                if level >= depth:
                    continue
                for token, child in node.children.items():
                    if (index, token) not in taken and (best is None or (child.weight, -token) > best[:2]):
                        best = (child.weight, -token, child, index, level)
            if best is None:
                break
            _, neg_token, child, index, level = best
            tokens.append(-neg_token)
            parents.append(index)
            chosen.append((child, len(tokens) - 1, level + 1))
            descend(child, len(tokens) - 1, level + 1, min(depth, level + alt_len))
        return tokens, parents


def merge(results: Sequence[Retrieved], repository_weight: float = 4.0) -> CandidateTrie:
    """Merge every source's continuations into one trie.

    A continuation's weight is its share of its source's samples, times
    ``repository_weight`` for the repository, times 2^(match_len − longest match_len)
    so a source that matched fewer context tokens counts for less.
    """
    trie = CandidateTrie()
    if not results:
        return trie
    longest = max(r.match_len for r in results)
    for r in results:
        total = sum(r.continuations.values())
        scale = (repository_weight if r.kind == "repository" else 1.0) * 2.0 ** (r.match_len - longest)
        for tokens, count in r.continuations.items():
            trie.add(tokens, scale * count / total)
    return trie


class RetrievalDrafter:
    """Proposes the heaviest retrieved continuation; searches all datastores in parallel.

    timing: a :class:`RetrievalTiming` deciding whether to look up and how much of the
    retrieved draft to verify (None: verify everything retrieved, as REST does).
    tree_branches: above 1, the draft is a token tree: the best path plus alternatives
    where the trie branches (verified in one target evaluation, see ``Engine.eval_tree``),
    when timing says the cost curve is flat enough for them (``RetrievalTiming.tree_pays``).
    cache: an :class:`AcceptanceCache` of what the target produced before in the same
    context (None: no preference). Both adapt in :meth:`observe`.
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
        self.last: list[Retrieved] = []  # what the last proposal was built from
        self._last_match = 0
        self._counts: Counter = Counter()
        self._exclude: frozenset[str] = frozenset()  # datastore files this request must not draft from

    def prepare(self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset()) -> None:
        self._counts = Counter()
        self._exclude = exclude_files
        if self.timing is not None:
            self.timing.reset_backoff()

    def retrieve(self, context: Sequence[int], k: int) -> list[Retrieved]:
        """Look the context's tail up in every datastore: all but the first on the pool, the first here."""
        tail = list(context[-self.max_match :])
        args = (tail, self.max_match, self.min_match, k, self.max_samples, self._exclude)
        jobs = [self._pool.submit(ds.lookup, *args) for ds in self.datastores[1:]]
        found = [self.datastores[0].lookup(*args), *(job.result() for job in jobs)]
        return [r for r in found if r is not None]

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        self._last_match, self.last = 0, []
        if self.timing is not None and not self.timing.should_retrieve():
            self._counts["skipped_lookups"] += 1
            return Draft(tokens=[], source="retrieval")
        self._counts["lookups"] += 1
        self.last = self.retrieve(context, k)
        trie = merge(self.last, self.repository_weight)
        cached = self.cache.lookup(context, k) if self.cache is not None else []
        if cached:
            self._counts["cache_hits"] += 1
            trie.add(cached, self.cache_weight)
        path, confidence = trie.best_path_with_confidence(k)
        if not path:
            return Draft(tokens=[], source="retrieval")
        self._counts["retrieved"] += 1
        self._last_match = max([r.match_len for r in self.last] + ([self.cache.key_len] if cached else []))
        n = len(path) if self.timing is None else self.timing.draft_length(self._last_match, confidence, len(path))
        from_cache = bool(cached) and path[: len(cached)] == cached[: len(path)]
        source = "cache" if from_cache else "retrieval"
        if n == 0 or self.tree_branches <= 1:
            return Draft(tokens=path[:n], source=source)
        tokens, parents = trie.best_tree(n, self.tree_branches)
        if len(tokens) > n and self.timing is not None and not self.timing.tree_pays(n, len(tokens)):
            self._counts["trees_declined"] += 1  # the alternatives would cost more than they can save
            return Draft(tokens=path[:n], source=source)
        return Draft(tokens=tokens, source=source, parents=parents if len(tokens) > n else None)

    def observe(self, context: Sequence[int], draft: Draft, n_accepted: int, committed: Sequence[int]) -> None:
        if self.timing is not None:
            self.timing.update(self._last_match, len(draft.tokens), n_accepted)
        if self.cache is not None:
            self.cache.record(context, committed)

    def request_stats(self) -> dict:
        return {"retrieval": dict(self._counts)}

    def close(self) -> None:
        self._pool.shutdown(wait=False)
