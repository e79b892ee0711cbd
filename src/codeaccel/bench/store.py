"""Per-problem results, appended to a JSON-lines file as each problem finishes.

A benchmark run can be stopped at any point and resumed: a record is keyed by
(dataset, task_id, model, engine, method, config, method settings), and a rerun skips keys that are
already stored. A half-written last line (a run killed mid-write) is ignored, and
the next append starts on a fresh line. A line that cannot be read (torn, not JSON,
not UTF-8, no record) is never dropped: :meth:`ResultStore.rewrite` writes it back
verbatim.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

KEY_FIELDS = ("dataset", "task_id", "model", "engine", "method")


def record_key(record: dict) -> str:
    settings = record.get("method_settings")  # only methods with settings (draft model, k, ...) have them
    return json.dumps(
        [record[f] for f in KEY_FIELDS] + [record["config"]] + ([settings] if settings else []), sort_keys=True
    )


class ResultStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._records: dict[str, dict] = {}
        self._unreadable: list[bytes] = []  # lines kept as read, so that a rewrite loses none of them
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)  # bytes: a line that is not UTF-8 is unreadable, not a crash
                    self._records[record_key(record)] = record
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: skipping an unreadable record (an interrupted write?)", self.path, n)
                    self._unreadable.append(line if line.endswith(b"\n") else line + b"\n")

    def get(self, key_record: dict) -> dict | None:
        return self._records.get(record_key(key_record))

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True)
        with open(self.path, "a+b") as f:
            f.seek(0, 2)
            if f.tell() > 0:  # make sure a torn last line does not swallow this record
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode() + b"\n")
            f.flush()
        self._records[record_key(record)] = record

    def rewrite(self) -> None:
        """Write the file anew from the records held (after records were changed in place); atomic.

        Lines that could not be read when the file was loaded are kept, byte for byte, after
        the records (a torn last line gets its newline): a rewrite drops no stored data.
        """
        tmp = self.path.with_name(self.path.name + ".partial-rewrite")
        records = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in self._records.values())
        tmp.write_bytes(records + b"".join(self._unreadable))
        os.replace(tmp, self.path)

    def records(self) -> list[dict]:
        """Every stored record, in the order first stored."""
        return list(self._records.values())

    def discard(self, key_record: dict) -> None:
        """Forget a record (a ``--no-resume`` rerun overwrites it on the next add)."""
        self._records.pop(record_key(key_record), None)
