"""What a cascade costs, measured: engine seconds per generated token at each batch size, times a price.

A stage that writes k answers and k tests decodes 2k sequences together (k = 1: the
greedy answer and the greedy test, 2; k = 0: one answer, 1), and on this CPU a batch of
b sequences costs far less than b single steps. So each model's cost is measured here
as seconds per decode step with b sequences active (b copies of a real prompt, every
one generating), for b in ``BATCH_SIZES``; a stage's generation is priced as

    Σ over decode steps of step_s(b_t),  b_t = the sequences of its 2k still generating at step t

(at most n_seq_max at once; step_s interpolated linearly between measured sizes), plus its prompts' prefill
(prompt tokens × seconds per prompt token; reported apart as well). That prices every
k as if it ran on its own, as a deployed cascade would run it; the run's own batched
spend (its share of the batches it ran in, beside its problem's other sequences and its
neighbours') is stored per generation too (``cost_s``).

The measurement takes a minute at the start of a sweep that runs for hours, and this VM's
speed drifts (the same step 1.6x dearer an hour later, ``docs/benchmarks/README.md``), so
:func:`spent_scale` compares it with what the sweep actually spent: per generation, the seconds
spent over what the measured costs price it at (its tokens at its mean batch size, its share of
its prompt's prefill); the median
over a model's generations scales its measured costs (``cascade tune`` does by default), so
each model is priced at the speed it actually ran at, in the shape the measurement gives.

Money: seconds × price per hour / 3600. The default, ``CPU_USD_PER_HOUR`` = $0.085, is the
on-demand price of 2 of the 8 vCPUs of a c5.2xlarge in us-east-1 ($0.34 per hour in AWS's
EC2 Auto Scaling user guide, "Spot price per unit hour example"; our measurements use 2
cores); the cascade paper's convention, $0.44 per GPU-hour, is reported beside it.
Prices scale every cost alike, so they move no point on or off a Pareto front.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from codeaccel import machine
from codeaccel.bench.harness import build_prompt
from codeaccel.cascade.problems import CascadeProblem
from codeaccel.cascade.store import BatchCost, Spend
from codeaccel.decoding.sampling import SamplingParams, next_token
from codeaccel.engines import Engine, open_sequences
from codeaccel.errors import InternalError

BATCH_SIZES = (1, 2, 4, 6, 8, 10, 12, 16)
STEPS = 24  # decode steps timed per batch size (after 2 warm-up steps)
CPU_USD_PER_HOUR = 0.085  # 2 of 8 vCPUs of an on-demand c5.2xlarge, us-east-1 ($0.34/h, AWS's user guide)
PAPER_USD_PER_HOUR = 0.44  # the cascade paper's GPU-hour convention


def measure_batch_costs(engine: Engine, cp: CascadeProblem, sizes: Sequence[int] = BATCH_SIZES) -> list[BatchCost]:
    """Seconds per generated token with b sequences decoding together, for each b; and per prompt token."""
    prompt = build_prompt(engine, cp.problem)
    params = SamplingParams(temperature=0.8, seed=0)
    out = []
    with open_sequences(engine, n_seq_max=max(sizes), n_ctx=len(prompt) + max(sizes) * (STEPS + 4) + 256) as seqs:
        for b in sizes:
            rng = np.random.default_rng(b)
            lead = seqs.open()
            t0 = time.perf_counter()
            logits = seqs.eval({lead: prompt}, all_logits=False)[lead][-1]
            prefill_s = time.perf_counter() - t0
            live = [lead] + [seqs.open(copy_of=lead) for _ in range(b - 1)]
            rows = {s: logits for s in live}
            elapsed = 0.0
            for step in range(STEPS + 2):
                batch = {s: [next_token(rows[s], params, rng)] for s in live}
                t0 = time.perf_counter()
                got = seqs.eval(batch, all_logits=False)
                if step >= 2:
                    elapsed += time.perf_counter() - t0
                rows = {s: got[s][-1] for s in live}
            seqs.close_all()
            out.append(
                BatchCost(
                    model=engine.model_name,
                    batch_size=b,
                    s_per_token=elapsed / (STEPS * b),
                    s_per_prompt_token=prefill_s / len(prompt),
                    tokens=STEPS * b,
                    cpu=machine.cpu_model(),
                )
            )
    return out


def step_seconds(costs: dict[int, BatchCost], b: float) -> float:
    """Seconds of one decode step with b sequences (a mean batch size may be fractional), interpolated between
    measured batch sizes."""
    sizes = sorted(costs)
    steps = [costs[s].s_per_token * s for s in sizes]
    if b >= sizes[-1]:  # more sequences than measured: whole batches of the largest size
        return steps[-1] * b / sizes[-1]
    return float(np.interp(b, sizes, steps))


def generation_seconds(costs: dict[int, BatchCost], lengths: Sequence[int], n_seq_max: int) -> float:
    """Seconds to generate sequences of ``lengths`` tokens decoded together, as continuous batching runs them.

    At most ``n_seq_max`` decode at once, the rest wait in order and join as others finish;
    every step costs ``step_seconds`` of the sequences active in it, so a long answer's tail,
    decoded alone after its shorter siblings stopped, is priced at b = 1.
    """
    if n_seq_max < 1:
        raise InternalError(f"n_seq_max must be >= 1, got {n_seq_max}")
    waiting = [n for n in lengths if n > 0]
    active, waiting = waiting[:n_seq_max], waiting[n_seq_max:]
    seconds = 0.0
    while active:
        steps = min(active)  # the batch keeps its size until the next sequence finishes
        seconds += steps * step_seconds(costs, len(active))
        active = [n - steps for n in active if n > steps]
        while waiting and len(active) < n_seq_max:
            active.append(waiting.pop(0))
    return seconds


MIN_TOKENS_TO_CALIBRATE = 8  # shorter generations' seconds per token are mostly their first step's overhead


def spent_scale(costs: dict[int, BatchCost], spend: Sequence[Spend]) -> float:
    """The median over generations of the seconds the sweep spent on each over what the measured costs
    price it at (its tokens at its mean batch size, plus its share of its prompt's prefill); 1.0 where
    nothing was spent (a median: a step stretched by the sweep's being paused moves it little)."""
    s_prompt = min(c.s_per_prompt_token for c in costs.values())
    ratios = []
    for g in spend:
        if g.tokens < MIN_TOKENS_TO_CALIBRATE or g.seconds <= 0:
            continue
        b = max(1.0, g.batch_size)
        priced = g.tokens * step_seconds(costs, b) / b + g.prompt_tokens * s_prompt / max(1, g.sharing)
        ratios.append(g.seconds / priced)
    return float(np.median(ratios)) if ratios else 1.0


def scaled(costs: dict[int, BatchCost], scale: float) -> dict[int, BatchCost]:
    """The same costs ``scale`` times dearer (decode and prefill alike)."""
    return {
        b: replace(c, s_per_token=c.s_per_token * scale, s_per_prompt_token=c.s_per_prompt_token * scale)
        for b, c in costs.items()
    }


def usd(seconds: float, usd_per_hour: float = CPU_USD_PER_HOUR) -> float:
    return seconds * usd_per_hour / 3600.0
