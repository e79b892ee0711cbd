"""Many sandboxed executions at once: one worker per core.

Each execution is a separate process tree, so the workers are threads that only
start a process and wait for it; the parallelism is the processes'. Results come
back in the order of the jobs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
