"""Continuous batching for the server: one thread drives a :class:`BatchDecoder` over the engine's sequences.

HTTP handlers run on the event loop; the decoder and its sequence set belong to one
thread (:class:`Scheduler`). Handlers ``submit`` jobs (one per choice) and may ``cancel``
them; commands reach the thread through a queue and are applied between two steps, so
requests are admitted and retired at any step while the others keep decoding. Each job
reports to its own ``sink`` from the scheduler thread: a :class:`Progress` after every
step that committed tokens to it (only when it streams), then exactly one
:class:`Finished` or :class:`Failed`.

Admission is bounded: at most ``parallel + max_queue`` jobs in the system; beyond that
``submit`` raises :class:`QueueFull` (the server answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from codeaccel.decoding.batched import PREFILL_CHUNK, BatchDecoder
from codeaccel.decoding.costs import LearnedCosts
from codeaccel.decoding.drafter import Drafter
from codeaccel.decoding.generation import Generation, Request
from codeaccel.engines.sequences import SequenceSet
from codeaccel.errors import CodeaccelError, InternalError, SetupError, UserError
from codeaccel.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More jobs than ``parallel + max_queue``: the client should retry later."""


@dataclass(frozen=True)
class Progress:
    tokens: int  # generated so far
    text: str  # the completion so far (cut before any stop string found)


@dataclass(frozen=True)
class Finished:
    generation: Generation
    queued_s: float  # from submission to admission
    first_token_s: float | None  # from submission to the first committed token
    total_s: float  # from submission to the end


@dataclass(frozen=True)
class Failed:
    error: Exception


JobEvent = Progress | Finished | Failed
Sink = Callable[[JobEvent], None]


@dataclass
class Job:
    """One choice of one HTTP request, and what the scheduler learns about it."""

    request: Request
    sink: Sink
    stream: bool = False
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    handle: int | None = None
    streamed_tokens: int = 0
    counts_prompt: bool = True  # the first choice of its prompt: its prompt tokens are counted once


class Scheduler:
    """Owns the decoder and its sequences; thread-safe ``submit`` / ``cancel``."""

    def __init__(
        self,
        seqs: SequenceSet,
        max_queue: int,
        metrics: ServerMetrics,
        drafter: Drafter | None = None,
        costs: LearnedCosts | None = None,
        idle_wait_s: float = 0.05,
        joint_lengths: bool = True,
        prefill_chunk: int | None = PREFILL_CHUNK,
        reuse_prefixes: bool = False,
    ):
        """drafter, costs: drafts verified in the batch, their lengths chosen from the target's cost curve
        at the scale the decoder learns (costs shared with the drafter's own timing), for all requests
        together (joint_lengths) or each as if alone; prefill_chunk, reuse_prefixes: as
        :class:`BatchDecoder` takes them (prompt chunks per step; finished requests' caches kept)."""
        self.seqs = seqs
        self.drafter = drafter
        self.costs = costs
        self.joint_lengths = joint_lengths
        self.prefill_chunk = prefill_chunk
        self.reuse_prefixes = reuse_prefixes
        self.capacity = seqs.n_seq_max + max_queue
        self.metrics = metrics
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _in_system
        self._in_system = 0
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codeaccel-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the thread (its jobs fail); True once it has ended (only then may its sequences be freed)."""
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread runs (a server whose thread died answers nothing: not healthy)."""
        return self._thread.is_alive()

    @property
    def in_system(self) -> int:
        with self._lock:
            return self._in_system

    def submit(self, jobs: Sequence[Job]) -> list[int]:
        """Queue ``jobs`` together (all or none); their ids, for ``cancel``."""
        if len(jobs) > self.capacity:  # never fits, however long the client waits
            raise UserError(f"{len(jobs)} choices in one request; this server holds {self.capacity} at once")
        with self._lock:
            if self._in_system + len(jobs) > self.capacity:
                raise QueueFull(f"the server is full ({self._in_system} requests in progress or queued)")
            self._in_system += len(jobs)
        ids = []
        for job in jobs:
            job.id = next(self._ids)
            ids.append(job.id)
        self._commands.put(("submit", list(jobs)))
        return ids

    def cancel(self, ids: Sequence[int]) -> None:
        """Stop these jobs (a client went away): their sequences are freed; no event follows."""
        self._commands.put(("cancel", list(ids)))

    def between_steps(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the scheduler thread between two steps (a draft's adapter swapped while
        nothing evaluates); an action that fails is logged, and serving goes on."""
        self._commands.put(("call", action))

    # ---- the scheduler thread ------------------------------------------------------
    def _run(self) -> None:
        decoder = self._decoder()
        jobs: dict[int, Job] = {}  # job id -> job, submitted and not finished
        by_handle: dict[int, Job] = {}
        while not self._stop.is_set():
            try:
                self._apply_commands(decoder, jobs, by_handle, block=decoder.idle)
                if decoder.idle:
                    self.metrics.observe_idle()
                    continue
                steps = decoder.stats.steps
                spent = decoder.stats.decode_s + decoder.stats.prefill_s
                finished = decoder.step()
                self._after_step(decoder, jobs, by_handle, finished, steps, spent)
            except Exception as exc:  # a bug or a broken engine: fail what is running, keep serving
                log.exception("decode step failed")
                error = exc if isinstance(exc, CodeaccelError) else InternalError(f"decoding failed: {exc}")
                for job in list(jobs.values()):
                    if job.handle is not None:
                        decoder.cancel(job.handle)
                    self._end(job, jobs, by_handle, Failed(error))
                decoder.clear_kept()  # the failed jobs' sequences, kept by cancel, may be in any state
                if self.seqs.open_sequences:  # something leaked: start over on clean sequences
                    log.error("sequences %s left open after a failure: closing them", self.seqs.open_sequences)
                    self.seqs.close_all()
                    decoder = self._decoder()
        for job in list(jobs.values()):  # shutting down: 503, the client may try another replica
            self._end(job, jobs, by_handle, Failed(SetupError("the server is shutting down")))
        decoder.clear_kept()

    def _after_step(self, decoder: BatchDecoder, jobs: dict, by_handle: dict, finished, steps: int,
                    spent: float) -> None:  # fmt: skip
        """What one step did: metrics, first tokens, stream progress, finished jobs' events."""
        now = time.perf_counter()
        self.metrics.engine_seconds.inc(decoder.stats.decode_s + decoder.stats.prefill_s - spent)
        if decoder.stats.steps > steps:  # an evaluation ran (a first step may use the prefill's row only)
            self.metrics.observe_step(decoder.stats.last_batch, self.seqs.n_seq_max, decoder.n_waiting)
        for job in list(jobs.values()):
            if job.admitted is None:
                job.admitted = decoder.admitted_at(job.handle)  # when it got its sequence (None: still waiting)
            progress = decoder.progress(job.handle)
            if progress is not None and progress[0]:
                self._on_tokens(job, progress, now)
        for handle, generation in finished:
            job = by_handle[handle]
            if job.admitted is None:  # admitted and finished in one step: it ran for its prefill and decoding
                job.admitted = max(job.submitted, now - generation.prefill_s - generation.decode_s)
            if job.first_token is None and generation.tokens:
                job.first_token = now
                self.metrics.time_to_first_token.observe(now - job.submitted)
            if job.stream:
                _deliver(job, Progress(len(generation.tokens), generation.text))
            event = Finished(
                generation,
                queued_s=job.admitted - job.submitted,
                first_token_s=None if job.first_token is None else job.first_token - job.submitted,
                total_s=now - job.submitted,
            )
            self.metrics.observe_finished(generation, event.total_s, job.counts_prompt)
            self._end(job, jobs, by_handle, event)

    def _decoder(self) -> BatchDecoder:
        curve = self.costs.curve if self.costs is not None else None
        return BatchDecoder(self.seqs, self.drafter, curve, joint_lengths=self.joint_lengths,
                            prefill_chunk=self.prefill_chunk, reuse_prefixes=self.reuse_prefixes,
                            costs=self.costs)  # fmt: skip

    def _on_tokens(self, job: Job, progress: tuple[list[int], str], now: float) -> None:
        tokens, text = progress
        if job.first_token is None:
            job.first_token = now
            self.metrics.time_to_first_token.observe(now - job.submitted)
        if job.stream and len(tokens) > job.streamed_tokens:
            job.streamed_tokens = len(tokens)
            _deliver(job, Progress(len(tokens), text))

    def _apply_commands(self, decoder: BatchDecoder, jobs: dict, by_handle: dict, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = command
            if kind == "submit":
                for job in payload:
                    try:
                        job.handle = decoder.submit(job.request)
                    except Exception as exc:  # refused (a prompt too long), or a bug: that job fails, not the thread
                        if not isinstance(exc, CodeaccelError):
                            log.exception("job %d: submitting it failed", job.id)
                            exc = InternalError(f"submitting the request failed: {exc}")
                        self._release(1)
                        _deliver(job, Failed(exc))
                        continue
                    jobs[job.id] = job
                    by_handle[job.handle] = job
            elif kind == "call":
                try:
                    payload()
                except Exception:
                    log.exception("an action between steps failed")
            elif kind == "cancel":
                for job_id in payload:
                    job = jobs.get(job_id)
                    if job is not None:
                        decoder.cancel(job.handle)
                        self.metrics.cancelled.inc()
                        self._end(job, jobs, by_handle, None)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _end(self, job: Job, jobs: dict, by_handle: dict, event: JobEvent | None) -> None:
        jobs.pop(job.id, None)
        by_handle.pop(job.handle, None)
        self._release(1)
        if event is not None:
            _deliver(job, event)

    def _release(self, n: int) -> None:
        with self._lock:
            self._in_system -= n


def _deliver(job: Job, event: JobEvent) -> None:
    """Hand an event to its job's sink; a sink that fails (its client's loop gone) never stops the thread."""
    try:
        job.sink(event)
    except Exception:
        log.exception("job %d: its sink failed", job.id)
