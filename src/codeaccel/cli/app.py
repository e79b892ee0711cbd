"""The ``codeaccel`` typer application: its commands, the ``--verbose`` callback, and :func:`main`.

:func:`main` maps codeaccel's errors (:mod:`codeaccel.errors`) in one place, never
to a traceback: a :class:`UserError` or :class:`SetupError` prints ``error: …`` and
exits with 2; an :class:`InternalError` prints ``internal error: … (a bug: please
report it)`` and exits with 1.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Annotated

import typer
from rich.logging import RichHandler

from codeaccel.cli import (
    bench,
    cascade,
    client,
    dataset,
    draft,
    feedback,
    generate,
    index,
    loadtest,
    models,
    profile,
    sandbox,
    serve,
    split_bench,
)
from codeaccel.cli.display import err
from codeaccel.errors import CodeaccelError, InternalError

app = typer.Typer(
    help="Fast, cheap and lossless LLM code generation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(models.app, name="models")
app.add_typer(index.app, name="index")
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(dataset.app, name="dataset")
app.add_typer(cascade.app, name="cascade")
app.add_typer(feedback.app, name="feedback")
app.add_typer(draft.app, name="draft")
app.command()(generate.generate)
app.command()(profile.profile)
app.command()(bench.bench)
app.command()(serve.serve)
app.command()(loadtest.loadtest)
app.command()(client.client)
app.command("split-bench")(split_bench.split_bench)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )


def _terminated(signum: int, frame) -> None:
    """SIGTERM (``kill``, a process manager's stop) unwinds like an error: every ``finally`` and context
    manager runs, so sandboxes, stores and engines close as they do on Ctrl-C, instead of the process
    vanishing with its sandboxes' folders and cgroups left behind. (``serve`` installs uvicorn's own.)"""
    raise SystemExit(128 + signum)


def main() -> None:
    on_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _terminated) if on_main_thread else None
    try:
        _run()
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)  # a caller's own handler back (main() called in-process)


def _run() -> None:
    try:
        app()
    except InternalError as exc:
        err.print(f"[red]internal error:[/red] {exc} (a bug: please report it)", highlight=False, soft_wrap=True)
        sys.exit(1)
    except CodeaccelError as exc:  # UserError, SetupError (and the bare base)
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _say_interrupted()
        sys.exit(130)
    except SystemExit as exc:  # typer turns Ctrl-C into exit 130 itself, before the handler above could see it
        if exc.code == 130 and _caused_by(exc, KeyboardInterrupt):
            _say_interrupted()
        raise


def _say_interrupted() -> None:
    err.print("interrupted (finished benchmark problems are saved; rerun to resume)")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is in the chain of exceptions that led to ``exc`` (raised from, or while handling)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
