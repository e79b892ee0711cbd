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

* whether the draft's longest match is in the request's **own text** (its context or
  prediction, :mod:`codeaccel.retrieval.context`) or in a datastore: the two are
  accepted at different rates, so each keeps its own α per bucket;

and keeps a per-bucket acceptance rate α (decayed counts from a per-bucket prior,
as in :mod:`codeaccel.decoding.draft_length`). The draft length is then ``argmax_k E(k) / C(k+1)``
with α = α_bucket × confidence, over the curve's tiles (:meth:`CostCurve.tiles`: on
llama.cpp a draft of 3 costs what a draft of 2 does) and the whole retrieved length,
capped by it; 0 means "do not verify, decode one token". After ``backoff``
consecutive steps in which nothing was retrieved or verified, it stops searching the
datastores for a while (doubling, up to 8 steps), so code that no datastore knows
costs no lookups; the request's own text is searched every step (a dictionary
lookup: microseconds).

What a verification costs is read, where the decode loop learns it, from the method's
shared :class:`~codeaccel.decoding.costs.LearnedCosts` (S(n): the profile's shape at the
scale verifications cost now), else from the profile. A profile measured while another
job used the cores prices a batch of n tokens at about n steps, and then no draft ever
pays, no verification is made, and nothing could correct it (this switched retrieval
drafting off in CI twice): so a step that would verify nothing may claim one of the
learned costs' rare **trials** (:meth:`LearnedCosts.claim_trial`, at most one per 64+
steps without a verified draft, the interval doubling) and verifies a short draft
(``TRIAL_MAX`` tokens at most, where α is at least ``TRIAL_MIN_ALPHA``), which measures
what verification costs.

The policy (:class:`RetrievalTiming`: settings, and the learned costs it reads) is shared by every request;
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

from collections.abc import Callable
from dataclasses import dataclass, field

from codeaccel.decoding.costs import TRIAL_MAX, TRIAL_MIN_ALPHA, LearnedCosts
from codeaccel.decoding.draft_length import expected_tokens
from codeaccel.engines.cost_curve import CostCurve
from codeaccel.errors import InternalError

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
    # what verifications cost now, learned by the decode loop that records every step in it (shared with the
    # method, or the server's batch decoder); None: the profile as it is
    costs: LearnedCosts | None = None

    def __post_init__(self) -> None:
        if self.costs is not None and self.costs.curve is not self.curve:
            raise InternalError("a timing's learned costs must be over its own curve")

    def start(self) -> TimingState:
        return TimingState(self)

    def step_cost(self) -> Callable[[int], float]:
        """n tokens evaluated at once → decode steps: as verifications cost now where learned, else the profile."""
        return self.curve.cost if self.costs is None else self.costs.snapshot().steps

    def tree_pays(self, path_len: int, tree_size: int) -> bool:
        """Whether to verify a ``tree_size``-node tree rather than its ``path_len``-token main path."""
        cost = self.step_cost()
        return cost(tree_size + 1) <= (1 + TREE_COST_TOLERANCE) * cost(path_len + 1)


@dataclass
class TimingState:
    """One request's timing control: acceptance per (source, match-length bucket), and the lookup backoff.

    Two sources: ``local`` (the request's own context or prediction) and the datastores.
    """

    policy: RetrievalTiming
    _accepted: dict[bool, list[float]] = field(default_factory=lambda: {b: [0.0] * len(BUCKETS) for b in (False, True)})
    _rejected: dict[bool, list[float]] = field(default_factory=lambda: {b: [0.0] * len(BUCKETS) for b in (False, True)})
    _idle_steps: int = 0
    _skip: int = 0  # lookups still to skip
    _skip_len: int = 1

    def alpha(self, match_len: int, local: bool = False) -> float:
        b = bucket(match_len)
        accepted, rejected = self._accepted[local][b], self._rejected[local][b]
        return (accepted + PRIOR_ALPHA[b] * self.policy.prior_weight) / (accepted + rejected + self.policy.prior_weight)

    def should_retrieve(self) -> bool:
        """False while backing off after idle steps (the datastores are not searched this step)."""
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    def draft_length(self, match_len: int, confidence: float, available: int, local: bool = False) -> int:
        """How many of the ``available`` retrieved tokens to verify (0: none).

        Candidates: the curve's tiles up to ``available`` (``available`` itself always is one).
        Where none pays, a trial of the learned costs may still verify a few (see the module).
        """
        if available < 1:
            return 0
        policy = self.policy
        cost = policy.step_cost()
        alpha = min(1.0, self.alpha(match_len, local) * confidence)
        tiles = policy.curve.tiles(min(available, policy.k_max))
        best_k, best_rate = 0, 1.0 / cost(1)  # plain decoding: one token per step
        for k in tiles:
            rate = expected_tokens(alpha, k) / cost(k + 1)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k == 0 and alpha >= TRIAL_MIN_ALPHA and policy.costs is not None and policy.costs.claim_trial():
            return max([k for k in tiles if k <= TRIAL_MAX] or tiles[:1])
        return best_k

    def update(self, match_len: int, k: int, n_accepted: int, searched: bool = True, local: bool = False) -> None:
        """Record one step: a draft of k tokens from a match of match_len (k = 0: nothing verified).

        searched: whether this step looked anything up (False: a skipped step, which says nothing new);
        local: whether the longest match was in the request's own text.
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
        for counts in (*self._accepted.values(), *self._rejected.values()):
            counts[:] = [x * self.policy.decay for x in counts]
        self._accepted[local][b] += n_accepted
        self._rejected[local][b] += n_accepted < k
