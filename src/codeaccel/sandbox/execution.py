"""The one execution API: run a solution and its test lines in the sandbox, get a result per line.

    result = execute(solution, ["assert f(1) == 2", "assert f(2) == 3"])
    result.status            # passed | failed | error | timeout | memory_limit | output_limit | killed
    result.tests[1].status   # the same vocabulary, per test line, with exc_type and message

How a run ends decides the lines that never reported (see :mod:`codeaccel.sandbox.runner`):
the wall-clock limit → ``timeout``; SIGXCPU (CPU seconds) → ``timeout``; SIGXFSZ
(a file over the size cap) → ``output_limit``; SIGKILL from the run's memory cgroup →
``memory_limit``; any other signal (a segfault) → ``killed``; a clean exit before a
line ran → ``error``. A run
whose stdout or stderr reached the cap is ``output_limit`` even if its tests passed.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from codeaccel.errors import SetupError, UserError
from codeaccel.sandbox.cgroup import RunCgroup
from codeaccel.sandbox.layers import RUNNER, SANDBOX_RUNNER, SANDBOX_WORKDIR, Isolation, bwrap_args, probe
from codeaccel.sandbox.runner import OUT_OF_BUDGET

Status = Literal["passed", "failed", "error", "timeout", "memory_limit", "output_limit", "killed"]
STATUSES: tuple[str, ...] = ("passed", "failed", "error", "timeout", "memory_limit", "output_limit", "killed")
ALLOW_NETWORK_ENV = "CODEACCEL_SANDBOX_ALLOW_NETWORK"
_BASE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}  # all a run inherits
RUNNER_MARGIN_S = 0.5  # the runner's own budget ends this long before the wall-clock kill
# What a result means, raised whenever the runner's rules change, so that results stored under other rules
# are known (a cascade store refuses to mix them; each bench record says which it was executed under):
# 1: the program ran as ``__main__`` (its main block ran) and ``sys.exit(0)`` in a test line passed it
# 2: the program is a module ``__sandbox__`` in sys.modules; ``SystemExit`` is an error wherever raised
RULES_VERSION = 2


class SandboxUnavailable(SetupError):
    """A layer the caller requires cannot be had on this machine."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits. Units are in the names; every one is enforced by the kernel, not by the program."""

    timeout_s: float = 10.0  # wall clock, whole run (solution + every test line)
    line_timeout_s: float | None = None  # per test line (default: timeout_s)
    memory_bytes: int = 2 * 1024**3  # address space of each process (RLIMIT_AS), and all together (memory cgroup)
    output_bytes: int = 1024**2  # stdout and stderr each, and any one file written (RLIMIT_FSIZE)
    disk_bytes: int = 64 * 1024**2  # the private /tmp and /dev/shm (tmpfs size)
    open_files: int = 64  # RLIMIT_NOFILE
    max_processes: int = 32  # pids.max of the run's cgroup (RLIMIT_NPROC where no cgroup and not root)
    allow_network: bool = False  # run even where no network namespace can be made (never needed where one can)

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_bytes", "output_bytes", "disk_bytes", "open_files", "max_processes"):
            if not getattr(self, name) > 0:
                raise UserError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")
        if self.line_timeout_s is not None and not self.line_timeout_s > 0:
            raise UserError(f"sandbox limit line_timeout_s must be > 0, got {self.line_timeout_s}")

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class LineResult:
    test: str  # the test line as given
    status: Status
    exc_type: str | None = None
    message: str | None = None
    wall_s: float | None = None
    cpu_s: float | None = None

    @property
    def out_of_budget(self) -> bool:
        """The run's budget, not the line's own limit, stopped it: it got no time or was cut short (a ``timeout``)."""
        return self.exc_type == OUT_OF_BUDGET


@dataclass(frozen=True)
class ExecutionResult:
    status: Status  # passed only if the solution ran and every test line passed, within every limit
    tests: list[LineResult]
    setup_status: str  # the solution itself: ok, or how it failed (then no test line ran)
    setup_error: str | None  # "ExcType: message" when the solution failed
    returncode: int | None  # negative: killed by that signal; None: killed at the wall-clock limit
    wall_s: float
    cpu_s: float  # user + system seconds: the reaped process tree, or the runner's own per-line sum if larger
    stdout: str  # at most Limits.output_bytes
    stderr: str
    output_capped: bool = False
    oom_kills: int = 0  # processes of the run the kernel killed at its memory limit (cgroup)
    layers: tuple[str, ...] = field(default_factory=tuple)  # the isolation layers this run had

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def execute(solution: str, tests: Sequence[str] = (), limits: Limits | None = None) -> ExecutionResult:
    """Run ``solution``, then each line of ``tests`` in its namespace, in a fresh sandbox."""
    limits = limits or Limits()
    iso = probe()
    allow_network = limits.allow_network or os.environ.get(ALLOW_NETWORK_ENV) == "1"
    if iso.netns is None and not allow_network:
        raise SandboxUnavailable(
            "no network namespace can be made on this machine (needs root for `unshare --net`, or bubblewrap "
            f"with user namespaces), so generated code could reach the network; set {ALLOW_NETWORK_ENV}=1 "
            "(or Limits(allow_network=True)) to run without that layer. `codeaccel sandbox check` shows the layers."
        )
    job = {
        "setup": solution,
        "tests": list(tests),
        "line_timeout_s": limits.line_timeout_s or limits.timeout_s,
        # the runner stops starting lines a little before the wall-clock kill, so lines report their own timeout
        "budget_s": max(0.5 * limits.timeout_s, limits.timeout_s - RUNNER_MARGIN_S),
    }
    with tempfile.TemporaryDirectory(prefix="codeaccel-run-") as tmp:
        return _run(Path(tmp), job, limits, iso)


def _command(iso: Isolation, limits: Limits, cgroup: RunCgroup | None) -> list[str]:
    """The stacked command line (see :mod:`codeaccel.sandbox.layers`)."""
    cmd: list[str] = []
    if cgroup is not None:  # join every cgroup of the run, then become the rest of the command
        joins = " && ".join(f"echo $$ > {shlex.quote(str(f))}" for f in cgroup.procs_files)
        cmd += ["/bin/sh", "-c", f'{joins} && exec "$@"', "sh"]
    if iso.prlimit:
        cmd += [
            iso.prlimit,
            f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
            f"--as={limits.memory_bytes}",
            f"--fsize={limits.output_bytes}",
            f"--nofile={limits.open_files}",
            "--core=0",
        ]
        if iso.controller("pids") is None and not iso.is_root:
            cmd.append(f"--nproc={limits.max_processes}")
        cmd.append("--")
    if iso.netns == "unshare":
        cmd += ["unshare", "--net", "--"]
    if iso.bwrap:
        cmd += bwrap_args(iso.bwrap, limits.disk_bytes, unshare_net=iso.netns == "bwrap")
        for k, v in {**_BASE_ENV, "HOME": SANDBOX_WORKDIR, "TMPDIR": "/tmp"}.items():
            cmd += ["--setenv", k, v]
        return cmd + ["--", sys.executable, "-I", "-B", "-u", SANDBOX_RUNNER]
    return cmd + [sys.executable, "-I", "-B", "-u", str(RUNNER)]  # no bubblewrap: runs in a fresh host temp dir


def _run(tmp: Path, job: dict, limits: Limits, iso: Isolation) -> ExecutionResult:
    work = tmp / "work"
    work.mkdir()
    env = {**_BASE_ENV, "HOME": str(work), "TMPDIR": str(work)}  # bubblewrap sets its own on top
    timed_out = threading.Event()
    bounds = {"pids": limits.max_processes, "memory": limits.memory_bytes}
    cgroup = RunCgroup({c: bounds[c.name] for c in iso.cgroups}) if iso.cgroups else None
    try:
        with ExitStack() as files:
            results = files.enter_context(open(tmp / "results", "wb"))  # the runner's report channel
            (tmp / "job.json").write_text(json.dumps({**job, "result_fd": results.fileno()}))
            start = time.perf_counter()
            proc = subprocess.Popen(
                _command(iso, limits, cgroup),
                cwd=work,
                env=env,
                stdin=files.enter_context(open(tmp / "job.json", "rb")),
                stdout=files.enter_context(open(tmp / "stdout", "wb")),
                stderr=files.enter_context(open(tmp / "stderr", "wb")),
                pass_fds=(results.fileno(),),
                start_new_session=True,
            )

            def on_timeout() -> None:
                timed_out.set()
                _kill(proc.pid, cgroup)

            timer = threading.Timer(limits.timeout_s, on_timeout)
            timer.start()
            try:
                _, wait_status, rusage = os.wait4(proc.pid, 0)  # rusage: this child's whole reaped tree
            except BaseException:  # Ctrl-C or SIGTERM while it runs: its whole tree killed and reaped, not orphaned
                _kill(proc.pid, cgroup)
                with suppress(ChildProcessError):
                    os.waitpid(proc.pid, 0)
                raise
            finally:
                timer.cancel()
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            _kill(proc.pid, cgroup)  # nothing the program started outlives it
            oom_kills = cgroup.oom_kills() if cgroup is not None else 0
    finally:
        if cgroup is not None:
            cgroup.remove()
    stdout, cap_out = _read_capped(tmp / "stdout", limits.output_bytes)
    stderr, cap_err = _read_capped(tmp / "stderr", limits.output_bytes)
    reports = _read_reports(tmp / "results", limits.output_bytes)
    returncode = None if timed_out.is_set() else proc.returncode
    # processes killed at a limit were never reaped by their parent, so the tree's rusage misses them:
    # take the runner's own per-line measurements where they are larger
    reported_cpu = sum(r.get("cpu_s") or 0.0 for r in reports.values() if isinstance(r, dict))
    cpu = max(rusage.ru_utime + rusage.ru_stime, reported_cpu)
    return _result(job["tests"], reports, returncode, oom_kills, wall, cpu, stdout, stderr, cap_out or cap_err, iso)


def _kill(pid: int, cgroup: RunCgroup | None) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cgroup is not None:
        cgroup.kill_all()


def _read_capped(path: Path, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", "replace"), len(data) >= cap


def _read_reports(path: Path, cap: int) -> dict:
    """The runner's JSON lines by key: ``"setup"`` → its {"setup": {...}}, ``i`` → its {"test": i, ...}, and
    ``("start", i)`` → whether the budget bounded line i (its {"start": i, "budget_bound": b}); unreadable lines
    are ignored."""
    reports: dict = {}
    with open(path, "rb") as f:
        data = f.read(cap)
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("setup"), dict) and "setup" not in reports:
            reports["setup"] = record["setup"]
        elif isinstance(record, dict) and isinstance(record.get("test"), int) and record["test"] not in reports:
            if record.get("status") in STATUSES:
                reports[record["test"]] = record
        elif isinstance(record, dict) and isinstance(record.get("start"), int):
            reports[("start", record["start"])] = record.get("budget_bound") is True
    return reports


def _fate(returncode: int | None, oom_kills: int) -> tuple[Status, str]:
    """How the run ended, for the lines that did not report."""
    if returncode is None:
        return "timeout", "the run passed its wall-clock limit and was killed"
    if oom_kills and returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "memory_limit", "killed by the kernel at the run's memory limit (cgroup)"
    if returncode == 0:
        return "error", "the program ended before this test ran"
    if returncode < 0 or returncode > 128:  # bubblewrap reports a signalled child as 128 + signal
        sig = -returncode if returncode < 0 else returncode - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            return "timeout", f"CPU time limit ({name})"
        if sig == signal.SIGXFSZ:
            return "output_limit", f"file size limit ({name})"
        return "killed", f"killed by {name}"
    return "error", f"the program exited with code {returncode} before this test ran"


def _result(
    tests: list[str],
    reports: dict,
    returncode: int | None,
    oom_kills: int,
    wall: float,
    cpu: float,
    stdout: str,
    stderr: str,
    output_capped: bool,
    iso: Isolation,
) -> ExecutionResult:
    fate, why = _fate(returncode, oom_kills)
    setup = reports.get("setup")
    if setup is None:
        setup_status, setup_error = fate, why
    else:
        setup_status = setup.get("status", "error")
        setup_error = None if setup_status == "ok" else f"{setup.get('exc_type')}: {setup.get('message')}"
    results = []
    for i, line in enumerate(tests):
        r = reports.get(i)
        if r is not None:
            fields = {k: r.get(k) for k in ("exc_type", "message", "wall_s", "cpu_s")}
            results.append(LineResult(line, r["status"], **fields))
        elif setup_status != "ok":
            results.append(LineResult(line, "error", "SetupFailed", f"the solution failed: {setup_error}"))
        elif returncode is None and reports.get(("start", i), True):  # the wall clock: the budget's doing
            # a line killed while the budget bounded it (a C call running past the budget), or never started
            started = ("start", i) in reports
            why_here = "the run's budget ran out during this line (killed at the wall-clock limit)" if started else (
                "no time left in the run")  # fmt: skip
            results.append(LineResult(line, "timeout", OUT_OF_BUDGET, why_here))
        else:
            results.append(LineResult(line, fate, None, why))
    statuses = ([] if setup_status == "ok" else [setup_status if setup_status in STATUSES else "error"]) + [
        t.status for t in results
    ]
    status: Status = next((s for s in statuses if s != "passed"), "passed")
    if output_capped and status == "passed":
        status = "output_limit"
    if oom_kills:  # the kernel killed a process of the run for memory: that is the run's verdict
        status = "memory_limit"
    if returncode is None:
        status = "timeout"
    return ExecutionResult(
        status,
        results,
        setup_status,
        setup_error,
        returncode,
        wall,
        cpu,
        stdout,
        stderr,
        output_capped,
        oom_kills,
        iso.active_layers,
    )
