"""Native gRPC API against a real server on loopback, through the generated stubs (not our client)."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from testkit.teacher import (
    LONG_SENTENCE,
    SCORE_METHOD,
    GatedEngine,
    RunningTeacher,
    gated_service,
    png_bytes,
    reference_scores,
    running_teacher,
    teacher_settings,
)

from teacher_server import grpc_api
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.errors import InvalidInputError, OverloadedError
from teacher_server.service import ShuttingDownError

torch.set_num_threads(1)

SENTENCES = ["a person ride a horse", "a person eat a pizza", "a person hold a cup"]
MAX_MESSAGE_BYTES = 200_000


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningTeacher]:
    settings = teacher_settings(
        tiny_blip_dir,
        max_sentences_per_image=8,
        max_sentence_tokens=16,
        max_images_per_request=4,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    with running_teacher(settings) as running:
        yield running


@pytest.fixture
def channel(teacher: RunningTeacher) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(teacher.target, options=options) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.TeacherServiceStub:
    return pb_grpc.TeacherServiceStub(channel)


def item(image: bytes, sentences: list[str], *, send_bytes: bool = True) -> pb.ImageSentences:
    return pb.ImageSentences(
        digest=hashlib.sha256(image).hexdigest(), image=image if send_bytes else b"", sentences=sentences
    )


def assert_serving(stub: pb_grpc.TeacherServiceStub, seed: int = 999) -> None:
    """The server still answers a good request (after a bad one)."""
    response = stub.Score(pb.ScoreRequest(items=[item(png_bytes(seed), ["a person pet a dog"])]), timeout=30)
    assert response.items[0].status == pb.ITEM_STATUS_OK
    assert len(response.items[0].scores) == 1


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


# ------------------------------------------------------------------------------------------ scoring
def test_score_equals_engine_and_second_request_is_cached(stub, engine):
    image = png_bytes(1)
    expected = reference_scores(engine, image, SENTENCES)
    request = pb.ScoreRequest(request_id="r1", items=[item(image, SENTENCES)])
    first = stub.Score(request, timeout=30)
    assert first.request_id == "r1"
    assert first.status.code == 0
    (result,) = first.items
    assert result.status == pb.ITEM_STATUS_OK
    assert [s.match_logit for s in result.scores] == pytest.approx([e.match_logit for e in expected], abs=1e-6)
    assert [s.match_prob for s in result.scores] == pytest.approx([e.match_prob for e in expected], abs=1e-6)
    assert not any(s.cached for s in result.scores)

    second = stub.Score(request, timeout=30)
    assert all(s.cached for s in second.items[0].scores)
    assert [s.match_logit for s in second.items[0].scores] == [s.match_logit for s in result.scores]


def test_several_items_keep_order_and_duplicates(stub, engine):
    images = [png_bytes(10), png_bytes(11)]
    sentences = [["a person eat a pizza", "a person ride a horse", "a person eat a pizza"], ["a person hold a cup"]]
    response = stub.Score(
        pb.ScoreRequest(items=[item(i, s) for i, s in zip(images, sentences, strict=True)]), timeout=30
    )
    assert len(response.items) == 2
    for image, group, result in zip(images, sentences, response.items, strict=True):
        expected = reference_scores(engine, image, group)
        assert [s.match_logit for s in result.scores] == pytest.approx([e.match_logit for e in expected], abs=1e-6)


def test_digest_only_unknown_image_answers_image_required_then_works_once_sent(stub, engine):
    image = png_bytes(20)
    digest_only = pb.ScoreRequest(items=[item(image, ["a person ride a horse"], send_bytes=False)])
    response = stub.Score(digest_only, timeout=30)
    assert response.items[0].status == pb.ITEM_STATUS_IMAGE_REQUIRED
    assert len(response.items[0].scores) == 0

    stub.Score(pb.ScoreRequest(items=[item(image, ["a person ride a horse"])]), timeout=30)
    # New sentence, digest only: the teacher holds the image now.
    again = stub.Score(pb.ScoreRequest(items=[item(image, ["a person wash a car"], send_bytes=False)]), timeout=30)
    assert again.items[0].status == pb.ITEM_STATUS_OK
    expected = reference_scores(engine, image, ["a person wash a car"])[0]
    assert again.items[0].scores[0].match_logit == pytest.approx(expected.match_logit, abs=1e-6)


def test_missing_digest_is_computed_from_the_bytes(stub, engine):
    image = png_bytes(21)
    request = pb.ScoreRequest(items=[pb.ImageSentences(image=image, sentences=["a person ride a horse"])])
    response = stub.Score(request, timeout=30)
    expected = reference_scores(engine, image, ["a person ride a horse"])[0]
    assert response.items[0].scores[0].match_prob == pytest.approx(expected.match_prob, abs=1e-6)


def test_get_model_info(stub, teacher):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    expected = teacher.service.model_info()
    assert info.fingerprint == expected["fingerprint"] == teacher.service.fingerprint
    assert info.model_id == expected["model_id"]
    assert info.itm_start_token == "cls"
    assert info.dtype == "fp32"
    assert info.ready
    assert info.limits.max_images_per_request == 4
    assert info.limits.max_sentences_per_image == 8
    assert info.limits.max_sentence_tokens == 16
    assert info.limits.max_message_bytes == MAX_MESSAGE_BYTES
    assert info.limits.max_image_bytes == teacher.settings.max_image_bytes
    assert info.limits.max_image_side == teacher.settings.max_image_side
    assert info.limits.max_image_aspect == pytest.approx(teacher.settings.max_image_aspect)


# ------------------------------------------------------------------------------------------ stream
def test_stream_answers_many_requests_by_id_and_survives_a_bad_one(stub, engine):
    images = [png_bytes(30 + k) for k in range(6)]
    requests = [
        pb.ScoreRequest(request_id=f"id-{k}", items=[item(image, SENTENCES[:2])]) for k, image in enumerate(images)
    ]
    bad = pb.ScoreRequest(request_id="bad", items=[item(png_bytes(40), [""])])
    requests.insert(3, bad)
    responses = {r.request_id: r for r in stub.ScoreStream(iter(requests), timeout=60)}
    assert set(responses) == {r.request_id for r in requests}
    assert responses["bad"].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses["bad"].status.field == "items[0].sentences[0]"
    assert "empty" in responses["bad"].status.message
    for k, image in enumerate(images):
        response = responses[f"id-{k}"]
        assert response.status.code == 0
        expected = reference_scores(engine, image, SENTENCES[:2])
        got = [s.match_logit for s in response.items[0].scores]
        assert got == pytest.approx([e.match_logit for e in expected], abs=1e-6)


class OpenRequests:
    """A request iterator the test feeds by hand; it half-closes only on ``close()``."""

    _CLOSE = object()

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    def put(self, request: pb.ScoreRequest) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(self._CLOSE)

    def __iter__(self):
        while (request := self._queue.get()) is not self._CLOSE:
            yield request


def test_stream_answers_while_open_with_many_requests_in_flight(stub):
    """Four requests written before any answer is read are all answered before the client half-closes."""
    requests = OpenRequests()
    responses = stub.ScoreStream(iter(requests), timeout=60)
    for k in range(4):
        requests.put(pb.ScoreRequest(request_id=str(k), items=[item(png_bytes(50 + k), ["a person kick a ball"])]))
    answered = sorted(next(responses).request_id for _ in range(4))
    assert answered == ["0", "1", "2", "3"]
    requests.close()
    assert list(responses) == []
    assert responses.code() == grpc.StatusCode.OK


def test_stream_undecodable_request_is_answered_not_fatal(channel):
    stream = channel.stream_stream(
        f"/{grpc_api.SERVICE_NAME}/ScoreStream",
        request_serializer=None,
        response_deserializer=pb.ScoreResponse.FromString,
    )
    good = pb.ScoreRequest(request_id="good", items=[item(png_bytes(60), ["a person ride a horse"])])
    raw_bad = pb.ScoreRequest(items=[item(png_bytes(61), ["hello"])]).SerializeToString().replace(b"hello", b"h\xffllo")
    responses = list(stream(iter([raw_bad, good.SerializeToString()]), timeout=60))
    by_id = {r.request_id: r for r in responses}
    assert by_id["good"].status.code == 0
    assert by_id[""].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "UTF-8" in by_id[""].status.message


# ------------------------------------------------------------------------------------- bad input
def test_corrupt_image_bytes(stub, teacher):
    before = teacher.metric("hoidistill_teacher_errors_total", {"method": SCORE_METHOD, "code": "INVALID_ARGUMENT"})
    error = rpc_error(
        stub.Score, pb.ScoreRequest(items=[item(b"\x89PNG not really", ["a person ride a horse"])]), timeout=30
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].image" in error.details()
    assert "not a decodable image" in error.details()
    # context.abort sends the status before the handler unwinds: the count may land just after.
    wait_until(
        lambda: (
            teacher.metric("hoidistill_teacher_errors_total", {"method": SCORE_METHOD, "code": "INVALID_ARGUMENT"})
            == before + 1
        )
    )
    assert_serving(stub)


def test_too_many_sentences(stub):
    error = rpc_error(
        stub.Score,
        pb.ScoreRequest(items=[item(png_bytes(70), [f"a person ride a horse {k}" for k in range(9)])]),
        timeout=30,
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].sentences" in error.details()
    assert "limit of 8 sentences" in error.details()
    assert_serving(stub)


def test_too_many_images(stub):
    items = [item(png_bytes(80 + k), ["a person ride a horse"]) for k in range(5)]
    error = rpc_error(stub.Score, pb.ScoreRequest(items=items), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in error.details() and "limit of 4 images" in error.details()
    assert_serving(stub)


def test_sentence_over_the_token_limit(stub):
    error = rpc_error(
        stub.Score, pb.ScoreRequest(items=[item(png_bytes(90), ["a person ride a horse", LONG_SENTENCE])]), timeout=30
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].sentences[1]" in error.details()
    assert "limit of 16 tokens" in error.details()
    assert_serving(stub)


def test_digest_not_matching_the_bytes(stub):
    bad = pb.ImageSentences(digest="0" * 64, image=png_bytes(91), sentences=["a person ride a horse"])
    error = rpc_error(stub.Score, pb.ScoreRequest(items=[bad]), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].digest" in error.details()
    assert_serving(stub)


def test_non_utf8_sentence(channel, stub):
    score = channel.unary_unary(
        f"/{grpc_api.SERVICE_NAME}/Score", request_serializer=None, response_deserializer=pb.ScoreResponse.FromString
    )
    raw = pb.ScoreRequest(items=[item(png_bytes(92), ["hello"])]).SerializeToString().replace(b"hello", b"h\xffllo")
    error = rpc_error(score, raw, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sentences" in error.details() and "UTF-8" in error.details()
    assert_serving(stub)


def test_oversized_message(stub):
    big = png_bytes(93, size=(400, 400))  # random pixels: PNG barely compresses them
    assert len(big) > MAX_MESSAGE_BYTES
    error = rpc_error(stub.Score, pb.ScoreRequest(items=[item(big, ["a person ride a horse"])]), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"vs. {MAX_MESSAGE_BYTES}" in error.details()  # grpc names the limit
    assert_serving(stub)


# --------------------------------------------------------------------------------- health, reflection
def test_health_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", grpc_api.SERVICE_NAME, "inference.GRPCInferenceService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services_and_describes_the_api(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {grpc_api.SERVICE_NAME, "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    described = database.FindFileContainingSymbol(grpc_api.SERVICE_NAME)
    assert described.name == "hoidistill/teacher/v1/teacher.proto"
    assert [m.name for m in described.service[0].method] == ["Score", "ScoreStream", "GetModelInfo"]


def test_requests_are_counted_by_method_and_code(stub, teacher):
    before = teacher.metric("hoidistill_teacher_requests_total", {"method": SCORE_METHOD, "code": "OK"})
    assert_serving(stub, seed=500)
    wait_until(
        lambda: (
            teacher.metric("hoidistill_teacher_requests_total", {"method": SCORE_METHOD, "code": "OK"}) == before + 1
        )
    )


# ------------------------------------------------------------------------------ status mapping
def test_rpc_failure_mapping():
    invalid = grpc_api.rpc_failure(InvalidInputError("items[0].image", "too big"), "m")
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT and invalid.field == "items[0].image"
    overloaded = grpc_api.rpc_failure(OverloadedError("queue full", retry_after_s=0.25), "m")
    assert overloaded.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert overloaded.retry_after_ms == 250 and "retry after 250 ms" in overloaded.message
    assert overloaded.trailing_metadata() == (("retry-after-ms", "250"),)
    assert grpc_api.rpc_failure(ShuttingDownError(), "m").code == grpc.StatusCode.UNAVAILABLE
    assert grpc_api.rpc_failure(TimeoutError(), "m").code == grpc.StatusCode.DEADLINE_EXCEEDED
    internal = grpc_api.rpc_failure(ZeroDivisionError("boom"), "m")
    assert internal.code == grpc.StatusCode.INTERNAL and "boom" not in internal.message


# ----------------------------------------------------- a held engine: deadlines, overload, drain
@pytest.fixture
def held_teacher(tiny_blip_dir: Path) -> Iterator[tuple[RunningTeacher, GatedEngine]]:
    """The engine waits at a gate the test opens, and one work item fills the queue: what is
    queued stays queued while the gate is shut, however slow the machine (no timing windows)."""
    settings = teacher_settings(tiny_blip_dir, max_queue=1, drain_timeout_s=20.0)
    service, gated = gated_service(settings)
    with running_teacher(settings, service) as running:
        yield running, gated
        gated.gate.set()  # never leave the engine thread waiting


def score_in_thread(stub, request: pb.ScoreRequest, results: dict) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.setdefault(request.request_id, stub.Score(request, timeout=60)))
    thread.start()
    return thread


def test_deadline_overload_and_graceful_drain(held_teacher: tuple[RunningTeacher, GatedEngine]):
    teacher, gated = held_teacher
    with grpc.insecure_channel(teacher.target) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        results: dict[str, pb.ScoreResponse] = {}
        held = score_in_thread(stub, pb.ScoreRequest(request_id="held", items=[item(png_bytes(99), ["a"])]), results)
        assert gated.entered.wait(timeout=60)  # in the engine now; the queue is empty
        # A request budget that runs out while queued behind the held one: DEADLINE_EXCEEDED, its work dropped.
        request = pb.ScoreRequest(timeout_ms=200, items=[item(png_bytes(100), ["a person ride a horse"])])
        error = rpc_error(stub.Score, request, timeout=30)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: teacher.metric("hoidistill_teacher_queue_items") == 0)

        # One request queued fills the queue: the next is refused with a retry hint.
        first_request = pb.ScoreRequest(request_id="first", items=[item(png_bytes(101), ["a person ride a horse"])])
        first = score_in_thread(stub, first_request, results)
        wait_until(lambda: teacher.metric("hoidistill_teacher_queue_items") == 1)
        error = rpc_error(
            stub.Score, pb.ScoreRequest(items=[item(png_bytes(102), ["a person eat a pizza"])]), timeout=30
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = dict(error.trailing_metadata())["retry-after-ms"]
        assert int(hint) > 0 and f"retry after {hint} ms" in error.details()

        # SIGTERM path: shutdown begins while the first request is still queued; then the engine
        # is released and both held and queued work complete.
        stopper = threading.Thread(target=teacher.stop)
        stopper.start()
        wait_until(lambda: teacher.server.drain.active)
        gated.gate.set()
        for thread in (held, first, stopper):
            thread.join(timeout=60)
        assert results["held"].items[0].status == pb.ITEM_STATUS_OK
        assert results["first"].items[0].status == pb.ITEM_STATUS_OK
        error = rpc_error(
            stub.Score, pb.ScoreRequest(items=[item(png_bytes(103), ["a person ride a horse"])]), timeout=5
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_open_stream_is_answered_then_closed_unavailable_on_drain(held_teacher: tuple[RunningTeacher, GatedEngine]):
    teacher, gated = held_teacher
    with grpc.insecure_channel(teacher.target) as channel:
        requests = OpenRequests()
        call = pb_grpc.TeacherServiceStub(channel).ScoreStream(iter(requests), timeout=60)
        requests.put(pb.ScoreRequest(request_id="in-flight", items=[item(png_bytes(110), ["a person ride a horse"])]))
        assert gated.entered.wait(timeout=60)  # held in the engine until the drain has begun
        stopper = threading.Thread(target=teacher.stop)
        stopper.start()
        wait_until(lambda: teacher.server.drain.active)
        gated.gate.set()
        responses = []
        with pytest.raises(grpc.RpcError):  # the client never half-closes: the server ends the stream
            for response in call:
                responses.append(response)
        stopper.join(timeout=60)
        requests.close()
        assert [r.request_id for r in responses] == ["in-flight"]
        assert responses[0].status.code == 0
        assert call.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in call.details()
