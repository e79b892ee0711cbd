"""What the commands show: the rich consoles, progress bars and tables, and the small results files.

Results and tables go to ``out`` (standard output), logs, timings and warnings to
``err`` (standard error). The library draws nothing: the bars here are fed by the
callbacks the library takes (``progress``, ``advance``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from codeaccel import machine
from codeaccel.bench.harness import BenchProgress
from codeaccel.engines.cost_curve import CostCurve
from codeaccel.models.registry import BundledModel
from codeaccel.sandbox.layers import Layer

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


# ---- progress bars ------------------------------------------------------------------
class LoggedProgress(Progress):
    """rich's Progress, which also writes plain lines where its console is no terminal.

    A bar is redrawn in place on a terminal only; a run in the background (``nohup … > log``)
    would show nothing until it ends. There each task writes ``description: done/total, elapsed``
    to ``log_console`` (standard error unless given: never into results on standard output)
    when it starts, at most every ``every_s`` seconds, and when it completes (once; again if it
    is no longer complete, its total grown).
    """

    def __init__(self, *columns, every_s: float = 60.0, log_console: Console | None = None, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self._every_s = every_s
        self._log_console = log_console or err
        self._logged_at: dict[TaskID, float] = {}  # monotonic time of its last line; inf: its completion written

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if self.disable or self.console.is_terminal:
            return
        with self._lock:
            task = self._tasks[task_id]
            now = time.monotonic()
            done = task.total is not None and task.completed >= task.total
            last = self._logged_at.get(task_id)
            if last == float("inf") and not done:
                last = None  # completed, then its total grew: lines again
            if last == float("inf") or (last is not None and now - last < self._every_s and not done):
                return
            self._logged_at[task_id] = float("inf") if done else now
            total = "?" if task.total is None else f"{task.total:,.0f}"
            line = f"{task.description}: {task.completed:,.0f}/{total}, {task.elapsed or 0.0:.0f} s"
        self._log_console.print(line, markup=False, highlight=False)


@contextmanager
def download_bar(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A bar of bytes (size, speed) on stderr; yields ``show(done, total)``."""
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with LoggedProgress(*columns, console=err) as progress:
        task = progress.add_task(label, total=total)

        def show(done: int, total: int) -> None:
            progress.update(task, completed=done)

        yield show


@contextmanager
def file_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A bar of files on stderr, its total learnt on the way; yields ``update(done, total)``."""
    columns = (TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} files"))
    progress = LoggedProgress(*columns, console=err)
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


@contextmanager
def counting_bar(label: str, total: int, console: Console | None = None) -> Iterator[Callable[[], None]]:
    """A bar counting to ``total`` (on ``console``, default rich's own: stdout); yields ``advance()``."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with LoggedProgress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


@contextmanager
def stage_bars(console: Console | None = None) -> Iterator[Callable[[str, int, int], None]]:
    """A bar per stage of a long job, fed ``(stage, done, total)``; text after " (" in a stage's name is a
    detail shown in its description (a loss), not a new stage."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    tasks: dict[str, TaskID] = {}
    with LoggedProgress(*columns, console=console or err) as bars:

        def update(stage: str, done: int, total: int) -> None:
            key = stage.split(" (")[0]
            if key not in tasks:
                tasks[key] = bars.add_task(stage, total=total)
            bars.update(tasks[key], completed=done, total=total, description=stage)

        yield update


_BENCH_COLUMNS = (
    TextColumn("[bold]{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TextColumn("pass {task.fields[passed]}/{task.fields[done]}"),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
)


class BenchBar:
    """The bar of a benchmark run, drawn from the harness's :class:`BenchProgress` reports.

    Use as a context manager and pass it as the harness's ``progress``: the bar starts
    with the first report (once the models are loaded) and stops on leaving the block.
    ``counts_passed``: show the passed count and times (a run) or not (a rescore).
    """

    def __init__(self, counts_passed: bool = True) -> None:
        columns = _BENCH_COLUMNS if counts_passed else _BENCH_COLUMNS[:3]
        self._progress = LoggedProgress(*columns, transient=False)
        self._task: TaskID | None = None

    def __enter__(self) -> BenchBar:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._task is not None:
            self._progress.stop()

    def __call__(self, p: BenchProgress) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(p.description, total=p.total, passed=p.passed, done=p.done)
        self._progress.update(
            self._task, description=p.description, total=p.total, completed=p.done, passed=p.passed, done=p.done
        )


# ---- tables -------------------------------------------------------------------------
def print_models(models: Sequence[tuple[BundledModel, bool, Path]]) -> None:
    """The bundled models: (model, assembled?, its path) each."""
    table = Table("name", "size (MB)", "assembled", "path")
    for m, assembled, path in models:
        table.add_row(m.name, f"{m.size_bytes / 1e6:.0f}", "yes" if assembled else "no", str(path))
    out.print(table)


def print_datastore_stats(stats: dict) -> None:
    table = Table("datastore", "kind", "files", "tokens", "MB on disk", "build s", "skipped")
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(stats["skipped"].items())) or "-"
    table.add_row(
        stats["name"], stats["kind"], str(stats["files"]), f"{stats['tokens']:,}",
        f"{stats['bytes_on_disk'] / 1e6:.1f}", f"{stats['build_s']:.1f}", skipped,
    )  # fmt: skip
    out.print(table)


def print_layers(layers: Sequence[Layer]) -> None:
    """The sandbox's isolation layers: active or not, and how."""
    table = Table("layer", "active", "how")
    for layer in layers:
        table.add_row(layer.name, "[green]yes[/green]" if layer.active else "[red]no[/red]", layer.detail)
    out.print(table)


def print_cost_curve(curve: CostCurve) -> None:
    table = Table("k", "ms", "relative to k=1")
    for k, s, r in zip(curve.k, curve.seconds, curve.relative):
        table.add_row(str(k), f"{1000 * s:.1f}", f"{r:.2f}")
    out.print(table)


def print_markdown(md: str) -> None:
    """Markdown as written (tables of results), no rich markup or highlighting."""
    out.print(md, markup=False, highlight=False, soft_wrap=True)


# ---- small results files ------------------------------------------------------------
def save_results(doc: dict, out_dir: Path, stem: str, to_markdown: Callable[[dict], str], command: str) -> None:
    """A small benchmark's results: ``{stem}.json`` (after the :func:`codeaccel.machine.provenance`
    header: command, machine, date) and ``{stem}.md``, printed too."""
    doc = {**machine.provenance(command), **doc}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = to_markdown(doc)
    (out_dir / f"{stem}.md").write_text(md)
    out.print(md, markup=False, highlight=False)
