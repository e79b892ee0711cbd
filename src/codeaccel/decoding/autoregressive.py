"""Autoregressive decoding: the baseline every other method must match.

One model evaluation per generated token: prefill the prompt, then repeat
pick-a-token → evaluate it, until the :class:`StopChecker` says the generation is over.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from codeaccel.decoding.generation import Generation, StopChecker, validate_request
from codeaccel.decoding.sampling import SamplingParams, next_token
from codeaccel.decoding.stats import DecodingStats
from codeaccel.engines.base import Engine


def generate(
    engine: Engine,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop: Sequence[str] = (),
) -> Generation:
    max_tokens = validate_request(engine, prompt_tokens, max_tokens)
    rng = params.rng()
    checker = StopChecker(engine, stop, max_tokens)
    t0 = time.perf_counter()
    logits = engine.prefill(prompt_tokens)  # [vocab]
    t1 = time.perf_counter()
    while True:
        token = next_token(logits, params, rng)
        if checker.push(token):
            break
        logits = engine.eval([token])[-1]
    t2 = time.perf_counter()
    return Generation(
        text=checker.text,
        tokens=checker.tokens,
        finish_reason=checker.finish_reason,
        stop_string=checker.stop_string,
        n_prompt_tokens=len(prompt_tokens),
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        stats=DecodingStats(steps=len(checker.tokens) - 1, target_s=t2 - t1),
    )
