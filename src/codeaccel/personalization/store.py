"""Accepted completions, stored durably: what the draft will be fine-tuned on.

Two tables, the same on both back ends:

* ``served``: every choice the server answered (completion id, choice index, prompt, completion),
  so that a ``select`` event (``POST /v1/events``, Tabby's schema), which names only a completion
  id and a choice, can be turned into the text the user accepted;
* ``accepted``: prompt, completion, repository, where it came from (a ``select`` event, or
  ``codeaccel feedback add``), the model that wrote it, and when.

SQLite is the embedded default (WAL, ``synchronous=FULL``); PostgreSQL (``postgresql://...``)
serves several servers sharing one store. ``add`` returns once the row is committed, so a
crash, even kill -9, loses no acknowledged completion (tested on both). Shared on purpose
by every request of a server: one connection per store, guarded by a lock.
"""

from __future__ import annotations

import abc
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from codeaccel.errors import SetupError, UserError
from codeaccel.models.registry import cache_dir

SOURCES = ("event", "feedback")


@dataclass(frozen=True)
class Accepted:
    prompt: str  # the text the model continued, special tokens included (a FIM prompt as sent)
    completion: str
    repository: str | None = None
    source: str = "feedback"  # "event": a select event of a served completion; "feedback": added by hand
    completion_id: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"an accepted completion's source is one of {', '.join(SOURCES)}, got {self.source!r}")
        if not self.prompt or not self.completion:
            raise UserError("an accepted completion needs a prompt and a completion")


@dataclass(frozen=True)
class StoredAccepted:
    id: int
    created_at: float  # unix seconds
    item: Accepted


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS served (
        completion_id TEXT NOT NULL,
        choice_index INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        completion TEXT NOT NULL,
        model TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (completion_id, choice_index))""",
    """CREATE TABLE IF NOT EXISTS accepted (
        id {id_column},
        created_at DOUBLE PRECISION NOT NULL,
        prompt TEXT NOT NULL,
        completion TEXT NOT NULL,
        repository TEXT,
        source TEXT NOT NULL,
        completion_id TEXT,
        model TEXT)""",
)
_COLUMNS = "prompt, completion, repository, source, completion_id, model"


class AcceptedStore(abc.ABC):
    """The store's contract; the SQL is written once, with ``?`` placeholders."""

    id_column = ""
    url = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        for statement in _SCHEMA:
            self._run(statement.format(id_column=self.id_column))

    # ---- back ends -----------------------------------------------------------------
    @abc.abstractmethod
    def _run(self, sql: str, params: Sequence = (), fetch: bool = False) -> list[tuple]:
        """Run one statement in its own committed transaction (rows if ``fetch``)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> AcceptedStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the contract --------------------------------------------------------------
    def add(self, item: Accepted) -> int:
        """Store one accepted completion; its id, returned once the row is durable."""
        [(row_id,)] = self._run(
            f"INSERT INTO accepted (created_at, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (time.time(), item.prompt, item.completion, item.repository, item.source, item.completion_id, item.model),
            fetch=True,
        )
        return int(row_id)

    def items(self, after_id: int = 0, limit: int | None = None) -> list[StoredAccepted]:
        """Accepted completions with ids above ``after_id``, oldest first."""
        rows = self._run(
            f"SELECT id, created_at, {_COLUMNS} FROM accepted WHERE id > ? ORDER BY id"
            + (" LIMIT ?" if limit is not None else ""),
            (after_id,) + ((limit,) if limit is not None else ()),
            fetch=True,
        )
        return [StoredAccepted(int(r[0]), float(r[1]), Accepted(*r[2:])) for r in rows]

    def count(self, after_id: int = 0) -> int:
        [(n,)] = self._run("SELECT COUNT(*) FROM accepted WHERE id > ?", (after_id,), fetch=True)
        return int(n)

    def record_served(self, completion_id: str, choices: Sequence[tuple[int, str, str]], model: str | None) -> None:
        """What the server answered: (choice index, prompt, completion) per choice."""
        now = time.time()
        for index, prompt, completion in choices:
            self._run(
                "INSERT INTO served (completion_id, choice_index, prompt, completion, model, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (completion_id, choice_index) DO NOTHING",
                (completion_id, index, prompt, completion, model, now),
            )

    def accept_served(self, completion_id: str, choice_index: int, repository: str | None = None) -> int | None:
        """A select event: the served choice becomes an accepted completion (None: never served here)."""
        rows = self._run(
            "SELECT prompt, completion, model FROM served WHERE completion_id = ? AND choice_index = ?",
            (completion_id, choice_index),
            fetch=True,
        )
        if not rows:
            return None
        prompt, completion, model = rows[0]
        if not completion:  # an empty completion teaches nothing
            return None
        return self.add(Accepted(prompt, completion, repository, "event", completion_id, model))


class SQLiteAcceptedStore(AcceptedStore):
    id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
        super().__init__()

    def _run(self, sql: str, params: Sequence = (), fetch: bool = False) -> list[tuple]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(sql, tuple(params))
                rows = cursor.fetchall() if fetch else []
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return rows

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresAcceptedStore(AcceptedStore):
    id_column = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"

    def __init__(self, url: str):
        import psycopg  # optional: the personalization extra

        self.url = url
        try:
            self._db = psycopg.connect(url, autocommit=True)  # each transaction() block is BEGIN ... COMMIT
        except psycopg.OperationalError as exc:
            raise SetupError(f"cannot connect to the accepted-completion store {_redact(url)}: {exc}") from None
        super().__init__()

    def _run(self, sql: str, params: Sequence = (), fetch: bool = False) -> list[tuple]:
        with self._lock, self._db.transaction():  # committed (synchronous_commit: on) when the block ends
            cur = self._db.execute(sql.replace("?", "%s"), tuple(params))
            return cur.fetchall() if fetch else []

    def close(self) -> None:
        with self._lock:
            self._db.close()


def default_location() -> Path:
    """Where the feedback loop keeps its SQLite file by default (the server's events live there too)."""
    return cache_dir() / "events.sqlite"


def open_store(url: str | Path) -> AcceptedStore:
    """``postgresql://...`` (or ``postgres://``): PostgreSQL; ``sqlite:///path`` or a path: SQLite."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresAcceptedStore(text)
    if "://" in text and not text.startswith("sqlite:///"):
        raise UserError(f"an accepted-completion store is sqlite:///PATH, a path, or postgresql://..., got {text!r}")
    return SQLiteAcceptedStore(Path(text.removeprefix("sqlite:///")))


def _redact(url: str) -> str:
    """The URL without its password."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.split(':')[0]}:***@{tail}"
