"""Overload and device faults on real tiny BLIP engines: cached answers never wait behind cold work,
bounded admission by pairs and bytes, capped batches, single flight, honest retry hints, and a CUDA
out-of-memory error retried in halves (the real ``torch.cuda.OutOfMemoryError``, raised on CPU)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from testkit.teacher import (
    SENTENCES,
    GatedEngine,
    image_bytes,
    running_teacher,
    teacher_settings,
    wait_until,
    with_bytes,
)

from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.batcher import BatchItem, DynamicBatcher
from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine, ItmScore, PreparedImage
from teacher_server.errors import OverloadedError
from teacher_server.hoi.digest import image_digest
from teacher_server.metrics import ServiceMetrics
from teacher_server.service import ScoringService
from teacher_server.settings import ServerSettings, SettingsError

torch.set_num_threads(1)
T = TypeVar("T")


def batch_item(engine: ItmEngine, seed: int, sentences: Sequence[str]) -> BatchItem:
    data = image_bytes(seed)
    return BatchItem(image_digest(data), engine.prepare_image(data), tuple(sentences))


def settings_for(model_dir: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(model=str(model_dir), device=("cpu",), max_delay_ms=1.0, **overrides)


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(scenario())


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` in the loop; fail naming ``what`` if it never holds (a hang detector only)."""
    for _ in range(12_000):
        if condition():
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"never happened: {what}")


class DecodeGatedEngine:
    """A real engine whose image decoding (``prepare_views``, what the service runs in its decoding
    threads) waits at a gate the test opens: decodes as slow as the test wants, on any machine."""

    def __init__(self, engine: ItmEngine) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.decoding = 0  # decodes waiting at the gate now
        self.decodes = 0  # decodes started in all
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def prepare_views(self, *args: Any, **kwargs: Any) -> list[PreparedImage]:
        with self._lock:
            self.decoding += 1
            self.decodes += 1
        try:
            assert self.gate.wait(timeout=120), "test never opened the decode gate"
            return self._engine.prepare_views(*args, **kwargs)
        finally:
            with self._lock:
                self.decoding -= 1


# ------------------------------------------------------------ 1. cached answers never wait for decodes
def test_a_cached_request_is_answered_while_every_decoding_thread_is_busy(
    tiny_blip_dir: Path, engine: ItmEngine
) -> None:
    gated = DecodeGatedEngine(engine)
    warm = with_bytes(1, SENTENCES[:3])  # with its bytes: validation hashes them, as a first send does

    async def scenario() -> None:
        service = ScoringService([gated], settings_for(tiny_blip_dir))
        await service.start()
        gated.gate.set()
        await service.score([warm])  # now cached
        gated.gate.clear()
        # More cold requests than decoding threads, each stuck in a decode (a decompression bomb's
        # worth of time, held by the gate instead of a clock).
        cold = [asyncio.create_task(service.score([with_bytes(100 + k, SENTENCES[:2])])) for k in range(8)]
        threads = min(4, os.cpu_count() or 1)
        await until(lambda: gated.decoding == threads, "every decoding thread holds a decode")
        # The old service validated in the decoding pool: this waited until the gate opened. A
        # generous bound only detects that hang; the assertions are about order.
        (answer,) = await asyncio.wait_for(service.score([warm]), timeout=60)
        assert all(answer.cached)
        assert not gated.gate.is_set() and gated.decoding >= 1  # answered while decodes still held
        assert not any(task.done() for task in cold)
        gated.gate.set()
        results = await asyncio.gather(*cold)
        assert all(not r[0].image_required and not any(r[0].cached) for r in results)
        await service.stop()

    run(scenario)


# ------------------------------------------------------------------------ 2. admission by pairs and bytes
def test_new_cold_work_past_the_pair_bound_is_refused_before_decoding(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    gated = GatedEngine(engine)
    decoding = DecodeGatedEngine(gated)  # counts decodes; its gate stays open
    decoding.gate.set()

    async def scenario() -> ScoringService:
        service = ScoringService([decoding], settings_for(tiny_blip_dir, max_queue_pairs=4))
        await service.start()
        cached = with_bytes(1, SENTENCES[:5])
        gated.gate.set()
        await service.score([cached])
        gated.gate.clear()
        gated.entered.clear()
        running = asyncio.create_task(service.score([with_bytes(2, SENTENCES[:1])]))
        await gated.wait_entered()  # in the engine now, no longer queued
        queued = asyncio.create_task(service.score([with_bytes(3, SENTENCES[:3])]))
        await until(lambda: service.batcher.queued_pairs == 3, "the second request is queued")
        decodes = decoding.decodes
        with pytest.raises(OverloadedError, match=r"max_queue_pairs=4 pairs") as caught:
            await service.score([with_bytes(4, SENTENCES[:2])])  # 3 + 2 > 4
        assert caught.value.retry_after_s > 0
        assert decoding.decodes == decodes  # refused before its image was decoded
        assert service.batcher.queued_pairs == 3  # nothing of it was kept
        # Cached answers need no room in the queue: served while it is full.
        (warm,) = await service.score([cached])
        assert all(warm.cached)
        late = asyncio.create_task(service.score([with_bytes(6, SENTENCES[3:4])]))  # 3 + 1 fits
        gated.gate.set()
        for task in (running, queued, late):
            (result,) = await task
            assert not any(result.cached)
        await service.stop()
        return service

    service = run(scenario)
    assert service.metrics.value("hoidistill_teacher_rejected_total", {"reason": "queue_full"}) == 1
    assert service.metrics.value("hoidistill_teacher_queue_pairs") == 0


def test_new_cold_work_past_the_byte_bound_is_refused(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    gated = GatedEngine(engine)
    view_bytes = engine.prepare_image(image_bytes(0)).pixel_values.nbytes  # one prepared view

    async def scenario() -> None:
        service = ScoringService([gated], settings_for(tiny_blip_dir, max_queue_bytes=view_bytes + 1))
        await service.start()
        running = asyncio.create_task(service.score([with_bytes(2, SENTENCES[:1])]))
        await gated.wait_entered()
        queued = asyncio.create_task(service.score([with_bytes(3, SENTENCES[:1])]))
        # Once decoded and queued, its prepared pixel tensor is what it holds.
        await until(lambda: service.batcher.queued_bytes == view_bytes, "the second request is queued")
        with pytest.raises(OverloadedError, match=r"max_queue_bytes=\d+ bytes of images"):
            await service.score([with_bytes(4, SENTENCES[:1])])
        gated.gate.set()
        await asyncio.gather(running, queued)
        assert service.batcher.queued_bytes == 0
        await service.stop()

    run(scenario)


# --------------------------------------------------------------------------------- 3. capped batches
class RecordingEngine:
    """A real engine that logs each call (views, pairs) in ``events``; from the second call on it
    waits until the test has seen a first answer (or 60 s, logged as such)."""

    def __init__(self, engine: ItmEngine, events: list[tuple[str, int]]) -> None:
        self._engine = engine
        self.events = events
        self.first_answer = threading.Event()
        self.waited_in_vain = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def score(self, requests: Sequence[ImageSentences]) -> list[list[ItmScore]]:
        calls = sum(kind == "call" for kind, _ in self.events)
        self.events.append(("call", len(requests)))
        if calls >= 1 and not self.first_answer.wait(timeout=60):
            self.waited_in_vain = True
        return self._engine.score(requests)


def test_a_burst_is_served_in_capped_batches_first_answers_first(engine: ItmEngine) -> None:
    events: list[tuple[str, int]] = []
    recording = RecordingEngine(engine, events)
    metrics = ServiceMetrics()
    burst = [batch_item(engine, seed, SENTENCES[:1]) for seed in range(6)]  # 6 images, 1 pair each

    async def scenario() -> None:
        # Pairs would fit one call; the image cap splits the burst into 3 calls of 2 views.
        batcher = DynamicBatcher(
            [recording], max_batch_pairs=1000, max_batch_images=2, max_delay_ms=60_000, metrics=metrics
        )
        await batcher.start()
        futures = [future for work in burst for future in batcher.submit([work])]

        def answered(index: int) -> None:
            events.append(("answer", index))
            recording.first_answer.set()

        for index, future in enumerate(futures):
            future.add_done_callback(lambda _, i=index: answered(i))
        await asyncio.gather(*futures)
        await batcher.stop()

    run(scenario)
    calls = [n for kind, n in events if kind == "call"]
    assert calls == [2, 2, 2]
    first_answer = next(i for i, (kind, _) in enumerate(events) if kind == "answer")
    last_call = max(i for i, (kind, _) in enumerate(events) if kind == "call")
    assert first_answer < last_call  # answered before the last work was taken into a call
    assert not recording.waited_in_vain
    assert metrics.value("hoidistill_teacher_batch_images_count") == 3


def test_batch_pair_cap_keeps_its_former_name(tiny_blip_dir: Path) -> None:
    assert settings_for(tiny_blip_dir, max_batch_sentences=7).max_batch_pairs == 7
    assert settings_for(tiny_blip_dir, max_batch_pairs=9).max_batch_sentences == 9
    assert DynamicBatcher([object()], max_batch_sentences=5).max_batch_pairs == 5  # type: ignore[list-item]
    with pytest.raises(SettingsError, match=r"max_batch_sentences .* is the former name of max_batch_pairs"):
        settings_for(tiny_blip_dir, max_batch_pairs=8, max_batch_sentences=16)


# ------------------------------------------------------------------------------------ 4. single flight
def test_a_pair_already_running_is_awaited_not_scored_again(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    gated = GatedEngine(engine)
    item = with_bytes(7, SENTENCES[:4])

    async def scenario() -> ScoringService:
        service = ScoringService([gated], settings_for(tiny_blip_dir))
        await service.start()
        first = asyncio.create_task(service.score([item]))
        await gated.wait_entered()  # its 4 pairs are in the engine now
        second = asyncio.create_task(service.score([item]))  # the same, while they run
        await until(lambda: service.metrics.value("hoidistill_teacher_single_flight_pairs_total") == 4, "joined")
        gated.gate.set()
        (a,), (b,) = await asyncio.gather(first, second)
        assert a.match_logit == b.match_logit and not any(b.cached)
        await service.stop()
        return service

    run(scenario)
    assert engine.stats.sentences_scored == 4  # the old batcher scored them twice (8)


def test_a_joined_computation_outlives_the_request_that_started_it(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    gated = GatedEngine(engine)
    item = with_bytes(8, SENTENCES[:3])

    async def scenario() -> None:
        service = ScoringService([gated], settings_for(tiny_blip_dir))
        await service.start()
        blocker = asyncio.create_task(service.score([with_bytes(9, SENTENCES[:1])]))
        await gated.wait_entered()
        impatient = asyncio.create_task(service.score([item]))
        await until(lambda: service.batcher.queued_pairs == 3, "the first request is queued")
        patient = asyncio.create_task(service.score([item]))  # joins the queued pairs
        await until(lambda: service.metrics.value("hoidistill_teacher_single_flight_pairs_total") == 3, "joined")
        impatient.cancel()  # its caller gives up (as a deadline or a closed stream does)
        with pytest.raises(asyncio.CancelledError):
            await impatient
        assert service.batcher.queued_pairs == 3  # still wanted by the patient request
        gated.gate.set()
        await blocker
        (result,) = await patient
        assert len(result.match_logit) == 3 and not any(result.cached)
        await service.stop()

    run(scenario)
    assert engine.stats.sentences_scored == 1 + 3


# ------------------------------------------------------------------------------------ 5. retry hints
class MeteredEngine:
    """A real engine with a fixed cost per call and per pair on top (sleeps): a device whose
    speed the test knows, like a GPU whose large batches cost little more than small ones."""

    PER_CALL_S = 0.3
    PER_PAIR_S = 0.01

    def __init__(self, engine: ItmEngine) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def score(self, requests: Sequence[ImageSentences]) -> list[list[ItmScore]]:
        self.entered.set()
        assert self.gate.wait(timeout=60)
        time.sleep(self.PER_CALL_S + self.PER_PAIR_S * sum(len(r.sentences) for r in requests))
        return self._engine.score(requests)


def test_the_retry_hint_is_close_to_the_measured_drain_time(engine: ItmEngine) -> None:
    metered = MeteredEngine(engine)
    sentences = [f"a person hold a thing number {k}" for k in range(16)]

    async def scenario() -> tuple[float, float]:
        batcher = DynamicBatcher([metered], max_batch_pairs=48, max_delay_ms=0)
        await batcher.start()
        warm_up = batch_item(engine, 0, sentences[:1])  # torch's first call pays one-time costs
        engine.score([ImageSentences(warm_up.digest, warm_up.image, warm_up.sentences)])
        for size in (1, 1, 8, 2, 6, 4, 7, 3):  # small calls, one at a time (the first is not learnt)
            await asyncio.gather(*batcher.submit([batch_item(engine, size, sentences[:size])]))
        metered.gate.clear()
        metered.entered.clear()
        running = batcher.submit([batch_item(engine, 10, sentences[:1])])
        while not metered.entered.is_set():
            await asyncio.sleep(0.005)
        queued = [f for seed in (11, 12, 13) for f in batcher.submit([batch_item(engine, seed, sentences)])]
        hint = batcher.retry_hint()  # 48 queued pairs: one call
        loop = asyncio.get_running_loop()
        metered.gate.set()
        await asyncio.gather(*running)
        started = loop.time()
        await asyncio.gather(*queued)
        drained = loop.time() - started
        await batcher.stop()
        return hint, drained

    hint, drained = run(scenario)
    # The fit over the small calls gives the per-call cost and the per-pair speed, so the hint
    # for one 48-pair call is its measured time within a factor of 2 (noise of a shared machine:
    # both include the real engine's own time). The old hint, seconds per sentence of the small
    # calls times 48, was 7.6 s against a drain of 0.81 s here; this fit hinted 0.75 s and 0.80 s.
    assert drained / 2 <= hint <= drained * 2, (hint, drained)


def test_new_cold_work_behind_more_engine_time_than_allowed_is_refused_at_once(engine: ItmEngine) -> None:
    """Counts cannot know the device: past ``max_queue_wait_s`` of measured engine time waiting, or
    past what the request's deadline leaves, new cold work is refused now (RESOURCE_EXHAUSTED with
    a hint), not admitted to time out later. The load bench saw the count bound let a CPU teacher
    queue minutes of work, so overload ended in DEADLINE_EXCEEDED instead of 429."""
    metered = MeteredEngine(engine)  # 0.3 s per call + 10 ms per pair: ~0.38 s per 8-pair call
    sentences = [f"a person hold a thing number {k}" for k in range(8)]

    async def scenario() -> tuple[int, OverloadedError, OverloadedError, float]:
        batcher = DynamicBatcher([metered], max_batch_pairs=8, max_delay_ms=0, max_queue_wait_s=1.0)
        await batcher.start()
        for size in (1, 1, 8, 2, 6, 4, 7, 3):  # calls of several sizes: the fit learns the speed
            await asyncio.gather(*batcher.submit([batch_item(engine, size, sentences[:size])]))
        metered.gate.clear()
        metered.entered.clear()
        running = batcher.submit([batch_item(engine, 10, sentences[:1])])
        while not metered.entered.is_set():
            await asyncio.sleep(0.005)
        queued: list[asyncio.Future] = []
        refused: OverloadedError | None = None
        for seed in range(11, 31):  # each a call of its own (8 pairs)
            try:
                queued += batcher.submit([batch_item(engine, seed, sentences)])
            except OverloadedError as error:
                refused = error
                break
        assert refused is not None, "never refused by time"
        admitted = len(queued)
        # The request's own deadline: the queue ahead (over 1 s now) does not fit in 50 ms ...
        now = asyncio.get_running_loop().time()
        wanted = [("view-0", sentences[:1])]
        batcher.max_queue_wait_s = 0  # off: only the deadline speaks
        with pytest.raises(OverloadedError) as too_short:
            batcher.admit(wanted, 0, deadline=now + 0.05)
        # ... but fits in a minute.
        batcher.admit(wanted, 0, deadline=now + 60).release()
        hint = batcher.retry_hint()
        metered.gate.set()
        await asyncio.gather(*running, *queued)
        await batcher.stop()
        return admitted, refused, too_short.value, hint

    admitted, refused, too_short, hint = run(scenario)
    assert admitted >= 1
    assert "max_queue_wait_s=1" in str(refused) and refused.retry_after_s >= 1.0, refused
    assert "deadline" in str(too_short) and too_short.retry_after_s == pytest.approx(hint, rel=0.5)


# -------------------------------------------------------------------------- 6. device out of memory
class SmallDeviceEngine(ItmEngine):
    """The real engine on a "device" with room for ``ROOM`` pairs per call: more raise the real
    ``torch.cuda.OutOfMemoryError``; a pair with ``HUGE`` never fits. ``gate`` holds calls."""

    ROOM = 3
    HUGE = "a person hold a very large thing"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def score(self, requests: Sequence[ImageSentences]) -> list[list[ItmScore]]:
        self.entered.set()
        assert self.gate.wait(timeout=60)
        pairs = len({(r.view, s) for r in requests for s in r.sentences})
        self.calls.append(pairs)
        if pairs > self.ROOM or any(self.HUGE in r.sentences for r in requests):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {pairs} pairs")
        return super().score(requests)


def test_out_of_memory_retries_in_halves_and_fails_only_what_cannot_run(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    small = SmallDeviceEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu", dtype="fp32"))
    settings = teacher_settings(tiny_blip_dir)
    service = ScoringService([small], settings)
    images = [image_bytes(40 + k) for k in range(5)]
    asks = [
        [SENTENCES[0], SENTENCES[1]],
        [SENTENCES[2], SENTENCES[3], SENTENCES[4]],
        [SENTENCES[5], SmallDeviceEngine.HUGE],  # the one that cannot run
        [SENTENCES[0], SENTENCES[3]],
        [SENTENCES[1]],  # a second item of request 2, which fits
    ]

    def item(k: int) -> pb.ImageSentences:
        return pb.ImageSentences(digest=hashlib.sha256(images[k]).hexdigest(), image=images[k], sentences=asks[k])

    def request(k: int) -> pb.ScoreRequest:
        return pb.ScoreRequest(request_id=str(k), items=[item(k), item(4)] if k == 2 else [item(k)])

    with running_teacher(settings, service) as teacher, grpc.insecure_channel(teacher.target) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        outcomes: dict[int, Any] = {}

        def call(k: int) -> None:
            try:
                outcomes[k] = stub.Score(request(k), timeout=120)
            except grpc.RpcError as error:
                outcomes[k] = error

        blocker = pb.ScoreRequest(items=[pb.ImageSentences(image=image_bytes(99), sentences=[SENTENCES[0]])])
        held = threading.Thread(target=lambda: stub.Score(blocker, timeout=120))
        held.start()
        wait_until(small.entered.is_set, "the blocker is in the engine")
        threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        # All five items queued while the engine is held: then they run as one 10-pair batch.
        wait_until(lambda: service.batcher.queued_items == 5, "all four requests are queued")
        small.gate.set()
        for thread in (held, *threads):
            thread.join(timeout=120)
        assert small.calls[:2] == [1, 10]  # the blocker, then one merged batch too big for the device
        failed = outcomes[2]
        assert isinstance(failed, grpc.RpcError) and failed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of memory" in failed.details() and SmallDeviceEngine.HUGE in failed.details()
        assert int(dict(failed.trailing_metadata())["retry-after-ms"]) > 0
        for k in (0, 1, 3):
            response = outcomes[k]
            assert isinstance(response, pb.ScoreResponse), response
            prepared = engine.prepare_image(images[k])
            (expected,) = engine.score([ImageSentences(prepared.digest, prepared, asks[k])])
            got = response.items[0].scores
            for score, want in zip(got, expected, strict=True):
                # Scored in smaller batches than the reference: equal to float32 rounding.
                assert score.match_logit == pytest.approx(want.match_logit, rel=1e-5, abs=1e-6)
                assert score.match_prob == pytest.approx(want.match_prob, rel=1e-5, abs=1e-6)
        assert teacher.metric("hoidistill_teacher_device_oom_total") >= 1
        # The failed request's other item was scored and cached all the same; the service goes on:
        # the failed item's good sentence alone is served.
        again = stub.Score(pb.ScoreRequest(items=[item(4)]), timeout=60)
        assert again.items[0].scores[0].cached
        digest = hashlib.sha256(images[2]).hexdigest()
        alone = stub.Score(
            pb.ScoreRequest(items=[pb.ImageSentences(digest=digest, sentences=[SENTENCES[5]])]), timeout=60
        )
        assert alone.items[0].status == pb.ITEM_STATUS_OK and len(alone.items[0].scores) == 1
