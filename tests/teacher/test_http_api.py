"""The teacher's HTTP API served by a real uvicorn on loopback, a real scoring service and tiny BLIP.

``start_http`` / ``running_http`` (also used by the page, fuzz and docs tests) run the service and
the HTTP server in their own event loop in a background thread; tests call them with httpx.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from PIL import Image
from testkit.http import RunningHttp, b64, running_http, start_http
from testkit.teacher import (
    gated_service,
    make_certificates,
    png_bytes,
    reference_scores,
    teacher_settings,
    wait_until,
)

from teacher_server.auth import AuthConfigError
from teacher_server.engine import ImageSentences
from teacher_server.hoi.prompts import triplet_sentence
from teacher_server.hoi.region import Region
from teacher_server.http_api.bodies import parse_triplet_text
from teacher_server.http_api.server import HttpServerError

T = TypeVar("T")
TOKEN = "s3cret-token"
SENTENCES = ["a person ride a horse", "a person feed a horse", "a person hold a cup"]
# Small limits, so that tests cross them with small requests.
LIMITS = {
    "max_sentence_tokens": 16,
    "max_sentences_per_image": 6,
    "max_image_bytes": 30_000,
    "max_image_pixels": 200_000,
    "max_message_bytes": 120_000,
}


def solid_png(size: tuple[int, int]) -> bytes:
    """A one-colour PNG: few bytes, many pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response: httpx.Response, status: int, field: str | None, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status
    assert error["field"] == field, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningHttp]:
    with running_http(teacher_settings(tiny_blip_dir, **LIMITS)) as running:
        yield running


@pytest.fixture(scope="module")
def client(teacher: RunningHttp) -> Iterator[httpx.Client]:
    with teacher.client() as http_client:
        yield http_client


# ------------------------------------------------------------------------------------- scoring
def test_json_scores_equal_the_engine_in_request_order(client: httpx.Client, engine, teacher) -> None:
    image = png_bytes(101)
    response = client.post("/v1/score", json={"image": b64(image), "sentences": SENTENCES})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference_scores(engine, image, SENTENCES)
    assert [row["sentence"] for row in body["scores"]] == SENTENCES
    assert [row["index"] for row in body["scores"]] == [0, 1, 2]
    for row, reference in zip(body["scores"], expected, strict=True):
        assert row["match_prob"] == pytest.approx(reference.match_prob, abs=1e-6)
        assert row["match_logit"] == pytest.approx(reference.match_logit, abs=1e-5)
        assert row["cached"] is False
    assert body["model"] == {
        "model_id": str(teacher.settings.model),
        "fingerprint": engine.fingerprint,
        "itm_start_token": "cls",
        "dtype": "fp32",
        "region_policy": "crop:margin=0.1",  # EngineSettings' defaults
    }
    assert body["image"] == {"digest": hashlib.sha256(image).hexdigest(), "size_bytes": len(image)}
    assert body["region"] is None  # the whole image


def test_sort_desc_ranks_by_probability_and_keeps_request_index(client: httpx.Client) -> None:
    image = png_bytes(102)
    given = client.post("/v1/score", json={"image": b64(image), "sentences": SENTENCES}).json()["scores"]
    ranked = client.post("/v1/score?sort=desc", json={"image": b64(image), "sentences": SENTENCES}).json()["scores"]
    probabilities = [row["match_prob"] for row in ranked]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sorted(ranked, key=lambda row: row["index"]) == [dict(row, cached=True) for row in given]


def test_repeated_request_is_answered_from_the_cache_with_equal_scores(client: httpx.Client, teacher) -> None:
    image = png_bytes(103)
    first = client.post("/v1/score", json={"image": b64(image), "sentences": SENTENCES[:2]}).json()["scores"]
    hits = teacher.metric("hoidistill_teacher_cache_hits_total")
    second = client.post("/v1/score", json={"image": b64(image), "sentences": SENTENCES}).json()["scores"]
    assert [row["cached"] for row in second] == [True, True, False]
    assert [row["match_prob"] for row in second[:2]] == [row["match_prob"] for row in first]
    assert teacher.metric("hoidistill_teacher_cache_hits_total") == hits + 2


def test_multipart_upload_scores_like_json(client: httpx.Client, engine) -> None:
    image = png_bytes(104)
    response = client.post(
        "/v1/score", files={"image": ("photo.png", image, "image/png")}, data={"sentences": SENTENCES}
    )
    assert response.status_code == 200, response.text
    scores = response.json()["scores"]
    assert [row["sentence"] for row in scores] == SENTENCES
    expected = reference_scores(engine, image, SENTENCES)
    assert [row["match_prob"] for row in scores] == pytest.approx([s.match_prob for s in expected], abs=1e-6)
    # The image may also come as a base64 text field, as in JSON.
    as_text = client.post("/v1/score", files=[("image", (None, b64(image)))], data={"sentences": SENTENCES})
    assert as_text.status_code == 200, as_text.text
    assert as_text.json()["image"]["digest"] == hashlib.sha256(image).hexdigest()


def test_base64_with_line_breaks_or_data_url_is_accepted(client: httpx.Client) -> None:
    image = png_bytes(105)
    digest = hashlib.sha256(image).hexdigest()
    for text in (base64.encodebytes(image).decode(), f"data:image/png;base64,{b64(image)}"):
        response = client.post("/v1/score", json={"image": text, "sentences": SENTENCES[:1]})
        assert response.status_code == 200, response.text
        assert response.json()["image"]["digest"] == digest


def test_triplets_become_the_students_prompt_sentences(client: httpx.Client) -> None:
    triplets = [
        {"verb": "ride", "object": "horse"},
        "hop_on airplane",
        "walk",
        "hop on, sports ball",
        {"verb": "sit_instr", "object": "chair"},
        {"verb": "run"},
    ]
    response = client.post("/v1/score/triplets", json={"image": b64(png_bytes(106)), "triplets": triplets})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = [
        ("ride", "horse"),
        ("hop_on", "airplane"),
        ("walk", None),
        ("hop on", "sports ball"),
        ("sit_instr", "chair"),
        ("run", None),
    ]
    assert [(row["verb"], row["object"]) for row in body["scores"]] == expected
    assert [row["sentence"] for row in body["scores"]] == [triplet_sentence(v, o) for v, o in expected]
    assert body["scores"][0]["sentence"] == "a person ride a horse"
    assert body["scores"][1]["sentence"] == "a person hop on an airplane"
    assert body["variant"] == "full"


def test_triplet_variant_and_ranking(client: httpx.Client) -> None:
    response = client.post(
        "/v1/score/triplets?sort=desc",
        json={"image": b64(png_bytes(107)), "triplets": ["ride horse", "feed horse"], "variant": "verb"},
    )
    assert response.status_code == 200, response.text
    scores = response.json()["scores"]
    assert {row["sentence"] for row in scores} == {"a person ride something", "a person feed something"}
    assert scores[0]["match_prob"] >= scores[1]["match_prob"]


def test_triplets_by_multipart(client: httpx.Client) -> None:
    response = client.post(
        "/v1/score/triplets",
        files={"image": ("x.png", png_bytes(108), "image/png")},
        data={"triplets": ["ride horse", "hold cup"], "variant": "object"},
    )
    assert response.status_code == 200, response.text
    assert [row["sentence"] for row in response.json()["scores"]] == [
        "a person and a horse",
        "a person and a cup",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ride horse", ("ride", "horse")),
        ("ride sports ball", ("ride", "sports ball")),
        ("hop_on airplane", ("hop_on", "airplane")),
        (" hop on , sports ball ", ("hop on", "sports ball")),
        ("walk", ("walk", None)),
        ("stand,", ("stand", None)),
    ],
)
def test_parse_triplet_text(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_triplet_text(text) == expected


@pytest.mark.parametrize(
    ("triplets", "variant", "field", "fragment"),
    [
        (["no_interaction horse"], "full", "triplets[0]", "'no_interaction' makes no sentence"),
        (["ride horse", "walk"], "object", "triplets[1]", "needs an object"),
        (["ride horse", "   "], "full", "triplets[1]", "empty triplet"),
        ([{"verb": " "}], "full", "triplets[0].verb", "verb is empty"),
        ([{"verb": "ride", "object": ""}], "full", "triplets[0].object", "object is empty"),
        ([{"verb": 3}], "full", "triplets[0].verb", "valid string"),
        ([{"verb": "ride", "subject": "man"}], "full", "triplets[0].subject", "Extra inputs"),
        (
            ["ride horse", "ride " + "very " * 20 + "big horse"],
            "full",
            "triplets[1]",
            "over the limit of 16 tokens",
        ),
        ([], "full", "triplets", "no sentences"),
        (["ride horse"], "plural", "variant", "'full', 'verb' or 'object'"),
    ],
)
def test_triplet_errors_name_the_triplet(
    client: httpx.Client, triplets: list, variant: str, field: str, fragment: str
) -> None:
    response = client.post(
        "/v1/score/triplets", json={"image": b64(png_bytes(109)), "triplets": triplets, "variant": variant}
    )
    assert_error(response, 422, field, fragment)


# -------------------------------------------------------------------------------------- errors
def _json(**body: Any) -> dict[str, Any]:
    return {"json": {"image": b64(png_bytes(110)), "sentences": SENTENCES, **body}}


@pytest.mark.parametrize(
    ("request_kwargs", "status", "field", "fragments"),
    [
        (
            {"content": b'{"image": ', "headers": {"content-type": "application/json"}},
            422,
            "body",
            ("not valid JSON",),
        ),
        ({"json": {"image": b64(png_bytes(110))}}, 422, "sentences", ("Field required",)),
        (_json(extra=1), 422, "extra", ("Extra inputs are not permitted",)),
        (_json(sentences="a person ride a horse"), 422, "sentences", ("valid array",)),
        (_json(sentences=[]), 422, "sentences", ("no sentences; give 1 to 6",)),
        (_json(sentences=["fine", "word " * 30]), 422, "sentences[1]", ("over the limit of 16 tokens",)),
        (_json(sentences=["  "]), 422, "sentences[0]", ("empty",)),
        (_json(sentences=["a"] * 7), 413, "sentences", ("7 sentences, over the limit of 6",)),
        (_json(image="not base64!"), 422, "image", ("not valid base64",)),
        (_json(image=b64(b"hello, not an image")), 422, "image", ("not a decodable image",)),
        (_json(image=b64(png_bytes(111, (120, 100)))), 413, "image", ("over the limit of 30,000 bytes",)),
        (
            _json(image=b64(solid_png((600, 400)))),
            413,
            "image",
            ("240,000 pixels", "limit of 200,000 pixels"),
        ),
        (_json(image="data:image/png,abc"), 422, "image", ("must be base64",)),
        (
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "Content-Type",
            ("text/plain",),
        ),
        ({"content": b"hello"}, 415, "Content-Type", ("got 'none'",)),
        (
            {
                "files": [("image", (None, b64(png_bytes(1)))), ("other", ("a", b"x"))],
                "data": {"sentences": "x"},
            },
            422,
            "other",
            ("got a file",),
        ),
        ({"data": {"sentences": SENTENCES}}, 415, "Content-Type", ("x-www-form-urlencoded",)),
        ({**_json(), "params": {"timeout_ms": 0}}, 422, "timeout_ms", ("greater than or equal to 1",)),
        (
            {
                "files": [("image", ("a.png", png_bytes(1))), ("image", ("b.png", png_bytes(2)))],
                "data": {"sentences": "x"},
            },
            413,
            "image",
            ("2 images sent",),
        ),
        (
            {
                "files": [("image", ("a.png", png_bytes(1)))] + [("f", ("f", b"x"))] * 4,
                "data": {"sentences": "x"},
            },
            413,
            "body",
            ("Too many files",),
        ),
        (
            {"files": {"image": ("a.png", png_bytes(1))}, "data": {"sentences": "x", "colour": "red"}},
            422,
            "colour",
            ("Extra inputs",),
        ),
        (
            {"files": {"picture": ("a.png", png_bytes(1))}, "data": {"sentences": "x"}},
            422,
            "image",
            ("missing",),
        ),
        ({**_json(), "params": {"sort": "asc"}}, 422, "sort", ("'given' or 'desc'",)),
        # Regions: png_bytes(110) is 40 x 32 pixels.
        (
            _json(region={"human_box": [30, 2, 10, 20], "object_box": [1, 1, 5, 5]}),
            422,
            "region.human_box",
            ("human box [30, 2, 10, 20] is empty or inverted", "x1 < x2"),
        ),
        (
            _json(region={"human_box": [1, 1, 5, 5], "object_box": [1, 9, 5, 9]}),
            422,
            "region.object_box",
            ("object box", "empty or inverted"),
        ),
        (
            _json(region={"human_box": [1, 1, 5], "object_box": [1, 1, 5, 5]}),
            422,
            "region.human_box",
            ("at least 4 items",),
        ),
        (
            _json(region={"human_box": [1, 1, 5, 5], "object_box": [1, 1, 5, 5, 6]}),
            422,
            "region.object_box",
            ("at most 4 items",),
        ),
        (_json(region={"human_box": [1, 1, 5, 5]}), 422, "region.object_box", ("Field required",)),
        (
            _json(region={"human_box": [1, 1, 5, 5], "object_box": [1, "x", 5, 5]}),
            422,
            "region.object_box[1]",
            ("valid number",),
        ),
        (
            _json(region={"human_box": [1, 1, 5, 5], "object_box": [1, -3, 5, 5]}),
            422,
            "region.object_box[1]",
            ("below 0",),
        ),
        (
            _json(region={"human_box": [1, 1, 5, 5], "object_box": [2, 2, 60, 20]}),
            422,
            "region.object_box[2]",
            ("is 60: outside the image", "the image is 40x32 pixels"),
        ),
        (
            _json(region={"human_box": [1, 1, 5, 50], "object_box": [2, 2, 6, 20]}),
            422,
            "region.human_box[3]",
            ("is 50: outside the image", "y must be at most 32"),
        ),
        (
            _json(region={"human_box": [1, 1, 5, 5], "object_box": [1, 1, 5, 5], "verb": "ride"}),
            422,
            "region.verb",
            ("Extra inputs",),
        ),
        (
            {"files": {"image": ("a.png", png_bytes(110))}, "data": {"sentences": "x", "region": "[1, 2"}},
            422,
            "region",
            ("not valid JSON", '"human_box"'),
        ),
        (
            {
                "files": {"image": ("a.png", png_bytes(110))},
                "data": {"sentences": "x", "region": '{"human_box": [9, 1, 5, 5], "object_box": [1, 1, 5, 5]}'},
            },
            422,
            "region.human_box",
            ("inverted",),
        ),
    ],
)
def test_invalid_score_requests(
    client: httpx.Client, request_kwargs: dict[str, Any], status: int, field: str, fragments: tuple[str, ...]
) -> None:
    error = assert_error(client.post("/v1/score", **request_kwargs), status, field, *fragments)
    assert error["code"] == ("UNSUPPORTED_MEDIA_TYPE" if status == 415 else "INVALID_ARGUMENT")


# ------------------------------------------------------------------------------------- regions
# Inside the 40 x 32 test images; the union [2, 3, 20, 26] grown by 10 % is far from the whole image.
REGION = {"human_box": [2.0, 3.0, 14.0, 20.0], "object_box": [10.0, 8.0, 20.0, 26.0]}


def test_region_scores_the_pair_in_json_and_form_bodies(client: httpx.Client, engine) -> None:
    image = png_bytes(120)
    whole = client.post("/v1/score", json={"image": b64(image), "sentences": SENTENCES}).json()
    response = client.post("/v1/score", json={"image": b64(image), "sentences": SENTENCES, "region": REGION})
    assert response.status_code == 200, response.text
    pair = response.json()
    assert pair["region"] == REGION and whole["region"] is None
    assert [row["cached"] for row in pair["scores"]] == [False] * 3  # the whole image's scores are not the pair's
    region = Region.from_values([*REGION["human_box"], *REGION["object_box"]])
    prepared = engine.prepare_image(image, region=region)
    expected = engine.score([ImageSentences(prepared.digest, prepared, SENTENCES, region=region)])[0]
    assert [row["match_prob"] for row in pair["scores"]] == pytest.approx([s.match_prob for s in expected], abs=1e-6)
    assert [row["match_prob"] for row in pair["scores"]] != pytest.approx(
        [row["match_prob"] for row in whole["scores"]], abs=1e-4
    )
    # The same region as form text: the same view, so every score now comes from the cache.
    form = client.post(
        "/v1/score?sort=desc",
        files={"image": ("a.png", image, "image/png")},
        data={"sentences": SENTENCES, "region": json.dumps(REGION)},
    ).json()
    assert form["region"] == REGION
    assert [row["cached"] for row in form["scores"]] == [True] * 3
    assert sorted(form["scores"], key=lambda row: row["index"]) == [dict(row, cached=True) for row in pair["scores"]]
    # An empty form field is no region.
    empty = client.post(
        "/v1/score", files={"image": ("a.png", image)}, data={"sentences": SENTENCES, "region": ""}
    ).json()
    assert empty["region"] is None and [row["cached"] for row in empty["scores"]] == [True] * 3


def test_triplets_with_a_region(client: httpx.Client) -> None:
    image = png_bytes(121)
    body = {"image": b64(image), "triplets": ["ride horse", "feed horse"]}
    pair = client.post("/v1/score/triplets", json={**body, "region": REGION}).json()
    assert pair["region"] == REGION
    as_sentences = client.post(
        "/v1/score",
        json={"image": b64(image), "sentences": [row["sentence"] for row in pair["scores"]], "region": REGION},
    ).json()
    assert [row["cached"] for row in as_sentences["scores"]] == [True, True]  # the same (view, sentence) keys
    whole = client.post("/v1/score/triplets", json=body).json()
    assert [row["cached"] for row in whole["scores"]] == [False, False]


def test_body_over_max_message_bytes_is_413_by_length_and_while_streaming(client: httpx.Client) -> None:
    big = b'{"image": "' + b"A" * 130_000 + b'", "sentences": ["a"]}'
    by_length = client.post("/v1/score", content=big, headers={"content-type": "application/json"})
    assert_error(by_length, 413, "body", f"{len(big):,} bytes", "limit of 120,000 bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts while reading
        for start in range(0, len(big), 16_384):
            yield big[start : start + 16_384]

    streamed = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert_error(streamed, 413, "body", "limit of 120,000 bytes")


def test_unknown_routes_and_methods_answer_json(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nothing"), 404, None, "GET /v1/nothing: no such route")
    not_allowed = client.get("/v1/score")
    assert_error(not_allowed, 405, None, "GET /v1/score: method not allowed; allowed: POST")
    assert not_allowed.headers["allow"] == "POST"


# --------------------------------------------------------------------------- model, probes, docs
def test_model_info_health_and_readiness(client: httpx.Client, engine) -> None:
    info = client.get("/v1/model").json()
    assert info["fingerprint"] == engine.fingerprint
    assert info["limits"]["max_sentences_per_image"] == 6
    assert info["region_policy"] == "crop:margin=0.1"
    assert info["ready"] is True
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True}


def test_metrics_count_http_requests_by_route_and_status(client: httpx.Client, teacher: RunningHttp) -> None:
    labels = {"method": "HTTP POST /v1/score", "code": "422"}
    before = teacher.metric("hoidistill_teacher_requests_total", labels)
    errors_before = teacher.metric("hoidistill_teacher_errors_total", labels)
    client.post("/v1/score", json={"image": b64(png_bytes(1)), "sentences": []})
    text = client.get("/metrics").text
    line = f'hoidistill_teacher_requests_total{{code="422",method="HTTP POST /v1/score"}} {before + 1}'
    assert line in text
    assert teacher.metric("hoidistill_teacher_errors_total", labels) == errors_before + 1
    assert "hoidistill_teacher_images_encoded_total" in text


def test_openapi_documents_both_bodies_and_every_error(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/v1/score"]["post"]
    content = operation["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ScoreRequest"}
    assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert {"401", "413", "415", "422", "429", "503"} <= set(operation["responses"])
    components = schema["components"]["schemas"]
    assert {"ScoreRequest", "TripletsRequest", "Triplet", "RegionBody", "ErrorResponse"} <= set(components)
    # The region: optional in both bodies, two boxes of exactly four numbers.
    for request in ("ScoreRequest", "TripletsRequest"):
        assert "region" in components[request]["properties"] and "region" not in components[request]["required"]
    box = components["RegionBody"]["properties"]["human_box"]
    assert (box["minItems"], box["maxItems"], box["items"]["type"]) == (4, 4, "number")
    assert components["RegionBody"]["required"] == ["human_box", "object_box"]
    assert "region" in content["multipart/form-data"]["schema"]["properties"]
    assert "securitySchemes" not in schema["components"]  # no token configured
    parameters = {p["name"] for p in schema["paths"]["/v1/score/triplets"]["post"]["parameters"]}
    assert parameters == {"sort", "timeout_ms"}


def test_docs_and_page_are_served_locally(client: httpx.Client) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/docs/assets/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = client.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert "innerHTML" not in client.get("/static/app.js").text


# ------------------------------------------------------------------------------- token and TLS
def test_bearer_token_guards_the_api_but_not_probes_page_or_docs(tiny_blip_dir: Path) -> None:
    with (
        running_http(teacher_settings(tiny_blip_dir, auth_token=TOKEN)) as teacher,
        teacher.client() as client,
    ):
        body = {"image": b64(png_bytes(120)), "sentences": SENTENCES[:1]}
        missing = client.post("/v1/score", json=body)
        assert_error(missing, 401, "Authorization", "missing bearer token")
        assert missing.json()["error"]["code"] == "UNAUTHENTICATED"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = client.post("/v1/score", json=body, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "Authorization", "invalid bearer token")
        for path in ("/v1/model", "/metrics"):
            assert client.get(path).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post("/v1/score", json=body, headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        for path in ("/healthz", "/readyz", "/", "/static/app.js", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert schema["paths"]["/v1/score"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]
        assert (
            teacher.metric("hoidistill_teacher_requests_total", {"method": "HTTP POST /v1/score", "code": "401"}) == 2
        )


def test_tls_and_mutual_tls(tiny_blip_dir: Path, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    trust = ssl.create_default_context(cafile=str(certs.ca))
    settings = teacher_settings(tiny_blip_dir, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    with running_http(settings) as teacher:
        assert teacher.url.startswith("https://")
        with teacher.client(verify=trust) as client:
            assert client.get("/readyz").status_code == 200
        with httpx.Client(timeout=10) as plain, pytest.raises(httpx.TransportError):
            plain.get(f"http://127.0.0.1:{teacher.server.port}/readyz")

    mutual = teacher_settings(
        tiny_blip_dir,
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_client_ca=str(certs.ca),
    )
    with running_http(mutual) as teacher:
        with teacher.client(verify=trust) as client, pytest.raises(httpx.TransportError):
            client.get("/readyz")
        with_cert = ssl.create_default_context(cafile=str(certs.ca))
        with_cert.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        with teacher.client(verify=with_cert) as client:
            assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------- readiness, load, deadlines
def test_not_ready_and_draining_answer_503_with_retry_after(tiny_blip_dir: Path) -> None:
    with (
        running_http(teacher_settings(tiny_blip_dir), start_service=False) as teacher,
        teacher.client() as client,
    ):
        body = {"image": b64(png_bytes(130)), "sentences": SENTENCES[:1]}
        not_ready = client.post("/v1/score", json=body)
        error = assert_error(not_ready, 503, None, "not ready yet")
        assert error["code"] == "UNAVAILABLE" and error["retry_after_ms"] == 1000
        assert not_ready.headers["retry-after"] == "1"
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/model").json()["ready"] is False

        teacher.call(teacher.service.start())
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/score", json=body).status_code == 200

        async def begin_drain() -> None:  # what SIGTERM does first
            teacher.drain.begin()

        teacher.call(begin_drain())
        assert_error(client.get("/readyz"), 503, None, "draining")
        assert_error(client.post("/v1/score", json=body), 503, None, "draining")


def test_full_queue_is_429_and_a_passed_deadline_504(tiny_blip_dir: Path) -> None:
    # The engine waits at a gate the test opens (not a timing window): while it is shut, the first
    # request sits in the engine, and what comes next waits in the one-slot queue.
    settings = teacher_settings(tiny_blip_dir, max_queue=1)
    service, gated = gated_service(settings)
    with running_http(settings, service=service) as teacher, teacher.client() as client:
        outcome: dict[str, httpx.Response] = {}

        def post(name: str, seed: int, query: str = "") -> threading.Thread:
            body = {"image": b64(png_bytes(seed)), "sentences": [name]}
            thread = threading.Thread(
                target=lambda: outcome.setdefault(name, client.post(f"/v1/score{query}", json=body))
            )
            thread.start()
            return thread

        held = post("held", 139)
        assert gated.entered.wait(timeout=60)
        # Queued behind the held request, past its own deadline: 504, and its slot is freed.
        late = assert_error(
            client.post("/v1/score?timeout_ms=200", json={"image": b64(png_bytes(140)), "sentences": ["a"]}),
            504,
            None,
            "deadline exceeded",
        )
        assert late["code"] == "DEADLINE_EXCEEDED"
        wait_until(lambda: teacher.metric("hoidistill_teacher_queue_items") == 0, "the late work is dropped")
        waiting = post("waiting", 141)
        wait_until(lambda: teacher.metric("hoidistill_teacher_queue_items") == 1, "a request is queued")
        full = client.post("/v1/score", json={"image": b64(png_bytes(142)), "sentences": ["b"]})
        error = assert_error(full, 429, None, "queue is full", "max_queue=1")
        assert error["code"] == "RESOURCE_EXHAUSTED" and error["retry_after_ms"] >= 1
        assert int(full.headers["retry-after"]) >= 1
        gated.gate.set()
        held.join(timeout=60)
        waiting.join(timeout=60)
        assert outcome["held"].status_code == 200 and outcome["waiting"].status_code == 200


# ---------------------------------------------------------------------------------- the server
def test_port_in_use_and_unreadable_certificate_fail_clearly(tiny_blip_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HttpServerError, match=rf"http_port: cannot listen on 127.0.0.1:{port}"):
            start_http(teacher_settings(tiny_blip_dir, http_port=port))
    missing = tmp_path / "missing.pem"
    with pytest.raises(AuthConfigError, match="tls_cert: cannot read"):
        start_http(teacher_settings(tiny_blip_dir, tls_cert=str(missing), tls_key=str(missing)))


def test_stop_closes_the_port(tiny_blip_dir: Path) -> None:
    teacher = start_http(teacher_settings(tiny_blip_dir))
    port = teacher.server.port
    with teacher.client() as client:
        assert client.get("/healthz").status_code == 200
    teacher.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
