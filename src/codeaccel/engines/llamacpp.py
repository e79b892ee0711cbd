"""The llama.cpp engine (GGUF models, the default on CPU), through llama-cpp-python.

The ``Llama`` object loads the model and context; evaluation goes through the
low-level API with a batch of our own, so we choose which positions return logits
(all of them when verifying a draft, only the last one when prefilling a prompt)
and the KV cache is trimmed with ``llama_memory_seq_rm``.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from codeaccel.engines.base import Engine
from codeaccel.errors import CodeaccelError

log = logging.getLogger(__name__)


class LlamaCppEngine(Engine):
    kind = "llama.cpp"

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_name: str | None = None,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        seed: int = 0,
    ):
        try:
            import llama_cpp
        except ImportError:
            raise CodeaccelError(
                "the llama.cpp engine needs llama-cpp-python: run `make install` (it builds it with the right flags)"
            ) from None
        self._llama_cpp = llama_cpp
        n_threads = n_threads or os.cpu_count() or 1
        path = Path(model_path)
        if not path.is_file():
            raise CodeaccelError(f"model file not found: {path}")
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                seed=seed,
                logits_all=False,
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python raises ValueError for unloadable files
            raise CodeaccelError(f"llama.cpp could not load {path}: {exc}") from None
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        n_vocab = self.llm.n_vocab()
        eog = frozenset(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        super().__init__(model_name or path.stem, n_vocab=n_vocab, n_ctx=self.llm.n_ctx(), eog_token_ids=eog)
        self.model_path = path
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._chat_formatter = None

    # ---- text ---------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if self._chat_formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self.llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise CodeaccelError(f"model {self.model_name} has no chat template; use a raw prompt")
            self._chat_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self.llm.detokenize([self.llm.token_eos()], special=True).decode("utf-8", "replace"),
                bos_token=self.llm.detokenize([self.llm.token_bos()], special=True).decode("utf-8", "replace"),
                add_generation_prompt=True,
            )
        return self._chat_formatter(messages=messages).prompt

    # ---- evaluation ---------------------------------------------------------------
    def _forward(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        lc = self._llama_cpp
        n_past = len(self._tokens)
        n_out = len(tokens) if all_logits else 1
        out = np.empty((n_out, self.n_vocab), dtype=np.float32)  # [n_out, vocab]
        batch = self._batch
        row = 0
        for start in range(0, len(tokens), self._n_batch):
            chunk = tokens[start : start + self._n_batch]
            last_chunk = start + len(chunk) == len(tokens)
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = n_past + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or (last_chunk and i == len(chunk) - 1)
            rc = lc.llama_decode(self.llm.ctx, batch)
            if rc != 0:
                self._truncate(n_past)  # leave the cache as it was
                raise RuntimeError(f"llama_decode failed with code {rc}")
            n_rows = len(chunk) if all_logits else int(last_chunk)
            if n_rows:
                ptr = lc.llama_get_logits(self.llm.ctx)
                out[row : row + n_rows] = np.ctypeslib.as_array(
                    ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_rows, self.n_vocab)
                )
                row += n_rows
        return out

    def _truncate(self, n_tokens: int) -> None:
        lc = self._llama_cpp
        lc.llama_memory_seq_rm(lc.llama_get_memory(self.llm.ctx), -1, n_tokens, -1)

    def close(self) -> None:
        if self._batch is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
