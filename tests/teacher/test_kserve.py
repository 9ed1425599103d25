"""KServe v2 endpoints against a real server, through the real ``tritonclient.grpc`` client."""

from __future__ import annotations

import logging
import queue
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from testkit.teacher import (
    LONG_SENTENCE,
    RunningTeacher,
    png_bytes,
    reference_scores,
    running_teacher,
    teacher_settings,
)
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kv2
from tritonclient.grpc import service_pb2_grpc as kv2_grpc
from tritonclient.utils import InferenceServerException

from teacher_server import kserve
from teacher_server.engine import ImageSentences
from teacher_server.errors import InvalidInputError
from teacher_server.hoi.region import Region

torch.set_num_threads(1)

MODEL = "blip_itm"


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningTeacher]:
    settings = teacher_settings(tiny_blip_dir, max_sentences_per_image=8, max_sentence_tokens=16)
    with running_teacher(settings) as running:
        yield running


@pytest.fixture
def client(teacher: RunningTeacher) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=teacher.target)
    yield client
    client.close()


def pair_inputs(
    images: list[bytes], texts: list[bytes | str], *, image_type: str = "BYTES", text_type: str = "BYTES"
) -> list[triton.InferInput]:
    image_input = triton.InferInput("IMAGE", [len(images)], image_type)
    image_input.set_data_from_numpy(np.array(images, dtype=np.object_))
    text_input = triton.InferInput("TEXT", [len(texts)], text_type)
    encoded = [t.encode() if isinstance(t, str) else t for t in texts]
    text_input.set_data_from_numpy(np.array(encoded, dtype=np.object_))
    return [image_input, text_input]


def infer_error(client: triton.InferenceServerClient, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(*args, **kwargs)
    return caught.value


def assert_serving(client: triton.InferenceServerClient) -> None:
    result = client.infer(MODEL, pair_inputs([png_bytes(999)], ["a person pet a dog"]))
    assert result.as_numpy("MATCH_PROB").shape == (1,)


# --------------------------------------------------------------------------------- server, model
def test_server_and_model_endpoints(client, teacher):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_server_metadata()
    assert metadata.name == "hoidistill-teacher"

    model = client.get_model_metadata(MODEL)
    assert model.name == MODEL and list(model.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("IMAGE", "BYTES", [-1]),
        ("TEXT", "BYTES", [-1]),
        ("REGION", "FP32", [-1, 8]),
    ]
    assert [(t.name, t.datatype) for t in model.outputs] == [("MATCH_PROB", "FP32"), ("MATCH_LOGIT", "FP32")]

    config = client.get_model_config(MODEL).config
    assert config.name == MODEL and config.max_batch_size == 0
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("IMAGE", mc.TYPE_STRING, [-1], False),
        ("TEXT", mc.TYPE_STRING, [-1], False),
        ("REGION", mc.TYPE_FP32, [-1, 8], True),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("MATCH_PROB", mc.TYPE_FP32, [-1]),
        ("MATCH_LOGIT", mc.TYPE_FP32, [-1]),
    ]
    assert config.parameters["fingerprint"].string_value == teacher.service.fingerprint
    assert config.parameters["region_policy"].string_value == "crop:margin=0.1"


def test_unknown_model_name_is_not_found(client):
    for call in (
        lambda: client.get_model_metadata("nope"),
        lambda: client.get_model_config("nope"),
        lambda: client.infer("nope", pair_inputs([png_bytes(1)], ["a person ride a horse"])),
    ):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        assert "'nope'" in caught.value.message() and "blip_itm" in caught.value.message()
    assert_serving(client)


# -------------------------------------------------------------------------------------- scoring
def test_infer_equals_engine_and_repeated_images_are_encoded_once(client, teacher, engine):
    first, second = png_bytes(1), png_bytes(2)
    images = [first, second, first, first, second]
    texts = [
        "a person ride a horse",
        "a person eat a pizza",
        "a person hold a cup",
        "a person ride a horse",
        "a person ride a horse",
    ]
    encoded_before = teacher.metric("hoidistill_teacher_images_encoded_total")
    result = client.infer(MODEL, pair_inputs(images, texts))
    assert teacher.metric("hoidistill_teacher_images_encoded_total") == encoded_before + 2

    probs, logits = result.as_numpy("MATCH_PROB"), result.as_numpy("MATCH_LOGIT")
    assert probs.dtype == np.float32 and probs.shape == (5,)
    for index, (image, text) in enumerate(zip(images, texts, strict=True)):
        expected = reference_scores(engine, image, [text])[0]
        assert logits[index] == pytest.approx(expected.match_logit, abs=1e-6)
        assert probs[index] == pytest.approx(expected.match_prob, abs=1e-6)


def test_requested_output_only(client, engine):
    image = png_bytes(3)
    result = client.infer(
        MODEL, pair_inputs([image], ["a person ride a horse"]), outputs=[triton.InferRequestedOutput("MATCH_LOGIT")]
    )
    assert result.as_numpy("MATCH_PROB") is None
    expected = reference_scores(engine, image, ["a person ride a horse"])[0]
    assert result.as_numpy("MATCH_LOGIT")[0] == pytest.approx(expected.match_logit, abs=1e-6)


def test_bytes_contents_instead_of_raw(teacher, engine):
    """Clients other than tritonclient may send ``contents.bytes_contents``: same answer."""
    image = png_bytes(4)
    request = kv2.ModelInferRequest(model_name=MODEL, id="req-7")
    for name, values in (("IMAGE", [image, image]), ("TEXT", [b"a person ride a horse", b"a person eat a pizza"])):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[2])
        tensor.contents.bytes_contents.extend(values)
    with grpc.insecure_channel(teacher.target) as channel:
        response = kv2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.id == "req-7" and response.model_name == MODEL
    by_name = {
        o.name: np.frombuffer(raw, dtype="<f4")
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    expected = reference_scores(engine, image, ["a person ride a horse", "a person eat a pizza"])
    assert by_name["MATCH_LOGIT"] == pytest.approx([e.match_logit for e in expected], abs=1e-6)


def test_stream_infer(client, engine):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        images = [png_bytes(5), png_bytes(6)]
        for k, image in enumerate(images):
            client.async_stream_infer(MODEL, pair_inputs([image], ["a person ride a horse"]), request_id=str(k))
        client.async_stream_infer("nope", pair_inputs([images[0]], ["a person ride a horse"]), request_id="bad")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "nope" in str(errors[0])
    results = {r.get_response().id: r for r, e in got if e is None}
    for k, image in enumerate(images):
        expected = reference_scores(engine, image, ["a person ride a horse"])[0]
        assert results[str(k)].as_numpy("MATCH_LOGIT")[0] == pytest.approx(expected.match_logit, abs=1e-6)


def test_statistics_count_inferences(client):
    before = client.get_inference_statistics(MODEL).model_stats[0].inference_stats.success.count
    assert_serving(client)
    stats = client.get_inference_statistics(MODEL).model_stats[0]
    assert stats.name == MODEL and stats.inference_stats.success.count == before + 1


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("images", "texts", "kwargs", "field", "detail"),
    [
        pytest.param(
            [b"not an image"], ["a person ride a horse"], {}, "IMAGE[0]", "not a decodable image", id="corrupt-image"
        ),
        pytest.param(
            [png_bytes(7), png_bytes(8)], ["a person ride a horse", ""], {}, "TEXT[1]", "empty", id="empty-text"
        ),
        pytest.param(
            [png_bytes(7), png_bytes(8)],
            ["a person ride a horse"] * 3,
            {},
            "IMAGE, TEXT",
            "same length",
            id="mismatched-lengths",
        ),
        pytest.param([png_bytes(7)], [b"h\xffllo"], {}, "TEXT[0]", "not valid UTF-8", id="non-utf8"),
        pytest.param(
            [png_bytes(7), png_bytes(7)],
            ["a person ride a horse", LONG_SENTENCE],
            {},
            "TEXT[1]",
            "limit of 16 tokens",
            id="sentence-too-long",
        ),
        pytest.param(
            [png_bytes(7)] * 9,
            [f"a person ride a horse {k}" for k in range(9)],
            {},
            "TEXT (sentences of IMAGE[0])",
            "limit of 8 sentences",
            id="too-many-sentences",
        ),
        pytest.param([b""], ["a person ride a horse"], {}, "IMAGE[0]", "empty", id="empty-image"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client, images, texts, kwargs, field, detail):
    error = infer_error(client, MODEL, pair_inputs(images, texts, **kwargs))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith(f"{field}: ")
    assert detail in error.message()
    assert_serving(client)


def test_wrong_datatype(client):
    inputs = pair_inputs([png_bytes(9)], ["a person ride a horse"])
    wrong = triton.InferInput("TEXT", [1], "FP32")
    wrong.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    error = infer_error(client, MODEL, [inputs[0], wrong])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith("TEXT: datatype FP32") and "expected BYTES" in error.message()
    assert_serving(client)


def test_missing_and_unknown_inputs(client):
    inputs = pair_inputs([png_bytes(9)], ["a person ride a horse"])
    error = infer_error(client, MODEL, inputs[:1])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and error.message().startswith("TEXT: input missing")
    extra = triton.InferInput("EXTRA", [1], "BYTES")
    extra.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    error = infer_error(client, MODEL, [*inputs, extra])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and error.message().startswith("EXTRA: unknown input")
    error = infer_error(client, MODEL, inputs, outputs=[triton.InferRequestedOutput("SCORE")])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "unknown output 'SCORE'" in error.message()
    assert_serving(client)


def test_unimplemented_endpoints(client):
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_repository_index()
    assert caught.value.status() == "StatusCode.UNIMPLEMENTED"


# ------------------------------------------------------------------------------ pure functions
# -------------------------------------------------------------------------------------- regions
# Boxes inside png_bytes' 40 x 32 images; their unions grown by 10 % stay well inside the image.
PAIR_A = (2.0, 3.0, 14.0, 20.0, 10.0, 8.0, 20.0, 26.0)
PAIR_B = (20.0, 2.0, 36.0, 18.0, 24.0, 12.0, 38.0, 30.0)
WHOLE = (0.0,) * 8  # a row of zeros: the whole image


def region_input(rows: list[tuple[float, ...]], datatype: str = "FP32", shape: list[int] | None = None):
    array = np.array(rows, dtype=np.float64 if datatype == "FP64" else np.float32)
    array = array.reshape(shape) if shape else array
    tensor = triton.InferInput("REGION", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def region_reference(engine, image: bytes, row: tuple[float, ...], text: str):
    region = None if not any(row) else Region.from_values(row)
    prepared = engine.prepare_image(image, region=region)
    return engine.score([ImageSentences(prepared.digest, prepared, [text], region=region)])[0][0]


def test_region_rows_are_views_of_their_image(client, teacher, engine):
    image, ride = png_bytes(40), "a person ride a horse"
    rows = [PAIR_A, PAIR_B, WHOLE, PAIR_A, PAIR_B]
    texts = [ride, ride, ride, "a person hold a cup", ride]
    encoded_before = teacher.metric("hoidistill_teacher_images_encoded_total")
    result = client.infer(MODEL, [*pair_inputs([image] * 5, texts), region_input(rows)])
    # One image, three views (two pairs and the whole image): three vision encodings.
    assert teacher.metric("hoidistill_teacher_images_encoded_total") == encoded_before + 3
    probs, logits = result.as_numpy("MATCH_PROB"), result.as_numpy("MATCH_LOGIT")
    for index, (row, text) in enumerate(zip(rows, texts, strict=True)):
        expected = region_reference(engine, image, row, text)
        assert logits[index] == pytest.approx(expected.match_logit, abs=1e-5)
        assert probs[index] == pytest.approx(expected.match_prob, abs=1e-6)
    assert probs[4] == probs[1] and len({probs[0], probs[1], probs[2]}) == 3  # views differ, repeats agree
    # Without REGION the request is as before: the whole image (now a cache hit of row 2).
    whole = client.infer(MODEL, pair_inputs([image], [ride])).as_numpy("MATCH_PROB")
    assert whole[0] == probs[2]


def test_region_by_raw_and_by_typed_contents_agree(teacher, client):
    image, ride = png_bytes(41), "a person ride a horse"
    raw = client.infer(MODEL, [*pair_inputs([image], [ride]), region_input([PAIR_A])]).as_numpy("MATCH_PROB")
    request = kv2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(ride.encode())
    request.inputs.add(name="REGION", datatype="FP32", shape=[1, 8]).contents.fp32_contents.extend(PAIR_A)
    with grpc.insecure_channel(teacher.target) as channel:
        response = kv2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert np.frombuffer(response.raw_output_contents[0], dtype="<f4")[0] == raw[0]


@pytest.mark.parametrize(
    ("rows", "kwargs", "field", "detail"),
    [
        pytest.param([PAIR_A, PAIR_A], {"datatype": "FP64"}, "REGION", "datatype FP64", id="fp64"),
        pytest.param([PAIR_A[:7]] * 2, {}, "REGION", "shape [2, 7] is not accepted", id="seven-values"),
        pytest.param([PAIR_A] * 3, {}, "REGION", "N = 2 (the length of IMAGE and TEXT)", id="three-rows"),
        pytest.param([PAIR_A, PAIR_B], {"shape": [16]}, "REGION", "shape [16]", id="one-dimension"),
        pytest.param(
            [PAIR_A, (14.0, 3.0, 2.0, 20.0, *PAIR_A[4:])], {}, "REGION[1][0:4]", "inverted", id="inverted-human"
        ),
        pytest.param([PAIR_A, (*PAIR_A[:7], float("nan"))], {}, "REGION[1][7]", "finite", id="nan"),
        pytest.param([PAIR_A, (*PAIR_A[:6], 90.0, 30.0)], {}, "REGION[1][6]", "outside the image", id="outside"),
    ],
)
def test_bad_region_is_invalid_argument_naming_it(client, rows, kwargs, field, detail):
    images = [png_bytes(42), png_bytes(43)]
    inputs = [*pair_inputs(images, ["a person ride a horse"] * 2), region_input(rows, **kwargs)]
    error = infer_error(client, MODEL, inputs)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith(f"{field}: "), error.message()
    assert detail in error.message()
    assert_serving(client)


def test_region_given_twice_is_refused(client):
    inputs = pair_inputs([png_bytes(44)], ["a person ride a horse"])
    error = infer_error(client, MODEL, [*inputs, region_input([PAIR_A]), region_input([PAIR_B])])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith("REGION: input given more than once")


def test_plan_pairs_groups_by_view():
    a = png_bytes(1)
    first, second = Region.from_values(PAIR_A), Region.from_values(PAIR_B)
    plan = kserve.plan_pairs([a, a, a, a], ["x", "x", "y", "x"], [first, second, first, None])
    assert [(item.region, item.sentences) for item in plan.items] == [
        (first, ("x", "y")),
        (second, ("x",)),
        (None, ("x",)),
    ]
    renamed = kserve.tensor_field(InvalidInputError("items[1].region[6]", "outside"), plan)
    assert renamed.field == "REGION[1][6]"


def test_decode_bytes_tensor():
    raw = b"".join(struct.pack("<I", len(e)) + e for e in (b"ab", b"", b"xyz"))
    assert kserve.decode_bytes_tensor(raw, 3, "TEXT") == [b"ab", b"", b"xyz"]
    with pytest.raises(InvalidInputError, match="more than the 2 elements the shape says"):
        kserve.decode_bytes_tensor(raw, 2, "TEXT")
    with pytest.raises(InvalidInputError, match="hold 3 elements but the shape says 4"):
        kserve.decode_bytes_tensor(raw, 4, "TEXT")
    with pytest.raises(InvalidInputError, match="claims 100 bytes"):
        kserve.decode_bytes_tensor(struct.pack("<I", 100) + b"abc", 1, "TEXT")
    with pytest.raises(InvalidInputError, match="inside the length prefix"):
        kserve.decode_bytes_tensor(b"\x01\x00", 1, "TEXT")


def test_plan_pairs_groups_by_image_and_deduplicates_sentences():
    a, b = png_bytes(1), png_bytes(2)
    plan = kserve.plan_pairs([a, b, a, a], ["x", "y", "z", "x"])
    assert [item.sentences for item in plan.items] == [("x", "z"), ("y",)]
    assert plan.slots == [(0, 0), (1, 0), (0, 1), (0, 0)]
    renamed = kserve.tensor_field(InvalidInputError("items[0].sentences[1]", "bad"), plan)
    assert renamed.field == "TEXT[2]"
    assert kserve.tensor_field(InvalidInputError("items[1].image", "bad"), plan).field == "IMAGE[1]"


# ------------------------------------------------------------------- malformed messages (issue 15)
INFER_PATH = f"/{kserve.SERVICE_NAME}/ModelInfer"
GOOD_TEXT = b"a person ride a horse"


def raw_request(image: bytes, text: bytes = GOOD_TEXT, request_id: str = "r") -> kv2.ModelInferRequest:
    """A well-formed one-pair ModelInfer request, as tritonclient sends it (raw contents)."""
    request = kv2.ModelInferRequest(model_name=MODEL, id=request_id)
    for name, value in (("IMAGE", image), ("TEXT", text)):
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        request.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    return request


def infer_raw(teacher: RunningTeacher, data: bytes) -> grpc.RpcError:
    """Send ``data`` as the bytes of a ModelInfer request; return the error it is answered with."""
    with grpc.insecure_channel(teacher.target) as channel:
        call = channel.unary_unary(
            INFER_PATH, request_serializer=None, response_deserializer=kv2.ModelInferResponse.FromString
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(data, timeout=30)
    return caught.value


def error_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda good: b"\xff\xff\xff\xff", id="garbage"),
        pytest.param(lambda good: good.replace(b"blip_itm", b"blip\xffitm"), id="model-name-not-utf8"),
        pytest.param(lambda good: good[:-3], id="cut-short"),
    ],
)
def test_malformed_model_infer_bytes_are_invalid_argument(teacher, client, caplog, mangle):
    """Found: UNKNOWN ("Unexpected DecodeError") and an ERROR traceback per message."""
    caplog.set_level(logging.DEBUG)
    error = infer_raw(teacher, mangle(raw_request(png_bytes(200)).SerializeToString()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("request: not a valid inference.ModelInferRequest")
    assert "model_name" in error.details()  # the hint names the string fields that must be UTF-8
    assert error_records(caplog) == []
    assert_serving(client)


def test_stream_survives_a_malformed_message_between_good_ones(teacher, engine, caplog):
    """Found: one bad message ended the whole ModelStreamInfer stream (UNKNOWN)."""
    caplog.set_level(logging.DEBUG)
    image = png_bytes(201)
    messages = [
        raw_request(image, request_id="first").SerializeToString(),
        b"\x0a\xff\xff\xff\xff\x0f",  # field 1 claims a length far past the end
        raw_request(image, request_id="last").SerializeToString(),
    ]
    with grpc.insecure_channel(teacher.target) as channel:
        stream = channel.stream_stream(
            f"/{kserve.SERVICE_NAME}/ModelStreamInfer",
            request_serializer=None,
            response_deserializer=kv2.ModelStreamInferResponse.FromString,
        )
        call = stream(iter(messages), timeout=60)
        responses = list(call)
        assert call.code() == grpc.StatusCode.OK
    assert len(responses) == 3
    errors = [r.error_message for r in responses if r.error_message]
    assert len(errors) == 1 and errors[0].startswith(
        "INVALID_ARGUMENT: request: not a valid inference.ModelInferRequest"
    )
    answered = {r.infer_response.id: r.infer_response for r in responses if not r.error_message}
    expected = reference_scores(engine, image, [GOOD_TEXT.decode()])[0].match_logit
    for request_id in ("first", "last"):
        response = answered[request_id]
        raw = dict(zip((o.name for o in response.outputs), response.raw_output_contents, strict=True))
        assert np.frombuffer(raw["MATCH_LOGIT"], dtype="<f4")[0] == pytest.approx(expected, abs=1e-6)
    assert error_records(caplog) == []


def test_every_kserve_method_parses_leniently(teacher):
    """The health probes and metadata calls too: bad bytes are INVALID_ARGUMENT, never UNKNOWN."""
    with grpc.insecure_channel(teacher.target) as channel:
        for method in ("ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelConfig"):
            call = channel.unary_unary(f"/{kserve.SERVICE_NAME}/{method}", request_serializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                call(b"\x0a\x05ab", timeout=30)  # field 1 claims 5 bytes, 2 follow
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method


# ------------------------------------------------------------------ lying shapes and huge tensors
def test_bytes_tensor_with_more_elements_than_its_shape_stops_early(teacher, client):
    """Found: 4 MB of zero length prefixes were all split (1,000,000 elements, on the event loop)
    before the count was compared with the shape; now the first element past it is refused."""
    request = raw_request(png_bytes(202))
    request.raw_input_contents[1] = b"\x00" * 4_000_000
    error = infer_raw(teacher, request.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("TEXT: raw contents hold more than the 1 element the shape says")
    with pytest.raises(InvalidInputError, match="more than the 2 elements"):
        kserve.decode_bytes_tensor(b"\x00" * 4_000_000, 2, "TEXT")
    assert_serving(client)


def test_shape_larger_than_the_contents_can_hold_is_refused_before_splitting(teacher, client):
    request = raw_request(png_bytes(203))
    request.inputs[1].shape[:] = [2**63 - 1]
    error = infer_raw(teacher, request.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("TEXT: shape [9223372036854775807] is over the limit of")
    assert_serving(client)


def test_more_pairs_than_the_limits_allow_are_refused_before_planning(teacher, client):
    """The module's teacher allows 64 images x 8 sentences = 512 distinct pairs; 600 pairs (even of
    one image) are refused naming both tensors, before any image is hashed."""
    count = 600
    images = triton.InferInput("IMAGE", [count], "BYTES")
    images.set_data_from_numpy(np.array([b"x"] * count, dtype=np.object_))
    texts = triton.InferInput("TEXT", [count], "BYTES")
    texts.set_data_from_numpy(np.array([GOOD_TEXT] * count, dtype=np.object_))
    error = infer_error(client, MODEL, [images, texts])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith("IMAGE: shape [600] is over the limit of 512 pairs")
    assert_serving(client)


def test_oversized_region_contents_are_refused_before_conversion():
    """64 MB of ``fp32_contents`` for a [1, 8] REGION: the count is compared before the values are
    converted (that conversion cost 0.75 s of CPU on the event loop here). The bound is generous:
    counting costs microseconds."""
    request = kv2.ModelInferRequest()
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    region = request.inputs.add(name="REGION", datatype="FP32", shape=[1, 8])
    values = 16_000_000
    packed = b"\x32" + _varint(values * 4) + bytes(values * 4)  # field 6 (fp32_contents), packed
    region.contents.CopyFrom(kv2.InferTensorContents.FromString(packed))
    started = time.thread_time()
    with pytest.raises(InvalidInputError, match=r"REGION: contents hold 16000000 values but the shape \[1, 8\] says 8"):
        kserve.read_regions(request, 1)
    assert time.thread_time() - started < 0.25


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])
