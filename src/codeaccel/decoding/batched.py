"""Continuous batching: every active request's next step in one evaluation, drafts verified in the same batch.

A :class:`BatchDecoder` runs requests on a :class:`~codeaccel.engines.sequences.SequenceSet`.
Requests are submitted at any time; between two steps the decoder admits waiting ones
(while sequences and cache cells are free), retires finished ones (freeing their
sequence), and each step is

    propose: with a drafter, each request's session proposes a draft continuing its text;
             the batch's draft lengths are chosen together from the cost curve
             (:mod:`codeaccel.decoding.batch_draft_lengths`)
    → verify: one evaluation of every request's pending token plus its draft
    → accept: each request's lossless rule (:func:`~codeaccel.decoding.verification.verify`,
             its own sampler and seed) keeps a prefix of its draft and adds one token
    → commit / rewind: the kept tokens go through its StopChecker (EOS, stop strings, max
             tokens); its sequence is rewound past the rejected draft tokens.

Without a drafter every draft is empty and a step is one autoregressive token per request.

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

from codeaccel.decoding.batch_draft_lengths import acceptance_estimate, choose_draft_lengths
from codeaccel.decoding.drafter import BatchDrafter, Draft, Drafter, DraftSession, StepTiming
from codeaccel.decoding.generation import Generation, Request, StopChecker
from codeaccel.decoding.stats import DecodingStats, SpecStats
from codeaccel.decoding.verification import verify
from codeaccel.engines.cost_curve import CostCurve
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
    draft_s: float = 0.0  # a batch drafter's evaluations (a draft model), all requests together
    batched_sequences: int = 0  # sequences summed over decode steps (a server runs forever: no list)
    last_batch: int = 0  # sequences in the most recent decode step
    max_batch: int = 0  # most sequences in one decode step

    def record_step(self, n_sequences: int, seconds: float) -> None:
        self.steps += 1
        self.decode_s += seconds
        self.batched_sequences += n_sequences
        self.last_batch = n_sequences
        self.max_batch = max(self.max_batch, n_sequences)

    @property
    def mean_batch(self) -> float:
        return self.batched_sequences / self.steps if self.steps else 0.0

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
    rng: np.random.Generator  # the target's sampler (sample-and-compare keeps autoregressive sampling's stream)
    first_row: np.ndarray | None  # [vocab]: the prefill's prediction of the first token, until it is used
    reserved: int  # cells held for its own tokens (max tokens)
    prompt: _SharedPrompt  # the prompt's cells, shared with the requests admitted with the same prompt
    prefill_s: float
    decode_s: float = 0.0
    cost_s: float = 0.0  # its share of every evaluation it took part in
    steps: int = 0
    pending: list[int] = field(default_factory=list)  # committed, not yet in its sequence's cache
    context: list[int] = field(default_factory=list)  # prompt + committed tokens (what drafts continue)
    session: DraftSession | None = None
    draft_rng: np.random.Generator | None = None
    spec: SpecStats | None = None


class BatchDecoder:
    """Decoding of many requests at once on one sequence set; one thread drives it.

    drafter: proposes drafts for every request (None: autoregressive); curve: the target's
    cost of evaluating n tokens together, from which the batch's draft lengths are chosen
    (required with a drafter); k_max: longest draft asked of a session; joint_lengths: choose
    all requests' lengths together (False: each as if it ran alone, the baseline the joint
    choice is measured against).
    """

    PRIOR_DRAFTED = 4.0  # weight, in draft tokens, of the drafter's running acceptance in a request's estimate

    def __init__(self, seqs: SequenceSet, drafter: Drafter | None = None, curve: CostCurve | None = None,
                 k_max: int = 16, joint_lengths: bool = True):  # fmt: skip
        if drafter is not None and curve is None:
            raise InternalError("a batch decoder with a drafter needs the target's cost curve")
        self.seqs = seqs
        self.drafter = drafter
        self.curve = curve
        self.k_max = k_max
        self.joint_lengths = joint_lengths
        # a drafter that drafts for the whole batch (a draft model), told apart once, not every step
        self._batch_drafter = drafter if isinstance(drafter, BatchDrafter) else None
        self._drafted = 0  # over every request so far: the prior of a new request's acceptance
        self._accepted = 0
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

    def progress(self, handle: int) -> tuple[list[int], str] | None:
        """A running request's tokens and text so far (a stream's source); None if it is waiting or gone."""
        active = self._active.get(handle)
        return None if active is None else (list(active.checker.tokens), active.checker.text)

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
        """Admit what fits; propose, verify, accept and commit one step of every active request in one batch.

        Returns the requests that finished in this step, with their generations.
        """
        self._admit()
        active = list(self._active.values())
        t_draft = time.perf_counter()
        drafts = self._propose(active)
        draft_s = time.perf_counter() - t_draft
        self.stats.draft_s += draft_s
        batch = {a.seq: a.pending + drafts[a.handle].tokens for a in active if a.pending or drafts[a.handle].tokens}
        logits: dict[int, np.ndarray] = {}
        elapsed = 0.0
        if batch:
            t0 = time.perf_counter()
            logits = self.seqs.eval(batch, all_logits=True)
            elapsed = time.perf_counter() - t0
            self.stats.record_step(len(batch), elapsed)
        n_evaluated = sum(len(t) for t in batch.values())
        finished: list[tuple[int, Generation]] = []
        for a in active:
            draft = drafts[a.handle]
            rows = logits.get(a.seq)  # [len(pending) + k, vocab]
            if a.first_row is not None:  # the first step: the prefill predicted the draft's first token
                first = a.first_row[None, :]
                rows = first if rows is None else np.vstack([first, rows])
                a.first_row = None
            verdict = verify(draft.tokens, None, rows[-len(draft.tokens) - 1 :], a.request.params, a.rng)
            if a.seq in batch:
                share = len(batch[a.seq]) / n_evaluated
                a.decode_s += elapsed + draft_s
                a.cost_s += (elapsed + draft_s) * share
                a.steps += 1
            if a.session is not None:
                a.session.observe(a.context, draft, verdict, StepTiming(elapsed, draft_s, n_evaluated))
                a.spec.record(len(draft.tokens), verdict.n_accepted)
                a.spec.draft_s += draft_s
                self._drafted += len(draft.tokens)
                self._accepted += verdict.n_accepted
            done = False
            for token in verdict.tokens:
                self.stats.generated_tokens += 1
                if a.checker.push(token):
                    done = True
                    break
            if done:
                finished.append((a.handle, self._retire(a)))
                continue
            rejected = len(draft.tokens) - verdict.n_accepted
            if rejected:
                self.seqs.rewind(a.seq, self.seqs.n_tokens(a.seq) - rejected)
            a.context += verdict.tokens
            a.pending = verdict.tokens[-1:]
        return finished

    def _propose(self, active: list[_Active]) -> dict[int, Draft]:
        """Each request's draft, cut to the lengths chosen for the whole batch (empty without a drafter)."""
        empty = Draft(tokens=[])
        if self.drafter is None:
            return {a.handle: empty for a in active}
        prior = self._accepted / self._drafted if self._drafted else 0.5
        alphas = [acceptance_estimate(a.spec.accepted_tokens, a.spec.drafted_tokens, prior * self.PRIOR_DRAFTED,
                                      self.PRIOR_DRAFTED) for a in active]  # fmt: skip
        if self._batch_drafter is not None:  # lengths first, then one draft evaluation per position
            caps = [max(min(self.k_max, a.checker.remaining - 1), 0) for a in active]
            lengths = self._lengths(alphas, caps, len(active), self._batch_drafter.position_cost)
            drafts = self._batch_drafter.propose_batch(
                [a.session for a in active], [a.context for a in active], lengths
            )
            return {a.handle: d for a, d in zip(active, drafts)}
        proposed: dict[int, Draft] = {}
        for a in active:
            room = a.checker.remaining - 1  # the step commits one token besides the accepted drafts
            k = min(self.k_max, room)
            proposed[a.handle] = (
                _chain(a.session.propose(a.context, k, a.request.params, a.draft_rng)) if k > 0 else empty
            )
        caps = [len(proposed[a.handle].tokens) for a in active]
        lengths = self._lengths(alphas, caps, len(active))
        return {a.handle: _cut(proposed[a.handle], k) for a, k in zip(active, lengths)}

    def _lengths(self, alphas: list[float], caps: list[int], base: int, position_cost=None) -> list[int]:
        """The batch's draft lengths: together (base: a pending token per request), or each as if alone."""
        if self.joint_lengths:
            return choose_draft_lengths(alphas, caps, base, self.curve.cost, position_cost)
        return [choose_draft_lengths([a], [c], 1, self.curve.cost, position_cost)[0] for a, c in zip(alphas, caps)]

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
        admitted: list[int] = []  # handles made active here: undone if a later one fails
        owned: set[int] = set()  # leader sequences handed to a request
        try:
            for prompt, members in groups.items():
                share = elapsed * len(prompt) / n_prefilled / len(members)
                room = self.seqs.n_ctx - len(prompt)
                shared = _SharedPrompt(cells=len(prompt), members=0)
                for i, (handle, request) in enumerate(members):
                    seq = leaders[prompt] if i == 0 else self.seqs.open(copy_of=leaders[prompt])
                    owned.add(seq)
                    max_tokens = min(request.max_tokens, room)
                    session = draft_rng = spec = None
                    try:
                        if self.drafter is not None:
                            session = self.drafter.start(prompt, frozenset(request.exclude_files),
                                                         request.prediction_tokens)  # fmt: skip
                            seed = request.params.seed
                            draft_rng = np.random.default_rng(None if seed is None else [seed, 1])
                            spec = SpecStats()
                        active = _Active(
                            handle=handle,
                            request=request,
                            seq=seq,
                            checker=StopChecker(self.seqs, request.stop, max_tokens),
                            rng=request.params.rng(),
                            first_row=logits[leaders[prompt]][-1],
                            reserved=max_tokens,
                            prompt=shared,
                            prefill_s=elapsed,
                            cost_s=share,
                            context=list(prompt),
                            session=session,
                            draft_rng=draft_rng,
                            spec=spec,
                        )
                    except BaseException:
                        if session is not None and self._batch_drafter is not None:
                            self._batch_drafter.end(session)
                        self.seqs.close(seq)
                        raise
                    if shared.members == 0:
                        self._reserved += shared.cells
                    shared.members += 1
                    self._reserved += max_tokens
                    if i:
                        self.stats.shared_prompt_tokens += len(prompt)
                    self._active[handle] = active
                    admitted.append(handle)
        except BaseException:
            for handle in admitted:
                self.cancel(handle)
            for seq in leaders.values():
                if seq not in owned:
                    self.seqs.close(seq)
            raise

    def _retire(self, active: _Active) -> Generation:
        self._active.pop(active.handle)
        self._release(active)
        checker = active.checker
        return Generation(
            text=checker.text,
            tokens=checker.tokens,
            finish_reason=checker.finish_reason,
            stop_string=checker.stop_string,
            n_prompt_tokens=len(active.request.prompt_tokens),
            prefill_s=active.prefill_s,
            decode_s=active.decode_s,
            stats=DecodingStats(steps=active.steps, target_s=active.decode_s, speculation=active.spec),
            cost_s=active.cost_s,
        )

    def _release(self, active: _Active) -> None:
        if active.session is not None and self._batch_drafter is not None:
            self._batch_drafter.end(active.session)
        self._reserved -= active.reserved
        active.prompt.members -= 1
        if active.prompt.members == 0:
            self._reserved -= active.prompt.cells
        if self._reserved < 0:
            raise InternalError("batch decoder released more cells than it reserved")
        self.seqs.close(active.seq)


def _chain(draft: Draft) -> Draft:
    """A draft as one chain: a token tree's first branch (the batch verifies chains)."""
    if draft.parents is None:
        return draft
    tokens, node = [], -1
    for i, parent in enumerate(draft.parents):
        if parent == node:
            tokens.append(draft.tokens[i])
            node = i
    return Draft(tokens=tokens, source=draft.source, lookup=draft.lookup)


def _cut(draft: Draft, k: int) -> Draft:
    if k >= len(draft.tokens):
        return draft
    return Draft(tokens=draft.tokens[:k], source=draft.source, lookup=draft.lookup)
