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

With ``reuse_prefixes`` (the server; llama-server's ``cache_prompt``), a finished request's
sequence is kept with its cache instead of freed, and a new prompt takes the kept sequence
sharing its longest prefix: only the rest of the prompt is evaluated. An editor sends the
same file again and again, a little further on each time, so most of a prompt is usually
cached; on a CPU, where a prompt token costs a third of a decode step, that is most of a
request's work. Kept sequences give way, least recently used first, to prompts that share
nothing with them.

Prompts are evaluated in the same steps as the running requests' tokens (chunked prefill,
as llama-server mixes prompt chunks into its decode batches): a step carries every running
request's pending token and draft, plus up to ``prefill_chunk`` prompt tokens of the
requests being admitted, oldest first. On a CPU a decode row added to a prompt chunk costs
a fraction of what a decode step of its own costs (the chunk is matrix-matrix work the
weights are read for anyway), so running requests keep generating while prompts arrive
instead of stalling behind them (on llama.cpp, which evaluates a batch's rows unpadded; the hf
engine pads a batch's rows to its longest, so it runs a long chunk as a pass of its own beside
the decode rows' pass: `engines/hf_sequences.py`). Requests admitted together whose prompts are identical
are prefilled once: the others start as copies of the first one's sequence when its
prompt is done (the cascade's k samples of one prompt).
Each request's tokens are what autoregressive decoding alone gives it (greedy), or are
drawn from the same distribution with the same seed-driven sampler (sampling), because
every sequence sees only its own tokens. Cells are reserved at admission for the prompt
and every token a request may generate, so a running batch never runs out of cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from codeaccel.decoding.batch_draft_lengths import acceptance_estimate, choose_draft_lengths
from codeaccel.decoding.costs import TRIAL_MAX, TRIAL_MIN_ALPHA, LearnedCosts
from codeaccel.decoding.drafter import BatchDrafter, Draft, Drafter, DraftSession, StepTiming
from codeaccel.decoding.generation import Generation, Request, StopChecker
from codeaccel.decoding.stats import DecodingStats, SpecStats, tested
from codeaccel.decoding.verification import verify
from codeaccel.engines.base import common_prefix_len
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
    reused_prompt_tokens: int = 0  # prompt tokens not evaluated because a kept sequence held them
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
class _Prefill:
    """A prompt being evaluated chunk by chunk, for the requests admitted with it (per-admission state).

    The first member's sequence receives the chunks; once the prompt is done, every member
    becomes active (the others on copies of that sequence).
    """

    prompt: list[int]
    seq: int
    members: list[tuple[int, Request, int]]  # (handle, request, max tokens it may generate)
    shared: _SharedPrompt
    rows: int = 1  # rows its last chunk returns: the prompt's last (+ one per given draft token)
    done: int = 0  # prompt tokens the sequence holds so far (at first: those a kept sequence held)
    cached: int = 0  # prompt tokens a kept sequence held (not evaluated for it)
    wall_s: float = 0.0  # wall time of the evaluations that carried its chunks
    cost_s: float = 0.0  # its share of them

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done


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
    cached_prompt_tokens: int = 0  # prompt tokens taken from a kept sequence's cache
    decode_s: float = 0.0
    cost_s: float = 0.0  # its share of every evaluation it took part in
    steps: int = 0
    pending: list[int] = field(default_factory=list)  # committed, not yet in its sequence's cache
    context: list[int] = field(default_factory=list)  # prompt + committed tokens (what drafts continue)
    session: DraftSession | None = None
    draft_rng: np.random.Generator | None = None
    spec: SpecStats | None = None


REUSE_MIN_SHARE = 0.1  # a kept sequence is reused for a prompt sharing this much of it (llama-server's default)
# while a sequence is free, a kept one whose cache the prompt would cut short is taken only for a long shared
# part (at least this many tokens, or half the prompt): a few common tokens (an import line, a FIM marker)
# are not worth another prompt's whole cache; load test 2026-12-07, 16 FIM cuts sent again one at a time:
# 85% of their prompt tokens found cached when short matches took kept sequences
REUSE_MIN_TOKENS_WHILE_FREE = 64
PREFILL_CHUNK = 256  # prompt tokens per step beside the decode rows (llama-server: up to n_batch = 2048 in all)


class BatchDecoder:
    """Decoding of many requests at once on one sequence set; one thread drives it.

    drafter: proposes drafts for every request (None: autoregressive); curve: the target's
    cost of evaluating n tokens together, from which the batch's draft lengths are chosen
    (required with a drafter; its scale is learned from every decode step without prompt
    chunks, :class:`~codeaccel.decoding.costs.LearnedCosts`, and a step that would draft
    nothing may claim one of its rare trials, so a profile measured on a busy machine cannot
    switch drafting off for good);
    k_max: longest draft asked of a session; joint_lengths: choose all requests' lengths
    together (False: each as if it ran alone, the baseline the joint choice is measured
    against); prefill_chunk: most prompt tokens one step evaluates beside the running
    requests' tokens (None: every admitted prompt whole, in the next step);
    reuse_prefixes: keep finished sequences' caches for later prompts that share a prefix
    (needs a cache per sequence: a pooled set's kept cells would crowd out running requests);
    learn_costs: False keeps the curve as profiled, without trials (a policy measured on a fixed curve);
    costs: the learned costs over ``curve``, shared with a drafter that reads them too (default: the
    decoder's own).
    """

    PRIOR_DRAFTED = 4.0  # weight, in draft tokens, of the drafter's running acceptance in a request's estimate

    def __init__(self, seqs: SequenceSet, drafter: Drafter | None = None, curve: CostCurve | None = None,
                 k_max: int = 16, joint_lengths: bool = True, prefill_chunk: int | None = PREFILL_CHUNK,
                 reuse_prefixes: bool = False, learn_costs: bool = True,
                 costs: LearnedCosts | None = None):  # fmt: skip
        if drafter is not None and curve is None:
            raise InternalError("a batch decoder with a drafter needs the target's cost curve")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise InternalError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        if reuse_prefixes and seqs.pooled:
            raise InternalError("reusing prefixes needs a cache per sequence, not one pool of cells")
        self.seqs = seqs
        self.drafter = drafter
        self.curve = curve
        # what a batch costs now (owned by this decoder, shared by its requests): the curve's scale, learned
        if costs is not None and (not learn_costs or costs.curve is not curve):
            raise InternalError("shared costs must be learned, over the decoder's own curve")
        self.costs = costs if costs is not None or drafter is None else LearnedCosts(curve)
        self.learn_costs = learn_costs  # False: the curve as profiled, no trials (a policy measured on a fixed curve)
        self.k_max = k_max
        self.joint_lengths = joint_lengths
        self.prefill_chunk = prefill_chunk
        self.reuse_prefixes = reuse_prefixes
        # a drafter that drafts for the whole batch (a draft model), told apart once, not every step
        self._batch_drafter = drafter if isinstance(drafter, BatchDrafter) else None
        self._tested = 0  # over every request so far: the prior of a new request's acceptance (accepted / tested)
        self._accepted = 0
        self.stats = BatchStats()
        self._waiting: deque[tuple[int, Request]] = deque()
        self._admitted_at: dict[int, float] = {}  # handle -> when it got its sequence, until it is done
        self._prefilling: list[_Prefill] = []  # admitted, prompt not yet evaluated in full; oldest first
        self._active: dict[int, _Active] = {}
        self._kept: OrderedDict[int, None] = OrderedDict()  # finished sequences kept for their caches, oldest first
        self._next_handle = 0
        self._reserved = 0  # cells reserved by active requests

    @property
    def n_active(self) -> int:
        return len(self._active)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_prefilling(self) -> int:
        """Requests admitted (holding a sequence) whose prompts are still being evaluated."""
        return sum(len(p.members) for p in self._prefilling)

    @property
    def idle(self) -> bool:
        return not self._active and not self._waiting and not self._prefilling

    def admitted_at(self, handle: int) -> float | None:
        """When a request got its sequence (``time.perf_counter()``; its prompt is evaluated from then on);
        None while it waits for one, and once it is finished or cancelled."""
        return self._admitted_at.get(handle)

    def progress(self, handle: int) -> tuple[list[int], str] | None:
        """A running request's tokens and text so far (a stream's source); None if it is waiting or gone."""
        active = self._active.get(handle)
        return None if active is None else (list(active.checker.tokens), active.checker.text)

    def submit(self, request: Request) -> int:
        """Queue a request; returns its handle (``step`` reports it with its generation when done)."""
        if not request.prompt_tokens:
            raise UserError("the prompt is empty: nothing to condition on")
        if request.max_tokens < 0 or (request.max_tokens == 0 and not self.reuse_prefixes):
            raise UserError(f"max_tokens must be >= 1 (0: a cache warm-up, where caches are kept), got "
                            f"{request.max_tokens}")  # fmt: skip
        n_draft = len(request.draft.tokens) if request.draft is not None else 0
        if len(request.prompt_tokens) + n_draft + 1 > self.seqs.n_ctx_seq:
            drafted = f" and {n_draft} draft tokens" if n_draft else ""
            raise UserError(f"the prompt has {len(request.prompt_tokens)} tokens{drafted}; "
                            f"the context holds {self.seqs.n_ctx_seq}")  # fmt: skip
        handle = self._next_handle
        self._next_handle += 1
        self._waiting.append((handle, request))
        return handle

    def cancel(self, handle: int) -> bool:
        """Drop a waiting or running request (a client that went away); its sequence is freed."""
        self._admitted_at.pop(handle, None)
        for i, (h, _) in enumerate(self._waiting):
            if h == handle:
                del self._waiting[i]
                return True
        for prefill in self._prefilling:
            for i, (h, _, max_tokens) in enumerate(prefill.members):
                if h == handle:
                    del prefill.members[i]
                    self._unreserve(prefill.shared, max_tokens)
                    if not prefill.members:
                        self._prefilling.remove(prefill)
                        self._free(prefill.seq)
                    return True
        active = self._active.pop(handle, None)
        if active is None:
            return False
        self._release(active)
        return True

    def step(self) -> list[tuple[int, Generation]]:
        """Admit what fits; propose, verify, accept and commit one step of every active request, and
        evaluate the next prompt chunks, in one batch.

        Returns the requests that finished in this step, with their generations.
        """
        self._admit()
        active = list(self._active.values())
        chunks = self._prefill_chunks()  # [(prefill, tokens)] this step evaluates
        n_chunk_tokens = sum(len(t) for _, t in chunks)
        t_draft = time.perf_counter()
        # tokens the step evaluates without drafts: a pending one per request (a first step's was the
        # prefill's: counted all the same, as the token the next step evaluates), and the prompt chunks
        drafts = self._propose(active, len(active) + n_chunk_tokens, learnable=not chunks)
        draft_s = time.perf_counter() - t_draft
        self.stats.draft_s += draft_s
        batch = {a.seq: a.pending + drafts[a.handle].tokens for a in active if a.pending or drafts[a.handle].tokens}
        n_decode = sum(len(t) for t in batch.values())
        # a prompt's last row predicts its first token (a given draft's k+1 last rows verify it)
        rows = {p.seq: p.rows if len(t) == p.remaining else 0 for p, t in chunks}
        batch.update({p.seq: t for p, t in chunks})
        logits: dict[int, np.ndarray] = {}
        elapsed = 0.0
        if batch:
            t0 = time.perf_counter()
            logits = self.seqs.eval(batch, all_logits=True, rows=rows)
            elapsed = time.perf_counter() - t0
        n_evaluated = n_decode + n_chunk_tokens
        decode_elapsed = elapsed * n_decode / n_evaluated if n_evaluated else 0.0  # the decode rows' share
        if n_decode:
            self.stats.record_step(len(batch) - len(chunks), decode_elapsed)
        if self.costs is not None and self.learn_costs:
            if n_decode and not chunks:
                n_priced = self.seqs.evaluated_tokens([len(t) for t in batch.values()])  # pads included
                self.costs.record_verification(sum(len(d.tokens) for d in drafts.values()), elapsed, n_priced)
            else:  # a prompt chunk's tokens cost other than C(n) says: nothing learned, a trial given back
                self.costs.skip_step()
        finished: list[tuple[int, Generation]] = []
        for a in active:
            draft = drafts[a.handle]
            rows_a = logits.get(a.seq)  # [len(pending) + k, vocab]
            if a.first_row is not None:  # the first step: the prefill predicted the draft's first token
                first = a.first_row[None, :]
                rows_a = first if rows_a is None else np.vstack([first, rows_a])
                a.first_row = None
            verdict = verify(draft.tokens, None, rows_a[-len(draft.tokens) - 1 :], a.request.params, a.rng)
            if a.seq in batch:
                share = len(batch[a.seq]) / n_evaluated
                a.decode_s += elapsed + draft_s
                a.cost_s += elapsed * share + draft_s * len(batch[a.seq]) / n_decode
                a.steps += 1
            if a.session is not None:
                a.session.observe(a.context, draft, verdict, StepTiming(elapsed, draft_s, n_evaluated))
                a.spec.record(len(draft.tokens), verdict.n_accepted)
                a.spec.draft_s += draft_s
                self._tested += tested(len(draft.tokens), verdict.n_accepted)
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
        for prefill, tokens in chunks:
            share = elapsed * len(tokens) / n_evaluated
            prefill.done += len(tokens)
            prefill.wall_s += elapsed
            prefill.cost_s += share
            self.stats.prefill_s += share
            self.stats.prefilled_tokens += len(tokens)
            if prefill.remaining == 0:
                self._prefilling.remove(prefill)
                finished += self._activate(prefill, logits[prefill.seq])
        return finished

    def _prefill_chunks(self) -> list[tuple[_Prefill, list[int]]]:
        """The prompt tokens this step evaluates: the oldest prompts first, ``prefill_chunk`` at most."""
        budget = sum(p.remaining for p in self._prefilling) if self.prefill_chunk is None else self.prefill_chunk
        chunks = []
        for prefill in self._prefilling:
            if budget <= 0:
                break
            n = min(prefill.remaining, budget)
            if n < prefill.remaining < n + prefill.rows:  # the rows wanted must come in one chunk, the last
                n = prefill.remaining - prefill.rows or prefill.remaining
            chunks.append((prefill, prefill.prompt[prefill.done : prefill.done + n]))
            budget -= n
        return chunks

    def _propose(self, active: list[_Active], base: int, learnable: bool) -> dict[int, Draft]:
        """Each request's draft, cut to the lengths chosen for the whole batch (empty without a drafter).

        base: tokens the step evaluates without any draft (pending tokens and prompt chunks);
        learnable: whether the step's timing will be learned from (no prompt chunks: a trial may run)."""
        empty = Draft(tokens=[])
        if self.drafter is None:
            return {a.handle: empty for a in active}
        prior = self._accepted / self._tested if self._tested else 0.5
        alphas = [acceptance_estimate(a.spec.accepted_tokens, a.spec.tested_tokens, prior * self.PRIOR_DRAFTED,
                                      self.PRIOR_DRAFTED) for a in active]  # fmt: skip
        if self._batch_drafter is not None:  # lengths first, then one draft evaluation per position
            caps = [max(min(self.k_max, a.checker.remaining - 1), 0) for a in active]
            lengths = self._lengths(alphas, caps, base, self._batch_drafter.position_cost)
            lengths = self._with_trial(lengths, alphas, caps) if learnable else lengths
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
        # a drafter that knows what to expect of this very draft (a long match in the request's own
        # prediction) is believed over the request's running average, which knows nothing before its first draft
        alphas = [alpha if d.acceptance is None else d.acceptance
                  for alpha, d in zip(alphas, (proposed[a.handle] for a in active))]  # fmt: skip
        caps = [len(proposed[a.handle].tokens) for a in active]
        lengths = self._lengths(alphas, caps, base)
        lengths = self._with_trial(lengths, alphas, caps) if learnable else lengths
        return {a.handle: _cut(proposed[a.handle], k) for a, k in zip(active, lengths)}

    def _lengths(self, alphas: list[float], caps: list[int], base: int, position_cost=None) -> list[int]:
        """The batch's draft lengths: together (base: a pending token per request), or each as if alone."""
        cost = self.costs.snapshot().steps
        if self.joint_lengths:
            return choose_draft_lengths(alphas, caps, base, cost, position_cost, padded=self.seqs.pads_rows)
        return [choose_draft_lengths([a], [c], 1, cost, position_cost)[0] for a, c in zip(alphas, caps)]

    def _with_trial(self, lengths: list[int], alphas: list[float], caps: list[int]) -> list[int]:
        """Where nothing is drafted, the likeliest draft is verified (``TRIAL_MAX`` tokens at most) if the
        learned costs grant a trial: it measures what verification costs now."""
        if any(lengths) or not caps or not self.learn_costs:
            return lengths
        i = max(range(len(caps)), key=lambda j: (caps[j] > 0, alphas[j]))
        if caps[i] == 0 or alphas[i] < TRIAL_MIN_ALPHA:
            return lengths
        if not self.costs.claim_trial():  # granted now, or already to a drafter sharing the costs this step
            return lengths
        return [min(caps[i], TRIAL_MAX) if j == i else 0 for j in range(len(caps))]

    def run(self, requests: list[Request]) -> list[Generation]:
        """Decode ``requests`` together; their generations in the same order."""
        handles = [self.submit(r) for r in requests]
        done: dict[int, Generation] = {}
        while not self.idle:
            done.update(self.step())
        return [done[h] for h in handles]

    # ---- admission and retirement ---------------------------------------------------
    def _admit(self) -> None:
        """Move waiting requests into sequences while sequences and cells last; their prompts then go
        through the coming steps in chunks (one prefill per distinct prompt admitted together)."""
        # requests with the same prompt (a given draft is evaluated as part of it) share one prefill
        groups: dict[tuple[tuple[int, ...], int], list[tuple[int, Request]]] = {}
        # a kept sequence gives way to a new request; prompts still being evaluated will open copies for
        # the other requests admitted with them
        promised = sum(len(p.members) - 1 for p in self._prefilling)
        free = self.seqs.n_free + len(self._kept) - promised
        reserved = self._reserved
        while self._waiting and free > 0:
            handle, request = self._waiting[0]
            key = _prefill_key(request)
            prompt, n_draft = key
            room = self.seqs.n_ctx_seq - len(prompt) + n_draft  # as reserved below: a given draft is its own tokens
            need = min(request.max_tokens, room) + (0 if key in groups else len(prompt))
            if reserved + need > self.seqs.n_ctx and (reserved or groups):
                break  # wait for running requests to free cells (one request alone always fits)
            self._waiting.popleft()
            self._admitted_at[handle] = time.perf_counter()
            groups.setdefault(key, []).append((handle, request))
            free -= 1
            reserved += need
        for (prompt, n_draft), members in groups.items():
            room = self.seqs.n_ctx_seq - len(prompt) + n_draft  # a given draft's tokens are the generation's own
            admitted = [(handle, request, min(request.max_tokens, room)) for handle, request in members]
            shared = _SharedPrompt(cells=len(prompt), members=len(admitted))
            rows = n_draft + 1
            seq, cached = self._sequence_for(prompt, all(request.reuse_prefix for _, request in members), rows)
            self._prefilling.append(_Prefill(list(prompt), seq, admitted, shared, rows, done=cached, cached=cached))
            self._reserved += shared.cells + sum(m for _, _, m in admitted)
            self.stats.shared_prompt_tokens += len(prompt) * (len(admitted) - 1)
            self.stats.reused_prompt_tokens += cached

    def _sequence_for(self, prompt: tuple[int, ...], reuse: bool, rows: int = 1) -> tuple[int, int]:
        """A sequence for a new prompt, and how many of its tokens it holds already: the kept sequence
        sharing the longest prefix with it (rewound to that prefix, short of the last ``rows`` tokens,
        whose rows are wanted; only where ``reuse``; while a sequence is free, not for a short shared
        part that would cut its cache), else a new one (the least recently used kept sequence closed
        first if none is free)."""
        best, best_len = None, 0
        for seq in self._kept if reuse else ():
            n = common_prefix_len(self.seqs.tokens(seq), prompt)
            if n > best_len:
                best, best_len = seq, n
        if best is not None and self.seqs.n_free and best_len < self.seqs.n_tokens(best):  # it would be cut short
            if best_len < min(REUSE_MIN_TOKENS_WHILE_FREE, len(prompt) / 2):
                best = None  # a fresh sequence, and that cache stays for its own prompt
        if best is not None and best_len >= max(1.0, REUSE_MIN_SHARE * len(prompt)) and len(prompt) > rows:
            del self._kept[best]
            keep = min(best_len, len(prompt) - rows)  # the prompt's last token is evaluated: its row predicts
            self.seqs.rewind(best, keep)
            return best, keep
        return self._open(), 0

    def _open(self, copy_of: int | None = None) -> int:
        """A new sequence (a copy of ``copy_of``'s), closing the least recently used kept one if none is free."""
        if not self.seqs.n_free and self._kept:
            self.seqs.close(self._kept.popitem(last=False)[0])
        return self.seqs.open(copy_of)

    def clear_kept(self) -> None:
        """Close every kept sequence (their caches are gone)."""
        while self._kept:
            self.seqs.close(self._kept.popitem()[0])

    def _activate(self, prefill: _Prefill, last_rows: np.ndarray) -> list[tuple[int, Generation]]:
        """A prompt is evaluated: its requests start decoding (the first on its sequence, the rest on copies).

        last_rows  # [prefill.rows, vocab]: the prompt's last rows; the last one predicts every member's
        first token (with a given draft of k tokens, the k+1 rows that verify it).
        Returns the requests already done: cache warm-ups (max tokens 0: the prompt only, kept) and
        given drafts (verified here).
        """
        prompt = prefill.prompt
        first_row = last_rows[-1]
        made: list[int] = []  # handles made active here: undone if a later one fails
        try:
            for i, (handle, request, max_tokens) in enumerate(prefill.members):
                seq = prefill.seq if i == 0 else self._open(copy_of=prefill.seq)
                session = draft_rng = spec = None
                try:
                    drafting = self.drafter is not None and max_tokens > 0 and request.draft is None
                    if drafting:  # a warm-up, or a request bringing its own draft, drafts nothing
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
                        first_row=first_row,
                        reserved=max_tokens,
                        prompt=prefill.shared,
                        prefill_s=prefill.wall_s,
                        cached_prompt_tokens=prefill.cached,
                        cost_s=prefill.cost_s / len(prefill.members),
                        context=list(prompt),
                        session=session,
                        draft_rng=draft_rng,
                        spec=spec,
                    )
                except BaseException:
                    if session is not None and self._batch_drafter is not None:
                        self._batch_drafter.end(session)
                    if i:
                        self.seqs.close(seq)
                    raise
                self._active[handle] = active
                made.append(handle)
            for handle in made:  # once every copy is made: verifying rewinds the sequence copied from
                if self._active[handle].request.draft is not None:
                    self._verify_given(self._active[handle], last_rows)
        except BaseException:
            for handle in made:
                self.cancel(handle)
            unstarted = prefill.members[len(made) :]
            for _, _, max_tokens in unstarted:
                self._unreserve(prefill.shared, max_tokens)
            if not made:  # nobody owns the prompt's sequence
                self._free(prefill.seq)
            raise
        return [(h, self._retire(self._active[h])) for h in made
                if self._active[h].checker.remaining == 0 or self._active[h].request.draft is not None]  # fmt: skip

    def _verify_given(self, active: _Active, last_rows: np.ndarray) -> None:
        """Verify a given draft, evaluated with its prompt: last_rows  # [k+1, vocab] (the request ends)."""
        draft = active.request.draft
        k = len(draft.tokens)
        verdict = verify(list(draft.tokens), draft.dense_probs(self.seqs.n_vocab), last_rows[-k - 1 :],
                         active.request.params, active.rng)  # fmt: skip
        active.first_row = None
        committed = 0
        for token in verdict.tokens:
            self.stats.generated_tokens += 1
            committed += 1
            if active.checker.push(token):
                break
        accepted = min(verdict.n_accepted, committed)  # a token limit may cut the accepted prefix
        active.spec = SpecStats()
        active.spec.record(k, accepted)
        self._tested += tested(k, accepted)
        self._accepted += accepted
        rejected = k - verdict.n_accepted
        if rejected:  # the sequence holds the prompt and the accepted draft (a kept cache for the next call)
            self.seqs.rewind(active.seq, self.seqs.n_tokens(active.seq) - rejected)

    def _retire(self, active: _Active) -> Generation:
        self._active.pop(active.handle)
        self._admitted_at.pop(active.handle, None)
        self._release(active)
        checker = active.checker
        return Generation(
            text=checker.text,
            tokens=checker.tokens,
            finish_reason=checker.finish_reason or "length",  # a warm-up: nothing was to be generated
            stop_string=checker.stop_string,
            n_prompt_tokens=len(active.request.prompt_tokens),
            n_cached_prompt_tokens=active.cached_prompt_tokens,
            prefill_s=active.prefill_s,
            decode_s=active.decode_s,
            stats=DecodingStats(steps=active.steps, target_s=active.decode_s, speculation=active.spec),
            cost_s=active.cost_s,
        )

    def _release(self, active: _Active) -> None:
        if active.session is not None and self._batch_drafter is not None:
            self._batch_drafter.end(active.session)
        self._unreserve(active.prompt, active.reserved)
        self._free(active.seq)

    def _free(self, seq: int) -> None:
        """A sequence nobody uses any more: kept for its cache (reuse_prefixes), else closed."""
        if self.reuse_prefixes:
            self._kept[seq] = None
        else:
            self.seqs.close(seq)

    def _unreserve(self, prompt: _SharedPrompt, max_tokens: int) -> None:
        """One request leaves: its own cells, and its prompt's once the prompt's last request has left."""
        self._reserved -= max_tokens
        prompt.members -= 1
        if prompt.members == 0:
            self._reserved -= prompt.cells
        if self._reserved < 0:
            raise InternalError("batch decoder released more cells than it reserved")


def _prefill_key(request: Request) -> tuple[tuple[int, ...], int]:
    """What a request's prefill evaluates (its prompt, then any given draft) and its draft's length."""
    if request.draft is None:
        return tuple(request.prompt_tokens), 0
    return tuple(request.prompt_tokens) + tuple(request.draft.tokens), len(request.draft.tokens)


def _chain(draft: Draft) -> Draft:
    """A draft as one chain: a token tree's first branch (the batch verifies chains)."""
    if draft.parents is None:
        return draft
    tokens, node = [], -1
    for i, parent in enumerate(draft.parents):
        if parent == node:
            tokens.append(draft.tokens[i])
            node = i
    return Draft(tokens=tokens, source=draft.source, lookup=draft.lookup, acceptance=draft.acceptance)


def _cut(draft: Draft, k: int) -> Draft:
    if k >= len(draft.tokens):
        return draft
    return Draft(tokens=draft.tokens[:k], source=draft.source, lookup=draft.lookup, acceptance=draft.acceptance)
