"""``codeaccel split-bench``: remote drafts verified by a server against the server decoding alone, on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from codeaccel.cli.display import save_results, stage_bars
from codeaccel.cli.options import check_folder, check_model, command_line, positive_ints
from codeaccel.errors import UserError
from codeaccel.remote.client import MAX_DRAFT_TOKENS
from codeaccel.remote.split_bench import SplitBenchConfig, run_split_bench, to_markdown


def split_bench(
    target_model: Annotated[str, typer.Option(help="The server's target.")] = "qwen2.5-coder-1.5b-instruct",
    draft_model: Annotated[str, typer.Option(help="Each client's draft.")] = "qwen2.5-coder-0.5b-instruct",
    clients: Annotated[str, typer.Option(help="Concurrent clients per level, comma-separated.")] = "1,8",
    requests: Annotated[int, typer.Option(help="FIM requests per level.")] = 16,
    n_predict: Annotated[int, typer.Option(help="Tokens per completion.")] = 64,
    draft_tokens: Annotated[int, typer.Option(help="Draft tokens per verification.")] = 4,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the results go.")] = Path("runs/split"),
) -> None:
    """The client/server split (SpeCoder) on loopback: latency, tokens/s and the target's seconds per token."""
    levels = positive_ints(clients, "--clients")
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise UserError(f"--draft-tokens must be in 1..{MAX_DRAFT_TOKENS} (the server's limit), got {draft_tokens}")
    check_model(target_model)
    check_model(draft_model)
    check_folder(out_dir)
    config = SplitBenchConfig(target_model=target_model, draft_model=draft_model, clients=levels, requests=requests,
                              n_predict=n_predict, draft_tokens=draft_tokens, parallel=max(levels))  # fmt: skip
    with stage_bars() as progress:
        doc = run_split_bench(config, out_dir, progress)
    save_results(doc, out_dir, "split", to_markdown, command_line())
