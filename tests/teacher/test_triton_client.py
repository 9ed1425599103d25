"""``TritonTeacherClient`` against the teacher's own KServe v2 endpoint ([N] tensors, no batch dimension).

The same client against a real Triton server ([N, 1] tensors, dynamic batching) is tested in
``test_triton_deploy.py``; here: its helpers, its error mapping, and that the shape scheme is
read from the endpoint, so one client speaks to both servers.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from testkit import REPO
from testkit.teacher import RunningTeacher, png_bytes, reference_engine, running_teacher, teacher_settings

from teacher_server.client import TeacherRpcError
from teacher_server.engine import ItmEngine
from teacher_server.errors import InvalidInputError, TeacherError
from teacher_server.hoi.region import Region
from teacher_server.triton_client import (
    TritonTeacherClient,
    _chunks,
    check_teacher_config,
    parse_model_info_metric,
    parse_triton_url,
)

torch.set_num_threads(1)
TOKEN = "triton-client-test-token"


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningTeacher]:
    settings = teacher_settings(tiny_blip_dir, auth_token=TOKEN, max_sentence_tokens=16)
    with running_teacher(settings) as running:
        yield running


@pytest.fixture(scope="module")
def engine(tiny_blip_dir: Path) -> ItmEngine:
    return reference_engine(tiny_blip_dir)


@pytest.fixture
def client(teacher: RunningTeacher) -> Iterator[TritonTeacherClient]:
    with TritonTeacherClient(f"triton://{teacher.target}", token=TOKEN, timeout_s=60) as client:
        yield client


def engine_scores(
    engine: ItmEngine, image: bytes, sentences: list[str], region: Region | None = None
) -> list[tuple[float, float]]:
    from teacher_server.engine import ImageSentences

    prepared = engine.prepare_image(image, region=region)
    scores = engine.score([ImageSentences(prepared.digest, prepared, sentences, region=region)])[0]
    return [(score.match_logit, score.match_prob) for score in scores]


# ------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("triton://triton.example:8001", "triton.example:8001"),
        ("triton://10.0.0.5:9001/", "10.0.0.5:9001"),
        ("localhost:8001", "localhost:8001"),
        ("triton://teacher-triton", "teacher-triton:8001"),
    ],
)
def test_parse_triton_url(url: str, address: str) -> None:
    assert parse_triton_url(url) == address


@pytest.mark.parametrize(("url", "message"), [("grpc://h:1", "TeacherClient"), ("triton://", "no host")])
def test_parse_triton_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_triton_url(url)


def test_chunks_bound_pairs_and_bytes() -> None:
    assert _chunks([10] * 5, max_pairs=2, max_bytes=1000) == [range(0, 2), range(2, 4), range(4, 5)]
    assert _chunks([10, 10, 10], max_pairs=10, max_bytes=25) == [range(0, 2), range(2, 3)]
    # A pair larger than the budget still goes, alone.
    assert _chunks([5, 100, 5], max_pairs=10, max_bytes=50) == [range(0, 1), range(1, 2), range(2, 3)]
    assert _chunks([], max_pairs=4, max_bytes=10) == []


def test_parse_model_info_metric_keeps_the_model_and_unescapes() -> None:
    text = "\n".join(
        [
            "# HELP hoidistill_teacher_model_info 1 per model instance",
            "# TYPE hoidistill_teacher_model_info gauge",
            'hoidistill_teacher_model_info{fingerprint="ab12",instance="blip_itm_0_1",model="blip_itm",'
            'model_id="C:\\\\m \\"x\\""} 1',
            'hoidistill_teacher_model_info{fingerprint="ab12",instance="blip_itm_0_0",model="blip_itm"} 1',
            'hoidistill_teacher_model_info{fingerprint="ffff",instance="other_0",model="other"} 1',
            'hoidistill_teacher_images_encoded_total{instance="blip_itm_0_0",model="blip_itm"} 3',
        ]
    )
    instances = parse_model_info_metric(text, "blip_itm")
    assert [i["instance"] for i in instances] == ["blip_itm_0_0", "blip_itm_0_1"]
    assert instances[1]["model_id"] == 'C:\\m "x"'
    assert {i["fingerprint"] for i in instances} == {"ab12"}


def test_importable_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import teacher_server.triton_client as t\n"
        "assert 'transformers' not in sys.modules\n"
        "print(t.TritonTeacherClient.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TritonTeacherClient"


# ----------------------------------------------------------------------- the teacher's own endpoint
def test_scores_equal_the_engine_through_the_teachers_kserve_endpoint(client, engine) -> None:
    horse, cup = png_bytes(301), png_bytes(302)
    ride, feed, hold = "a person ride a horse", "a person feed a horse", "a person hold a cup"
    scores = client.score([horse, cup, horse, png_bytes(303)], [[ride, feed, ride], [hold], [ride], []])
    assert [len(group) for group in scores] == [3, 1, 1, 0]
    for image, group, answer in ((horse, [ride, feed, ride], scores[0]), (cup, [hold], scores[1])):
        expected = engine_scores(engine, image, group)
        for score, (logit, prob) in zip(answer, expected, strict=True):
            assert score.match_logit == pytest.approx(logit, abs=1e-5)
            assert score.match_prob == pytest.approx(prob, abs=1e-5)
    assert scores[2][0] == scores[0][0] == scores[0][2]  # same image bytes, same sentence: one pair sent
    assert not any(score.cached for group in scores for score in group)  # KServe v2 carries no cache flag


def test_requests_are_cut_to_pairs_per_request(teacher, engine) -> None:
    images = [png_bytes(310 + i) for i in range(3)]
    sentences = [["a person ride a horse", f"a person hold a cup {i}"] for i in range(3)]
    with TritonTeacherClient(teacher.target, token=TOKEN, pairs_per_request=2, concurrency=3) as client:
        scores = client.score(images, sentences)
    for image, group, answer in zip(images, sentences, scores, strict=True):
        expected = engine_scores(engine, image, group)
        assert [s.match_prob for s in answer] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_model_info_of_the_teachers_endpoint(client, engine) -> None:
    info = client.model_info()
    assert info.ready and info.model_name == "blip_itm" and info.version == "1"
    assert info.max_batch_size == 0  # [N] tensors
    assert info.fingerprint == engine.fingerprint
    assert info.model_id == engine.model_id
    assert (info.dtype, info.itm_start_token) == ("fp32", "cls")
    assert info.region_policy == "crop:margin=0.1" and info.regions


# Inside png_bytes' 40 x 32 images; the unions grown by 10 % are far from the whole image.
PAIR_A = Region.from_values((2, 3, 14, 20, 10, 8, 20, 26))
PAIR_B = (20, 2, 36, 18, 24, 12, 38, 30)  # as 8 numbers, as a caller may pass it


def test_regions_are_sent_as_the_region_input(client, teacher, engine) -> None:
    image, other = png_bytes(330), png_bytes(331)
    ride, hold = "a person ride a horse", "a person hold a cup"
    encoded_before = teacher.metric("hoidistill_teacher_images_encoded_total")
    scores = client.score(
        [image, image, image, other], [[ride, hold], [ride], [ride], [hold]], regions=[PAIR_A, PAIR_B, None, PAIR_A]
    )
    # Four views (three of `image`, one of `other`): four vision encodings, the pairs in one request.
    assert teacher.metric("hoidistill_teacher_images_encoded_total") == encoded_before + 4
    for source, group, region, answer in (
        (image, [ride, hold], PAIR_A, scores[0]),
        (image, [ride], Region.from_values(PAIR_B), scores[1]),
        (image, [ride], None, scores[2]),
        (other, [hold], PAIR_A, scores[3]),
    ):
        expected = engine_scores(engine, source, group, region)
        assert [s.match_logit for s in answer] == pytest.approx([logit for logit, _ in expected], abs=1e-5)
        assert [s.match_prob for s in answer] == pytest.approx([prob for _, prob in expected], abs=1e-6)
    assert len({scores[0][0].match_prob, scores[1][0].match_prob, scores[2][0].match_prob}) == 3
    # Without regions nothing changes: the whole image, as regions=[None].
    assert client.score([image], [[ride]]) == [[scores[2][0]]]


def test_region_errors_name_the_region(client) -> None:
    with pytest.raises(InvalidInputError) as caught:
        client.score([png_bytes(332)], [["a person ride a horse"]], regions=[(1, 2, 3, 4, 5, 6, 7)])
    assert caught.value.field == "regions[0]" and "got 7" in str(caught.value)
    with pytest.raises(ValueError, match="1 images but 2 regions"):
        client.score([png_bytes(332)], [["a person ride a horse"]], regions=[None, None])
    with pytest.raises(TeacherRpcError) as server_side:  # outside the 40 x 32 image: known once decoded
        client.score([png_bytes(332)], [["a person ride a horse"]], regions=[(1, 1, 5, 5, 1, 1, 60, 20)])
    assert server_side.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert server_side.value.details.startswith("REGION[0][6]: is 60: outside the image")


def test_a_model_without_region_input_cannot_score_regions(client) -> None:
    client.score([png_bytes(333)], [["a person ride a horse"]])  # reads the endpoint's layout
    assert client._layout is not None
    client._layout = dataclasses.replace(client._layout, regions=False)  # as an older model repository
    with pytest.raises(TeacherError, match="has no REGION input"):
        client.score([png_bytes(333)], [["a person ride a horse"]], regions=[PAIR_A])
    assert len(client.score([png_bytes(333)], [["a person ride a horse"]], regions=[None])[0]) == 1


def test_invalid_input_raises_teacher_rpc_error_naming_the_element(client) -> None:
    with pytest.raises(TeacherRpcError) as caught:
        client.score(
            [png_bytes(320)], [["a person ride a horse", "a person ride a horse and hold a cup with a dog on a bench"]]
        )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "TEXT[1]" in caught.value.details and "16 tokens" in caught.value.details


def test_missing_token_is_unauthenticated(teacher) -> None:
    with TritonTeacherClient(teacher.target, timeout_s=10) as client, pytest.raises(TeacherRpcError) as caught:
        client.score([png_bytes(321)], [["a person ride a horse"]])
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_model_is_not_found(teacher) -> None:
    with TritonTeacherClient(teacher.target, token=TOKEN, model="resnet50") as client:
        with pytest.raises(TeacherRpcError) as caught:
            client.score([png_bytes(322)], [["a person ride a horse"]])
        assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_arguments_are_checked_before_any_call(client) -> None:
    with pytest.raises(ValueError, match="2 images but 1 sentence lists"):
        client.score([b"a", b"b"], [["x"]])
    with pytest.raises(ValueError, match=r"sentences\[0\] is a str"):
        client.score([b"a"], ["a person ride a horse"])
    with pytest.raises(ValueError, match=r"sentences\[0\]\[1\] is a int"):
        client.score([b"a"], [["a person ride a horse", 3]])
    with pytest.raises(ValueError, match=r"images\[0\]: cannot read"):
        client.score(["/nonexistent/cat.jpg"], [["a person pet a cat"]])
    assert client.score([], []) == []
    assert client.score([b"never sent"], [[]]) == [[]]
    with pytest.raises(ValueError, match="pairs_per_request"):
        TritonTeacherClient("localhost:1", pairs_per_request=0)


def test_unreachable_endpoint_fails_within_the_deadline() -> None:
    from testkit.servers import free_port

    address = f"127.0.0.1:{free_port()}"
    with (
        TritonTeacherClient(address, timeout_s=1.0, backoff_s=0.05) as client,
        pytest.raises(TeacherRpcError) as caught,
    ):
        client.score([png_bytes(323)], [["a person ride a horse"]])
    assert caught.value.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def test_a_model_without_the_teacher_tensors_is_refused(client) -> None:
    config = client._client.get_model_config("blip_itm", headers=client._headers, as_json=True)["config"]
    check_teacher_config(config, "blip_itm")  # the real one passes
    for tensor in config["output"]:
        if tensor["name"] == "MATCH_PROB":
            tensor["name"] = "SCORES"
    with pytest.raises(TeacherError, match=r"resnet at x is not the teacher: it lacks MATCH_PROB \(TYPE_FP32\)"):
        check_teacher_config(config, "resnet at x")
    with pytest.raises(TeacherError, match="it has no tensors"):
        check_teacher_config({}, "empty")
