"""``codeaccel sandbox``: the sandbox for generated code: its layers (check) and throughput (bench)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.bench.sandbox_bench import markdown as sandbox_markdown
from codeaccel.bench.sandbox_bench import run_sandbox_bench
from codeaccel.cli.display import counting_bar, err, out, print_layers, save_results
from codeaccel.cli.options import check_folder, command_line
from codeaccel.errors import UserError
from codeaccel.sandbox import execute, probe

app = typer.Typer(help="The sandbox for generated code: layers, throughput.", no_args_is_help=True)


@app.command("check")
def sandbox_check() -> None:
    """Which isolation layers are active on this machine (each is probed by running it)."""
    layers = probe().layers()
    print_layers(layers)
    result = execute("x = 1", ["assert x == 1"])
    out.print(f"a test execution: {result.status} in {1000 * result.wall_s:.0f} ms")
    missing = [layer.name for layer in layers if not layer.active]
    if missing:
        err.print(f"[yellow]warning:[/yellow] inactive layers: {', '.join(missing)} (see docs/sandbox.md)")


@app.command("bench")
def sandbox_bench(
    n: Annotated[int, typer.Option(help="Executions per measurement.")] = 200,
    workers: Annotated[Optional[int], typer.Option(help="Pool workers (default: one per core).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("runs/sandbox"),
) -> None:
    """Executions per second and the per-execution overhead against a bare `python -c`."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    workers = workers or os.cpu_count() or 1
    check_folder(out_dir)
    with counting_bar("sandbox bench", 3 * n) as advance:  # on stdout, as rich's own console
        doc = run_sandbox_bench(n, workers, advance=advance)
    save_results(doc, out_dir, "sandbox", sandbox_markdown, command_line())
