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
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from fastapi import Request as HTTPRequest

from codeaccel.decoding.generation import Request
from codeaccel.serve.errors import ClientGone, to_api_error
from codeaccel.serve.scheduler import Failed, Finished, Job, Progress, Scheduler
from codeaccel.serve.streaming import StreamCursor

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
                 on_done: Callable[[Call, list[tuple[int, Finished]]], None] | None = None):  # fmt: skip
        """on_done: called once, on the event loop, with the call and every choice's result when all have
        finished."""
        self.id = uuid.uuid4().hex
        self.requests = list(requests)
        self._on_done = on_done
        self.created = int(time.time())
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._latest: dict[int, Progress] = {}  # choice -> newest progress not read yet (the scheduler writes)
        self._latest_lock = threading.Lock()
        self.jobs = [Job(r, self._sink(i), stream=stream) for i, r in enumerate(requests)]
        self.cursors = [StreamCursor(stops) for _ in requests]
        self.open = set(range(len(requests)))
        self.ids = scheduler.submit(self.jobs)  # QueueFull: nothing was queued

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
            self.scheduler.cancel([self.ids[i] for i in self.open])
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
        finally:
            self.cancel()
        self._done(done)
        return [ChoiceResult(i, done[i]) for i in sorted(done)]

    def _done(self, done: dict[int, Finished]) -> None:
        if self._on_done is not None and len(done) == len(self.requests):
            self._on_done(self, sorted(done.items()))

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
                    gen = event.generation
                    text = self.cursors[index].advance(gen.text, final=True)
                    yield ChoiceDelta(index, text, openai_finish_reason(gen.finish_reason), event)
            self._done(done)
        finally:
            self.cancel()  # a client that disconnects mid-stream frees its sequences
