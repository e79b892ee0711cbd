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

An engine that pads a batch's rows to the longest (``padded``: the hf engine) evaluates
``base + n·K`` tokens for n requests whose longest draft is K, whatever the others draft:
the step's cost depends on K alone, so K is scanned and, for each, the best drafts capped at K
are taken at that cost (every request then drafts up to K where its gains pay for any draft
cost of its own).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Sequence


def choose_draft_lengths(
    alphas: Sequence[float],
    caps: Sequence[int],
    base_tokens: int,
    cost: Callable[[int], float],
    position_cost: Callable[[int], float] | None = None,
    padded: bool = False,
) -> list[int]:
    """k_i in 0..caps[i] per request maximising Σ E_i(k_i) / step cost.

    alphas: [n] per-token acceptance estimates in [0, 1); caps: [n] longest draft each
    request offers (what its drafter proposed, capped by its room); base_tokens: tokens the
    step evaluates without any draft (>= 1 if any request needs an evaluation);
    cost(m): decode steps to evaluate m tokens (m >= 1) in one batch.

    position_cost(m): when drafting itself costs (a draft model produces position j of every
    draft in one batched evaluation of the m requests drafting that far), that evaluation's
    cost in target decode steps; the step then costs cost(base + Σk) + Σ_j position_cost(m_j).
    The longest draft K is scanned (each K: the best lengths capped at K); exact when the
    draft's cost depends only on K, a close bound otherwise.

    padded: the engine pads every row to the longest draft K (the step costs ``cost(base + n·K)``).
    """
    if len(alphas) != len(caps):
        raise ValueError(f"{len(alphas)} acceptance estimates for {len(caps)} requests")
    if position_cost is None and not padded:
        return _best_by_gains(alphas, caps, base_tokens, cost, None)[0]
    n = len(alphas)
    best, best_value = [0] * n, -1.0
    for depth in range(0, max(caps, default=0) + 1):
        step_cost = cost
        if padded:  # every row evaluated at 1 + depth tokens (no draft at all: the base alone)
            step_cost = (lambda _m, d=depth: cost(base_tokens + n * d)) if depth else (lambda _m: cost(base_tokens))
        capped = [min(c, depth) for c in caps]
        lengths, value = _best_by_gains(alphas, capped, base_tokens, step_cost, position_cost)
        if value > best_value:
            best, best_value = lengths, value
    return best


def _best_by_gains(
    alphas: Sequence[float],
    caps: Sequence[int],
    base_tokens: int,
    cost: Callable[[int], float],
    position_cost: Callable[[int], float] | None,
) -> tuple[list[int], float]:
    """The best total D of the D largest gains (and its value); draft positions priced as they fill."""
    n = len(alphas)
    lengths = [0] * n
    if n == 0:
        return lengths, 0.0
    # gains in decreasing order: a heap of each request's next draft token's gain α_i^(k_i + 1)
    heap = [(-a, i) for i, (a, c) in enumerate(zip(alphas, caps)) if c > 0 and a > 0]
    heapq.heapify(heap)
    expected = float(n)
    best_value = expected / cost(max(base_tokens, 1))
    best_total, total = 0, 0
    drafting = Counter()  # position j -> requests whose drafts reach it
    drafted_s = 0.0  # the draft's cost so far, in target decode steps
    taken: list[int] = []
    while heap:
        gain, i = heapq.heappop(heap)
        expected -= gain
        total += 1
        taken.append(i)
        lengths[i] += 1
        if position_cost is not None:
            j = lengths[i]
            m = drafting[j]
            drafted_s += position_cost(m + 1) - (position_cost(m) if m else 0.0)
            drafting[j] = m + 1
        value = expected / (cost(base_tokens + total) + drafted_s)
        if value > best_value:
            best_value, best_total = value, total
        if lengths[i] < caps[i]:
            heapq.heappush(heap, (gain * alphas[i], i))
    chosen = [0] * n
    for i in taken[:best_total]:
        chosen[i] += 1
    return chosen, best_value


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = 1 + α + … + α^k: tokens a step commits with a k-token draft."""
    return sum(alpha**j for j in range(k + 1))


def acceptance_estimate(accepted: int, tested: int, prior_accepted: float, prior_tested: float) -> float:
    """A request's per-token acceptance α: its own counts over a prior (the drafter's recent average).

    ``tested``: draft tokens the target judged (accepted ones, and each draft's first rejected one:
    :func:`codeaccel.decoding.stats.tested`), the maximum-likelihood α of the geometric model; tokens after
    a rejection were never judged, and counting them would bias α low (0.59 for a true 0.8 at k = 4)."""
    if tested + prior_tested <= 0:
        return 0.0
    return min(max((accepted + prior_accepted) / (tested + prior_tested), 0.0), 0.99)
