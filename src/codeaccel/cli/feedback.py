"""``codeaccel feedback``: accepted completions, added by hand or listed (the draft's training set)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from codeaccel.cli.display import out
from codeaccel.cli.options import check_sqlite_file, read_text_file
from codeaccel.errors import UserError
from codeaccel.personalization.store import STORE_ENV, Accepted, default_location, open_store

app = typer.Typer(help="Accepted completions: add, list.", no_args_is_help=True)

StoreOpt = Annotated[
    Optional[str],
    typer.Option(
        "--store",
        envvar=STORE_ENV,
        help="sqlite:///PATH, a path, or postgresql://... (default: the server's events file).",
    ),
]


def store_location(store: str | None, must_exist: bool = False, flag: str = "--store") -> str | Path:
    """The accepted-completion store to open (default: the events file), checked first where it is an SQLite
    file: a folder or another kind of file in its place is refused, and with ``must_exist`` a missing one."""
    if store is not None and not store.removeprefix("sqlite:///").strip():
        raise UserError(f"{flag} {store!r} names no file: give sqlite:///PATH, a path or postgresql://...")
    if store is not None and "://" in store and not store.startswith("sqlite:///"):
        return store  # PostgreSQL, or a scheme open_store refuses
    path = Path(store.removeprefix("sqlite:///")) if store is not None else default_location()
    check_sqlite_file(path, "the accepted-completion store")
    if must_exist and store is not None and not path.exists():
        raise UserError(f"no accepted-completion store at {path}")
    return path


def _text(value: str, what: str) -> str:
    """A flag's text, or a file's when it starts with @."""
    if value.startswith("@"):
        value = read_text_file(Path(value[1:]), f"the {what} file")
    if not value:
        raise UserError(f"the {what} is empty")
    return value


@app.command("add")
def feedback_add(
    prompt: Annotated[str, typer.Option(help="The text the model continued; @FILE reads a file.")],
    completion: Annotated[str, typer.Option(help="The completion the user accepted; @FILE reads a file.")],
    repository: Annotated[Optional[str], typer.Option(help="The project it was accepted in.")] = None,
    store: StoreOpt = None,
) -> None:
    """Store one accepted completion; prints its id once it is on disk."""
    item = Accepted(_text(prompt, "prompt"), _text(completion, "completion"), repository)
    with open_store(store_location(store)) as accepted:
        out.print(accepted.add(item))


@app.command("list")
def feedback_list(
    after: Annotated[int, typer.Option(help="Only ids above this one.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 20,
    store: StoreOpt = None,
) -> None:
    """Accepted completions, oldest first, with their total."""
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if after < 0:
        raise UserError(f"--after must be >= 0, got {after}")
    with open_store(store_location(store, must_exist=True)) as accepted:
        rows, total = accepted.items(after, limit), accepted.count()
    table = Table(title=f"{total} accepted completions")
    for column in ("id", "source", "repository", "prompt (end)", "completion"):
        table.add_column(column)
    for row in rows:
        item = row.item
        table.add_row(
            str(row.id), item.source, item.repository or "", repr(item.prompt[-40:]), repr(item.completion[:60])
        )
    out.print(table)
