"""The HTTP server: uvicorn serving the API as a task of the ``serve`` event loop.

TLS (mutual with ``tls_client_ca``), the port and the drain time are the service settings gRPC
uses; ``serve_http`` starts it and returns once the socket accepts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI

from teacher_server.auth import read_pem
from teacher_server.errors import TeacherError
from teacher_server.grpc_api import Drain
from teacher_server.http_api.routes import create_app

if TYPE_CHECKING:
    from teacher_server.service import ScoringService
    from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)


class HttpServerError(TeacherError):
    """The HTTP server could not start (port taken, unreadable certificates)."""


class HttpServer(uvicorn.Server):
    """uvicorn serving the app as a task of the running event loop.

    It installs no signal handlers: the ``serve`` process owns SIGTERM and stops it after the
    gRPC server and the service have drained (``stop``).
    """

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self._socket = sock
        self._task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    @property
    def port(self) -> int:
        """The bound port (the OS's pick when ``http_port`` is 0)."""
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        """Serve in the background; return once the socket accepts connections."""
        self._task = asyncio.create_task(self.serve(sockets=[self._socket]), name="teacher-http")
        while not self.started:
            if self._task.done():
                error = self._task.exception()
                raise HttpServerError(f"http_port: the HTTP server stopped while starting: {error!r}") from error
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (up to the drain timeout), then return."""
        self.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``HttpServerError`` naming ``http_port`` if taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise HttpServerError(f"http_port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def uvicorn_config(app: FastAPI, settings: ServerSettings) -> uvicorn.Config:
    """uvicorn settings from the service settings: TLS (mutual with ``tls_client_ca``), drain time."""
    tls: dict[str, Any] = {}
    if settings.tls_cert is not None and settings.tls_key is not None:
        read_pem(settings.tls_cert, "tls_cert")  # AuthConfigError naming the setting, not an ssl trace
        read_pem(settings.tls_key, "tls_key")
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
        if settings.tls_client_ca is not None:
            read_pem(settings.tls_client_ca, "tls_client_ca")
            tls.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        http="h11",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_timeout_s)),
        **tls,
    )


async def serve_http(service: ScoringService, settings: ServerSettings, *, drain: Drain | None = None) -> HttpServer:
    """Start the HTTP API of ``service`` on ``settings.host:settings.http_port`` in this event loop.

    Returns the running server (``.port``; ``await server.stop()`` on shutdown). Raises
    ``HttpServerError`` when the port is taken, ``AuthConfigError`` for unreadable certificates.
    """
    config = uvicorn_config(create_app(service, settings, drain=drain), settings)
    try:
        config.load()  # builds the TLS context now, so a bad certificate fails here
    except (OSError, ssl.SSLError) as exc:
        raise HttpServerError(f"tls_cert/tls_key: cannot set up TLS for HTTP: {exc}") from exc
    server = HttpServer(config, bind_socket(settings.host, settings.http_port))
    try:
        await server.start()
    except BaseException:
        server._socket.close()
        raise
    scheme = "https" if settings.tls_cert else "http"
    log.info(
        "teacher HTTP API on %s://%s:%d (page /, docs /docs, metrics /metrics)",
        scheme,
        settings.host,
        server.port,
        extra={"http_port": server.port, "scheme": scheme},
    )
    return server
