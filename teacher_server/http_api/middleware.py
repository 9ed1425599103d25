"""ASGI middleware of the HTTP API: request metrics and the request body limit.

Pure ASGI classes rather than ``BaseHTTPMiddleware``: the body limit must see the body as it
streams in (a chunked body has no Content-Length), and neither may buffer a response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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
