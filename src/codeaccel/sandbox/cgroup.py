"""A pids cgroup per run: a hard bound on the processes a program can start, and a list to kill.

RLIMIT_NPROC does not bind root (and counts every process of the user, not of one
run), so the process bound is a cgroup's ``pids.max``: cgroup v1's ``pids``
hierarchy, or cgroup v2 where the ``pids`` controller can be enabled. The program
is put in the cgroup before it runs (``echo $$ > cgroup.procs && exec ...``), so
everything it forks is counted and found again when the run ends, even a daemon
that left the process group and the session.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

PARENT_NAME = "codeaccel-sandbox"


def find_pids_root() -> Path | None:
    """The directory under which this process may create pids cgroups, or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup" and "pids" in options:
            candidate = Path(mountpoint) / PARENT_NAME
        elif fstype == "cgroup2" and "pids" in _read(Path(mountpoint) / "cgroup.controllers").split():
            candidate = Path(mountpoint) / PARENT_NAME
            if not _enable_v2_pids(Path(mountpoint), candidate):
                continue
        else:
            continue
        if _probe(candidate):
            return candidate
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _enable_v2_pids(root: Path, parent: Path) -> bool:
    """cgroup v2: the pids controller must be enabled in the root's and the parent's subtree_control."""
    try:
        parent.mkdir(exist_ok=True)
        for cg in (root, parent):
            if "pids" not in _read(cg / "cgroup.subtree_control").split():
                (cg / "cgroup.subtree_control").write_text("+pids")
        return True
    except OSError:
        return False


def _probe(parent: Path) -> bool:
    try:
        parent.mkdir(exist_ok=True)
        probe = parent / f"probe-{os.getpid()}"
        probe.mkdir()
        try:
            (probe / "pids.max").write_text("8")
        finally:
            probe.rmdir()
        return True
    except OSError:
        return False


class PidsCgroup:
    """One run's cgroup: created with a pids.max, emptied (SIGKILL) and removed when the run ends."""

    def __init__(self, parent: Path, max_pids: int):
        self.path = parent / f"run-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(max_pids))

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.procs_file).split()]

    def peak(self) -> int | None:
        text = _read(self.path / "pids.peak").strip()
        return int(text) if text.isdigit() else None

    def kill_all(self, deadline_s: float = 5.0) -> None:
        """SIGKILL every member until none is left (a fork bomb refills it while we kill: loop)."""
        end = time.monotonic() + deadline_s
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if time.monotonic() > end:
                log.warning("cgroup %s still holds %d processes after %.0f s", self.path, len(pids), deadline_s)
                return
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(100):  # killed processes leave the cgroup once reaped
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)
        log.warning("could not remove cgroup %s", self.path)
