"""Retrieval timing control: whether to retrieve this step, and how many retrieved tokens to verify.

A retrieval draft is nearly free to make but not to verify: on a CPU, verifying k
tokens costs C(k+1) decode steps (the cost curve), and a draft that is rejected at
its first token wastes all of it. CodeSwift's answer is to retrieve and verify only
when it is likely to pay. This policy learns, online, how well retrieval drafts are
accepted as a function of what it can see before verifying:

* the **match length** (how many context tokens the datastore matched; longer
  matches are more specific), bucketed as 1, 2-3, 4-7, 8-15, 16+;
* the **confidence** of the draft (the weight share of the trie's heaviest branch at
  its first token);

and keeps a per-bucket acceptance rate α (decayed counts from a per-bucket prior,
as in :mod:`codeaccel.decoding.draft_length`). The draft length is then ``argmax_k E(k) / C(k+1)``
with α = α_bucket × confidence, capped by the retrieved length; 0 means "do not
verify, decode one token". After ``backoff`` consecutive steps in which nothing
was retrieved or verified, it stops searching for a while (doubling, up to 8 steps),
so code that no datastore knows costs no lookups.

The policy (:class:`RetrievalTiming`, settings only) is shared by every request;
what one request learns (the per-bucket acceptance, the backoff) lives in its own
:class:`TimingState`, which starts from the priors.

Token trees (alternatives where the retrieved continuations branch) only hedge
against the main path being rejected early, which the draft length already made
unlikely; they are verified only where the cost curve is flat, i.e. when the whole
tree costs at most ``TREE_COST_TOLERANCE`` more than its main path:
C(tree + 1) ≤ (1 + tolerance) · C(path + 1). On hf bf16 on this CPU (16 tokens ≈ one
step) or a GPU that keeps them; on llama.cpp on two cores, where every extra token
costs about half a step (C(3) = 2.1, C(7) = 4.6), it declines them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from codeaccel.decoding.draft_length import expected_tokens
from codeaccel.engines.cost_curve import CostCurve

BUCKETS = (1, 2, 4, 8, 16)  # lower edges of the match-length buckets
# Prior acceptance per bucket: a longer match is more specific. Optimistic enough that
# every bucket where drafting can pay on a steep CPU cost curve gets tried and learned.
PRIOR_ALPHA = (0.3, 0.6, 0.75, 0.85, 0.9)
TREE_COST_TOLERANCE = 0.1  # a token tree may cost at most 10% more to verify than its main path


def bucket(match_len: int) -> int:
    return max(i for i, edge in enumerate(BUCKETS) if match_len >= edge) if match_len >= 1 else 0


@dataclass(frozen=True)
class RetrievalTiming:
    """The timing policy: settings shared by every request (``start`` gives one request's state)."""

    curve: CostCurve
    k_max: int = 16
    prior_weight: float = 2.0
    decay: float = 0.98
    backoff: int = 3  # consecutive idle steps before skipping lookups

    def start(self) -> TimingState:
        return TimingState(self)

    def tree_pays(self, path_len: int, tree_size: int) -> bool:
        """Whether to verify a ``tree_size``-node tree rather than its ``path_len``-token main path."""
        return self.curve.cost(tree_size + 1) <= (1 + TREE_COST_TOLERANCE) * self.curve.cost(path_len + 1)


@dataclass
class TimingState:
    """One request's timing control: acceptance per match-length bucket, and the lookup backoff."""

    policy: RetrievalTiming
    _accepted: list[float] = field(default_factory=lambda: [0.0] * len(BUCKETS))
    _rejected: list[float] = field(default_factory=lambda: [0.0] * len(BUCKETS))
    _idle_steps: int = 0
    _skip: int = 0  # lookups still to skip
    _skip_len: int = 1

    def alpha(self, match_len: int) -> float:
        b = bucket(match_len)
        a = self._accepted[b] + PRIOR_ALPHA[b] * self.policy.prior_weight
        return a / (self._accepted[b] + self._rejected[b] + self.policy.prior_weight)

    def should_retrieve(self) -> bool:
        """False while backing off after idle steps (the step then decodes plainly)."""
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    def draft_length(self, match_len: int, confidence: float, available: int) -> int:
        """How many of the ``available`` retrieved tokens to verify (0: none)."""
        if available < 1:
            return 0
        curve = self.policy.curve
        alpha = min(1.0, self.alpha(match_len) * confidence)
        best_k, best_rate = 0, 1.0 / curve.cost(1)  # plain decoding: one token per step
        for k in range(1, min(available, self.policy.k_max) + 1):
            rate = expected_tokens(alpha, k) / curve.cost(k + 1)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def update(self, match_len: int, k: int, n_accepted: int, searched: bool = True) -> None:
        """Record one step: a draft of k tokens from a match of match_len (k = 0: nothing verified).

        searched: whether this step looked the context up (False: a skipped step, which says nothing new).
        """
        if k == 0:
            if not searched:
                return
            self._idle_steps += 1
            if self._idle_steps >= self.policy.backoff:
                self._skip, self._skip_len = self._skip_len, min(8, self._skip_len * 2)
                self._idle_steps = 0
            return
        self._idle_steps, self._skip_len = 0, 1
        b = bucket(match_len)
        self._accepted = [x * self.policy.decay for x in self._accepted]
        self._rejected = [x * self.policy.decay for x in self._rejected]
        self._accepted[b] += n_accepted
        self._rejected[b] += n_accepted < k
