"""A real PostgreSQL server for tests: Debian's binaries, a cluster in a temporary directory.

initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user (Debian's
package creates it). The server listens only on a Unix socket in its own directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


class PostgresServer:
    def __init__(self):
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL's server binaries are not installed (Debian package postgresql)")
        self.root = tempfile.mkdtemp(prefix="codeaccel-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = 54329
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
        options = f"-c listen_addresses='' -k {self.root} -p {self.port} -c fsync=on -c synchronous_commit=on"
        subprocess.run(self._as_owner(f"{self.bin}/pg_ctl", "-D", self.data, "-o", options, "-w", "-t", "60",
                                      "-l", os.path.join(self.root, "log"), "start"),  # fmt: skip
                       check=True, capture_output=True)  # fmt: skip

    def restart(self) -> None:
        """Stop at once (clients' connections break) and start again."""
        subprocess.run(self._as_owner(f"{self.bin}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"),
                       check=True, capture_output=True)  # fmt: skip
        self._start()

    def __exit__(self, *exc) -> None:
        subprocess.run(self._as_owner(f"{self.bin}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"),
                       capture_output=True)  # fmt: skip
        time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
