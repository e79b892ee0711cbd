"""A whole benchmark, as ``codeaccel bench`` runs it: results folder, store, run, summary, report.

:func:`run_benchmark` generates (or only re-tests, or only re-summarises) what a
:class:`~codeaccel.bench.harness.BenchConfig` asks for, into one results folder, and
writes the summary files; it draws nothing (progress goes to an optional callback)
and returns a :class:`BenchResult`, so the CLI only parses flags and prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from codeaccel.bench.datasets import load_problems
from codeaccel.bench.harness import (
    BenchConfig,
    ProgressCallback,
    bench_config_dict,
    comparable_records,
    rescore,
    run_bench,
    stored_records,
)
from codeaccel.bench.logit_noise import find_noise
from codeaccel.bench.report import summarize, write_report
from codeaccel.bench.store import ResultStore
from codeaccel.errors import UserError
from codeaccel.sandbox import probe as probe_sandbox

Mode = Literal["run", "rescore", "report-only"]
MODES: tuple[Mode, ...] = ("run", "rescore", "report-only")


@dataclass(frozen=True)
class BenchResult:
    """What a benchmark wrote: the summary rows (one per dataset, model, engine, method and
    variant), the records they summarise, the summary document and where the files are."""

    rows: list[dict]
    records: list[dict]
    report: dict  # the summary JSON document ({name}.json)
    noise: dict | None  # the target's measured logit noise, if the results folder has it
    out_dir: Path
    name: str

    @property
    def files(self) -> tuple[Path, ...]:
        """The summary's JSON, Markdown and PNG, and the store of per-problem records."""
        return tuple(self.out_dir / f for f in (f"{self.name}.json", f"{self.name}.md", f"{self.name}.png")) + (
            self.out_dir / "results.jsonl",
        )


def parse_datasets(datasets: str, limit: int | None) -> tuple[str, ...]:
    """The dataset names of a comma-separated list, each checked (with ``limit``) before any model loads."""
    names = tuple(d.strip().lower() for d in datasets.split(",") if d.strip())
    for d in names:
        load_problems(d, limit)  # raises UserError for an unknown name or a bad limit
    return names


def default_out_dir(model: str, engine: str) -> Path:
    """``runs/<model>-<engine>``, the model named by its file (without ``.gguf``) or directory."""
    safe_model = Path(model).name.replace(".gguf", "")
    return Path("runs") / f"{safe_model}-{engine}"


def run_benchmark(
    config: BenchConfig,
    out_dir: Path | None = None,
    mode: Mode = "run",
    resume: bool = True,
    command: str = "",
    name: str = "summary",
    progress: ProgressCallback | None = None,
) -> BenchResult:
    """Benchmark ``config`` into ``out_dir`` (default :func:`default_out_dir`) and write ``{name}.*``.

    ``mode``: ``run`` generates what is not stored yet (all again without ``resume``);
    ``rescore`` re-runs only the tests of stored completions; ``report-only`` generates
    nothing. The summary covers every stored record comparable with this run's (other
    variants in the same folder share the table). ``command`` is recorded in the report.
    """
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    out_dir = out_dir or default_out_dir(config.model, config.engine)
    store = ResultStore(out_dir / "results.jsonl")
    if mode == "run":
        records = comparable_records(store, run_bench(config, store, resume, progress=progress))
    else:
        stored = rescore(config, store, progress=progress) if mode == "rescore" else stored_records(config, store)
        if not stored:
            raise UserError(f"no stored results in {out_dir} for these settings: run the benchmark first")
        records = comparable_records(store, stored)
    noise = (find_noise(out_dir, records[0]["engine"], records[0]["model"], records[0]["config"].get("dtype"))
             if records else None)  # fmt: skip
    rows = summarize(records, noise)
    report_config = bench_config_dict(config)
    report_config["sandbox_layers"] = list(probe_sandbox().active_layers)
    report = write_report(rows, out_dir, command, report_config, name=name, noise=noise, records=records)
    return BenchResult(rows=rows, records=records, report=report, noise=noise, out_dir=out_dir, name=name)
