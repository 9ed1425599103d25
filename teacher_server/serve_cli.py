"""``python -m teacher_server serve``: run the teacher service until SIGTERM / SIGINT.

Settings come from flags, ``HOIDISTILL_*`` variables and defaults, in that order (see
``teacher_server.settings``). The gRPC server (native API, KServe v2, health, reflection) listens
on ``--grpc-port``; ``--http-port`` serves Prometheus ``/metrics``. On SIGTERM: readiness off,
in-flight work drains (``--drain-timeout-s``), exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from teacher_server.errors import TeacherError

if TYPE_CHECKING:
    from teacher_server.settings import ServerSettings

log = logging.getLogger("teacher_server.serve")

HTTP_READ_TIMEOUT_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from teacher_server.settings import add_server_arguments

    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level of the server (default: %(default)s)",
    )
    add_server_arguments(parser)


class ServeError(TeacherError):
    """The service cannot start as configured (e.g. a port is taken)."""


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail fast, before the slow model load, when a configured port is already taken.

    A best-effort check (another process may still take the port before the servers bind; the
    gRPC server then fails the same way).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for name, port in ports.items():
        if port == 0:  # the OS picks a free one
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ServeError(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class MetricsHttpServer:
    """A minimal HTTP/1.1 server for ``GET /metrics`` (Prometheus text format), in the event loop.

    Stand-in until the FastAPI app of the HTTP issue takes over the HTTP port; one request per
    connection, anything else answers 404.
    """

    def __init__(self, render: Callable[[], tuple[bytes, str]]) -> None:
        self._render = render
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), HTTP_READ_TIMEOUT_S)
            while True:  # skip the headers: nothing in them changes the answer
                line = await asyncio.wait_for(reader.readline(), HTTP_READ_TIMEOUT_S)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            if path == "/metrics" and method in ("GET", "HEAD"):
                body, content_type = self._render()
                status = "200 OK"
            else:
                body, content_type = (
                    b"not found: this server answers GET /metrics\n",
                    "text/plain; charset=utf-8",
                )
                status = "404 Not Found"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass  # a slow or broken client: just hang up
        finally:
            writer.close()


async def serve(settings: ServerSettings) -> None:
    """Run the teacher with ``settings`` (a ``ServerSettings``) until SIGTERM or SIGINT."""
    from teacher_server.server import TeacherServer, serve_until_signalled

    server = TeacherServer(settings)  # loads the model: the slow part
    http = MetricsHttpServer(server.service.metrics.render)

    async def started(grpc_port: int) -> None:
        # ---- HTTP side (http_port) -------------------------------------------------------------
        # The FastAPI app of the HTTP issue (JSON scoring, web page, /metrics) starts HERE, in
        # this event loop (e.g. uvicorn.Server(...).serve() as a task) on settings.http_port,
        # replacing MetricsHttpServer. Until then only GET /metrics is served.
        await http.start(settings.host, settings.http_port)
        log.info("metrics on http://%s:%d/metrics", settings.host, http.port)
        print(f"teacher ready: grpc port {grpc_port}, http port {http.port}", flush=True)

    try:
        await serve_until_signalled(server, started=started)
    finally:
        await http.close()


def run(args: argparse.Namespace) -> int:
    from teacher_server.settings import settings_from_args

    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_from_args(args)
        check_ports_free(settings.host, {"grpc_port": settings.grpc_port, "http_port": settings.http_port})
        asyncio.run(serve(settings))
    except TeacherError as exc:  # bad settings, model not loadable, port taken: one clear line
        print(f"teacher serve: {exc}", file=sys.stderr)
        return 2
    return 0
