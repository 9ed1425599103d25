"""Security of the HTTP API over a real uvicorn: headers on every answer, the CSPs of the page and
of ``/docs``, and bearer tokens that never reach a log.

The page and ``/docs`` rendering under their CSPs in a real browser is in ``test_web_page.py``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from testkit.http import RunningHttp, b64, running_http
from testkit.teacher import png_bytes, teacher_settings

from teacher_server.http_api.errors import http_error
from teacher_server.http_api.routes import PAGE_HEADERS

TOKEN = "tok-3f9a1c77e2b54d08"
WRONG_TOKEN = "tok-wrong-6b1e0d4c9a7f"
SENTENCES = ["a person ride a horse"]
MAX_MESSAGE_BYTES = 64 * 1024  # room for a small PNG; a larger body is the 413 below


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningHttp]:
    settings = teacher_settings(tiny_blip_dir, auth_token=TOKEN, max_message_bytes=MAX_MESSAGE_BYTES)
    with running_http(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(teacher: RunningHttp) -> Iterator[httpx.Client]:
    with teacher.client() as http_client:
        yield http_client


def authorised(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------------- nosniff
def test_every_json_answer_says_nosniff(client: httpx.Client) -> None:
    body = {"image": b64(png_bytes(1)), "sentences": SENTENCES}
    answers = {
        "score 200": client.post("/v1/score", json=body, headers=authorised()),
        "model 200": client.get("/v1/model", headers=authorised()),
        "healthz 200": client.get("/healthz"),
        "readyz 200": client.get("/readyz"),
        "openapi 200": client.get("/openapi.json"),
        "401 missing token": client.post("/v1/score", json=body),
        "401 wrong token": client.get("/v1/model", headers=authorised(WRONG_TOKEN)),
        "422 bad body": client.post("/v1/score", json={"sentences": 3}, headers=authorised()),
        "413 body limit": client.post("/v1/score", content=b"{" + b" " * MAX_MESSAGE_BYTES, headers=authorised()),
        "404 unknown path": client.get("/v2/nothing"),
        "405 wrong method": client.get("/v1/score", headers=authorised()),
    }
    for name, response in answers.items():
        expected = int(name.split()[1]) if name.split()[1].isdigit() else int(name.split()[0])
        assert response.status_code == expected, (name, response.text)
        assert response.headers["content-type"].startswith("application/json"), name
        assert response.headers.get("x-content-type-options") == "nosniff", name
    metrics = client.get("/metrics", headers=authorised())
    assert metrics.headers.get("x-content-type-options") == "nosniff"


def test_an_unexpected_error_says_nosniff_too() -> None:
    # A 500 comes from Starlette's outermost ServerErrorMiddleware, past every middleware of ours:
    # the error body itself carries the header.
    response = http_error(RuntimeError("a bug"), "HTTP").response()
    assert response.status_code == 500 and response.headers["x-content-type-options"] == "nosniff"


# -------------------------------------------------------------------------------------- CSPs
def test_the_page_keeps_its_own_csp(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    for name, value in PAGE_HEADERS.items():
        assert page.headers[name] == value  # not replaced or doubled by the API-wide headers
    assert page.headers.get_list("x-content-type-options") == ["nosniff"]


def test_docs_csp_lets_only_their_own_inline_script_run(client: httpx.Client) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    directives = [part.split(" ", 1) for part in docs.headers["content-security-policy"].split("; ")]
    policy = {name: value for name, value in directives}
    assert policy["default-src"] == "'none'" and policy["object-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'" and policy["connect-src"] == "'self'"
    # The one inline script (it starts Swagger UI) is allowed by its hash; no other inline script
    # and no eval may run, and nothing loads from another origin.
    inline = re.findall(r"<script>(.*?)</script>", docs.text, re.DOTALL)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert policy["script-src"].split() == ["'self'", f"'sha256-{digest}'"]
    assert "http" not in docs.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="([^"]+)"', docs.text):
        assert asset.startswith("/docs/assets/"), asset  # served by this server (swagger-ui-bundle)
        assert client.get(asset).status_code == 200
    assert docs.headers["x-content-type-options"] == "nosniff"


# ----------------------------------------------------------------------- tokens never logged
def test_tokens_are_never_logged(
    teacher: RunningHttp, client: httpx.Client, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    body = {"image": b64(png_bytes(2)), "sentences": SENTENCES}
    with caplog.at_level(logging.DEBUG):  # every logger, uvicorn's access and error logs included
        assert client.post("/v1/score", json=body, headers=authorised(WRONG_TOKEN)).status_code == 401
        assert client.get("/metrics", headers=authorised(WRONG_TOKEN)).status_code == 401
        assert client.post("/v1/score", json=body, headers=authorised()).status_code == 200
        assert client.get("/v1/model", headers=authorised()).status_code == 200
    logged = "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)
    captured = capfd.readouterr()
    for token in (TOKEN, WRONG_TOKEN):
        assert token not in logged
        assert token not in captured.out + captured.err
