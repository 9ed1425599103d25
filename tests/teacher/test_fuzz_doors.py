"""Hostile input at every door of a real ``serve`` process: a bounded, reproducible fuzzing run.

The same strategies, doors and oracle as ``bench/fuzz_doors.py`` (``testkit.hostile``), at a
few dozen to 150 cases per door, each sent twice (Hypothesis ``derandomize``: the same cases every run),
against one ``python -m teacher_server serve`` child process with default settings on the tiny
model. Per case: no INTERNAL / UNKNOWN / UNAVAILABLE / 5xx, every stream answers every message,
the server's CPU time for the case within ``CPU_BOUND_MS``; every ``GOOD_EVERY`` cases and at the
end of a door, a known-good request gets the scores of a direct engine call; RSS at the end of a
door within the stated bound of its warm level (``DoorReport.rss_bound_mb``).

The findings this harness reproduced (KServe's strict parsing, bombs under the pixel limit,
corrupt images holding their pixels) each keep a test here that failed before its fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, settings
from hypothesis import strategies as st
from testkit.hostile import (
    CPU_BOUND_MS,
    GOOD_SENTENCES,
    DoorReport,
    FuzzTarget,
    ImageCase,
    door_call,
    door_cases,
    engine_expected,
    expensive_image,
    good_kserve_request,
    good_native_request,
    kserve_raw_messages,
    native_raw_messages,
    rss_mb,
    run_door,
    wire_field,
)
from testkit.processes import TeacherProcess

from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb

GOOD_EVERY = 25


def fuzz(examples: int) -> settings:
    """Reproducible (derandomize), no time limit per case, no shrinking (a failing case is
    reported as generated: shrinking re-sends expensive cases for minutes)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def target(tiny_blip_dir: Path) -> Iterator[FuzzTarget]:
    """One ``serve`` child process (default settings, tiny model) for every door of this file."""
    teacher = TeacherProcess(tiny_blip_dir)
    teacher.start()
    fuzz_target = FuzzTarget(teacher, engine_expected(tiny_blip_dir))
    try:
        for _ in range(3):  # the first requests build lazily made parts (tokenizer caches, pools)
            assert fuzz_target.check_good() == []
        yield fuzz_target
    finally:
        fuzz_target.close()
        teacher.kill()


def run(target: FuzzTarget, door: str, cases: st.SearchStrategy, examples: int, *explicit: object) -> None:
    """``run_door`` in strict mode (the first failure fails the test, naming the case), every
    case sent twice: the RSS bound compares the end of the second pass with the end of the first."""
    hypothesis_settings = fuzz(examples)

    def decorate(test):  # explicit cases first: a known finding fails on its own input, at once
        for case in reversed(explicit):
            test = example(case=case)(test)
        return hypothesis_settings(test)

    report = run_door(target, door, cases, decorate, examples=examples, good_every=GOOD_EVERY, strict=True, replay=True)
    assert report.cases >= len(explicit) and not report.failures, report.failures


# ------------------------------------------------------------------------------------ native
def test_native_messages_with_hostile_contents(target: FuzzTarget) -> None:
    """Score and ScoreStream with well-formed messages: wrong digests, odd sentences, NaN and
    inverted boxes, too many items or sentences. All INVALID_ARGUMENT or scored."""
    run(target, "native", door_cases("native", raw_bytes=False), 80)


def test_native_bytes_that_are_not_protobufs(target: FuzzTarget) -> None:
    """Score with bit-flipped, truncated, random and invalid-UTF-8 bytes; ScoreStream with such
    messages between good ones: INVALID_ARGUMENT each, and the stream answers every message."""
    bad_utf8 = wire_field(1, b"\xff")  # request_id, a string field, not UTF-8
    run(
        target,
        "native",
        st.one_of(
            native_raw_messages().map(lambda data: ("bytes", data)),
            st.lists(
                st.one_of(st.just(good_native_request().SerializeToString()), native_raw_messages()),
                min_size=2,
                max_size=4,
            ).map(lambda messages: ("stream", messages)),
        ),
        80,
        ("bytes", bad_utf8),
        ("stream", [bad_utf8, good_native_request().SerializeToString()]),
    )


# ------------------------------------------------------------------------------------ KServe
def test_kserve_messages_with_hostile_contents(target: FuzzTarget) -> None:
    """ModelInfer and ModelStreamInfer with well-formed messages: wrong datatypes, shapes that
    disagree with the data, BYTES length prefixes that lie, huge repeated fields, invalid UTF-8
    in TEXT, raw_input_contents against contents, unknown inputs."""
    run(target, "kserve", door_cases("kserve", raw_bytes=False), 80)


def test_kserve_bytes_that_are_not_protobufs(target: FuzzTarget) -> None:
    run(target, "kserve", kserve_raw_messages().map(lambda data: ("bytes", data)), 40, ("bytes", b"\xff"))


def test_kserve_stream_survives_bytes_that_are_not_protobufs(target: FuzzTarget) -> None:
    good = good_kserve_request().SerializeToString()
    messages = st.lists(st.one_of(st.just(good), kserve_raw_messages()), min_size=2, max_size=4)
    run(target, "kserve", messages.map(lambda m: ("stream", m)), 40, ("stream", [b"\xff", good]))


# ------------------------------------------------------------------------------------ images
def test_expensive_and_broken_images(target: FuzzTarget) -> None:
    """Extreme aspect ratios, blank 36 Mpx canvases, deep palettes, 16-bit, float TIFF, CMYK,
    animations, bit flips and truncations, each under the byte and pixel limits: scored or
    INVALID_ARGUMENT, each within the CPU bound."""
    run(target, "images", door_cases("images"), 30)


def test_image_bombs_under_the_pixel_limit_cost_less_than_the_cpu_bound(target: FuzzTarget) -> None:
    """One Score request with two of the finding's bombs (39,000,000 x 1 pixels, 5 KB; a
    different tail each, so two digests): 1.7-4.9 s of server CPU each before the longer-side and
    aspect bounds (over ``CPU_BOUND_MS`` together whatever the machine); now refused from the header."""
    bomb = expensive_image("wide_bomb_png")
    request = pb.ScoreRequest(
        items=[pb.ImageSentences(image=bomb + tail, sentences=[GOOD_SENTENCES[0]]) for tail in (b"one", b"two")]
    )
    report = DoorReport("images")
    failures = target.measure(report, lambda: target.unary("native", request.SerializeToString()), "2 x wide_bomb_png")
    assert report.max_cpu_ms <= CPU_BOUND_MS and not failures, failures


def test_corrupt_images_do_not_hold_their_decoded_pixels(target: FuzzTarget) -> None:
    """Truncated 6000 x 6000 blank PNGs (52 KB each, a new digest each) answer INVALID_ARGUMENT,
    and RSS stops growing: after the first ``WARM`` (each decoding thread's allocator keeps about
    one decode's worth, ~100 MiB, for reuse) the next ``MORE`` stay within the images door's bound.
    While an error's traceback held the partly decoded pixels, RSS grew by ~40-100 MiB per
    request without end (447 -> 2,503 MiB after 50)."""
    warm, more = 6, 14
    half = expensive_image("blank_6000_png")[: len(expensive_image("blank_6000_png")) // 2]
    report = DoorReport("images", rss_start_mb=rss_mb(target.pid))
    for tail in range(warm + more):
        if tail == warm:
            report.rss_warm_mb = rss_mb(target.pid)
        case = ImageCase("blank_6000_png", "truncate", half + tail.to_bytes(8, "little"))
        assert target.measure(report, door_call(target, "images", case), case) == []
    assert report.statuses == {"INVALID_ARGUMENT": warm + more}
    assert rss_mb(target.pid) <= report.rss_bound_mb(), (rss_mb(target.pid), report.as_dict())


# -------------------------------------------------------------------------------------- HTTP
def test_http_bodies_of_every_wrong_kind(target: FuzzTarget) -> None:
    """Wrong content types, malformed and deeply nested JSON, multipart forms with missing,
    extra or repeated parts, huge fields, wrong types: a 4xx with the JSON error body, or 200."""
    run(target, "http", door_cases("http"), 100)


# --------------------------------------------------------------------------------------- raw
def test_raw_garbage_on_the_ports(target: FuzzTarget) -> None:
    """TCP connections that send random bytes, half an HTTP/2 preface, bad frames or HTTP/1
    to the gRPC port (and garbage to the HTTP port) and hang up; the server keeps answering."""
    run(target, "raw", door_cases("raw"), 150)
