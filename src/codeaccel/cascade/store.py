"""The generation store (SQLite): every generation and every execution result of a cascade run.

A sweep over (k, l, θ) reads only this store, so it is a replay, not new generation;
a run stopped by Ctrl-C resumes without regenerating anything stored (a problem's
generations for one model are written in one transaction, after they all finished).

Tables (one file, WAL journal, every write a transaction):

* ``generations``: model, dataset, task, kind (``answer`` | ``test``), l (test lines
  asked for; 0 for answers), sample (-1: greedy; 0..9: sampled with seed = sample),
  temperature, top_p, prompt/generated token counts, text, finish reason, seconds
  (``cost_s``: its share of every batched evaluation; ``decode_s``/``prefill_s``: wall
  time of the evaluations it took part in), batch size (mean sequences per step).
* ``test_lines``: the valid test lines extracted from each test generation, in order,
  with ``reference_passed`` (the dataset's reference solution passes the line).
* ``answer_results``: per answer, whether it passes the dataset's official tests
  (pass@1's ground truth) and its sandbox status.
* ``line_results``: per answer and distinct test line of its model and problem,
  whether the answer passes the line.
* ``batch_costs``: seconds per generated token and per prompt token, per model and
  batch size, as measured (the price of a k-sample stage, :mod:`codeaccel.cascade.cost`).
* ``meta``: what produced the store (prompt formats, CPU, versions).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from codeaccel.errors import UserError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL, dataset TEXT NOT NULL, task_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('answer', 'test')), l INTEGER NOT NULL, sample INTEGER NOT NULL,
    temperature REAL NOT NULL, top_p REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL, tokens INTEGER NOT NULL, text TEXT NOT NULL, finish_reason TEXT NOT NULL,
    cost_s REAL NOT NULL, decode_s REAL NOT NULL, prefill_s REAL NOT NULL, batch_size REAL NOT NULL,
    UNIQUE (model, dataset, task_id, kind, l, sample)
);
CREATE TABLE IF NOT EXISTS test_lines (
    generation_id INTEGER NOT NULL REFERENCES generations(id), position INTEGER NOT NULL,
    line TEXT NOT NULL, reference_passed INTEGER NOT NULL,
    PRIMARY KEY (generation_id, position)
);
CREATE TABLE IF NOT EXISTS answer_results (
    generation_id INTEGER PRIMARY KEY REFERENCES generations(id),
    passed INTEGER NOT NULL, status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS line_results (
    answer_id INTEGER NOT NULL REFERENCES generations(id), line TEXT NOT NULL, passed INTEGER NOT NULL,
    PRIMARY KEY (answer_id, line)
);
CREATE TABLE IF NOT EXISTS batch_costs (
    model TEXT NOT NULL, batch_size INTEGER NOT NULL,
    s_per_token REAL NOT NULL, s_per_prompt_token REAL NOT NULL, tokens INTEGER NOT NULL, cpu TEXT NOT NULL,
    PRIMARY KEY (model, batch_size)
);
CREATE TABLE IF NOT EXISTS executed (
    model TEXT NOT NULL, dataset TEXT NOT NULL, task_id TEXT NOT NULL, PRIMARY KEY (model, dataset, task_id)
);
"""


_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))  # every table of a cascade store


def _foreign_schema(db: sqlite3.Connection) -> str | None:
    """Why an SQLite file is not a cascade store (read only, before anything is created); None where it is one.

    A cascade store has the cascade's tables alone, and once it holds anything, a schema
    version in ``meta``. Tables of its own that are all empty (a new store interrupted
    before its version was written) are not refused.
    """
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables = {name for name in tables if not name.startswith("sqlite_")}  # SQLite's own (sqlite_sequence, ...)
    other = sorted(tables - _TABLES)
    if other:
        return f"it has tables a cascade store has not ({', '.join(other)})"
    if "meta" in tables and db.execute("SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone():
        return None
    if any(db.execute(f"SELECT EXISTS (SELECT 1 FROM {name})").fetchone()[0] for name in sorted(tables)):
        return "it holds data but no store schema version"
    return None


@dataclass(frozen=True)
class Spend:
    """What a sweep spent on one stored generation."""

    tokens: int  # generated
    seconds: float  # its share of the steps it decoded in and of its prompt's prefill
    batch_size: float  # mean sequences per decode step it ran in
    prompt_tokens: int
    sharing: int  # generations that shared its prompt's prefill


@dataclass(frozen=True)
class StoredGeneration:
    model: str
    dataset: str
    task_id: str
    kind: str  # "answer" | "test"
    l: int  # noqa: E741 (test lines asked for; 0 for answers)
    sample: int  # -1 greedy, else the seed of a sampled one
    temperature: float
    top_p: float
    prompt_tokens: int
    tokens: int
    text: str
    finish_reason: str
    cost_s: float
    decode_s: float
    prefill_s: float
    batch_size: float
    id: int | None = None


_GEN_FIELDS = [f.name for f in fields(StoredGeneration) if f.name != "id"]


@dataclass(frozen=True)
class BatchCost:
    model: str
    batch_size: int
    s_per_token: float  # decode seconds per generated token, all sequences of the batch together
    s_per_prompt_token: float  # prefill seconds per prompt token
    tokens: int  # generated tokens the figure is measured over
    cpu: str


class GenerationStore:
    """One SQLite file; safe to share between threads (one connection, a lock)."""

    def __init__(self, path: str | Path):
        """Open the store at ``path``, a new one where the file is new or empty.

        Another SQLite file (tables a cascade store has not, or data without a schema
        version), a damaged one or a store of another schema is refused with a
        :class:`UserError` before anything is written to it.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError as exc:  # a folder, a file it may not open
            raise UserError(f"{self.path} is not a cascade store: {exc}") from None
        try:
            version = self._open()
            if version is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise UserError(f"{self.path} has store schema {version!r}; this codeaccel reads {SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def _open(self):
        """Check the file is (the beginning of) a cascade store, create the tables it lacks; its schema version."""
        try:
            foreign = _foreign_schema(self._db)
            if foreign:
                raise UserError(f"{self.path} is not a cascade store: {foreign}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            return self.meta("schema_version")
        except sqlite3.DatabaseError as exc:  # not an SQLite file, a damaged one, a meta table of other columns
            raise UserError(f"{self.path} is not a cascade store: {exc}") from None

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Be the store's one writing run while inside: an exclusive ``flock`` on ``<store>.lock`` (a file of its
        own: a lock on the database file would be released with SQLite's own locks when it closed), released
        when the process ends however it ends. A second run on the same store is refused at once."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.path} is being written by another `cascade run`: wait for it, or give "
                                "another --out") from None  # fmt: skip
            yield
        finally:
            os.close(fd)

    def __enter__(self) -> GenerationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- meta ----------------------------------------------------------------------
    def meta(self, key: str):
        """The value stored under ``key`` (None if none); a value that is not JSON is a :class:`UserError`."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except (ValueError, TypeError):
            raise UserError(f"{self.path}: the stored {key!r} (table meta) is not JSON: a damaged store") from None

    def set_meta(self, key: str, value) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # ---- generations ---------------------------------------------------------------
    def add_generations(self, rows: Sequence[StoredGeneration]) -> list[int]:
        """Insert one problem's generations for one model in one transaction; their ids."""
        placeholders = ", ".join("?" * len(_GEN_FIELDS))
        sql = f"INSERT INTO generations ({', '.join(_GEN_FIELDS)}) VALUES ({placeholders})"
        ids = []
        with self._lock, self._transaction():
            for row in rows:
                ids.append(self._db.execute(sql, astuple(row)[:-1]).lastrowid)
        return ids

    def generations(self, model: str, dataset: str, task_id: str) -> list[StoredGeneration]:
        cols = ", ".join(_GEN_FIELDS + ["id"])
        cur = self._db.execute(
            f"SELECT {cols} FROM generations WHERE model = ? AND dataset = ? AND task_id = ? ORDER BY kind, l, sample",
            (model, dataset, task_id),
        )
        return [StoredGeneration(*row) for row in cur]

    def spend(self, model: str, dataset: str) -> list[Spend]:
        """Per stored generation of ``model``: what the sweep spent on it (``cost_s``: its share of the decode
        steps it ran in and of its prompt's prefill, which the generations of one kind and l of a problem
        share: ``sharing``)."""
        cur = self._db.execute(
            "SELECT tokens, cost_s, batch_size, prompt_tokens, COUNT(*) OVER (PARTITION BY task_id, kind, l) "
            "FROM generations WHERE model = ? AND dataset = ?",
            (model, dataset),
        )
        return [Spend(int(n), float(s), float(b), int(p), int(k)) for n, s, b, p, k in cur]

    def models(self) -> set[str]:
        """Every model with a stored generation."""
        return {row[0] for row in self._db.execute("SELECT DISTINCT model FROM generations")}

    def generated_tasks(self, model: str, dataset: str) -> set[str]:
        cur = self._db.execute("SELECT DISTINCT task_id FROM generations WHERE model = ? AND dataset = ?",
                               (model, dataset))  # fmt: skip
        return {row[0] for row in cur}

    # ---- executions ----------------------------------------------------------------
    def add_executions(
        self,
        model: str,
        dataset: str,
        task_id: str,
        test_lines: dict[int, list[tuple[str, bool]]],
        answer_results: dict[int, tuple[bool, str]],
        line_results: dict[int, dict[str, bool]],
    ) -> None:
        """A problem's execution results for one model, in one transaction, marked executed (any results it had
        before are replaced whole: a line no longer extracted leaves no row behind)."""
        with self._lock, self._transaction():
            for table, column, ids in (("test_lines", "generation_id", test_lines), ("line_results", "answer_id",
                                                                                   line_results)):  # fmt: skip
                self._db.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(i,) for i in ids])
            for gen_id, lines in test_lines.items():
                self._db.executemany(
                    "INSERT OR REPLACE INTO test_lines VALUES (?, ?, ?, ?)",
                    [(gen_id, i, line, int(ok)) for i, (line, ok) in enumerate(lines)],
                )
            self._db.executemany(
                "INSERT OR REPLACE INTO answer_results VALUES (?, ?, ?)",
                [(gen_id, int(ok), status) for gen_id, (ok, status) in answer_results.items()],
            )
            for answer_id, results in line_results.items():
                self._db.executemany(
                    "INSERT OR REPLACE INTO line_results VALUES (?, ?, ?)",
                    [(answer_id, line, int(ok)) for line, ok in results.items()],
                )
            self._db.execute("INSERT OR REPLACE INTO executed VALUES (?, ?, ?)", (model, dataset, task_id))

    def execution_rules(self) -> int | None:
        """The sandbox rules (:data:`codeaccel.sandbox.execution.RULES_VERSION`) its execution results were made
        under; None where nothing is executed yet (a store from before the rules were recorded: 1)."""
        rules = self.meta("sandbox_rules")
        if rules is None and self._db.execute("SELECT 1 FROM executed LIMIT 1").fetchone():
            return 1
        return rules

    def forget_executions(self, rules: int) -> None:
        """Drop every execution result (the generations stay), so that each problem is executed again, under
        sandbox ``rules`` from now on; in one transaction."""
        with self._lock, self._transaction():
            for table in ("executed", "line_results", "answer_results", "test_lines"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", ("sandbox_rules", json.dumps(rules)))

    def executed_tasks(self, model: str, dataset: str) -> set[str]:
        cur = self._db.execute("SELECT task_id FROM executed WHERE model = ? AND dataset = ?", (model, dataset))
        return {row[0] for row in cur}

    def test_lines(self, generation_ids: Iterable[int]) -> dict[int, list[tuple[str, bool]]]:
        ids = list(generation_ids)
        out: dict[int, list[tuple[str, bool]]] = {i: [] for i in ids}
        if ids:
            cur = self._db.execute(
                f"SELECT generation_id, line, reference_passed FROM test_lines WHERE generation_id IN "
                f"({', '.join('?' * len(ids))}) ORDER BY generation_id, position",
                ids,
            )
            for gen_id, line, ok in cur:
                out[gen_id].append((line, bool(ok)))
        return out

    def answer_results(self, generation_ids: Iterable[int]) -> dict[int, bool]:
        ids = list(generation_ids)
        if not ids:
            return {}
        cur = self._db.execute(
            f"SELECT generation_id, passed FROM answer_results WHERE generation_id IN ({', '.join('?' * len(ids))})",
            ids,
        )
        return {gen_id: bool(ok) for gen_id, ok in cur}

    def line_results(self, answer_ids: Iterable[int]) -> dict[int, dict[str, bool]]:
        ids = list(answer_ids)
        out: dict[int, dict[str, bool]] = {i: {} for i in ids}
        if ids:
            cur = self._db.execute(
                f"SELECT answer_id, line, passed FROM line_results WHERE answer_id IN ({', '.join('?' * len(ids))})",
                ids,
            )
            for answer_id, line, ok in cur:
                out[answer_id][line] = bool(ok)
        return out

    def line_validity(self, model: str, dataset: str, keep_line: Callable[[str, str], bool] | None = None,
                      task_ids: Collection[str] | None = None) -> list[dict]:  # fmt: skip
        """Per l: extracted test lines, how many the reference solution passes, and from how many tests.

        ``keep_line(task_id, line)``: the lines that count (as a replay's); ``left_out`` counts the others.
        ``task_ids``: only these problems (a replay's; None: every stored one)."""
        rows = self._db.execute(
            "SELECT g.l, g.id, g.task_id, t.line, t.reference_passed FROM test_lines t "
            "JOIN generations g ON g.id = t.generation_id WHERE g.model = ? AND g.dataset = ? ORDER BY g.l",
            (model, dataset),
        ).fetchall()
        tests = self._db.execute(
            "SELECT l, task_id, COUNT(*) FROM generations WHERE model = ? AND dataset = ? AND kind = 'test' "
            "GROUP BY l, task_id",
            (model, dataset),
        ).fetchall()
        if task_ids is not None:
            wanted = set(task_ids)
            rows = [r for r in rows if r[2] in wanted]
            tests = [t for t in tests if t[1] in wanted]
        n_tests: dict[int, int] = {}
        for n_lines, _, count in tests:
            n_tests[n_lines] = n_tests.get(n_lines, 0) + count
        out = []
        for n_lines in sorted({r[0] for r in rows}):
            of_l = [r for r in rows if r[0] == n_lines]
            kept = [r for r in of_l if keep_line is None or keep_line(r[2], r[3])]
            valid = sum(r[4] for r in kept)
            out.append({"model": model, "l": n_lines, "tests": n_tests.get(n_lines, 0),
                        "tests_with_lines": len({r[1] for r in kept}), "lines": len(kept), "valid": valid,
                        "validity": round(valid / len(kept), 4) if kept else None,
                        "left_out": len(of_l) - len(kept)})  # fmt: skip
        return out

    # ---- costs ---------------------------------------------------------------------
    def replace_batch_costs(self, model: str, costs: Sequence[BatchCost]) -> None:
        """``model``'s batch costs are ``costs`` alone (one transaction: none lost if interrupted)."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM batch_costs WHERE model = ?", (model,))
            self._db.executemany("INSERT INTO batch_costs VALUES (?, ?, ?, ?, ?, ?)", [astuple(c) for c in costs])

    def batch_costs(self, model: str) -> dict[int, BatchCost]:
        cur = self._db.execute("SELECT * FROM batch_costs WHERE model = ? ORDER BY batch_size", (model,))
        return {row[1]: BatchCost(*row) for row in cur}

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *exc) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
