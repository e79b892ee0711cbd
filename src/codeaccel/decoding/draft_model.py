"""A small model as the drafter (the SpeCoder / Leviathan setting).

The draft engine keeps its own KV cache in step with the accepted text: each
``propose`` calls ``engine.prefill(context)``, which keeps the longest cached prefix
(the context it saw last time plus the draft tokens the target accepted) and
evaluates only what is new: usually the one recovered or bonus token, never the
whole context again.

With a ``pricing`` (:class:`~codeaccel.decoding.draft_length.DraftPricing`) the drafter stops early
once the product of its confidences (each position's largest draft probability: its
estimate that the target accepts everything drafted so far) no longer pays for the
next token. The stop depends only on the distributions, never on a sampled token, so
rejection sampling stays exact. With pricing the drafter also records its own
speed (seconds per drafted token) into the pricing's shared learned costs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from codeaccel.decoding.costs import Costs
from codeaccel.decoding.draft_length import DraftPricing
from codeaccel.decoding.drafter import Draft, StepTiming
from codeaccel.decoding.sampling import SamplingParams, logits_to_probs, sample
from codeaccel.decoding.stats import DrafterStats
from codeaccel.decoding.verification import Verdict
from codeaccel.engines.base import Engine


class DraftModelDrafter:
    """Proposes up to k tokens by decoding the draft model autoregressively (sampling like the target).

    pricing: stop early by confidence (see the module docstring); None drafts all k.
    The engine holds one sequence: one request at a time drafts with it.
    """

    name = "draft-model"

    def __init__(self, engine: Engine, pricing: DraftPricing | None = None):
        self.engine = engine
        self.pricing = pricing

    def start(
        self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset(), prediction: Sequence[int] = ()
    ) -> DraftModelSession:
        session = DraftModelSession(self.engine, self.pricing)
        if self.pricing is not None and not self.pricing.can_pay(self.pricing.costs.snapshot()):
            return session  # drafting cannot pay even at full acceptance: skip the draft's prefill (propose catches up)
        self.engine.prefill(prompt)
        return session

    def close(self) -> None:
        pass  # the engine belongs to whoever loaded it (an EnginePool)


class DraftModelSession:
    """One request's drafting with the draft model: its confidence stops."""

    def __init__(self, engine: Engine, pricing: DraftPricing | None):
        self.engine = engine
        self.pricing = pricing
        self.confidence_stops = 0  # drafts ended early by confidence

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        k = min(k, self.engine.n_ctx - len(context))  # the draft's own context may be the tighter one
        if k < 1:
            return Draft(tokens=[])
        costs = self.pricing.costs.snapshot() if self.pricing is not None else None  # one reading per draft
        t_catch_up = time.perf_counter()
        logits = self.engine.prefill(context)  # [vocab]; evaluates only tokens new since the last call
        catch_up_s = time.perf_counter() - t_catch_up
        tokens: list[int] = []
        probs: list[np.ndarray] = []  # rows of [vocab], sampling only
        survival = 1.0  # the draft's estimate that the target accepts every token so far
        for i in range(k):
            if i > 0:  # the last draft token is evaluated next time, if the target accepts it
                if self._stop(costs, i, survival, draft_step=True):  # even a sure next token would not pay
                    break
                logits = self.engine.eval([tokens[-1]])[-1]
            # confidence: the draft distribution's largest probability (greedy: of the raw logits).
            # It is read before sampling: whether position i is drafted must not depend on the
            # token drawn there, or the drafted token would not be a sample of q and rejection
            # sampling would be biased.
            if params.greedy:
                token = int(np.argmax(logits))
                confidence = 1.0 / float(np.exp(logits - logits[token]).sum()) if self.pricing is not None else 1.0
            else:
                q = logits_to_probs(logits, params)  # [vocab]
                confidence = float(q.max())
            survival *= confidence
            if self._stop(costs, i, survival, draft_step=False):
                break
            if not params.greedy:
                token = sample(q, rng)
                probs.append(q)
            tokens.append(token)
        return Draft(tokens=tokens, probs=np.stack(probs) if probs else None, source="model", catch_up_s=catch_up_s)

    def _stop(self, costs: Costs | None, i: int, survival: float, draft_step: bool) -> bool:
        if self.pricing is None or survival >= self.pricing.min_survival(costs, i, draft_step):
            return False
        self.confidence_stops += 1
        return True

    def observe(self, context: Sequence[int], draft: Draft, verdict: Verdict, timing: StepTiming) -> None:
        # the next prefill(context) re-syncs the cache; k adapts in the loop's DraftLengthState
        if self.pricing is not None:  # the drafting itself: a prompt caught up after a skipped prefill is not it
            self.pricing.costs.record_draft(len(draft.tokens), max(0.0, timing.draft_s - draft.catch_up_s))

    def stats(self) -> DrafterStats:
        return DrafterStats(confidence_stops=self.confidence_stops if self.pricing is not None else None)
