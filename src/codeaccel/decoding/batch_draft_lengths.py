"""Draft lengths for a whole batch at once: fill the batch with drafts when it is short, with requests when it is full.

A batched decode step evaluates every active request's pending token plus its draft;
on a CPU its cost grows with the tokens evaluated together, C(n) decode steps for n
tokens (the engine's cost curve: flat up to a tile, then rising). Request i with a
draft of k_i tokens, each accepted with probability α_i given the ones before it,
commits in expectation

    E_i(k_i) = 1 + α_i + α_i² + … + α_i^k_i   tokens,

so a step's expected throughput, in tokens per decode step, is

    T(k_1..k_n) = Σ_i E_i(k_i) / C(base + Σ_i k_i),   base = tokens evaluated anyway.

:func:`choose_draft_lengths` maximises T exactly: the j-th draft token of request i adds
α_i^j to the numerator whichever other tokens are taken, and those gains decrease in j,
so for every total D the best allocation takes the D largest gains; scanning D picks the
best total. One request on a flat curve drafts long; sixteen requests on a rising curve
draft little or nothing, because every extra token then delays all of them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence


def choose_draft_lengths(
    alphas: Sequence[float], caps: Sequence[int], base_tokens: int, cost: Callable[[int], float]
) -> list[int]:
    """k_i in 0..caps[i] per request maximising Σ E_i(k_i) / cost(base_tokens + Σ k_i).

    alphas: [n] per-token acceptance estimates in [0, 1); caps: [n] longest draft each
    request offers (what its drafter proposed, capped by its room); base_tokens: tokens the
    step evaluates without any draft (>= 1 if any request needs an evaluation);
    cost(m): decode steps to evaluate m tokens (m >= 1) in one batch.
    """
    if len(alphas) != len(caps):
        raise ValueError(f"{len(alphas)} acceptance estimates for {len(caps)} requests")
    n = len(alphas)
    lengths = [0] * n
    if n == 0 or not any(caps):
        return lengths
    # gains in decreasing order: a heap of each request's next draft token's gain α_i^(k_i + 1)
    heap = [(-a, i) for i, (a, c) in enumerate(zip(alphas, caps)) if c > 0 and a > 0]
    heapq.heapify(heap)
    expected = float(n)
    best_value = expected / cost(max(base_tokens, 1))
    best_total, total = 0, 0
    taken: list[int] = []
    while heap:
        gain, i = heapq.heappop(heap)
        expected -= gain
        total += 1
        taken.append(i)
        lengths[i] += 1
        value = expected / cost(base_tokens + total)
        if value > best_value:
            best_value, best_total = value, total
        if lengths[i] < caps[i]:
            heapq.heappush(heap, (gain * alphas[i], i))
    chosen = [0] * n
    for i in taken[:best_total]:
        chosen[i] += 1
    return chosen


def acceptance_estimate(accepted: int, drafted: int, prior_accepted: float, prior_drafted: float) -> float:
    """A request's per-token acceptance: its own counts over a prior (the drafter's recent average)."""
    if drafted + prior_drafted <= 0:
        return 0.0
    return min(max((accepted + prior_accepted) / (drafted + prior_drafted), 0.0), 0.99)
