"""One ``grpc.aio`` server for the teacher: native API, KServe v2, health and reflection on one port.

``TeacherServer`` owns the lifecycle: ``start`` starts the scoring service, binds the port (TLS or
mutual TLS when configured), and marks health SERVING; ``stop`` is the graceful shutdown used on
SIGTERM: readiness off (health NOT_SERVING, KServe ServerReady false), new work refused, open
streams finish what they read and close, in-flight calls drain, then the service drains its queue.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from teacher_server import grpc_api, kserve
from teacher_server.auth import BearerTokenInterceptor, server_credentials
from teacher_server.errors import TeacherError

if TYPE_CHECKING:
    from teacher_server.service import ScoringService
    from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Services whose health is reported; "" is the whole server (what probes ask by default).
HEALTH_SERVICES = ("", grpc_api.SERVICE_NAME, kserve.SERVICE_NAME)


class ServerStartError(TeacherError):
    """The gRPC server could not start (port taken, bad address, unreadable certificates)."""


def package_version() -> str:
    try:
        return metadata.version("hoi-distill")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def bind_address(host: str, port: int) -> str:
    """``host:port`` for gRPC, with IPv6 literals bracketed (``[::]:50051``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _status_name(code: Any) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status a finished call answered with, as a gRPC code name."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()  # set by context.abort / set_code; None when the handler just returned
    if code is not None:
        return _status_name(code)
    return "OK" if error is None else "UNKNOWN"


class RequestMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every answered call by method and status code (``observe(method, code_name)``).

    Installed first, so it also sees calls that later interceptors (the token check) reject.
    """

    def __init__(self, observe: Callable[[str, str], None]) -> None:
        self._observe = observe

    def _record(self, method: str, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        try:
            self._observe(method, _final_code(context, error))
        except Exception:  # metrics must never break a call
            log.exception("recording metrics of %s failed", method)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = (handler_call_details.method or "").lstrip("/")
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._wrap_unary(method, handler.unary_unary), **codec)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._wrap_unary(method, handler.stream_unary), **codec)
        behavior = handler.unary_stream or handler.stream_stream
        if inspect.iscoroutinefunction(behavior):  # streams by context.write (e.g. health Watch)
            wrapped = self._wrap_unary(method, behavior)
        else:
            wrapped = self._wrap_stream(method, behavior)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(wrapped, **codec)
        return grpc.stream_stream_rpc_method_handler(wrapped, **codec)

    def _wrap_unary(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._record(method, context, error)

        return wrapped

    def _wrap_stream(self, method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            error: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._record(method, context, error)

        return wrapped


class TeacherServer:
    """The teacher's gRPC server over one ``ScoringService`` (created from settings when not given)."""

    def __init__(self, settings: ServerSettings, service: ScoringService | None = None) -> None:
        if service is None:
            from teacher_server.service import ScoringService

            service = ScoringService.from_settings(settings)
        self.settings = settings
        self.service = service
        self.drain = grpc_api.Drain()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._stopped = asyncio.Event()

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        interceptors: list[grpc.aio.ServerInterceptor] = [
            RequestMetricsInterceptor(self.service.metrics.observe_request)
        ]
        if self.settings.auth_token:
            interceptors.append(BearerTokenInterceptor(self.settings.auth_token))
        return interceptors

    def _build(self) -> grpc.aio.Server:
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=self._interceptors(),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # gRPC sets SO_REUSEPORT by default: a second server would silently share the port.
                ("grpc.so_reuseport", 0),
            ],
        )
        grpc_api.add_teacher_servicer(grpc_api.TeacherServicer(self.service, drain=self.drain), server)
        kserve.add_kserve_servicer(
            kserve.KServeServicer(self.service, drain=self.drain, server_version=package_version()), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (grpc_api.SERVICE_NAME, kserve.SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    async def start(self) -> int:
        """Start the service and the server; returns the bound gRPC port (useful with port 0)."""
        settings = self.settings
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        await self.service.start()
        server = self._build()
        address = bind_address(settings.host, settings.grpc_port)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            await self.service.stop(drain_timeout_s=0)
            raise ServerStartError(f"grpc_port: cannot listen on {address}: {exc}") from exc
        await server.start()
        self._server, self.port = server, port
        for name in HEALTH_SERVICES:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "teacher gRPC server on %s (%s%s); services: %s, %s, health, reflection",
            bind_address(settings.host, port),
            "TLS" if credentials is not None else "plain text",
            ", mutual TLS" if settings.tls_client_ca else "",
            grpc_api.SERVICE_NAME,
            kserve.SERVICE_NAME,
            extra={"grpc_port": port, "tls": credentials is not None, "mutual_tls": bool(settings.tls_client_ca)},
        )
        return port

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Graceful shutdown: readiness off, refuse new work, drain calls, then drain the service."""
        if self._server is None or self._stopped.is_set():
            return
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        log.info("teacher shutting down: readiness off, draining for up to %.1f s", timeout)
        self.drain.begin()
        await self._health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        started = loop.time()
        # In-flight calls finish (streams close once their read requests are answered); calls
        # still running after the grace period are cancelled.
        await self._server.stop(grace=timeout)
        await self.service.stop(drain_timeout_s=max(0.0, timeout - (loop.time() - started)))
        self._stopped.set()
        log.info("teacher stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve_until_signalled(
    server: TeacherServer,
    *,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    started: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Start ``server``, run until one of ``signals`` arrives, then shut it down gracefully.

    ``started(port)`` runs once the port is bound (the CLI starts the HTTP side there).
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    installed = []
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
        installed.append(sig)
    try:
        port = await server.start()
        if started is not None:
            await started(port)
        await stop_requested.wait()
        log.info("signal received: stopping")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop()
