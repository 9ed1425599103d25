"""Client of the teacher's native gRPC API: sync ``TeacherClient`` and asyncio ``AsyncTeacherClient``.

Importable with only grpcio and protobuf installed (no torch): trainers and tools use it anywhere.

Scoring is digest-first: a request names each image by its SHA-256 only; the items the teacher
answers IMAGE_REQUIRED (neither their scores cached nor the image held) are sent again with their
bytes. Calls that fail with UNAVAILABLE or RESOURCE_EXHAUSTED are retried with exponential
back-off and jitter, never sooner than the server's ``retry-after-ms`` hint, within the call's
time budget; so is a call the server cancelled (a replica shutting down cancels the calls it
had not started). With several replicas in one target (``ipv4:10.0.0.5:50051,10.0.0.6:50051``
or a ``dns:///`` name), gRPC's round_robin sends the retry to a replica that is up. Example::

    with TeacherClient("localhost:50051") as teacher:
        scores = teacher.score(["cat.jpg"], [["a person pet a cat", "a person ride a cat"]])
        print(scores[0][0].match_prob)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.errors import TeacherError
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.region import Region

ImageSource = bytes | str | os.PathLike
# A human-object pair: a Region, or its eight numbers (human x1, y1, x2, y2, object x1, y1, x2, y2).
RegionSource = Region | Sequence[float] | None


def as_region(source: RegionSource, *, field: str = "region") -> Region | None:
    """A ``Region`` from what a caller passed (None stays None); ``InvalidInputError`` names ``field``."""
    if source is None or isinstance(source, Region):
        return source
    return Region.from_values(source, field=field)


def _region_message(region: Region | None) -> pb.Region | None:
    return None if region is None else pb.Region(human_box=region.human, object_box=region.object)


PemSource = bytes | str | os.PathLike
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
RETRY_AFTER_KEY = "retry-after-ms"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_BACKOFF_S = 10.0
# gRPC's texts for calls this process cancelled itself (grpc/_channel.py, grpc/aio/_call.py).
_LOCAL_CANCEL_DETAILS = frozenset({"Locally cancelled by application!", "Channel closed!"})
# grpc.aio's text when writing to a stream that already ended (grpc/aio/_call.py, _write).
_ENDED_STREAM_DETAILS = "Internal error from Core"
# Room left in a message for everything but image bytes (digests, sentences, framing).
_MESSAGE_HEADROOM = 64 * 1024


@dataclass(frozen=True)
class TeacherScore:
    """The teacher's score of one (image, sentence) pair."""

    match_logit: float  # z = l_match - l_nomatch
    match_prob: float  # softmax(l)[match]
    cached: bool  # served from the score cache


@dataclass(frozen=True)
class ModelInfo:
    """What ``GetModelInfo`` says: which model answers and the request limits."""

    model_id: str
    fingerprint: str
    itm_start_token: str
    dtype: str
    limits: dict[str, int]
    ready: bool
    region_policy: str = ""
    """How the teacher shows an item's region (``crop:margin=0.1``, ``mask:dim=0.8``); "" = an
    older teacher that knows no regions."""


class TeacherRpcError(TeacherError):
    """A call failed: ``code`` is the gRPC status (``INVALID_ARGUMENT``...), ``details`` the server's text."""

    def __init__(self, code: grpc.StatusCode, details: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s


# ---------------------------------------------------------------------------------------- helpers
def parse_target(target: str) -> tuple[str, bool | None]:
    """``grpc://h:p`` -> (``h:p``, plain text); ``grpcs://h:p`` -> (``h:p``, TLS); else (target, None)."""
    for scheme, secure in (("grpcs://", True), ("grpc://", False)):
        if target.startswith(scheme):
            address = target[len(scheme) :].rstrip("/")
            if not address:
                raise ValueError(f"target {target!r} has no host:port after {scheme}")
            return address, secure
    if "://" in target and not target.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        raise ValueError(f"target {target!r}: use host:port, grpc://host:port or grpcs://host:port")
    return target, None


def _read_pem(source: PemSource | None, name: str) -> bytes | None:
    """PEM bytes given directly, as text, or as a file path."""
    if source is None or isinstance(source, bytes):
        return source
    text = os.fspath(source)
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode("ascii")
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {text}: {exc.strerror or exc}") from exc


def _channel_credentials(
    secure: bool | None, root: PemSource | None, cert: PemSource | None, key: PemSource | None
) -> grpc.ChannelCredentials | None:
    if (cert is None) != (key is None):
        raise ValueError("client_cert and client_key go together (mutual TLS needs both)")
    wants_tls = root is not None or cert is not None
    if secure is False and wants_tls:
        raise ValueError("a grpc:// (plain-text) target cannot use root_certificates or a client certificate")
    if not (secure or wants_tls):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(root, "root_certificates"),
        private_key=_read_pem(key, "client_key"),
        certificate_chain=_read_pem(cert, "client_cert"),
    )


def load_image(source: ImageSource, index: int) -> bytes:
    """Image file bytes from bytes or a path."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ValueError(f"images[{index}]: cannot read {source}: {exc.strerror or exc}") from exc


def _retry_after_s(metadata: Iterable[Any] | None) -> float | None:
    for entry in metadata or ():
        key, value = entry[0], entry[1]
        if key == RETRY_AFTER_KEY:
            try:
                return int(value) / 1000.0
            except (TypeError, ValueError):
                return None
    return None


def _rpc_error(error: grpc.RpcError, metadata: Iterable[Any] | None) -> TeacherRpcError:
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.CANCELLED and details not in _LOCAL_CANCEL_DETAILS:
        # Not cancelled here (this client's own deadline ends a call with DEADLINE_EXCEEDED): a
        # server shutting down cancels the calls it accepted but had not started. They were never
        # answered, so another replica may take them: retried as UNAVAILABLE.
        code, details = grpc.StatusCode.UNAVAILABLE, f"the server cancelled the call ({details}): shutting down?"
    elif code == grpc.StatusCode.INTERNAL and details == _ENDED_STREAM_DETAILS:
        # grpc.aio's own status for a write on a stream that had already ended (the server closed
        # it): the request never reached it. Retried as UNAVAILABLE, on a new stream.
        code, details = grpc.StatusCode.UNAVAILABLE, "the stream ended under a write (server shutting down?)"
    return TeacherRpcError(code, details, retry_after_s=_retry_after_s(metadata))


def _status_error(status: pb.RequestStatus) -> TeacherRpcError:
    try:
        code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    except StopIteration:
        code = grpc.StatusCode.UNKNOWN
    retry = status.retry_after_ms / 1000.0 if status.retry_after_ms else None
    return TeacherRpcError(code, status.message, retry_after_s=retry)


def _model_info(response: pb.GetModelInfoResponse) -> ModelInfo:
    limits = {f.name: getattr(response.limits, f.name) for f in pb.Limits.DESCRIPTOR.fields}
    return ModelInfo(
        response.model_id,
        response.fingerprint,
        response.itm_start_token,
        response.dtype,
        limits,
        response.ready,
        response.region_policy,
    )


@dataclass
class _Retry:
    """Back-off policy: ``backoff_s * 2**attempt`` with ±50 % jitter, at least the server's hint."""

    max_retries: int
    backoff_s: float
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, error: TeacherRpcError, deadline: float) -> float | None:
        """Seconds to wait before retrying, or None to give up (not retryable, out of tries or time)."""
        if error.code not in RETRYABLE or attempt >= self.max_retries:
            return None
        wait = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S) * self.rng.uniform(0.5, 1.5)
        if error.retry_after_s is not None:
            wait = max(wait, error.retry_after_s)
        if time.monotonic() + wait >= deadline:
            return None
        return wait


@dataclass
class _ScoreJob:
    """The protocol-level plan of one ``score`` call, shared by the sync and async clients.

    Items are cut into requests of at most ``per_request`` images; digest-only first, then the
    items answered IMAGE_REQUIRED again with bytes, in requests kept under the message limit.
    """

    blobs: list[bytes]
    digests: list[str]
    sentences: list[tuple[str, ...]]
    regions: list[Region | None]
    per_request: int
    max_message_bytes: int
    results: list[list[TeacherScore] | None] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        images: Sequence[ImageSource],
        sentences: Sequence[Sequence[str]],
        per_request: int,
        max_bytes: int,
        regions: Sequence[RegionSource] | None = None,
    ) -> _ScoreJob:
        if len(images) != len(sentences):
            raise ValueError(f"{len(images)} images but {len(sentences)} sentence lists: one list per image")
        if regions is None:
            regions = [None] * len(images)
        if len(regions) != len(images):
            raise ValueError(f"{len(images)} images but {len(regions)} regions: one region (or None) per image")
        texts = []
        for index, group in enumerate(sentences):
            if isinstance(group, str):
                raise ValueError(f"sentences[{index}] is a str; pass a list of sentences per image")
            texts.append(tuple(group))
        blobs = [load_image(image, index) for index, image in enumerate(images)]
        digests = [image_digest(blob) for blob in blobs]
        results: list[list[TeacherScore] | None] = [[] if not group else None for group in texts]
        parsed = [as_region(region, field=f"regions[{index}]") for index, region in enumerate(regions)]
        return cls(blobs, digests, texts, parsed, max(1, per_request), max_bytes, results)

    def _request(self, indices: Sequence[int], with_bytes: bool) -> pb.ScoreRequest:
        return pb.ScoreRequest(
            items=[
                pb.ImageSentences(
                    digest=self.digests[i],
                    image=self.blobs[i] if with_bytes else b"",
                    sentences=self.sentences[i],
                    region=_region_message(self.regions[i]),
                )
                for i in indices
            ]
        )

    def digest_requests(self) -> list[tuple[list[int], pb.ScoreRequest]]:
        todo = [i for i, result in enumerate(self.results) if result is None]
        chunks = [todo[start : start + self.per_request] for start in range(0, len(todo), self.per_request)]
        return [(chunk, self._request(chunk, with_bytes=False)) for chunk in chunks]

    def byte_requests(self, indices: Sequence[int]) -> list[tuple[list[int], pb.ScoreRequest]]:
        budget = max(1, self.max_message_bytes - _MESSAGE_HEADROOM)
        chunks: list[list[int]] = []
        size = 0
        for index in indices:
            blob_size = len(self.blobs[index]) + sum(len(s) + 8 for s in self.sentences[index])
            if not chunks or len(chunks[-1]) >= self.per_request or size + blob_size > budget:
                chunks.append([])
                size = 0
            chunks[-1].append(index)
            size += blob_size
        return [(chunk, self._request(chunk, with_bytes=True)) for chunk in chunks]

    def accept(self, indices: Sequence[int], response: pb.ScoreResponse, with_bytes: bool) -> list[int]:
        """Store the scores of ``response``; returns the indices that need their bytes sent."""
        if response.status.code != 0:
            raise _status_error(response.status)
        if len(response.items) != len(indices):
            raise TeacherRpcError(
                grpc.StatusCode.INTERNAL,
                f"server answered {len(response.items)} items for {len(indices)} sent",
            )
        missing = []
        for index, item in zip(indices, response.items, strict=True):
            if item.status == pb.ITEM_STATUS_OK and len(item.scores) == len(self.sentences[index]):
                self.results[index] = [TeacherScore(s.match_logit, s.match_prob, s.cached) for s in item.scores]
            elif item.status == pb.ITEM_STATUS_IMAGE_REQUIRED and not with_bytes:
                missing.append(index)
            else:
                raise TeacherRpcError(
                    grpc.StatusCode.INTERNAL,
                    f"server answered images[{index}] with status {pb.ItemStatus.Name(item.status)} and "
                    f"{len(item.scores)} scores for {len(self.sentences[index])} sentences",
                )
        return missing

    def finished(self) -> list[list[TeacherScore]]:
        assert all(result is not None for result in self.results)
        return [list(result or ()) for result in self.results]


class _ClientConfig:
    """Settings shared by both clients: target, credentials, metadata, limits, retries."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        root_certificates: PemSource | None,
        client_cert: PemSource | None,
        client_key: PemSource | None,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        max_message_bytes: int,
        max_images_per_request: int | None,
    ) -> None:
        self.address, secure = parse_target(target)
        self.credentials = _channel_credentials(secure, root_certificates, client_cert, client_key)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s
        self.retry = _Retry(max_retries, backoff_s)
        self.max_message_bytes = max_message_bytes
        self.max_images_per_request = max_images_per_request
        self.options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # With a dns:/// target naming several replicas (a headless Kubernetes Service), spread
            # calls over all of them; with one address this changes nothing.
            ("grpc.lb_policy_name", "round_robin"),
        ]

    def deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TeacherRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "client deadline passed before the call finished")
    return remaining


# ------------------------------------------------------------------------------------ sync client
class TeacherClient:
    """Blocking client of ``hoidistill.teacher.v1.TeacherService``. Thread-safe.

    ``target``: ``host:port``, ``grpc://host:port`` (plain text) or ``grpcs://host:port`` (TLS;
    system roots unless ``root_certificates``). ``token`` is sent as ``authorization: Bearer``.
    PEM arguments take bytes, PEM text or a file path. ``timeout_s`` bounds each ``score`` call,
    retries included. ``max_images_per_request`` defaults to the server's limit (asked once).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.2,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_images_per_request: int | None = None,
    ) -> None:
        self._config = _ClientConfig(
            target,
            token=token,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_message_bytes=max_message_bytes,
            max_images_per_request=max_images_per_request,
        )
        config = self._config
        if config.credentials is None:
            self._channel = grpc.insecure_channel(config.address, options=config.options)
        else:
            self._channel = grpc.secure_channel(config.address, config.credentials, options=config.options)
        self._stub = pb_grpc.TeacherServiceStub(self._channel)
        self._lock = threading.Lock()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any, deadline: float) -> Any:
        """One RPC with retries on UNAVAILABLE / RESOURCE_EXHAUSTED (also when answered in a status)."""
        for attempt in itertools.count():
            try:
                response = method(request, timeout=_remaining(deadline), metadata=self._config.metadata)
                status = getattr(response, "status", None)
                if status is not None and status.code != 0:
                    raise _status_error(status)
                return response
            except grpc.RpcError as exc:
                error = _rpc_error(exc, exc.trailing_metadata())
            except TeacherRpcError as exc:
                error = exc
            wait = self._config.retry.delay(attempt, error, deadline)
            if wait is None:
                raise error
            time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """Model id, fingerprint, ITM start token, dtype and request limits of the server."""
        deadline = self._config.deadline(timeout_s)
        return _model_info(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), deadline))

    def _per_request(self, deadline: float) -> int:
        with self._lock:
            if self._config.max_images_per_request is None:
                limit = self.model_info(timeout_s=_remaining(deadline)).limits["max_images_per_request"]
                self._config.max_images_per_request = limit or 64
            return self._config.max_images_per_request

    def score(
        self,
        images: Sequence[ImageSource],
        sentences: Sequence[Sequence[str]],
        *,
        timeout_s: float | None = None,
        regions: Sequence[RegionSource] | None = None,
    ) -> list[list[TeacherScore]]:
        """Scores of ``sentences[i][j]`` against ``images[i]`` (bytes or a file path), as ``[i][j]``.

        ``regions[i]`` (optional): score image i's sentences on that human-object pair instead of
        the whole image (a ``Region`` or eight numbers in pixels of the image; None = whole image).
        """
        deadline = self._config.deadline(timeout_s)
        job = _ScoreJob.build(images, sentences, self._per_request(deadline), self._config.max_message_bytes, regions)
        for indices, request in job.digest_requests():
            missing = job.accept(indices, self._call(self._stub.Score, request, deadline), with_bytes=False)
            for resend, with_bytes in job.byte_requests(missing):
                job.accept(resend, self._call(self._stub.Score, with_bytes, deadline), with_bytes=True)
        return job.finished()


# ----------------------------------------------------------------------------------- async client
class _ScoreStreamSession:
    """One open ``ScoreStream``: requests written with fresh ids, responses routed to their futures."""

    def __init__(self, stub: pb_grpc.TeacherServiceStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self._call = stub.ScoreStream(metadata=metadata)
        self._pending: dict[str, asyncio.Future[pb.ScoreResponse]] = {}
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()
        self._failure: TeacherRpcError | None = None
        self._reader = asyncio.create_task(self._read())

    @property
    def broken(self) -> bool:
        return self._failure is not None

    async def _read(self) -> None:
        try:
            async for response in self._call:
                future = self._pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
            error = TeacherRpcError(grpc.StatusCode.UNAVAILABLE, "the server closed the score stream")
        except grpc.aio.AioRpcError as exc:
            error = _rpc_error(exc, exc.trailing_metadata())
        except asyncio.CancelledError:
            error = TeacherRpcError(grpc.StatusCode.CANCELLED, "the score stream was closed by the client")
        self._failure = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    async def score(self, request: pb.ScoreRequest, timeout_s: float) -> pb.ScoreResponse:
        if self._failure is not None:
            raise self._failure
        request_id = str(next(self._ids))
        request.request_id = request_id
        request.timeout_ms = max(1, int(timeout_s * 1000))
        future: asyncio.Future[pb.ScoreResponse] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with self._write_lock:
                await self._call.write(request)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise TeacherRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer on the score stream in time") from None
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            # The stream died under the write; the reader reports why.
            await asyncio.sleep(0)
            raise self._failure or TeacherRpcError(grpc.StatusCode.UNAVAILABLE, "score stream broke") from None
        finally:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by the reader after the write failed: already reported

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class AsyncTeacherClient:
    """asyncio client; the same arguments as ``TeacherClient`` plus ``use_stream``.

    With ``use_stream=True`` (the default) all ``score`` calls of this client share one
    ``ScoreStream``: many requests in flight on one HTTP/2 stream, each answered by id as soon as
    it is done. A broken stream is reopened by the next call (after the back-off). With
    ``use_stream=False`` each request is a unary ``Score`` call. Create it inside a running loop.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.2,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_images_per_request: int | None = None,
        use_stream: bool = True,
    ) -> None:
        self._config = _ClientConfig(
            target,
            token=token,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_message_bytes=max_message_bytes,
            max_images_per_request=max_images_per_request,
        )
        config = self._config
        if config.credentials is None:
            self._channel = grpc.aio.insecure_channel(config.address, options=config.options)
        else:
            self._channel = grpc.aio.secure_channel(config.address, config.credentials, options=config.options)
        self._stub = pb_grpc.TeacherServiceStub(self._channel)
        self._use_stream = use_stream
        self._session: _ScoreStreamSession | None = None
        self._limits_lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._channel.close()

    async def _attempts(self, once: Callable[[float], Any], deadline: float) -> Any:
        """Run ``once(remaining_s)`` with retries on UNAVAILABLE / RESOURCE_EXHAUSTED."""
        for attempt in itertools.count():
            try:
                response = await once(_remaining(deadline))
                status = getattr(response, "status", None)
                if status is not None and status.code != 0:
                    raise _status_error(status)
                return response
            except grpc.aio.AioRpcError as exc:
                error = _rpc_error(exc, exc.trailing_metadata())
            except TeacherRpcError as exc:
                error = exc
            wait = self._config.retry.delay(attempt, error, deadline)
            if wait is None:
                raise error
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        """Model id, fingerprint, ITM start token, dtype and request limits of the server."""

        async def once(remaining: float) -> pb.GetModelInfoResponse:
            return await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=remaining, metadata=self._config.metadata
            )

        return _model_info(await self._attempts(once, self._config.deadline(timeout_s)))

    async def _send(self, request: pb.ScoreRequest, deadline: float) -> pb.ScoreResponse:
        async def unary(remaining: float) -> pb.ScoreResponse:
            return await self._stub.Score(request, timeout=remaining, metadata=self._config.metadata)

        async def streamed(remaining: float) -> pb.ScoreResponse:
            session = self._session
            if session is None or session.broken:
                # Replace before awaiting anything, so concurrent calls share the one new stream.
                old, session = session, _ScoreStreamSession(self._stub, self._config.metadata)
                self._session = session
                if old is not None:
                    await old.close()
            return await session.score(request, remaining)

        return await self._attempts(streamed if self._use_stream else unary, deadline)

    async def _per_request(self, deadline: float) -> int:
        async with self._limits_lock:
            if self._config.max_images_per_request is None:
                info = await self.model_info(timeout_s=_remaining(deadline))
                self._config.max_images_per_request = info.limits["max_images_per_request"] or 64
            return self._config.max_images_per_request

    async def score(
        self,
        images: Sequence[ImageSource],
        sentences: Sequence[Sequence[str]],
        *,
        timeout_s: float | None = None,
        regions: Sequence[RegionSource] | None = None,
    ) -> list[list[TeacherScore]]:
        """Scores of ``sentences[i][j]`` against ``images[i]`` (bytes or a file path), as ``[i][j]``;
        ``regions`` as in ``TeacherClient.score``.

        The requests of one call run concurrently.
        """
        deadline = self._config.deadline(timeout_s)
        per_request = await self._per_request(deadline)
        job = _ScoreJob.build(images, sentences, per_request, self._config.max_message_bytes, regions)

        async def run(indices: list[int], request: pb.ScoreRequest) -> None:
            missing = job.accept(indices, await self._send(request, deadline), with_bytes=False)
            resends = job.byte_requests(missing)
            responses = await asyncio.gather(*(self._send(r, deadline) for _, r in resends))
            for (resent, _), response in zip(resends, responses, strict=True):
                job.accept(resent, response, with_bytes=True)

        await asyncio.gather(*(run(indices, request) for indices, request in job.digest_requests()))
        return job.finished()
