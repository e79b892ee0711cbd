"""The ``codeaccel`` command line (typer).

``app`` holds the typer application, its ``--verbose`` callback and :func:`main`,
which turns codeaccel's errors into one line and an exit code, in one place. One
module per command group: ``models`` (list, fetch, path), ``index`` (build, update,
stats, bench), ``sandbox`` (check, bench), ``dataset`` (build-edits), ``feedback``
(add, list), ``draft`` (train, list, promote, rollback, bench), ``generate``, ``profile``,
``bench``, ``cascade`` (run, tune, report, solve), ``serve``, ``loadtest``, ``client`` and
``split_bench`` (split-bench);
``options`` holds the flags they share, and ``display`` the consoles, progress bars,
tables and the small results files the commands print.
"""

from __future__ import annotations

from codeaccel.cli.app import app, main

__all__ = ["app", "main"]
