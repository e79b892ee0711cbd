"""``codeaccel client``: a completion with the draft model here and the target on a server (``/v1/verify``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.cli import options as opt
from codeaccel.cli.display import err, out
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import load_engine
from codeaccel.errors import UserError
from codeaccel.personalization.completion_cache import CompletionCache, load_completions, save_completions
from codeaccel.personalization.versions import DraftVersions
from codeaccel.remote.client import MAX_DRAFT_TOKENS, RemoteDraftClient, server_info


def client(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input.")],
    server: Annotated[str, typer.Option(help="The codeaccel server verifying the drafts.")] = "http://127.0.0.1:8080",
    draft_model: Annotated[
        str, typer.Option(help="The local draft: bundled name, GGUF file or HF directory (the server's tokenizer).")
    ] = "qwen2.5-coder-0.5b-instruct",  # fmt: skip
    engine: opt.EngineOpt = "llama.cpp",
    draft_tokens: Annotated[int, typer.Option(help="Draft tokens per verification (0: the server decodes alone).")] = 4,
    max_tokens: opt.MaxTokensOpt = 256,
    temperature: opt.TemperatureOpt = 0.0,
    top_p: opt.TopPOpt = 1.0,
    top_k: opt.TopKOpt = 0,
    seed: opt.SeedOpt = None,
    stop: opt.StopOpt = None,
    chat: opt.ChatOpt = True,
    api_key: Annotated[Optional[str], typer.Option(envvar="CODEACCEL_API_KEY", help="The server's API key.")] = None,
    draft_versions: Annotated[
        Optional[Path], typer.Option(help="Draft with this folder's live tuned version (codeaccel draft).")
    ] = None,
    cache: Annotated[
        Optional[Path],
        typer.Option(
            help="Keep completions in this file between runs: a repeated greedy or seeded request is "
            "answered from it without the server."
        ),
    ] = None,
    cache_size: Annotated[int, typer.Option(help="With --cache: completions kept (least recently used go).")] = 256,
) -> None:
    """Generate with a local draft model, each draft verified by the server's target (SpeCoder's split)."""
    if prompt == "-":
        prompt = opt.read_stdin_text()
    if not prompt.strip():
        raise UserError("the prompt is empty")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    if stop and not all(stop):
        raise UserError("--stop is empty: give the text to stop at")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if not 0 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise UserError(f"--draft-tokens must be in 0..{MAX_DRAFT_TOKENS} (the server's limit), got {draft_tokens}")
    opt.check_url(server, "--server")
    opt.check_engine(engine)
    opt.check_model(draft_model)
    if draft_versions is not None and not draft_versions.is_dir():
        raise UserError(f"--draft-versions {draft_versions} is no versions folder (codeaccel draft train makes one)")
    if cache_size < 1:
        raise UserError(f"--cache-size must be >= 1, got {cache_size}")
    if cache is not None and cache.is_dir():
        raise UserError(f"--cache {cache} is a folder: name a file")
    info = server_info(server, api_key)  # before the draft loads: a wrong address fails at once
    live = DraftVersions(draft_versions).live() if draft_versions is not None else None
    # a greedy completion is the target's alone; a seeded sample also depends on the draft that proposed it
    owner = json.dumps([info.model, draft_model, engine, draft_tokens, live.name if live else None])
    completions = load_completions(cache, cache_size, owner) if cache is not None else CompletionCache(0)
    with load_engine(draft_model, engine) as draft:
        text = draft.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        with RemoteDraftClient(draft, server, draft_tokens, completions, api_key,
                               server=info) as remote:  # fmt: skip
            if live is not None:
                remote.set_draft_lora(live.adapter_for(draft.kind))
            gen = remote.generate(draft.tokenize(text), params, max_tokens, tuple(stop or ()))
    out.print(gen.text, markup=False, highlight=False, soft_wrap=True)
    if cache is not None:
        try:
            save_completions(completions, cache, owner)
        except OSError as exc:  # the completion is printed; only the cache misses it
            err.print(f"[yellow]the completion cache {cache} was not saved: {exc}[/yellow]")
    s = gen.stats
    if s.cache_hit:
        err.print(f"[dim]answered from the completion cache {cache} ({len(completions)} kept); finish: "
                  f"{gen.finish_reason}[/dim]")  # fmt: skip
        return
    mean_len = "-" if s.mean_accepted_len is None else f"{s.mean_accepted_len:.2f}"
    err.print(
        f"[dim]{len(gen.tokens)} tokens in {gen.wall_s:.2f} s = {len(gen.tokens) / max(gen.wall_s, 1e-9):.1f} tok/s; "
        f"{s.calls} verifications, {s.accepted_tokens}/{s.drafted_tokens} draft tokens accepted, mean accepted "
        f"length {mean_len}; draft {s.draft_s:.2f} s, round trips {s.round_trip_s:.2f} s (server "
        f"{s.server_s:.2f} s); finish: {gen.finish_reason}[/dim]"
    )
