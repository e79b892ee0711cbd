"""SpeCoder's completion cache: a prompt's accepted completion, answered again without the target.

An LRU of at most ``capacity`` entries keyed by everything that decides a completion (prompt
tokens, sampling settings, token limit, stop strings). Only reproducible requests are cached
(greedy, or sampling with a seed): a fresh sample must stay a fresh sample. Shared on purpose
by every request of a client or a server: thread-safe; its hit and miss counters are read by
the client's stats and the server's ``/metrics``. A client that runs once per completion (``codeaccel
client``) keeps its cache in a file between runs (:func:`load_completions`, :func:`save_completions`),
its entries valid only for the model that wrote them.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from codeaccel.decoding.sampling import SamplingParams
from codeaccel.errors import UserError


@dataclass(frozen=True)
class CacheKey:
    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]

    @classmethod
    def of(cls, prompt_tokens: Sequence[int], params: SamplingParams, max_tokens: int,
           stop: Sequence[str] = ()) -> CacheKey:  # fmt: skip
        return cls(tuple(prompt_tokens), params, max_tokens, tuple(stop))

    @property
    def reproducible(self) -> bool:
        return self.params.greedy or self.params.seed is not None


@dataclass(frozen=True)
class CachedCompletion:
    tokens: tuple[int, ...]
    text: str
    finish_reason: str


V = TypeVar("V")  # what a completion is stored as: CachedCompletion (client), a Generation (server)


class CompletionCache(Generic[V]):
    def __init__(self, capacity: int):
        if capacity < 0:
            raise UserError(f"the completion cache's size must be >= 0 (0: off), got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[CacheKey, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: CacheKey) -> V | None:
        """The stored completion (now the most recently used), or None; counts a hit or a miss."""
        if not self.capacity or not key.reproducible:
            return None
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def items(self) -> list[tuple[CacheKey, V]]:
        """The entries, least recently used first (a snapshot)."""
        with self._lock:
            return list(self._entries.items())

    def put(self, key: CacheKey, completion: V) -> None:
        if not self.capacity or not key.reproducible:
            return
        with self._lock:
            self._entries[key] = completion
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


CACHE_FILE_VERSION = 1


def load_completions(path: Path, capacity: int, model: str) -> CompletionCache[CachedCompletion]:
    """A cache holding what ``path`` kept for ``model`` (whatever decides a completion beyond its key: the
    target, and for seeded samples the draft too); a missing file, or one written for another, gives an
    empty cache; a file that is no cache file is a UserError naming it."""
    cache: CompletionCache[CachedCompletion] = CompletionCache(capacity)
    if not path.exists():
        return cache
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("version") != CACHE_FILE_VERSION or doc.get("model") != model:
            return cache
        for e in doc["entries"]:
            key = CacheKey(tuple(int(t) for t in e["prompt_tokens"]), SamplingParams(**e["params"]),
                           int(e["max_tokens"]), tuple(str(x) for x in e["stop"]))  # fmt: skip
            cache.put(key, CachedCompletion(tuple(int(t) for t in e["tokens"]), str(e["text"]), str(e["finish"])))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, UserError) as exc:
        raise UserError(
            f"{path} is not a completion cache file ({type(exc).__name__}): delete it or name another"
        ) from None
    return cache


def save_completions(cache: CompletionCache[CachedCompletion], path: Path, model: str) -> None:
    """Write the cache's entries for ``model`` to ``path`` (a new file renamed over the old: never half one)."""
    entries = [{"prompt_tokens": list(k.prompt_tokens), "params": asdict(k.params), "max_tokens": k.max_tokens,
                "stop": list(k.stop), "tokens": list(v.tokens), "text": v.text, "finish": v.finish_reason}
               for k, v in cache.items()]  # fmt: skip
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")  # one per writer
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_FILE_VERSION, "model": model, "entries": entries}, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
