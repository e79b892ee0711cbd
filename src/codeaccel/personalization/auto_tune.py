"""The loop started by itself: when enough new accepted completions arrived, a tuning in a child process.

The server calls :meth:`AutoTuner.check` after each accepted completion it stores (and once when it
starts). When at least ``threshold`` accepted completions are newer than the last tuning's and no
tuning of its own is running, it starts ``codeaccel draft train`` for its store and versions folder
as a child process: at a lower CPU priority (``nice``), with its memory bounded
(``--max-memory-mb``: a tuning that outgrows it fails alone and the server keeps serving), its
time bounded (``--max-seconds``), and its progress in a log file of the versions folder
(``train-<time>.log``). The child validates the tuned draft and promotes it only if it is better;
the server's :class:`~codeaccel.serve.draft_follow.DraftFollower` then swaps it in. Two processes
never tune one versions folder at once: ``draft train`` holds the folder's training lock.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from codeaccel.errors import UserError
from codeaccel.personalization.store import STORE_ENV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoTuneConfig:
    draft_model: str
    target_model: str
    store: str  # the accepted store, as ``draft train --store`` takes it (an SQLite path or a postgresql:// URL)
    versions: Path  # the versions folder the server follows
    threshold: int = 50  # new accepted completions that start a tuning
    max_seconds: float = 900.0  # the tuning's training time
    max_memory_mb: int = 8192  # the tuning process's data segment
    nice: int = 10  # the serving process's requests come first

    def __post_init__(self) -> None:
        if self.threshold < 1 or self.max_seconds <= 0 or self.max_memory_mb < 1 or not 0 <= self.nice <= 19:
            raise UserError("auto tuning: threshold >= 1, max seconds > 0, max memory >= 1 MB, nice in 0..19")

    def command(self) -> list[str]:
        """The child's command line: ``codeaccel draft train`` with this configuration (the store goes in
        :meth:`environment`: a PostgreSQL URL's password is no business of ``ps``)."""
        return [
            "nice", "-n", str(self.nice), sys.executable, "-m", "codeaccel", "draft", "train",
            "--draft-model", self.draft_model, "--target-model", self.target_model,
            "--versions", str(self.versions), "--threshold", str(self.threshold),
            "--max-seconds", str(self.max_seconds), "--max-memory-mb", str(self.max_memory_mb),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        """What the child reads from its environment: the store (``draft train``'s ``--store``)."""
        return {STORE_ENV: self.store}


class AutoTuner:
    """Starts a tuning when ``new_accepted()`` reaches the threshold; at most one child at a time (thread-safe)."""

    def __init__(self, config: AutoTuneConfig, new_accepted: Callable[[], int],
                 command: list[str] | None = None):  # fmt: skip
        """``new_accepted()``: accepted completions newer than the last tuning's. ``command``: the child's
        command line (default: ``config.command()``; tests give another)."""
        self.config = config
        self._new_accepted = new_accepted
        self._command = command or config.command()
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._started_at_new = 0  # new accepted completions when the running (or last) tuning started
        self._wait_for = 0  # after a failed tuning: new accepted completions needed before another (no retry loop)
        self.started = 0  # tunings started by this process
        self.last_log: Path | None = None
        self.last_returncode: int | None = None

    @property
    def running(self) -> bool:
        with self._lock:
            return self._child is not None and self._child.poll() is None

    def check(self) -> bool:
        """Start a tuning if the threshold is reached and none of ours runs; whether one was started. Never
        raises: a store or a folder that fails now is logged, and the next accepted completion checks again.
        After a failed tuning another starts only once ``threshold`` more accepted completions arrived."""
        with self._lock:
            if self._child is not None:
                if self._child.poll() is None:
                    return False
                self._reap()
            try:
                new = self._new_accepted()
            except Exception:
                log.exception("counting new accepted completions failed")
                return False
            if new < max(self.config.threshold, self._wait_for):
                return False
            name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{self.started + 1}.log"
            try:
                with open(self.config.versions / name, "ab") as out:
                    self._child = subprocess.Popen(self._command, stdin=subprocess.DEVNULL, stdout=out,
                                                   stderr=subprocess.STDOUT, start_new_session=True,
                                                   env={**os.environ, **self.config.environment()})  # fmt: skip
            except OSError:
                log.exception("starting the draft tuning failed")
                return False
            self.last_log = self.config.versions / name
            self._started_at_new = new
            self.started += 1
            log.warning("%d new accepted completions: tuning the draft (pid %d, log %s)", new, self._child.pid,
                        self.last_log)  # fmt: skip
            return True

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Wait for the running tuning (if any); its exit status (None: none ran, or still running)."""
        with self._lock:
            child = self._child
        if child is None:
            return self.last_returncode
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        with self._lock:
            if self._child is child:
                self._reap()
        return self.last_returncode

    def close(self, grace_s: float = 10.0) -> None:
        """Stop a running tuning (SIGTERM, then SIGKILL after ``grace_s``): nothing of it is promoted."""
        with self._lock:
            child, self._child = self._child, None
        if child is None or child.poll() is not None:
            return
        _signal_group(child, signal.SIGTERM)  # its own session: whatever it started goes too
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.wait()

    def _reap(self) -> None:
        """The finished child's status, logged (under the lock)."""
        self.last_returncode = self._child.returncode
        if self.last_returncode:
            self._wait_for = self._started_at_new + self.config.threshold
            log.error("the draft tuning failed (exit %d): see %s; the next one waits for %d more accepted "
                      "completions", self.last_returncode, self.last_log, self.config.threshold)  # fmt: skip
        else:
            self._wait_for = 0
            log.warning("the draft tuning finished: see %s", self.last_log)
        self._child = None


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:  # already gone
        pass
