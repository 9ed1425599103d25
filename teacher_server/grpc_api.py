"""Native gRPC API ``hoidistill.teacher.v1.TeacherService`` on top of ``ScoringService``.

This module only translates: protobuf messages to ``ScoreItem`` and back, and teacher errors to
gRPC status codes (``rpc_failure``). Both that mapping and the lenient registration
(``add_lenient_service``: bytes that are not a valid request are INVALID_ARGUMENT) are shared with
the KServe servicer. Batching, caching and validation of the items live in the service.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.errors import (
    ImageRequiredError,
    InvalidInputError,
    ModelLoadError,
    OverloadedError,
    TeacherError,
)
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.region import Region
from teacher_server.service import ScoreItem, ShuttingDownError

if TYPE_CHECKING:
    from teacher_server.service import ItemResult, ScoringService

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["TeacherService"]
SERVICE_NAME = SERVICE.full_name  # hoidistill.teacher.v1.TeacherService
RETRY_AFTER_KEY = "retry-after-ms"
# Hint sent with UNAVAILABLE while the server starts or drains: another replica (or this one,
# restarted) should answer by then.
UNAVAILABLE_RETRY_MS = 1000
# Requests one ScoreStream may have in flight; past it the server stops reading the stream
# (gRPC flow control then slows the client down) instead of growing without bound.
DEFAULT_STREAM_INFLIGHT = 1024


class ServiceUnavailableError(TeacherError):
    """The service is not ready (starting) or draining: the client should retry later or elsewhere."""


@dataclass(frozen=True)
class RpcFailure:
    """A gRPC status for a failed request: code, message naming field and limit, retry hint."""

    code: grpc.StatusCode
    message: str
    field: str = ""
    retry_after_ms: int = 0

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_AFTER_KEY, str(self.retry_after_ms)),) if self.retry_after_ms else ()

    def as_status(self) -> pb.RequestStatus:
        return pb.RequestStatus(
            code=self.code.value[0],
            message=self.message,
            field=self.field,
            retry_after_ms=self.retry_after_ms,
        )


def rpc_failure(exc: BaseException, method: str) -> RpcFailure:
    """Map an exception raised while serving ``method`` to the status the client sees.

    Anything not raised on purpose (a bug, an engine crash) is logged with its traceback and
    answered INTERNAL; the server keeps serving.
    """
    if isinstance(exc, InvalidInputError):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc), field=exc.field)
    if isinstance(exc, ShuttingDownError):  # an OverloadedError, but retrying here is pointless
        retry_ms = max(1, math.ceil(exc.retry_after_s * 1000))
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, f"{method}: {exc}", retry_after_ms=retry_ms)
    if isinstance(exc, OverloadedError):
        retry_ms = max(1, math.ceil(exc.retry_after_s * 1000))
        return RpcFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry after {retry_ms} ms", retry_after_ms=retry_ms
        )
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError on Python >= 3.11
        return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: deadline exceeded before scoring finished")
    if isinstance(exc, ImageRequiredError):
        return RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, ServiceUnavailableError):
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, str(exc), retry_after_ms=UNAVAILABLE_RETRY_MS)
    if isinstance(exc, ModelLoadError):
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, f"{method}: model not available: {exc}")
    log.exception("%s failed unexpectedly", method, exc_info=exc)
    return RpcFailure(grpc.StatusCode.INTERNAL, f"{method}: internal error ({type(exc).__name__}); see server log")


async def abort(context: grpc.aio.ServicerContext, failure: RpcFailure) -> NoReturn:
    """End the call with ``failure`` (the retry hint goes into the trailing metadata)."""
    await context.abort(failure.code, failure.message, trailing_metadata=failure.trailing_metadata())
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def deadline_s(timeout_ms: int, context: grpc.aio.ServicerContext) -> float | None:
    """The tighter of the request's own budget and the call's gRPC deadline, in seconds."""
    budgets = [timeout_ms / 1000.0] if timeout_ms else []
    remaining = context.time_remaining()
    if remaining is not None:
        budgets.append(max(remaining, 0.0))
    return min(budgets) if budgets else None


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that failed to parse (e.g. a string field not UTF-8).

    Parsing leniently lets the servicer answer INVALID_ARGUMENT (and keep a stream open) where
    gRPC itself would answer an opaque UNKNOWN and log an ERROR traceback per message.
    ``string_fields`` names the message's string fields for the error (they must be UTF-8).
    """

    type_name: str
    error: str
    string_fields: str = ""


def lenient_parser(message_type: type[Any], string_fields: str = "") -> Callable[[bytes], Any]:
    """A request deserializer that returns ``Undecodable`` instead of raising on bad bytes."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            # A client's mistake, not the server's: no traceback, and only at DEBUG (a stream of
            # bad messages must not flood the log); the client gets the reason in its status.
            log.debug("undecodable %s request (%d bytes): %s", message_type.DESCRIPTOR.full_name, len(data), exc)
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc), string_fields)

    return parse


def undecodable_failure(request: Undecodable) -> RpcFailure:
    """INVALID_ARGUMENT for a request that did not parse, naming the message type and why."""
    fields = f" such as {request.string_fields}" if request.string_fields else ""
    return RpcFailure(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request: not a valid {request.type_name} ({request.error}); the bytes must be that protobuf "
        f"message, and string fields{fields} must be valid UTF-8",
        field="request",
    )


def _refusing_undecodable(behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    """A unary handler that answers an ``Undecodable`` request INVALID_ARGUMENT before ``behavior``."""

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await abort(context, undecodable_failure(request))
        return await behavior(request, context)

    return handle


def add_lenient_service(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any, *, string_fields: str = ""
) -> None:
    """Register every method of ``service`` (``servicer.<Method>``) with lenient request parsing.

    The one registration both the native API and KServe v2 use: a unary request that does not
    parse is answered INVALID_ARGUMENT here; a streaming method receives ``Undecodable`` in its
    request iterator and answers it in the stream, which stays open. ``string_fields`` names the
    request's string fields in that error.
    """
    handlers = {}
    for method in service.methods:
        parse = lenient_parser(GetMessageClass(method.input_type), string_fields)
        codec = {
            "request_deserializer": parse,
            "response_serializer": GetMessageClass(method.output_type).SerializeToString,
        }
        behavior = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behavior, **codec)
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(behavior, **codec)
        elif method.server_streaming:  # none so far: its generator would need the same guard
            raise NotImplementedError(f"{method.full_name}: server-streaming methods are not supported")
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_refusing_undecodable(behavior), **codec)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def score_items(request: pb.ScoreRequest) -> list[ScoreItem]:
    """Protobuf items -> service items; a missing digest is computed from the bytes sent.

    Raises ``InvalidInputError`` for a malformed region (named ``items[i].region.human_box``...).
    """
    items = []
    for index, item in enumerate(request.items):
        image = bytes(item.image) or None
        digest = item.digest or (image_digest(image) if image is not None else "")
        region = _region(item.region, f"items[{index}].region") if item.HasField("region") else None
        items.append(ScoreItem(digest=digest, image=image, sentences=tuple(item.sentences), region=region))
    return items


def _region(message: pb.Region, field: str) -> Region:
    for name in ("human_box", "object_box"):
        if len(getattr(message, name)) != 4:
            raise InvalidInputError(
                f"{field}.{name}", f"expected 4 values [x1, y1, x2, y2], got {len(getattr(message, name))}"
            )
    return Region.from_values([*message.human_box, *message.object_box], field=field)


def score_response(request_id: str, results: Sequence[ItemResult]) -> pb.ScoreResponse:
    response = pb.ScoreResponse(request_id=request_id, status=pb.RequestStatus(code=0))
    for result in results:
        out = response.items.add()
        if result.image_required:
            out.status = pb.ITEM_STATUS_IMAGE_REQUIRED
            continue
        out.status = pb.ITEM_STATUS_OK
        for logit, prob, cached in zip(result.match_logit, result.match_prob, result.cached, strict=True):
            out.scores.add(match_logit=logit, match_prob=prob, cached=cached)
    return response


def model_info_response(info: dict[str, Any], ready: bool) -> pb.GetModelInfoResponse:
    """``ScoringService.model_info()`` as a message; unknown keys are ignored, missing ones left 0."""
    limits = info.get("limits") or {}
    known_limits = pb.Limits()
    for name, value in limits.items():
        field = pb.Limits.DESCRIPTOR.fields_by_name.get(name)
        if field is not None:
            setattr(known_limits, name, float(value) if field.type == field.TYPE_FLOAT else int(value))
    return pb.GetModelInfoResponse(
        model_id=str(info.get("model_id", "")),
        fingerprint=str(info.get("fingerprint", "")),
        itm_start_token=str(info.get("itm_start_token", "")),
        dtype=str(info.get("dtype", "")),
        region_policy=str(info.get("region_policy", "")),
        limits=known_limits,
        ready=ready,
    )


class Drain:
    """Shutdown state shared by the servicers: once begun, new work is refused and streams close."""

    def __init__(self) -> None:
        self.active = False
        self._wakeups: set[asyncio.Queue] = set()

    def begin(self) -> None:
        self.active = True
        for queue in self._wakeups:
            queue.put_nowait(_WAKE)


_READ_DONE = object()  # the client half-closed the stream (or it broke)
_WAKE = object()  # re-check the drain flag


async def answer_stream(
    request_iterator: AsyncIterator[Any],
    answer: Callable[[Any], Awaitable[Any]],
    context: grpc.aio.ServicerContext,
    *,
    drain: Drain,
    limit: int,
    method: str,
) -> AsyncIterator[Any]:
    """Serve a bidirectional stream: answer every request concurrently, yield each response when ready.

    ``answer`` must not raise (a failing request is answered in its response). The stream ends OK
    once the client half-closed and everything is answered. On drain it stops early, once the
    requests already read are answered, and ends UNAVAILABLE so that the client reopens elsewhere.
    At most ``limit`` requests are in flight; past that the stream is not read (gRPC flow control
    then holds the client back).
    """
    responses: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(limit)
    tasks: set[asyncio.Task] = set()
    read_errors: list[Exception] = []
    pending = 0  # requests read whose response is not queued yet

    async def run(request: Any) -> None:
        nonlocal pending
        try:
            response = await answer(request)
        finally:
            slots.release()
        pending -= 1  # in the same step as the put: the writer never sees a gap
        responses.put_nowait(response)

    async def read() -> None:
        nonlocal pending
        try:
            async for request in request_iterator:
                await slots.acquire()
                pending += 1
                task = asyncio.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception as exc:  # the request stream broke: the writer re-raises it
            read_errors.append(exc)
        finally:
            responses.put_nowait(_READ_DONE)

    drain._wakeups.add(responses)
    reader = asyncio.create_task(read())
    reading = True
    try:
        while reading or pending or not responses.empty():
            if drain.active and not pending and responses.empty():
                break
            message = await responses.get()
            if message is _READ_DONE:
                reading = False
                if read_errors:
                    raise read_errors[0]
            elif message is not _WAKE:
                yield message
    finally:
        drain._wakeups.discard(responses)
        reader.cancel()
        for task in list(tasks):
            task.cancel()
    if reading:  # left because of the drain while the client may still be sending
        await abort(
            context,
            RpcFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"{method}: teacher is draining; reopen the stream (elsewhere)",
                retry_after_ms=UNAVAILABLE_RETRY_MS,
            ),
        )


def unavailable_reason(drain: Drain, service: ScoringService) -> str | None:
    """Why new work is refused right now (draining or not started), or None when it is accepted."""
    if drain.active:
        return f"teacher is draining (shutting down); retry in {UNAVAILABLE_RETRY_MS} ms, elsewhere"
    if not service.ready:
        return f"teacher is not ready yet; retry in {UNAVAILABLE_RETRY_MS} ms"
    return None


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    """Implements ``TeacherService``; register with ``add_teacher_servicer``."""

    def __init__(
        self,
        service: ScoringService,
        *,
        drain: Drain | None = None,
        stream_inflight: int = DEFAULT_STREAM_INFLIGHT,
    ) -> None:
        self._service = service
        self.drain = drain or Drain()
        self._stream_inflight = stream_inflight

    async def _score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        """Score one request; raises the teacher's errors (mapped by the callers)."""
        reason = unavailable_reason(self.drain, self._service)
        if reason is not None:
            raise ServiceUnavailableError(reason)
        results = await self._service.score(score_items(request), timeout_s=deadline_s(request.timeout_ms, context))
        return score_response(request.request_id, results)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        try:
            return await self._score(request, context)
        except Exception as exc:
            await abort(context, rpc_failure(exc, f"{SERVICE_NAME}/Score"))

    async def ScoreStream(
        self,
        request_iterator: AsyncIterator[pb.ScoreRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ScoreResponse]:
        async def answer(request: pb.ScoreRequest | Undecodable) -> pb.ScoreResponse:
            if isinstance(request, Undecodable):
                return pb.ScoreResponse(status=undecodable_failure(request).as_status())
            try:
                return await self._score(request, context)
            except Exception as exc:
                failure = rpc_failure(exc, f"{SERVICE_NAME}/ScoreStream")
                return pb.ScoreResponse(request_id=request.request_id, status=failure.as_status())

        responses = answer_stream(
            request_iterator,
            answer,
            context,
            drain=self.drain,
            limit=self._stream_inflight,
            method=f"{SERVICE_NAME}/ScoreStream",
        )
        async for response in responses:
            yield response

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
            return model_info_response(self._service.model_info(), self._service.ready and not self.drain.active)
        except Exception as exc:
            await abort(context, rpc_failure(exc, f"{SERVICE_NAME}/GetModelInfo"))


def add_teacher_servicer(servicer: TeacherServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` on ``server`` with lenient request parsing (see ``add_lenient_service``)."""
    add_lenient_service(server, SERVICE, servicer, string_fields="items[].sentences and items[].digest")
