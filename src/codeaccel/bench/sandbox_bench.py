"""Sandbox throughput: executions per second, and the cost of isolation per execution.

The workload is a typical HumanEval solution (HumanEval/0's canonical one) with 5
test lines. Three measurements, in one run:

- ``bare``: ``python -I -B -c`` running the same solution and lines, no isolation,
  one after another (the floor any process-per-execution design pays);
- ``sandbox``: :func:`codeaccel.sandbox.execute`, one after another;
- ``pool``: :class:`codeaccel.sandbox.SandboxPool` with one worker per core.

overhead per execution = median(sandbox) − median(bare).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from codeaccel.sandbox import Job, Limits, SandboxPool, execute, probe

SOLUTION = """from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if idx != idx2:
                distance = abs(elem - elem2)
                if distance < threshold:
                    return True
    return False
"""
TESTS = [
    "assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True",
    "assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False",
    "assert has_close_elements([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True",
    "assert has_close_elements([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False",
    "assert has_close_elements([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False",
]


def _bare_once() -> None:
    program = SOLUTION + "\n" + "\n".join(TESTS) + "\n"
    subprocess.run([sys.executable, "-I", "-B", "-c", program], check=True, stdin=subprocess.DEVNULL)


def _sandbox_once() -> None:
    result = execute(SOLUTION, TESTS, Limits(timeout_s=10.0))
    if not result.passed:
        raise RuntimeError(f"the benchmark workload did not pass in the sandbox: {result.status}")


def _time_each(fn: Callable[[], None], n: int, advance: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        advance()
    return times


def run_sandbox_bench(n: int, workers: int, advance: Callable[[], None] = lambda: None) -> dict:
    """``n`` executions of each kind; returns the results document (without command/machine/date)."""
    _sandbox_once()  # warm-up: the layer probe, page cache
    bare = _time_each(_bare_once, n, advance)
    sandboxed = _time_each(_sandbox_once, n, advance)
    t0 = time.perf_counter()
    with SandboxPool(workers) as pool:
        results = []
        for r in pool.map(Job(SOLUTION, TESTS, Limits(timeout_s=10.0)) for _ in range(n)):
            results.append(r)
            advance()
    pool_s = time.perf_counter() - t0
    if not all(r.passed for r in results):
        raise RuntimeError("the benchmark workload did not pass in the sandbox pool")

    def summary(times: list[float]) -> dict:
        return {
            "n": len(times),
            "median_ms": round(1000 * statistics.median(times), 2),
            "mean_ms": round(1000 * statistics.fmean(times), 2),
            "p90_ms": round(1000 * sorted(times)[int(0.9 * (len(times) - 1))], 2),
            "executions_per_s": round(len(times) / sum(times), 2),
        }

    layers = list(probe().active_layers)
    return {
        "workload": "HumanEval/0 canonical solution + 5 test lines",
        "layers": layers,
        "workers": workers,
        "results": {
            "bare_python": summary(bare),
            "sandbox_sequential": summary(sandboxed),
            "sandbox_pool": {"n": n, "seconds": round(pool_s, 3), "executions_per_s": round(n / pool_s, 2)},
        },
        "overhead_ms_per_execution": round(1000 * (statistics.median(sandboxed) - statistics.median(bare)), 2),
    }


def markdown(doc: dict) -> str:
    r = doc["results"]
    lines = [
        "# Sandbox throughput",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {doc['machine']['cores']} cores, {doc['machine']['cpu_model']}; {doc['date']}",
        "",
        f"Workload: {doc['workload']}. Layers active: {', '.join(doc['layers'])}.",
        "",
        "| runner | executions | median ms | p90 ms | executions/s |",
        "|---|---|---|---|---|",
    ]
    for name, key in (("bare `python -c`", "bare_python"), ("sandbox, one at a time", "sandbox_sequential")):
        s = r[key]
        lines.append(f"| {name} | {s['n']} | {s['median_ms']} | {s['p90_ms']} | {s['executions_per_s']} |")
    p = r["sandbox_pool"]
    lines.append(f"| sandbox pool, {doc['workers']} workers | {p['n']} |  |  | {p['executions_per_s']} |")
    lines += ["", f"Overhead of the sandbox per execution (median): {doc['overhead_ms_per_execution']} ms.", ""]
    return "\n".join(lines)
