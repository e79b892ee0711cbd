"""SpeCoder's completion cache: a prompt's accepted completion, answered again without the target.

An LRU of at most ``capacity`` entries keyed by everything that decides a completion (prompt
tokens, sampling settings, token limit, stop strings). Only reproducible requests are cached
(greedy, or sampling with a seed): a fresh sample must stay a fresh sample. Shared on purpose
by every request of a client or a server: thread-safe; its hit and miss counters are read by
the client's stats and the server's ``/metrics``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
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

    def put(self, key: CacheKey, completion: V) -> None:
        if not self.capacity or not key.reproducible:
            return
        with self._lock:
            self._entries[key] = completion
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
