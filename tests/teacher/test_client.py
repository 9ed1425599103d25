"""TeacherClient / AsyncTeacherClient against a real server on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from testkit import REPO
from testkit.servers import free_port
from testkit.teacher import (
    RunningTeacher,
    gated_service,
    png_bytes,
    reference_scores,
    running_teacher,
    score_calls,
    start_teacher,
    teacher_settings,
    wait_until,
)

from teacher_server import grpc_api
from teacher_server.client import (
    AsyncTeacherClient,
    TeacherClient,
    TeacherRpcError,
    TeacherScore,
    _Retry,
    parse_target,
)
from teacher_server.engine import ItmEngine

torch.set_num_threads(1)

SENTENCES = ["a person ride a horse", "a person eat a pizza"]


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningTeacher]:
    with running_teacher(teacher_settings(tiny_blip_dir, max_images_per_request=2)) as running:
        yield running


def assert_equal_to_engine(engine: ItmEngine, image: bytes, sentences: list[str], got: list[TeacherScore]):
    expected = reference_scores(engine, image, sentences)
    assert [s.match_logit for s in got] == pytest.approx([e.match_logit for e in expected], abs=1e-6)
    assert [s.match_prob for s in got] == pytest.approx([e.match_prob for e in expected], abs=1e-6)


# --------------------------------------------------------------------------------------- sync
def test_sync_scores_bytes_and_paths_equal_to_engine(teacher, engine, tmp_path):
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(png_bytes(2))
    images = [png_bytes(1), image_path, str(image_path)]
    with TeacherClient(teacher.target) as client:
        scores = client.score(images, [SENTENCES, SENTENCES[:1], SENTENCES[1:]])
    assert [len(group) for group in scores] == [2, 1, 1]
    assert_equal_to_engine(engine, png_bytes(1), SENTENCES, scores[0])
    assert_equal_to_engine(engine, png_bytes(2), SENTENCES[:1], scores[1])
    assert_equal_to_engine(engine, png_bytes(2), SENTENCES[1:], scores[2])


def test_digest_first_sends_bytes_only_when_asked(teacher, engine):
    image = png_bytes(10)
    with TeacherClient(f"grpc://{teacher.target}", max_images_per_request=8) as client:
        calls = score_calls(teacher)
        first = client.score([image], [SENTENCES])
        assert score_calls(teacher) == calls + 2  # digest only -> IMAGE_REQUIRED -> resend with bytes
        assert not any(s.cached for s in first[0])

        again = client.score([image], [SENTENCES])
        assert score_calls(teacher) == calls + 3  # all cached: the digest alone is enough
        assert all(s.cached for s in again[0])
        assert [s.match_logit for s in again[0]] == [s.match_logit for s in first[0]]

        other = client.score([image], [["a person wash a car"]])  # image held by the teacher
        assert score_calls(teacher) == calls + 4
    assert_equal_to_engine(engine, image, ["a person wash a car"], other[0])


def test_requests_are_cut_to_the_server_limit(teacher, engine):
    images = [png_bytes(20 + k) for k in range(5)]
    with TeacherClient(teacher.target) as client:  # learns max_images_per_request = 2 from the server
        scores = client.score(images, [SENTENCES[:1]] * 5)
    for image, got in zip(images, scores, strict=True):
        assert_equal_to_engine(engine, image, SENTENCES[:1], got)


def test_empty_sentence_lists_and_argument_errors(teacher):
    with TeacherClient(teacher.target) as client:
        assert client.score([png_bytes(30), png_bytes(31)], [[], SENTENCES[:1]])[0] == []
        with pytest.raises(ValueError, match="2 images but 1 sentence lists"):
            client.score([png_bytes(30), png_bytes(31)], [SENTENCES])
        with pytest.raises(ValueError, match="sentences\\[0\\] is a str"):
            client.score([png_bytes(30)], ["a person ride a horse"])
        with pytest.raises(ValueError, match="images\\[0\\]: cannot read"):
            client.score([Path("/nonexistent/image.png")], [SENTENCES])


def test_invalid_input_raises_without_retry(teacher):
    with TeacherClient(teacher.target) as client:
        before = score_calls(teacher, "INVALID_ARGUMENT")
        with pytest.raises(TeacherRpcError) as caught:
            client.score([b"not an image"], [SENTENCES])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].image" in caught.value.details
    deadline = time.monotonic() + 10
    while score_calls(teacher, "INVALID_ARGUMENT") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert score_calls(teacher, "INVALID_ARGUMENT") == before + 1  # exactly one attempt


def test_model_info(teacher):
    with TeacherClient(teacher.target) as client:
        info = client.model_info()
    assert info.fingerprint == teacher.service.fingerprint
    assert info.limits["max_images_per_request"] == 2
    assert info.dtype == "fp32" and info.ready


def test_retries_unavailable_until_the_server_is_up(tiny_blip_dir, engine):
    """The first attempts find no server (UNAVAILABLE); the client backs off until one starts."""
    port = free_port()
    results: dict[str, object] = {}

    def call() -> None:
        with TeacherClient(f"127.0.0.1:{port}", max_retries=12, backoff_s=0.1, timeout_s=120) as client:
            try:
                results["scores"] = client.score([png_bytes(40)], [SENTENCES])
            except Exception as exc:  # reported below
                results["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)  # let the first attempt fail: nothing listens yet
    teacher = start_teacher(teacher_settings(tiny_blip_dir, grpc_port=port))
    try:
        caller.join(timeout=120)
        assert "error" not in results, results.get("error")
        assert_equal_to_engine(engine, png_bytes(40), SENTENCES, results["scores"][0])
    finally:
        teacher.stop()


def test_retries_resource_exhausted_honouring_the_hint(tiny_blip_dir, engine):
    """A full queue answers RESOURCE_EXHAUSTED + retry-after-ms; the client waits and gets its scores."""
    # One request held in the engine (a gate, not a delay) and one filling the queue (max_queue=1):
    # the client under test is refused until the test opens the gate, however slow the machine.
    settings = teacher_settings(tiny_blip_dir, max_queue=1)
    service, gated = gated_service(settings)
    results: dict[int, list[list[TeacherScore]]] = {}
    with (
        running_teacher(settings, service) as held,
        TeacherClient(held.target, max_retries=20, backoff_s=0.05) as client,
    ):

        def score(seed: int, sentences: list[str]) -> threading.Thread:
            thread = threading.Thread(
                target=lambda: results.setdefault(seed, client.score([png_bytes(seed)], [sentences]))
            )
            thread.start()
            return thread

        callers = [score(44, SENTENCES[:1])]
        assert gated.entered.wait(timeout=60)
        callers.append(score(45, SENTENCES[:1]))
        wait_until(lambda: held.metric("hoidistill_teacher_queue_items") == 1, "the second request is queued")
        callers.append(score(46, SENTENCES))
        wait_until(lambda: score_calls(held, "RESOURCE_EXHAUSTED") >= 1, "the third request is refused")
        gated.gate.set()
        for thread in callers:
            thread.join(timeout=60)
    assert sorted(results) == [44, 45, 46]
    assert_equal_to_engine(engine, png_bytes(46), SENTENCES, results[46][0])


def test_gives_up_after_max_retries():
    client = TeacherClient(f"127.0.0.1:{free_port()}", max_retries=1, backoff_s=0.01, timeout_s=30)
    with client, pytest.raises(TeacherRpcError) as caught:
        client.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_retry_policy():
    policy = _Retry(max_retries=3, backoff_s=0.2)
    far = time.monotonic() + 1000
    unavailable = TeacherRpcError(grpc.StatusCode.UNAVAILABLE, "down")
    for attempt in range(3):
        wait = policy.delay(attempt, unavailable, far)
        assert 0.1 * 2**attempt <= wait <= 0.3 * 2**attempt
    assert policy.delay(3, unavailable, far) is None  # out of tries
    hinted = TeacherRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_after_s=5.0)
    assert policy.delay(0, hinted, far) == 5.0  # the server's hint wins over a shorter back-off
    assert policy.delay(0, hinted, time.monotonic() + 1) is None  # would overrun the deadline
    assert policy.delay(0, TeacherRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), far) is None


def test_parse_target():
    assert parse_target("localhost:50051") == ("localhost:50051", None)
    assert parse_target("grpc://teacher:50051") == ("teacher:50051", False)
    assert parse_target("grpcs://teacher:443/") == ("teacher:443", True)
    assert parse_target("dns:///teacher:50051") == ("dns:///teacher:50051", None)
    with pytest.raises(ValueError, match="use host:port"):
        parse_target("http://teacher:50051")
    with pytest.raises(ValueError, match="plain-text"):
        TeacherClient("grpc://teacher:50051", root_certificates=b"-----BEGIN CERTIFICATE-----")


# -------------------------------------------------------------------------------------- async
# grpc.aio binds to one event loop per process: async clients run in the server's loop.
def test_async_stream_many_requests_in_flight(teacher, engine):
    images = [png_bytes(50 + k) for k in range(6)]

    async def run() -> list[list[list[TeacherScore]]]:
        async with AsyncTeacherClient(teacher.target) as client:
            return await asyncio.gather(*(client.score([image], [SENTENCES]) for image in images))

    streams_before = teacher.metric(
        "hoidistill_teacher_requests_total", {"method": f"{grpc_api.SERVICE_NAME}/ScoreStream", "code": "CANCELLED"}
    )
    results = teacher.call(run())
    for image, got in zip(images, results, strict=True):
        assert_equal_to_engine(engine, image, SENTENCES, got[0])
    # One stream carried everything; closing the client cancels it.
    deadline = time.monotonic() + 10
    counted = streams_before
    while counted == streams_before and time.monotonic() < deadline:
        counted = teacher.metric(
            "hoidistill_teacher_requests_total", {"method": f"{grpc_api.SERVICE_NAME}/ScoreStream", "code": "CANCELLED"}
        )
        time.sleep(0.01)
    assert counted == streams_before + 1


def test_async_stream_error_is_per_request_and_stream_stays_usable(teacher, engine):
    async def run() -> tuple[TeacherRpcError, list[list[TeacherScore]]]:
        async with AsyncTeacherClient(teacher.target) as client:
            try:
                await client.score([png_bytes(60)], [[""]])
            except TeacherRpcError as exc:
                error = exc
            return error, await client.score([png_bytes(61)], [SENTENCES])

    error, scores = teacher.call(run())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "items[0].sentences[0]" in error.details
    assert_equal_to_engine(engine, png_bytes(61), SENTENCES, scores[0])


def test_async_unary_path_and_model_info(teacher, engine):
    async def run():
        async with AsyncTeacherClient(teacher.target, use_stream=False) as client:
            info = await client.model_info()
            return info, await client.score([png_bytes(70), png_bytes(71), png_bytes(72)], [SENTENCES] * 3)

    info, scores = teacher.call(run())
    assert info.fingerprint == teacher.service.fingerprint
    for seed, got in zip((70, 71, 72), scores, strict=True):
        assert_equal_to_engine(engine, png_bytes(seed), SENTENCES, got)


# ------------------------------------------------------------------------------ no torch needed
def test_client_imports_without_torch():
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTorch())
        from teacher_server.client import AsyncTeacherClient, TeacherClient, TeacherScore
        client = TeacherClient("127.0.0.1:1")
        client.close()
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
