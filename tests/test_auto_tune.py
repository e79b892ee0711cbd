"""The personalization loop started by itself: a tuning child at the threshold, one at a time, bounded.

Contract: no tuning below the threshold; at it, one child process with its log in the versions
folder, never a second while one runs; the child's command is ``codeaccel draft train`` with its
time and memory bounds; two tunings of one versions folder never run at once (across processes);
a memory bound makes allocation past it fail; the server reconciles select events its accepted
store missed, and refuses auto tuning without a versions folder to promote into.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codeaccel.errors import UserError
from codeaccel.personalization.auto_tune import AutoTuneConfig, AutoTuner
from codeaccel.personalization.versions import DraftVersions


def _config(tmp_path, threshold=3):
    return AutoTuneConfig("draft.gguf", "target.gguf", str(tmp_path / "accepted.sqlite"), tmp_path, threshold=threshold,
                          max_seconds=60, max_memory_mb=2048)  # fmt: skip


def test_a_tuning_starts_at_the_threshold_once_and_logs_to_the_versions_folder(tmp_path):
    new = [0]
    marker = tmp_path / "ran"
    child = [sys.executable, "-c", f"import time, pathlib; print('tuning'); time.sleep(0.5); "
                                   f"pathlib.Path({str(marker)!r}).write_text('x')"]  # fmt: skip
    tuner = AutoTuner(_config(tmp_path), lambda: new[0], command=child)
    assert tuner.check() is False and tuner.started == 0  # nothing new
    new[0] = 2
    assert tuner.check() is False  # below the threshold
    new[0] = 3
    assert tuner.check() is True and tuner.running
    new[0] = 10
    assert tuner.check() is False and tuner.started == 1  # never two at once
    assert tuner.wait(30) == 0 and marker.is_file() and not tuner.running
    assert tuner.last_log.parent == tmp_path and "tuning" in tuner.last_log.read_text()
    assert tuner.check() is True and tuner.started == 2  # finished: the next threshold starts another
    tuner.close()


def test_a_failing_tuning_is_reaped_and_a_running_one_is_stopped_on_close(tmp_path):
    tuner = AutoTuner(_config(tmp_path, threshold=1), lambda: 5, command=[sys.executable, "-c", "raise SystemExit(3)"])
    assert tuner.check() and tuner.wait(30) == 3
    sleeper = AutoTuner(_config(tmp_path, threshold=1), lambda: 5,
                        command=[sys.executable, "-c", "import time; time.sleep(60)"])  # fmt: skip
    assert sleeper.check() and sleeper.running
    child = sleeper._child
    sleeper.close(grace_s=5)
    assert child.poll() is not None and not sleeper.running  # the process itself is gone


def test_after_a_failed_tuning_the_next_waits_for_as_many_new_accepted_completions(tmp_path):
    new = [3]
    tuner = AutoTuner(_config(tmp_path, threshold=3), lambda: new[0], command=[sys.executable, "-c", "exit(1)"])
    assert tuner.check() and tuner.wait(30) == 1
    new[0] = 5
    assert tuner.check() is False  # no retry loop on every accepted completion
    new[0] = 6
    assert tuner.check() is True and tuner.started == 2
    tuner.wait(30)


def test_an_unreachable_store_starts_nothing_and_is_asked_again(tmp_path):
    calls = []

    def count():
        calls.append(1)
        raise OSError("store down")

    tuner = AutoTuner(_config(tmp_path), count, command=[sys.executable, "-c", "pass"])
    assert tuner.check() is False and tuner.check() is False and len(calls) == 2


def test_the_child_is_draft_train_niced_with_its_bounds():
    config = AutoTuneConfig("0.5b", "1.5b", "postgresql://u:secret@db/x", Path("/v"), threshold=7,
                            max_seconds=120, max_memory_mb=3000)  # fmt: skip
    cmd = config.command()
    assert cmd[:3] == ["nice", "-n", "10"] and cmd[4:8] == ["-m", "codeaccel", "draft", "train"]
    flags = dict(zip(cmd[8::2], cmd[9::2]))
    assert flags == {"--draft-model": "0.5b", "--target-model": "1.5b",
                     "--versions": "/v", "--threshold": "7", "--max-seconds": "120",
                     "--max-memory-mb": "3000"}  # fmt: skip
    assert "secret" not in " ".join(cmd)  # the store's URL goes in the environment, not where ps shows it
    assert config.environment() == {"CODEACCEL_ACCEPTED_STORE": "postgresql://u:secret@db/x"}
    with pytest.raises(UserError):
        AutoTuneConfig("a", "b", "s", Path("/v"), threshold=0)


def test_draft_train_reads_its_store_from_the_environment(tmp_path):
    from test_cli import run_cli

    missing = tmp_path / "nowhere.sqlite"
    result = run_cli("draft", "train", "--draft-model", "0.5b", "--target-model", "1.5b",
                     env={**os.environ, "CODEACCEL_ACCEPTED_STORE": str(missing)})  # fmt: skip
    assert result.returncode == 2 and str(missing) in result.stderr


def test_two_tunings_of_one_versions_folder_never_run_at_once(tmp_path):
    versions = DraftVersions(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from codeaccel.personalization.versions import DraftVersions
        with DraftVersions({str(tmp_path)!r}).training():
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="already running"):
            with versions.training():
                pass
    finally:
        holder.kill()
        holder.wait()
    with versions.training():  # released with its process
        pass


def test_a_memory_bound_makes_allocation_past_it_fail():
    code = textwrap.dedent("""
        from codeaccel.personalization.finetune import bound_memory
        bound_memory(400)
        try:
            block = bytearray(800 * 1024 * 1024)
        except MemoryError:
            print("refused")
        else:
            print("allocated")
        small = bytearray(50 * 1024 * 1024)  # within the bound: still fine
        print("ok")
        """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["refused", "ok"]


def test_draft_train_reports_running_out_of_its_memory_bound_in_one_line(tmp_path, tiny_gguf, tiny_gguf_draft,
                                                                        monkeypatch):  # fmt: skip
    from typer.testing import CliRunner

    import codeaccel.cli.draft as draft_cli
    from codeaccel.cli import app
    from codeaccel.personalization.store import Accepted, open_store

    bounds = []
    monkeypatch.setattr(draft_cli, "bound_memory", bounds.append)  # not on the test process itself

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(draft_cli, "run_tuning", out_of_memory)
    store = tmp_path / "accepted.sqlite"
    with open_store(store) as accepted:
        accepted.add(Accepted("def f():\n", "    return 1\n"))
    result = CliRunner().invoke(app, ["draft", "train", "--draft-model", tiny_gguf_draft, "--target-model", tiny_gguf,
                                      "--store", str(store), "--versions", str(tmp_path / "v"), "--force",
                                      "--max-memory-mb", "512"])  # fmt: skip
    assert isinstance(result.exception, UserError) and bounds == [512]  # main() maps it to one line, exit 2
    assert "more memory than --max-memory-mb 512" in str(result.exception)


def test_the_server_joins_select_events_its_accepted_store_missed(tmp_path):
    from codeaccel.serve.app import ServerState
    from codeaccel.serve.schemas import EventRequest
    from codeaccel.serve.settings import ServeSettings

    settings = ServeSettings(model="unused", method="draft-model", draft_versions=tmp_path / "v",
                             events_db=tmp_path / "events.sqlite", auto_tune=100)  # fmt: skip
    (tmp_path / "v").mkdir()
    state = ServerState(settings)
    try:
        state.accepted.record_served("cmpl-1", [(0, "prompt", "completion 0"), (1, "prompt", "completion 1")], "m")
        state.events.add(EventRequest(type="select", completion_id="cmpl-1", choice_index=1))  # storing it failed
        state.events.add(EventRequest(type="select", completion_id="cmpl-unknown", choice_index=0))
        state.events.add(EventRequest(type="view", completion_id="cmpl-1", choice_index=0))
        assert state.accepted.count() == 0
        assert state.reconcile_selects() == 1
        assert [s.item.completion for s in state.accepted.items()] == ["completion 1"]
        state.reconcile_selects()  # again: nothing is stored twice
        assert state.accepted.count() == 1
        assert state.auto_tuner is not None and state.auto_tuner.config.threshold == 100
    finally:
        state.accepted.close()
    with pytest.raises(ValueError, match="draft_versions"):
        ServeSettings(model="unused", auto_tune=5)
