"""Which isolation layers this machine supports, and the command line that stacks them.

A run is one command line, each layer a well-kept tool that execs the next:

    sh -c 'echo $$ > <cgroup>/cgroup.procs && exec "$@"'     pids + memory cgroup (bounds, kill list)
      prlimit --cpu --as --fsize --nofile --core [--nproc]     resource limits (util-linux)
        unshare --net                                          fresh network namespace: only an
                                                               unconfigured loopback (as root)
          bwrap --ro-bind / / --tmpfs /tmp --tmpfs $HOME ...   read-only filesystem, private /tmp,
                --unshare-pid --die-with-parent --cap-drop ALL  hidden homes, own pid namespace
            python -I -B runner.py                             the program and its tests

Every layer is probed once per process (:func:`probe`); one that does not work here
is left out and reported by ``codeaccel sandbox check``. Without any network
namespace the sandbox refuses to run unless the caller opts in (``allow_network``).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from codeaccel.sandbox.cgroup import Controller, find_controller

log = logging.getLogger(__name__)

NetNs = Literal["unshare", "bwrap"]
RUNNER = Path(__file__).with_name("runner.py")
SANDBOX_RUNNER = "/tmp/.codeaccel/runner.py"  # where the runner appears inside the sandbox
SANDBOX_WORKDIR = "/tmp/work"  # the program's working directory (and HOME) inside the sandbox


@dataclass(frozen=True)
class Layer:
    name: str
    active: bool
    detail: str


@dataclass(frozen=True)
class Isolation:
    """What this machine lets the sandbox use (see :func:`probe`)."""

    is_root: bool
    bwrap: str | None  # bubblewrap's path, if it runs here
    netns: NetNs | None  # how a run gets a fresh network namespace, if at all
    cgroups: tuple[Controller, ...]  # the cgroup controllers a run can be bounded by (pids, memory)
    prlimit: str | None

    def controller(self, name: str) -> Controller | None:
        return next((c for c in self.cgroups if c.name == name), None)

    @functools.cached_property
    def active_layers(self) -> tuple[str, ...]:
        """The names of the layers in use (computed once: every execution reports them)."""
        return tuple(layer.name for layer in self.layers() if layer.active)

    def layers(self) -> list[Layer]:
        fs = (
            "bubblewrap: / read-only, private /tmp and /dev/shm (size-capped tmpfs), homes hidden"
            if self.bwrap
            else "not isolated: install bubblewrap (apt-get install bubblewrap); runs in a temp dir only"
        )
        net = {
            "unshare": "fresh network namespace (unshare --net): an unconfigured loopback, nothing else",
            "bwrap": "fresh network namespace (bubblewrap, user namespace): loopback only",
            None: "NONE: neither unshare --net nor bubblewrap works here; runs need allow_network",
        }[self.netns]
        pids, memory = self.controller("pids"), self.controller("memory")
        if pids:
            procs = f"pids cgroup under {pids.parent} (pids.max per run; every member killed at the end)"
        elif not self.is_root:
            procs = "RLIMIT_NPROC (per user, not per run: no writable pids cgroup)"
        else:
            procs = "NONE: no writable pids cgroup, and RLIMIT_NPROC does not bind root"
        if memory:
            mem = f"memory cgroup under {memory.parent}: the run's processes together, tmpfs included"
        else:
            mem = "NONE: no writable memory cgroup; only RLIMIT_AS, per process"
        return [
            Layer("process group + session", True, "own session; the whole group is killed at the end"),
            Layer("pid namespace", self.bwrap is not None, "bubblewrap --unshare-pid: nothing outlives the run"),
            Layer("resource limits", self.prlimit is not None, "prlimit: CPU s, address space, file size, open files"),
            Layer("process bound", pids is not None or not self.is_root, procs),
            Layer("memory bound", memory is not None, mem),
            Layer("network", self.netns is not None, net),
            Layer("filesystem", self.bwrap is not None, fs),
            Layer("environment", True, "scrubbed: PATH, LANG, HOME, TMPDIR, PYTHONHASHSEED only"),
            Layer("output", True, "stdout/stderr to files capped by RLIMIT_FSIZE"),
        ]


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


BWRAP_PROBE = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid", "--die-with-parent"]


@functools.cache
def probe() -> Isolation:
    """Find out, by trying each, which layers work on this machine (cached per process)."""
    is_root = os.geteuid() == 0
    bwrap = shutil.which("bwrap")
    if bwrap and not _works([bwrap, *BWRAP_PROBE, "--", "/bin/true"]):
        log.warning("bubblewrap is installed but cannot create namespaces here; filesystem isolation is off")
        bwrap = None
    unshare = shutil.which("unshare")
    netns: NetNs | None = None
    if is_root and unshare and _works([unshare, "--net", "--", "/bin/true"]):
        netns = "unshare"
    elif bwrap and _works([bwrap, *BWRAP_PROBE, "--unshare-net", "--", "/bin/true"]):
        netns = "bwrap"
    return Isolation(
        is_root=is_root,
        bwrap=bwrap,
        netns=netns,
        cgroups=tuple(c for c in (find_controller("pids"), find_controller("memory")) if c is not None),
        prlimit=shutil.which("prlimit"),
    )


def _masked_homes() -> list[str]:
    """Home directories the program must not see (each hidden under an empty tmpfs)."""
    homes = {os.path.expanduser("~"), "/root", "/home"}
    return sorted(h for h in homes if h and os.path.isdir(h) and h != "/")


def _python_dirs() -> list[str]:
    """Where the interpreter and its libraries live (re-exposed read-only if a mask hides them)."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    dirs.add(str(Path(os.path.realpath(sys.executable)).parent.parent))
    return sorted(d for d in dirs if d)


def bwrap_args(bwrap: str, disk_bytes: int, unshare_net: bool) -> list[str]:
    """bubblewrap's arguments: read-only root, private tmpfs /tmp and /dev/shm, homes masked, pid namespace."""
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/sys"]  # host sysfs hidden
    args += ["--size", str(disk_bytes), "--tmpfs", "/tmp", "--size", str(disk_bytes), "--tmpfs", "/dev/shm"]
    homes = _masked_homes()
    for home in homes:
        args += ["--tmpfs", home]
    # the interpreter and its environment may live under a hidden directory (a venv in a clone under /tmp,
    # a pyenv in /root): bind those back, read-only
    for d in _python_dirs():
        if any(d == m or d.startswith(m.rstrip("/") + "/") for m in [*homes, "/tmp", "/dev/shm"]):
            args += ["--ro-bind", d, d]
    args += ["--ro-bind", str(RUNNER), SANDBOX_RUNNER, "--dir", SANDBOX_WORKDIR, "--chdir", SANDBOX_WORKDIR]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if unshare_net:
        args += ["--unshare-net"]
    args += ["--die-with-parent", "--new-session", "--clearenv"]
    if os.geteuid() == 0:
        args += ["--cap-drop", "ALL"]
    return args
