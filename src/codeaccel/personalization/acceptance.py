"""How well a draft model predicts a target: mean accepted length, from one evaluation per example.

For greedy speculative decoding the draft's proposals are its argmax given the committed text,
and the committed text is the target's own greedy continuation T. So with T known (held-out
examples: a prompt and the target's continuation), one evaluation of the draft over prompt + T
gives, at every position, whether the draft's argmax equals T's token, and replaying drafts of
k tokens over those matches gives exactly what speculative decoding would commit: each
verification commits the matched prefix (at most k) and one token of the target's. That is the
validation metric of a tuned draft (promoted only if it beats the live one) and the benchmark's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codeaccel.engines.base import Engine
from codeaccel.errors import UserError


@dataclass(frozen=True)
class Continuation:
    """A held-out example: the prompt and what the target generates after it (greedy)."""

    prompt_tokens: tuple[int, ...]
    target_tokens: tuple[int, ...]


@dataclass
class AcceptanceStats:
    examples: int = 0
    verifications: int = 0  # target calls speculative decoding would make
    committed_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def mean_accepted_len(self) -> float:
        """Tokens committed per verification (accepted draft tokens + the target's own)."""
        return self.committed_tokens / self.verifications if self.verifications else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def to_record(self) -> dict:
        return {"examples": self.examples, "verifications": self.verifications,
                "committed_tokens": self.committed_tokens, "drafted_tokens": self.drafted_tokens,
                "accepted_tokens": self.accepted_tokens, "mean_accepted_len": round(self.mean_accepted_len, 4),
                "acceptance_rate": round(self.acceptance_rate, 4)}  # fmt: skip


def draft_matches(draft: Engine, example: Continuation) -> list[bool]:
    """Whether the draft's argmax after each prefix of the target's continuation is its next token."""
    prompt, target = list(example.prompt_tokens), list(example.target_tokens)
    if not prompt or not target:
        raise UserError("a held-out example needs a prompt and a continuation")
    room = draft.n_ctx - len(target)
    if room < 1:
        raise UserError(f"a continuation of {len(target)} tokens does not fit the draft's {draft.n_ctx}")
    prompt = prompt[-room:]
    draft.reset()
    first = draft.prefill(prompt)  # [vocab]: predicts target[0] (the prompt's rows are not kept)
    rows = [first[None, :]] + ([draft.eval(target[:-1])] if len(target) > 1 else [])  # row j predicts target[j]
    predicted = np.concatenate(rows).argmax(axis=-1)
    draft.reset()
    return [int(p) == t for p, t in zip(predicted, target)]


def replay(matches: Sequence[bool], k: int, stats: AcceptanceStats | None = None) -> AcceptanceStats:
    """Greedy speculative decoding with k-token drafts over one example's matches."""
    if k < 1:
        raise UserError(f"drafts need at least one token, got k={k}")
    stats = stats or AcceptanceStats()
    n, j = len(matches), 0
    stats.examples += 1
    while j < n:
        drafted = min(k, n - j)
        m = 0
        while m < drafted and matches[j + m]:
            m += 1
        stats.verifications += 1
        stats.drafted_tokens += drafted
        stats.accepted_tokens += m
        stats.committed_tokens += min(m + 1, n - j)
        j += m + 1
    return stats


def measure_acceptance(draft: Engine, examples: Sequence[Continuation], k: int = 4) -> AcceptanceStats:
    """Mean accepted length (and acceptance rate) of ``draft`` against the targets' continuations."""
    return measure_acceptance_by_k(draft, examples, (k,))[k]


def measure_acceptance_by_k(draft: Engine, examples: Sequence[Continuation],
                            ks: Sequence[int]) -> dict[int, AcceptanceStats]:  # fmt: skip
    """The same for several draft lengths: one evaluation per example, a replay per k."""
    stats = {k: AcceptanceStats() for k in ks}
    for example in examples:
        matches = draft_matches(draft, example)
        for k in ks:
            replay(matches, k, stats[k])
    return stats
