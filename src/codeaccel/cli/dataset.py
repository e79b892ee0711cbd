"""``codeaccel dataset``: benchmark data sets built from sources: build-edits (an edit set from git history)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.bench.edit_dataset import MAX_FILE_CHARS, N_CTX, build_edit_set, resolve_git_dir, write_records
from codeaccel.cli.display import err, out
from codeaccel.cli.options import EngineOpt, check_folder
from codeaccel.engines import load_engine
from codeaccel.errors import UserError

app = typer.Typer(help="Benchmark data sets: build them from their sources.", no_args_is_help=True)


@app.command("build-edits")
def build_edits(
    git_dir: Annotated[Path, typer.Option("--git-dir", help="The project's git directory (bare, or a work tree).")],
    out_path: Annotated[
        Path,
        typer.Option(
            "--out", help="Output .jsonl.gz (the packaged sets: src/codeaccel/data/edits/edits-<name>.jsonl.gz)."
        ),
    ],
    glob: Annotated[
        Optional[list[str]], typer.Option("--glob", help="Python files to take edits from (repeatable).")
    ] = None,
    name: Annotated[str, typer.Option(help="The set's name: problems are edits:<name>.")] = "click",
    n: Annotated[int, typer.Option("--n", help="Problems to keep, spread evenly over the history.")] = 40,
    rev: Annotated[str, typer.Option(help="The history of this revision.")] = "HEAD",
    max_file_chars: Annotated[int, typer.Option(help="Longest file before the commit.")] = MAX_FILE_CHARS,
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", help="Count prompt tokens with this model's tokenizer (default: 3 chars/token)."),
    ] = None,
    engine: EngineOpt = "llama.cpp",
) -> None:
    """Build an edit set: functions as real commits changed them, with the file before and the message."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"--name must be letters, digits, - or _, got {name!r}")
    if glob is not None and not all(g.strip() for g in glob):
        raise UserError("--glob is empty: give a pattern of Python files, e.g. 'src/click/*.py'")
    if max_file_chars < 1:
        raise UserError(f"--max-file-chars must be >= 1, got {max_file_chars}")
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder: give the .jsonl.gz file to write")
    check_folder(out_path.parent)
    resolved = resolve_git_dir(git_dir)  # before any model loads
    globs = glob or ["src/click/*.py"]
    with ExitStack() as stack:
        count_tokens = None
        if model:
            tokenizer = stack.enter_context(load_engine(model, engine, n_ctx=512))
            count_tokens = lambda text: len(tokenizer.tokenize(text))  # noqa: E731
        scan, chosen = build_edit_set(
            resolved, globs, n, name, rev=rev, max_file_chars=max_file_chars, count_tokens=count_tokens
        )
    try:
        write_records(chosen, out_path)
    except OSError as e:
        raise UserError(f"cannot write {out_path}: {e}") from None
    skipped = ", ".join(f"{reason} {k}" for reason, k in sorted(scan.skipped.items()))
    err.print(f"skipped: {skipped}", highlight=False)
    out.print(
        f"{scan.commits} commits scanned, {len(scan.candidates)} candidates, {len(chosen)} chosen "
        f"(context {N_CTX} tokens) -> {out_path}",
        highlight=False,
    )
