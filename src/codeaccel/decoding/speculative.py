"""Speculative decoding: a drafter proposes, the target verifies k tokens in one evaluation.

The loop (one screen, four named steps, like gpt-fast's ``speculative_decode``):

1. **propose**: choose k from the cost curve (:mod:`codeaccel.decoding.draft_length`); the
   drafter proposes up to k tokens continuing the committed text.
2. **verify**: the target evaluates the last committed token plus the draft in one
   call, giving ``target_logits  # [k+1, vocab]``.
3. **accept**: a lossless rule (:mod:`codeaccel.decoding.verification`) keeps a prefix of the
   draft and adds one recovered or bonus token.
4. **commit / rewind**: the kept tokens go through the :class:`StopChecker` one by one
   (so EOS, stop strings and max tokens end generation exactly where autoregressive
   decoding would), and the target's cache is rewound past the rejected drafts.

With k = 0 a step is exactly one autoregressive step. Output: greedy, the same
tokens as autoregressive decoding; sampling, the same distribution.

Per request the loop creates the state it learns in (the drafter's session, the
draft-length state with its acceptance estimate, the stats) and passes it on; what
it shares with other requests is named in its arguments: the drafter and the
:class:`~codeaccel.decoding.costs.LearnedCosts` (shared, thread-safe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.draft_length import DraftLength
from codeaccel.decoding.drafter import Draft, Drafter, StepTiming
from codeaccel.decoding.generation import Generation, StopChecker, validate_request
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.stats import CostModelReading, DecodingStats, SpecStats
from codeaccel.decoding.verification import Verdict, verify
from codeaccel.engines.base import Engine

log = logging.getLogger(__name__)


def speculative_generate(
    target: Engine,
    drafter: Drafter,
    draft_length: DraftLength,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop: Sequence[str] = (),
    exclude_files: Sequence[str] = (),
    costs: LearnedCosts | None = None,
    prediction: Sequence[int] = (),
) -> Generation:
    """One request. ``costs``: the learned costs shared with other requests (None: this request's own);
    ``prediction``: tokens the output is expected to repeat (given to the drafter)."""
    max_tokens = validate_request(target, prompt_tokens, max_tokens)
    costs = costs if costs is not None else LearnedCosts(draft_length.curve)
    rng = params.rng()  # the target's stream: with sample-and-compare it matches autoregressive decoding
    draft_rng = np.random.default_rng(None if params.seed is None else [params.seed, 1])
    checker = StopChecker(target, stop, max_tokens)
    lengths = draft_length.start(costs)  # this request's acceptance estimate
    spec = SpecStats()
    stats = DecodingStats(speculation=spec)
    t0 = time.perf_counter()
    next_logits = target.prefill(prompt_tokens)  # [vocab], predicts the first generated token
    t1 = time.perf_counter()
    session = drafter.start(prompt_tokens, frozenset(exclude_files), prediction)
    spec.draft_prefill_s = time.perf_counter() - t1
    context = list(prompt_tokens)  # everything committed
    pending: list[int] = []  # committed but not yet in the target's cache (the last recovered/bonus token)
    while True:
        # 1. propose
        room = min(max_tokens - len(checker.tokens) - 1, target.n_ctx - target.n_tokens - len(pending) - 1)
        k = lengths.choose(room)
        ts = time.perf_counter()
        draft = session.propose(context, k, params, draft_rng) if k > 0 else Draft(tokens=[])
        draft_s = time.perf_counter() - ts
        # 2. verify: row 0 predicts the draft's first token (its roots), row i+1 what follows token i
        ts = time.perf_counter()
        target_logits = _evaluate(target, pending, draft, next_logits)  # [k+1, vocab]
        target_s = time.perf_counter() - ts
        # 3. accept
        verdict = verify(draft.tokens, draft.probs, target_logits, params, rng, draft.parents)
        n_evaluated = len(pending) + len(draft.tokens)  # 0 on a first step without a draft: no evaluation
        lengths.record(verdict.judged if draft.tokens else 0, verdict.n_accepted)  # a tree: its accepted path
        costs.record_verification(len(draft.tokens), target_s, n_evaluated)
        session.observe(context, draft, verdict, StepTiming(target_s, draft_s, n_evaluated))
        spec.record(len(draft.tokens), verdict.n_accepted, judged=verdict.judged if draft.tokens else 0)
        stats.steps += 1
        stats.target_s += target_s
        spec.draft_s += draft_s
        # 4. commit, then rewind the target past the rejected draft tokens
        if any(checker.push(t) for t in verdict.tokens):
            break
        _keep_accepted(target, pending, draft, verdict)
        context += verdict.tokens
        pending = verdict.tokens[-1:]
    t2 = time.perf_counter()
    now = costs.snapshot()
    stats.drafter = session.stats()
    stats.cost_model = CostModelReading(1000 * now.t_target_s, now.batch_scale, lengths.alpha)
    log.debug("speculative request: %d tokens, %s", len(checker.tokens), stats)
    return Generation(
        text=checker.text,
        tokens=checker.tokens,
        finish_reason=checker.finish_reason,
        stop_string=checker.stop_string,
        n_prompt_tokens=len(prompt_tokens),
        prefill_s=t1 - t0 + spec.draft_prefill_s,
        decode_s=t2 - t1 - spec.draft_prefill_s,
        stats=stats,
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


def _keep_accepted(target: Engine, pending: list[int], draft: Draft, verdict: Verdict) -> None:
    """Leave the committed text minus the new pending token in the target's cache."""
    if draft.parents is not None and draft.tokens:
        shift = len(pending)
        target.keep_path(list(range(shift)) + [node + shift for node in verdict.path])
    else:
        target.rewind(target.n_tokens - (len(draft.tokens) - verdict.n_accepted))
