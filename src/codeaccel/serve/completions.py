"""One completion request, whatever the endpoint: its choices submitted together, awaited or streamed.

A :class:`Call` is the per-request object: the choices' jobs, the queue their events
arrive on (sinks are called from the scheduler thread and hop onto the event loop), and
what each choice has streamed. Progress is coalesced: a choice has at most one progress
wake-up queued, and the consumer reads the newest text when it gets to it, so a client
that reads slowly holds one pending text per choice, not one per step. Endpoints differ
only in how a result or a chunk is formatted (:mod:`codeaccel.serve.formats`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from fastapi import Request as HTTPRequest

from codeaccel.decoding.generation import Generation, Request
from codeaccel.personalization.completion_cache import CacheKey, CompletionCache
from codeaccel.serve.errors import ClientGone, to_api_error
from codeaccel.serve.scheduler import Failed, Finished, Job, Progress, Scheduler
from codeaccel.serve.streaming import StreamCursor

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5
_PROGRESS = object()  # queued in place of a Progress: "read this choice's newest progress"


@dataclass(frozen=True)
class ChoiceResult:
    index: int
    finished: Finished


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    text: str
    finish_reason: str | None  # OpenAI's: "stop" or "length" on the choice's last chunk
    finished: Finished | None = None


def openai_finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


class Call:
    def __init__(self, scheduler: Scheduler, requests: Sequence[Request], stream: bool, stops: Sequence[str],
                 on_done: Callable[[Call, list[tuple[int, Finished]]], Awaitable | None] | None = None,
                 cache: CompletionCache[Generation] | None = None):  # fmt: skip
        """on_done: called once, on the event loop, with the call and every choice's result when all have
        finished (what it returns, if awaitable, :meth:`after_done` awaits); cache: completions of
        reproducible requests (greedy or seeded) answered again without decoding (SpeCoder's
        completion cache), and filled with what this call decodes."""
        self.id = uuid.uuid4().hex
        self.requests = list(requests)
        self._on_done = on_done
        self._after: Awaitable | None = None
        self.created = int(time.time())
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._latest: dict[int, Progress] = {}  # choice -> newest progress not read yet (the scheduler writes)
        self._latest_lock = threading.Lock()
        self._cache = cache
        self._keys = [_cache_key(r) if cache is not None else None for r in requests]
        hits = {i: g for i, key in enumerate(self._keys) if key is not None and (g := cache.get(key)) is not None}
        decoded = [i for i in range(len(requests)) if i not in hits]
        self.jobs = [Job(requests[i], self._sink(i), stream=stream) for i in decoded]
        prompts: set[tuple[int, ...]] = set()
        for job in self.jobs:  # n > 1: the choices of one prompt count its tokens once
            key = tuple(job.request.prompt_tokens)
            job.counts_prompt = key not in prompts
            prompts.add(key)
        self.cursors = [StreamCursor(stops) for _ in requests]
        self.open = set(range(len(requests)))
        self.ids = dict(zip(decoded, scheduler.submit(self.jobs) if self.jobs else []))  # QueueFull: none queued
        for i, generation in hits.items():  # answered at once, as a cache hit costs nothing
            self.events.put_nowait((i, Finished(_as_hit(generation), 0.0, 0.0, 0.0)))

    def _sink(self, index: int) -> Callable:
        def sink(event) -> None:
            if isinstance(event, Progress):
                with self._latest_lock:
                    queued = index in self._latest
                    self._latest[index] = event
                if queued:
                    return  # its wake-up is still in the queue: it will read this newer text
                event = _PROGRESS
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

        return sink

    def cancel(self) -> None:
        if self.open:
            self.scheduler.cancel([self.ids[i] for i in self.open if i in self.ids])
            self.open.clear()

    async def _next(self, http: HTTPRequest):
        while True:
            try:
                index, event = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                if event is _PROGRESS:
                    with self._latest_lock:
                        event = self._latest.pop(index)
                return index, event
            except TimeoutError:
                if await http.is_disconnected():
                    self.cancel()
                    return None

    async def results(self, http: HTTPRequest) -> list[ChoiceResult]:
        """Every choice's result, in order; :class:`ClientGone` if the client went away (choices cancelled)."""
        done: dict[int, Finished] = {}
        try:
            while self.open:
                got = await self._next(http)
                if got is None:
                    raise ClientGone()
                index, event = got
                if isinstance(event, Failed):
                    raise to_api_error(event.error)
                if isinstance(event, Finished):
                    done[index] = event
                    self.open.discard(index)
                    self._remember(index, event)
        finally:
            self.cancel()
        self._done(done)
        return [ChoiceResult(i, done[i]) for i in sorted(done)]

    def _remember(self, index: int, finished: Finished) -> None:
        key = self._keys[index]
        if key is not None and index in self.ids:  # decoded here (a hit is already stored)
            self._cache.put(key, finished.generation)

    def _done(self, done: dict[int, Finished]) -> None:
        if self._on_done is not None and len(done) == len(self.requests):
            self._after = self._on_done(self, sorted(done.items()))

    async def after_done(self) -> None:
        """Wait for what on_done started (the served choices recorded before the answer goes out, so a
        select event that follows finds them); a failure there is logged, never the request's."""
        if self._after is not None:
            try:
                await self._after
            except Exception:
                log.exception("after call %s: recording its choices failed", self.id)

    async def deltas(self, http: HTTPRequest) -> AsyncIterator[ChoiceDelta]:
        """Text as it is committed, per choice; each choice's last delta carries its finish reason."""
        done: dict[int, Finished] = {}
        try:
            while self.open:
                got = await self._next(http)
                if got is None:
                    return
                index, event = got
                if isinstance(event, Failed):
                    raise to_api_error(event.error)
                if isinstance(event, Progress):
                    text = self.cursors[index].advance(event.text)
                    if text:
                        yield ChoiceDelta(index, text, None)
                elif isinstance(event, Finished):
                    self.open.discard(index)
                    done[index] = event
                    self._remember(index, event)
                    gen = event.generation
                    text = self.cursors[index].advance(gen.text, final=True)
                    yield ChoiceDelta(index, text, openai_finish_reason(gen.finish_reason), event)
            self._done(done)
        finally:
            self.cancel()  # a client that disconnects mid-stream frees its sequences


def _cache_key(request: Request) -> CacheKey | None:
    """A request's completion-cache key; None for what is never cached (a draft to verify, a cache warm-up,
    a request that asks for its prompt to be evaluated whole: llama.cpp's cache_prompt false)."""
    if request.draft is not None or request.max_tokens == 0 or not request.reuse_prefix:
        return None
    key = CacheKey.of(request.prompt_tokens, request.params, request.max_tokens, request.stop)
    return key if key.reproducible else None


def _as_hit(generation: Generation) -> Generation:
    """A cached completion as this request's: nothing evaluated, the whole prompt cached."""
    return replace(generation, prefill_s=0.0, decode_s=0.0, cost_s=0.0,
                   n_cached_prompt_tokens=generation.n_prompt_tokens)  # fmt: skip
