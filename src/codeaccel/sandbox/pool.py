"""Many sandboxed executions at once: one worker per core.

Each execution is a separate process tree, so the workers are threads that only
start a process and wait for it; the parallelism is the processes'. Results come
back in the order of the jobs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from codeaccel.errors import UserError
from codeaccel.sandbox.execution import ExecutionResult, Limits, execute


@dataclass(frozen=True)
class Job:
    solution: str
    tests: Sequence[str] = ()
    limits: Limits | None = None


class SandboxPool:
    """``with SandboxPool() as pool: results = list(pool.map(jobs))``; workers default to the core count."""

    def __init__(self, workers: int | None = None):
        workers = workers or os.cpu_count() or 1
        if workers < 1:
            raise UserError(f"the sandbox pool needs at least 1 worker, got {workers}")
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")

    def map(self, jobs: Iterable[Job]) -> Iterator[ExecutionResult]:
        return self._executor.map(lambda job: execute(job.solution, job.tests, job.limits), jobs)

    def map_every_line(self, jobs: Sequence[Job]) -> list[ExecutionResult]:
        """Like :meth:`map`, but every test line gets its own time limit: where a run's budget cut lines short or
        left them no time while no line had hit its own limit (a slow solution, not a stuck one), those lines run
        again in a new run (the solution set up afresh), until every line ran to its end or its own limit. A job
        stops being continued when a new run finishes none of its lines, its solution fails to set up again (its
        first verdicts stand), or after :data:`MAX_EXTRA_RUNS` extra runs (the lines left stay ``timeout``)."""
        results = list(self.map(jobs))
        extra = [0] * len(results)
        open_jobs = [i for i, r in enumerate(results) if _to_continue(r) and _progressed(r)]
        while open_jobs:
            rest = [Job(jobs[i].solution, [t.test for t in results[i].tests if t.out_of_budget], jobs[i].limits)
                    for i in open_jobs]  # fmt: skip
            still = []
            for i, more in zip(open_jobs, self.map(rest)):
                extra[i] += 1
                if more.setup_status != "ok":  # set up once, not again (a limit met by chance): keep what ran
                    continue
                results[i] = _continued(results[i], more)
                if _to_continue(results[i]) and _progressed(more) and extra[i] < MAX_EXTRA_RUNS:
                    still.append(i)
            open_jobs = still
        return results

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MAX_EXTRA_RUNS = 5  # per job of map_every_line: its lines' worst case is 6 runs' budgets, not one per line


def _to_continue(result: ExecutionResult) -> bool:
    """Lines the budget stopped, and none that stopped at its own limit."""
    return any(t.out_of_budget for t in result.tests) and not _stuck(result)


def _progressed(run: ExecutionResult) -> bool:
    return any(not t.out_of_budget for t in run.tests)


def _stuck(result: ExecutionResult) -> bool:
    """A line ran out of its own time (or the solution did): the lines after it would most likely too."""
    return result.setup_status != "ok" or any(t.status == "timeout" and not t.out_of_budget for t in result.tests)


def _continued(first: ExecutionResult, more: ExecutionResult) -> ExecutionResult:
    """``first`` with its lines out of budget replaced, in order, by ``more``'s results for them."""
    later = iter(more.tests)
    tests = [next(later) if t.out_of_budget else t for t in first.tests]
    status = next((t.status for t in tests if t.status != "passed"), "passed")  # as execute's own verdict:
    if status == "passed" and (first.output_capped or more.output_capped):
        status = "output_limit"
    if first.oom_kills or more.oom_kills:  # the kernel killed a process for memory in either run
        status = "memory_limit"
    return replace(
        first,
        status=status,
        tests=tests,
        returncode=more.returncode,
        wall_s=first.wall_s + more.wall_s,
        cpu_s=first.cpu_s + more.cpu_s,
        stdout=first.stdout + more.stdout,
        stderr=first.stderr + more.stderr,
        output_capped=first.output_capped or more.output_capped,
        oom_kills=first.oom_kills + more.oom_kills,
    )
