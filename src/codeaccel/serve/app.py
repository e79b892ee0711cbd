"""The FastAPI application: ``create_app(settings)`` (no work at import), its routes, its lifespan.

The model loads in a background thread after the server starts listening, so ``/health``
answers 503 while loading (and if loading failed, or once the decoding thread stopped), 200 after.
Routes are thin: validate, build the prompt, submit a :class:`~codeaccel.serve.completions.Call`, format.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from codeaccel.decoding.batch_draft_model import BatchDraftModel
from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.drafter import BatchDrafter, Drafter
from codeaccel.decoding.generation import Generation, GivenDraft
from codeaccel.decoding.generation import Request as GenRequest
from codeaccel.decoding.sampling import SamplingParams
from codeaccel.engines import Engine, load_engine, open_sequences
from codeaccel.engines.cost_curve import cost_curve_for
from codeaccel.engines.sequences import SequenceSet
from codeaccel.engines.tokenizer import check_same_tokenizer, engine_fingerprint
from codeaccel.errors import UserError
from codeaccel.methods.registry import RETRIEVAL_K_MAX
from codeaccel.personalization.auto_tune import AutoTuneConfig, AutoTuner
from codeaccel.personalization.completion_cache import CompletionCache
from codeaccel.personalization.store import AcceptedStore, default_location, open_store
from codeaccel.personalization.versions import DraftVersions
from codeaccel.retrieval.acceptance_cache import AcceptanceCache
from codeaccel.retrieval.datastore import open_datastores
from codeaccel.retrieval.drafter import RetrievalDrafter
from codeaccel.retrieval.timing import RetrievalTiming
from codeaccel.serve import formats
from codeaccel.serve.access import AccessAndCount
from codeaccel.serve.body_limit import BodyLimit
from codeaccel.serve.completions import Call
from codeaccel.serve.draft_follow import DraftFollower
from codeaccel.serve.errors import APIError, error_body, install_error_handlers, to_api_error
from codeaccel.serve.events import EventStore
from codeaccel.serve.metrics import ServerMetrics
from codeaccel.serve.prompts import chat_prompt, fim_prompt
from codeaccel.serve.scheduler import Scheduler
from codeaccel.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EventRequest,
    InfillRequest,
    NativeCompletionRequest,
    VerifyRequest,
)
from codeaccel.serve.sessions import VerifySessions
from codeaccel.serve.settings import ServeSettings

log = logging.getLogger(__name__)
REPLICA_HEADER = "X-Codeaccel-Replica"  # names the replica that answered (Ray Serve deployments)

ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/completion",
                    "/infill", "/v1/events", "/v1/verify"})  # fmt: skip


@dataclass
class Runtime:
    """What loading the model gives: the engine (tokenizer, template), its sequences, their scheduler."""

    engine: Engine
    seqs: SequenceSet
    scheduler: Scheduler
    model_id: str

    drafter: Drafter | BatchDrafter | None = None
    draft_engine: Engine | None = None  # the draft model's (method draft-model)
    follower: DraftFollower | None = None  # the tuned draft's live version, followed

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        """The target's (in /v1/models): a remote draft client refuses a draft that tokenizes otherwise."""
        return engine_fingerprint(self.engine)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if not self.scheduler.stop():  # still inside an evaluation: freeing its context now would crash
            log.error("the scheduler did not stop; leaving the engine to the process's exit")
            return
        if self.drafter is not None:
            self.drafter.close()
        if self.draft_engine is not None:
            self.draft_engine.close()
        self.seqs.free()
        self.engine.close()


class ServerState:
    """Owned by the app: settings, metrics, the event store, and the runtime once loaded."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.events = EventStore(settings.events_db or _default_events_db())
        self.sessions = VerifySessions()  # /v1/verify: each remote draft client's committed context
        # completions of reproducible requests, answered again without decoding (SpeCoder's cache)
        self.completion_cache: CompletionCache[Generation] = CompletionCache(settings.completion_cache)
        self.metrics.watch_completion_cache(self.completion_cache)
        # by default in the events' SQLite file: one file holds the whole feedback loop
        self.accepted = open_store(settings.accepted_store or self.events.path)
        self.auto_tuner = _auto_tuner(settings, self.accepted, self.events.path)  # None: off
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()

    def reconcile_selects(self) -> int:
        """Every stored select event's choice in the accepted store (idempotent): one whose storing failed
        when it arrived, or that arrived before its choice was recorded as served, joins now; how many did."""
        try:
            before = self.accepted.count()
            for event in self.events.events("select"):
                self.accepted.accept_served(event["completion_id"], event["choice_index"], event.get("repository"))
            return self.accepted.count() - before
        except Exception:  # a store unreachable now: the next start reconciles again
            log.exception("reconciling the select events with the accepted store failed")
            return 0

    def load(self) -> None:
        s = self.settings
        try:
            joined = self.reconcile_selects()
            if joined:
                log.warning("%d selected choices joined the accepted completions (their events were stored)", joined)
            if self.auto_tuner is not None:
                self.auto_tuner.check()  # accepted completions may have reached the threshold while it was down
            engine = load_engine(s.model, s.engine, n_ctx=s.ctx_size, n_threads=s.n_threads)
            # a cache stream per request (they share nothing): each attends over its own cells only
            seqs = open_sequences(engine, n_seq_max=s.parallel, n_ctx=s.ctx_size * s.parallel, unified=False)
            drafter, costs, draft_engine = _drafter(s, engine)
            scheduler = Scheduler(seqs, s.max_queue, self.metrics, drafter, costs,
                                  joint_lengths=s.draft_lengths == "joint", prefill_chunk=s.prefill_chunk,
                                  reuse_prefixes=s.prefix_cache)  # fmt: skip
            follower = None
            if s.draft_versions is not None:
                if not isinstance(drafter, BatchDraftModel):
                    raise UserError("--draft-versions needs --method draft-model")
                follower = DraftFollower(DraftVersions(s.draft_versions), drafter.seqs.set_lora,
                                         drafter.seqs.engine.kind, scheduler, self.metrics, s.draft_poll_s)  # fmt: skip
                follower.apply_now()
            scheduler.start()
            if follower is not None:
                follower.start()
            self.runtime = Runtime(engine, seqs, scheduler, s.model_alias or engine.model_name, drafter,
                                   draft_engine, follower)  # fmt: skip
            log.warning("serving %s on %s with %s: %d sequences of %d tokens", engine.model_name, s.engine, s.method,
                        s.parallel, s.ctx_size)  # fmt: skip
        except Exception as exc:  # reported by /health and every endpoint, never a crash
            log.exception("loading %s failed", s.model)
            self.load_error = f"loading {s.model} failed: {exc}"
        finally:
            self.loaded.set()

    def ready(self) -> Runtime:
        if self.runtime is None:
            message = self.load_error or "the model is loading"
            if self.load_error is not None:  # retrying will not help: the operator must fix the settings
                raise APIError(503, message, "server_error", code="load_failed")
            raise APIError(503, message, "server_error", code="loading", headers={"Retry-After": "5"})
        if not self.runtime.scheduler.alive:  # nothing would answer: not healthy (a restart is needed)
            raise APIError(503, "the decoding thread has stopped", "server_error", code="scheduler_stopped")
        return self.runtime


def _drafter(s: ServeSettings, engine: Engine) -> tuple[Drafter | BatchDrafter | None, LearnedCosts | None,
                                                      Engine | None]:  # fmt: skip
    """The method's drafter, the target's costs its lengths read (the profiled curve, at the scale the
    decoder learns; shared with the retrieval timing), and the draft model's engine if any."""
    if s.method == "autoregressive":
        return None, None, None
    curve = cost_curve_for(engine)  # profiled on first use on this machine, then cached
    costs = LearnedCosts(curve)
    if s.method == "draft-model":
        draft = load_engine(s.draft_model, s.engine, n_ctx=s.ctx_size, n_threads=s.n_threads)
        try:
            check_same_tokenizer(draft, engine)
            draft_curve = cost_curve_for(draft)
            draft_seqs = open_sequences(draft, n_seq_max=s.parallel, n_ctx=s.ctx_size * s.parallel, unified=False)
        except BaseException:
            draft.close()
            raise
        relative_speed = draft_curve.seconds[0] / curve.seconds[0]  # one-token steps, both measured here
        return BatchDraftModel(draft_seqs, draft_curve, relative_speed), costs, draft
    stores = open_datastores(engine, tuple(str(p) for p in s.datastores)) if s.method == "retrieval" else []
    timing = RetrievalTiming(curve, k_max=RETRIEVAL_K_MAX, costs=costs)
    return RetrievalDrafter(stores, timing=timing, cache=AcceptanceCache(), context=True), costs, None


def _ready(request: Request) -> Runtime:
    return request.app.state.codeaccel.ready()


ReadyRuntime = Annotated[Runtime, Depends(_ready)]  # a route's loaded model (503 while loading)


def _default_events_db():
    return default_location()


def _auto_tuner(s: ServeSettings, accepted: AcceptedStore, events_path: Path) -> AutoTuner | None:
    """The draft's tuning started by itself at ``auto_tune`` new accepted completions (None: off)."""
    if not s.auto_tune or s.draft_versions is None:
        return None
    versions = DraftVersions(s.draft_versions)
    config = AutoTuneConfig(draft_model=s.draft_model, target_model=s.model, store=s.accepted_store or str(events_path),
                            versions=versions.root, threshold=s.auto_tune, max_seconds=s.auto_tune_max_seconds,
                            max_memory_mb=s.auto_tune_memory_mb)  # fmt: skip
    return AutoTuner(config, lambda: accepted.count(after_id=versions.last_trained_id()))


def create_app(settings: ServeSettings, load_in_background: bool = True, replica: str | None = None) -> FastAPI:
    """The server's app; ``replica``: this copy's name among several (Ray Serve), sent in every response."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_in_background:
            threading.Thread(target=state.load, name="codeaccel-load", daemon=True).start()
        else:
            state.load()
        yield
        await asyncio.to_thread(state.loaded.wait)
        if state.runtime is not None:
            state.runtime.close()
        if state.auto_tuner is not None:
            await asyncio.to_thread(state.auto_tuner.close)  # a tuning cut short promotes nothing
        state.accepted.close()

    app = FastAPI(title="codeaccel", lifespan=lifespan)
    app.state.codeaccel = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    app.add_middleware(
        AccessAndCount,
        api_key=settings.api_key,
        count=lambda path, status: state.metrics.requests.labels(path, str(status)).inc(),
        routes=ROUTES,
        replica_header=(REPLICA_HEADER, replica) if replica is not None else None,
    )

    def check_model(name: str | None, rt: ReadyRuntime) -> None:
        if name is not None and name not in (rt.model_id, rt.engine.model_name):
            raise APIError(404, f"the model {name!r} does not exist: this server serves {rt.model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip

    # ---- health, models, metrics, events ---------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' and uptime checks' probe
    def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/v1/models")
    def models(rt: ReadyRuntime):
        return {"object": "list", "data": [{"id": rt.model_id, "object": "model", "created": 0, "owned_by": "codeaccel",
                                            "max_model_len": settings.ctx_size,
                                            "tokenizer_fingerprint": rt.tokenizer_fingerprint}]}  # fmt: skip

    @app.get("/metrics")
    def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/events")
    async def events(body: EventRequest):
        event_id = await run_in_threadpool(state.events.add, body)
        answer = {"id": event_id, "status": "stored"}
        if body.type == "select":  # the choice's text joins the accepted completions (the draft's training set)
            try:
                answer["accepted_id"] = await run_in_threadpool(state.accepted.accept_served, body.completion_id,
                                                                body.choice_index, body.repository)  # fmt: skip
            except Exception:  # the event is stored (the server's next start reconciles it); say so, no 500
                log.exception("storing the selected choice of %s failed", body.completion_id)
                answer["accepted_id"] = None
            if answer["accepted_id"] is not None and state.auto_tuner is not None:
                await run_in_threadpool(state.auto_tuner.check)  # enough new ones: a tuning starts
        return answer

    def served(rt: Runtime, prefix: str, prompts: list[list[int]]):
        """A Call's on_done: its choices stored under the id the client saw, for later select events."""

        def store(call_id: str, done) -> None:
            choices = [(i, rt.engine.detokenize(prompts[i]), f.generation.text) for i, f in done]
            state.accepted.record_served(f"{prefix}-{call_id}", choices, rt.model_id)

        def record(call: Call, done):
            return asyncio.get_running_loop().run_in_executor(None, store, call.id, done)  # awaited: after_done

        return record

    # ---- completions -------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request, rt: ReadyRuntime):
        check_model(body.model, rt)
        _check_choices(_n_prompts(body) * body.n, rt.scheduler.capacity)  # before tokenizing what never runs
        prompts = await run_in_threadpool(_completion_prompts, rt, body, settings.ctx_size, settings.default_max_tokens)
        prediction = await run_in_threadpool(_prediction, rt, body)
        requests = _requests(body, prompts, settings, prediction)
        prompt_of = [p_index for _, p_index in requests]  # choice index → its prompt
        record = served(rt, "cmpl", [prompts[p_index] for p_index in prompt_of])
        call = Call(rt.scheduler, [r for r, _ in requests], body.stream, body.stops, record, state.completion_cache)
        n_prompt = sum(len(p) for p in prompts)
        if body.stream:
            return _sse(_openai_completion_stream(call, rt.model_id, http, body, n_prompt, prompt_of), call)
        results = await call.results(http)
        await call.after_done()
        echo = [_echo_text(rt, body, p_index) for p_index in prompt_of] if body.echo else [""] * len(results)
        return formats.completion_body(call, rt.model_id, results, n_prompt, echo, prompt_of)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request, rt: ReadyRuntime):
        check_model(body.model, rt)
        _check_messages(len(body.messages), settings.ctx_size)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        prompt = await run_in_threadpool(chat_prompt, rt.engine, messages)
        _check_fits(prompt, settings.ctx_size)
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        prediction = await run_in_threadpool(_prediction, rt, body)
        requests = _requests(body, [prompt], settings, prediction)
        record = served(rt, "chatcmpl", [prompt] * len(requests))
        call = Call(rt.scheduler, [r for r, _ in requests], body.stream, body.stops, record, state.completion_cache)
        if body.stream:
            return _sse(_chat_stream(call, rt.model_id, http, body, len(prompt)), call)
        results = await call.results(http)
        await call.after_done()
        return formats.chat_body(call, rt.model_id, results, len(prompt))

    @app.post("/completion")
    async def native_completion(body: NativeCompletionRequest, http: Request, rt: ReadyRuntime):
        if isinstance(body.prompt, list):
            return await _native(rt, body, list(body.prompt), "", http)
        prompt = await run_in_threadpool(rt.engine.tokenize, body.prompt)
        return await _native(rt, body, prompt, body.prompt, http)

    @app.post("/infill")
    async def infill(body: InfillRequest, http: Request, rt: ReadyRuntime):
        reserve = body.n_predict if body.n_predict > 0 else settings.default_max_tokens  # room kept for the middle
        budget = settings.ctx_size - min(reserve, settings.ctx_size // 2)
        extra = [(c.filename, c.text) for c in body.input_extra]
        prompt = await run_in_threadpool(  # the user's files are code: markup in them is text (as llama-server)
            fim_prompt, rt.engine, body.input_prefix, body.input_suffix, budget, extra, body.prompt, True, False
        )
        return await _native(rt, body, prompt, "", http)

    # ---- remote drafts (SpeCoder's split: the draft on the client, verification here) ------
    @app.post("/v1/verify")
    async def verify(body: VerifyRequest, http: Request, rt: ReadyRuntime):
        check_model(body.model, rt)
        _check_verify_tokens(body, rt.engine.n_vocab)
        if body.session_id is None:
            return await _verify(rt, body, list(body.context) + body.append, http)
        with state.sessions.call(body.session_id, body.context, body.append) as context:
            answer = await _verify(rt, body, context, http)
            state.sessions.commit(body.session_id, context + answer["tokens"])
        return answer

    @app.delete("/v1/verify/{session_id}")
    def end_session(session_id: str):
        return {"session_id": session_id, "deleted": state.sessions.end(session_id)}

    async def _verify(rt: Runtime, body: VerifyRequest, context: list[int], http: Request) -> dict:
        _check_fits(context + body.draft, settings.ctx_size)
        seed = None if body.seed is None else call_seed(body.seed, len(context))
        params = _params(body.temperature, body.top_p, body.top_k, seed)
        probs = None if body.draft_probs is None else tuple(body.draft_probs)
        room = settings.ctx_size - len(context)
        max_tokens = min(body.max_tokens or len(body.draft) + 1, len(body.draft) + 1, room)
        request = GenRequest(context, params, max_tokens, draft=GivenDraft(tuple(body.draft), probs))
        call = Call(rt.scheduler, [request], False, ())
        [result] = await call.results(http)
        full = len(context) + result.finished.generation.n_generated >= settings.ctx_size
        return formats.verify_body(call, rt.model_id, body.session_id, result.finished, len(context), full)

    async def _native(rt: Runtime, body, prompt: list[int], prompt_text: str, http: Request):
        _check_tokens(prompt, rt.engine.n_vocab)
        _check_fits(prompt, settings.ctx_size)
        seed = None if body.seed in (None, -1) else body.seed
        params = _params(body.temperature, body.top_p, body.top_k, seed)
        if body.n_predict == 0 and not (settings.prefix_cache and body.cache_prompt):
            # llama.vim's cache warm-up, with no cache to warm: the prompt only, nothing generated or evaluated
            empty = formats.native_empty_body(rt.model_id, len(prompt), prompt_text)
            return _sse(_once(formats.sse(empty)), None, done_marker=False) if body.stream else empty
        room = settings.ctx_size - len(prompt)
        request = GenRequest(
            prompt,
            params,
            room if body.n_predict < 0 else min(body.n_predict, room),
            tuple(body.stop),
            reuse_prefix=body.cache_prompt,
        )
        call = Call(rt.scheduler, [request], body.stream, body.stop, cache=state.completion_cache)
        if body.stream:
            return _sse(_native_stream(call, rt.model_id, http, prompt_text), call, done_marker=False)
        results = await call.results(http)
        return formats.native_body(rt.model_id, results[0].finished, prompt_text)

    return app


# ---- request building (pure, tested on their own) ---------------------------------------
def call_seed(seed: int, position: int) -> int:
    """The sampler seed of one verification: the client's seed and where in the text it samples, so
    successive calls of one seeded session draw independent, reproducible numbers."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _echo_text(rt: Runtime, body: CompletionRequest, p_index: int) -> str:
    """The prompt a choice continues, as ``echo`` returns it (token ids: their text)."""
    if isinstance(body.prompt, str):
        return body.prompt
    if all(isinstance(t, int) for t in body.prompt):
        return rt.engine.detokenize(body.prompt)
    return body.prompt[p_index]


def _check_fits(prompt: list[int], ctx_size: int) -> None:
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompt) >= ctx_size:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context holds {ctx_size}",
                       param="prompt", code="context_length_exceeded")  # fmt: skip


def _check_tokens(prompt: list[int], n_vocab: int, param: str = "prompt") -> None:
    bad = [t for t in prompt if not 0 <= t < n_vocab]
    if bad:
        raise APIError(400, f"{param}: token ids out of range [0, {n_vocab}): {bad[:3]}", param=param)


def _check_verify_tokens(body: VerifyRequest, n_vocab: int) -> None:
    """A verification's token ids, each list under the name the client gave it."""
    for param in ("context", "append", "draft"):
        _check_tokens(list(getattr(body, param) or ()), n_vocab, param)
    for row in body.draft_probs or ():  # a probability of a token the model does not have
        _check_tokens(list(row), n_vocab, "draft_probs")


def _n_prompts(body: CompletionRequest) -> int:
    """How many prompts a completion request holds (text, token ids: one; a list of texts: each)."""
    if isinstance(body.prompt, str) or all(isinstance(t, int) for t in body.prompt):
        return 1
    return len(body.prompt)


def _check_choices(n_choices: int, capacity: int) -> None:
    if n_choices > capacity:  # as the scheduler would refuse them, before any prompt is tokenized
        raise APIError(400, f"{n_choices} choices in one request; this server holds {capacity} at once")


def _check_messages(n_messages: int, ctx_size: int) -> None:
    """Every message renders as one token at least: more than the context holds never fit (refused before
    the template and the tokenizer spend seconds on them)."""
    if n_messages >= ctx_size:
        raise APIError(400, f"{n_messages} messages; this model's context holds {ctx_size} tokens",
                       param="messages", code="context_length_exceeded")  # fmt: skip


def _completion_prompts(
    rt: Runtime, body: CompletionRequest, ctx_size: int, default_max_tokens: int
) -> list[list[int]]:
    if isinstance(body.prompt, list) and all(isinstance(t, int) for t in body.prompt):
        prompts = [list(body.prompt)]
        _check_tokens(prompts[0], rt.engine.n_vocab)
    else:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.suffix is not None:
            budget = ctx_size - min(body.max_tokens or default_max_tokens, ctx_size // 2)
            prompts = [fim_prompt(rt.engine, t, body.suffix, budget) for t in texts]
        else:
            prompts = [rt.engine.tokenize(t) for t in texts]
    for p in prompts:
        _check_fits(p, ctx_size)
    return prompts


def _params(temperature: float, top_p: float, top_k: int, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    except (UserError, ValueError) as exc:
        message = str(exc)
        param = next((p for p in ("temperature", "top_p", "top_k", "seed") if message.startswith(p)), None)
        raise APIError(400, message, param=param) from None


def _prediction(rt: Runtime, body) -> list[int]:
    """OpenAI's predicted output as tokens (drafting methods search it first)."""
    return rt.engine.tokenize(body.prediction.content) if body.prediction and body.prediction.content else []


def _requests(
    body, prompts: list[list[int]], settings: ServeSettings, prediction: list[int]
) -> list[tuple[GenRequest, int]]:
    """One generation request per (prompt, choice): choice i of a seeded request samples with seed + i."""
    out = []
    max_tokens = body.max_tokens or settings.default_max_tokens
    for p_index, prompt in enumerate(prompts):
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + i
            params = _params(body.temperature, body.top_p, body.top_k, seed)
            room = settings.ctx_size - len(prompt)
            out.append((GenRequest(prompt, params, min(max_tokens, room), tuple(body.stops),
                                   prediction_tokens=prediction), p_index))  # fmt: skip
    return out


# ---- streams --------------------------------------------------------------------------------
async def _once(chunk: str) -> AsyncIterator[str]:
    yield chunk


def _sse(chunks: AsyncIterator[str], call: Call | None, done_marker: bool = True) -> StreamingResponse:
    """A server-sent event stream; an error after the stream started is sent as an OpenAI error event,
    then ``[DONE]`` (``done_marker``: OpenAI's streams; llama-server's native ones end without it).

    ``call``: cancelled when the response ends, also if the client left before the first chunk
    (the stream's own cleanup never runs then)."""

    async def guarded():
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:  # after the 200: the error as an event, then the end marker clients wait for
            error = to_api_error(exc)
            yield formats.sse(error_body(error.message, error.type, error.param, error.code))
            if done_marker:
                yield formats.sse("[DONE]")

    background = None if call is None else BackgroundTask(call.cancel)
    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=background)  # fmt: skip


async def _openai_completion_stream(call: Call, model: str, http: Request, body: CompletionRequest, n_prompt: int,
                                    prompt_of: list[int]):  # fmt: skip
    finished, finished_prompts = [], []
    async for d in call.deltas(http):
        if d.finished is not None:
            finished.append(d.finished)
            finished_prompts.append(prompt_of[d.index])
        yield formats.sse(formats.completion_chunk(call, model, d))
    if body.stream_options and body.stream_options.include_usage:
        yield formats.sse(formats.usage_chunk(call, model, "text_completion", finished, n_prompt, finished_prompts))
    await call.after_done()
    yield formats.sse("[DONE]")


async def _chat_stream(call: Call, model: str, http: Request, body: ChatCompletionRequest, n_prompt: int):
    started: set[int] = set()
    finished = []
    async for d in call.deltas(http):
        if d.index not in started:
            started.add(d.index)
            yield formats.sse(formats.chat_chunk(call, model, d.index, {"role": "assistant", "content": ""}, None))
        if d.text:
            yield formats.sse(formats.chat_chunk(call, model, d.index, {"content": d.text}, None))
        if d.finished is not None:
            finished.append(d.finished)
            yield formats.sse(formats.chat_chunk(call, model, d.index, {}, d.finish_reason, d.finished))
    if body.stream_options and body.stream_options.include_usage:
        yield formats.sse(formats.usage_chunk(call, model, "chat.completion.chunk", finished, n_prompt))
    await call.after_done()
    yield formats.sse("[DONE]")


async def _native_stream(call: Call, model: str, http: Request, prompt_text: str):
    async for d in call.deltas(http):
        if d.finished is not None:
            final = formats.native_body(model, d.finished, prompt_text)
            final["content"] = d.text  # a stream's last object carries only the rest of the text
            yield formats.sse(final)
        elif d.text:
            yield formats.sse(formats.native_chunk(d.text))
