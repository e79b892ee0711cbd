"""``codeaccel client``: the draft model runs here, the target verifies on a server (SpeCoder's split).

Each round: the local draft proposes up to ``draft_tokens`` tokens continuing the committed text
(sampled like the target when sampling, with their probabilities); ``POST /v1/verify`` has the
server's target check them in its continuous batch and returns the accepted prefix and one token
of its own; the client commits those and its draft model's cache keeps the accepted part. The
server holds the session's context, so after the first call a request carries only the draft.
Greedy text is exactly the target's; sampled text has the target's distribution (rejection
sampling where the draft's distribution is sparse enough to send, else sample-and-compare).

A completion cache answers a prompt it has seen (with the same settings) without the server.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from codeaccel.decoding.draft_model import DraftModelDrafter
from codeaccel.decoding.drafter import Draft
from codeaccel.decoding.generation import FinishReason, StopChecker
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines.base import Engine
from codeaccel.engines.tokenizer import engine_fingerprint
from codeaccel.errors import SetupError, UserError
from codeaccel.personalization.completion_cache import CachedCompletion, CacheKey, CompletionCache

GREEDY = SamplingParams()
MAX_DRAFT_TOKENS = 16  # the server's limit per verification (serve.schemas.MAX_VERIFY_DRAFT)
MAX_SENT_PROBS = 4096  # a draft row with more tokens of nonzero probability is not sent (the server's limit)


@dataclass
class ClientStats:
    """One generation's rounds with the server (per-request)."""

    calls: int = 0  # verifications
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    committed_tokens: int = 0
    draft_s: float = 0.0  # the local draft model
    round_trip_s: float = 0.0  # HTTP calls, the server's work included
    server_s: float = 0.0  # the server's own time for them (its timings.total_ms)
    target_tokens_s: float = 0.0  # the target's evaluation time for them (prompt_ms + predicted_ms)
    cache_hit: bool = False
    probs_sent: int = 0  # draft rows sent with their probabilities (rejection sampling)

    @property
    def mean_accepted_len(self) -> float | None:
        """Tokens committed per verification (accepted draft tokens + the target's own)."""
        return self.committed_tokens / self.calls if self.calls else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


@dataclass
class ClientGeneration:
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    wall_s: float
    stats: ClientStats = field(default_factory=ClientStats)


class RemoteDraftClient:
    """A local draft model and a server's target. One generation at a time (the draft engine holds one
    sequence); the completion cache may be shared with other clients of the process."""

    def __init__(self, draft: Engine, server_url: str, draft_tokens: int = 4, cache: CompletionCache | None = None,
                 api_key: str | None = None, timeout_s: float = 600.0, server: ServerInfo | None = None):  # fmt: skip
        """server: what the server's /v1/models says (None: read it); a draft that tokenizes otherwise than the
        server's target is refused (its ids would mean other tokens there)."""
        if not 0 <= draft_tokens <= MAX_DRAFT_TOKENS:
            raise UserError(f"--draft-tokens must be in 0..{MAX_DRAFT_TOKENS} (the server's limit), got {draft_tokens}")
        self.draft = draft
        self.drafter = DraftModelDrafter(draft)
        self.draft_tokens = draft_tokens
        self.cache = cache if cache is not None else CompletionCache(0)
        self.http = httpx.Client(base_url=server_url.rstrip("/"), headers=_auth(api_key), timeout=timeout_s)
        info = server if server is not None else server_info(server_url, api_key)
        if info.tokenizer_fingerprint is not None and info.tokenizer_fingerprint != engine_fingerprint(draft):
            raise UserError(f"the draft {draft.model_name} tokenizes text otherwise than the server's target "
                            f"{info.model}: remote drafts need the same tokenizer")  # fmt: skip
        self.server_ctx = info.max_model_len
        self._draft_lock = threading.Lock()  # a generation, or a swap of the draft's adapter

    def set_draft_lora(self, adapter: Path | None) -> None:
        """Draft with a tuned adapter from now on (None: the base draft), in the form the draft's engine
        applies (``DraftVersion.adapter_for``); waits for a generation in progress."""
        with self._draft_lock:
            self.draft.set_lora(adapter)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RemoteDraftClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt_tokens: Sequence[int], params: SamplingParams = GREEDY,
                 max_tokens: int = 256, stop: Sequence[str] = ()) -> ClientGeneration:  # fmt: skip
        if not prompt_tokens:
            raise UserError("the prompt is empty: nothing to condition on")
        if max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        t0 = time.perf_counter()
        key = CacheKey.of(prompt_tokens, params, max_tokens, stop)
        cached = self.cache.get(key)
        if cached is not None:
            stats = ClientStats(cache_hit=True)
            return ClientGeneration(cached.text, list(cached.tokens), cached.finish_reason,  # type: ignore[arg-type]
                                    time.perf_counter() - t0, stats)  # fmt: skip
        with self._draft_lock:
            generation = self._generate(list(prompt_tokens), params, max_tokens, stop, t0)
        self.cache.put(key, CachedCompletion(tuple(generation.tokens), generation.text, generation.finish_reason))
        return generation

    def _generate(self, prompt_tokens: list[int], params: SamplingParams, max_tokens: int, stop: Sequence[str],
                  t0: float) -> ClientGeneration:  # fmt: skip
        stats = ClientStats()
        checker = StopChecker(self.draft, stop, max_tokens)
        context = list(prompt_tokens)
        session = self.drafter.start(context)
        draft_rng = np.random.default_rng(None if params.seed is None else [params.seed, 2])
        session_id = uuid.uuid4().hex
        send_context = True
        finish: FinishReason | None = None
        try:
            while finish is None:
                # the server holds context + draft below its context size; nothing fits: the text ends here
                room = self.server_ctx - len(context) - 1
                if room < 0:
                    finish = "length"
                    break
                # past the draft's own context the server decodes alone (k = 0), as the target alone would
                draft_room = max(0, self.draft.n_ctx - len(context) - 1)
                k = min(self.draft_tokens, checker.remaining - 1, room, draft_room)
                finish = self._round(session, session_id, context, send_context, k, params, draft_rng, checker, stats)
                send_context = False
        finally:
            self._end_session(session_id)
        return ClientGeneration(checker.text, checker.tokens, finish, time.perf_counter() - t0, stats)

    def _round(self, session, session_id: str, context: list[int], send_context: bool, k: int,
               params: SamplingParams, draft_rng, checker: StopChecker,
               stats: ClientStats) -> FinishReason | None:  # fmt: skip
        """Draft k tokens, have them verified, commit what comes back (``context`` grows); the finish, if any."""
        t = time.perf_counter()
        draft = session.propose(context, k, params, draft_rng) if k > 0 else Draft(tokens=[])
        stats.draft_s += time.perf_counter() - t
        answer = self._verify(session_id, context, send_context, draft, params, checker.remaining, stats)
        tokens = answer["tokens"]
        context += tokens
        for i, token in enumerate(tokens):
            stats.committed_tokens += 1
            if answer["finish_reason"] == "eos" and i == len(tokens) - 1:  # the target's end of text, whatever
                return checker.push_end_of_text(token)  # the draft's own end-of-generation ids are
            finish = checker.push(token)
            if finish is not None:
                return finish
        return "length" if answer["finish_reason"] == "length" else None  # the server's context is full

    def _end_session(self, session_id: str) -> None:
        """The server may forget the session (its context); a failure here only leaves it to expire."""
        try:
            self.http.delete(f"/v1/verify/{session_id}")
        except httpx.HTTPError:
            pass

    def _verify(self, session_id: str, context: list[int], send_context: bool, draft: Draft, params: SamplingParams,
                max_tokens: int, stats: ClientStats) -> dict:  # fmt: skip
        """One verification; the context goes along on the first call, or if the server forgot the session."""
        body: dict = {"session_id": session_id, "draft": draft.tokens, "max_tokens": max_tokens,
                      "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                      "seed": params.seed}  # fmt: skip
        if send_context:
            body["context"] = context
        probs = _sparse_rows(draft.probs)
        if probs is not None:
            body["draft_probs"] = probs
            stats.probs_sent += len(probs)
        t = time.perf_counter()
        response = self._post(body)
        if response.status_code == 404 and _code(response) == "session_not_found" and not send_context:
            response = self._post({**body, "context": context})  # evicted or restarted: its cache may be gone too
        stats.round_trip_s += time.perf_counter() - t
        if response.status_code != 200:
            raise SetupError(f"the server refused a verification ({response.status_code}): {_message(response)}")
        answer = response.json()
        stats.calls += 1
        stats.drafted_tokens += answer["n_drafted"]
        stats.accepted_tokens += answer["n_accepted"]
        timings = answer.get("timings") or {}
        stats.server_s += (timings.get("total_ms") or 0.0) / 1000
        stats.target_tokens_s += ((timings.get("prompt_ms") or 0.0) + (timings.get("predicted_ms") or 0.0)) / 1000
        return answer

    def _post(self, body: dict) -> httpx.Response:
        try:
            return self.http.post("/v1/verify", json=body)
        except httpx.HTTPError as exc:
            raise SetupError(f"cannot reach the server at {self.http.base_url}: {exc}") from None


@dataclass(frozen=True)
class ServerInfo:
    model: str  # its /v1/models id
    max_model_len: int  # most tokens a request's context may hold there
    tokenizer_fingerprint: str | None = None  # its target's (None: a server that does not say)


def server_info(server_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> ServerInfo:
    """What a server verifies with (its /v1/models); a SetupError if it cannot be reached or used."""
    try:
        response = httpx.get(server_url.rstrip("/") + "/v1/models", headers=_auth(api_key), timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise SetupError(f"cannot reach the server at {server_url}: {exc}") from None
    if response.status_code != 200:
        raise SetupError(f"the server at {server_url} answered {response.status_code}: {_message(response)}")
    try:
        model = response.json()["data"][0]
        fingerprint = model.get("tokenizer_fingerprint")
        return ServerInfo(str(model["id"]), int(model["max_model_len"]),
                          fingerprint if isinstance(fingerprint, str) else None)  # fmt: skip
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise SetupError(f"the server at {server_url} is no codeaccel server: its /v1/models names no model with "
                         "a max_model_len") from None  # fmt: skip


def _auth(api_key: str | None) -> dict[str, str]:
    """The server's bearer-key header (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _sparse_rows(probs: np.ndarray | None) -> list[dict[str, float]] | None:
    """Draft rows  # [k, vocab] as {token id: probability}, or None if one is too dense to send."""
    if probs is None:
        return None
    rows = []
    for row in probs:
        nonzero = np.flatnonzero(row)
        if len(nonzero) > MAX_SENT_PROBS:
            return None
        rows.append({str(int(t)): float(row[t]) for t in nonzero})
    return rows


def _code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
