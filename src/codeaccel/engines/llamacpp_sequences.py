"""Several sequences in one llama.cpp context: one ``llama_batch``, one ``llama_decode`` per step.

The context is our own (``llama_init_from_model`` on the engine's model, so the weights
are shared with the engine), with ``n_seq_max`` sequences in one of two cache layouts:

* **unified** (the default: the cascade's k samples of one prompt): one pool of cells for
  all sequences; a copy (``open(copy_of=...)``) is ``llama_memory_seq_cp``, which adds the
  new sequence to the source's cells instead of copying them, so a prompt prefilled once is
  shared by every sample drawn from it. But every token of a batch attends over the pool's
  used cells (masked to its own), so with many long independent sequences attention grows
  with all of them together;
* **per sequence** (``unified=False``, llama.cpp's streams; the server, whose requests share
  nothing, as ``llama-server -np N`` runs by default): each sequence has its own
  ``n_ctx / n_seq_max`` cells and attends over those only; a copy copies the cells.
 Each batch row carries its own sequence id and position
(the sequence's length before the row), so attention sees exactly its own sequence.
A batch larger than ``n_batch`` tokens is decoded in chunks, each sequence's rows in
order.
"""

from __future__ import annotations

import numpy as np

from codeaccel.engines.sequences import ContextFull, SequenceSet
from codeaccel.errors import InternalError, SetupError

#: llama.cpp's own limit on sequences per context (LLAMA_MAX_SEQ)
MAX_SEQ = 64


class LlamaCppSequences(SequenceSet):
    kind = "llama.cpp"

    def __init__(self, engine, *, n_seq_max: int, n_ctx: int, n_threads: int, n_batch: int = 512,
                 unified: bool = True):  # fmt: skip
        """``engine``: the :class:`~codeaccel.engines.llamacpp.LlamaCppEngine` whose model this evaluates;
        ``unified``: one pool of cells shared by copies (False: ``n_ctx / n_seq_max`` cells per sequence)."""
        if not 1 <= n_seq_max <= MAX_SEQ:
            raise InternalError(f"llama.cpp holds 1 to {MAX_SEQ} sequences per context, got {n_seq_max}")
        lc = self._llama_cpp = engine._llama_cpp
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        params.n_seq_max = n_seq_max
        params.kv_unified = unified  # one pool of cells (copies share a prompt's), or a stream per sequence
        self._ctx = lc.llama_init_from_model(engine._model, params)
        if not self._ctx:
            raise SetupError(f"llama.cpp could not create a context of {n_ctx} tokens for {n_seq_max} sequences")
        self._memory = lc.llama_get_memory(self._ctx)
        self._n_batch = n_batch
        self._batch = engine.new_batch(n_batch, 1)
        self.pooled = unified
        super().__init__(engine, n_ctx=lc.llama_n_ctx(self._ctx), n_seq_max=n_seq_max,
                         n_ctx_seq=lc.llama_n_ctx_seq(self._ctx))  # fmt: skip

    def _open(self, seq: int, copy_of: int | None) -> None:
        self._llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        if copy_of is not None:
            self._llama_cpp.llama_memory_seq_cp(self._memory, copy_of, seq, -1, -1)

    def _close(self, seq: int) -> None:
        self._llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def _truncate(self, seq: int, n_tokens: int) -> None:
        self._llama_cpp.llama_memory_seq_rm(self._memory, seq, n_tokens, -1)

    def _forward(self, batch: dict[int, list[int]], wanted: dict[int, int]) -> dict[int, np.ndarray]:
        lc = self._llama_cpp
        # rows: (sequence, position, token, wants logits), each sequence's rows in order
        rows = [
            (seq, len(self._seqs[seq]) + i, tok, i >= len(tokens) - wanted[seq])
            for seq, tokens in batch.items()
            for i, tok in enumerate(tokens)
        ]
        out: dict[int, list[np.ndarray]] = {seq: [] for seq in batch}
        b = self._batch
        for start in range(0, len(rows), self._n_batch):
            chunk = rows[start : start + self._n_batch]
            b.n_tokens = len(chunk)
            self.engine.fill_inputs(b, [tok for _, _, tok, _ in chunk])
            for i, (seq, pos, _, wants) in enumerate(chunk):
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = wants
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                for seq in batch:  # leave every cache as it was
                    self._truncate(seq, len(self._seqs[seq]))
                if rc == 1:
                    raise ContextFull(f"no room in the {self.n_ctx}-cell cache for this batch of {len(rows)} tokens")
                raise InternalError(f"llama_decode failed with code {rc}")
            wanted = [seq for seq, _, _, wants in chunk if wants]
            if wanted:
                logits = self.engine.read_logits(self._ctx, len(wanted))  # [n_wanted, vocab]
                for seq, row in zip(wanted, logits):
                    out[seq].append(row)
        empty = np.empty((0, self.n_vocab), dtype=np.float32)
        return {seq: np.stack(r) if r else empty for seq, r in out.items()}

    def set_lora(self, path, scale: float = 1.0) -> None:
        """Evaluate with the LoRA adapter in GGUF file ``path`` from now on (None: the base model), on
        this set's own context (see :meth:`SequenceSet.set_lora`)."""
        self.engine.apply_lora(self._ctx, path, scale)

    def free(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            self._llama_cpp.llama_free(self._ctx)
            self._ctx = None
