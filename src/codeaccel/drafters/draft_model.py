"""A small model as the drafter (the SpeCoder / Leviathan setting).

The draft engine keeps its own KV cache in step with the accepted text: each
``propose`` calls ``engine.prefill(context)``, which keeps the longest cached prefix
(the context it saw last time plus the draft tokens the target accepted) and
evaluates only what is new: usually the one recovered or bonus token, never the
whole context again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    """Proposes k tokens by decoding the draft model autoregressively (sampling like the target)."""

    name = "draft-model"

    def __init__(self, engine: Engine):
        self.engine = engine

    def prepare(self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset()) -> None:
        self.engine.prefill(prompt)

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft:
        k = min(k, self.engine.n_ctx - len(context))  # the draft's own context may be the tighter one
        if k < 1:
            return Draft(tokens=[])
        logits = self.engine.prefill(context)  # [vocab]; evaluates only tokens new since the last call
        tokens: list[int] = []
        probs: list[np.ndarray] = []  # k rows of [vocab], sampling only
        for i in range(k):
            if params.greedy:
                token = int(np.argmax(logits))
            else:
                q = logits_to_probs(logits, params)  # [vocab]
                token = sample(q, rng)
                probs.append(q)
            tokens.append(token)
            if i < k - 1:  # the last draft token is evaluated next time, if the target accepts it
                logits = self.engine.eval([token])[-1]
        return Draft(tokens=tokens, probs=np.stack(probs) if probs else None, source="model")

    def observe(self, context: Sequence[int], draft: Draft, n_accepted: int, committed: Sequence[int]) -> None:
        pass  # the next prefill(context) re-syncs the cache; k adapts in DraftLength

    def request_stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass  # the engine belongs to whoever loaded it (an EnginePool)
