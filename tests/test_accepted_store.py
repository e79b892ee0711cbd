"""The accepted-completion store, on SQLite and on a real PostgreSQL server started here.

Contract: an add returns once the row is durable (kill -9 of the writer loses no acknowledged
row), ids increase, ``items(after_id)`` reads what is new since a training run, a ``select``
of a served choice stores its text, and many threads may write at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from codeaccel.errors import CodeaccelError, UserError
from codeaccel.personalization.store import Accepted, open_store
from postgres_server import PostgresServer, pg_bin


@pytest.fixture(scope="module")
def postgres():
    if pg_bin() is None:
        pytest.skip("PostgreSQL's server binaries are missing (make install adds Debian's postgresql)")
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'accepted.sqlite'}"
    server = request.getfixturevalue("postgres")
    with open_store(server.url) as store:  # a clean table for each test
        store._run("DROP TABLE IF EXISTS accepted")
        store._run("DROP TABLE IF EXISTS served")
    return server.url


def test_add_then_read_back_in_order(store_url):
    with open_store(store_url) as store:
        ids = [store.add(Accepted(f"def f{i}(", f"x): return {i}", repository="click")) for i in range(5)]
        assert ids == sorted(ids) and len(set(ids)) == 5
        assert store.count() == 5 and store.count(after_id=ids[2]) == 2
        newer = store.items(after_id=ids[2])
        assert [s.item.completion for s in newer] == ["x): return 3", "x): return 4"]
        assert newer[0].item.repository == "click" and newer[0].item.source == "feedback"
        assert [s.id for s in store.items(limit=2)] == ids[:2]
    with open_store(store_url) as again:  # reopened: all still there
        assert again.count() == 5


def test_a_select_event_stores_the_served_choice(store_url):
    with open_store(store_url) as store:
        store.record_served("cmpl-1", [(0, "prompt A", "completion 0"), (1, "prompt A", "completion 1")], "m")
        store.record_served("cmpl-1", [(0, "prompt A", "changed")], "m")  # a retry never rewrites what was served
        row_id = store.accept_served("cmpl-1", 1, repository="repo")
        assert row_id is not None
        [stored] = store.items()
        assert (stored.item.prompt, stored.item.completion, stored.item.source) == ("prompt A", "completion 1", "event")
        assert stored.item.completion_id == "cmpl-1" and stored.item.model == "m"
        assert store.accept_served("cmpl-unknown", 0) is None
        store.record_served("cmpl-2", [(0, "p", "")], "m")
        assert store.accept_served("cmpl-2", 0) is None  # nothing to learn from an empty completion
        assert store.count() == 1


def test_concurrent_writers_get_unique_ids(store_url):
    with open_store(store_url) as store:
        got: list[int] = []
        lock = threading.Lock()

        def write(t):
            for i in range(25):
                row = store.add(Accepted(f"p{t}", f"c{i}"))
                with lock:
                    got.append(row)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(got)) == 150 and store.count() == 150


WRITER = textwrap.dedent(
    """
    import sys
    from codeaccel.personalization.store import Accepted, open_store
    store = open_store(sys.argv[1])
    i = 0
    while True:
        row = store.add(Accepted("prompt " * 50, f"completion {i}"))
        print(row, flush=True)  # acknowledged: the row is durable
        i += 1
    """
)


def _acknowledged_until_killed(url: str, n: int, kill) -> list[int]:
    """The rows a WRITER process acknowledged before ``kill(writer)`` struck, once it had acknowledged ``n``
    (it never pauses between rows, so the kill lands mid-write)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)  # fmt: skip
    acknowledged = []
    deadline = time.time() + 60
    while len(acknowledged) < n and time.time() < deadline:
        line = writer.stdout.readline()
        if line:
            acknowledged.append(int(line))
    kill(writer)
    writer.wait()
    return acknowledged + [int(line) for line in writer.stdout.read().split()]  # acknowledged before the kill


def test_kill_9_during_writes_loses_no_acknowledged_row(store_url):
    """The writer is killed between two rows or inside one: every row it acknowledged is there. (A killed
    process's committed writes survive in the page cache even unsynced; that the commit also reaches the
    disk is the store's setting, checked below: SQLite synchronous=FULL, PostgreSQL synchronous_commit on.)"""
    acknowledged = _acknowledged_until_killed(store_url, 40, lambda writer: os.kill(writer.pid, signal.SIGKILL))
    assert len(acknowledged) >= 40
    with open_store(store_url) as store:
        stored = {s.id for s in store.items()}
        if store_url.startswith("sqlite"):
            assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        else:
            assert store._run("SHOW synchronous_commit", fetch=True)[0][0] == "on"
            assert store._run("SHOW fsync", fetch=True)[0][0] == "on"
    assert set(acknowledged) <= stored


def test_a_postgres_server_killed_9_during_writes_loses_no_acknowledged_row():
    """The server itself crashes (SIGKILL to the postmaster and its backends: WAL buffers not yet written are
    lost) while a client writes: every row the client acknowledged is there after recovery, even on a server
    whose default is asynchronous commit (the store asks for synchronous commit on its own connection)."""
    if pg_bin() is None:
        pytest.skip("PostgreSQL's server binaries are missing (make install adds Debian's postgresql)")
    with PostgresServer(port=54331, synchronous_commit="off") as server:
        acknowledged = _acknowledged_until_killed(server.url, 200, lambda writer: (server.kill9(), writer.kill()))
        assert len(acknowledged) >= 200
        with open_store(server.url) as store:
            assert set(acknowledged) <= {s.id for s in store.items()}


@pytest.mark.parametrize("url", ["mysql://x", "http://host/db"])
def test_unknown_store_urls_are_refused(url):
    with pytest.raises(CodeaccelError):
        open_store(url)


def test_an_unreachable_postgres_is_a_setup_error(tmp_path):
    with pytest.raises(CodeaccelError, match="cannot connect") as refused:
        open_store(f"postgresql://nobody:secret@/db?host={tmp_path}&port=1&connect_timeout=2")
    assert "secret" not in str(refused.value)


def test_a_postgres_url_psycopg_cannot_read_is_a_user_error():
    with pytest.raises(UserError, match="not a PostgreSQL URL") as refused:
        open_store("postgresql://nobody:secret@/db?no_such_option=1")
    assert "secret" not in str(refused.value)


def test_an_accepted_completion_needs_text():
    with pytest.raises(CodeaccelError):
        Accepted("", "x")
    with pytest.raises(CodeaccelError):
        Accepted("p", "c", source="guess")


def test_feedback_add_and_list_from_the_command_line(tmp_path):
    store = f"sqlite:///{tmp_path / 'a.sqlite'}"
    (tmp_path / "completion.py").write_text("    return a + b\n")
    run = [sys.executable, "-m", "codeaccel", "feedback"]
    completion = f"@{tmp_path / 'completion.py'}"
    added = subprocess.run([*run, "add", "--prompt", "def add(a, b):\n", "--completion", completion,
                            "--repository", "demo", "--store", store], capture_output=True, text=True)  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = subprocess.run([*run, "list", "--store", store], capture_output=True, text=True)
    assert "1 accepted completions" in listed.stdout and "demo" in listed.stdout
    with open_store(store) as s:
        [row] = s.items()
    assert row.id == int(added.stdout) and row.item.completion == "    return a + b\n"


def test_a_choice_selected_twice_is_stored_once_and_old_served_choices_are_pruned(store_url, monkeypatch):
    from codeaccel.personalization import store as store_module

    with open_store(store_url) as store:
        store.record_served("cmpl-9", [(0, "p", "c0"), (1, "p", "c1")], "m")
        first = store.accept_served("cmpl-9", 1)
        assert store.accept_served("cmpl-9", 1) == first and store.count() == 1  # a retried event
        assert store.accept_served("cmpl-9", 0) != first and store.count() == 2
        now = store_module.time.time()
        monkeypatch.setattr(store_module.time, "time", lambda: now + store_module.SERVED_TTL_S + 120)
        store.record_served("cmpl-10", [(0, "p", "c")], "m")  # a day later: the old choices are gone
        assert store.accept_served("cmpl-9", 1) == first  # the accepted row stays
        store._run("DELETE FROM accepted WHERE completion_id = 'cmpl-9' AND choice_index = 1")
        assert store.accept_served("cmpl-9", 1) is None  # its served choice was pruned
        assert store.accept_served("cmpl-10", 0) is not None


def test_postgres_reconnects_after_a_server_restart(postgres):
    with open_store(postgres.url) as store:
        store._run("DROP TABLE IF EXISTS accepted")
    with open_store(postgres.url) as store:
        store.add(Accepted("p", "c"))
        postgres.restart()
        assert store.add(Accepted("p", "d")) > 0 and store.count() == 2


def test_a_store_from_before_choice_indexes_is_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the first schema: no choice_index
        db.execute("CREATE TABLE accepted (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at DOUBLE PRECISION NOT NULL,"
                   " prompt TEXT NOT NULL, completion TEXT NOT NULL, repository TEXT, source TEXT NOT NULL,"
                   " completion_id TEXT, model TEXT)")  # fmt: skip
        db.execute("INSERT INTO accepted (created_at, prompt, completion, source) VALUES (1, 'p', 'c', 'feedback')")
    with open_store(path) as store:
        assert store.count() == 1
        store.record_served("cmpl-1", [(0, "p", "c")], "m")
        assert store.accept_served("cmpl-1", 0) == store.accept_served("cmpl-1", 0) == 2


def test_an_sqlite_file_of_another_schema_is_refused_and_left_as_it_is(tmp_path):
    """A cascade store named as the accepted store: refused, no table added; `feedback list` says so in one line."""
    from codeaccel.cascade.store import GenerationStore
    from codeaccel.serve.events import EventStore

    cascade = tmp_path / "store.sqlite"
    GenerationStore(cascade).close()
    before = cascade.read_bytes()
    with pytest.raises(UserError, match="not an accepted-completion store"):
        open_store(cascade)
    assert cascade.read_bytes() == before
    listed = subprocess.run([sys.executable, "-m", "codeaccel", "feedback", "list", "--store", str(cascade)],
                            capture_output=True, text=True)  # fmt: skip
    lines = listed.stderr.strip().splitlines()
    assert listed.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), listed.stderr
    assert cascade.read_bytes() == before
    EventStore(tmp_path / "events.sqlite")  # the server's events file holds the accepted store too
    with open_store(tmp_path / "events.sqlite") as store:
        assert store.add(Accepted("p", "c")) == 1


def test_damaged_pages_are_a_user_error(tmp_path):
    import sqlite3

    path = tmp_path / "a.sqlite"
    with open_store(path) as store:
        for i in range(200):
            store.add(Accepted("p" * 200, f"completion {i} " * 20))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    pages = bytearray(path.read_bytes())
    for start in range(2 * 4096, len(pages), 4096):  # every page after the schema's: the rows unreadable
        pages[start : start + 16] = b"\xde" * 16
    path.write_bytes(pages)
    with open_store(path) as store, pytest.raises(UserError, match="is damaged"):
        store.items()
    pages[:100] = b"\xde" * 100  # the header too: refused at open
    path.write_bytes(pages)
    with pytest.raises(UserError, match="cannot open the accepted-completion store"):
        open_store(path)
