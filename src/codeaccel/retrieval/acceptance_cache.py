"""A bounded cache of what the target produced after a context: context- and preference-aware drafting.

After every verification the speculative loop tells the drafter which tokens the
target committed after the context; the cache keys them by the context's last
``key_len`` tokens (LRU, at most ``max_entries`` keys). Next time that context
recurs (later in the same request, or in another request on the same repository)
the cached continuation is proposed, chained key by key up to k tokens, and merged
into the retrieval trie with a high weight: continuations the target accepted
before win over ones it has not seen.

Worked example (key_len 2): after ``self . side`` the target committed ``= side``;
the cache maps ``(., side) -> (=, side)``; after ``side = side`` it committed ``\\n``,
mapped from ``(=, side)``. A later context ending in ``self . side`` gets the chained
proposal ``= side \\n``.

The cache is shared on purpose, by every request of the method that owns it (what one
request taught the target's preferences serves the next), so every access holds its lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence


class AcceptanceCache:
    """Shared between requests, thread-safe (one lock around every read and write)."""

    def __init__(self, key_len: int = 3, max_entries: int = 100_000):
        self.key_len = key_len
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def record(self, context: Sequence[int], committed: Sequence[int]) -> None:
        """The target committed ``committed`` right after ``context``."""
        if len(context) < self.key_len or not committed:
            return
        key = tuple(int(t) for t in context[-self.key_len :])
        with self._lock:
            self._entries[key] = tuple(int(t) for t in committed)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def lookup(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens the target produced after this context before (chained); [] if unknown."""
        window = [int(t) for t in context[-self.key_len :]]
        out: list[int] = []
        with self._lock:
            while len(out) < k and len(window) >= self.key_len:
                key = tuple(window[-self.key_len :])
                cont = self._entries.get(key)
                if cont is None:
                    break
                self._entries.move_to_end(key)
                out.extend(cont[: k - len(out)])
                window.extend(cont)
        return out
