"""``POST /v1/explain`` on a real uvicorn, scoring service and tiny BLIP: JSON and PNG answers,
errors that name the field, the busy limit, and scoring that still answers during an explain."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from testkit.http import RunningHttp, b64, running_http
from testkit.teacher import png_bytes, teacher_settings

import teacher_server.explain
from teacher_server.engine import ItmEngine
from teacher_server.explain import Explainer

SENTENCES = ["a person ride a horse", "a person hold a cup"]
IMAGE = png_bytes(11, (50, 40))


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningHttp]:
    settings = teacher_settings(tiny_blip_dir, explain_max_sentences=3, max_sentence_tokens=16)
    with running_http(settings) as running:
        yield running


@pytest.fixture
def client(teacher: RunningHttp) -> Iterator[httpx.Client]:
    with teacher.client() as http_client:
        yield http_client


def assert_error(response: httpx.Response, status: int, field: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and fragment in error["message"], error


def test_json_answer_holds_the_grid_of_each_sentence(client: httpx.Client, engine: ItmEngine) -> None:
    response = client.post("/v1/explain", json={"image": b64(IMAGE), "sentences": SENTENCES})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["rows"], body["cols"], body["layer"], body["target"]) == (4, 4, 0, "match_logit")
    assert body["view_box"] == [0, 0, 50, 40] and body["region"] is None
    assert body["model"]["fingerprint"] == engine.fingerprint
    direct = Explainer(engine).explain(IMAGE, SENTENCES)
    scores = client.post("/v1/score", json={"image": b64(IMAGE), "sentences": SENTENCES}).json()["scores"]
    for index, (entry, expected, score) in enumerate(zip(body["maps"], direct.maps, scores, strict=True)):
        assert (entry["index"], entry["sentence"]) == (index, SENTENCES[index])
        grid = torch.tensor(entry["grid"])
        assert grid.shape == (4, 4) and float(grid.min()) >= 0.0 and float(grid.max()) == pytest.approx(1.0)
        torch.testing.assert_close(grid, expected.grid, atol=1e-5, rtol=0)
        assert entry["match_prob"] == pytest.approx(score["match_prob"], abs=1e-5)


def test_png_answer_by_field_or_accept_header_is_the_image_with_the_map(client: httpx.Client) -> None:
    by_form = client.post(
        "/v1/explain",
        files={"image": ("a.png", IMAGE)},
        data={"sentences": SENTENCES[:1], "format": "png", "layer": "-1"},
    )
    by_accept = client.post(
        "/v1/explain",
        json={"image": b64(IMAGE), "sentences": SENTENCES[:1], "layer": -1},
        headers={"Accept": "image/png"},
    )
    for response in (by_form, by_accept):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-layer"] == "1"
        assert 0.0 < float(response.headers["x-match-prob"]) < 1.0
        picture = Image.open(io.BytesIO(response.content))
        assert picture.format == "PNG" and picture.size == (50, 40)
    assert by_form.content == by_accept.content
    original = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    assert Image.open(io.BytesIO(by_form.content)).convert("RGB").tobytes() != original.tobytes()


def test_a_region_maps_its_crop_of_the_original(client: httpx.Client) -> None:
    region = {"human_box": [5, 5, 20, 35], "object_box": [25, 10, 45, 30]}
    body = client.post("/v1/explain", json={"image": b64(IMAGE), "sentences": SENTENCES, "region": region}).json()
    # crop, margin 0.1: the union (5, 5, 45, 35) grows by 4 x 3 px on each side.
    assert body["view_box"] == [1, 2, 49, 38] and body["region"] == region


@pytest.mark.parametrize(
    ("body", "status", "field", "fragment"),
    [
        ({"sentences": []}, 422, "sentences", "no sentences; give 1 to 3"),
        ({"sentences": ["a"] * 4}, 413, "sentences", "over the limit of 3 per evidence-map request"),
        ({"sentences": ["a person", ""]}, 422, "sentences[1]", "sentence is empty"),
        ({"sentences": SENTENCES, "format": "png"}, 422, "sentences", "a PNG shows one sentence's map"),
        ({"sentences": ["a"], "format": "gif"}, 422, "format", "'json' or 'png'"),
        ({"sentences": ["a"], "layer": 2}, 422, "layer", "layer 2 is not one of the text tower's 2 layers"),
        ({"sentences": ["a"], "image": b64(b"nope")}, 422, "image", "not a decodable image"),
        (
            {"sentences": ["a"], "region": {"human_box": [0, 0, 5, 5], "object_box": [0, 0, 60, 5]}},
            422,
            "region.object_box[2]",
            "outside the image",
        ),
        ({"sentences": ["a"], "colour": "red"}, 422, "colour", "Extra inputs"),
    ],
)
def test_errors_name_the_field(
    client: httpx.Client, body: dict[str, Any], status: int, field: str, fragment: str
) -> None:
    assert_error(client.post("/v1/explain", json={"image": b64(IMAGE), **body}), status, field, fragment)


def test_scoring_answers_while_an_explain_runs_and_a_second_explain_gets_429(
    client: httpx.Client, teacher: RunningHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = teacher_server.explain.grad_cam

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(60), "the test never released the explain"
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_server.explain, "grad_cam", held)
    answers: dict[str, httpx.Response] = {}

    def explain_in_background() -> None:
        with teacher.client() as other:
            answers["first"] = other.post("/v1/explain", json={"image": b64(IMAGE), "sentences": SENTENCES[:1]})

    worker = threading.Thread(target=explain_in_background)
    worker.start()
    try:
        assert entered.wait(60), "the explain never started"
        # The explain is mid-computation: scoring goes through the batcher all the same.
        scored = client.post("/v1/score", json={"image": b64(png_bytes(12)), "sentences": SENTENCES})
        assert scored.status_code == 200 and len(scored.json()["scores"]) == 2
        busy = client.post("/v1/explain", json={"image": b64(IMAGE), "sentences": SENTENCES[:1]})
        assert busy.status_code == 429, busy.text
        assert "already running, the limit (explain_concurrency)" in busy.json()["error"]["message"]
        assert int(busy.headers["retry-after"]) >= 1
    finally:
        release.set()
        worker.join(60)
    assert answers["first"].status_code == 200, answers["first"].text


def test_openapi_and_model_info_describe_the_route(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/v1/explain"]["post"]
    content = operation["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ExplainRequest"}
    assert {"image", "sentences", "region", "layer", "format"} <= set(
        content["multipart/form-data"]["schema"]["properties"]
    )
    answers = operation["responses"]["200"]["content"]
    assert answers["image/png"]["schema"]["format"] == "binary"
    assert answers["application/json"]["schema"] == {"$ref": "#/components/schemas/ExplainResponse"}
    assert {"413", "422", "429", "503"} <= set(operation["responses"])
    info = client.get("/v1/model").json()
    assert info["explain"] == {"layer": 0, "layers": 2, "max_sentences": 3, "concurrency": 1}
