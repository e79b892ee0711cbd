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

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from codeaccel.datastore import Datastore, Retrieved
from codeaccel.drafters.base import Draft
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
        path, node = [], self.root
        while node.children and len(path) < k:
            token, node = max(node.children.items(), key=lambda kv: (kv[1].weight, -kv[0]))
            path.append(token)
        return path


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
    """Proposes the heaviest retrieved continuation; searches all datastores in parallel."""

    name = "retrieval"

    def __init__(
        self,
        datastores: Sequence[Datastore],
        max_match: int = 16,
        min_match: int = 2,
        max_samples: int = 64,
        repository_weight: float = 4.0,
    ):
        self.datastores = list(datastores)
        self.max_match = max_match
        self.min_match = min_match
        self.max_samples = max_samples
        self.repository_weight = repository_weight
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.datastores)), thread_name_prefix="retrieve")
        self.last: list[Retrieved] = []  # what the last proposal was built from (for logging and policies)

    def prepare(self, prompt: Sequence[int]) -> None:
        pass

    def retrieve(self, context: Sequence[int], k: int) -> list[Retrieved]:
        tail = list(context[-self.max_match :])
        jobs = [
            self._pool.submit(ds.lookup, tail, self.max_match, self.min_match, k, self.max_samples)
            for ds in self.datastores
        ]
        return [r for r in (job.result() for job in jobs) if r is not None]

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        self.last = self.retrieve(context, k)
        return Draft(tokens=merge(self.last, self.repository_weight).best_path(k))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
