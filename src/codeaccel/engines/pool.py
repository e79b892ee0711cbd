"""Engines loaded once and shared: the draft models of every method in one benchmark run.

Loading a model costs seconds (llama.cpp) to minutes (transformers from GGUF), so
``speculative``, ``speculative-client-draft`` and ``hf-assisted`` in one run share one
draft engine. Sharing is safe because the harness runs them one after another (an
engine refuses a second thread while one is inside it) and every user of an engine
re-syncs its cache with ``prefill`` before use. The pool's owner closes it. A reduced
draft vocabulary (``--draft-vocab``, a pass over the general datastore) is ranked once
per pool too.
"""

from __future__ import annotations

from collections.abc import Callable

from codeaccel.engines import load_engine
from codeaccel.engines.base import Engine
from codeaccel.models.draft_vocab import DraftVocabulary


class EnginePool:
    def __init__(self) -> None:
        self._engines: dict[tuple, Engine] = {}
        self._vocabularies: dict[tuple, DraftVocabulary] = {}

    def get(
        self, model: str, engine: str, *, n_ctx: int, dtype: str, vocabulary: DraftVocabulary | None = None
    ) -> Engine:
        reduced = None if vocabulary is None else str(vocabulary.path)
        key = (model, engine, n_ctx, dtype if engine == "hf" else None, reduced)
        if key not in self._engines:
            self._engines[key] = load_engine(model, engine, n_ctx=n_ctx, dtype=dtype, vocabulary=vocabulary)
        return self._engines[key]

    def vocabulary(self, key: tuple, rank: Callable[[], DraftVocabulary]) -> DraftVocabulary:
        """The reduced draft vocabulary named by ``key``, ranked by ``rank`` once per pool (a datastore pass)."""
        if key not in self._vocabularies:
            self._vocabularies[key] = rank()
        return self._vocabularies[key]

    def reset(self) -> None:
        """Empty every engine's cache (so the next request pays its full prefill)."""
        for engine in self._engines.values():
            engine.reset()

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
