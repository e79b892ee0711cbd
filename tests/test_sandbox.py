"""The execution API's basic guarantees (issue 5 adds the adversarial suite)."""

import os
import time

from codeaccel.sandbox import OUTPUT_CAP_BYTES, run_program


def test_pass_fail_error_are_told_apart():
    assert run_program("assert 1 + 1 == 2\nprint('ok')").status == "passed"
    assert run_program("assert 1 + 1 == 3").status == "failed"
    result = run_program("raise KeyError('boom')")
    assert result.status == "error" and "KeyError" in result.stderr
    assert run_program("def f(:\n  pass").status == "error"


def test_timeout_is_enforced():
    start = time.perf_counter()
    result = run_program("while True:\n    pass", timeout_s=1.0)
    assert result.status == "timeout"
    assert time.perf_counter() - start < 5


def test_background_children_do_not_outlive_the_run():
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "print(p.pid, flush=True)\n"
    )
    result = run_program(code)
    assert result.status == "passed"
    pid = int(result.stdout.split()[0])
    time.sleep(0.2)
    try:
        os.kill(pid, 0)
        alive = open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive


def test_output_is_capped():
    result = run_program("import sys\nsys.stdout.write('x' * (4 * 1024 * 1024))")
    assert len(result.stdout) <= OUTPUT_CAP_BYTES
    assert result.status != "passed"  # writing past the cap is an error (SIGXFSZ), not a silent pass


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    result = run_program("import os\nprint(os.environ.get('SECRET_TOKEN'))")
    assert result.stdout.strip() == "None"


def test_runs_in_a_fresh_directory():
    result = run_program("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))")
    cwd, listing = result.stdout.splitlines()
    assert cwd != os.getcwd() and "codeaccel-run-" in cwd
    assert "program.py" in listing
    assert not os.path.exists(cwd)
