"""A loopback load test of a completion server: concurrent FIM requests, latency and throughput.

Requests (:func:`fim_requests`) are fill-in-the-middle cuts of real code, taken in turn
from HumanEval's canonical solutions, MBPP-sanitized's reference code and an installed
repository's functions (default ``click``): the code up to a line inside a function body is
the prefix, the code after the next ``GAP_LINES`` lines is the suffix, as an editor sends
them. Every request goes to llama-server's ``POST /infill`` (which our server implements
too, with the same prompt layout), streamed, greedy, ``n_predict`` tokens, so every server
under test sees the same requests.

For each concurrency c, c clients send requests back to back until ``requests`` were sent
(or ``time_limit_s`` passed); measured per request: time to first token (first streamed
content), total latency, tokens generated; per level: p50 / p99 of both, aggregate
generated tokens per second of wall time, and errors (a non-200, a broken stream, a
timeout). Where the server exposes them on ``GET /metrics`` (ours, with vLLM's names), the
level also records how its counters moved: draft tokens verified and accepted, and prompt
tokens looked up in and found in the prefix cache, so a row says why it is as fast as it is
(llama-server's /metrics has no such counters: None there). The result is a list of
:class:`LoadLevel` rows, one per (server, c).
"""

from __future__ import annotations

import ast
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from codeaccel.bench.datasets import humaneval_rows
from codeaccel.bench.repo_dataset import package_root
from codeaccel.errors import UserError

GAP_LINES = 2  # lines removed between prefix and suffix: what the model fills in
SOURCES = ("humaneval", "mbpp", "repo")
# LoadLevel field -> the Prometheus sample it counts (our server's, named as vLLM names them)
SERVER_COUNTERS = {
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total",
    "prompt_tokens_looked_up": "vllm:prefix_cache_queries_total",
    "prompt_tokens_cached": "vllm:prefix_cache_hits_total",
}


@dataclass(frozen=True)
class FimRequest:
    source: str  # "humaneval/HumanEval/3", "mbpp/12", "repo:click/core.py:Context.scope"
    prefix: str
    suffix: str
    middle: str  # the removed lines (not sent; for a reader of the results)


def _cut(code: str, body_lines: Sequence[int], rng: np.random.Generator) -> tuple[str, str, str] | None:
    """Cut ``code`` at a line of a function body: (prefix, middle, suffix)."""
    if not body_lines:
        return None
    lines = code.splitlines(keepends=True)
    start = int(rng.choice(body_lines)) - 1  # 0-based line index where the gap starts
    end = min(start + GAP_LINES, len(lines))
    indent = len(lines[start]) - len(lines[start].lstrip())
    prefix = "".join(lines[:start]) + lines[start][:indent]  # the cursor at the gap's indentation
    middle = lines[start][indent:] + "".join(lines[start + 1 : end])
    return prefix, middle, "".join(lines[end:])


def _body_lines(code: str) -> list[int]:
    """Line numbers (1-based) of statements inside function bodies, docstrings excluded."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            found += [stmt.lineno for stmt in body]
    return sorted(set(found))


def _mbpp_codes() -> list[tuple[str, str]]:
    rows = json.loads((resources.files("codeaccel") / "data" / "mbpp" / "sanitized-mbpp.json").read_text())
    return [(f"mbpp/{r['task_id']}", r["code"]) for r in rows]


def _repo_codes(package: str) -> list[tuple[str, str]]:
    root = package_root(package)
    return [(f"repo:{package}/{p.relative_to(root)}", p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts]  # fmt: skip


def fim_requests(n: int, seed: int = 0, package: str = "click") -> list[FimRequest]:
    """``n`` FIM cuts, taken in turn from HumanEval, MBPP and ``package``; the same for a seed."""
    if n < 1:
        raise UserError(f"the load test needs at least one request, got {n}")
    rng = np.random.default_rng(seed)
    pools = {
        "humaneval": [(f"humaneval/{r['task_id']}", r["prompt"] + r["canonical_solution"]) for r in humaneval_rows()],
        "mbpp": _mbpp_codes(),
        "repo": _repo_codes(package),
    }
    out: list[FimRequest] = []
    order: dict[str, list[int]] = {name: [] for name in pools}
    misses = dict.fromkeys(pools, 0)  # draws in a row that gave no cut
    while len(out) < n:
        name = SOURCES[len(out) % len(SOURCES)]
        if misses[name] > 2 * len(pools[name]):
            raise UserError(f"no {name} code can be cut into a FIM request")
        if not order[name]:  # every file drawn: draw them again (another cut of each)
            order[name] = list(rng.permutation(len(pools[name])))
        source, code = pools[name][order[name].pop()]
        misses[name] += 1
        if name == "repo" and len(code) > 6000:  # a window around a function, not a whole long module
            lines = code.splitlines(keepends=True)
            body = _body_lines(code)
            if not body:
                continue
            centre = int(rng.choice(body))
            code = "".join(lines[max(0, centre - 60) : centre + 20])
        cut = _cut(code, _body_lines(code), rng)
        if cut is None:
            continue
        prefix, middle, suffix = cut
        misses[name] = 0
        out.append(FimRequest(source, prefix, suffix, middle))
    return out


def typing_session(req: FimRequest, steps: int) -> list[FimRequest]:
    """An editor's requests while its user types on from a cut: the gap slides down a line per request.

    Request j's prefix is the cut's prefix and the next j lines of the file (the user wrote them), its
    middle the following lines the cut removed, its suffix the rest: each prefix extends the one before
    by a line, which a server's prompt cache keeps (llama.vim and Continue send such runs as you type).
    At most ``steps`` requests, fewer where the file ends.
    """
    tail = (req.middle + req.suffix).splitlines(keepends=True)
    gap = max(1, len(req.middle.splitlines()))
    session = []
    for j in range(steps):
        if j + gap > len(tail):
            break
        prefix = req.prefix + "".join(tail[:j])
        middle, suffix = "".join(tail[j : j + gap]), "".join(tail[j + gap :])
        session.append(FimRequest(f"{req.source}#{j}", prefix, suffix, middle))
    return session or [req]


@dataclass
class RequestTiming:
    ok: bool
    first_token_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class LoadLevel:
    """One server at one concurrency: what its clients measured."""

    server: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    generated_tokens: int
    tokens_per_s: float  # generated tokens / wall time, all clients together
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    error_examples: list[str] = field(default_factory=list)
    # the server's counters over the level (SERVER_COUNTERS; None: the server does not expose them)
    draft_tokens: int | None = None
    accepted_tokens: int | None = None
    prompt_tokens_looked_up: int | None = None
    prompt_tokens_cached: int | None = None

    def to_record(self) -> dict:
        return asdict(self)


def _infill_body(req: FimRequest, n_predict: int, cache_prompt: bool = True) -> dict:
    return {"input_prefix": req.prefix, "input_suffix": req.suffix, "n_predict": n_predict, "temperature": 0,
            "top_k": 1, "stream": True, "cache_prompt": cache_prompt}  # fmt: skip


def _predicted_body(req: FimRequest, n_predict: int) -> dict:
    """OpenAI's /v1/completions with ``suffix`` and the cut's true middle as its predicted output
    (an editor rewriting a region it already has): drafts are long and mostly accepted."""
    prediction = {"type": "content", "content": req.middle}
    return {"prompt": req.prefix, "suffix": req.suffix, "max_tokens": n_predict, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "prediction": prediction}  # fmt: skip


def _event_view(event: dict) -> tuple[str, bool, int]:
    """(new text, final?, tokens generated if final) of a llama.cpp or an OpenAI stream event."""
    if "choices" in event:  # OpenAI: the usage chunk (no choices) is the last one
        text = "".join(c.get("text") or "" for c in event["choices"])
        usage = event.get("usage")
        return text, usage is not None and not event["choices"], int((usage or {}).get("completion_tokens", 0))
    tokens = int(event.get("tokens_predicted") or event.get("timings", {}).get("predicted_n", 0))
    return event.get("content") or "", bool(event.get("stop")), tokens


async def _one(client, url: str, req: FimRequest, n_predict: int, timeout_s: float,
               predicted: bool = False, cache_prompt: bool = True) -> RequestTiming:  # fmt: skip
    path, body = ("/v1/completions", _predicted_body(req, n_predict)) if predicted else (
        "/infill", _infill_body(req, n_predict, cache_prompt))  # fmt: skip
    t0 = time.perf_counter()
    timing = RequestTiming(ok=False)
    try:
        async with client.stream("POST", url + path, json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                timing.error = f"HTTP {response.status_code}: {text}"
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    timing.error = str(event["error"])[:200]
                    return timing
                text, final, tokens = _event_view(event)
                if text and timing.first_token_s is None:
                    timing.first_token_s = time.perf_counter() - t0
                if final:
                    timing.tokens = tokens
                    timing.ok = True
    except Exception as exc:  # a broken connection or a timeout is an error of the server under test
        timing.error = f"{type(exc).__name__}: {exc}"[:200]
    timing.total_s = time.perf_counter() - t0
    if not timing.ok and not timing.error:
        timing.error = "the stream ended without a final event"
    return timing


async def _counters(client, url: str) -> dict[str, float | None]:
    """The server's SERVER_COUNTERS from ``GET /metrics`` (each None where it has no such sample)."""
    values: dict[str, float] = {}
    try:
        response = await client.get(url + "/metrics", timeout=10.0)
        if response.status_code == 200:
            for family in text_string_to_metric_families(response.text):
                for sample in family.samples:
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
    except (httpx.HTTPError, ValueError):  # unreachable, or not Prometheus text: no counters
        pass
    return {name: values.get(sample) for name, sample in SERVER_COUNTERS.items()}


async def _level(url: str, server: str, sessions: Sequence[Sequence[FimRequest]], concurrency: int,
                 n_predict: int, time_limit_s: float, timeout_s: float, predicted: bool,
                 cache_prompt: bool) -> LoadLevel:  # fmt: skip
    """Each client takes the next session and sends its requests one after another (each waits for the
    answer to the one before, as a user does), until every session was sent or the time is up."""
    queue: asyncio.Queue = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)
    results: list[RequestTiming] = []
    t0 = 0.0  # set when the clients start (after the counters are read)

    async def client_loop(client) -> None:
        while time.perf_counter() - t0 < time_limit_s:
            try:
                session = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            for req in session:
                if time.perf_counter() - t0 >= time_limit_s:
                    return
                results.append(await _one(client, url, req, n_predict, timeout_s, predicted, cache_prompt))

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(limits=limits) as client:
        before = await _counters(client, url)
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        after = await _counters(client, url)
    moved = {name: None if before[name] is None or after[name] is None else int(after[name] - before[name])
             for name in SERVER_COUNTERS}  # fmt: skip
    ok = [r for r in results if r.ok]
    ttft = [r.first_token_s for r in ok if r.first_token_s is not None]
    lat = [r.total_s for r in ok]
    tokens = sum(r.tokens for r in ok)

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    errors = [r.error for r in results if not r.ok]
    return LoadLevel(server, concurrency, len(results), len(errors), wall, tokens, tokens / wall if wall else 0.0,
                     pct(ttft, 50), pct(ttft, 99), pct(lat, 50), pct(lat, 99), errors[:3], **moved)  # fmt: skip


def run_load_test(
    url: str,
    server: str,
    requests: Sequence[FimRequest],
    concurrencies: Sequence[int],
    n_predict: int = 64,
    time_limit_s: float = 300.0,
    timeout_s: float = 120.0,
    progress: Callable[[LoadLevel], None] | None = None,
    predicted: bool = False,
    cache_prompt: bool = True,
    session_steps: int = 1,
) -> list[LoadLevel]:
    """Every concurrency level against one running server, in order (each level sends ``requests`` anew).

    session_steps: above 1, each request becomes an editor's :func:`typing_session` of that many
    requests, sent one after another by one client.

    predicted: send OpenAI /v1/completions with the true middle as ``prediction`` instead of
    llama.cpp's /infill (servers that take predicted outputs: ours). cache_prompt: llama.cpp's
    flag, in every /infill body: False makes each server evaluate every prompt whole (levels
    send the same requests again, which a kept cache would otherwise answer from memory)."""
    if any(c < 1 for c in concurrencies):
        raise UserError(f"concurrency levels must be >= 1, got {list(concurrencies)}")
    if session_steps < 1:
        raise UserError(f"a session needs at least one request, got {session_steps}")
    sessions = [typing_session(r, session_steps) if session_steps > 1 else [r] for r in requests]
    levels = []
    for c in concurrencies:
        level = asyncio.run(
            _level(url, server, sessions, c, n_predict, time_limit_s, timeout_s, predicted, cache_prompt)
        )
        levels.append(level)
        if progress is not None:
            progress(level)
    return levels


LOAD_DATASET = "fim:humaneval+mbpp+repo:click"  # the cuts fim_requests takes in turn


def result_row(level: dict, header: dict) -> dict:
    """A level in the committed results format: which server (method) on which model and requests;
    pass@1 is None: a load test times completions, it runs no tests."""
    return {"dataset": LOAD_DATASET, "model": header.get("model"), "engine": "llama.cpp", "method": level["server"],
            "n_problems": level["requests"], "pass_at_1": None, **level}  # fmt: skip


def write_report(levels: Sequence[LoadLevel], out: Path, header: dict) -> list[Path]:
    """``load_test.json`` (header + rows) and ``load_test.md`` (a table) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {**header, "rows": [result_row(level.to_record(), header) for level in levels]}
    (out / "load_test.json").write_text(json.dumps(doc, indent=2) + "\n")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.0f}"

    def share(part: int | None, whole: int | None) -> str:
        return "-" if part is None or not whole else f"{part}/{whole} ({100 * part / whole:.0f}%)"

    rows = "\n".join(
        f"| {r.server} | {r.concurrency} | {r.requests} | {r.errors} | {r.tokens_per_s:.1f} | {ms(r.ttft_p50_s)} | "
        f"{ms(r.ttft_p99_s)} | {ms(r.latency_p50_s)} | {ms(r.latency_p99_s)} | "
        f"{share(r.accepted_tokens, r.draft_tokens)} | {share(r.prompt_tokens_cached, r.prompt_tokens_looked_up)} |"
        for r in levels
    )
    md = (
        f"# Load test\n\nCommand: `{header.get('command', '')}`\n\nMachine: {header.get('machine', {})}; "
        f"{header.get('date', '')}.\n\n| server | clients | requests | errors | tokens/s | TTFT p50 ms | "
        f"TTFT p99 ms | latency p50 ms | latency p99 ms | draft tokens accepted | prompt tokens cached |\n"
        f"|---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\n"
        "The last two columns are the server's own counters over the level (`GET /metrics`, vLLM's names; "
        "`-` where a server has none).\n"
    )
    (out / "load_test.md").write_text(md)
    return [out / "load_test.json", out / "load_test.md"]
