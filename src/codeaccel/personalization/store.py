"""Accepted completions, stored durably: what the draft will be fine-tuned on.

Two tables, the same on both back ends:

* ``served``: every choice the server answered (completion id, choice index, prompt, completion),
  so that a ``select`` event (``POST /v1/events``, Tabby's schema), which names only a completion
  id and a choice, can be turned into the text the user accepted; kept ``SERVED_TTL_S`` (a day:
  users select within seconds), older rows pruned;
* ``accepted``: prompt, completion, repository, where it came from (a ``select`` event, or
  ``codeaccel feedback add``), the model that wrote it, and when; a choice selected twice is
  stored once.

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
SERVED_TTL_S = 24 * 3600.0  # served choices kept this long for their select events
PRUNE_EVERY_S = 60.0


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
    "CREATE INDEX IF NOT EXISTS served_age ON served (created_at)",
    """CREATE TABLE IF NOT EXISTS accepted (
        id {id_column},
        created_at DOUBLE PRECISION NOT NULL,
        prompt TEXT NOT NULL,
        completion TEXT NOT NULL,
        repository TEXT,
        source TEXT NOT NULL,
        completion_id TEXT,
        choice_index INTEGER,
        model TEXT)""",
    # a choice selected again (a retried event) is the same accepted completion
    "CREATE UNIQUE INDEX IF NOT EXISTS accepted_choice ON accepted (completion_id, choice_index) "
    "WHERE completion_id IS NOT NULL",
)
_COLUMNS = "prompt, completion, repository, source, completion_id, model"


class AcceptedStore(abc.ABC):
    """The store's contract; the SQL is written once, with ``?`` placeholders."""

    id_column = ""
    url = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pruned_at = 0.0
        for statement in _SCHEMA[:-1]:
            self._run(statement.format(id_column=self.id_column))
        if "choice_index" not in self._columns("accepted"):  # a store from before choices were told apart
            self._run("ALTER TABLE accepted ADD COLUMN choice_index INTEGER")
        self._run(_SCHEMA[-1])

    # ---- back ends -----------------------------------------------------------------
    def _run(self, sql: str, params: Sequence = (), fetch: bool = False) -> list[tuple]:
        """Run one statement in its own committed transaction (rows if ``fetch``)."""
        return self._transaction([(sql, params)], fetch)

    @abc.abstractmethod
    def _columns(self, table: str) -> set[str]: ...

    @abc.abstractmethod
    def _transaction(self, statements: Sequence[tuple[str, Sequence]], fetch: bool = False) -> list[tuple]:
        """Run statements in one transaction, committed (durably) before it returns; the last one's rows."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> AcceptedStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the contract --------------------------------------------------------------
    def add(self, item: Accepted) -> int:
        """Store one accepted completion; its id, returned once the row is durable."""
        return self._add(item, None)

    def _add(self, item: Accepted, choice_index: int | None) -> int:
        """Insert (a choice already stored stays as it is); the row's id."""
        values = (time.time(), item.prompt, item.completion, item.repository, item.source, item.completion_id,
                  choice_index, item.model)  # fmt: skip
        insert = (f"INSERT INTO accepted (created_at, {_COLUMNS.replace('model', 'choice_index, model')}) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id")  # fmt: skip
        if item.completion_id is None:
            [(row_id,)] = self._run(insert, values, fetch=True)
            return int(row_id)
        rows = self._transaction([(insert, values)], fetch=True)
        if not rows:  # selected before: the stored row
            rows = self._run("SELECT id FROM accepted WHERE completion_id = ? AND choice_index = ?",
                             (item.completion_id, choice_index), fetch=True)  # fmt: skip
        return int(rows[0][0])

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
        """What the server answered: (choice index, prompt, completion) per choice, in one transaction
        (with, once a minute, the pruning of choices older than SERVED_TTL_S)."""
        now = time.time()
        insert = (
            "INSERT INTO served (completion_id, choice_index, prompt, completion, model, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (completion_id, choice_index) DO NOTHING"
        )
        statements = [(insert, (completion_id, i, prompt, completion, model, now)) for i, prompt, completion in choices]
        if now - self._pruned_at > PRUNE_EVERY_S:
            self._pruned_at = now
            statements.append(("DELETE FROM served WHERE created_at < ?", (now - SERVED_TTL_S,)))
        self._transaction(statements)

    def accept_served(self, completion_id: str, choice_index: int, repository: str | None = None) -> int | None:
        """A select event: the served choice becomes an accepted completion (None: never served here, or
        pruned); selected again: the same row."""
        stored = self._run("SELECT id FROM accepted WHERE completion_id = ? AND choice_index = ?",
                           (completion_id, choice_index), fetch=True)  # fmt: skip
        if stored:
            return int(stored[0][0])
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
        return self._add(Accepted(prompt, completion, repository, "event", completion_id, model), choice_index)


# The tables an accepted store's SQLite file may hold, with the columns each has had from its first schema
# on: its own, and the server's /v1/events (codeaccel.serve.events: one file holds the whole feedback loop).
_SQLITE_TABLES: dict[str, frozenset[str]] = {
    "served": frozenset({"completion_id", "choice_index", "prompt", "completion", "model", "created_at"}),
    "accepted": frozenset(
        {"id", "created_at", "prompt", "completion", "repository", "source", "completion_id", "model"}
    ),
    "events": frozenset(),  # the event store's own (not read here)
}


class SQLiteAcceptedStore(AcceptedStore):
    id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: Path):
        """Open (or create) the store; a file that is not one (another schema, not SQLite, damaged) is a
        :class:`UserError`, raised before anything is written to it."""
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"cannot open the accepted-completion store {self.path}: {exc}") from None
        try:
            self._check_tables()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            super().__init__()
        except sqlite3.DatabaseError as exc:  # not an SQLite file, damaged pages
            self._db.close()
            raise UserError(f"cannot open the accepted-completion store {self.path}: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    def _check_tables(self) -> None:
        """Refuse a file of another schema (a cascade store, another program's database), read only."""
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        for (table,) in rows:
            if table.startswith("sqlite_"):  # SQLite's own (AUTOINCREMENT's sqlite_sequence)
                continue
            if table not in _SQLITE_TABLES:
                raise UserError(f"{self.path} is not an accepted-completion store: it has a table {table!r}")
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            missing = sorted(_SQLITE_TABLES[table] - columns)
            if missing:
                raise UserError(f"{self.path} is not an accepted-completion store: its {table} table lacks {missing}")

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._run(f"PRAGMA table_info({table})", fetch=True)}

    def _transaction(self, statements: Sequence[tuple[str, Sequence]], fetch: bool = False) -> list[tuple]:
        """One transaction; damaged pages found on the way are a :class:`UserError` naming the file."""
        with self._lock:
            try:
                return self._run_locked(statements, fetch)
            except sqlite3.DatabaseError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                    raise  # locked, a constraint: not the file's fault
                raise UserError(f"the accepted-completion store {self.path} is damaged: {exc}") from None

    def _run_locked(self, statements: Sequence[tuple[str, Sequence]], fetch: bool) -> list[tuple]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                cursor = self._db.execute(sql, tuple(params))
            rows = cursor.fetchall() if fetch else []
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # an error can end the transaction itself
                self._db.execute("ROLLBACK")
            raise
        return rows

    def close(self) -> None:
        with self._lock:
            self._db.close()


CONNECT_TIMEOUT_S = 10  # a PostgreSQL server that does not answer: refused, not waited on for minutes


class PostgresAcceptedStore(AcceptedStore):
    id_column = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"

    def __init__(self, url: str):
        try:
            import psycopg  # optional: the personalization extra
        except ImportError:
            raise SetupError("a PostgreSQL store needs psycopg: pip install 'codeaccel[personalization]'") from None

        self.url = url
        self._psycopg = psycopg
        self._db = self._connect()
        super().__init__()

    def _connect(self):
        timeout = {} if "connect_timeout" in self.url else {"connect_timeout": CONNECT_TIMEOUT_S}
        try:
            db = self._psycopg.connect(self.url, autocommit=True, **timeout)  # each transaction(): BEGIN ... COMMIT
            # a commit returns once its WAL is on disk, whatever the server's default: acknowledged means durable
            db.execute("SET synchronous_commit = on")
            return db
        except self._psycopg.OperationalError as exc:
            raise SetupError(f"cannot connect to the accepted-completion store {_redact(self.url)}: {exc}") from None
        except self._psycopg.ProgrammingError as exc:  # a URL psycopg cannot read
            raise UserError(f"{_redact(self.url)} is not a PostgreSQL URL psycopg reads: {exc}") from None

    def _columns(self, table: str) -> set[str]:
        rows = self._run("SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,), True)
        return {row[0] for row in rows}

    def _transaction(self, statements: Sequence[tuple[str, Sequence]], fetch: bool = False) -> list[tuple]:
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self._db.transaction():  # committed (synchronous_commit: on) when the block ends
                        for sql, params in statements:
                            cur = self._db.execute(sql.replace("?", "%s"), tuple(params))
                        return cur.fetchall() if fetch else []
                except self._psycopg.OperationalError:
                    if attempt == 2 or not self._db.closed:
                        raise
                    self._db = self._connect()  # the server restarted: the transaction never committed, retry once
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._db.close()


STORE_ENV = "CODEACCEL_ACCEPTED_STORE"  # the store, where a flag would show a URL's password to ps


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
