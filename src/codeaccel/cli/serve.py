"""``codeaccel serve``: the OpenAI- and llama.cpp-compatible completion server (:mod:`codeaccel.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from codeaccel.cli.feedback import store_location
from codeaccel.cli.options import check_datastores, check_engine, check_folder, check_model, check_sqlite_file
from codeaccel.errors import UserError
from codeaccel.personalization.store import default_location
from codeaccel.serve.settings import ServeSettings, load_settings


def serve(
    model: Annotated[Optional[str], typer.Option(help="Bundled model name, GGUF file or HF directory.")] = None,
    engine: Annotated[Optional[str], typer.Option(help="llama.cpp or hf.")] = None,
    method: Annotated[
        Optional[str],
        typer.Option(help="autoregressive, context (drafts from the request's text), retrieval or draft-model."),
    ] = None,
    draft_model: Annotated[
        Optional[str], typer.Option(help="draft-model: the draft (bundled name or GGUF file, same tokenizer).")
    ] = None,
    draft_lengths: Annotated[
        Optional[str], typer.Option(help="joint (the batch's lengths chosen together) or per-request.")
    ] = None,
    datastore: Annotated[
        Optional[list[Path]], typer.Option(help="retrieval: a datastore directory (repeatable).")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads of the engine.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on (0: any free one).")] = None,
    parallel: Annotated[Optional[int], typer.Option("--parallel", "-np", help="Sequences decoded together.")] = None,
    ctx_size: Annotated[Optional[int], typer.Option(help="Most tokens per request (prompt + completion).")] = None,
    prefill_chunk: Annotated[
        Optional[int], typer.Option(help="Prompt tokens evaluated per step beside the running requests.")
    ] = None,
    prefix_cache: Annotated[
        Optional[bool],
        typer.Option("--prefix-cache/--no-prefix-cache", help="Reuse finished requests' caches for shared prefixes."),
    ] = None,
    max_queue: Annotated[Optional[int], typer.Option(help="Requests queued beyond the running ones.")] = None,
    completion_cache: Annotated[
        Optional[int], typer.Option(help="Completions of greedy/seeded requests kept and answered again (0: off).")
    ] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Require this bearer key.")] = None,
    events_db: Annotated[Optional[Path], typer.Option(help="SQLite file of /v1/events.")] = None,
    draft_versions: Annotated[
        Optional[Path],
        typer.Option(help="With --method draft-model: follow this folder's live tuned draft (codeaccel draft)."),
    ] = None,
    accepted_store: Annotated[
        Optional[str],
        typer.Option(help="Accepted completions: sqlite:///PATH, a path or postgresql://... (default: events file)."),
    ] = None,
    auto_tune: Annotated[
        Optional[int],
        typer.Option(help="With --draft-versions: tune the draft by itself at this many new accepted completions."),
    ] = None,
    auto_tune_max_seconds: Annotated[Optional[float], typer.Option(help="The auto tuning's training time.")] = None,
    auto_tune_memory_mb: Annotated[Optional[int], typer.Option(help="The auto tuning process's memory (MB).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="A JSON or TOML file of settings.")] = None,
    replicas: Annotated[
        Optional[int], typer.Option(help="Run this many copies on Ray Serve behind one port (pip extra 'replicas').")
    ] = None,
    cpus_per_replica: Annotated[
        Optional[float], typer.Option(help="With --replicas: CPUs (and engine threads) per copy; default: split.")
    ] = None,
) -> None:
    """Serve a model over HTTP: /v1/completions, /v1/chat/completions, /completion, /infill, /metrics.

    Settings come from these flags, then CODEACCEL_SERVE_* environment variables, then --config.
    """
    import uvicorn

    from codeaccel.serve.app import create_app

    settings = load_settings(
        config,
        model=model,
        engine=engine,
        method=method,
        draft_lengths=draft_lengths,
        draft_model=draft_model,
        datastores=datastore,
        n_threads=threads,
        host=host,
        port=port,
        parallel=parallel,
        ctx_size=ctx_size,
        prefill_chunk=prefill_chunk,
        prefix_cache=prefix_cache,
        max_queue=max_queue,
        completion_cache=completion_cache,
        api_key=api_key,
        events_db=events_db,
        accepted_store=accepted_store,
        draft_versions=draft_versions,
        auto_tune=auto_tune,
        auto_tune_max_seconds=auto_tune_max_seconds,
        auto_tune_memory_mb=auto_tune_memory_mb,
    )
    if replicas is not None and settings.port == 0:
        raise UserError("--replicas needs a fixed --port (Ray's proxy listens on it)")
    if replicas is None and cpus_per_replica is not None:
        raise UserError("--cpus-per-replica needs --replicas")
    _check(settings)
    if replicas is not None:
        from codeaccel.serve.replicas import serve_replicas

        serve_replicas(settings, replicas, cpus_per_replica)
        return
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")


def _check(settings: ServeSettings) -> None:
    """What the settings name, refused before the server starts (it would only log a failed load and stay up)."""
    check_engine(settings.engine)
    check_model(settings.model)
    if settings.method == "draft-model":
        check_model(settings.draft_model)
    if settings.method == "retrieval":
        check_datastores(settings.datastores)
    if settings.draft_versions is not None:
        check_folder(settings.draft_versions, "--draft-versions")
    check_sqlite_file(settings.events_db or default_location(), "--events-db")  # the accepted store's default too
    if settings.accepted_store is not None:
        store_location(settings.accepted_store, flag="--accepted-store")
