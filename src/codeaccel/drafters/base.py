"""The drafter contract: propose k tokens that the target model will verify.

A drafter returns a :class:`Draft`: token ids and, when it has them, the
distributions they were sampled from; or a token tree (several branches, verified
in one target evaluation). Drafts with probabilities are verified by
rejection sampling; drafts without (retrieval, n-gram lookup) by sample-and-compare.
Both are lossless (see :mod:`codeaccel.verification`), so a drafter only affects speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from codeaccel.sampling import SamplingParams


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # [k] proposed continuation of the context
    probs: np.ndarray | None = None  # [k, vocab] warped draft distribution each token was sampled from
    source: str = ""  # where the tokens came from ("model", "retrieval", "cache"), for the request log
    parents: list[int] | None = None  # a token tree: node i continues node parents[i] (-1: the context)

    def __post_init__(self) -> None:
        if self.probs is not None and self.probs.shape[0] != len(self.tokens):
            raise ValueError(f"draft probs {self.probs.shape} do not match {len(self.tokens)} tokens")
        if self.parents is not None and (self.probs is not None or len(self.parents) != len(self.tokens)):
            raise ValueError("a tree draft has one parent per token and no probabilities")


class Drafter(Protocol):
    """Anything that proposes continuations.

    ``prepare(prompt, exclude_files)`` is called once per request, during the prefill (a
    draft model fills its own cache there; a retrieval drafter notes datastore files
    this request must not use); ``propose(context, k, params, rng)`` returns at most k
    tokens continuing ``context`` (the prompt plus everything committed so far),
    sampled with ``params`` where the drafter samples at all; ``observe(context, draft,
    n_accepted, committed)`` reports what the target kept of that draft and the tokens it
    committed (the hook where a drafter adapts, as transformers' candidate generators
    do); ``request_stats()`` returns the drafter's own counters for the current request;
    ``close()`` frees it.
    """

    name: str

    def prepare(self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset()) -> None: ...

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft: ...

    def observe(self, context: Sequence[int], draft: Draft, n_accepted: int, committed: Sequence[int]) -> None: ...

    def request_stats(self) -> dict: ...

    def close(self) -> None: ...
