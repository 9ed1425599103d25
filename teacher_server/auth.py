"""Who may call the teacher: a bearer-token server interceptor and TLS / mutual-TLS credentials.

The token travels as gRPC metadata ``authorization: Bearer <token>`` (what ``TeacherClient(token=...)``
and ``tritonclient``'s ``headers={"authorization": "Bearer ..."}`` send). Health checks stay open so
that load balancers and Kubernetes gRPC probes, which cannot send metadata, still see the server.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from teacher_server.errors import TeacherError

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "bearer "
# Methods callable without a token: liveness/readiness probes cannot send metadata. They answer
# "alive" / "ready" and nothing else, so leaving them open tells a caller nothing it could not
# learn by connecting. KServe v2's probes (Triton's ServerLive / ServerReady) are the same kind;
# its ModelReady and metadata calls are not opened (they name the model).
DEFAULT_OPEN_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


class AuthConfigError(TeacherError):
    """TLS or token settings are incomplete or unreadable (names the setting and the file)."""


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None when absent."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION_KEY:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if text[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            return text[len(BEARER_PREFIX) :].strip()
        return None
    return None


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED without running it."""

    async def reject(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def reject_streaming(_request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(reject, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(reject_streaming, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(reject, **codec)
    return grpc.stream_stream_rpc_method_handler(reject_streaming, **codec)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call without the right bearer token with ``UNAUTHENTICATED``.

    Methods whose full name starts with one of ``open_prefixes`` skip the check. Tokens are
    compared in constant time.
    """

    def __init__(self, token: str, *, open_prefixes: Sequence[str] = DEFAULT_OPEN_PREFIXES) -> None:
        if not token:
            raise AuthConfigError("auth_token: an empty token would accept everyone; unset it instead")
        self._token = token.encode("utf-8")
        self._open_prefixes = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self._open_prefixes):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _rejecting_handler(
                handler, f"{method}: missing bearer token: send metadata 'authorization: Bearer <token>'"
            )
        if not hmac.compare_digest(token.encode("utf-8"), self._token):
            return _rejecting_handler(handler, f"{method}: invalid bearer token")
        return handler


def read_pem(path: str | Path, setting: str) -> bytes:
    """The bytes of a PEM file, or AuthConfigError naming the setting and the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise AuthConfigError(f"{setting}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(
    cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials for the server, or None for plain text when neither cert nor key is set.

    With ``client_ca`` the server requires and verifies a client certificate (mutual TLS).
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise AuthConfigError("tls_client_ca: mutual TLS needs tls_cert and tls_key as well")
        return None
    if cert is None or key is None:
        missing = "tls_cert" if cert is None else "tls_key"
        raise AuthConfigError(f"{missing}: TLS needs both tls_cert and tls_key")
    pair = (read_pem(key, "tls_key"), read_pem(cert, "tls_cert"))
    root = read_pem(client_ca, "tls_client_ca") if client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)
