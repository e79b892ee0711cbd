"""The client/server split on loopback: remote drafts verified by the server, against the server alone.

A fresh codeaccel server per level and mode (the target, autoregressive: it only verifies what clients
draft; its prefix cache on, where a verify session's context stays between calls) and, per level, c clients
sending the same FIM requests (cut from real code, :mod:`codeaccel.bench.load_test`)
back to back, greedy, ``n_predict`` tokens:

* ``server-alone``: each client posts the prompt to ``/v1/completions``: the target decodes it;
* ``remote-draft``: each client runs :class:`RemoteDraftClient` with its own draft model (its own
  llama.cpp engine, ``draft_threads`` threads), the target only verifying on ``/v1/verify``.

Per level: end-to-end latency p50 / p99, aggregate tokens/s, errors, the target's seconds per
generated token (the server's evaluation seconds over the tokens it committed, read from its
``/metrics`` before and after), the mean accepted length, how many remote outputs equal the
server-alone ones, and the share of prompt tokens the server found cached. On loopback the clients'
drafts run on the same cores as the server, so the remote numbers include the drafts' competition for the
CPU that a real split would not have.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from codeaccel import machine
from codeaccel.bench.load_servers import launched, server_spec
from codeaccel.bench.load_test import fim_requests
from codeaccel.engines import Engine, load_engine
from codeaccel.errors import UserError
from codeaccel.remote.client import RemoteDraftClient
from codeaccel.serve.prompts import fim_prompt

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SplitBenchConfig:
    target_model: str = "qwen2.5-coder-1.5b-instruct"
    draft_model: str = "qwen2.5-coder-0.5b-instruct"
    clients: tuple[int, ...] = (1, 8)
    requests: int = 16  # per level
    n_predict: int = 64
    draft_tokens: int = 4
    parallel: int = 8
    ctx_size: int = 2048
    threads: int = 2  # the server's
    draft_threads: int = 1  # each client's draft engine

    def __post_init__(self) -> None:
        if not self.clients or min(self.clients) < 1 or self.requests < 1 or self.n_predict < 1:
            raise UserError("split bench: clients >= 1, requests >= 1, n_predict >= 1")


@dataclass
class SplitRow:
    method: str  # server-alone | remote-draft
    clients: int
    requests: int
    errors: int
    latency_p50_s: float
    latency_p99_s: float
    tokens_per_s: float  # generated tokens of all clients per second of wall time
    target_s_per_token: float  # the server's evaluation seconds per token it committed
    mean_accepted_len: float | None  # remote: tokens committed per verification
    identical: int | None  # remote: outputs equal to the server-alone ones
    context_cached: float | None = None  # share of the prompt tokens the server found in its kept caches


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


SECONDS, TOKENS = "codeaccel_engine_seconds_total", "codeaccel_generation_tokens_total"
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"  # prompt tokens found cached, asked


def _level(
    url: str,
    mode: str,
    prompts: list[list[int]],
    clients: int,
    config: SplitBenchConfig,
    make_client: Callable[[], RemoteDraftClient] | None,
    progress: Progress,
) -> tuple[SplitRow, list]:
    seconds0, tokens0, hits0, queries0 = (_metric(url, name) for name in (SECONDS, TOKENS, HITS, QUERIES))
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    outputs: dict[int, str] = {}  # request -> completion text
    latencies: list[float] = []
    calls = committed = errors = 0

    def worker() -> None:
        nonlocal calls, committed, errors
        remote = make_client() if make_client is not None else None
        http = httpx.Client(timeout=600)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    index, prompt = queue.pop(0)
                t0 = time.perf_counter()
                try:
                    if remote is None:
                        r = http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": config.n_predict,
                                                                     "temperature": 0})  # fmt: skip
                        r.raise_for_status()
                        body = r.json()
                        text, n_calls, n_committed = body["choices"][0]["text"], 0, 0
                    else:
                        gen = remote.generate(prompt, max_tokens=config.n_predict)
                        text, n_calls, n_committed = gen.text, gen.stats.calls, gen.stats.committed_tokens
                except Exception:  # counted, never fatal: the level goes on
                    with lock:
                        errors += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    outputs[index] = text
                    calls += n_calls
                    committed += n_committed
                    progress(f"{mode}, {clients} clients", len(outputs) + errors, len(prompts))
        finally:
            http.close()
            if remote is not None:
                remote.close()
                remote.draft.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    seconds, tokens = _metric(url, SECONDS) - seconds0, _metric(url, TOKENS) - tokens0
    hits, queries = _metric(url, HITS) - hits0, _metric(url, QUERIES) - queries0
    row = SplitRow(mode, clients, len(prompts), errors,
                   round(float(np.percentile(latencies, 50)), 3) if latencies else 0.0,
                   round(float(np.percentile(latencies, 99)), 3) if latencies else 0.0,
                   round(tokens / wall, 3), round(seconds / tokens, 5) if tokens else 0.0,
                   round(committed / calls, 3) if calls else None, None,
                   round(hits / queries, 4) if queries else None)  # fmt: skip
    return row, [outputs.get(i) for i in range(len(prompts))]


def run_split_bench(config: SplitBenchConfig, log_dir: Path, progress: Progress) -> dict:
    tokenizer = load_engine(config.draft_model, n_ctx=config.ctx_size, n_threads=1)
    try:
        budget = config.ctx_size - config.n_predict - 1
        prompts = [fim_prompt(tokenizer, r.prefix, r.suffix, budget) for r in fim_requests(config.requests)]
    finally:
        tokenizer.close()
    # A server of its own per level and mode: each sends the same prompts, and none may find them evaluated by
    # another; the prefix cache stays on, since a verify session's context is the sequence it keeps.
    spec = server_spec("codeaccel-autoregressive", config.target_model, config.parallel, config.ctx_size,
                       config.threads)  # fmt: skip
    rows = []
    for clients in config.clients:
        with launched(spec, log_dir / f"split-server-alone-{clients}.log") as url:
            alone, alone_out = _level(url, "server-alone", prompts, clients, config, None, progress)
        with launched(spec, log_dir / f"split-server-remote-{clients}.log") as url:

            def make_client(url: str = url) -> RemoteDraftClient:
                draft: Engine = load_engine(config.draft_model, n_ctx=config.ctx_size, n_threads=config.draft_threads)
                return RemoteDraftClient(draft, url, config.draft_tokens)

            remote, remote_out = _level(url, "remote-draft", prompts, clients, config, make_client, progress)
        remote.identical = sum(r is not None and r == a for r, a in zip(remote_out, alone_out))
        rows += [alone, remote]
    common = {"dataset": "fim:humaneval+mbpp+repo:click", "model": config.target_model, "engine": "llama.cpp",
              "draft_model": config.draft_model, "pass_at_1": None, "cpu": machine.cpu_model()}  # fmt: skip
    return {"config": asdict(config), "rows": [{**common, **asdict(r), "n_problems": r.requests} for r in rows]}


def to_markdown(doc: dict) -> str:
    head = (
        "| mode | clients | requests | errors | latency p50 (s) | p99 (s) | tokens/s | target s/token | "
        "mean accepted length | identical to server alone | context found cached |\n" + "|---" * 11 + "|\n"
    )
    lines = [f"| {r['method']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['latency_p50_s']} | "
             f"{r['latency_p99_s']} | {r['tokens_per_s']} | {r['target_s_per_token']} | "
             f"{r['mean_accepted_len'] if r['mean_accepted_len'] is not None else ''} | "
             f"{r['identical'] if r['identical'] is not None else ''} | "
             f"{_blank(r.get('context_cached'))} |" for r in doc["rows"]]  # fmt: skip
    return "# Client/server split (remote drafts) on loopback\n\n" + head + "\n".join(lines) + "\n"


def _blank(value) -> str:
    return "" if value is None else str(value)
