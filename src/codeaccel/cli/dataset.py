"""``codeaccel dataset``: benchmark data sets built from sources: build-edits (an edit set from git history)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.bench.edit_dataset import (
    MAX_FILE_CHARS,
    N_CTX,
    data_path,
    resolve_git_dir,
    scan_history,
    spread,
    write_records,
)
from codeaccel.cli.display import err, out
from codeaccel.cli.options import EngineOpt
from codeaccel.engines import load_engine
from codeaccel.errors import UserError

app = typer.Typer(help="Benchmark data sets: build them from their sources.", no_args_is_help=True)


@app.command("build-edits")
def build_edits(
    git_dir: Annotated[Path, typer.Option("--git-dir", help="The project's git directory (bare, or a work tree).")],
    glob: Annotated[
        Optional[list[str]], typer.Option("--glob", help="Python files to take edits from (repeatable).")
    ] = None,
    name: Annotated[str, typer.Option(help="The set's name: problems are edits:<name>.")] = "click",
    n: Annotated[int, typer.Option("--n", help="Problems to keep, spread evenly over the history.")] = 40,
    out_path: Annotated[
        Optional[Path],
        typer.Option("--out", help="Output .jsonl.gz (default: the package's data/edits-<name>.jsonl.gz)."),
    ] = None,
    rev: Annotated[str, typer.Option(help="The history of this revision.")] = "HEAD",
    max_file_chars: Annotated[int, typer.Option(help="Longest file before the commit.")] = MAX_FILE_CHARS,
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", help="Count prompt tokens with this model's tokenizer (default: 3 chars/token)."),
    ] = None,
    engine: EngineOpt = "llama.cpp",
) -> None:
    """Build an edit set: functions as real commits changed them, with the file before and the message."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"--name must be letters, digits, - or _, got {name!r}")
    resolved = resolve_git_dir(git_dir)  # before any model loads
    globs = glob or ["src/click/*.py"]
    if model:
        with load_engine(model, engine, n_ctx=512) as tokenizer:
            scan = scan_history(
                resolved,
                globs,
                name,
                rev=rev,
                max_file_chars=max_file_chars,
                count_tokens=lambda text: len(tokenizer.tokenize(text)),
            )
    else:
        scan = scan_history(resolved, globs, name, rev=rev, max_file_chars=max_file_chars)
    if not scan.candidates:
        raise UserError(f"no edit candidates in {git_dir} for {', '.join(globs)} ({scan.commits} commits scanned)")
    chosen = spread(scan.candidates, n)
    path = out_path or Path(str(data_path(name)))
    write_records(chosen, path)
    skipped = ", ".join(f"{reason} {k}" for reason, k in sorted(scan.skipped.items()))
    err.print(f"skipped: {skipped}", highlight=False)
    if len(chosen) < n:
        err.print(f"[yellow]warning:[/yellow] only {len(chosen)} candidates, fewer than --n {n}")
    out.print(
        f"{scan.commits} commits scanned, {len(scan.candidates)} candidates, {len(chosen)} chosen "
        f"(context {N_CTX} tokens) -> {path}",
        highlight=False,
    )
