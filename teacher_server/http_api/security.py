"""Bearer-token auth of the HTTP API, as a FastAPI security dependency; the security headers.

``create_app`` adds ``require_bearer_token`` to the routes that serve data (scoring, model info,
metrics) when a token is set; FastAPI then also documents the ``bearer`` scheme in OpenAPI and
marks those operations with it. Probes (``/healthz``, ``/readyz``), the page, its assets and the
API description do not depend on it: probes cannot send a token, and the page asks for one and
sends it itself.

The token is compared in constant time (``hmac.compare_digest``) and never logged: a refusal
names the path and whether the token was missing or wrong, never what was sent (uvicorn's access
log is off, and would not show headers anyway).

``API_HEADERS`` go on every answer (``SecurityHeadersMiddleware``); ``docs_headers`` gives the
Swagger UI page at ``/docs`` a Content-Security-Policy that lets exactly its own script run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
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


# Every answer: the API's JSON must never be sniffed into HTML or script by a browser.
API_HEADERS = {"X-Content-Type-Options": "nosniff"}
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_headers(html: bytes) -> dict[str, str]:
    """Headers of the Swagger UI page ``html`` (FastAPI's ``get_swagger_ui_html``, assets served
    from this server): a CSP allowing this server's files and, by hash, the page's own inline
    script (the one that starts Swagger UI), and nothing else: no other inline script, no eval,
    nothing from another origin. Styles come from this server only (Swagger UI sets its inline
    styles through the DOM, which a CSP allows; ``test_web_page`` checks it renders without a
    single CSP violation).
    """
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode('ascii')}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    policy = (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return {"Content-Security-Policy": policy, "Referrer-Policy": "no-referrer", **API_HEADERS}
