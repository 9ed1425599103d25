"""Fuzzing the HTTP API: Schemathesis from the served OpenAPI schema, plus Hypothesis with real images.

Random bodies from the schema rarely hold a decodable image, so the second group sends a valid
image with arbitrary sentences and triplets, reaching the tokenizer and the engine. Every answer
must be a documented status with a JSON body; none may be a 5xx. Case counts are bounded.
Bodies that are wrong in form rather than in content (content types, malformed or deeply nested
JSON, multipart forms with missing, extra or repeated parts, huge fields) are the ``http`` door
of ``test_fuzz_doors.py``, against a ``serve`` process.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from testkit.http import RunningHttp, running_http
from testkit.teacher import png_bytes, teacher_settings

from teacher_server.hoi.prompts import triplet_sentence
from teacher_server.http_api.bodies import parse_triplet_text

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = base64.b64encode(png_bytes(300)).decode("ascii")
CLIENT_ERRORS = {401, 404, 405, 413, 415, 422}
FUZZ = settings(
    max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningHttp]:
    limits = {"max_sentences_per_image": 8, "max_sentence_tokens": 24, "max_message_bytes": 200_000}
    with running_http(teacher_settings(tiny_blip_dir, auth_token=TOKEN, **limits)) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(teacher: RunningHttp):
    return schemathesis.openapi.from_url(f"{teacher.url}/openapi.json", headers=AUTH)


@pytest.fixture(scope="module")
def client(teacher: RunningHttp) -> Iterator[httpx.Client]:
    with teacher.client(headers=AUTH) as http_client:
        yield http_client


# Operations fuzzed from the schema, each in positive (valid by the schema) and negative mode.
OPERATIONS = [
    ("POST", "/v1/score"),
    ("POST", "/v1/score/triplets"),
    ("POST", "/v1/explain"),
    ("GET", "/v1/model"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
SCHEMA_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_every_operation_is_fuzzed(api_schema) -> None:
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


# schemathesis.pytest.from_fixture does not work with pytest 9 (it reads a removed private
# attribute), so each operation's Schemathesis strategy is run by Hypothesis directly.
# Negative cases exist only for operations that take input (the others have nothing to break).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_schema_fuzzing_finds_no_server_error(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=AUTH, timeout=60, checks=SCHEMA_CHECKS)

    call()


def assert_client_answer(response: httpx.Response) -> None:
    """Either scores or a documented client error with the JSON error body naming a field."""
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.status_code in CLIENT_ERRORS, response.text
        error = response.json()["error"]
        assert error["status"] == response.status_code and error["message"]


@FUZZ
@given(sentences=st.lists(st.text(max_size=120), max_size=10))
def test_arbitrary_sentences_with_a_real_image(client: httpx.Client, sentences: list[str]) -> None:
    response = client.post("/v1/score?sort=desc", json={"image": IMAGE, "sentences": sentences})
    assert_client_answer(response)
    if response.status_code == 200:
        scores = response.json()["scores"]
        assert sorted(row["index"] for row in scores) == list(range(len(sentences)))
        assert all(row["sentence"] == sentences[row["index"]] for row in scores)
        assert all(0.0 <= row["match_prob"] <= 1.0 for row in scores)
    else:
        assert response.json()["error"]["field"].startswith("sentences")


_name = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
_triplet = st.one_of(_name, st.fixed_dictionaries({"verb": _name}, optional={"object": st.none() | _name}))


@FUZZ
@given(triplets=st.lists(_triplet, max_size=6), variant=st.sampled_from(["full", "verb", "object"]))
def test_arbitrary_triplets_with_a_real_image(client: httpx.Client, triplets: list, variant: str) -> None:
    response = client.post("/v1/score/triplets", json={"image": IMAGE, "triplets": triplets, "variant": variant})
    assert_client_answer(response)
    if response.status_code == 200:
        for row, triplet in zip(response.json()["scores"], triplets, strict=True):
            verb, obj = (
                parse_triplet_text(triplet)
                if isinstance(triplet, str)
                else (triplet["verb"].strip(), (triplet.get("object") or "").strip() or None)
            )
            assert row["sentence"] == triplet_sentence(verb, obj, variant)
    else:
        assert response.json()["error"]["field"].startswith("triplets")
