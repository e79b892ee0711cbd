"""``codeaccel index``: retrieval datastores: build, update, stats, and lookup latency (bench)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.bench.lookup_bench import humaneval_queries, run_lookup_bench
from codeaccel.bench.lookup_bench import markdown as lookup_markdown
from codeaccel.cli.display import counting_bar, err, file_bar, out, print_datastore_stats, save_results
from codeaccel.cli.options import (
    DEFAULT_MODEL,
    EngineOpt,
    ModelOpt,
    check_datastores,
    check_folder,
    command_line,
)
from codeaccel.engines import load_engine
from codeaccel.engines.base import Engine
from codeaccel.engines.tokenizer import engine_fingerprint
from codeaccel.errors import UserError
from codeaccel.retrieval.datastore import (
    Datastore,
    build_datastore,
    default_datastore_dir,
    open_datastore,
    open_datastores,
    update_datastore,
)

app = typer.Typer(help="Retrieval datastores: build, update, stats, bench.", no_args_is_help=True)


def _tokenizer(model: str, engine: str) -> tuple[Engine, str]:
    eng = load_engine(model, engine, n_ctx=512)
    return eng, engine_fingerprint(eng)


@app.command("build")
def index_build(
    kind: Annotated[str, typer.Argument(help="general (stdlib + site-packages + --root dirs) or repository.")],
    root: Annotated[
        Optional[list[Path]], typer.Option(help="Directory to index (repeatable; a repository: one).")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    engine: EngineOpt = "llama.cpp",
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="Datastore directory (default: in the cache).")
    ] = None,
    exclude: Annotated[
        Optional[list[str]], typer.Option(help="Glob of files to leave out of a general source (repeatable).")
    ] = None,
) -> None:
    """Index code for retrieval drafting, in the model's token ids."""
    if kind not in ("general", "repository"):
        raise UserError(f"kind must be 'general' or 'repository', got {kind!r}")
    roots = list(root or [])
    if kind == "repository" and len(roots) != 1:
        raise UserError("a repository datastore needs exactly one --root")
    for r in roots:  # before the model loads
        if not r.is_dir():
            raise UserError(f"--root {r} is not a directory")
    if len({r.resolve() for r in roots}) < len(roots):
        raise UserError("--root names a directory twice")
    check_folder(out_dir)
    eng, fingerprint = _tokenizer(model, engine)
    with eng:
        name = "general" if kind == "general" else f"repo-{roots[0].resolve().name}"
        path = out_dir or default_datastore_dir(f"{name}-{fingerprint}")
        with file_bar(f"index {name}") as update:
            store = build_datastore(
                path, name, kind, roots, eng.tokenize, fingerprint, progress=update, exclude=exclude or ()
            )
    print_datastore_stats(store.stats())
    out.print(f"datastore at {path}")


@app.command("update")
def index_update(
    path: Annotated[Path, typer.Argument(help="Datastore directory.")],
    model: ModelOpt = DEFAULT_MODEL,
    engine: EngineOpt = "llama.cpp",
) -> None:
    """Re-index only the files that changed since the last build or update."""
    eng, fingerprint = _tokenizer(model, engine)
    with eng:
        with file_bar(f"update {path.name}") as update:
            # checked first: a damaged datastore is rebuilt from its recorded source, not updated
            store = open_datastore(path, eng.tokenize, fingerprint, progress=update, update=False)
            store, summary = update_datastore(path, eng.tokenize, fingerprint, progress=update, store=store)
    print_datastore_stats(store.stats())
    out.print(", ".join(f"{k}: {v}" for k, v in summary.items()))


@app.command("stats")
def index_stats(
    path: Annotated[Path, typer.Argument(help="Datastore directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON.")] = False,
) -> None:
    """Files, tokens, bytes on disk and build time of a datastore (its checksums are verified)."""
    stats = Datastore(path).stats()
    if as_json:
        out.print_json(json.dumps(stats))
    else:
        print_datastore_stats(stats)


@app.command("bench")
def index_bench(
    datastore: Annotated[list[Path], typer.Option("--datastore", help="Datastore directory (repeatable).")],
    model: ModelOpt = DEFAULT_MODEL,
    engine: EngineOpt = "llama.cpp",
    n: Annotated[int, typer.Option(help="Queries (HumanEval contexts cut at random points).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the cut points.")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("runs/lookup"),
) -> None:
    """Lookup latency per datastore and over all of them in parallel (median, p90, p99)."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    check_datastores(datastore)
    check_folder(out_dir)
    eng, _ = _tokenizer(model, engine)
    with eng:
        stores = open_datastores(eng, [str(d) for d in datastore])
        queries = humaneval_queries(eng.tokenize, n, seed)
    with counting_bar("lookups", n * (len(stores) + 1), console=err) as advance:
        doc = run_lookup_bench(stores, queries, advance=advance)
    save_results(doc, out_dir, "lookup", lookup_markdown, command_line())
