"""A draft model for the whole batch: every request's draft tokens in one draft evaluation per position.

The single-stream :class:`~codeaccel.decoding.draft_model.DraftModelDrafter` holds one
sequence. Behind a continuous batch each request needs its own draft sequence, and the
draft model, like the target, is far cheaper per token in a batch. A
:class:`BatchDraftModel` keeps one sequence per request in a
:class:`~codeaccel.engines.sequences.SequenceSet` of the draft engine; ``propose_batch``
drafts for all requests at once:

    catch up: each sequence is rewound to the longest prefix it shares with its request's
              context and evaluates the rest (the prompt on the first step, then the one
              or two tokens the target committed): one batched evaluation, whose last
              rows predict every request's first draft token
    → then one batched evaluation per further position, of the requests whose drafts are
              that long (lengths were chosen before drafting, for the whole batch).

Drafts are the draft model's greedy tokens without probabilities: the batch verifies them
by sample-and-compare (greedy: the target's argmax), which is lossless for any proposal and
keeps a seeded request's tokens independent of what else is in the batch. The draft's
cost per position is read from the draft engine's cost curve and its speed relative to the
target's (both measured on this machine), so the batch's lengths weigh it
(``position_cost``, read by :func:`~codeaccel.decoding.batch_draft_lengths.choose_draft_lengths`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codeaccel.decoding.drafter import Draft, StepTiming
from codeaccel.decoding.stats import DrafterStats
from codeaccel.decoding.verification import Verdict
from codeaccel.engines.base import common_prefix_len
from codeaccel.engines.cost_curve import CostCurve
from codeaccel.engines.sequences import SequenceSet
from codeaccel.errors import InternalError


@dataclass
class BatchDraftSession:
    """One request's draft sequence and what it holds (per-request state)."""

    seq: int  # its sequence in the draft's set (which knows the tokens it holds)
    ended: bool = False

    def observe(self, context: Sequence[int], draft: Draft, verdict: Verdict, timing: StepTiming) -> None:
        pass  # the next catch-up re-syncs the cache with the committed context

    def stats(self) -> DrafterStats:
        return DrafterStats()


def draft_cost_steps(lengths: Sequence[int], position_cost) -> float:
    """The draft's cost of ``lengths`` [n] tokens per request, in target decode steps: position j
    is one batched draft evaluation of the requests drafting more than j tokens."""
    return sum(position_cost(sum(1 for k in lengths if k > j)) for j in range(max(lengths, default=0)))


class BatchDraftModel:
    """Drafts for every active request of a :class:`~codeaccel.decoding.batched.BatchDecoder` at once.

    seqs: a sequence set on the draft engine (as many sequences as the target's batch, its
    own cache); curve: the draft engine's cost curve; relative_speed: its one-token step
    over the target's. One thread (the decoder's) uses it.
    """

    name = "draft-model"

    def __init__(self, seqs: SequenceSet, curve: CostCurve, relative_speed: float):
        if relative_speed <= 0:
            raise InternalError(f"the draft's relative speed must be positive, got {relative_speed}")
        self.seqs = seqs
        self.curve = curve
        self.relative_speed = relative_speed

    def start(
        self, prompt: Sequence[int], exclude_files: frozenset[str] = frozenset(), prediction: Sequence[int] = ()
    ) -> BatchDraftSession:
        """A sequence for the request; its prompt is evaluated in the first ``propose_batch`` (batched)."""
        if not self.seqs.n_free:
            raise InternalError("the draft has no free sequence: it needs as many as the target's batch")
        return BatchDraftSession(seq=self.seqs.open())

    def end(self, session: BatchDraftSession) -> None:
        """Free the request's draft sequence (it finished or was cancelled)."""
        if not session.ended:
            session.ended = True
            self.seqs.close(session.seq)

    def position_cost(self, m: int) -> float:
        """One draft position for m requests, in target decode steps. The first position also carries
        each request's catch-up tokens, counted as one each (usually the one token the target committed)."""
        return self.relative_speed * self.curve.cost(m)

    def propose_batch(self, sessions: Sequence[BatchDraftSession], contexts: Sequence[Sequence[int]],
                      lengths: Sequence[int]) -> list[Draft]:  # fmt: skip
        """Each session's draft of ``lengths[i]`` greedy draft tokens continuing ``contexts[i]``."""
        drafts: list[list[int]] = [[] for _ in sessions]
        want = list(lengths)
        catch_up: dict[int, list[int]] = {}
        room = self.seqs.n_ctx - sum(self.seqs.n_tokens(s) for s in self.seqs.open_sequences)
        for i, (session, context, k) in enumerate(zip(sessions, contexts, want)):
            if k <= 0:
                continue
            held = self.seqs.tokens(session.seq)
            keep = common_prefix_len(held, context[:-1])  # the last context token is evaluated again: its row predicts
            new = list(context[keep:])
            need = len(new) + k - 1 - (len(held) - keep)
            # no cells left for this draft, in the pool or its own stream (copies of one prompt hold their own)
            if need > room or keep + len(new) + k - 1 > self.seqs.n_ctx_seq:
                want[i] = 0
                continue
            room -= need
            self.seqs.rewind(session.seq, keep)
            catch_up[session.seq] = new
        step = catch_up
        position = 0
        while step:
            logits = self.seqs.eval(step, all_logits=False)  # {seq: [1, vocab]}: each one's last row
            nxt: dict[int, list[int]] = {}
            for i, session in enumerate(sessions):
                if session.seq not in step:
                    continue
                token = int(np.argmax(logits[session.seq][-1]))
                drafts[i].append(token)
                if position + 1 < want[i]:
                    nxt[session.seq] = [token]
            step = nxt
            position += 1
        return [Draft(tokens=d, source="model") if d else Draft(tokens=[]) for d in drafts]

    def close(self) -> None:
        """Free the draft's sequence set (its engine belongs to whoever loaded it)."""
        self.seqs.free()
