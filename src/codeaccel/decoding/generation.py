"""What a generation returns, and when it ends.

Every decoding method commits tokens one at a time through :class:`StopChecker`,
so EOS, stop strings and max-tokens end a speculative run at exactly the token
where autoregressive decoding would have ended it.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from codeaccel.decoding.sampling import SamplingParams
from codeaccel.decoding.stats import DecodingStats
from codeaccel.engines.base import Engine
from codeaccel.engines.sequences import SequenceSet
from codeaccel.errors import UserError

FinishReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class GivenDraft:
    """Draft tokens proposed outside the decoder (a remote client's draft model: SpeCoder's split),
    verified in one step, after which the request ends with the accepted tokens and one more.

    probs: the draft's distribution at each position, sparse ({token: probability}, every token it
    could have drawn), for rejection sampling; None: sample-and-compare (lossless without them).
    """

    tokens: tuple[int, ...]
    probs: tuple[Mapping[int, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.probs is not None and len(self.probs) != len(self.tokens):
            raise UserError(f"draft probabilities for {len(self.probs)} positions, {len(self.tokens)} tokens")

    def dense_probs(self, n_vocab: int) -> np.ndarray | None:
        """probs as rows  # [k, n_vocab] float64 (None without probs)."""
        if self.probs is None:
            return None
        dense = np.zeros((len(self.tokens), n_vocab))
        for row, sparse in zip(dense, self.probs):
            if any(not 0 <= t < n_vocab for t in sparse):
                raise UserError(f"draft probabilities name token ids outside [0, {n_vocab})")
            row[list(sparse)] = list(sparse.values())
        return dense


@dataclass(frozen=True)
class Request:
    """One generation request, as every decoding method takes it."""

    prompt_tokens: Sequence[int]
    params: SamplingParams = SamplingParams()
    max_tokens: int = 256
    stop: Sequence[str] = ()
    exclude_files: Sequence[str] = ()  # datastore files this request must not draft from (a benchmark's answer)
    # OpenAI's predicted output ({"type": "content", "content": ...}) as tokens: text the
    # output is expected to repeat (an edit's original code); drafters search it first
    prediction_tokens: Sequence[int] = ()
    # may start from a cache holding a prefix of the prompt (llama.cpp's cache_prompt); False: evaluate it whole
    reuse_prefix: bool = True
    # a draft to verify in one step (the request ends after it): evaluated with the prompt, one evaluation
    draft: GivenDraft | None = None


@dataclass
class Generation:
    text: str  # the completion, cut before any stop string, without the EOS token
    tokens: list[int]  # every generated token, including the one that ended generation
    finish_reason: FinishReason
    n_prompt_tokens: int
    prefill_s: float  # evaluating the prompt
    decode_s: float  # everything after the prefill
    stats: DecodingStats | None = None  # the method's own log (None: a peer library decoded)
    # engine seconds attributed to this generation when it shared batched evaluations with
    # others (its share of each, prefill included); None: it had the engine to itself
    cost_s: float | None = None
    stop_string: str = ""  # the stop string that ended it (finish_reason "stop"), else ""
    n_cached_prompt_tokens: int = 0  # prompt tokens a cache already held (not evaluated for it)

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.n_generated / self.decode_s if self.decode_s > 0 else 0.0


def validate_request(engine: Engine, prompt_tokens: Sequence[int], max_tokens: int) -> int:
    """Check a request at the boundary; return the max tokens that fit in the context."""
    if not prompt_tokens:
        raise UserError("the prompt is empty: nothing to condition on")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
    room = engine.n_ctx - len(prompt_tokens)
    if room < 1:
        raise UserError(f"the prompt has {len(prompt_tokens)} tokens; the context holds {engine.n_ctx}")
    return min(max_tokens, room)


class StopChecker:
    """Decides, token by token, whether generation is over.

    ``push(token)`` returns the finish reason once the token ends generation:
    ``"eos"`` for an end-of-generation token, ``"stop"`` when the text now contains a
    stop string (the text is cut before it), ``"length"`` at max_tokens.

    The text grows by each token's bytes through an incremental UTF-8 decoder where the
    engine gives them (:meth:`Engine.token_bytes`; the same text as decoding the tokens
    whole, a character cut between tokens shown as U+FFFD until its last byte comes), so
    a long generation does not decode all its tokens again at every token.
    """

    def __init__(self, engine: Engine | SequenceSet, stop: Sequence[str], max_tokens: int):
        self._engine = engine
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._settled = ""  # the text of every byte the decoder has settled (no character left open)
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._max_tokens = max_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self.stop_string = ""  # the one that matched, once one has

    @property
    def remaining(self) -> int:
        """Tokens it may still take before max tokens ends generation."""
        return self._max_tokens - len(self.tokens)

    def push_end_of_text(self, token: int) -> FinishReason:
        """Another engine (a remote target) ended the text with ``token``: its end-of-generation id, which may
        not be one of this engine's; the text stays as it is."""
        if self.finish_reason is not None:
            raise RuntimeError("generation already finished")
        self.tokens.append(token)
        self.finish_reason = "eos"
        return self.finish_reason

    def push(self, token: int) -> FinishReason | None:
        if self.finish_reason is not None:
            raise RuntimeError("generation already finished")
        self.tokens.append(token)
        if token in self._engine.eog_token_ids:
            self.finish_reason = "eos"
            return self.finish_reason
        previous = len(self.text)
        piece = self._engine.token_bytes(token)
        if piece is None:
            self.text = self._engine.detokenize(self.tokens)
        else:
            self._settled += self._decoder.decode(piece)
            open_bytes = self._decoder.getstate()[0]  # a character's first bytes, its last still to come
            self.text = self._settled + open_bytes.decode("utf-8", errors="replace") if open_bytes else self._settled
        if self._stop:
            # A stop string can only end in the new text; start a little before it.
            start = max(0, previous - self._longest_stop)
            hits = [(i, s) for s in self._stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                at, self.stop_string = min(hits, key=lambda hit: hit[0])  # the earliest; ties: the first listed
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return self.finish_reason
        if len(self.tokens) >= self._max_tokens:
            self.finish_reason = "length"
        return self.finish_reason
