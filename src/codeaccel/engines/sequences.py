"""Several sequences of one model in one KV cache, evaluated together: the multi-sequence contract.

An :class:`Engine` holds one sequence. On a CPU, one evaluation of several sequences'
next tokens costs far less than evaluating them one after another (the weights are
read once per batch: llama.cpp's ``llama-bench`` here, 1.5B Q4_K_M on 2 threads, 15 tok/s
for one sequence, 40 in batches of 4, 78 in batches of 16), so the cascade's k samples
and the server's concurrent requests go through a :class:`SequenceSet`:

* ``open(copy_of=None) -> seq``: a new, empty sequence, or one that starts as a copy of
  ``copy_of``'s cache (llama.cpp shares the cells: a prompt prefilled once serves k
  samples);
* ``eval({seq: tokens, ...}) -> {seq: logits  # [len(tokens), n_vocab]}``: append each
  sequence's tokens and evaluate all of them in one batch (sequences of any lengths,
  at any step of their generation: a sequence opens or closes between two calls);
* ``rewind(seq, n)``, ``close(seq)``, ``tokens(seq)``.

Every sequence sees only its own tokens, so its logits equal what the single-sequence
engine gives for the same tokens (up to the float noise of a different batch shape,
which the benchmarks' near-tie tolerance measures). :func:`codeaccel.engines.open_sequences`
makes one for any engine; like an engine it serves one thread at a time, and it is
freed before its engine is closed.
"""

from __future__ import annotations

import abc
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from codeaccel.engines.base import Engine
from codeaccel.errors import InternalError, UserError


class ContextFull(InternalError):
    """The set's cache has no room for a batch: the caller admitted more than ``n_ctx`` allows."""


def _exclusive(method: Callable) -> Callable:
    @functools.wraps(method)
    def guarded(self: SequenceSet, *args, **kwargs):
        if not self._in_use.acquire(blocking=False):
            raise InternalError(f"sequence set of {self.model_name} is in use by another thread")
        try:
            return method(self, *args, **kwargs)
        finally:
            self._in_use.release()

    return guarded


class SequenceSet(abc.ABC):
    kind: str = ""
    pooled: bool = False  # sequences draw cells from one pool (a copy shares its source's cells)
    pads_rows: bool = False  # a batch's rows are padded to its longest step (its cost follows the longest)

    def __init__(self, engine: Engine, n_ctx: int, n_seq_max: int, n_ctx_seq: int | None = None):
        """``engine``: the model's single-sequence engine; it owns the tokenizer (and the weights).

        ``n_ctx_seq``: most tokens one sequence may hold (None: ``n_ctx``, one pool of cells for all)."""
        if n_seq_max < 1:
            raise InternalError(f"a sequence set needs at least one sequence, got n_seq_max={n_seq_max}")
        self.engine = engine
        self.model_name = engine.model_name
        self.n_vocab = engine.n_vocab  # width of a logits row
        self.n_ctx = n_ctx  # cells of the cache, all sequences together
        self.n_ctx_seq = min(n_ctx, n_ctx_seq or n_ctx)  # cells one sequence may use
        self.n_seq_max = n_seq_max  # most sequences open at once
        self.eog_token_ids = engine.eog_token_ids
        self._seqs: dict[int, list[int]] = {}  # open sequence id -> the tokens its cache holds
        self._in_use = threading.Lock()

    # ---- the contract -------------------------------------------------------------
    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.engine.detokenize(tokens)

    def token_bytes(self, token: int) -> bytes | None:
        return self.engine.token_bytes(token)

    @property
    def open_sequences(self) -> list[int]:
        return sorted(self._seqs)

    @property
    def n_free(self) -> int:
        """Sequences that can still be opened."""
        return self.n_seq_max - len(self._seqs)

    def tokens(self, seq: int) -> list[int]:
        """A copy of the tokens sequence ``seq`` holds."""
        return list(self._held(seq))

    def n_tokens(self, seq: int) -> int:
        return len(self._held(seq))

    @_exclusive
    def open(self, copy_of: int | None = None) -> int:
        """A new sequence: empty, or holding a copy of ``copy_of``'s tokens (its cache shared or copied)."""
        if copy_of is not None:
            self._held(copy_of)
        free = [s for s in range(self.n_seq_max) if s not in self._seqs]
        if not free:
            raise InternalError(f"all {self.n_seq_max} sequences are open: close one first")
        seq = free[0]
        self._open(seq, copy_of)
        self._seqs[seq] = [] if copy_of is None else list(self._seqs[copy_of])
        return seq

    @_exclusive
    def close(self, seq: int) -> None:
        """Free the sequence and its cache cells (cells shared with another sequence stay theirs)."""
        self._held(seq)
        self._close(seq)
        del self._seqs[seq]

    @_exclusive
    def rewind(self, seq: int, n_tokens: int) -> None:
        """Keep only the first n_tokens of sequence ``seq``."""
        held = self._held(seq)
        if not 0 <= n_tokens <= len(held):
            raise InternalError(f"cannot rewind sequence {seq} to {n_tokens} tokens: it holds {len(held)}")
        if n_tokens < len(held):
            self._truncate(seq, n_tokens)
            del held[n_tokens:]

    @_exclusive
    def eval(
        self, steps: Mapping[int, Sequence[int]], *, all_logits: bool = True, rows: Mapping[int, int] | None = None
    ) -> dict[int, np.ndarray]:
        """Append ``steps[seq]`` to every sequence named and evaluate them all in one batch.

        Returns, per sequence, logits  # [len(tokens), n_vocab] float32 (row i predicts the
        token after tokens[i]), or only the last row  # [1, n_vocab] when not all_logits.
        ``rows[seq]``, where given, overrides that for one sequence: its last ``rows[seq]``
        rows (0: none, a [0, n_vocab] array; a prompt chunk whose predictions nobody reads).
        """
        batch: dict[int, list[int]] = {}
        wanted: dict[int, int] = {}
        for seq, tokens in steps.items():
            held = self._held(seq)
            tokens = [int(t) for t in tokens]
            if not tokens:
                raise InternalError(f"sequence {seq}: eval needs at least one token")
            bad = [t for t in tokens if not 0 <= t < self.n_vocab]
            if bad:
                raise InternalError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")
            if len(held) + len(tokens) > self.n_ctx_seq:
                raise ContextFull(
                    f"sequence {seq} would hold {len(held) + len(tokens)} tokens > {self.n_ctx_seq} cells per sequence"
                )
            batch[seq] = tokens
            n_rows = len(tokens) if all_logits else 1
            if rows is not None and seq in rows:
                n_rows = rows[seq]
                if not 0 <= n_rows <= len(tokens):
                    raise InternalError(f"sequence {seq}: {n_rows} logits rows asked of {len(tokens)} tokens")
            wanted[seq] = n_rows
        if not batch:
            raise InternalError("eval needs at least one sequence")
        out = self._forward(batch, wanted)
        for seq, tokens in batch.items():
            self._seqs[seq].extend(tokens)
        return out

    def evaluated_tokens(self, steps: Sequence[int]) -> int:
        """Tokens one ``eval`` of steps of these lengths computes (an engine that pads counts its pads)."""
        return sum(steps)

    def close_all(self) -> None:
        for seq in self.open_sequences:
            self.close(seq)

    def set_lora(self, path: Path | None) -> None:
        """Evaluate with a LoRA adapter from now on (None: the base model), in the form the engine applies
        (llama.cpp: a GGUF file; transformers: peft's adapter folder; see ``DraftVersion.adapter_for``).

        The caches already held were made with the other weights: a draft model's sequences stay
        usable (drafts are verified anyway), a target's must be cleared by the caller."""
        set_lora = getattr(self.engine, "set_lora", None)
        if set_lora is None:
            raise UserError(f"the {self.engine.kind or type(self.engine).__name__} engine applies no LoRA adapters")
        set_lora(path)

    def free(self) -> None:
        """Release the cache itself (optional)."""

    def __enter__(self) -> SequenceSet:
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def _held(self, seq: int) -> list[int]:
        held = self._seqs.get(seq)
        if held is None:
            raise InternalError(f"sequence {seq} is not open")
        return held

    # ---- for subclasses -----------------------------------------------------------
    @abc.abstractmethod
    def _open(self, seq: int, copy_of: int | None) -> None:
        """Make ``seq``'s cache empty, or a copy of ``copy_of``'s."""

    @abc.abstractmethod
    def _close(self, seq: int) -> None:
        """Drop ``seq``'s cache."""

    @abc.abstractmethod
    def _truncate(self, seq: int, n_tokens: int) -> None:
        """Drop ``seq``'s cached positions >= n_tokens."""

    @abc.abstractmethod
    def _forward(self, batch: dict[int, list[int]], wanted: dict[int, int]) -> dict[int, np.ndarray]:
        """Evaluate every sequence's new tokens after its cache, in one batch where the engine can;
        per sequence its last ``wanted[seq]`` logits rows  # [wanted[seq], n_vocab]."""


class SequentialSequences(SequenceSet):
    """Any single-sequence engine as a set: each sequence evaluated on its own (correct, not batched).

    The fallback for engines without a multi-sequence cache (and for tests): a
    sequence's tokens are re-prefilled into the one engine whenever another sequence
    used it in between, so it costs a prefill per switch.
    """

    kind = "sequential"

    def __init__(self, engine: Engine, n_seq_max: int):
        super().__init__(engine, n_ctx=engine.n_ctx, n_seq_max=n_seq_max)

    def _open(self, seq: int, copy_of: int | None) -> None:
        pass

    def _close(self, seq: int) -> None:
        pass

    def _truncate(self, seq: int, n_tokens: int) -> None:
        pass

    def _forward(self, batch: dict[int, list[int]], wanted: dict[int, int]) -> dict[int, np.ndarray]:
        out = {}
        for seq, tokens in batch.items():
            held = self._seqs[seq]
            if held:
                self.engine.prefill(held)  # reuses the engine's cache when it already holds them
                rows = self.engine.eval(tokens)
            else:
                self.engine.reset()
                rows = self.engine.eval(tokens)
            out[seq] = rows[len(rows) - wanted[seq] :]
        return out
