"""The sandbox: results per test line, each isolation layer, and an adversarial suite.

Every adversarial program is aimed at this machine only: the network test listens on
127.0.0.1 *outside* the sandbox and checks that the sandboxed code cannot reach it.
After the suite, no process, cgroup or temporary directory of it is left.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from codeaccel.errors import CodeaccelError
from codeaccel.sandbox import Job, Limits, SandboxPool, SandboxUnavailable, execute, probe
from codeaccel.sandbox import execution as execution_module
from codeaccel.sandbox.layers import Isolation

ISO = probe()
needs_pidns = pytest.mark.skipif(ISO.bwrap is None, reason="needs bubblewrap's pid namespace")
needs_fs = pytest.mark.skipif(ISO.bwrap is None, reason="needs bubblewrap's filesystem isolation")
needs_netns = pytest.mark.skipif(ISO.netns is None, reason="needs a network namespace")
needs_cgroup = pytest.mark.skipif(ISO.controller("pids") is None, reason="needs a writable pids cgroup")
needs_memcg = pytest.mark.skipif(ISO.controller("memory") is None, reason="needs a writable memory cgroup")
FAST = Limits(timeout_s=5.0)


def _processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


# --- the API: one result per test line -------------------------------------------------------------------


def test_each_test_line_gets_its_own_result():
    solution = "def inc(x):\n    return x + 1\n"
    tests = ["assert inc(1) == 2", "assert inc(1) == 3, 'off by one'", "inc(None)", "assert inc(5) == 6"]
    r = execute(solution, tests, FAST)
    assert [t.status for t in r.tests] == ["passed", "failed", "error", "passed"]
    assert r.tests[1].exc_type == "AssertionError" and r.tests[1].message == "off by one"
    assert r.tests[2].exc_type == "TypeError" and "unsupported operand" in r.tests[2].message
    assert r.status == "failed" and not r.passed  # the first line that did not pass
    assert r.setup_status == "ok" and r.returncode == 0
    assert all(t.wall_s is not None and t.wall_s >= 0 for t in r.tests)
    assert r.wall_s > 0 and r.cpu_s > 0


def test_all_lines_passing_is_a_pass_and_output_is_captured():
    r = execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\nx = 41", ["assert x + 1 == 42"], FAST)
    assert r.passed and r.stdout == "out\n" and r.stderr == "err\n"


def test_a_broken_solution_runs_no_test():
    r = execute("def f(:\n  pass", ["assert True", "assert True"], FAST)
    assert r.setup_status == "error" and r.setup_error.startswith("SyntaxError")
    assert r.status == "error" and [t.exc_type for t in r.tests] == ["SetupFailed", "SetupFailed"]


def test_sys_exit_in_a_test_line_is_an_error_whatever_its_code():
    # a solution that exits when called must not pass the line that calls it
    lines = ["sys.exit(0)", "sys.exit(3)", "assert f() == 1", "assert True"]
    r = execute("import sys\ndef f():\n    sys.exit()", lines, FAST)
    assert [t.status for t in r.tests] == ["error", "error", "error", "passed"]
    assert {t.exc_type for t in r.tests[:3]} == {"SystemExit"} and r.tests[1].message == "3"
    exiting = execute("import sys\nsys.exit(0)\ndef f():\n    return 1", ["assert f() == 1"], FAST)
    assert exiting.setup_status == "error" and exiting.setup_error.startswith("SystemExit")


def test_the_solution_is_not_main_so_its_main_block_does_not_run():
    solution = "def f():\n    return 1\nif __name__ == '__main__':\n    assert f() == 2, 'example usage'\n"
    r = execute(solution, ["assert f() == 1", "assert __name__ == '__sandbox__'"], FAST)
    assert r.passed and r.setup_status == "ok"


def test_lines_a_slow_solution_had_no_time_for_are_run_again_in_the_pool():
    slow = "import time\ndef f(x):\n    time.sleep(0.4)\n    return x\n"
    lines = [f"assert f({i}) == {i}" for i in range(8)]  # 3.2 s in all: the run's 1.5 s budget starts ~4
    limits = Limits(timeout_s=2.0, line_timeout_s=1.0)
    alone = execute(slow, lines, limits)
    cut = [t for t in alone.tests if t.out_of_budget]
    assert cut and all(t.status == "timeout" for t in cut) and alone.status == "timeout"
    with SandboxPool(workers=2) as pool:
        slow_r, stuck_r = pool.map_every_line([Job(slow, lines, limits),
                                               Job("def f(x):\n    while True: pass", lines, limits)])  # fmt: skip
    assert (
        slow_r.passed
        and [t.status for t in slow_r.tests] == ["passed"] * 8
        and not any(t.out_of_budget for t in slow_r.tests)
    )
    assert slow_r.wall_s > alone.wall_s  # it took more than one run
    # a line that timed out on its own: the rest is not tried again (each would time out too)
    assert stuck_r.tests[0].status == "timeout" and not stuck_r.tests[0].out_of_budget
    assert any(t.out_of_budget for t in stuck_r.tests) and stuck_r.status == "timeout"


def test_a_line_the_wall_clock_kills_inside_c_code_while_the_budget_bounds_it_runs_again():
    # each line 0.7 s in "C code" (SIGALRM blocked, as in a long C call): the run's own timer cannot stop the
    # line the 1.5 s budget overruns, so the wall clock kills the run at 2 s in the middle of it
    slow = (
        "import signal, time\n"
        "def f(x):\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "    time.sleep(0.7)\n"
        "    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})\n"
        "    return x\n"
    )
    lines = [f"assert f({i}) == {i}" for i in range(4)]
    limits = Limits(timeout_s=2.0, line_timeout_s=1.9)
    alone = execute(slow, lines, limits)
    assert alone.returncode is None and alone.status == "timeout"  # killed at the wall clock
    assert all(t.status == "passed" or t.out_of_budget for t in alone.tests)
    assert any("during this line" in (t.message or "") for t in alone.tests)  # the line it was killed in
    with SandboxPool(workers=1) as pool:
        (r,) = pool.map_every_line([Job(slow, lines, limits)])
    assert r.passed and [t.status for t in r.tests] == ["passed"] * 4


def test_the_solution_is_a_registered_module():
    solution = (
        "import pickle\nfrom dataclasses import dataclass\n"
        "@dataclass\nclass Node:\n    val: int\n    next: 'Node' = None\n"
    )
    lines = ["assert Node(1).val == 1", "assert pickle.loads(pickle.dumps(Node(2))) == Node(2)"]
    r = execute(solution, lines, FAST)
    assert r.setup_status == "ok" and r.passed, r.tests


def test_a_setup_that_spends_the_whole_budget_is_not_run_again_and_again():
    limits = Limits(timeout_s=2.0, line_timeout_s=2.0)
    with SandboxPool(workers=1) as pool:
        (r,) = pool.map_every_line([Job("import time\ntime.sleep(1.2)", ["time.sleep(0.6)"], limits)])
    assert r.setup_status == "ok" and r.tests[0].out_of_budget and r.status == "timeout"
    assert r.wall_s < 2.0  # one run: a second would get no further


def test_limits_are_validated():
    for bad in ({"timeout_s": 0}, {"memory_bytes": -1}, {"max_processes": 0}, {"line_timeout_s": 0}):
        with pytest.raises(CodeaccelError):
            Limits(**bad)


# --- time --------------------------------------------------------------------------------------------------


def test_an_infinite_loop_times_out_its_line_and_the_next_line_still_runs():
    r = execute("", ["while True:\n    pass", "assert 1 == 1"], Limits(timeout_s=5.0, line_timeout_s=1.0))
    assert [t.status for t in r.tests] == ["timeout", "passed"]
    assert r.status == "timeout" and r.wall_s < 4.0


def test_sleep_past_the_timeout():
    start = time.perf_counter()
    r = execute("import time", ["time.sleep(60)"], Limits(timeout_s=2.0))
    assert r.status == "timeout" and r.tests[0].status == "timeout"
    assert time.perf_counter() - start < 5.0


def test_a_busy_loop_that_ignores_signals_is_killed_at_the_wall_clock_limit():
    code = (
        "import signal\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "signal.setitimer = lambda *a: None\n"  # and it disarms the per-line timer as well
    )
    start = time.perf_counter()
    r = execute(code, ["while True:\n    pass", "assert True"], Limits(timeout_s=2.0))
    assert r.status == "timeout" and r.returncode is None
    assert r.tests[0].status == "timeout" and r.tests[1].status == "timeout"
    assert time.perf_counter() - start < 5.0


# --- processes ---------------------------------------------------------------------------------------------


@needs_cgroup
def test_a_fork_bomb_is_bounded_and_leaves_nothing_behind():
    marker = "forkbomb-7f3a"
    code = (
        "import os, time\n"
        f"MARK = '{marker}'\n"
        "children = 0\n"
        "for _ in range(10_000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.execv('/bin/sleep', ['/bin/sleep', '600', MARK])\n"
        "        children += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(children, flush=True)\n"
    )
    limits = Limits(timeout_s=10.0, max_processes=16)
    r = execute(code, ["assert True"], limits)
    started = int(r.stdout.split()[0])
    assert started < limits.max_processes  # the cgroup refused the rest (EAGAIN)
    assert r.passed
    time.sleep(0.2)
    assert _processes_with(marker) == []


@needs_pidns
def test_a_daemon_does_not_outlive_the_run():
    marker = "daemon-51c2"
    code = (
        "import os, subprocess\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # leaves the process group and the session
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sh', ['/bin/sh', '-c', 'sleep 600; :', '{marker}'])\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    )
    r = execute(code, ["assert True"], FAST)
    assert r.passed
    time.sleep(0.2)
    assert _processes_with(marker) == []


@needs_pidns
def test_the_program_cannot_kill_the_parent_or_other_processes():
    sentinel = subprocess.Popen(["/bin/sh", "-c", "sleep 600; :", "sentinel-9d1e"])
    try:
        code = (
            "import os, signal\n"
            f"for pid in ({os.getpid()}, {sentinel.pid}):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e:\n"
            "        print(type(e).__name__)\n"
            "try:\n"
            "    os.kill(-1, signal.SIGKILL)\n"  # every process it may signal: only its own namespace
            "except OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        r = execute(code, [], FAST)
        # in its own pid namespace our pids name nothing, and kill(-1) reaches only the namespace
        assert r.stdout.split()[:2] == ["ProcessLookupError", "ProcessLookupError"]
        assert sentinel.poll() is None  # the sentinel lives, and so do we
        os.kill(os.getpid(), 0)
    finally:
        sentinel.kill()
        sentinel.wait()


# --- memory, output, stack ----------------------------------------------------------------------------------


def test_a_memory_bomb_hits_the_memory_limit():
    limits = Limits(timeout_s=10.0, memory_bytes=512 * 1024**2)
    r = execute("", ["x = bytearray(4 * 1024**3)", "chunks = []\nwhile True:\n    chunks.append(b'x' * 2**24)"], limits)
    assert [t.status for t in r.tests] == ["memory_limit", "memory_limit"]
    assert r.tests[0].exc_type == "MemoryError"
    assert r.status == "memory_limit"


@needs_memcg
def test_a_memory_bomb_spread_over_processes_is_bounded_by_the_runs_memory_cgroup():
    """Each child stays under RLIMIT_AS (512 MiB each); together they would need 2.4 GiB of a 1 GiB run."""
    code = (
        "import os\n"
        "children = []\n"
        "for _ in range(6):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * (400 * 1024**2)\n"  # written, so the pages are really used
        "        import time; time.sleep(3)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]\n"
    )
    limits = Limits(timeout_s=20.0, memory_bytes=1024**3)
    r = execute(code, ["assert codes == [0] * 6, codes"], limits)
    assert r.oom_kills >= 3  # at most two 400 MiB children fit in 1 GiB
    assert r.tests[0].status == "failed" and "-9" in r.tests[0].message  # the line saw its children SIGKILLed
    assert r.status == "memory_limit"  # and the run says why


def test_huge_output_is_capped_and_reported():
    limits = Limits(timeout_s=10.0, output_bytes=64 * 1024)
    r = execute("import sys", ["sys.stdout.write('x' * (4 * 1024 * 1024))"], limits)
    assert r.status == "output_limit" and r.output_capped  # one big write is cut short silently: seen by size
    assert len(r.stdout) <= limits.output_bytes
    r = execute("", ["assert True", "for _ in range(100):\n    print('y' * 100_000)", "assert True"], limits)
    assert [t.status for t in r.tests] == ["passed", "output_limit", "passed"]  # later writes fail: EFBIG
    assert r.tests[1].exc_type == "OSError" and r.status == "output_limit"


def test_output_from_a_child_process_is_capped_too():
    limits = Limits(timeout_s=10.0, output_bytes=64 * 1024)
    r = execute("import subprocess", ["subprocess.run(['/bin/sh', '-c', 'yes | head -c 10000000'])"], limits)
    assert r.status == "output_limit" and len(r.stdout) <= limits.output_bytes


def test_deep_recursion_is_an_error_and_a_blown_c_stack_is_killed():
    r = execute("def f(n):\n    return f(n + 1)", ["f(0)"], FAST)
    assert r.tests[0].status == "error" and r.tests[0].exc_type == "RecursionError"
    # recursion through C (map) uses the C stack; with the recursion limit lifted it overflows
    r = execute("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return list(map(f, [n + 1]))", ["f(0)"], FAST)
    assert r.status == "killed" and "SIGSEGV" in (r.tests[0].message or "")


def test_a_ctypes_segfault_is_reported_as_killed():
    r = execute("import ctypes", ["assert True", "ctypes.string_at(0)", "assert True"], FAST)
    assert [t.status for t in r.tests] == ["passed", "killed", "killed"]
    assert r.status == "killed" and r.returncode != 0


def test_closing_its_own_stdout_does_not_lose_the_results():
    r = execute("import os\nos.close(1)\nos.close(2)", ["assert 2 + 2 == 4"], FAST)
    assert r.passed and r.tests[0].status == "passed"


def test_closing_every_descriptor_reports_lines_as_not_run():
    r = execute("import os\nos.closerange(0, 1024)", ["assert True"], FAST)
    assert r.tests[0].status == "error" and not r.passed


# --- network -----------------------------------------------------------------------------------------------


@needs_netns
def test_the_network_is_unreachable_and_only_a_loopback_is_visible():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(3.0)
    port = listener.getsockname()[1]
    accepted: list = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(listener)), daemon=True)
    thread.start()
    code = "import socket\nnames = [name for _, name in socket.if_nameindex()]\nprint(names)\n"
    tests = [
        f"socket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "assert names == ['lo'], names",
    ]
    try:
        r = execute(code, tests, FAST)
    finally:
        thread.join(5.0)
        listener.close()
    assert r.tests[0].status == "error" and r.tests[0].exc_type in ("OSError", "ConnectionRefusedError")
    assert r.tests[1].status == "passed", r.tests[1].message
    assert accepted == [None]  # the listener outside saw no connection
    if ISO.netns == "unshare":  # a namespace of our own: the loopback is not even up
        r = execute("import fcntl, socket, struct", [_LOOPBACK_DOWN], FAST)
        assert r.passed, r.tests[0].message


_LOOPBACK_DOWN = (
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "flags = struct.unpack('16sH', fcntl.ioctl(s.fileno(), 0x8913, struct.pack('16sH', b'lo', 0)))[1]\n"
    "assert not flags & 0x1, 'loopback is up'"  # SIOCGIFFLAGS, IFF_UP
)


def _accept(listener: socket.socket):
    try:
        conn, _ = listener.accept()
        conn.close()
        return "connected"
    except OSError:
        return None


def test_without_a_network_namespace_the_sandbox_refuses_unless_allowed(monkeypatch):
    bare = Isolation(is_root=ISO.is_root, bwrap=None, netns=None, cgroups=(), prlimit=ISO.prlimit)
    monkeypatch.setattr(execution_module, "probe", lambda: bare)
    monkeypatch.delenv(execution_module.ALLOW_NETWORK_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="network"):
        execute("x = 1", ["assert x == 1"], FAST)
    assert execute("x = 1", ["assert x == 1"], Limits(timeout_s=5.0, allow_network=True)).passed
    monkeypatch.setenv(execution_module.ALLOW_NETWORK_ENV, "1")
    assert execute("x = 1", ["assert x == 1"], FAST).passed


# --- files and secrets -------------------------------------------------------------------------------------


@needs_fs
def test_files_outside_the_sandbox_cannot_be_written_or_deleted():
    outside = Path(tempfile.mkdtemp(prefix="codeaccel-victim-", dir="/var/tmp"))
    victim = outside / "keep.txt"
    victim.write_text("precious")
    project_file = Path(__file__).resolve()
    try:
        tests = [
            f"open({str(victim)!r}, 'w').write('gone')",
            f"os.remove({str(victim)!r})",
            f"open({str(outside / 'new.txt')!r}, 'w')",
            f"open({str(project_file)!r}, 'a').write('# pwned')",
            "open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'",
        ]
        r = execute("import os", tests, FAST)
        assert [t.status for t in r.tests] == ["error"] * 4 + ["passed"]
        assert all("Read-only file system" in (t.message or "") for t in r.tests[:3])
        # the project: read-only, or not even there when the checkout lies under the private /tmp
        assert r.tests[3].exc_type in ("OSError", "FileNotFoundError")
        assert victim.read_text() == "precious" and not (outside / "new.txt").exists()
        assert not project_file.read_text().endswith("# pwned")
    finally:
        victim.unlink(missing_ok=True)
        outside.rmdir()


@needs_fs
def test_home_files_and_environment_secrets_are_out_of_reach(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    secret = Path.home() / ".codeaccel-test-secret"
    secret.write_text("hunter2")
    try:
        code = "import os\n"
        tests = [
            "assert os.environ.get('SECRET_TOKEN') is None",
            "assert 'hunter2' not in repr(dict(os.environ))",
            f"open({str(secret)!r}).read()",
        ]
        r = execute(code, tests, FAST)
        assert [t.status for t in r.tests] == ["passed", "passed", "error"]
        assert r.tests[2].exc_type == "FileNotFoundError"
    finally:
        secret.unlink()


@needs_fs
def test_the_program_runs_in_a_private_size_capped_temp_dir():
    limits = Limits(timeout_s=10.0, disk_bytes=8 * 1024**2)
    tests = [
        "assert os.getcwd() == '/tmp/work' and os.listdir('.') == []",
        "assert not [n for n in os.listdir('/tmp') if n.startswith('codeaccel-run-')]",
        "for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * 512 * 1024)",  # 50 MiB into an 8 MiB tmpfs
    ]
    r = execute("import os", tests, limits)
    assert [t.status for t in r.tests] == ["passed", "passed", "error"]
    assert "No space left" in r.tests[2].message


def test_nothing_is_left_in_the_host_temp_dir():
    before = set(Path(tempfile.gettempdir()).glob("codeaccel-run-*"))
    execute("open('x.txt', 'w').write('x')", ["assert True"], FAST)
    assert set(Path(tempfile.gettempdir()).glob("codeaccel-run-*")) == before


# --- throughput --------------------------------------------------------------------------------------------


def test_the_pool_keeps_order_and_runs_in_parallel():
    jobs = [Job(f"import time\nx = {i}", ["time.sleep(0.5)", f"assert x == {i}"], FAST) for i in range(4)]
    start = time.perf_counter()
    with SandboxPool(workers=4) as pool:
        results = list(pool.map(jobs))
    assert [r.passed for r in results] == [True] * 4
    assert time.perf_counter() - start < 4 * 0.5 + 1.0  # sequential would take over 2 s of sleeping alone


# --- after the suite ---------------------------------------------------------------------------------------


def _sandbox_traces() -> dict[str, set]:
    """Every process, cgroup and run folder a sandbox run leaves while it lives (any process's runs)."""
    markers = ("forkbomb-7f3a", "daemon-51c2", "/tmp/.codeaccel/runner.py")
    cgroups = {f"{c.parent}/{p.name}" for c in ISO.cgroups for p in c.parent.iterdir() if p.name.startswith("run-")}
    return {
        "processes": {pid for marker in markers for pid in _processes_with(marker)},
        "cgroups": cgroups,
        "folders": set(Path(tempfile.gettempdir()).glob("codeaccel-run-*")),
    }


@pytest.fixture(scope="module", autouse=True)
def traces_before_the_suite() -> dict[str, set]:
    """What other processes' sandboxes (a benchmark running beside the suite) had left before this file ran."""
    return _sandbox_traces()


def test_zz_the_suite_left_no_processes_cgroups_or_files(traces_before_the_suite):
    """Runs last (file order): nothing of any run above remains."""
    after = _sandbox_traces()
    assert {kind: found - traces_before_the_suite[kind] for kind, found in after.items()} == {
        "processes": set(), "cgroups": set(), "folders": set()
    }  # fmt: skip
    os.kill(os.getpid(), 0)  # and the parent is alive


def test_a_continued_run_takes_execute_s_own_verdict_order():
    from codeaccel.sandbox.execution import ExecutionResult, LineResult
    from codeaccel.sandbox.pool import _continued

    def run(tests, oom=0, capped=False):
        status = next((t.status for t in tests if t.status != "passed"), "passed")
        return ExecutionResult(status, tests, "ok", None, 0, 1.0, 0.5, "", "", capped, oom)

    cut = LineResult("b", "timeout", "OutOfBudget", "no time left in the run")
    first = run([LineResult("a", "failed", "AssertionError"), cut])
    assert _continued(first, run([LineResult("b", "passed")])).status == "failed"  # the first line's verdict
    assert _continued(first, run([LineResult("b", "passed")], oom=1)).status == "memory_limit"  # as execute says
    passed = _continued(run([LineResult("a", "passed"), cut]), run([LineResult("b", "passed")], capped=True))
    assert passed.status == "output_limit" and [t.status for t in passed.tests] == ["passed", "passed"]
    assert passed.wall_s == 2.0 and passed.cpu_s == 1.0
