"""``codeaccel loadtest``: concurrent FIM requests against servers on loopback (:mod:`codeaccel.bench.load_test`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel import machine
from codeaccel.bench.load_servers import SERVERS, launched, server_spec
from codeaccel.bench.load_test import LoadLevel, fim_requests, run_load_test, write_report
from codeaccel.cli.display import out
from codeaccel.cli.options import check_folder, check_model, check_url, comma_list, command_line, positive_ints
from codeaccel.errors import UserError

DEFAULT_SERVERS = (
    "codeaccel-autoregressive,codeaccel-context,codeaccel-context-per-request,llama-server,llama-server-draft"
)


def loadtest(
    servers: Annotated[
        Optional[str],
        typer.Option(help=f"Servers to start in turn: {', '.join(SERVERS)} (default: {DEFAULT_SERVERS})."),
    ] = None,
    url: Annotated[Optional[str], typer.Option(help="Test a running server instead (named by --name).")] = None,
    name: Annotated[str, typer.Option(help="The running server's name in the results.")] = "server",
    model: Annotated[str, typer.Option(help="The target every server serves.")] = "qwen2.5-coder-1.5b-instruct",
    concurrency: Annotated[str, typer.Option(help="Concurrent clients, per level.")] = "1,4,8,16",
    requests: Annotated[int, typer.Option(help="Requests per level (the same ones for every server).")] = 32,
    n_predict: Annotated[int, typer.Option(help="Tokens per completion.")] = 64,
    parallel: Annotated[int, typer.Option(help="Sequences / slots of each server.")] = 16,
    ctx_size: Annotated[int, typer.Option(help="Tokens per sequence / slot.")] = 4096,
    time_limit: Annotated[float, typer.Option(help="Seconds per level at most.")] = 300.0,
    seed: Annotated[int, typer.Option(help="Which cuts of code are sent.")] = 0,
    predicted_outputs: Annotated[
        bool, typer.Option(help="Send each cut's true middle as OpenAI's prediction (/v1/completions; ours only).")
    ] = False,
    cache_prompt: Annotated[
        bool,
        typer.Option(help="llama.cpp's cache_prompt in every request (off: every prompt evaluated whole)."),
    ] = True,
    session_steps: Annotated[
        int,
        typer.Option(help="Above 1: each cut is an editor session of this many requests as its user types on."),
    ] = 1,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder of load_test.json / .md and server logs.")] = Path(
        "runs/loadtest"
    ),
) -> None:
    """Time to first token, latency p50/p99, tokens/s and errors at each concurrency, per server."""
    levels = list(positive_ints(concurrency, "--concurrency"))
    if requests < 1 or n_predict < 1 or not time_limit > 0 or session_steps < 1:
        raise UserError("--requests, --n-predict, --time-limit and --session-steps must be positive")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if url is not None and servers is not None:
        raise UserError("--url tests a running server: --servers names servers to start instead; give one")
    if url is not None:
        check_url(url, "--url")
    names = list(comma_list(servers or DEFAULT_SERVERS, "--servers")) if url is None else []
    if names and (parallel < 1 or ctx_size < 1):
        raise UserError("--parallel and --ctx-size must be >= 1")
    if names:
        check_model(model)
    check_folder(out_dir)
    if predicted_outputs and url is None and any(not n.startswith("codeaccel-") for n in names):
        raise UserError("--predicted-outputs needs servers that take OpenAI's prediction: codeaccel-* only")
    specs = [server_spec(n, model, parallel, ctx_size) for n in names] if url is None else []
    fims = fim_requests(requests, seed)
    rows: list[LoadLevel] = []

    def show(level: LoadLevel) -> None:
        out.print(
            f"{level.server} c={level.concurrency}: {level.tokens_per_s:.1f} tok/s, errors {level.errors}, "
            f"TTFT p50 {_ms(level.ttft_p50_s)}, latency p50 {_ms(level.latency_p50_s)} p99 {_ms(level.latency_p99_s)}"
        )

    def measure(server_url: str, server_name: str) -> list[LoadLevel]:
        return run_load_test(server_url, server_name, fims, levels, n_predict, time_limit, progress=show,
                             predicted=predicted_outputs, cache_prompt=cache_prompt,
                             session_steps=session_steps)  # fmt: skip

    if url is not None:
        rows += measure(url.rstrip("/"), name)
    for spec in specs:
        with launched(spec, out_dir / "logs" / f"{spec.name}.log") as server_url:
            rows += measure(server_url, spec.name)
    header = {**machine.provenance(command_line()), "model": model, "n_predict": n_predict, "requests": requests,
              "parallel": parallel, "ctx_size": ctx_size, "seed": seed, "cache_prompt": cache_prompt,
              "session_steps": session_steps,
              "workload": "predicted-outputs" if predicted_outputs else "typing" if session_steps > 1 else "infill",
              }  # fmt: skip
    for path in write_report(rows, out_dir, header):
        out.print(f"saved {path}")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f} ms"
