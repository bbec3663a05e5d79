"""ASGI guards that run before any route: the API key, then the request body size cap.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so streaming responses and disconnect
detection pass through untouched. A request rejected here never reaches a route, let alone the
engine.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier.server.errors import OpenAIError

ADMIN_PATHS = frozenset({"/reset_prefix_cache"})
"""Outside `/v1` but behind the API key too: they change what the server holds."""


class ApiKeyMiddleware:
    """Every `/v1/*` request, and the admin routes, must carry `Authorization: Bearer <key>`
    (401 otherwise).

    Compared with `hmac.compare_digest`, so the time taken says nothing about the key.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1") or path in ADMIN_PATHS):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self._expected):
            error = OpenAIError(401, "invalid or missing API key: send 'Authorization: Bearer "
                                     "<key>'", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413, whether or not Content-Length is sent.

    The body is read (up to the cap) before the app runs and replayed to it; later `receive`
    calls go to the server, so the app still sees the client's disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = OpenAIError(413, f"the request body is larger than {self.max_bytes} bytes",
                            code="request_too_large", headers={"Connection": "close"})
        await error.response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
