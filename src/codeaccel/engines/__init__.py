"""Engines: the models behind every decoding method.

The contract (``base``: evaluate tokens, rewind, token trees), its llama.cpp
(``llamacpp``) and transformers (``hf``) implementations, :func:`load_engine` here,
draft engines loaded once per run (``pool``), the measured cost of evaluating k
tokens at once (``cost_curve``) and what "the same tokenizer" means (``tokenizer``).
"""

from __future__ import annotations

from codeaccel.engines.base import Engine
from codeaccel.engines.hf import HFEngine
from codeaccel.engines.llamacpp import LlamaCppEngine
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


__all__ = ["ENGINES", "Engine", "load_engine"]
