"""Bearer-token auth of the HTTP API, as a FastAPI security dependency.

``create_app`` adds ``require_bearer_token`` to the routes that serve data (scoring, model info,
metrics) when a token is set; FastAPI then also documents the ``bearer`` scheme in OpenAPI and
marks those operations with it. Probes (``/healthz``, ``/readyz``), the page, its assets and the
API description do not depend on it: probes cannot send a token, and the page asks for one and
sends it itself.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import FastAPI, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from teacher_server.http_api.errors import HttpError

REALM = "hoidistill-teacher"
# auto_error=False: FastAPI's own refusal would be a bare {"detail": ...}, not the API's error body.
BEARER = HTTPBearer(scheme_name="bearer", auto_error=False, description="the service's auth_token")


def set_token(app: FastAPI, token: str) -> None:
    """The token that ``require_bearer_token`` checks for ``app``'s requests."""
    app.state.auth_token = token.encode("utf-8")


async def require_bearer_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (compared in constant time).

    The 401 is the API's JSON error body naming the ``Authorization`` field, with a
    ``WWW-Authenticate`` challenge.
    """
    path = request.url.path
    if credentials is None:  # no header, or a scheme other than Bearer
        raise _unauthenticated(f"{path}: missing bearer token: send the header 'Authorization: Bearer <token>'")
    expected: bytes = request.app.state.auth_token
    if not hmac.compare_digest(credentials.credentials.strip().encode("utf-8"), expected):
        raise _unauthenticated(f"{path}: invalid bearer token")


def _unauthenticated(message: str) -> HttpError:
    return HttpError(
        401,
        message,
        code="UNAUTHENTICATED",
        field="Authorization",
        headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
    )
