"""The llama.cpp engine (GGUF models, the default on CPU), through llama-cpp-python.

The ``Llama`` object loads the model (and the tokenizer and chat template); the
context we evaluate in is our own, made with ``llama_init_from_model`` so it can hold
several sequences in one unified KV cache (one per branch of a token tree).
Evaluation goes through the low-level API with a batch of our own, so we choose
which positions return logits (all of them when verifying a draft, only the last
one when prefilling a prompt), and the cache is trimmed with ``llama_memory_seq_rm``.

With a reduced draft vocabulary (:mod:`codeaccel.models.draft_vocab`, FR-Spec) the
model evaluated is the reduced file, fed input embeddings read from the original
(the reduced file holds only the kept tokens' rows), and its logits are scattered back
to the full vocabulary; text (tokenizer, chat template) comes from the original.

A token tree is evaluated as one batch: sequence 0 holds the committed text; each
branch b (root to leaf) is sequence b, sharing the prefix's cells
(``llama_memory_seq_cp``); a node belongs to the sequences of every leaf below it,
at position n_past + its depth, so attention sees exactly its own ancestors.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from codeaccel.engines.base import Engine, leaves, path_to
from codeaccel.engines.markup_split import PIECE_CHARS, Markup, split_at_markup
from codeaccel.errors import InternalError, SetupError, UserError
from codeaccel.models.draft_vocab import DraftVocabulary, TokenEmbeddings

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
        vocabulary: DraftVocabulary | None = None,
    ):
        try:
            import llama_cpp
        except ImportError:
            raise SetupError(
                "the llama.cpp engine needs llama-cpp-python: run `make install` (it builds it with the right flags)"
            ) from None
        self._llama_cpp = llama_cpp
        n_threads = n_threads or os.cpu_count() or 1
        path = Path(model_path)
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        self._vocabulary = vocabulary
        self._own_model = None  # the reduced model, loaded apart from Llama's (freed in close)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx if vocabulary is None else 64,  # Llama's own context serves its generate() in tests
                n_batch=n_batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                seed=seed,
                logits_all=False,
                vocab_only=vocabulary is not None,  # reduced: only the original's tokenizer and template
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python raises ValueError for unloadable files
            raise UserError(f"llama.cpp could not load {path}: {exc}") from None
        model = self.llm.model
        self._embeddings: TokenEmbeddings | None = None
        if vocabulary is not None:
            try:
                model = self._load_reduced(vocabulary, path)
            except BaseException:
                self.close()
                raise
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        params.n_seq_max = self.max_tree_branches
        params.kv_unified = True  # branches share the prefix's cells
        self._model = model  # what is evaluated: Llama's model, or the reduced one
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            self.close()
            raise SetupError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        vocab = self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._pieces: dict[int, bytes] = {}  # token -> its bytes (the vocabulary never changes)
        self._markups: dict[bool, Markup] = {}  # special on/off -> the markup parsed (read once)
        n_vocab = self.llm.n_vocab()
        eog = frozenset(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        n_ctx_real = llama_cpp.llama_n_ctx(self._ctx)
        name = model_name or path.stem
        if vocabulary is not None:
            name = f"{name}-vocab{vocabulary.size}"  # another model: its own costs, its own results rows
        super().__init__(name, n_vocab=n_vocab, n_ctx=n_ctx_real, eog_token_ids=eog)
        self.model_path = path
        self._n_batch = n_batch
        self.n_threads = n_threads  # a multi-sequence context on this model uses as many
        # the batch carries token ids, or input embeddings  # [n_batch, n_embd] for a reduced model
        self._batch = self.new_batch(n_batch, self.max_tree_branches)
        self._chat_formatter = None
        self._adapters: dict[str, object] = {}  # LoRA file -> its llama_adapter_lora (freed unused, or in close)
        self._applied: dict[int, str | None] = {}  # context address -> the adapter file it applies

    # ---- LoRA adapters (a fine-tuned draft, swapped in while the model stays loaded) -----
    def lora_adapter(self, path: Path):
        """The adapter in a GGUF LoRA file, loaded once per model."""
        key = str(Path(path).resolve())
        if key not in self._adapters:
            adapter = self._llama_cpp.llama_adapter_lora_init(self._model, key.encode())
            if not adapter:
                raise UserError(f"llama.cpp could not load the LoRA adapter {path} for {self.model_name}")
            self._adapters[key] = adapter
        return self._adapters[key]

    def apply_lora(self, ctx, path: Path | None, scale: float = 1.0) -> None:
        """Make context ``ctx`` (this engine's, or a sequence set's on its model) apply ``path`` (None: none)."""
        lc = self._llama_cpp
        if path is None:
            status = lc.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            adapters = (lc.llama_adapter_lora_p_ctypes * 1)(self.lora_adapter(path))
            status = lc.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(scale))
        if status:
            raise InternalError(f"llama.cpp could not set the LoRA adapter {path} (status {status})")
        self._applied[ctypes.cast(ctx, ctypes.c_void_p).value] = None if path is None else str(Path(path).resolve())
        for key in set(self._adapters) - set(self._applied.values()):  # a version no context applies any more
            lc.llama_adapter_lora_free(self._adapters.pop(key))

    def set_lora(self, path: Path | None, scale: float = 1.0) -> None:
        """Swap this engine's adapter (None: the base model); the cache, made with other weights, is cleared."""
        self.apply_lora(self._ctx, path, scale)
        self.lora_path = None if path is None else Path(path)
        self.reset()

    def _load_reduced(self, vocabulary: DraftVocabulary, path: Path):
        """Load the reduced model (kept as ``_own_model``) and the original's embeddings; check they fit."""
        lc = self._llama_cpp
        model_params = lc.llama_model_default_params()
        model_params.n_gpu_layers = 0  # as Llama loads the full model: the two drafts compare like for like
        model = self._own_model = lc.llama_model_load_from_file(str(vocabulary.path).encode(), model_params)
        if not model:
            raise SetupError(
                f"llama.cpp could not load the reduced draft model {vocabulary.path}: delete it to have it rewritten"
            )
        self._embeddings = TokenEmbeddings(path)
        if self._embeddings.n_vocab != self.llm.n_vocab():
            raise UserError(
                f"{path}'s embeddings have {self._embeddings.n_vocab} rows, its vocabulary {self.llm.n_vocab()}"
            )
        rows = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        if rows != vocabulary.size or lc.llama_model_n_embd(model) != self._embeddings.n_embd:
            raise SetupError(
                f"{vocabulary.path} does not fit {path.name} (rows {rows}, expected {vocabulary.size}): "
                "delete it to have it rewritten"
            )
        return model

    # ---- text ---------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; a long one in pieces cut after markup (:mod:`.markup_split`: llama.cpp
        finds markup in quadratic time, and the pieces tokenize to the whole's ids)."""
        pieces = split_at_markup(text, self._markup(special)) if len(text) > PIECE_CHARS else [text]
        return [t for piece in pieces for t in self.llm.tokenize(piece.encode("utf-8"), add_bos=False, special=special)]

    def _markup(self, special: bool) -> Markup:
        """The texts llama.cpp parses as special tokens with ``special`` on or off (its
        ``tokenizer_st_partition``: control, unknown and user-defined tokens; off, only user-defined ones)."""
        if special not in self._markups:
            lc = self._llama_cpp
            parsed = lc.LLAMA_TOKEN_ATTR_USER_DEFINED
            if special:
                parsed |= lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_UNKNOWN
            texts: dict[str, bool] = {}  # text -> a cut after it is safe
            for token in range(self.n_vocab):
                attr = lc.llama_vocab_get_attr(self._vocab, token)
                if not attr & parsed:
                    continue
                try:
                    text = lc.llama_vocab_get_text(self._vocab, token).decode("utf-8")
                except UnicodeDecodeError:  # markup we cannot find in a str: cut nowhere
                    return self._markups.setdefault(special, Markup((), frozenset()))
                if text:
                    texts[text] = texts.get(text, True) and not attr & lc.LLAMA_TOKEN_ATTR_RSTRIP
            self._markups[special] = Markup(tuple(texts), frozenset(t for t, safe in texts.items() if safe))
        return self._markups[special]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self._piece(int(t)) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self._piece(int(token))

    def _piece(self, token: int) -> bytes:
        """A token's bytes, special tokens rendered as text.

        Not ``Llama.detokenize``: llama-cpp-python 0.3.36 reads every piece into a 32-byte
        buffer and slices it with the negative size llama.cpp returns for a longer piece,
        so Qwen's long whitespace tokens (an indented line: "\n" and 31+ spaces) came back
        truncated, and the text did not re-tokenize into the same tokens.
        """
        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buffer = ctypes.create_string_buffer(size)
                n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, True)
                if n >= 0:
                    break
                size = -n  # the piece needs that many bytes
            piece = self._pieces[token] = buffer.raw[:n]
        return piece

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if self._chat_formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self.llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise UserError(f"model {self.model_name} has no chat template; use a raw prompt")
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
            self.fill_inputs(batch, chunk)
            for i in range(len(chunk)):
                batch.pos[i] = n_past + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or (last_chunk and i == len(chunk) - 1)
            rc = lc.llama_decode(self._ctx, batch)
            if rc != 0:
                self._truncate(n_past)  # leave the cache as it was
                raise RuntimeError(f"llama_decode failed with code {rc}")
            n_rows = len(chunk) if all_logits else int(last_chunk)
            if n_rows:
                out[row : row + n_rows] = self.read_logits(self._ctx, n_rows)
                row += n_rows
        return out

    def fill_inputs(self, batch, tokens: list[int]) -> None:
        """Put the tokens into ``batch`` (from 0): their ids, or their embeddings for a reduced model."""
        if self._embeddings is None:
            for i, tok in enumerate(tokens):
                batch.token[i] = tok
        else:
            rows = self._embeddings.rows(tokens)  # [n, n_embd] float32, C order
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)

    def new_batch(self, n_tokens: int, n_seq_max: int):
        """A ``llama_batch`` for this model's inputs (ids, or embeddings for a reduced model); free it."""
        n_embd = self._embeddings.n_embd if self._embeddings is not None else 0
        return self._llama_cpp.llama_batch_init(n_tokens, n_embd, n_seq_max)

    def read_logits(self, ctx, n_rows: int) -> np.ndarray:
        """``ctx``'s last decode's logits  # [n_rows, n_vocab] (a copy), full-vocabulary rows for a reduced model."""
        lc = self._llama_cpp
        width = self.n_vocab if self._vocabulary is None else self._vocabulary.size
        ptr = ctypes.cast(lc.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
        logits = np.ctypeslib.as_array(ptr, shape=(n_rows, width))
        if self._vocabulary is None:
            return logits.copy()
        return self._vocabulary.scatter(logits, self.n_vocab)

    def _truncate(self, n_tokens: int) -> None:
        self._llama_cpp.llama_memory_seq_rm(self._memory, -1, n_tokens, -1)

    # ---- token trees: one sequence per branch ----------------------------------------
    def _forward_tree(self, tokens: list[int], parents: list[int], depth: list[int]) -> np.ndarray:
        lc = self._llama_cpp
        if len(tokens) > self._n_batch:
            raise InternalError(f"a token tree may have at most {self._n_batch} tokens")
        n_past = len(self._tokens)
        branch_leaves = leaves(parents)
        seqs: list[list[int]] = [[] for _ in tokens]  # node -> branches (sequence ids) through it
        for b, leaf in enumerate(branch_leaves):
            node = leaf
            while node >= 0:
                seqs[node].append(b)
                node = parents[node]
        for b in range(1, len(branch_leaves)):  # every branch sees the committed prefix
            lc.llama_memory_seq_cp(self._memory, 0, b, -1, -1)
        batch = self._batch
        batch.n_tokens = len(tokens)
        self.fill_inputs(batch, tokens)
        for i in range(len(tokens)):
            batch.pos[i] = n_past + depth[i]
            batch.n_seq_id[i] = len(seqs[i])
            for j, s in enumerate(seqs[i]):
                batch.seq_id[i][j] = s
            batch.logits[i] = True
        rc = lc.llama_decode(self._ctx, batch)
        if rc != 0:
            self._drop_tree(n_branches=len(branch_leaves))
            raise RuntimeError(f"llama_decode failed with code {rc}")
        return self.read_logits(self._ctx, len(tokens))  # [n, vocab]

    def _keep_path(self, tokens: list[int], parents: list[int], path: list[int]) -> None:
        lc = self._llama_cpp
        n_past = len(self._tokens)
        branch_leaves = leaves(parents)
        end = path[-1] if path else None
        # a branch through the path's last node (its cells hold the whole path)
        through_end = (b for b, leaf in enumerate(branch_leaves) if end in path_to(parents, leaf))
        branch = 0 if end is None else next(through_end)
        if branch == 0:
            lc.llama_memory_seq_rm(self._memory, 0, n_past + len(path), -1)
        else:
            lc.llama_memory_seq_rm(self._memory, 0, n_past, -1)
            lc.llama_memory_seq_cp(self._memory, branch, 0, n_past, n_past + len(path))
        for b in range(1, len(branch_leaves)):
            lc.llama_memory_seq_rm(self._memory, b, -1, -1)

    def _drop_tree(self, n_branches: int) -> None:
        lc = self._llama_cpp
        n_past = len(self._tokens)
        lc.llama_memory_seq_rm(self._memory, 0, n_past, -1)
        for b in range(1, n_branches):
            lc.llama_memory_seq_rm(self._memory, b, -1, -1)

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            self._llama_cpp.llama_free(self._ctx)
            self._ctx = None
        for adapter in getattr(self, "_adapters", {}).values():  # before their model
            self._llama_cpp.llama_adapter_lora_free(adapter)
        self._adapters = {}
        if getattr(self, "_own_model", None):
            self._llama_cpp.llama_model_free(self._own_model)
            self._own_model = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
