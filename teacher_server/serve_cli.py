"""``python -m teacher_server serve``: run the teacher service until SIGTERM / SIGINT.

Settings come from flags, ``HOIDISTILL_*`` variables and defaults, in that order (see
``teacher_server.settings``). The gRPC server (native API, KServe v2, health, reflection) listens
on ``--grpc-port``; ``--http-port`` serves the HTTP API, the web page and Prometheus ``/metrics``.
On SIGTERM: readiness off, in-flight work drains (``--drain-timeout-s``), exit status 0. Logs go
to stderr as text or, with ``--log-format json``, as one JSON object per line
(``teacher_server.logs``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from typing import TYPE_CHECKING

from teacher_server.errors import TeacherError

if TYPE_CHECKING:
    from teacher_server.settings import ServerSettings

log = logging.getLogger("teacher_server.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per service setting (``--log-level`` and ``--log-format`` among them)."""
    from teacher_server.settings import add_server_arguments

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


async def serve(settings: ServerSettings) -> None:
    """Run the teacher with ``settings`` (a ``ServerSettings``) until SIGTERM or SIGINT."""
    from teacher_server.http_api.server import HttpServer, serve_http
    from teacher_server.server import TeacherServer, serve_until_signalled

    server = TeacherServer(settings)  # loads the model: the slow part
    http: HttpServer | None = None

    async def started(grpc_port: int) -> None:
        # HTTP API, web page and /metrics on http_port, in this event loop; it answers 503 once
        # the gRPC server's drain begins (shared Drain), and stops after the service drained.
        nonlocal http
        http = await serve_http(server.service, settings, drain=server.drain)
        print(f"teacher ready: grpc port {grpc_port}, http port {http.port}", flush=True)

    try:
        await serve_until_signalled(server, started=started)
    finally:
        if http is not None:
            await http.stop()


def run(args: argparse.Namespace) -> int:
    from teacher_server.logs import configure_logging
    from teacher_server.settings import settings_from_args

    try:
        settings = settings_from_args(args)
        configure_logging(settings.log_level, settings.log_format)
        check_ports_free(settings.host, {"grpc_port": settings.grpc_port, "http_port": settings.http_port})
        asyncio.run(serve(settings))
    except TeacherError as exc:  # bad settings, model not loadable, port taken: one clear line
        print(f"teacher serve: {exc}", file=sys.stderr)
        return 2
    return 0
