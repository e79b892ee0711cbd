"""What verifications and draft steps cost on this machine now: learned online, shared on purpose.

The cost curve (:mod:`codeaccel.engines.cost_curve`) gives the *shape* of the
target's cost, C(n) decode steps to evaluate n tokens at once, profiled once. What
a step costs in seconds, and how far batches have drifted from the profile, is a
property of the machine at this moment, not of one request: every request of a
method measures it and every request benefits. So it lives in one
:class:`LearnedCosts` object per method (its owner), updated under a lock, while
what one request learns about its own drafts (the acceptance rate) lives in that
request's :class:`~codeaccel.decoding.draft_length.DraftLengthState`.

Three estimates, each an exponential moving average:

* ``t_target_s``: seconds per target decode step (C(1)), from plain one-token steps
  and from verifications that the profile prices at about one step;
* ``batch_scale`` s: the measured excess cost of a batch over one step, relative to
  the profile's, from every other verification (a step that verified drafts; a plain
  batch of several requests' tokens measures the step time at the believed S(n)): s = (T/t_target − 1) / (C(n) − 1),
  clipped to ``SCALE_BOUNDS``; S(n) = 1 + s·(C(n) − 1) is what n tokens cost now.
  Only verifications measure s, so while none is made s relaxes back toward the
  profile (``scale_relax`` per plain step): otherwise an s learned in a slow
  stretch, or from one noisy timing, would stop drafting for good (measured on
  HumanEval before this rule: the client-draft policy stopped at s = 1.74 and never
  drafted again); a trial verification then measures s afresh;
* ``t_draft_s``: seconds per drafted token of the draft model (recorded by the
  draft-model drafter, which knows its time is draft-model time).

Relaxing toward the profile cannot fix a profile that is itself too steep (measured
while another job used the cores, it prices a batch of n tokens at about n steps): the
policies reading it then never verify anything, so s is never measured. Hence
**trials**: after ``explore_after`` steps in a row without a verified draft, a policy
that would decode plainly may claim one trial (:meth:`LearnedCosts.claim_trial`) and
verify a short draft anyway, which measures s; the interval doubles after each trial
(up to ``explore_max``), so on a machine where drafting truly does not pay the trials
cost a vanishing share of the steps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from codeaccel.engines.cost_curve import CostCurve

MIN_EXCESS = 0.05  # batches the profile calls (nearly) one step measure the step time, not s
SCALE_BOUNDS = (0.1, 10.0)  # one noisy timing cannot move s further than this
EXPLORE_AFTER = 64  # steps in a row without a verified draft before a trial may be claimed
EXPLORE_MAX = 4096  # the longest interval between trials (it doubles after each)
TRIAL_MAX = 4  # the longest trial draft (on llama.cpp's Q4_K kernels 3 drafts + 1 fill one tile of 4 rows)
TRIAL_MIN_ALPHA = 0.5  # a trial only where the draft is likelier accepted than not


@dataclass(frozen=True)
class Costs:
    """One consistent reading of the learned costs (what a decision is made from)."""

    curve: CostCurve
    t_target_s: float  # seconds per target decode step
    t_draft_s: float | None  # seconds per drafted token (None: not measured yet)
    batch_scale: float  # s

    def steps(self, n: int) -> float:
        """S(n): the cost of evaluating n tokens at once, in decode steps, as verifications cost now."""
        return 1.0 + self.batch_scale * (self.curve.cost(n) - 1.0)


class LearnedCosts:
    """The shared, thread-safe cost estimates of one target (and its draft model), owned by a method."""

    def __init__(
        self,
        curve: CostCurve,
        *,
        t_target_s: float | None = None,
        t_draft_s: float | None = None,
        batch_scale: float = 1.0,
        scale_relax: float = 0.005,
        explore_after: int = EXPLORE_AFTER,
        explore_max: int = EXPLORE_MAX,
    ):
        self.curve = curve
        self.scale_relax = scale_relax  # share of s's distance to the profile (1.0) given up per plain step
        self.explore_max = explore_max
        self._lock = threading.Lock()
        self._t_target_s = curve.seconds[0] if t_target_s is None else t_target_s
        self._t_draft_s = t_draft_s
        self._batch_scale = batch_scale
        self._plain_steps = 0  # steps in a row without a verified draft (any request)
        self._explore_base = explore_after
        self._explore_after = explore_after  # plain steps before the next trial may be claimed
        self._explore_before_trial = explore_after  # the interval before the last trial doubled it
        self._trial_open = False  # a trial was granted and the step it was granted for is not recorded yet

    def snapshot(self) -> Costs:
        with self._lock:
            return Costs(self.curve, self._t_target_s, self._t_draft_s, self._batch_scale)

    def record_verification(self, k: int, target_s: float, n_evaluated: int | None = None) -> None:
        """One step of the decode loop: k drafted tokens verified (0: a plain step) in target_s seconds.

        n_evaluated: tokens the target evaluated (default k + 1; the first step of a
        request evaluates only the drafts, the prefill gave the row before them; a batch's
        step evaluates every request's pending token too). A plain step, one token or a
        batch of requests' tokens, measures the step time (its seconds over S(n) as it is
        believed now); only a step that verified drafts measures s.
        """
        n = k + 1 if n_evaluated is None else n_evaluated
        with self._lock:
            trial, self._trial_open = self._trial_open, False  # the step a trial was granted for is over
            if k == 0:  # no verification measured s: it relaxes toward the profile, so a stale s gets re-tried
                self._batch_scale = ema(self._batch_scale, 1.0, weight=self.scale_relax)
                self._plain_steps += 1
            else:
                self._plain_steps = 0
                if not trial:  # drafting pays again on its own: the next trial need not wait long
                    self._explore_after = self._explore_base
            if target_s <= 0 or n < 1:
                return  # nothing was evaluated: no timing to learn from
            excess = self.curve.cost(n) - 1.0
            if k == 0 or excess <= MIN_EXCESS:  # plain, or a batch the profile says costs (about) one step
                self._t_target_s = ema(self._t_target_s, target_s / (1.0 + self._batch_scale * max(excess, 0.0)))
            else:
                observed = (target_s / self._t_target_s - 1.0) / excess
                self._batch_scale = ema(self._batch_scale, min(max(observed, SCALE_BOUNDS[0]), SCALE_BOUNDS[1]))

    def skip_step(self) -> None:
        """A step whose timing is not learned from (a batch that also evaluated prompt chunks): a trial
        granted for it measured nothing, so it is given back (claimable at the next step)."""
        with self._lock:
            if self._trial_open:
                self._trial_open = False
                self._explore_after = self._explore_before_trial
                self._plain_steps = self._explore_after

    def claim_trial(self) -> bool:
        """Whether a policy that would decode plainly this step should verify a short draft anyway.

        True at most once per ``explore_after`` steps in a row without a verified draft (the
        interval doubling after each trial, up to ``explore_max``, and back to its start once a
        draft is verified on the policy's own account): a too-steep profile cannot switch
        drafting off for good, and a machine where drafts truly do not pay spends a vanishing
        share of its steps on trials. The trial lasts until the step is recorded (or skipped)."""
        with self._lock:
            if self._trial_open:
                return True  # already granted for this step (a batch and its drafter share it)
            if self._plain_steps < self._explore_after:
                return False
            self._plain_steps = 0
            self._explore_before_trial = self._explore_after
            self._explore_after = min(2 * self._explore_after, self.explore_max)
            self._trial_open = True
            return True

    def record_draft(self, k: int, draft_s: float) -> None:
        """The draft model drafted k tokens in draft_s seconds."""
        if k > 0 and draft_s > 0:
            with self._lock:
                self._t_draft_s = ema(self._t_draft_s, draft_s / k)


def ema(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else (1 - weight) * old + weight * new
