"""Contexts of ``/v1/verify`` sessions: what a remote draft client and the server have committed.

Shared on purpose (every handler reads and writes it), owned by the server's state, thread-safe.
A session holds its token ids; the target's cache for them is the sequence the batch decoder kept
(its prefix cache finds it by the tokens), so a session costs memory only for its ids; a server
started with ``--no-prefix-cache`` keeps none, and each call evaluates its whole context again. Bounded:
a client ends its session when its text is done (``DELETE /v1/verify/{id}``), one idle for
``ttl_s`` is forgotten, and beyond ``max_sessions`` the least recently used one is (its client
then resends its context). A
session serves one call at a time: a second call while one is in flight is refused (409), since
the two would commit to the same text.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from codeaccel.serve.errors import APIError


class VerifySessions:
    def __init__(self, max_sessions: int = 1024, ttl_s: float = 600.0):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._contexts: OrderedDict[str, tuple[float, list[int]]] = OrderedDict()  # id -> (last used, tokens)
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._contexts)

    @contextmanager
    def call(self, session_id: str, context: Sequence[int] | None, append: Sequence[int]) -> Iterator[list[int]]:
        """The session's context for one call (``context`` restarts it), held busy until the call ends."""
        with self._lock:
            if session_id in self._busy:
                raise APIError(409, f"session {session_id!r} has a verification in progress", param="session_id",
                               code="session_busy")  # fmt: skip
            if context is None and session_id not in self._contexts:
                raise APIError(404, f"session {session_id!r} is not known here (expired or never started): send "
                                    "its context", param="session_id", code="session_not_found")  # fmt: skip
            held = list(context) if context is not None else self._contexts[session_id][1]
            self._busy.add(session_id)
        try:
            yield held + list(append)
        finally:
            with self._lock:
                self._busy.discard(session_id)

    def commit(self, session_id: str, context: Sequence[int]) -> None:
        """The session's context after a call: what it was given and the tokens returned."""
        now = time.monotonic()
        with self._lock:
            self._contexts[session_id] = (now, list(context))
            self._contexts.move_to_end(session_id)
            while len(self._contexts) > self.max_sessions:
                self._contexts.popitem(last=False)
            while self._contexts:  # oldest first: stop at the first one still in use
                oldest, (used, _) = next(iter(self._contexts.items()))
                if now - used <= self.ttl_s:
                    break
                del self._contexts[oldest]

    def end(self, session_id: str) -> bool:
        """Forget a session (its client is done); False if it was not known."""
        with self._lock:
            return self._contexts.pop(session_id, None) is not None
