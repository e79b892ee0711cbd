"""Retrieval lookup latency: how long one datastore lookup takes, per source and in parallel.

Queries are real code that is not in the datastores: each HumanEval problem's prompt
and canonical solution, cut at seeded random positions inside the solution (where
a drafter would look up during generation). Per source: the longest-suffix search
plus sampling its continuations (:meth:`Datastore.lookup`); together: the drafter's
parallel lookup over every source (:meth:`RetrievalDrafter.retrieve`), which is what
a decoding step pays, next to the sum of the per-source times (the same lookups one
after another): the lookups are Python and numpy calls that hold the GIL, so threads
overlap little of them, and the comparison shows what the parallel dispatch costs or saves.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence

from codeaccel.bench import datasets
from codeaccel.retrieval.datastore import Datastore
from codeaccel.retrieval.drafter import RetrievalDrafter

MAX_MATCH = 16  # the retrieval method's settings (see codeaccel.methods.registry)
MIN_MATCH = 2
CONT_LEN = 16


def humaneval_queries(tokenize: Callable[[str], list[int]], n: int, seed: int = 0) -> list[list[int]]:
    """``n`` contexts: a HumanEval prompt + the start of its canonical solution, cut at random."""
    rng = random.Random(seed)
    encoded = [(tokenize(r["prompt"]), tokenize(r["canonical_solution"])) for r in datasets.humaneval_rows()]
    queries = []
    for i in range(n):
        prompt, solution = encoded[i % len(encoded)]
        cut = rng.randrange(1, len(solution) + 1)
        queries.append(prompt + solution[:cut])
    return queries


def _percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"median_ms": round(1000 * statistics.median(ordered), 4), "p90_ms": at(0.9), "p99_ms": at(0.99)}


def run_lookup_bench(
    datastores: Sequence[Datastore], queries: list[list[int]], advance: Callable[[], None] = lambda: None
) -> dict:
    per_source: dict[str, dict] = {}
    one_by_one = [0.0] * len(queries)  # s: every source looked up in turn, per query
    for ds in datastores:
        times, matches, hits = [], [], 0
        for q in queries:
            t0 = time.perf_counter()
            found = ds.lookup(q[-MAX_MATCH:], MAX_MATCH, MIN_MATCH, CONT_LEN)
            times.append(time.perf_counter() - t0)
            one_by_one[len(times) - 1] += times[-1]
            if found is not None:
                hits += 1
                matches.append(found.match_len)
            advance()
        per_source[ds.name] = {
            "kind": ds.kind,
            "tokens": ds.stats()["tokens"],
            **_percentiles(times),
            "hit_rate": round(hits / len(queries), 4),
            "mean_match_len": round(statistics.fmean(matches), 2) if matches else None,
        }
    drafter = RetrievalDrafter(list(datastores), max_match=MAX_MATCH, min_match=MIN_MATCH)
    try:
        times = []
        for q in queries:
            t0 = time.perf_counter()
            drafter.retrieve(q, CONT_LEN)
            times.append(time.perf_counter() - t0)
            advance()
    finally:
        drafter.close()
    return {
        "n_queries": len(queries),
        "sources": per_source,
        "sequential_lookups": _percentiles(one_by_one),
        "parallel_retrieve": _percentiles(times),
    }


def markdown(doc: dict) -> str:
    lines = [
        "# Retrieval lookup latency",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {doc['machine']['cores']} cores, {doc['machine']['cpu_model']}; {doc['date']}",
        "",
        f"{doc['n_queries']} queries: HumanEval prompts + canonical solutions cut at random points "
        f"(longest suffix of ≤ {MAX_MATCH} tokens, ≥ {MIN_MATCH}; {CONT_LEN}-token continuations).",
        "",
        "| lookup | tokens indexed | median ms | p90 ms | p99 ms | hit rate | mean match len |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in doc["sources"].items():
        lines.append(
            f"| {name} ({s['kind']}) | {s['tokens']:,} | {s['median_ms']} | {s['p90_ms']} | {s['p99_ms']} "
            f"| {100 * s['hit_rate']:.0f}% | {s['mean_match_len']} |"
        )
    for label, key in (
        ("all sources one after another", "sequential_lookups"),
        ("all sources in parallel", "parallel_retrieve"),
    ):
        if key in doc:
            p = doc[key]
            lines.append(f"| {label} |  | {p['median_ms']} | {p['p90_ms']} | {p['p99_ms']} |  |  |")
    return "\n".join(lines) + "\n"
