"""``POST /v1/events``: what users did with completions (Tabby's schema), stored durably in SQLite.

An event is acknowledged only after its transaction is committed with ``synchronous=FULL``
in WAL mode, so a crash (even kill -9) loses no acknowledged event. The personalization
loop reads ``select`` events from here. One connection per call: safe from any thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from codeaccel.serve.schemas import EventRequest

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,        -- unix seconds
    type TEXT NOT NULL,               -- view | select | dismiss
    completion_id TEXT NOT NULL,
    choice_index INTEGER NOT NULL,
    body TEXT NOT NULL                -- the event as received (JSON)
);
CREATE INDEX IF NOT EXISTS events_completion ON events (completion_id);
"""


class EventStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def add(self, event: EventRequest) -> int:
        """Store one event; returns its id once it is on disk."""
        with closing(self._connect()) as db, db:
            cur = db.execute(
                "INSERT INTO events (received_at, type, completion_id, choice_index, body) VALUES (?, ?, ?, ?, ?)",
                (time.time(), event.type, event.completion_id, event.choice_index, event.model_dump_json()),
            )
            return int(cur.lastrowid)

    def events(self, type: str | None = None) -> list[dict]:  # noqa: A002
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT id, received_at, body FROM events" + (" WHERE type = ?" if type else "") + " ORDER BY id",
                (type,) if type else (),
            ).fetchall()
        return [{"id": i, "received_at": t, **json.loads(body)} for i, t, body in rows]
