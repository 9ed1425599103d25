"""Regions (a human-object pair of an image) through every door of a real teacher on loopback.

The native gRPC API through its generated stubs and ``TeacherClient``; the HTTP API (its own
server on the same tiny model); KServe v2 through ``tritonclient``. A pair's scores are the
engine's on that view, the same through every door, cached per (image, region, sentence), and
never the whole image's or another pair's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from testkit.http import RunningHttp, b64, running_http
from testkit.teacher import SCORE_METHOD, RunningTeacher, png_bytes, running_teacher, teacher_settings

from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.client import TeacherClient
from teacher_server.engine import ImageSentences, ItmEngine
from teacher_server.hoi.region import Region

torch.set_num_threads(1)

SENTENCES = ["a person ride a horse", "a person feed a horse", "a person hold a cup"]
# png_bytes images are 40 x 32 pixels. The unions of these boxes, grown by the default crop
# margin (10 % each side), are [0.2, 1.3, 21.8, 27.7] and [18.2, 0, 39.4, 32]: two different
# crops, both far from the whole image.
PAIR_A = Region(human=(2.0, 3.0, 14.0, 20.0), object=(10.0, 8.0, 20.0, 26.0))
PAIR_B = Region(human=(20.0, 2.0, 36.0, 18.0), object=(24.0, 12.0, 38.0, 30.0))
# PAIR_A moved by less than half a pixel: the same canonical region (whole pixels), the same view.
PAIR_A_NUDGED = Region(human=(2.3, 2.8, 14.2, 20.4), object=(10.0, 8.0, 19.6, 26.0))


def message(region: Region) -> pb.Region:
    return pb.Region(human_box=region.human, object_box=region.object)


def item(image: bytes, region: Region | None, *, send_bytes: bool = True) -> pb.ImageSentences:
    return pb.ImageSentences(
        digest=hashlib.sha256(image).hexdigest(),
        image=image if send_bytes else b"",
        sentences=SENTENCES,
        region=message(region) if region is not None else None,
    )


def region_scores(engine: ItmEngine, image: bytes, region: Region | None) -> list[float]:
    """The engine's match probabilities of SENTENCES on ``region`` of ``image`` (None: whole image)."""
    prepared = engine.prepare_image(image, region=region)
    scores = engine.score([ImageSentences(prepared.digest, prepared, SENTENCES, region=region)])[0]
    return [score.match_prob for score in scores]


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningTeacher]:
    with running_teacher(teacher_settings(tiny_blip_dir, max_sentences_per_image=8)) as running:
        yield running


@pytest.fixture(scope="module")
def http(tiny_blip_dir: Path) -> Iterator[RunningHttp]:
    with running_http(teacher_settings(tiny_blip_dir)) as running:
        yield running


@pytest.fixture
def stub(teacher: RunningTeacher) -> Iterator[pb_grpc.TeacherServiceStub]:
    with grpc.insecure_channel(teacher.target) as channel:
        yield pb_grpc.TeacherServiceStub(channel)


def score(stub: pb_grpc.TeacherServiceStub, *items: pb.ImageSentences) -> list[pb.ItemScores]:
    return list(stub.Score(pb.ScoreRequest(items=list(items)), timeout=60).items)


def probs(result: pb.ItemScores) -> list[float]:
    return [s.match_prob for s in result.scores]


def cached(result: pb.ItemScores) -> list[bool]:
    return [s.cached for s in result.scores]


# ------------------------------------------------------------------------------------- native
def test_a_pair_is_cached_per_region_and_never_confused(stub, engine) -> None:
    image = png_bytes(700)
    (first,) = score(stub, item(image, PAIR_A))
    assert first.status == pb.ITEM_STATUS_OK and cached(first) == [False] * 3
    assert probs(first) == pytest.approx(region_scores(engine, image, PAIR_A), abs=1e-6)

    (again,) = score(stub, item(image, PAIR_A))
    assert cached(again) == [True] * 3 and probs(again) == probs(first)
    (nudged,) = score(stub, item(image, PAIR_A_NUDGED))  # same whole pixels: same key
    assert cached(nudged) == [True] * 3 and probs(nudged) == probs(first)

    other, whole = score(stub, item(image, PAIR_B), item(image, None))  # one request, two more views
    assert cached(other) == [False] * 3 and cached(whole) == [False] * 3
    assert probs(other) == pytest.approx(region_scores(engine, image, PAIR_B), abs=1e-6)
    assert probs(whole) == pytest.approx(region_scores(engine, image, None), abs=1e-6)
    assert len({tuple(probs(first)), tuple(probs(other)), tuple(probs(whole))}) == 3


def test_digest_only_with_an_unheld_region_asks_for_the_image(stub, teacher) -> None:
    image = png_bytes(701)
    (whole,) = score(stub, item(image, None))  # the whole image is now held and cached...
    assert whole.status == pb.ITEM_STATUS_OK
    (pair,) = score(stub, item(image, PAIR_A, send_bytes=False))  # ...but not this pair's view
    assert pair.status == pb.ITEM_STATUS_IMAGE_REQUIRED and not pair.scores

    # The client sends digests first and the bytes of what the server asks for: two calls.
    calls = teacher.metric("hoidistill_teacher_requests_total", {"method": SCORE_METHOD, "code": "OK"})
    with TeacherClient(teacher.target, timeout_s=60) as client:
        (scores,) = client.score([image], [SENTENCES], regions=[PAIR_A])
        assert [s.cached for s in scores] == [False] * 3
        assert teacher.metric("hoidistill_teacher_requests_total", {"method": SCORE_METHOD, "code": "OK"}) == calls + 2
        (again,) = client.score([image], [SENTENCES], regions=[list(PAIR_A.values())])  # 8 numbers work too
    assert [s.cached for s in again] == [True] * 3
    assert [s.match_prob for s in again] == [s.match_prob for s in scores]
    assert teacher.metric("hoidistill_teacher_requests_total", {"method": SCORE_METHOD, "code": "OK"}) == calls + 3
    (digest_only,) = score(stub, item(image, PAIR_A, send_bytes=False))  # cached: no bytes needed now
    assert digest_only.status == pb.ITEM_STATUS_OK and cached(digest_only) == [True] * 3


def test_model_info_names_the_region_policy(stub, teacher) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.region_policy == "crop:margin=0.1"  # EngineSettings' defaults
    with TeacherClient(teacher.target, timeout_s=30) as client:
        assert client.model_info().region_policy == "crop:margin=0.1"


@pytest.mark.parametrize(
    ("region", "field", "detail"),
    [
        (pb.Region(human_box=[1, 1, 5], object_box=[1, 1, 5, 5]), "items[0].region.human_box", "got 3"),
        (pb.Region(human_box=[1, 1, 5, 5]), "items[0].region.object_box", "got 0"),
        (pb.Region(human_box=[9, 1, 5, 5], object_box=[1, 1, 5, 5]), "items[0].region[0:4]", "inverted"),
        (pb.Region(human_box=[1, 1, 5, 5], object_box=[1, 7, 5, 7]), "items[0].region[4:8]", "inverted"),
        (pb.Region(human_box=[1, 1, 5, 5], object_box=[1, 1, 60, 20]), "items[0].region[6]", "outside the image"),
        (pb.Region(human_box=[1, 1, 5, float("nan")], object_box=[1, 1, 5, 5]), "items[0].region[3]", "finite"),
    ],
)
def test_an_invalid_region_is_invalid_argument_naming_it(stub, region, field, detail) -> None:
    image = png_bytes(702)
    request = pb.ScoreRequest(
        items=[pb.ImageSentences(digest=hashlib.sha256(image).hexdigest(), image=image, sentences=SENTENCES[:1])]
    )
    request.items[0].region.CopyFrom(region)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: "), caught.value.details()
    assert detail in caught.value.details()


# ----------------------------------------------------------------------------- every door agrees
def test_http_native_and_kserve_give_the_pair_the_same_scores(teacher, http, engine) -> None:
    image = png_bytes(703)
    expected = region_scores(engine, image, PAIR_A)
    with TeacherClient(teacher.target, timeout_s=60) as client:
        (native,) = client.score([image], [SENTENCES], regions=[PAIR_A])
        (native_whole,) = client.score([image], [SENTENCES])
    region_body = {"human_box": list(PAIR_A.human), "object_box": list(PAIR_A.object)}
    with http.client() as web:
        body = web.post("/v1/score", json={"image": b64(image), "sentences": SENTENCES, "region": region_body})
        assert body.status_code == 200, body.text
        answer = body.json()
        whole = web.post("/v1/score", json={"image": b64(image), "sentences": SENTENCES}).json()
    kserve = triton.InferenceServerClient(url=teacher.target)
    try:
        inputs = [triton.InferInput(name, [3], "BYTES") for name in ("IMAGE", "TEXT")]
        inputs[0].set_data_from_numpy(np.array([image] * 3, dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=np.object_))
        region_input = triton.InferInput("REGION", [3, 8], "FP32")
        region_input.set_data_from_numpy(np.array([PAIR_A.values()] * 3, dtype=np.float32))
        by_kserve = kserve.infer("blip_itm", [*inputs, region_input]).as_numpy("MATCH_PROB").tolist()
    finally:
        kserve.close()

    by_native = [s.match_prob for s in native]
    by_http = [row["match_prob"] for row in answer["scores"]]
    assert by_native == pytest.approx(expected, abs=1e-6)
    assert by_http == by_native  # two servers, one model: the same float32 scores
    assert by_kserve == pytest.approx(by_native, abs=1e-7)  # FP32 on the wire
    assert answer["region"] == region_body
    assert by_native != pytest.approx([s.match_prob for s in native_whole], abs=1e-4)
    assert by_http != pytest.approx([row["match_prob"] for row in whole["scores"]], abs=1e-4)
