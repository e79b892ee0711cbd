"""Engines: the models behind every decoding method.

The contract (``base``: evaluate tokens, rewind, token trees), its llama.cpp
(``llamacpp``) and transformers (``hf``) implementations, :func:`load_engine` here,
several sequences evaluated in one batch (``sequences``: the contract and a sequential
fallback; ``llamacpp_sequences``, ``hf_sequences``; :func:`open_sequences` here),
draft engines loaded once per run (``pool``), the measured cost of evaluating k
tokens at once (``cost_curve``), what "the same tokenizer" means (``tokenizer``) and
where a long text may be cut for llama.cpp to tokenize it in linear time (``markup_split``).
"""

from __future__ import annotations

from codeaccel.engines.base import Engine
from codeaccel.engines.hf import HFEngine
from codeaccel.engines.hf_sequences import HFSequences
from codeaccel.engines.llamacpp import LlamaCppEngine
from codeaccel.engines.llamacpp_sequences import LlamaCppSequences
from codeaccel.engines.sequences import SequenceSet, SequentialSequences
from codeaccel.errors import UserError
from codeaccel.models.draft_vocab import DraftVocabulary
from codeaccel.models.registry import resolve_model

ENGINES = ("llama.cpp", "hf")


def load_engine(
    model: str,
    engine: str = "llama.cpp",
    *,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    dtype: str = "bfloat16",
    vocabulary: DraftVocabulary | None = None,
) -> Engine:
    """Load ``model`` (bundled name, GGUF path or HF directory) on the named engine.

    ``dtype`` applies to the hf engine only; llama.cpp runs the GGUF's own quantisation.
    ``vocabulary``: the model's output layer cut to these tokens (a draft model only;
    llama.cpp only).
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    source = resolve_model(model)
    if engine == "llama.cpp":
        if source.kind != "gguf":
            raise UserError(f"the llama.cpp engine needs a GGUF file; {source.path} is a {source.kind} model")
        return LlamaCppEngine(
            source.path, model_name=source.name, n_ctx=n_ctx, n_threads=n_threads, vocabulary=vocabulary
        )
    if vocabulary is not None:
        raise UserError("a reduced draft vocabulary (--draft-vocab) needs the llama.cpp draft engine")
    return HFEngine(source.path, model_name=source.name, dtype=dtype, n_ctx=n_ctx, n_threads=n_threads)


def open_sequences(engine: Engine, n_seq_max: int, n_ctx: int | None = None, unified: bool = True) -> SequenceSet:
    """A multi-sequence cache on ``engine``'s model: up to ``n_seq_max`` sequences, ``n_ctx`` cells in all.

    ``unified``: one pool of cells, copies of a sequence sharing its cells (many samples of one
    prompt); False: ``n_ctx / n_seq_max`` cells per sequence, each attending over its own only
    (many independent requests; llama.cpp only, the others keep per-sequence caches anyway).
    llama.cpp: a context of its own sharing the engine's weights; hf: batched forward
    passes over per-sequence caches; any other engine: its sequences one after another.
    Free the set (``free()`` or a ``with`` block) before closing the engine.
    """
    n_ctx = n_ctx or engine.n_ctx
    if isinstance(engine, LlamaCppEngine):
        return LlamaCppSequences(engine, n_seq_max=n_seq_max, n_ctx=n_ctx, n_threads=engine.n_threads, unified=unified)
    if isinstance(engine, HFEngine):
        return HFSequences(engine, n_seq_max=n_seq_max, n_ctx=min(n_ctx, engine.n_ctx))
    return SequentialSequences(engine, n_seq_max=n_seq_max)


__all__ = ["ENGINES", "Engine", "SequenceSet", "load_engine", "open_sequences"]
