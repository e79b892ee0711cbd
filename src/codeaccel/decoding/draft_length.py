"""How many tokens to draft each step: the k that maximises expected tokens per second.

With a per-token acceptance rate α (each draft token accepted independently, the
model of Leviathan et al. 2023), a draft of k tokens commits on average

    E(k) = (1 − α^(k+1)) / (1 − α)        tokens (accepted + one recovered/bonus)

and costs

    T(k) = k · t_draft + t_target · S(k+1)     seconds, end to end, or
    T(k) = t_target · S(k+1)                   seconds of target time (objective "target"),

where S(n) = 1 + s · (C(n) − 1) is the cost of evaluating n tokens at once in
decode steps (the verification evaluates the last committed token plus the k drafts):
C is the target's profiled cost curve (never below one step), and s rescales its
excess over one step to what verifications cost *now*. Measured online: t_target from
plain one-token steps and from verifications the profile prices at about one step,
t_draft per drafted token, and s from every other verification (s = (T/t_target − 1)
/ (C(n) − 1), smoothed). The profile only gives the curve's shape; on a machine whose
batched arithmetic got slower (or faster) since ``codeaccel profile`` ran, s follows.
Only verifications measure s, so while none is made s relaxes back toward the profile
(``scale_relax`` per plain step, as α decays to its prior): otherwise an s learned in a
slow stretch, or from one noisy timing, would stop drafting for good (measured on
HumanEval before this rule: the client-draft policy stopped at s = 1.74 and never
drafted again); a trial verification then measures s afresh.
Plain decoding commits 1 token per ``t_target``. Each step picks
``k* = argmax E(k)/T(k)`` over the tiles of T (:meth:`DraftLength.candidates`: the draft
lengths that no longer draft costs as little; on llama.cpp's Q4_K kernels verifying 4
tokens costs what 3 do, so without a draft model's own cost a draft of 2 is never
chosen there) and drafts only if
that beats plain decoding; otherwise it returns 0 and the caller decodes one token.

**Confidence stopping** (``stop_by_confidence``, for drafters that know how sure they
are, like a draft model). α is an average; the draft model's largest probability at
each position (greedy: that of the token it drafts) says, token by token, how likely
the target is to agree (on the bundled pair, greedy, tokens drafted with probability
≥ 0.9 were accepted 100% of the time, those below 0.6 about half the time). So
``choose`` gives a cap (the longest draft that pays if every token is accepted) and
the drafter stops early: with ``survival`` = the product of those probabilities so
far (its estimate that the target accepts every token up to here), the i-th token is
worth drafting only while ``survival ≥ min_survival(i)``, the token's cost in target
steps (its extra verification, plus one draft step for the objective that counts the
draft), against the one target step it saves when accepted. Where even a fully
accepted draft cannot pay (``best_k(alpha=1) == 0``), the drafter does not read the
prompt at all. transformers' assisted generation stops
its assistant the same way, at a fixed confidence threshold (0.4); here the threshold
follows from the measured costs.

α is estimated online, per request, from its verified drafts (accepted tokens vs
first rejections), with exponentially decaying weights so it follows the code being
written, and a prior it starts from and decays back to while no drafts are made (so a stretch of plain decoding
is followed by a fresh trial once the prior says drafting could pay). When even
α = 1 cannot beat plain decoding on this hardware, it never drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from codeaccel.decoding.costs import Costs, LearnedCosts
from codeaccel.engines.cost_curve import CostCurve, undominated
from codeaccel.errors import UserError

Objective = Literal["end-to-end", "target"]
OBJECTIVES = ("end-to-end", "target")


def expected_tokens(alpha: float, k: int) -> float:
    """E(k): expected tokens committed by one verification of a k-token draft."""
    if k == 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass(frozen=True)
class DraftLength:
    """The policy (settings only, shared by every request): how to choose k from costs and α.

    curve: the target engine's cost curve. fixed_k: always draft this many (no
    adaptation; for ablations). objective: "end-to-end" counts the draft's time,
    "target" counts only the target's (the draft runs elsewhere, e.g. on a client).
    """

    curve: CostCurve
    k_max: int = 16
    objective: Objective = "end-to-end"
    fixed_k: int | None = None
    stop_by_confidence: bool = False  # the drafter stops by min_survival; choose() gives only a cap
    prior_alpha: float = 0.8
    prior_weight: float = 2.0  # pseudo-observations behind the prior
    decay: float = 0.9  # weight kept by old observations per step

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.fixed_k is not None and self.fixed_k < 1:
            raise UserError(f"the draft length k must be >= 1, got {self.fixed_k}")
        if self.k_max < 1:
            raise UserError(f"k_max must be >= 1, got {self.k_max}")

    def start(self, costs: LearnedCosts) -> DraftLengthState:
        """The per-request state: α from the prior, costs read from the shared estimates."""
        return DraftLengthState(self, costs)

    def seconds(self, costs: Costs, k: int) -> float:
        """T(k): what one step with a k-token draft costs (target-seconds only for objective "target")."""
        seconds = costs.t_target_s * costs.steps(k + 1)
        if self.objective == "end-to-end" and k > 0:
            seconds += k * (costs.t_draft_s or 0.0)
        return seconds

    def tokens_per_s(self, costs: Costs, k: int, alpha: float) -> float:
        """Expected committed tokens per second (per target-second for objective "target") at draft length k."""
        return expected_tokens(alpha, k) / self.seconds(costs, k)

    def candidates(self, costs: Costs, cap: int) -> list[int]:
        """The draft lengths 1..cap worth considering: no longer one (up to cap) costs (nearly) as little.

        The cost curve's tiles (:meth:`CostCurve.tiles`), judged on the whole step T(k),
        so a draft model's own time per token counts too (a flat curve does not make 14
        drafted tokens as cheap as 3).
        """
        return undominated([self.seconds(costs, k) for k in range(cap + 1)])

    def best_k(self, costs: Costs, alpha: float, cap: int | None = None) -> int:
        """argmax_k E(k)/T(k) over 0 (plain decoding) and the candidates up to cap (default k_max)."""
        cap = self.k_max if cap is None else min(cap, self.k_max)
        return max((0, *self.candidates(costs, cap)), key=lambda k: (self.tokens_per_s(costs, k, alpha), -k))

    def choose(self, costs: Costs, alpha: float, room: int) -> int:
        """The draft length for the next step, at most ``room`` (0: decode one token plainly)."""
        if room < 1:
            return 0
        if self.fixed_k is not None:
            return min(self.fixed_k, room)
        longest = self.best_k(costs, alpha=1.0, cap=room)
        if longest == 0:  # cannot pay even if every draft token were accepted
            return 0
        best = self.best_k(costs, alpha, cap=room)
        if best == 0:  # the measured acceptance says plain decoding is faster now
            return 0
        return longest if self.stop_by_confidence else best

    def min_survival(self, costs: Costs, i: int, draft_step: bool) -> float:
        """The least probability that draft tokens 0..i are all accepted for token i to pay.

        In target decode steps (an accepted token saves one): the i-th token's extra
        verification cost S(i+2) − S(i+1) (the verification evaluates the pending token
        plus the drafts), plus, with ``draft_step`` and the end-to-end objective, the
        draft step that computes it.
        """
        price = costs.steps(i + 2) - costs.steps(i + 1)
        if draft_step and self.objective == "end-to-end" and costs.t_draft_s:
            price += costs.t_draft_s / costs.t_target_s
        return price


@dataclass
class DraftLengthState:
    """One request's draft-length decisions: the shared policy and costs, and this request's α."""

    policy: DraftLength
    costs: LearnedCosts
    _accepted: float = field(default=0.0, init=False)  # decayed count of accepted draft tokens
    _rejected: float = field(default=0.0, init=False)  # decayed count of first rejections

    @property
    def alpha(self) -> float:
        """This request's estimate of the per-token acceptance rate."""
        a = self._accepted + self.policy.prior_alpha * self.policy.prior_weight
        return a / (self._accepted + self._rejected + self.policy.prior_weight)

    def choose(self, room: int) -> int:
        return self.policy.choose(self.costs.snapshot(), self.alpha, room)

    def record(self, k: int, n_accepted: int) -> None:
        """One step: k tokens drafted (0: a plain step), n_accepted of them kept."""
        self._accepted *= self.policy.decay
        self._rejected *= self.policy.decay
        if k > 0:
            self._accepted += n_accepted
            self._rejected += n_accepted < k


@dataclass(frozen=True)
class DraftPricing:
    """What a drafter that stops by confidence prices its tokens with: the policy and the shared costs."""

    policy: DraftLength
    costs: LearnedCosts

    def min_survival(self, costs: Costs, i: int, draft_step: bool) -> float:
        return self.policy.min_survival(costs, i, draft_step)

    def can_pay(self, costs: Costs) -> bool:
        """False where even a fully accepted draft loses to plain decoding."""
        return self.policy.best_k(costs, alpha=1.0) > 0
