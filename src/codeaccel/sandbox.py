"""Run generated code in a separate, limited process: the one execution API.

Today's layers: a child Python process in a fresh temporary directory, in its own
session and process group (the whole group is killed when the run ends or times
out); resource limits on CPU seconds, address space, file size and open files; a
scrubbed environment; output written to size-capped files instead of pipes, so
the parent never buffers without bound.

TODO(issue 5): network namespace, pid limit, read-only project/home, the adversarial
suite and a worker pool.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "error", "timeout"]

OUTPUT_CAP_BYTES = 1024 * 1024  # per stream, enforced by RLIMIT_FSIZE on the output files
MEMORY_LIMIT_BYTES = 2 * 1024**3
OPEN_FILES_LIMIT = 64


@dataclass(frozen=True)
class ExecutionResult:
    status: Status  # passed: exit 0; failed: AssertionError; error: any other failure; timeout
    returncode: int | None
    wall_s: float
    stdout: str  # first bytes only (see OUTPUT_CAP_BYTES)
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limit_child(cpu_s: int) -> None:
    """Runs in the child between fork and exec."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_CAP_BYTES, OUTPUT_CAP_BYTES))
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, timeout_s: float = 10.0) -> ExecutionResult:
    """Execute ``source`` as a Python program; classify the outcome."""
    with tempfile.TemporaryDirectory(prefix="codeaccel-run-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0"}
        start = time.perf_counter()
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "program.py"],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=lambda: _limit_child(int(timeout_s) + 1),
            )
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc.pid)  # nothing the program started outlives it
                proc.wait()
        wall = time.perf_counter() - start
        stdout = (work / "stdout").read_bytes()[:OUTPUT_CAP_BYTES].decode("utf-8", "replace")
        stderr = (work / "stderr").read_bytes()[:OUTPUT_CAP_BYTES].decode("utf-8", "replace")
    if returncode is None:
        status: Status = "timeout"
    elif returncode == 0:
        status = "passed"
    elif "AssertionError" in stderr:
        status = "failed"
    else:
        status = "error"
    return ExecutionResult(status=status, returncode=returncode, wall_s=wall, stdout=stdout, stderr=stderr)
