"""Hybrid drafting: retrieval first, the draft model when retrieval has nothing worth verifying.

Retrieval is nearly free; the draft model costs k of its own decode steps. So each
step asks the retrieval drafter first (with its timing control and cache); only if
it proposes nothing does the draft model run, with its own cost-curve draft length
(:class:`DraftLength`, which may also say 0: decode plainly). Both kinds of draft
are verified losslessly (sample-and-compare for retrieval, rejection sampling for
the model's), so the mix changes speed only.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from codeaccel.draft_length import DraftLength
from codeaccel.drafters.base import Draft
from codeaccel.drafters.draft_model import DraftModelDrafter
from codeaccel.drafters.retrieval import RetrievalDrafter
from codeaccel.sampling import SamplingParams


class HybridDrafter:
    name = "hybrid"

    def __init__(self, retrieval: RetrievalDrafter, model: DraftModelDrafter, model_length: DraftLength):
        self.retrieval = retrieval
        self.model = model
        self.model_length = model_length
        self._draft_s = 0.0
        self._sources: Counter = Counter()

    def prepare(self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset()) -> None:
        self.retrieval.prepare(prompt, exclude_files)
        self.model.prepare(prompt)
        self._sources = Counter()

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        draft = self.retrieval.propose(context, k, params, rng)
        if not draft.tokens:
            k_model = min(k, self.model_length.choose(k))
            if k_model > 0:
                t0 = time.perf_counter()
                draft = self.model.propose(context, k_model, params, rng)
                self._draft_s = time.perf_counter() - t0
        self._sources[draft.source if draft.tokens else "none"] += 1
        return draft

    def observe(self, context: Sequence[int], draft: Draft, n_accepted: int, committed: Sequence[int]) -> None:
        self.retrieval.observe(context, draft if draft.source != "model" else Draft([]), n_accepted, committed)
        if draft.source == "model":  # target time is not seen here: t_target stays the curve's
            self.model_length.update(len(draft.tokens), n_accepted, 0.0, self._draft_s)

    def request_stats(self) -> dict:
        return {**self.retrieval.request_stats(), "draft_sources": dict(self._sources)}

    def close(self) -> None:
        self.retrieval.close()
        self.model.close()
