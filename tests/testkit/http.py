"""The teacher's HTTP server for tests, in-process: its own asyncio loop in a background thread."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from teacher_server.grpc_api import Drain
from teacher_server.http_api.server import HttpServer, serve_http
from teacher_server.service import ScoringService
from teacher_server.settings import ServerSettings

T = TypeVar("T")


@dataclass
class RunningHttp:
    """A scoring service and its HTTP server, running in ``loop`` on a background thread."""

    settings: ServerSettings
    service: ScoringService
    server: HttpServer
    drain: Drain
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    stopped: bool = False

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.server.port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.service.metrics.value(name, labels)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True

        async def shutdown() -> None:
            await self.server.stop()
            await self.service.stop(drain_timeout_s=5)

        try:
            self.call(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


def start_http(
    settings: ServerSettings, *, start_service: bool = True, service: ScoringService | None = None
) -> RunningHttp:
    """Load the model of ``settings`` (unless ``service`` is given), start the service (unless told
    not to) and the HTTP server."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="http-test-loop", daemon=True)
    thread.start()
    drain = Drain()
    given = service

    async def build() -> tuple[ScoringService, HttpServer]:
        # Engines get the settings' limits.
        service = given if given is not None else ScoringService.from_settings(settings)
        if start_service:
            await service.start()
        try:
            return service, await serve_http(service, settings, drain=drain)
        except BaseException:
            await service.stop(drain_timeout_s=0)
            raise

    try:
        service, server = asyncio.run_coroutine_threadsafe(build(), loop).result(120)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        raise
    return RunningHttp(settings, service, server, drain, loop, thread)


@contextmanager
def running_http(
    settings: ServerSettings, *, start_service: bool = True, service: ScoringService | None = None
) -> Iterator[RunningHttp]:
    running = start_http(settings, start_service=start_service, service=service)
    try:
        yield running
    finally:
        running.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
