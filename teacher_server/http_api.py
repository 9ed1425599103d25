"""HTTP/JSON API and web page of the teacher: FastAPI on uvicorn, in the ``serve`` event loop.

Routes (``create_app``):

- ``POST /v1/score``: an image (base64 in JSON, or a multipart file) and sentences -> scores.
- ``POST /v1/score/triplets``: an image and (verb, object) triplets; the sentences are made by the
  student's own prompt function ``teacher_server.hoi.prompts.triplet_sentence``, so people score exactly the
  text the distillation loss asks the teacher about.
- ``GET /v1/model`` (model id, fingerprint, limits, readiness), ``GET /healthz`` (liveness: 200
  while the loop runs), ``GET /readyz`` (503 while starting or draining), ``GET /metrics``
  (Prometheus text of the service's registry), ``GET /docs`` + ``/openapi.json``, and the web page
  at ``/`` (``teacher_server/static``: plain HTML/JS, nothing fetched from elsewhere).

Errors follow the gRPC API: the same exceptions, mapped through ``grpc_api.rpc_failure`` to the
same messages, then to an HTTP status (INVALID_ARGUMENT 422, or 413 for a size limit;
RESOURCE_EXHAUSTED 429; UNAVAILABLE 503; DEADLINE_EXCEEDED 504; UNAUTHENTICATED 401; an
unsupported request body 415). Every error body is ``{"error": {"status", "code", "field",
"message", "retry_after_ms"}}``; ``field`` names the request field (``sentences[3]``,
``triplets[0].verb``, ``image``) and the message names the limit. 429 and 503 carry
``Retry-After``. The bearer token, TLS and the size limits are the service settings gRPC uses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import http
import logging
import math
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from teacher_server.auth import bearer_token, read_pem
from teacher_server.errors import InvalidInputError, TeacherError
from teacher_server.grpc_api import Drain, ServiceUnavailableError, rpc_failure, unavailable_reason
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.prompts import triplet_sentence
from teacher_server.service import ScoreItem

if TYPE_CHECKING:
    from teacher_server.service import ScoringService
    from teacher_server.settings import ServerSettings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SCORE_PATH = "/v1/score"
TRIPLETS_PATH = "/v1/score/triplets"
MODEL_PATH = "/v1/model"
# Requests counted in the service's request/error metrics (as gRPC counts its methods).
COUNTED_PATHS = frozenset({SCORE_PATH, TRIPLETS_PATH, MODEL_PATH})
# Reachable without the bearer token: probes cannot send one, and the page, its assets and the
# API description hold no data (the page asks for the token and sends it with its requests).
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/docs", "/openapi.json"})
OPEN_PREFIXES = ("/static/", "/docs/")
MAX_TIMEOUT_MS = 3_600_000
# The page loads nothing from elsewhere; a sentence that is markup must stay text even if a bug
# ever put it into innerHTML: no inline script may run.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# pydantic names the member of a union in error locations (``triplets.0.Triplet.verb``); people
# never wrote those names, so they are left out of the field path.
_UNION_TAGS = frozenset({"Triplet", "str"})

try:  # Swagger UI from a package, so /docs works offline; else FastAPI's default (a CDN).
    from swagger_ui_bundle import swagger_ui_path as _swagger_ui_path
except ImportError:  # pragma: no cover - depends on the installed extras
    _swagger_ui_path = None


class HttpServerError(TeacherError):
    """The HTTP server could not start (port taken, unreadable certificates)."""


# ------------------------------------------------------------------------------------ schemas
class ErrorDetail(BaseModel):
    status: int = Field(description="HTTP status code", examples=[422])
    code: str = Field(
        description="status name, as the gRPC API's code (INVALID_ARGUMENT, ...)",
        examples=["INVALID_ARGUMENT"],
    )
    field: str | None = Field(None, description="request field at fault", examples=["sentences[1]"])
    message: str = Field(description="what was wrong, where, and the limit or what would be right")
    retry_after_ms: int | None = Field(None, description="when to retry (429, 503)")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class _Sentences(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sentences: list[str] = Field(
        description="sentences to match against the image, 1 to max_sentences_per_image (GET /v1/model)",
        examples=[["a person ride a horse", "a person feed a horse"]],
    )


_IMAGE_FIELD = Field(
    description="the image file (JPEG, PNG, ...) in standard base64; line breaks and a data: URL prefix are accepted",
    examples=["iVBORw0KGgo..."],
)


class ScoreRequest(_Sentences):
    """JSON body of ``POST /v1/score``."""

    image: str = _IMAGE_FIELD


class Triplet(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    verb: str = Field(description="verb name (HICO-DET, V-COCO or any): ride, hop_on, sit_instr", examples=["ride"])
    obj: str | None = Field(
        None,
        alias="object",
        description="object name; null for an action without object (a person walk)",
        examples=["horse"],
    )


class _Triplets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    triplets: list[Triplet | str] = Field(
        description='triplets as objects or as text "verb object" (first word = verb, e.g. "ride horse", '
        '"hop_on airplane", "walk") or "verb, object" (e.g. "hop on, sports ball")',
        examples=[[{"verb": "ride", "object": "horse"}, "feed horse"]],
    )
    variant: Literal["full", "verb", "object"] = Field(
        "full", description="prompt variant of teacher_server.hoi.prompts.triplet_sentence"
    )


class TripletsRequest(_Triplets):
    """JSON body of ``POST /v1/score/triplets``."""

    image: str = _IMAGE_FIELD


class ModelSummary(BaseModel):
    model_id: str
    fingerprint: str = Field(description="prefixes every cache key: scores are only comparable within one")
    itm_start_token: str
    dtype: str


class ImageSummary(BaseModel):
    digest: str = Field(description="SHA-256 hex of the image file bytes (how the teacher addresses images)")
    size_bytes: int


class SentenceScore(BaseModel):
    index: int = Field(description="position of the sentence in the request")
    sentence: str
    match_prob: float = Field(description="softmax of the ITM logits, match class")
    match_logit: float = Field(description="ITM logit margin z = l_match - l_nomatch")
    cached: bool = Field(description="answered from the score cache")


class TripletScore(SentenceScore):
    model_config = ConfigDict(populate_by_name=True)

    verb: str
    obj: str | None = Field(alias="object")


class ScoreResponse(BaseModel):
    model: ModelSummary
    image: ImageSummary
    scores: list[SentenceScore]


class TripletsResponse(BaseModel):
    model: ModelSummary
    image: ImageSummary
    variant: str
    scores: list[TripletScore]


SortOrder = Literal["given", "desc"]
_SORT_QUERY = Query("given", description="given: in request order; desc: ranked by match_prob, highest first")
_TIMEOUT_QUERY = Query(None, ge=1, le=MAX_TIMEOUT_MS, description="deadline for scoring (milliseconds); 504 past it")

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (401, "missing or wrong bearer token"),
        (413, "over a size limit (image bytes or pixels, sentences per image, request body)"),
        (415, "request body is neither application/json nor multipart/form-data"),
        (422, "invalid request field (named in error.field)"),
        (429, "queue full; retry after Retry-After seconds"),
        (503, "starting or draining; retry after Retry-After seconds"),
        (504, "deadline (timeout_ms) passed before scoring finished"),
    )
}


def _multipart_schema(list_field: str, description: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["image", list_field],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image file"},
            list_field: {"type": "array", "items": {"type": "string"}, "description": description},
            **(extra or {}),
        },
    }


def _request_body(json_model: type[BaseModel], multipart: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
                "multipart/form-data": {"schema": multipart},
            },
        }
    }


# ------------------------------------------------------------------------------------- errors
class HttpError(Exception):
    """An answer other than 200, with the JSON error body of every failure."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        retry_after_ms: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or http.HTTPStatus(status).name
        self.field = field
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.headers = dict(headers or {})
        if retry_after_ms:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))

    def response(self) -> JSONResponse:
        detail = ErrorDetail(
            status=self.status,
            code=self.code,
            field=self.field,
            message=self.message,
            retry_after_ms=self.retry_after_ms,
        )
        return JSONResponse({"error": detail.model_dump()}, status_code=self.status, headers=self.headers)


def invalid(field: str, reason: str, *, too_large: bool = False) -> HttpError:
    """422 (413 when ``too_large``) naming ``field``; ``reason`` should name the limit."""
    return HttpError(413 if too_large else 422, f"{field}: {reason}", code="INVALID_ARGUMENT", field=field)


def http_error(exc: BaseException, method: str, rename: Callable[[str], str] = str) -> HttpError:
    """Map an exception raised while serving ``method`` to the HTTP answer, as gRPC maps it.

    ``rename`` turns the service's field names (``items[0].sentences[2]``) into this request's
    (``sentences[2]``). Unexpected exceptions are logged by ``rpc_failure`` and answer 500.
    """
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, InvalidInputError):
        return invalid(rename(exc.field), exc.reason, too_large=exc.too_large)
    failure = rpc_failure(exc, method)
    return HttpError(
        _HTTP_STATUS.get(failure.code, 500),
        failure.message,
        code=failure.code.name,
        field=rename(failure.field) if failure.field else None,
        retry_after_ms=failure.retry_after_ms or None,
    )


def field_path(loc: Sequence[int | str]) -> str:
    """pydantic error location -> field name: ``("triplets", 0, "verb")`` -> ``triplets[0].verb``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in _UNION_TAGS:
            path += f".{part}" if path else part
    return path or "body"


def validation_error(errors: Sequence[dict[str, Any]], skip: tuple[str, ...] = ()) -> HttpError:
    """422 for the first of pydantic's ``errors`` (the others are counted in the message)."""
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part not in skip]
    field = field_path(loc)
    reason = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        field, reason = "body", f"not valid JSON ({first.get('ctx', {}).get('error', reason)})"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return invalid(field, reason + more)


def _sentences_renamer(name: str) -> Callable[[str], str]:
    """The service validates one item; name its fields as this request does."""

    def rename(field: str) -> str:
        match = re.fullmatch(r"items(?:\[0\])?(?:\.(\w+))?(.*)", field)
        if match is None:
            return field
        part, rest = match.groups()
        if part in (None, "image", "digest"):  # one image per request: every image fault is "image"
            return "image"
        return (name if part == "sentences" else part) + rest

    return rename


# ------------------------------------------------------------------------------ request bodies
@dataclass(frozen=True)
class ParsedBody:
    """A validated request: the decoded image file bytes and the other fields."""

    image: bytes
    fields: BaseModel


def decode_base64_image(text: str, max_bytes: int, field: str = "image") -> bytes:
    """Base64 text (wrapped lines and a ``data:...;base64,`` prefix accepted) -> image file bytes."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise invalid(field, "a data: URL must be base64-encoded (data:image/png;base64,...)")
    compact = "".join(text.split())  # `base64` wraps at 76 columns unless told -w0
    size = len(compact) * 3 // 4 - compact[-2:].count("=")
    if size > max_bytes:  # before decoding it
        raise invalid(field, f"image is {size:,} bytes, over the limit of {max_bytes:,} bytes", too_large=True)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(
            field, f"not valid base64 ({exc}); send the file in standard base64, e.g. `base64 -w0 image.jpg`"
        ) from None
    if not data:
        raise invalid(field, "image is empty (0 bytes)")
    return data


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def parse_body(
    request: Request,
    json_model: type[BaseModel],
    form_model: type[BaseModel],
    settings: ServerSettings,
    list_fields: frozenset[str],
) -> ParsedBody:
    """Read a JSON body (``json_model``, image in base64) or a multipart form (``form_model`` +
    an ``image`` file); raise ``HttpError`` 415 / 413 / 422 naming the field."""
    media = _media_type(request)
    if media == "application/json" or media.endswith("+json"):
        try:
            body = json_model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        image = await run_in_threadpool(decode_base64_image, body.image, settings.max_image_bytes)
        return ParsedBody(image, body)
    if media == "multipart/form-data":
        return await _parse_form(request, form_model, settings, list_fields)
    shown = media or "none"
    raise HttpError(
        415,
        f"Content-Type: expected application/json or multipart/form-data, got {shown!r}",
        field="Content-Type",
    )


async def _parse_form(
    request: Request, model: type[BaseModel], settings: ServerSettings, list_fields: frozenset[str]
) -> ParsedBody:
    # A few fields and files more than allowed, so that the service and ``_form_image`` name the
    # limit that was crossed (Starlette's own refusal does not say which field).
    max_fields = settings.max_sentences_per_image + 8
    try:
        form = await request.form(max_files=4, max_fields=max_fields, max_part_size=1024 * 1024)
    except StarletteHTTPException as exc:  # Starlette's multipart parser refused the body
        detail = str(exc.detail)
        raise invalid("body", f"malformed multipart form: {detail}", too_large=detail.startswith("Too many")) from None
    try:
        image = await _form_image(form, settings)
        values: dict[str, Any] = {}
        for key in form:
            if key == "image" or key in values:
                continue
            found = form.getlist(key)
            if any(isinstance(value, UploadFile) for value in found):
                raise invalid(key, "expected text, got a file; only 'image' is a file")
            if key in list_fields:
                values[key] = list(found)
            elif len(found) > 1:
                raise invalid(key, f"given {len(found)} times; give it once")
            else:
                values[key] = found[0]
        for key in list_fields:
            values.setdefault(key, [])  # an absent list field = an empty one; the service names the limit
        try:
            fields = model.model_validate(values)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        return ParsedBody(image, fields)
    finally:
        await form.close()


async def _form_image(form: FormData, settings: ServerSettings) -> bytes:
    images = form.getlist("image")
    if not images:
        raise invalid("image", "missing: send the image file as the form field 'image'")
    if len(images) > 1:
        raise invalid("image", f"{len(images)} images sent; this API scores one image per request", too_large=True)
    (image,) = images
    if isinstance(image, str):  # a text field: base64, as in the JSON body
        return await run_in_threadpool(decode_base64_image, image, settings.max_image_bytes)
    data = await image.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise invalid("image", f"image is over the limit of {settings.max_image_bytes:,} bytes", too_large=True)
    if not data:
        raise invalid("image", "image is empty (0 bytes)")
    return data


# ----------------------------------------------------------------------------------- triplets
def parse_triplet_text(text: str) -> tuple[str, str | None]:
    """``"ride horse"`` -> ("ride", "horse"); ``"hop on, airplane"`` -> ("hop on", "airplane");
    ``"ride sports ball"`` -> ("ride", "sports ball"); ``"walk"`` -> ("walk", None).

    Without a comma the first word is the verb (multi-word verbs keep their underscore:
    ``hop_on``); with one, the comma separates verb and object.
    """
    if "," in text:
        verb, _, obj = text.partition(",")
    else:
        verb, _, obj = text.strip().partition(" ")
    return verb.strip(), obj.strip() or None


@dataclass(frozen=True)
class TripletSentence:
    verb: str
    obj: str | None
    sentence: str


def triplet_sentences(triplets: Sequence[Triplet | str], variant: str) -> list[TripletSentence]:
    """Sentences of the triplets by ``teacher_server.hoi.prompts.triplet_sentence``; 422 naming ``triplets[i]``."""
    made = []
    for index, triplet in enumerate(triplets):
        name = f"triplets[{index}]"
        if isinstance(triplet, str):
            if not triplet.strip():
                raise invalid(name, 'empty triplet; write "verb object", e.g. "ride horse"')
            verb, obj = parse_triplet_text(triplet)
        else:
            verb, obj = triplet.verb.strip(), triplet.obj
            if not verb:
                raise invalid(f"{name}.verb", "verb is empty")
            if obj is not None:
                obj = obj.strip()
                if not obj:
                    raise invalid(
                        f"{name}.object",
                        "object is empty; leave it out (or null) for an action without object",
                    )
        try:
            sentence = triplet_sentence(verb, obj, variant)  # type: ignore[arg-type]
        except ValueError as exc:
            raise invalid(name, str(exc)) from None
        if sentence is None:
            why = (
                "'no_interaction' makes no sentence"
                if obj is not None or variant != "object"
                else "the 'object' variant needs an object"
            )
            raise invalid(name, f"{why}; leave this triplet out")
        made.append(TripletSentence(verb, obj, sentence))
    return made


# ---------------------------------------------------------------------------------- middleware
class RequestMetricsMiddleware:
    """Counts every answer of the API routes by route and status, as the gRPC interceptor does."""

    def __init__(self, app: ASGIApp, observe: Callable[[str, str], None]) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in COUNTED_PATHS:
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


class BearerTokenMiddleware:
    """401 for a request without the right ``Authorization: Bearer <token>`` (constant-time check).

    Paths in ``OPEN_PATHS`` / under ``OPEN_PREFIXES`` stay open (probes, the page, the API docs).
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = [(key.decode("latin-1"), value) for key, value in scope.get("headers", ())]
        token = bearer_token(headers)
        if token is None:
            failure = f"{path}: missing bearer token: send the header 'Authorization: Bearer <token>'"
        elif not hmac.compare_digest(token.encode("utf-8"), self.token):
            failure = f"{path}: invalid bearer token"
        else:
            await self.app(scope, receive, send)
            return
        error = HttpError(
            401,
            failure,
            code="UNAUTHENTICATED",
            field="Authorization",
            headers={"WWW-Authenticate": 'Bearer realm="hoidistill-teacher"'},
        )
        await error.response()(scope, receive, send)


class BodyTooLargeError(HttpError):
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


# ------------------------------------------------------------------------------------------ app
def _model_summary(service: ScoringService) -> ModelSummary:
    info = service.model_info()
    return ModelSummary(
        model_id=str(info["model_id"]),
        fingerprint=str(info["fingerprint"]),
        itm_start_token=str(info["itm_start_token"]),
        dtype=str(info["dtype"]),
    )


def _ranked(rows: list[Any], sort: SortOrder) -> list[Any]:
    if sort == "desc":
        return sorted(rows, key=lambda row: (-row.match_prob, row.index))
    return rows


def create_app(service: ScoringService, settings: ServerSettings, *, drain: Drain | None = None) -> FastAPI:
    """The HTTP API of ``service`` (routes in the module docstring).

    ``drain`` is the gRPC server's shutdown state (``TeacherServer.drain``): once it begins, this
    API answers 503 and ``/readyz`` turns unready, in step with gRPC health.
    """
    drain = drain if drain is not None else Drain()
    app = FastAPI(
        title="hoi-distill teacher",
        version="1",
        summary="BLIP image-text matching scores for (image, sentence) pairs and HOI triplets.",
        docs_url=None if _swagger_ui_path is not None else "/docs",
        redoc_url=None,
    )

    async def score_one(
        image: bytes, sentences: list[str], method: str, rename: Callable[[str], str], timeout_ms: int | None
    ) -> tuple[ImageSummary, list[tuple[float, float, bool]]]:
        digest = await run_in_threadpool(image_digest, image)
        try:
            reason = unavailable_reason(drain, service)
            if reason is not None:
                raise ServiceUnavailableError(reason)
            (result,) = await service.score(
                [ScoreItem(digest, image, tuple(sentences))],
                timeout_s=timeout_ms / 1000 if timeout_ms else None,
            )
            if result.image_required:  # bytes were sent: the service cannot ask for them
                raise RuntimeError(f"service answered 'image required' for image {digest} sent with its bytes")
        except Exception as exc:
            raise http_error(exc, method, rename) from None
        rows = list(zip(result.match_prob, result.match_logit, result.cached, strict=True))
        return ImageSummary(digest=digest, size_bytes=len(image)), rows

    @app.post(
        SCORE_PATH,
        response_model=ScoreResponse,
        responses=_ERROR_RESPONSES,
        summary="Score sentences",
        openapi_extra=_request_body(
            ScoreRequest, _multipart_schema("sentences", "one sentence per field (repeat the field)")
        ),
    )
    async def score(
        request: Request, sort: SortOrder = _SORT_QUERY, timeout_ms: int | None = _TIMEOUT_QUERY
    ) -> ScoreResponse:
        """Match probability and logit margin of every sentence against the image.

        Send JSON `{"image": <base64>, "sentences": [...]}`, or a multipart form with the file in
        `image` and one `sentences` field per sentence. Scores keep the request order unless
        `sort=desc`; `index` is each sentence's position in the request.
        """
        body = await parse_body(request, ScoreRequest, _Sentences, settings, frozenset({"sentences"}))
        fields: _Sentences = body.fields  # type: ignore[assignment]
        image, rows = await score_one(
            body.image, fields.sentences, f"POST {SCORE_PATH}", _sentences_renamer("sentences"), timeout_ms
        )
        scores = [
            SentenceScore(index=i, sentence=sentence, match_prob=prob, match_logit=logit, cached=cached)
            for i, (sentence, (prob, logit, cached)) in enumerate(zip(fields.sentences, rows, strict=True))
        ]
        return ScoreResponse(model=_model_summary(service), image=image, scores=_ranked(scores, sort))

    @app.post(
        TRIPLETS_PATH,
        response_model=TripletsResponse,
        responses=_ERROR_RESPONSES,
        summary="Score HOI triplets",
        openapi_extra=_request_body(
            TripletsRequest,
            _multipart_schema(
                "triplets",
                'one "verb object" per field (repeat the field)',
                {"variant": {"type": "string", "enum": ["full", "verb", "object"], "default": "full"}},
            ),
        ),
    )
    async def score_triplets(
        request: Request, sort: SortOrder = _SORT_QUERY, timeout_ms: int | None = _TIMEOUT_QUERY
    ) -> TripletsResponse:
        """Scores of (person, verb, object) triplets, as sentences made by the student's prompt
        template (`a person ride a horse`); `variant` as the prompt ablation (full, verb, object)."""
        body = await parse_body(request, TripletsRequest, _Triplets, settings, frozenset({"triplets"}))
        fields: _Triplets = body.fields  # type: ignore[assignment]
        made = triplet_sentences(fields.triplets, fields.variant)
        image, rows = await score_one(
            body.image,
            [m.sentence for m in made],
            f"POST {TRIPLETS_PATH}",
            _sentences_renamer("triplets"),
            timeout_ms,
        )
        scores = [
            TripletScore(
                index=i,
                sentence=m.sentence,
                verb=m.verb,
                obj=m.obj,
                match_prob=prob,
                match_logit=logit,
                cached=cached,
            )
            for i, (m, (prob, logit, cached)) in enumerate(zip(made, rows, strict=True))
        ]
        return TripletsResponse(
            model=_model_summary(service), image=image, variant=fields.variant, scores=_ranked(scores, sort)
        )

    @app.get(MODEL_PATH, responses={401: _ERROR_RESPONSES[401]}, summary="Model, fingerprint and limits")
    async def model_info() -> dict[str, Any]:
        """`model_id`, `fingerprint`, `itm_start_token`, `dtype`, `limits`, batching, cache, `ready`."""
        return {**service.model_info(), "ready": unavailable_reason(drain, service) is None}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        """200 while the server's event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness", responses={503: _ERROR_RESPONSES[503]})
    async def readyz() -> dict[str, bool]:
        """200 when new work is accepted; 503 while the service starts or drains."""
        reason = unavailable_reason(drain, service)
        if reason is not None:
            raise http_error(ServiceUnavailableError(reason), "GET /readyz")
        return {"ready": True}

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 401: _ERROR_RESPONSES[401]},
    )
    async def metrics() -> Response:
        """The service's `hoidistill_teacher_*` metrics in the Prometheus text format."""
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if _swagger_ui_path is not None:
        app.mount("/docs/assets", StaticFiles(directory=str(_swagger_ui_path)), name="swagger-ui")

        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return get_swagger_ui_html(
                openapi_url=f"{root}/openapi.json",
                title=f"{app.title} - API",
                swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
            )

    _install_error_handlers(app)
    app.openapi = lambda: _openapi(app, secured=bool(settings.auth_token))  # type: ignore[method-assign]
    # Added last = outermost: metrics see the 401s and 413s the inner middleware answer.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_message_bytes)
    if settings.auth_token:
        app.add_middleware(BearerTokenMiddleware, token=settings.auth_token)
    app.add_middleware(RequestMetricsMiddleware, observe=service.metrics.observe_request)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        return exc.response() if isinstance(exc, HttpError) else http_error(exc, "HTTP").response()

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc.errors(), skip=("query", "path", "header", "body")).response()

    async def on_starlette_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        where = f"{request.method} {request.url.path}"
        message = {
            404: f"{where}: no such route; the API is described at /docs",
            405: f"{where}: method not allowed; allowed: {(exc.headers or {}).get('Allow', 'none')}",
        }.get(exc.status_code, f"{where}: {exc.detail}")
        return HttpError(exc.status_code, message, headers=exc.headers).response()

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return http_error(exc, "HTTP").response()  # logs the traceback, answers 500

    app.add_exception_handler(HttpError, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_starlette_error)
    app.add_exception_handler(Exception, on_unexpected)


def _openapi(app: FastAPI, *, secured: bool) -> dict[str, Any]:
    """FastAPI's schema plus the request-body models (routes parse bodies themselves: JSON or form)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
        description="Ad-hoc scoring with the hoi-distill teacher. Errors: "
        '`{"error": {status, code, field, message, retry_after_ms}}`.',
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ScoreRequest, TripletsRequest):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
    if secured:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            if path not in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema


# --------------------------------------------------------------------------------------- server
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
    )
    return server
