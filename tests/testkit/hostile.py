"""Hostile input for every door of the teacher, and the oracle that judges each answer.

Shared by ``tests/teacher/test_fuzz_doors.py`` (a few hundred cases per door) and
``bench/fuzz_doors.py`` (thousands). A *door* is one way in: ``native`` (the gRPC
``hoidistill.teacher.v1.TeacherService``, structured messages with hostile contents and raw bytes
that are no protobuf at all, unary and streamed), ``kserve`` (``inference.GRPCInferenceService``
the same way), ``images`` (image files built to be expensive or broken, sent through the native
``Score``), ``http`` (request bodies of every wrong kind) and ``raw`` (TCP connections that send
garbage to the gRPC and HTTP ports and hang up).

Each door has a Hypothesis strategy of cases and a ``send`` that returns the status labels the
server answered (a stream answers one label per message). ``judge`` is the oracle: a gRPC
INTERNAL / UNKNOWN, an HTTP 5xx, a stream that ends early, a call that runs into the client's own
deadline, or a server that stopped answering is a failure; RESOURCE_EXHAUSTED / 429 and
INVALID_ARGUMENT / 4xx are answers. ``FuzzTarget`` drives one ``python -m teacher_server serve``
child process: per case it records the server's CPU time (all threads, from ``/proc``), and its
``check_good`` sends a known-good request whose scores must equal a direct engine call.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import httpx
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as kv2

from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server.hoi.digest import image_digest
from testkit.processes import TeacherProcess
from testkit.teacher import png_bytes

DOORS = ("native", "kserve", "images", "http", "raw")
NATIVE_SCORE = "/hoidistill.teacher.v1.TeacherService/Score"
NATIVE_STREAM = "/hoidistill.teacher.v1.TeacherService/ScoreStream"
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
KSERVE_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
MODEL = "blip_itm"
GOOD_IMAGE = png_bytes(1500)
GOOD_SENTENCES = ("a person ride a horse", "a person hold a cup")
# A call that is still unanswered after this long is a hang (a failure), not a slow answer: the
# slowest legitimate case (a 40 Mpx image decoded on a busy 2-core machine) takes a few seconds.
CALL_TIMEOUT_S = 60.0
# The largest message the fuzzing client sends or reads: past the server's default limit
# (64 MiB), so the server's own limit is what answers.
CLIENT_MESSAGE_BYTES = 80 * 1024 * 1024
# Statuses that are failures whatever the door (see ``judge``).
BAD_GRPC = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "CLIENT_TIMEOUT", "STREAM_ENDED_EARLY"})
# The HTTP statuses the API documents (docs/teacher.md; ERROR_RESPONSES in the OpenAPI schema)
# short of 5xx: scores, or a client error with
# the JSON error body.
HTTP_ANSWERS = frozenset({200, 401, 404, 405, 413, 415, 422, 429})
# The stated per-case CPU bound: the server's CPU time (all threads) spent on one case. A good
# request on the tiny model costs ~10-30 ms; the default limits admit a 40 Mpx image, and a
# 6000 x 6000 PNG costs 0.6-1.2 s CPU to decode and resize here, which a deployer accepts by
# those limits. The finding's 39,000,000 x 1 PNG (38 KB) costs 1.7-4.9 s: that is what the bound
# is for.
CPU_BOUND_MS = 2000.0
# RSS is "flat" when the end of a door is within this much of its level after the door's first
# tenth of cases (the warm-up: the allocator's arenas have grown to what the door's largest inputs
# need and keep it, which is not a leak; the start, before the warm-up, is reported too). A leak
# of 10 KB per case over 5,000 cases is 49 MiB: the bench's runs see one; the tests' short runs
# only see gross growth.
RSS_BOUND_FRACTION = 0.10
RSS_BOUND_MIN_MB = 32.0
WARMUP_FRACTION = 0.10
# Doors whose inputs need big buffers get those on top, as measured here. images: a decode
# thread's malloc arena may keep the last image it decoded, at most the largest image the door
# sends as RGB (6000 x 6000 x 3 bytes = 103 MiB). kserve: its largest requests are 40 MB (5,000
# IMAGE elements), held as received bytes, parsed message and element copies at once; over
# 2,000 such cases RSS moves up and down between 589 and 811 MiB and back, with no trend.
DOOR_RSS_EXTRA_MB = {"images": 110.0, "kserve": 120.0}


# ------------------------------------------------------------------------- protobuf wire bytes
def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative ``value``."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): a string, bytes or an embedded message."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def bit_flipped(data: bytes, positions: Sequence[int]) -> bytes:
    """``data`` with each bit at ``positions`` (taken modulo its bit length) inverted."""
    if not data:
        return data
    out = bytearray(data)
    for position in positions:
        bit = position % (len(out) * 8)
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# Mutations of a valid serialized message: what a broken client, proxy or attacker sends.
def _mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    positions = st.lists(st.integers(min_value=0, max_value=2**20), min_size=1, max_size=8)
    cut = st.floats(min_value=0.0, max_value=1.0)
    return st.one_of(
        st.builds(bit_flipped, valid, positions),
        st.builds(lambda data, f: data[: int(len(data) * f)], valid, cut),  # truncated
        st.builds(
            lambda data, junk, f: data[: int(len(data) * f)] + junk + data[int(len(data) * f) :],
            valid,
            st.binary(min_size=1, max_size=32),
            cut,
        ),  # spliced
        st.binary(max_size=512),  # random
    )


# ----------------------------------------------------------------------------- native (gRPC)
_HEX = "0123456789abcdef"
# Digests: empty (computed from the bytes), right, right but for case, well-formed and wrong,
# not hex, wrong length, arbitrary text.
_digests = st.one_of(
    st.just(""),
    st.just(image_digest(GOOD_IMAGE)),
    st.just(image_digest(GOOD_IMAGE).upper()),
    st.text(alphabet=_HEX, min_size=64, max_size=64),
    st.text(alphabet="0123456789abcdefg-xyz", min_size=64, max_size=64),
    st.text(alphabet=_HEX, min_size=0, max_size=130),
    st.text(max_size=80),
)
# Sentences: ordinary, empty, whitespace, any Unicode (protobuf itself refuses surrogates on the
# Python side; invalid UTF-8 travels in the raw-bytes cases), over the token limit, over a MB.
_sentences = st.one_of(
    st.sampled_from(GOOD_SENTENCES),
    st.just(""),
    st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2028", max_size=8),
    st.text(max_size=60),
    st.integers(min_value=10, max_value=5_000).map(lambda n: "a person " * n),
    st.just("x" * 1_100_000),
)
# Images the native door sends: none, the good one, random bytes, broken copies of the good one.
_item_images = st.one_of(
    st.just(b""),
    st.just(GOOD_IMAGE),
    st.binary(max_size=200),
    st.builds(bit_flipped, st.just(GOOD_IMAGE), st.lists(st.integers(0, 2**20), min_size=1, max_size=4)),
    st.builds(lambda f: GOOD_IMAGE[: int(len(GOOD_IMAGE) * f)], st.floats(0.0, 0.99)),
)
_coordinates = st.one_of(
    st.floats(width=32),  # NaN, infinities, negatives, huge
    st.sampled_from([0.0, 1.0, 39.0, 40.0, 41.0, -1.0, 1e30]),  # the good image is 40 x 32
)
_boxes = st.one_of(
    st.lists(_coordinates, min_size=4, max_size=4),
    st.lists(_coordinates, max_size=9),  # wrong count
    st.just([30.0, 20.0, 10.0, 5.0]),  # inverted
    st.just([0.0, 0.0, 4000.0, 4000.0]),  # outside the image
)
_regions = st.one_of(st.none(), st.builds(lambda h, o: pb.Region(human_box=h, object_box=o), _boxes, _boxes))


@st.composite
def _native_items(draw: st.DrawFn) -> pb.ImageSentences:
    sentences = draw(
        st.one_of(
            st.lists(_sentences, max_size=6),
            st.sampled_from([513, 2_000]).map(lambda n: [GOOD_SENTENCES[0]] * n),  # over the per-image limit
        )
    )
    item = pb.ImageSentences(digest=draw(_digests), image=draw(_item_images), sentences=sentences)
    region = draw(_regions)
    if region is not None:
        item.region.CopyFrom(region)
    return item


def native_requests() -> st.SearchStrategy[pb.ScoreRequest]:
    """Well-formed ``ScoreRequest`` messages with hostile contents; at most one costly item list."""
    items = st.one_of(
        st.lists(_native_items(), max_size=4),
        st.sampled_from([65, 300]).map(lambda n: [pb.ImageSentences(image=GOOD_IMAGE, sentences=["a"])] * n),
    )
    return st.builds(
        lambda request_id, items, timeout_ms: pb.ScoreRequest(
            request_id=request_id, items=items, timeout_ms=timeout_ms
        ),
        st.text(max_size=40),
        items,
        st.one_of(st.just(0), st.integers(min_value=0, max_value=2**32 - 1)),
    )


def good_native_request() -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id="good", items=[pb.ImageSentences(image=GOOD_IMAGE, sentences=list(GOOD_SENTENCES))]
    )


def _invalid_utf8_native() -> st.SearchStrategy[bytes]:
    """ScoreRequests whose string fields (request_id, digest, sentences) hold invalid UTF-8."""
    junk = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80"])

    def build(which: int, bad: bytes) -> bytes:
        item = wire_field(2, GOOD_IMAGE)
        if which == 0:
            return wire_field(1, bad) + wire_field(2, item + wire_field(3, b"a person"))
        if which == 1:
            return wire_field(2, wire_field(1, bad) + item + wire_field(3, b"a person"))
        return wire_field(2, item + wire_field(3, b"a person " + bad))

    return st.builds(build, st.integers(0, 2), junk)


def _lying_lengths() -> st.SearchStrategy[bytes]:
    """A field whose length prefix claims far more than follows; groups nested past any limit."""
    return st.one_of(
        st.builds(lambda n, tail: varint(2 << 3 | 2) + varint(n) + tail, st.integers(1, 2**63), st.binary(max_size=16)),
        st.integers(50, 2_000).map(_nested),
    )


def _nested(depth: int) -> bytes:
    """``depth`` nested groups in an unknown field (15): the messages themselves do not nest, so
    unknown groups are how a message reaches the parser's recursion limit."""
    return varint(15 << 3 | 3) * depth + varint(15 << 3 | 4) * depth


def native_raw_messages() -> st.SearchStrategy[bytes]:
    """Byte strings sent as a ScoreRequest that are not valid ones: mutated, invalid UTF-8, lying."""
    valid = st.sampled_from(
        [
            good_native_request().SerializeToString(),
            pb.ScoreRequest(
                items=[
                    pb.ImageSentences(
                        digest=image_digest(GOOD_IMAGE),
                        sentences=["a"],
                        region=pb.Region(human_box=[0, 0, 5, 5], object_box=[1, 1, 9, 9]),
                    )
                ]
            ).SerializeToString(),
        ]
    )
    return st.one_of(_mutated(valid), _invalid_utf8_native(), _lying_lengths())


# ----------------------------------------------------------------------------------- KServe
def _bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """A raw BYTES tensor: per element a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


_lying_bytes_tensors = st.one_of(
    st.builds(lambda n, e: struct.pack("<I", n) + e, st.integers(0, 2**32 - 1), st.binary(max_size=16)),
    st.builds(
        lambda e, cut: _bytes_tensor(e)[:cut],
        st.lists(st.binary(max_size=8), min_size=1, max_size=3),
        st.integers(0, 20),
    ),
    st.binary(max_size=64),
)
_datatypes = st.sampled_from(["BYTES", "FP32", "FP16", "INT64", "UINT8", "BOOL", "", "bytes", "STRING", "FP64"])
_shapes = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(-2, 10), max_size=4)
_names = st.one_of(st.sampled_from(["IMAGE", "TEXT", "REGION", "image", "", "MATCH_PROB"]), st.text(max_size=10))
_text_elements = st.one_of(
    st.sampled_from([s.encode() for s in GOOD_SENTENCES]),
    st.sampled_from([b"", b" ", b"\xff\xfe", b"a\x80person", b"\xed\xa0\x80", b"a person " * 3_000]),
    st.binary(max_size=40),
)
_image_elements = st.one_of(st.just(GOOD_IMAGE), st.just(b""), st.binary(max_size=100), _item_images)


@st.composite
def kserve_requests(draw: st.DrawFn) -> kv2.ModelInferRequest:
    """A valid ModelInferRequest (IMAGE, TEXT, maybe REGION) with one to three things broken."""
    pairs = draw(st.integers(0, 3))
    images = [draw(_image_elements) for _ in range(pairs)]
    texts = [draw(_text_elements) for _ in range(pairs)]
    use_raw = draw(st.booleans())
    request = kv2.ModelInferRequest(model_name=MODEL, id=draw(st.text(max_size=10)))
    tensors: list[tuple[str, str, list[int], Any]] = [
        ("IMAGE", "BYTES", [pairs], images),
        ("TEXT", "BYTES", [pairs], texts),
    ]
    if draw(st.booleans()):
        regions = draw(st.lists(_coordinates, min_size=8 * pairs, max_size=8 * pairs))
        tensors.append(("REGION", "FP32", [pairs, 8], regions))
    mutations = draw(
        st.lists(
            st.sampled_from(
                [
                    "datatype",
                    "shape",
                    "name",
                    "lying_raw",
                    "raw_count",
                    "huge",
                    "duplicate",
                    "model",
                    "outputs",
                    "region_contents",
                    "mixed",
                ]
            ),
            min_size=1,
            max_size=3,
        )
    )
    for mutation in mutations:
        index = draw(st.integers(0, len(tensors) - 1))
        name, datatype, shape, values = tensors[index]
        if mutation == "datatype":
            tensors[index] = (name, draw(_datatypes), shape, values)
        elif mutation == "shape":
            tensors[index] = (name, datatype, draw(_shapes), values)
        elif mutation == "name":
            tensors[index] = (draw(_names), datatype, shape, values)
        elif mutation == "huge":  # a repeated field far over every limit
            count = draw(st.sampled_from([65, 600, 5_000]))
            element = GOOD_IMAGE if name == "IMAGE" else GOOD_SENTENCES[0].encode()
            tensors[index] = (name, datatype, [count], [element] * count if name != "REGION" else [0.0] * 8 * count)
        elif mutation == "duplicate":
            tensors.append(tensors[index])
        elif mutation == "model":
            request.model_name = draw(st.sampled_from(["", "other", MODEL.upper()]))
            request.model_version = draw(st.sampled_from(["", "1", "2", "-1"]))
        elif mutation == "outputs":
            for output in draw(st.lists(st.sampled_from(["MATCH_PROB", "MATCH_LOGIT", "IMAGE", ""]), max_size=3)):
                request.outputs.add(name=output)
        elif mutation == "region_contents":
            tensors[index] = (name, datatype, shape, draw(st.lists(st.floats(width=32), max_size=20)))
    raw_lies: dict[int, bytes] = {}
    if "lying_raw" in mutations:
        use_raw = True
        raw_lies[draw(st.integers(0, len(tensors) - 1))] = draw(_lying_bytes_tensors)
    for name, datatype, shape, values in tensors:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if use_raw:
            continue
        if values and isinstance(values[0], float):
            tensor.contents.fp32_contents.extend(values)
        else:
            tensor.contents.bytes_contents.extend(values)
    if use_raw:
        for index, (_, _, _, values) in enumerate(tensors):
            if index in raw_lies:
                request.raw_input_contents.append(raw_lies[index])
            elif values and isinstance(values[0], float):
                request.raw_input_contents.append(struct.pack(f"<{len(values)}f", *values))
            else:
                request.raw_input_contents.append(_bytes_tensor(values))
        if "raw_count" in mutations:  # one raw buffer too few or too many
            if draw(st.booleans()) or not request.raw_input_contents:
                request.raw_input_contents.append(b"\x00" * 4)
            else:
                del request.raw_input_contents[-1]
    if "mixed" in mutations and request.inputs:  # raw buffers and contents both given
        request.inputs[0].contents.bytes_contents.append(b"x")
        if not request.raw_input_contents:
            request.raw_input_contents.extend(_bytes_tensor([b"x"]) for _ in request.inputs)
    return request


def good_kserve_request() -> kv2.ModelInferRequest:
    request = kv2.ModelInferRequest(model_name=MODEL, id="good")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([GOOD_IMAGE] * 2)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        s.encode() for s in GOOD_SENTENCES
    )
    return request


def kserve_raw_messages() -> st.SearchStrategy[bytes]:
    """Byte strings sent as a ModelInferRequest that are not valid ones (the string fields
    model_name, id, inputs[].name and datatype with invalid UTF-8 among them)."""
    valid = st.just(good_kserve_request().SerializeToString())
    junk = st.sampled_from([b"\xff", b"\xc3\x28", b"blip\x80itm"])
    bad_strings = st.builds(
        lambda field_number, bad: wire_field(field_number, bad) + good_kserve_request().SerializeToString(),
        st.sampled_from([1, 3]),  # model_name, id
        junk,
    )
    bad_tensor_names = st.builds(lambda bad: wire_field(5, wire_field(1, bad) + wire_field(2, b"BYTES")), junk)
    return st.one_of(_mutated(valid), bad_strings, bad_tensor_names, _lying_lengths())


# ------------------------------------------------------------------------------------ images
def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@cache
def expensive_image(kind: str) -> bytes:
    """An image file (each under 20 MiB, the default byte limit) built to cost the decoder, or to
    break it. Built once per process: the heavy ones take the client a second too."""
    noise = Image.frombytes("RGB", (64, 48), bytes(range(256)) * 36)
    builders: dict[str, Callable[[], bytes]] = {
        "wide_png": lambda: _encode(Image.new("L", (4_000_000, 1)), "PNG", optimize=True),
        "tall_png": lambda: _encode(Image.new("L", (1, 4_000_000)), "PNG", optimize=True),
        "wide_bomb_png": lambda: _encode(Image.new("1", (39_000_000, 1)), "PNG", optimize=True),
        "tall_bomb_png": lambda: _encode(Image.new("1", (1, 39_000_000)), "PNG", optimize=True),
        "blank_6000_png": lambda: _encode(Image.new("RGB", (6000, 6000)), "PNG", optimize=True),
        "blank_6000_jpeg": lambda: _encode(Image.new("RGB", (6000, 6000)), "JPEG", quality=10),
        "blank_4000_gif": lambda: _encode(Image.new("P", (4000, 4000)), "GIF"),
        "deep_palette_png": lambda: _encode(noise.quantize(256).resize((1200, 900)), "PNG"),
        "png_16bit": lambda: _encode(Image.new("I;16", (1500, 1500), 40_000), "PNG"),
        "tiff_32bit_float": lambda: _encode(Image.new("F", (800, 600), 0.5), "TIFF"),
        "cmyk_jpeg": lambda: _encode(noise.convert("CMYK").resize((2000, 1500)), "JPEG"),
        "animated_gif": lambda: _encode(
            noise.quantize(64), "GIF", save_all=True, append_images=[noise.rotate(i).quantize(64) for i in range(200)]
        ),
        "animated_png": lambda: _encode(
            noise, "PNG", save_all=True, append_images=[noise.rotate(i) for i in range(100)]
        ),
        "webp": lambda: _encode(noise.resize((3000, 2000)), "WEBP", quality=5),
        "bmp_rle": lambda: _encode(Image.new("P", (3000, 3000)), "BMP"),
        "tiny_jpeg": lambda: _encode(noise, "JPEG"),
        "tiny_png": lambda: _encode(noise, "PNG"),
        "ico": lambda: _encode(noise, "ICO"),
        "tga": lambda: _encode(noise, "TGA"),
    }
    return builders[kind]()


IMAGE_KINDS = (
    "wide_png",
    "tall_png",
    "blank_6000_png",
    "blank_6000_jpeg",
    "blank_4000_gif",
    "deep_palette_png",
    "png_16bit",
    "tiff_32bit_float",
    "cmyk_jpeg",
    "animated_gif",
    "animated_png",
    "webp",
    "bmp_rle",
    "tiny_jpeg",
    "tiny_png",
    "ico",
    "tga",
)
# Not in IMAGE_KINDS (each costs seconds per case today): "wide_bomb_png" and "tall_bomb_png",
# the finding's bombs, sent by name by the CPU-bound test.


@dataclass(frozen=True)
class ImageCase:
    kind: str
    mutation: str
    data: bytes

    def __repr__(self) -> str:  # Hypothesis prints failing cases: the kind, not 20 MB of bytes
        return f"ImageCase({self.kind!r}, {self.mutation!r}, {len(self.data):,} bytes)"


@st.composite
def image_cases(draw: st.DrawFn, kinds: Sequence[str] = IMAGE_KINDS) -> ImageCase:
    """One expensive or broken image. A random 8-byte tail (decoders ignore trailing bytes) makes
    every case a new digest, so neither the score cache nor the vision cache hides the decode."""
    kind = draw(st.sampled_from(kinds))
    data = expensive_image(kind)
    mutation = draw(st.sampled_from(["none", "bitflip", "truncate", "header_flip"]))
    if mutation == "bitflip":
        data = bit_flipped(data, draw(st.lists(st.integers(0, 2**31), min_size=1, max_size=16)))
    elif mutation == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "header_flip":  # the header holds sizes, palettes and chunk lengths
        data = bit_flipped(data, draw(st.lists(st.integers(0, 8 * 64 - 1), min_size=1, max_size=4)))
    return ImageCase(kind, mutation, data + draw(st.binary(min_size=8, max_size=8)))


# -------------------------------------------------------------------------------------- HTTP
@dataclass(frozen=True)
class HttpCase:
    path: str
    content_type: str | None
    body: bytes

    def __repr__(self) -> str:
        return f"HttpCase({self.path!r}, {self.content_type!r}, {self.body[:120]!r}... {len(self.body):,} bytes)"


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20), _json_containers, max_leaves=12
)
_json_bodies = st.one_of(
    # right keys, wrong types
    st.fixed_dictionaries(
        {},
        optional={
            "image": st.one_of(_json_values, st.just(_b64(GOOD_IMAGE)), st.just("not base64!"), st.just("=" * 9)),
            "sentences": st.one_of(_json_values, st.lists(_sentences, max_size=5)),
            "triplets": _json_values,
            "variant": _json_values,
            "region": st.one_of(
                _json_values, st.builds(lambda h, o: {"human_box": h, "object_box": o}, _boxes, _boxes)
            ),
            "layer": _json_values,
            "format": _json_values,
        },
    ).map(lambda body: json.dumps(body).encode()),
    _json_values.map(lambda body: json.dumps(body).encode()),
    # malformed JSON: truncated, deep nesting, non-standard numbers, invalid UTF-8, a huge field
    st.builds(
        lambda f: json.dumps({"image": _b64(GOOD_IMAGE), "sentences": ["a"]}).encode()[: int(60 * f)], st.floats(0, 1)
    ),
    st.integers(100, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(100, 200_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.sampled_from(
        [
            b'{"image": NaN}',
            b'{"sentences": [1e999999]}',
            b"\xff\xfe{}",
            b'{"image": "\\ud800"}',
            b'{"a": 1, "a": 2}',
            b"",
            b"null",
            b"{" + b" " * 100_000,
        ]
    ),
    st.just(json.dumps({"image": _b64(GOOD_IMAGE), "sentences": ["a person"] * 20_000}).encode()),
    st.just(json.dumps({"image": _b64(GOOD_IMAGE), "sentences": ["x" * 1_000_000]}).encode()),
    st.binary(max_size=200),
)


def _multipart(parts: Sequence[tuple[str, bytes, bool]], boundary: str) -> bytes:
    out = b""
    for name, value, is_file in parts:
        disposition = f'form-data; name="{name}"' + ('; filename="x.png"' if is_file else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


_form_parts = st.lists(
    st.tuples(
        st.sampled_from(["image", "sentences", "triplets", "variant", "region", "layer", "format", "x", ""]),
        st.one_of(
            st.just(GOOD_IMAGE), st.binary(max_size=40), st.text(max_size=40).map(str.encode), st.just(b"a" * 2_000_000)
        ),
        st.booleans(),
    ),
    max_size=6,
)
_multipart_cases = st.one_of(
    st.builds(lambda parts: ("multipart/form-data; boundary=fz", _multipart(parts, "fz")), _form_parts),
    st.builds(lambda parts: ("multipart/form-data; boundary=other", _multipart(parts, "fz")), _form_parts),
    st.builds(lambda parts: ("multipart/form-data", _multipart(parts, "fz")), _form_parts),  # no boundary
    st.builds(
        lambda parts, cut: ("multipart/form-data; boundary=fz", _multipart(parts, "fz")[:cut]),
        _form_parts,
        st.integers(0, 300),
    ),
    st.just(("multipart/form-data; boundary=fz", _multipart([("sentences", b"a", False)] * 5_000, "fz"))),
)
_content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "image/png",
        "application/octet-stream",
        "multipart/mixed; boundary=x",
        "application/json\x00",
        "",
        "application/JSON ; charset=utf-16",
    ]
)


def http_cases() -> st.SearchStrategy[HttpCase]:
    """POST bodies of every wrong kind to the three POST routes."""
    paths = st.sampled_from(
        ["/v1/score", "/v1/score/triplets", "/v1/explain", "/v1/score?sort=sideways", "/v1/score?timeout_ms=-1"]
    )
    return st.one_of(
        st.builds(HttpCase, paths, st.just("application/json"), _json_bodies),
        st.builds(HttpCase, paths, _content_types, _json_bodies),
        st.builds(lambda path, case: HttpCase(path, case[0], case[1]), paths, _multipart_cases),
    )


# --------------------------------------------------------------------------------------- raw
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


@dataclass(frozen=True)
class RawCase:
    port: str  # "grpc" or "http"
    payload: bytes
    half_close: bool  # shut down the write side and read what comes back before closing

    def __repr__(self) -> str:
        return f"RawCase({self.port!r}, {self.payload[:80]!r}... {len(self.payload):,} bytes, {self.half_close})"


def raw_cases() -> st.SearchStrategy[RawCase]:
    """What a port scanner, a broken proxy or an attacker sends before hanging up."""
    frames = st.builds(
        _frame, st.integers(0, 12), st.integers(0, 255), st.integers(0, 2**31 - 1), st.binary(max_size=64)
    )
    payloads = st.one_of(
        st.binary(max_size=1_000),
        st.integers(0, len(_PREFACE)).map(lambda n: _PREFACE[:n]),  # half a preface
        st.builds(lambda junk: _PREFACE + junk, st.binary(max_size=200)),
        st.builds(lambda fs: _PREFACE + _SETTINGS + b"".join(fs), st.lists(frames, max_size=5)),
        # HEADERS on stream 1 with a garbage HPACK block, for the scoring method's path
        st.builds(lambda block: _PREFACE + _SETTINGS + _frame(1, 4, 1, block), st.binary(max_size=100)),
        st.sampled_from(
            [
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                b"POST /v1/score HTTP/1.1\r\nContent-Length: 999999\r\n\r\n{",
                b"\r\n" * 500,
            ]
        ),
    )
    return st.builds(RawCase, st.sampled_from(["grpc", "grpc", "grpc", "http"]), payloads, st.booleans())


# ---------------------------------------------------------------------------------- the oracle
def describe(case: Any, limit: int = 300) -> str:
    """A case, short enough for a report line: kinds, sizes and the first bytes."""
    if isinstance(case, tuple) and len(case) == 2 and case[0] in ("message", "bytes", "stream"):
        kind, payload = case
        if kind == "message":
            text = f"{payload.DESCRIPTOR.name} ({payload.ByteSize():,} bytes) {str(payload)[:limit]!r}"
        elif kind == "bytes":
            text = f"bytes ({len(payload):,}) {payload[:120]!r}"
        else:
            text = "stream [" + "; ".join(f"({len(m):,}) {m[:60]!r}" for m in payload) + "]"
        return text[:limit]
    return repr(case)[:limit]


def judge(labels: Sequence[str]) -> list[str]:
    """The failures among one case's status labels (empty: the case passed)."""
    return [
        label
        for label in labels
        if label in BAD_GRPC or label.startswith("CLIENT_ERROR") or label[:1] == "5" or label.endswith("_error_body")
    ]


def _grpc_label(error: grpc.RpcError, started: float) -> str:
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started >= CALL_TIMEOUT_S * 0.9:
        return "CLIENT_TIMEOUT"  # our own deadline: the server never answered
    return code.name


def _stream_status_label(code: int) -> str:
    return grpc.StatusCode(next(s for s in grpc.StatusCode if s.value[0] == code)).name if code else "OK"


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_ms(pid: int) -> float:
    """User + system CPU time of ``pid``, all its threads, in milliseconds (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")


@dataclass
class DoorReport:
    """What one door's run saw: per-status counts, failures (with the case), CPU and RSS."""

    door: str
    cases: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    max_cpu_ms: float = 0.0
    max_cpu_case: str = ""
    max_wall_ms: float = 0.0
    good_checks: int = 0
    rss_start_mb: float = 0.0  # before the first case
    rss_warm_mb: float = 0.0  # after the warm-up (the first tenth of the cases)
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0

    def rss_bound_mb(self) -> float:
        """The most RSS the door may end with: the warm level plus the stated margin."""
        margin = max(RSS_BOUND_MIN_MB, self.rss_warm_mb * RSS_BOUND_FRACTION)
        return self.rss_warm_mb + margin + DOOR_RSS_EXTRA_MB.get(self.door, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "door": self.door,
            "cases": self.cases,
            "statuses": dict(sorted(self.statuses.items())),
            "failures": len(self.failures),
            "first_failures": self.failures[:5],
            "max_cpu_ms": round(self.max_cpu_ms, 1),
            "max_cpu_case": self.max_cpu_case[:200],
            "max_wall_ms": round(self.max_wall_ms, 1),
            "good_checks": self.good_checks,
            "rss_start_mb": round(self.rss_start_mb, 1),
            "rss_warm_mb": round(self.rss_warm_mb, 1),
            "rss_end_mb": round(self.rss_end_mb, 1),
            "rss_peak_mb": round(self.rss_peak_mb, 1),
            "rss_bound_mb": round(self.rss_bound_mb(), 1),
        }


class FuzzTarget:
    """A running ``serve`` child process and clients for every door (one channel, one HTTP client)."""

    def __init__(self, teacher: TeacherProcess, expected: Sequence[tuple[float, float]]) -> None:
        self.teacher = teacher
        self.expected = list(expected)  # (match_logit, match_prob) of GOOD_SENTENCES on GOOD_IMAGE
        options = [
            ("grpc.max_send_message_length", CLIENT_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", CLIENT_MESSAGE_BYTES),
        ]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{teacher.grpc_port}", options=options)
        # Raw methods: bytes in, bytes out (no serializer), so any byte string reaches the server.
        self._unary = {
            "native": self.channel.unary_unary(NATIVE_SCORE),
            "kserve": self.channel.unary_unary(KSERVE_INFER),
        }
        self._stream = {
            "native": self.channel.stream_stream(NATIVE_STREAM),
            "kserve": self.channel.stream_stream(KSERVE_STREAM),
        }
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{teacher.http_port}", timeout=CALL_TIMEOUT_S)

    @property
    def pid(self) -> int:
        assert self.teacher.process is not None
        return self.teacher.process.pid

    def close(self) -> None:
        self.channel.close()
        self.http.close()

    # ------------------------------------------------------------------- one call per door
    def unary(self, api: str, message: bytes) -> list[str]:
        started = time.monotonic()
        try:
            self._unary[api](message, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            return [_grpc_label(error, started)]
        return ["OK"]

    def stream(self, api: str, messages: Sequence[bytes]) -> list[str]:
        """Send ``messages`` on one stream: one label per answer, then the stream's own status;
        fewer answers than messages is STREAM_ENDED_EARLY (the stream must survive bad ones)."""
        started = time.monotonic()
        labels = []
        try:
            for answer in self._stream[api](iter(messages), timeout=CALL_TIMEOUT_S):
                if api == "native":
                    labels.append(_stream_status_label(pb.ScoreResponse.FromString(answer).status.code))
                else:
                    error = kv2.ModelStreamInferResponse.FromString(answer).error_message
                    code = error.split(":", 1)[0]
                    # error_message starts with the status name, but for an unknown model
                    labels.append("OK" if not error else code if code in grpc.StatusCode.__members__ else "NOT_FOUND")
        except grpc.RpcError as error:
            labels.append(_grpc_label(error, started))
        else:
            labels.append("OK")
        if len(labels) - 1 < len(messages):
            labels.append("STREAM_ENDED_EARLY")
        return labels

    def post(self, case: HttpCase) -> list[str]:
        headers = {"content-type": case.content_type} if case.content_type is not None else {}
        try:
            response = self.http.post(case.path, content=case.body, headers=headers)
        except httpx.TimeoutException:
            return ["CLIENT_TIMEOUT"]
        except httpx.LocalProtocolError:  # httpx itself refused to send it (e.g. a NUL in a header)
            return ["not_sent"]
        except httpx.HTTPError:  # the server dropped the connection: as bad as a 500
            return ["UNAVAILABLE"]
        label = str(response.status_code)
        if response.status_code not in HTTP_ANSWERS:
            label += "_undocumented_error_body"
        elif response.status_code != 200:
            try:  # every refusal is the documented JSON error naming its status
                error = response.json()["error"]
                if error["status"] != response.status_code or not error["message"]:
                    label += "_bad_error_body"
            except (ValueError, KeyError, TypeError):
                label += "_not_json_error_body"
        return [label]

    def raw(self, case: RawCase) -> list[str]:
        port = self.teacher.grpc_port if case.port == "grpc" else self.teacher.http_port
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(case.payload)
                if not case.half_close:
                    return [f"{case.port}_sent"]
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(0.5)
                reply = sock.recv(65536)
                return [f"{case.port}_{'reply' if reply else 'closed'}"]
        except TimeoutError:
            return [f"{case.port}_silent"]
        except ConnectionRefusedError:
            return ["UNAVAILABLE"]  # nothing listens any more
        except OSError:  # reset by the server: a fine answer to garbage
            return [f"{case.port}_reset"]

    # ------------------------------------------------------------------------ the checks
    def check_good(self) -> list[str]:
        """Send the known-good request; the problems with its answer (empty: right scores)."""
        try:
            answer = pb.ScoreResponse.FromString(
                self._unary["native"](good_native_request().SerializeToString(), timeout=CALL_TIMEOUT_S)
            )
        except grpc.RpcError as error:
            return [f"good request failed: {error.code().name}: {error.details()}"]
        got = [(s.match_logit, s.match_prob) for item in answer.items for s in item.scores]
        if len(got) != len(self.expected) or any(
            abs(a - b) > 1e-5
            for pair_got, pair_want in zip(got, self.expected, strict=False)
            for a, b in zip(pair_got, pair_want, strict=True)
        ):
            return [f"good request scored {got}, the engine says {self.expected}"]
        return []

    def alive(self) -> bool:
        return self.teacher.process is not None and self.teacher.process.poll() is None

    def measure(self, report: DoorReport, labels_of: Callable[[], list[str]], case: Any) -> list[str]:
        """Run one case: its labels into ``report``, the server's CPU and the client's wall time;
        returns the case's failures (also recorded in the report, with the case)."""
        cpu_before, started = cpu_ms(self.pid), time.monotonic()
        try:
            labels = labels_of()
        except Exception as exc:  # a bug of this harness's client: recorded, never silent
            labels = [f"CLIENT_ERROR {type(exc).__name__}: {exc}"[:200]]
        wall, cost = (time.monotonic() - started) * 1000.0, cpu_ms(self.pid) - cpu_before
        report.cases += 1
        for label in labels:
            report.statuses[label] = report.statuses.get(label, 0) + 1
        if cost > report.max_cpu_ms:
            report.max_cpu_ms, report.max_cpu_case = cost, describe(case)
        report.max_wall_ms = max(report.max_wall_ms, wall)
        failures = judge(labels)
        if cost > CPU_BOUND_MS:
            failures.append(f"CPU_OVER_BOUND ({cost:.0f} ms > {CPU_BOUND_MS:.0f} ms)")
        if not self.alive():
            failures.append("server process exited")
        if failures:
            report.failures.append(f"{failures} <- {describe(case)}")
        return failures


def engine_expected(model_dir: Path) -> list[tuple[float, float]]:
    """(match_logit, match_prob) of GOOD_SENTENCES on GOOD_IMAGE from a direct engine call."""
    from testkit.teacher import reference_engine, reference_scores

    engine = reference_engine(model_dir)
    return [(s.match_logit, s.match_prob) for s in reference_scores(engine, GOOD_IMAGE, GOOD_SENTENCES)]


def door_call(target: FuzzTarget, door: str, case: Any) -> Callable[[], list[str]]:
    """The call that sends ``case`` through ``door`` (the strategies' cases, see ``door_cases``)."""
    if door in ("native", "kserve"):
        kind, payload = case
        if kind == "message":
            return lambda: target.unary(door, payload.SerializeToString())
        if kind == "bytes":
            return lambda: target.unary(door, payload)
        return lambda: target.stream(door, payload)
    if door == "images":
        request = pb.ScoreRequest(items=[pb.ImageSentences(image=case.data, sentences=[GOOD_SENTENCES[0]])])
        return lambda: target.unary("native", request.SerializeToString())
    if door == "http":
        return lambda: target.post(case)
    if door == "raw":
        return lambda: target.raw(case)
    raise ValueError(f"door: unknown {door!r}; expected one of {', '.join(DOORS)}")


def _streams(good: bytes, bad: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    """A stream of 2-4 messages, hostile ones among good ones (the good ones must still be answered)."""
    return st.lists(st.one_of(st.just(good), bad), min_size=2, max_size=4)


def door_cases(door: str, *, raw_bytes: bool = True, streams: bool = True) -> st.SearchStrategy[Any]:
    """The Hypothesis strategy of one door's cases. For the gRPC doors a case is
    ``("message", msg)``, ``("bytes", data)`` or ``("stream", [data, ...])``; ``raw_bytes`` and
    ``streams`` leave the non-protobuf and the streamed cases out (to test them on their own)."""
    if door in ("native", "kserve"):
        messages = native_requests() if door == "native" else kserve_requests()
        raw = native_raw_messages() if door == "native" else kserve_raw_messages()
        good = (good_native_request() if door == "native" else good_kserve_request()).SerializeToString()
        options = [messages.map(lambda m: ("message", m))]
        if raw_bytes:
            options.append(raw.map(lambda b: ("bytes", b)))
        if streams:
            hostile = (
                st.one_of(messages.map(lambda m: m.SerializeToString()), raw)
                if raw_bytes
                else messages.map(lambda m: m.SerializeToString())
            )
            options.append(_streams(good, hostile).map(lambda s: ("stream", s)))
        return st.one_of(options)
    if door == "images":
        return image_cases()
    if door == "http":
        return http_cases()
    if door == "raw":
        return raw_cases()
    raise ValueError(f"door: unknown {door!r}; expected one of {', '.join(DOORS)}")


def run_door(
    target: FuzzTarget,
    door: str,
    cases: st.SearchStrategy[Any],
    hypothesis_settings: Callable[[Callable[..., None]], Callable[..., None]],
    *,
    examples: int,
    good_every: int,
    strict: bool,
    replay: bool = False,
) -> DoorReport:
    """Send every case ``cases`` draws (``examples`` of them, under ``hypothesis_settings``)
    through ``door``, a known-good request every ``good_every`` cases and at the end.

    ``strict`` (tests): the first failure, a wrong good answer or an RSS over the bound raises
    ``AssertionError`` naming the case. Otherwise (the bench) every failure is recorded in the
    report and the run goes on. ``replay`` (tests, whose runs are too short for a warm-up
    tenth): every case is sent a second time, the warm RSS is the one after the first pass, so
    the bound compares the same inputs twice (a leak grows, allocator arenas do not).
    """
    report = DoorReport(door, rss_start_mb=rss_mb(target.pid))
    report.rss_peak_mb = report.rss_warm_mb = report.rss_start_mb
    warmup = max(1, int(examples * WARMUP_FRACTION))

    def good() -> None:
        problems = target.check_good() if target.alive() else ["server process exited"]
        report.good_checks += 1
        report.failures.extend(f"after {report.cases} cases: {problem}" for problem in problems)
        assert not (strict and problems), f"{door}: after {report.cases} cases: {problems}"

    sent: list[Any] = []

    @hypothesis_settings
    @given(case=cases)
    def one(case: Any) -> None:
        if replay:
            sent.append(case)
        failures = target.measure(report, door_call(target, door, case), case)
        assert not (strict and failures), f"{door}: {failures} <- {describe(case)}"
        rss = rss_mb(target.pid)
        report.rss_peak_mb = max(report.rss_peak_mb, rss)
        if report.cases == warmup and not replay:
            report.rss_warm_mb = rss
        if report.cases % good_every == 0:
            good()

    one()
    good()
    if replay:
        report.rss_warm_mb = rss_mb(target.pid)
        for case in sent:
            failures = target.measure(report, door_call(target, door, case), case)
            assert not (strict and failures), f"{door} (replayed): {failures} <- {describe(case)}"
            report.rss_peak_mb = max(report.rss_peak_mb, rss_mb(target.pid))
        good()
    report.rss_end_mb = rss_mb(target.pid)
    if report.rss_end_mb > report.rss_bound_mb():
        report.failures.append(
            f"RSS {report.rss_end_mb:.0f} MiB at the end, over the bound {report.rss_bound_mb():.0f} MiB "
            f"(warm {report.rss_warm_mb:.0f} MiB, start {report.rss_start_mb:.0f} MiB)"
        )
        assert not strict, f"{door}: {report.failures[-1]}"
    return report
