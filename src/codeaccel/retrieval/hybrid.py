"""Hybrid drafting: retrieval first, the draft model when retrieval has nothing worth verifying.

Retrieval is nearly free; the draft model costs k of its own decode steps. So each
step asks the retrieval drafter first (with its timing control and cache); only if
it proposes nothing does the draft model run, with its own cost-curve draft length
(:class:`DraftLength`, which may also say 0: decode plainly), priced with the costs
the decode loop learns from every verification (the same shared
:class:`~codeaccel.decoding.costs.LearnedCosts`), and its own acceptance estimate
for model drafts, per request. Both kinds of draft
are verified losslessly (sample-and-compare for retrieval, rejection sampling for
the model's), so the mix changes speed only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.draft_length import DraftLength, DraftLengthState
from codeaccel.decoding.draft_model import DraftModelDrafter, DraftModelSession
from codeaccel.decoding.drafter import Draft, StepTiming
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.stats import DrafterStats
from codeaccel.decoding.verification import Verdict
from codeaccel.retrieval.drafter import RetrievalDrafter, RetrievalSession


class HybridDrafter:
    name = "hybrid"

    def __init__(
        self, retrieval: RetrievalDrafter, model: DraftModelDrafter, model_length: DraftLength, costs: LearnedCosts
    ):
        self.retrieval = retrieval
        self.model = model
        self.model_length = model_length  # the draft model's policy
        self.costs = costs  # shared with the decode loop, which records every verification in it

    def start(
        self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset(), prediction: Sequence[int] = ()
    ) -> HybridSession:
        return HybridSession(
            self.retrieval.start(prompt, exclude_files, prediction),
            self.model.start(prompt),
            self.model_length.start(self.costs),
        )

    def close(self) -> None:
        self.retrieval.close()
        self.model.close()


class HybridSession:
    """One request: retrieval's session, the draft model's, and the model's draft-length state."""

    def __init__(self, retrieval: RetrievalSession, model: DraftModelSession, model_length: DraftLengthState):
        self.retrieval = retrieval
        self.model = model
        self.model_length = model_length
        self.sources: Counter = Counter()  # steps by the source of their draft ("none": no draft)

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        draft = self.retrieval.propose(context, k, params, rng)
        if not draft.tokens:
            k_model = min(k, self.model_length.choose(k))
            if k_model > 0:  # the model's draft keeps the lookup that found nothing, for retrieval's timing
                draft = replace(self.model.propose(context, k_model, params, rng), lookup=draft.lookup)
        self.sources[draft.source if draft.tokens else "none"] += 1
        return draft

    def observe(self, context: Sequence[int], draft: Draft, verdict: Verdict, timing: StepTiming) -> None:
        model_draft = draft.source == "model"
        self.retrieval.observe(context, Draft([], lookup=draft.lookup) if model_draft else draft, verdict, timing)
        if model_draft:
            self.model_length.record(len(draft.tokens), verdict.n_accepted)
            self.model.observe(context, draft, verdict, timing)
        else:  # a step without a model draft: the model's α decays toward its prior (a fresh trial later)
            self.model_length.record(0, 0)

    def stats(self) -> DrafterStats:
        return DrafterStats(
            confidence_stops=self.model.stats().confidence_stops,
            retrieval=self.retrieval.stats().retrieval,
            draft_sources=dict(self.sources),
        )
