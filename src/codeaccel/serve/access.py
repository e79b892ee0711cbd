"""Who may call the server, and what every request is counted as: an ASGI middleware.

A pure ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: under that one the handlers'
``request.is_disconnected()`` never sees the client go (it reads from a wrapped stream), so a
non-streaming request whose client disconnected would keep its sequence until ``max_tokens``.
Here the application reads the server's own ``receive``.

* With an API key configured, every path but ``/health`` and ``/metrics`` needs
  ``Authorization: Bearer <key>`` (compared in constant time); otherwise 401 with an
  OpenAI-style error body.
* Every response is counted by path (known routes only: bounded label values) and status, a
  request whose handler raised before answering as 500.
* ``replica``: its name in a header of every response (which Ray Serve replica answered).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Collection

from codeaccel.serve.errors import error_body

Count = Callable[[str, int], None]  # (path label, status)


class AccessAndCount:
    def __init__(self, app, *, api_key: str | None, count: Count, routes: Collection[str],
                 replica_header: tuple[str, str] | None = None):  # fmt: skip
        self.app = app
        self.api_key = api_key
        self.count = count
        self.routes = frozenset(routes)
        self.replica_header = (
            None if replica_header is None else (replica_header[0].lower().encode(), replica_header[1].encode())
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in self.routes else "other"
        if self.api_key and path not in ("/health", "/metrics") and not self._authorized(scope):
            self.count(label, 401)
            return await self._refuse(send)
        status = 500  # counted even when an exception escapes before an answer

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.replica_header is not None:
                    message = {**message, "headers": [*message.get("headers", []), self.replica_header]}
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.count(label, status)

    def _authorized(self, scope) -> bool:
        given = next((value for name, value in scope.get("headers") or [] if name == b"authorization"), b"")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())

    @staticmethod
    async def _refuse(send) -> None:
        body = json.dumps(error_body("a valid API key is required (Authorization: Bearer ...)",
                                     "authentication_error", code="invalid_api_key")).encode()  # fmt: skip
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
