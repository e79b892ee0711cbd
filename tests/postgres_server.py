"""A real PostgreSQL server for tests: Debian's binaries, a cluster in a temporary directory.

initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user (Debian's
package creates it). The server listens only on a Unix socket in its own directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


class PostgresServer:
    def __init__(self, port: int = 54329, synchronous_commit: str = "on"):
        """``synchronous_commit``: the server's default (a client may set its own per session)."""
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL's server binaries are not installed (Debian package postgresql)")
        self.root = tempfile.mkdtemp(prefix="codeaccel-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = port
        self.synchronous_commit = synchronous_commit
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def __enter__(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(self._as_owner(f"{self.bin}/initdb", "-D", self.data, "-U", self.user, "--auth=trust",
                                      "-E", "UTF8", "--no-instructions"),  # fmt: skip
                       check=True, capture_output=True)  # fmt: skip
        self._start()
        self.url = f"postgresql://{self.user}@/postgres?host={self.root}&port={self.port}"
        return self

    def _start(self) -> None:
        options = (f"-c listen_addresses='' -k {self.root} -p {self.port} -c fsync=on "
                   f"-c synchronous_commit={self.synchronous_commit}")  # fmt: skip
        subprocess.run(self._as_owner(f"{self.bin}/pg_ctl", "-D", self.data, "-o", options, "-w", "-t", "60",
                                      "-l", os.path.join(self.root, "log"), "start"),  # fmt: skip
                       check=True, capture_output=True)  # fmt: skip

    def restart(self) -> None:
        """Stop at once (clients' connections break) and start again."""
        subprocess.run(self._as_owner(f"{self.bin}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"),
                       check=True, capture_output=True)  # fmt: skip
        self._start()

    def kill9(self) -> None:
        """A crash: the postmaster and every process it started get SIGKILL at once (nothing is flushed,
        shared memory, WAL buffers included, is lost); then started again (it recovers from its WAL)."""
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        family = [postmaster] + _children(postmaster)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30
        while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in family) and time.time() < deadline:
            time.sleep(0.05)
        # the dead postmaster may stay a zombie (its parent here need not reap it), alive to the new one's
        # checks of its lock files: they go, as a machine's restart would clear them
        for lock in (os.path.join(self.data, "postmaster.pid"), os.path.join(self.root, f".s.PGSQL.{self.port}.lock")):
            if os.path.exists(lock):
                os.remove(lock)
        self._start()

    def __exit__(self, *exc) -> None:
        subprocess.run(self._as_owner(f"{self.bin}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"),
                       capture_output=True)  # fmt: skip
        time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def _children(pid: int) -> list[int]:
    """Every process whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
