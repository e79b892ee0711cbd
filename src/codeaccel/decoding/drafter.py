"""The drafter contract: propose tokens that the target model will verify.

A drafter returns a :class:`Draft`: token ids and, when it has them, the
distributions they were sampled from; or a token tree (several branches, verified
in one target evaluation). Drafts with probabilities are verified by
rejection sampling; drafts without (retrieval, n-gram lookup) by sample-and-compare.
Both are lossless (see :mod:`codeaccel.decoding.verification`), so a drafter only affects speed.

A :class:`Drafter` is shared by every request of a method; what one request learns
lives in the :class:`DraftSession` that ``start`` returns for it, so two requests
never share mutable state without a named, thread-safe object in between (an
:class:`~codeaccel.retrieval.acceptance_cache.AcceptanceCache`, the
:class:`~codeaccel.decoding.costs.LearnedCosts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.stats import DrafterStats
from codeaccel.decoding.verification import Verdict

DraftSource = Literal["", "model", "retrieval", "cache"]


@dataclass(frozen=True)
class Lookup:
    """What a retrieval draft was built from (read back by the drafter's ``observe``)."""

    searched: bool  # the datastores were searched this step (False: skipped by timing control, or none)
    match_len: int = 0  # context tokens the longest match covered (0: nothing matched)
    kinds: tuple[str, ...] = ()  # kinds of the sources that matched ("general", "repository", "context", ...)
    local: bool = False  # the longest match was in the request's own text (its context or prediction)


@dataclass(frozen=True)
class Draft:
    tokens: list[int]  # [k] proposed continuation of the context
    probs: np.ndarray | None = None  # [k, vocab] warped draft distribution each token was sampled from
    source: DraftSource = ""  # where the tokens came from, for the request log
    parents: list[int] | None = None  # a token tree: node i continues node parents[i] (-1: the context)
    lookup: Lookup | None = None  # retrieval drafts: what the datastores gave
    acceptance: float | None = None  # the drafter's estimate of each token's acceptance, in [0, 1) (None: none)
    # seconds of ``propose`` spent bringing the drafter's own cache up to the context (its prompt after a skipped
    # prefill, tokens committed since): not the price of drafting these tokens
    catch_up_s: float = 0.0

    def __post_init__(self) -> None:
        if self.probs is not None and self.probs.shape[0] != len(self.tokens):
            raise ValueError(f"draft probs {self.probs.shape} do not match {len(self.tokens)} tokens")
        if self.parents is not None and (self.probs is not None or len(self.parents) != len(self.tokens)):
            raise ValueError("a tree draft has one parent per token and no probabilities")
        if self.acceptance is not None and not 0.0 <= self.acceptance < 1.0:
            raise ValueError(f"a draft's acceptance estimate must be in [0, 1), got {self.acceptance}")


@dataclass(frozen=True)
class StepTiming:
    """What one step of the decode loop cost, as the loop measured it."""

    target_s: float  # seconds of the target's evaluation
    draft_s: float  # seconds in ``propose``
    n_evaluated: int  # tokens the target evaluated


class DraftSession(Protocol):
    """One request's drafting: created by ``Drafter.start``, used by one decode loop.

    ``propose(context, k, params, rng)`` returns at most k tokens continuing ``context``
    (the prompt plus everything committed so far), sampled with ``params`` where the
    drafter samples at all; ``observe(context, draft, verdict, timing)`` reports what
    the target kept of that draft (``verdict.tokens`` were committed) and what the
    step cost (the hook where a drafter adapts, as transformers' candidate generators
    do); ``stats()`` returns this request's counters.
    """

    def propose(self, context: Sequence[int], k: int, params: SamplingParams, rng: np.random.Generator) -> Draft: ...

    def observe(self, context: Sequence[int], draft: Draft, verdict: Verdict, timing: StepTiming) -> None: ...

    def stats(self) -> DrafterStats: ...


class Drafter(Protocol):
    """Anything that proposes continuations.

    ``start(prompt, exclude_files, prediction)`` is called once per request, during the
    prefill (a draft model fills its own cache there; a retrieval drafter indexes the
    prompt and the request's predicted output, and notes datastore files this request
    must not use) and returns the request's session; ``close()`` frees the drafter.
    """

    name: str

    def start(
        self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset(), prediction: Sequence[int] = ()
    ) -> DraftSession: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchDrafter(Protocol):
    """A drafter that drafts for a whole continuous batch at once (a draft model on its own sequences).

    ``start`` as for a :class:`Drafter`; ``propose_batch(sessions, contexts, lengths)`` returns
    each session's draft of exactly its chosen length (fewer only where the drafter ran out of
    room); ``position_cost(m)`` is what one draft position for m requests costs, in target
    decode steps, so the batch's lengths can weigh it; ``end(session)`` frees a request's state.
    """

    name: str

    def start(
        self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset(), prediction: Sequence[int] = ()
    ) -> DraftSession: ...

    def propose_batch(
        self, sessions: Sequence[DraftSession], contexts: Sequence[Sequence[int]], lengths: Sequence[int]
    ) -> list[Draft]: ...

    def position_cost(self, m: int) -> float: ...

    def end(self, session: DraftSession) -> None: ...

    def close(self) -> None: ...
