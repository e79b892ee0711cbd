"""``codeaccel bench``: flags to a :class:`BenchConfig`, :func:`run_benchmark`, and the summary table printed."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.bench.harness import BenchConfig
from codeaccel.bench.report import markdown_table
from codeaccel.bench.run import Mode, parse_datasets, run_benchmark
from codeaccel.cli import options as opt
from codeaccel.cli.display import BenchBar, out, print_markdown
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.errors import UserError
from codeaccel.methods.registry import MethodOptions, parse_methods

# flags that only re-test or re-summarise stored results: left out of the command a report records
_REPLAY_FLAGS = ("--rescore", "--report-only")


@opt.with_method_flags
def bench(
    datasets: Annotated[str, typer.Argument(help="Comma-separated: humaneval, mbpp, repo:<package>, edits:<name>.")],
    model: opt.ModelOpt = opt.DEFAULT_MODEL,
    engine: opt.EngineOpt = "llama.cpp",
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
    dtype: opt.DtypeOpt = "bfloat16",
    *,
    options: MethodOptions,  # the method flags, given by opt.with_method_flags
) -> None:
    """Benchmark methods on HumanEval / MBPP: speed, pass@1; resumable.

    The summary table covers every method stored in the results folder for the same
    problems and settings, so variants run one after another share one table.
    """
    names = parse_datasets(",".join(opt.comma_list(datasets, "datasets")), limit)  # before any model loads
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    if rescore and report_only:
        raise UserError("--rescore and --report-only exclude each other: give one")
    if not name or Path(name).name != name or name in (".", ".."):
        raise UserError(f"--name is a file name stem (no folder), got {name!r}")
    opt.check_folder(out_dir)
    opt.check_dtype(dtype)
    config = BenchConfig(
        model=model,
        engine=engine,
        methods=tuple(parse_methods(",".join(opt.comma_list(method, "--method")))),
        datasets=names,
        limit=limit,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        dtype=dtype,
        options=options,
        share_prefill=share_prefill,
    )
    mode: Mode = "rescore" if rescore else "report-only" if report_only else "run"
    # the command that produces these results: flags that only re-test or re-summarise them are left out
    command = shlex.join(a for a in shlex.split(opt.command_line()) if a not in _REPLAY_FLAGS)
    with BenchBar(counts_passed=mode == "run") as bar:
        result = run_benchmark(config, out_dir, mode, resume, command, name, progress=bar)
    print_markdown(markdown_table(result.rows))
    out.print(f"results in {result.out_dir}/ ({name}.json, {name}.md, {name}.png, results.jsonl)")
