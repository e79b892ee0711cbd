"""The sandbox for generated code: one execution API, isolation in layers, a worker pool.

    from codeaccel.sandbox import execute, Limits
    result = execute(solution, test_lines, Limits(timeout_s=5))

- :mod:`~codeaccel.sandbox.execution`: :func:`execute`, :class:`Limits`, results per test line
- :mod:`~codeaccel.sandbox.layers`: which isolation layers this machine supports, and the command that stacks them
- :mod:`~codeaccel.sandbox.cgroup`: a pids cgroup per run (process bound, kill list)
- :mod:`~codeaccel.sandbox.runner`: the program that runs inside, solution then test lines
- :mod:`~codeaccel.sandbox.pool`: many executions on every core

Threat model, layers and what is not covered: ``docs/sandbox.md``.
"""

from codeaccel.sandbox.execution import (
    STATUSES,
    ExecutionResult,
    Limits,
    LineResult,
    SandboxUnavailable,
    execute,
)
from codeaccel.sandbox.layers import probe
from codeaccel.sandbox.pool import Job, SandboxPool

__all__ = [
    "STATUSES",
    "ExecutionResult",
    "Job",
    "Limits",
    "SandboxPool",
    "SandboxUnavailable",
    "LineResult",
    "execute",
    "probe",
]
