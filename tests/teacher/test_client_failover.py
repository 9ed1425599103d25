"""Failover of ``TeacherClient`` / ``AsyncTeacherClient`` over an endpoint list (``ipv4:A,B``).

A teacher that receives SIGTERM shuts its gRPC server down; gRPC then cancels the calls the
server had accepted but not started (the client sees ``CANCELLED``), and a stream written to as
it ends fails the write with ``INTERNAL`` "Internal error from Core" (grpc.aio's text). Neither
request was answered, so another replica may take it. Found by the faults-under-load test
(``tests/system/test_faults_under_load.py``): such a call was lost, not failed over.

Here one replica is a real gRPC server that cancels every call it receives (``context.cancel()``,
what gRPC's shutdown does to a pending call); the other is a real teacher. Every call must end
with the teacher's scores.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from testkit.teacher import RunningTeacher, png_bytes, reference_scores, running_teacher, teacher_settings

from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.client import AsyncTeacherClient, TeacherClient, TeacherScore
from teacher_server.engine import ItmEngine

torch.set_num_threads(1)

SENTENCES = ["a person ride a horse", "a person eat a pizza"]
CALLS = 12  # each score call is two RPCs (digest, then bytes): round robin sends some to each replica


class CancellingReplica(pb_grpc.TeacherServiceServicer):
    """A replica in its last moment: the server cancels every call it receives."""

    def __init__(self) -> None:
        self.cancelled = 0
        self._lock = threading.Lock()

    def _cancel(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.cancelled += 1
        context.cancel()

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        self._cancel(context)
        return pb.ScoreResponse()

    def ScoreStream(self, request_iterator: Any, context: grpc.ServicerContext) -> Iterator[pb.ScoreResponse]:
        self._cancel(context)
        return iter(())

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> pb.GetModelInfoResponse:
        self._cancel(context)
        return pb.GetModelInfoResponse()


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningTeacher]:
    with running_teacher(teacher_settings(tiny_blip_dir)) as running:
        yield running


@pytest.fixture
def cancelling() -> Iterator[tuple[str, CancellingReplica]]:
    servicer = CancellingReplica()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TeacherServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def assert_reference(scores: list[TeacherScore], engine: ItmEngine, image: bytes) -> None:
    expected = reference_scores(engine, image, SENTENCES)
    assert [s.match_logit for s in scores] == pytest.approx([e.match_logit for e in expected], abs=1e-5)
    assert [s.match_prob for s in scores] == pytest.approx([e.match_prob for e in expected], abs=1e-5)


def test_a_call_cancelled_by_a_replica_is_retried_on_another(
    teacher: RunningTeacher, cancelling: tuple[str, CancellingReplica], engine: ItmEngine
) -> None:
    address, replica = cancelling
    with TeacherClient(f"ipv4:{address},{teacher.target}", max_retries=10, backoff_s=0.01) as client:
        for seed in range(CALLS):
            image = png_bytes(seed)
            (scores,) = client.score([image], [SENTENCES])
            assert_reference(scores, engine, image)
    assert replica.cancelled > 0  # the cancelling replica was asked, and nothing was lost to it


@pytest.mark.parametrize("use_stream", [True, False], ids=["ScoreStream", "Score"])
def test_async_client_fails_over_a_cancelled_call_or_stream(
    teacher: RunningTeacher, cancelling: tuple[str, CancellingReplica], engine: ItmEngine, use_stream: bool
) -> None:
    address, replica = cancelling
    images = [png_bytes(100 + seed) for seed in range(CALLS)]

    async def run() -> list[list[list[TeacherScore]]]:
        # A client per call: one stream stays on the replica it opened on, and each new channel's
        # round robin starts at a random replica, so the cancelling one is met (all but surely).
        target = f"ipv4:{address},{teacher.target}"
        answers = []
        for image in images:
            async with AsyncTeacherClient(target, max_retries=10, backoff_s=0.01, use_stream=use_stream) as client:
                answers.append(await client.score([image], [SENTENCES]))
        return answers

    for image, (scores,) in zip(images, asyncio.run(run()), strict=True):
        assert_reference(scores, engine, image)
    assert replica.cancelled > 0
