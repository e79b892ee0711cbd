"""A small model as the drafter (the SpeCoder / Leviathan setting).

The draft engine keeps its own KV cache in step with the accepted text: each
``propose`` calls ``engine.prefill(context)``, which keeps the longest cached prefix
(the context it saw last time plus the draft tokens the target accepted) and
evaluates only what is new: usually the one recovered or bonus token, never the
whole context again.

With a ``pricing`` policy (:meth:`DraftLength.min_survival`) the drafter stops early
once the product of its confidences (each position's largest draft probability: its
estimate that the target accepts everything drafted so far) no longer pays for the
next token. The stop depends only on the distributions, never on a sampled token, so
rejection sampling stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from codeaccel.draft_length import DraftLength
from codeaccel.drafters.base import Draft
from codeaccel.engines.base import Engine
from codeaccel.errors import CodeaccelError
from codeaccel.sampling import SamplingParams, logits_to_probs, sample

# Text both tokenizers must split identically for a draft/target pair to share ids.
_PROBE = 'def f(x: int) -> list[str]:\n    """Doc."""\n    return [str(i) for i in range(x)]  # ü ✓\n'


def check_same_vocabulary(draft: Engine, target: Engine) -> None:
    """Refuse a draft whose token ids mean something else to the target."""
    if draft.n_vocab != target.n_vocab:
        raise CodeaccelError(
            f"draft model {draft.model_name} has a vocabulary of {draft.n_vocab} tokens, the target "
            f"{target.model_name} {target.n_vocab}: speculative decoding needs the same tokenizer"
        )
    if draft.tokenize(_PROBE) != target.tokenize(_PROBE):
        raise CodeaccelError(
            f"draft model {draft.model_name} and target {target.model_name} tokenize text differently: "
            "speculative decoding needs the same tokenizer"
        )


class DraftModelDrafter:
    """Proposes up to k tokens by decoding the draft model autoregressively (sampling like the target).

    pricing: stop early by confidence (see the module docstring); None drafts all k.
    """

    name = "draft-model"

    def __init__(self, engine: Engine, pricing: DraftLength | None = None):
        self.engine = engine
        self.pricing = pricing
        self._stops = 0  # drafts ended early by confidence, this request

    def prepare(self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset()) -> None:
        self._stops = 0
        if self.pricing is not None and self.pricing.best_k(alpha=1.0) == 0:
            return  # drafting cannot pay even at full acceptance: skip the draft's prefill (propose catches up)
        self.engine.prefill(prompt)

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        k = min(k, self.engine.n_ctx - len(context))  # the draft's own context may be the tighter one
        if k < 1:
            return Draft(tokens=[])
        logits = self.engine.prefill(context)  # [vocab]; evaluates only tokens new since the last call
        tokens: list[int] = []
        probs: list[np.ndarray] = []  # rows of [vocab], sampling only
        survival = 1.0  # the draft's estimate that the target accepts every token so far
        for i in range(k):
            if i > 0:  # the last draft token is evaluated next time, if the target accepts it
                if self._stop(i, survival, draft_step=True):  # even a sure next token would not pay
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
            if self._stop(i, survival, draft_step=False):
                break
            if not params.greedy:
                token = sample(q, rng)
                probs.append(q)
            tokens.append(token)
        return Draft(tokens=tokens, probs=np.stack(probs) if probs else None, source="model")

    def _stop(self, i: int, survival: float, draft_step: bool) -> bool:
        if self.pricing is None or survival >= self.pricing.min_survival(i, draft_step):
            return False
        self._stops += 1
        return True

    def observe(self, context: Sequence[int], draft: Draft, n_accepted: int, committed: Sequence[int]) -> None:
        pass  # the next prefill(context) re-syncs the cache; k adapts in DraftLength

    def request_stats(self) -> dict:
        return {"confidence_stops": self._stops} if self.pricing is not None else {}

    def close(self) -> None:
        pass  # the engine belongs to whoever loaded it (an EnginePool)
