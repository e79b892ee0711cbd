"""A cgroup per run: hard bounds on the processes and the memory of everything a program starts.

RLIMIT_NPROC does not bind root (and counts every process of the user, not of one
run), and RLIMIT_AS bounds each process, not their sum (32 processes of 2 GiB each
would be 64 GiB). So a run gets its own cgroup in the ``pids`` controller
(``pids.max``) and the ``memory`` controller (the sum of its memory, tmpfs pages
included; past it the kernel's OOM killer picks a process of the run, never one
outside). cgroup v1 (one hierarchy per controller) and v2 (one for all) both work.
The program joins before it runs (``echo $$ > cgroup.procs && exec ...``), so
everything it forks is counted and found again when the run ends, even a daemon
that left the process group and the session.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PARENT_NAME = "codeaccel-sandbox"
# controller -> (v1 limit file, v2 limit file)
LIMIT_FILES = {"pids": ("pids.max", "pids.max"), "memory": ("memory.limit_in_bytes", "memory.max")}


@dataclass(frozen=True)
class Controller:
    """Where this process may create per-run cgroups of one controller."""

    name: str  # "pids" or "memory"
    parent: Path
    v2: bool

    @property
    def limit_file(self) -> str:
        return LIMIT_FILES[self.name][1 if self.v2 else 0]


def find_controller(name: str) -> Controller | None:
    """The controller's writable parent directory (made if needed), or None where there is none."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint, fstype, options = Path(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cgroup" and name in options:
            controller = Controller(name, mountpoint / PARENT_NAME, v2=False)
        elif fstype == "cgroup2" and name in _read(mountpoint / "cgroup.controllers").split():
            controller = Controller(name, mountpoint / PARENT_NAME, v2=True)
            if not _enable_v2(mountpoint, controller.parent, name):
                continue
        else:
            continue
        if _probe(controller):
            return controller
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _enable_v2(root: Path, parent: Path, name: str) -> bool:
    """cgroup v2: the controller must be enabled in the root's and the parent's subtree_control."""
    try:
        parent.mkdir(exist_ok=True)
        for cg in (root, parent):
            if name not in _read(cg / "cgroup.subtree_control").split():
                (cg / "cgroup.subtree_control").write_text(f"+{name}")
        return True
    except OSError:
        return False


def _probe(controller: Controller) -> bool:
    try:
        controller.parent.mkdir(exist_ok=True)
        probe = controller.parent / f"probe-{os.getpid()}"
        probe.mkdir()
        try:
            (probe / controller.limit_file).write_text(str(64 * 1024**2 if controller.name == "memory" else 8))
        finally:
            probe.rmdir()
        return True
    except OSError:
        return False


class RunCgroup:
    """One run's cgroups (one per controller; v2 controllers share one directory), limits set.

    ``procs_files`` are what the program's wrapper writes its pid into; at the end
    :meth:`remove` kills every member and deletes the directories.
    """

    def __init__(self, limits: dict[Controller, int]):
        name = f"run-{uuid.uuid4().hex[:12]}"
        self.dirs: list[Path] = []
        self._memory: tuple[Path, bool] | None = None
        try:
            for controller, limit in limits.items():
                path = controller.parent / name
                if path not in self.dirs:
                    path.mkdir()
                    self.dirs.append(path)
                (path / controller.limit_file).write_text(str(limit))
                if controller.name == "memory":
                    self._memory = (path, controller.v2)
        except OSError:
            self.remove()
            raise

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def pids(self) -> set[int]:
        return {int(p) for d in self.dirs for p in _read(d / "cgroup.procs").split()}

    def oom_kills(self) -> int:
        """Processes the kernel killed because the run reached its memory limit."""
        if self._memory is None:
            return 0
        path, v2 = self._memory
        for line in _read(path / ("memory.events" if v2 else "memory.oom_control")).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

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
                log.warning("cgroup %s still holds %d processes after %.0f s", self.dirs[0], len(pids), deadline_s)
                return
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill_all()
        for path in self.dirs:
            for _ in range(100):  # killed processes leave the cgroup once reaped
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
            else:
                log.warning("could not remove cgroup %s", path)
