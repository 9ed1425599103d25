"""Errors of the HTTP API: one JSON body for every answer other than 200, mapped as gRPC maps them.

The service raises the same exceptions for every transport; ``http_error`` maps them through
``grpc_api.rpc_failure`` (same message, same code) to an HTTP status: INVALID_ARGUMENT 422, or 413
for a size limit; RESOURCE_EXHAUSTED 429; UNAVAILABLE 503; DEADLINE_EXCEEDED 504; UNAUTHENTICATED
401. The body is ``{"error": {"status", "code", "field", "message", "retry_after_ms"}}``; ``field``
names the request field (``sentences[3]``, ``triplets[0].verb``, ``image``, ``region.human_box``)
and the message names the limit. 429 and 503 carry ``Retry-After``.
"""

from __future__ import annotations

import http
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from teacher_server.errors import InvalidInputError
from teacher_server.grpc_api import rpc_failure
from teacher_server.http_api.schemas import ErrorDetail

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
        """The JSON error body with this status and headers."""
        detail = ErrorDetail(
            status=self.status,
            code=self.code,
            field=self.field,
            message=self.message,
            retry_after_ms=self.retry_after_ms,
        )
        # nosniff here too, not only in SecurityHeadersMiddleware: a 500 is answered by Starlette's
        # outermost ServerErrorMiddleware, which no middleware of ours wraps.
        headers = {"X-Content-Type-Options": "nosniff", **self.headers}
        return JSONResponse({"error": detail.model_dump()}, status_code=self.status, headers=headers)


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


def validation_error(errors: Sequence[Mapping[str, Any]], skip: tuple[str, ...] = ()) -> HttpError:
    """422 for the first of pydantic's ``errors`` (the others are counted in the message)."""
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part not in skip]
    field = field_path(loc)
    reason = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        field, reason = "body", f"not valid JSON ({first.get('ctx', {}).get('error', reason)})"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return invalid(field, reason + more)


_REGION_INDEX = re.compile(r"(?P<head>.*\bregion)\[(?P<start>\d+)(?::(?P<stop>\d+))?\](?P<tail>.*)")


def region_field(field: str) -> str:
    """The region's eight values by box: ``region[0:4]`` -> ``region.human_box``, ``region[6]`` ->
    ``region.object_box[2]`` (``Region.from_values`` names a flat index; the HTTP body has two boxes)."""
    match = _REGION_INDEX.fullmatch(field)
    if match is None:
        return field
    start, stop = int(match["start"]), match["stop"]
    box = "human_box" if start < 4 else "object_box"
    if stop is not None and (start, int(stop)) in ((0, 4), (4, 8)):
        index = ""
    elif stop is None and start < 8:
        index = f"[{start % 4}]"
    else:
        return field
    return f"{match['head']}.{box}{index}{match['tail']}"


def renamer(name: str) -> Callable[[str], str]:
    """The service's field names -> this request's: ``items[0].sentences[2]`` -> ``{name}[2]``.

    The service validates one item; every fault of its image or digest is the request's ``image``;
    a region value is named by its box (``items[0].region[6]`` -> ``region.object_box[2]``).
    """

    def rename(field: str) -> str:
        match = re.fullmatch(r"items(?:\[0\])?(?:\.(\w+))?(.*)", field)
        if match is None:
            return field
        part, rest = match.groups()
        if part in (None, "image", "digest"):  # one image per request: every image fault is "image"
            return "image"
        return region_field((name if part == "sentences" else part) + rest)

    return rename


def install_error_handlers(app: FastAPI) -> None:
    """Every failure, FastAPI's and Starlette's own included, answers with the JSON error body."""

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
        return HttpError(exc.status_code, message, headers=dict(exc.headers) if exc.headers else None).response()

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return http_error(exc, "HTTP").response()  # logs the traceback, answers 500

    app.add_exception_handler(HttpError, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_starlette_error)
    app.add_exception_handler(Exception, on_unexpected)
