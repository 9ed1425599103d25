"""ASGI middleware of the HTTP API: request metrics, the request body limit, security headers.

Pure ASGI classes rather than ``BaseHTTPMiddleware``: the body limit must see the body as it
streams in (a chunked body has no Content-Length), and neither may buffer a response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from teacher_server.http_api.errors import HttpError

log = logging.getLogger(__name__)


class RequestMetricsMiddleware:
    """Counts every answer of ``paths`` by route and status, as the gRPC interceptor counts methods.

    Outermost, so that it sees the answers of everything inside (401, 413, 422, ...).
    """

    def __init__(self, app: ASGIApp, observe: Callable[[str, str], None], paths: frozenset[str]) -> None:
        self.app = app
        self.observe = observe
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes everything answers 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            try:
                self.observe(f"HTTP {scope['method']} {scope['path']}", str(status))
            except Exception:  # metrics must never break a request
                log.exception("recording HTTP metrics failed")


class BodyTooLargeError(HttpError):
    """413 naming ``max_message_bytes``."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        told = f"{size:,} bytes" if size is not None else "more than that"
        super().__init__(
            413,
            f"body: request body is {told}, over the limit of {limit:,} bytes (max_message_bytes)",
            code="INVALID_ARGUMENT",
            field="body",
        )


class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await BodyTooLargeError(self.limit, int(value)).response()(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # a chunked body: raised into the reading endpoint
                    raise BodyTooLargeError(self.limit)
            return message

        await self.app(scope, limited, send)


class SecurityHeadersMiddleware:
    """Adds ``headers`` to every HTTP answer that does not set them itself.

    The API's JSON (answers and errors alike) gets ``X-Content-Type-Options: nosniff``, so a
    browser never second-guesses it as HTML or script. A header a route sets wins: the page's and
    the docs' own Content-Security-Policy stay as they are.
    """

    def __init__(self, app: ASGIApp, headers: Mapping[str, str]) -> None:
        self.app = app
        self.headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                missing = [(name, value) for name, value in self.headers if name not in present]
                if missing:
                    message = {**message, "headers": [*message.get("headers", ()), *missing]}
            await send(message)

        await self.app(scope, receive, sending)
