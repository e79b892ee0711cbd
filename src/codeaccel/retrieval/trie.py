"""The candidate trie: every source's retrieved continuations merged by shared prefix, weighted.

Longer matches dominate shorter ones, and among equal matches the request's own
sources (its prediction, its context) come first, then the repository, then general
code (:func:`merge`). The draft is the heaviest path through the trie
(:meth:`CandidateTrie.best_path`), or a token tree of it and its heaviest
alternatives (:meth:`CandidateTrie.best_tree`).

Worked example: context ``... for i in range(`` ; the repository holds
``range(len(items))`` twice and the general store ``range(n)`` five times, both after
a 4-token match. Weights (each source's share of its samples, times its kind's
weight): repository 1.0 × 4 = 4, general 1.0 × 1 = 1; the draft is ``len(items))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from codeaccel.retrieval.datastore import Retrieved


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


# Weight of a source kind's continuations in the merged trie. The request's own text
# beats the repository, which beats general code; an expected output given with the
# request (a prediction) beats everything.
SOURCE_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"general": 1.0, "repository": 4.0, "context": 8.0, "prediction": 32.0}
)


def merge(results: Sequence[Retrieved], weights: Mapping[str, float] = SOURCE_WEIGHTS) -> CandidateTrie:
    """Merge every source's continuations into one trie.

    A continuation's weight is its share of its source's samples, times its kind's
    weight (``weights``, 1.0 for a kind not named), times 2^(match_len − longest
    match_len) so a source that matched fewer context tokens counts for less.
    """
    trie = CandidateTrie()
    if not results:
        return trie
    longest = max(r.match_len for r in results)
    for r in results:
        total = sum(r.continuations.values())
        scale = weights.get(r.kind, 1.0) * 2.0 ** (r.match_len - longest)
        for tokens, count in r.continuations.items():
            trie.add(tokens, scale * count / total)
    return trie
