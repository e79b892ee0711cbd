"""Speculative decoding: a drafter proposes, the target verifies k tokens in one evaluation.

The loop (one screen, four named steps, like gpt-fast's ``speculative_decode``):

1. **propose**: choose k from the cost curve (:mod:`codeaccel.draft_length`); the
   drafter proposes up to k tokens continuing the committed text.
2. **verify**: the target evaluates the last committed token plus the draft in one
   call, giving ``target_logits  # [k+1, vocab]``.
3. **accept**: a lossless rule (:mod:`codeaccel.verification`) keeps a prefix of the
   draft and adds one recovered or bonus token.
4. **commit / rewind**: the kept tokens go through the :class:`StopChecker` one by one
   (so EOS, stop strings and max tokens end generation exactly where autoregressive
   decoding would), and the target's cache is rewound past the rejected drafts.

With k = 0 a step is exactly one autoregressive step. Output: greedy, the same
tokens as autoregressive decoding; sampling, the same distribution.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from codeaccel.draft_length import DraftLength
from codeaccel.drafters.base import Draft, Drafter
from codeaccel.engines.base import Engine
from codeaccel.generation import Generation, Request, StopChecker, validate_request
from codeaccel.sampling import SamplingParams
from codeaccel.verification import verify

log = logging.getLogger(__name__)


@dataclass
class SpecStats:
    """Per-request log: what was drafted, what was accepted, what it cost."""

    steps: int = 0  # target evaluations after the prefill
    drafts: int = 0  # steps that verified a non-empty draft
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_at: list[int] = field(default_factory=list)  # [position] drafts whose token at position was accepted
    proposed_at: list[int] = field(default_factory=list)  # [position] drafts that had a token at position
    chosen_k: Counter = field(default_factory=Counter)  # k -> steps
    target_s: float = 0.0  # seconds in target evaluations (decode only)
    draft_s: float = 0.0  # seconds in the drafter (decode only)
    draft_prefill_s: float = 0.0

    def record(self, draft_len: int, n_accepted: int) -> None:
        self.steps += 1
        self.chosen_k[draft_len] += 1
        if draft_len == 0:
            return
        self.drafts += 1
        self.drafted_tokens += draft_len
        self.accepted_tokens += n_accepted
        for arr, n in ((self.proposed_at, draft_len), (self.accepted_at, n_accepted)):
            arr.extend([0] * (n - len(arr)))
            for i in range(n):
                arr[i] += 1

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "drafts": self.drafts,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            # tokens committed per verified draft (accepted + the recovered/bonus token)
            "mean_accepted_len": round(1 + self.accepted_tokens / self.drafts, 4) if self.drafts else None,
            "acceptance_rate": round(self.accepted_tokens / self.drafted_tokens, 4) if self.drafted_tokens else None,
            "accepted_at": self.accepted_at,
            "proposed_at": self.proposed_at,
            "chosen_k": {str(k): n for k, n in sorted(self.chosen_k.items())},
            "target_s": round(self.target_s, 6),
            "draft_s": round(self.draft_s, 6),
            "draft_prefill_s": round(self.draft_prefill_s, 6),
        }


def speculative_generate(
    target: Engine,
    drafter: Drafter,
    draft_length: DraftLength,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop: Sequence[str] = (),
    exclude_files: Sequence[str] = (),
) -> Generation:
    max_tokens = validate_request(target, prompt_tokens, max_tokens)
    rng = params.rng()  # the target's stream: with sample-and-compare it matches autoregressive decoding
    draft_rng = np.random.default_rng(None if params.seed is None else [params.seed, 1])
    checker = StopChecker(target, stop, max_tokens)
    stats = SpecStats()
    t0 = time.perf_counter()
    next_logits = target.prefill(prompt_tokens)  # [vocab], predicts the first generated token
    t1 = time.perf_counter()
    drafter.prepare(prompt_tokens, frozenset(exclude_files))
    stats.draft_prefill_s = time.perf_counter() - t1
    context = list(prompt_tokens)  # everything committed
    pending: list[int] = []  # committed but not yet in the target's cache (the last recovered/bonus token)
    while True:
        # 1. propose
        room = min(max_tokens - len(checker.tokens) - 1, target.n_ctx - target.n_tokens - len(pending) - 1)
        k = draft_length.choose(room)
        ts = time.perf_counter()
        draft = drafter.propose(context, k, params, draft_rng) if k > 0 else Draft(tokens=[])
        draft_s = time.perf_counter() - ts
        # 2. verify: row 0 predicts the draft's first token (its roots), row i+1 what follows token i
        ts = time.perf_counter()
        target_logits = _evaluate(target, pending, draft, next_logits)  # [k+1, vocab]
        target_s = time.perf_counter() - ts
        # 3. accept
        verdict = verify(draft.tokens, draft.probs, target_logits, params, rng, draft.parents)
        n_evaluated = len(pending) + len(draft.tokens)  # 0 on a first step without a draft: no evaluation
        draft_length.update(len(draft.tokens), verdict.n_accepted, target_s, draft_s, n_evaluated)
        drafter.observe(context, draft, verdict.n_accepted, verdict.tokens)
        stats.record(len(draft.tokens), verdict.n_accepted)
        stats.target_s += target_s
        stats.draft_s += draft_s
        # 4. commit, then rewind the target past the rejected draft tokens
        if any(checker.push(t) for t in verdict.tokens):
            break
        _keep_accepted(target, pending, draft, verdict)
        context += verdict.tokens
        pending = verdict.tokens[-1:]
    t2 = time.perf_counter()
    cost_model = {
        "t_target_ms": round(1000 * draft_length.t_target_s, 3),
        "batch_scale": round(draft_length.batch_scale, 3),
    }
    request_stats = {**stats.as_dict(), **drafter.request_stats(), "cost_model": cost_model}
    log.debug("speculative request: %d tokens, %s", len(checker.tokens), request_stats)
    return Generation(
        text=checker.text,
        tokens=checker.tokens,
        finish_reason=checker.finish_reason,
        n_prompt_tokens=len(prompt_tokens),
        prefill_s=t1 - t0 + stats.draft_prefill_s,
        decode_s=t2 - t1 - stats.draft_prefill_s,
        stats=request_stats,
    )


def _evaluate(target: Engine, pending: list[int], draft: Draft, next_logits: np.ndarray) -> np.ndarray:
    """Target logits for a draft (chain or tree) after the pending token: [len(draft) + 1, vocab]."""
    if draft.parents is not None and draft.tokens:
        if pending:  # the pending token is the tree's root
            parents = [-1] + [p + 1 if p >= 0 else 0 for p in draft.parents]
            return target.eval_tree(pending + draft.tokens, parents)
        return np.vstack([next_logits[None, :], target.eval_tree(draft.tokens, draft.parents)])
    if pending:
        return target.eval(pending + draft.tokens)
    # first step: the prefill already gave the row for the draft's first token
    rest = target.eval(draft.tokens) if draft.tokens else np.empty((0, target.n_vocab), np.float32)
    return np.vstack([next_logits[None, :], rest])


def _keep_accepted(target: Engine, pending: list[int], draft: Draft, verdict) -> None:
    """Leave the committed text minus the new pending token in the target's cache."""
    if draft.parents is not None and draft.tokens:
        shift = len(pending)
        target.keep_path(list(range(shift)) + [node + shift for node in verdict.path])
    else:
        target.rewind(target.n_tokens - (len(draft.tokens) - verdict.n_accepted))


class SpeculativeMethod:
    """A benchmark/serving method: target engine + drafter + draft-length policy."""

    def __init__(
        self, name: str, target: Engine, drafter: Drafter, draft_length: DraftLength, settings: dict | None = None
    ):
        from codeaccel.methods import variant_label

        self.name = name
        self.target = target
        self.drafter = drafter
        self.draft_length = draft_length
        self.settings = settings or {}
        self.variant = variant_label(self.settings)

    def generate(self, request: Request) -> Generation:
        r = request
        return speculative_generate(
            self.target,
            self.drafter,
            self.draft_length,
            r.prompt_tokens,
            r.params,
            r.max_tokens,
            r.stop,
            r.exclude_files,
        )

    def close(self) -> None:
        self.drafter.close()
