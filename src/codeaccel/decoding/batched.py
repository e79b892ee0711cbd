"""Continuous batching of autoregressive requests: every active request's next token in one evaluation.

A :class:`BatchDecoder` runs requests on a :class:`~codeaccel.engines.sequences.SequenceSet`.
Requests are submitted at any time; between two steps the decoder admits waiting ones
(while sequences and cache cells are free), retires finished ones (freeing their
sequence), and each step is

    pick each active request's next token (its own sampler, its own seed)
    → push it through the request's StopChecker (EOS, stop strings, max tokens)
    → evaluate the tokens of every request still running in one batch.

Requests admitted together whose prompts are identical are prefilled once: the others
start as copies of the first one's sequence (the cascade's k samples of one prompt).
Each request's tokens are what autoregressive decoding alone gives it (greedy), or are
drawn from the same distribution with the same seed-driven sampler (sampling), because
every sequence sees only its own tokens. Cells are reserved at admission for the prompt
and every token a request may generate, so a running batch never runs out of cache.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from codeaccel.decoding.generation import Generation, Request, StopChecker
from codeaccel.decoding.sampling import next_token
from codeaccel.decoding.stats import DecodingStats
from codeaccel.engines.sequences import SequenceSet
from codeaccel.errors import InternalError, UserError


@dataclass
class BatchStats:
    """What a decoder has spent, over all its steps (seconds are wall time of evaluations)."""

    steps: int = 0  # batched decode evaluations
    generated_tokens: int = 0  # tokens committed to requests
    prefilled_tokens: int = 0  # prompt tokens evaluated (a shared prompt counts once)
    shared_prompt_tokens: int = 0  # prompt tokens not evaluated because a copy shared them
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # sequences per decode step

    @property
    def mean_batch(self) -> float:
        return float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decode evaluation, all requests together."""
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class _SharedPrompt:
    """Cells of a prompt prefilled once for several requests: released when its last request leaves."""

    cells: int
    members: int


@dataclass
class _Active:
    """One admitted request: its sequence and what it has learned so far (per-request state)."""

    handle: int
    request: Request
    seq: int
    checker: StopChecker
    rng: np.random.Generator
    logits: np.ndarray  # [vocab]: the distribution of its next token
    reserved: int  # cells held for its own tokens (max tokens)
    prompt: _SharedPrompt  # the prompt's cells, shared with the requests admitted with the same prompt
    prefill_s: float
    decode_s: float = 0.0
    cost_s: float = 0.0  # its share of every evaluation it took part in
    steps: int = 0


class BatchDecoder:
    """Autoregressive decoding of many requests at once on one sequence set; one thread drives it."""

    def __init__(self, seqs: SequenceSet):
        self.seqs = seqs
        self.stats = BatchStats()
        self._waiting: deque[tuple[int, Request]] = deque()
        self._active: dict[int, _Active] = {}
        self._next_handle = 0
        self._reserved = 0  # cells reserved by active requests

    @property
    def n_active(self) -> int:
        return len(self._active)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._active and not self._waiting

    def submit(self, request: Request) -> int:
        """Queue a request; returns its handle (``step`` reports it with its generation when done)."""
        if not request.prompt_tokens:
            raise UserError("the prompt is empty: nothing to condition on")
        if request.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(request.prompt_tokens) + 1 > self.seqs.n_ctx:
            raise UserError(f"the prompt has {len(request.prompt_tokens)} tokens; the context holds {self.seqs.n_ctx}")
        handle = self._next_handle
        self._next_handle += 1
        self._waiting.append((handle, request))
        return handle

    def cancel(self, handle: int) -> bool:
        """Drop a waiting or running request (a client that went away); its sequence is freed."""
        for i, (h, _) in enumerate(self._waiting):
            if h == handle:
                del self._waiting[i]
                return True
        active = self._active.pop(handle, None)
        if active is None:
            return False
        self._release(active)
        return True

    def step(self) -> list[tuple[int, Generation]]:
        """Admit what fits, commit one token to every active request, evaluate the survivors in one batch.

        Returns the requests that finished in this step, with their generations.
        """
        self._admit()
        finished: list[tuple[int, Generation]] = []
        batch: dict[int, list[int]] = {}
        for active in list(self._active.values()):
            token = next_token(active.logits, active.request.params, active.rng)
            self.stats.generated_tokens += 1
            if active.checker.push(token):
                finished.append((active.handle, self._retire(active)))
            else:
                batch[active.seq] = [token]
        if batch:
            t0 = time.perf_counter()
            logits = self.seqs.eval(batch, all_logits=False)
            elapsed = time.perf_counter() - t0
            self.stats.steps += 1
            self.stats.decode_s += elapsed
            self.stats.batch_sizes.append(len(batch))
            for active in self._active.values():
                if active.seq in logits:
                    active.logits = logits[active.seq][-1]
                    active.decode_s += elapsed
                    active.cost_s += elapsed / len(batch)
                    active.steps += 1
        return finished

    def run(self, requests: list[Request]) -> list[Generation]:
        """Decode ``requests`` together; their generations in the same order."""
        handles = [self.submit(r) for r in requests]
        done: dict[int, Generation] = {}
        while not self.idle:
            done.update(self.step())
        return [done[h] for h in handles]

    # ---- admission and retirement ---------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests into sequences while sequences and cells last; prefill them in one batch."""
        groups: dict[tuple[int, ...], list[tuple[int, Request]]] = {}
        free = self.seqs.n_free
        reserved = self._reserved
        while self._waiting and free:
            handle, request = self._waiting[0]
            prompt = tuple(request.prompt_tokens)
            room = self.seqs.n_ctx - len(prompt)
            need = min(request.max_tokens, room) + (0 if prompt in groups else len(prompt))
            if reserved + need > self.seqs.n_ctx and (reserved or groups):
                break  # wait for running requests to free cells (one request alone always fits)
            self._waiting.popleft()
            groups.setdefault(prompt, []).append((handle, request))
            free -= 1
            reserved += need
        if not groups:
            return
        leaders = {prompt: self.seqs.open() for prompt in groups}
        t0 = time.perf_counter()
        try:
            logits = self.seqs.eval({leaders[p]: list(p) for p in groups}, all_logits=False)
        except BaseException:
            for seq in leaders.values():
                self.seqs.close(seq)
            raise
        elapsed = time.perf_counter() - t0
        n_prefilled = sum(len(p) for p in groups)
        self.stats.prefill_s += elapsed
        self.stats.prefilled_tokens += n_prefilled
        for prompt, members in groups.items():
            share = elapsed * len(prompt) / n_prefilled / len(members)
            room = self.seqs.n_ctx - len(prompt)
            shared = _SharedPrompt(cells=len(prompt), members=len(members))
            self._reserved += shared.cells
            for i, (handle, request) in enumerate(members):
                seq = leaders[prompt] if i == 0 else self.seqs.open(copy_of=leaders[prompt])
                if i:
                    self.stats.shared_prompt_tokens += len(prompt)
                max_tokens = min(request.max_tokens, room)
                self._reserved += max_tokens
                self._active[handle] = _Active(
                    handle=handle,
                    request=request,
                    seq=seq,
                    checker=StopChecker(self.seqs, request.stop, max_tokens),
                    rng=request.params.rng(),
                    logits=logits[leaders[prompt]][-1],
                    reserved=max_tokens,
                    prompt=shared,
                    prefill_s=elapsed,
                    cost_s=share,
                )

    def _retire(self, active: _Active) -> Generation:
        self._active.pop(active.handle)
        self._release(active)
        checker = active.checker
        return Generation(
            text=checker.text,
            tokens=checker.tokens,
            finish_reason=checker.finish_reason,
            n_prompt_tokens=len(active.request.prompt_tokens),
            prefill_s=active.prefill_s,
            decode_s=active.decode_s,
            stats=DecodingStats(steps=active.steps, target_s=active.decode_s),
            cost_s=active.cost_s,
        )

    def _release(self, active: _Active) -> None:
        self._reserved -= active.reserved
        active.prompt.members -= 1
        if active.prompt.members == 0:
            self._reserved -= active.prompt.cells
        if self._reserved < 0:
            raise InternalError("batch decoder released more cells than it reserved")
        self.seqs.close(active.seq)
