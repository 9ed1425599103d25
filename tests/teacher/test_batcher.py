"""Dynamic batcher on real tiny BLIP engines: merging, caps, routing, admission, deadlines, drain."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from PIL import Image
from testkit.teacher import SENTENCES, GatedEngine

from teacher_server.batcher import BatchItem, DynamicBatcher, ShuttingDownError
from teacher_server.engine import (
    EngineSettings,
    ImageSentences,
    ItmEngine,
    ItmScore,
    PreparedImage,
)
from teacher_server.errors import ImageRequiredError, OverloadedError
from teacher_server.hoi.digest import image_digest
from teacher_server.metrics import ServiceMetrics

torch.set_num_threads(1)
T = TypeVar("T")


def image_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def item(engine: ItmEngine, seed: int, sentences: Sequence[str], *, with_image: bool = True) -> BatchItem:
    data = image_bytes(seed)
    image = engine.prepare_image(data) if with_image else None
    return BatchItem(image_digest(data), image, tuple(sentences))


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(scenario())


def histogram(metrics: ServiceMetrics, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram."""
    prefix = f"hoidistill_teacher_{name}"
    return metrics.value(f"{prefix}_count"), metrics.value(f"{prefix}_sum")


def test_scores_equal_the_engine_called_directly(engine: ItmEngine, reference: ItmEngine) -> None:
    items = [item(engine, 1, SENTENCES[:3]), item(engine, 2, SENTENCES[2:])]

    async def scenario() -> list[list[ItmScore]]:
        batcher = DynamicBatcher([engine], max_delay_ms=1)
        await batcher.start()
        results = await asyncio.gather(*batcher.submit(items))
        await batcher.stop()
        return results

    results = run(scenario)
    expected = reference.score([ImageSentences(i.digest, i.image, i.sentences) for i in items])
    for got_row, want_row in zip(results, expected, strict=True):
        assert len(got_row) == len(want_row)
        for got, want in zip(got_row, want_row, strict=True):
            assert got.match_logit == pytest.approx(want.match_logit, abs=1e-6)
            assert got.match_prob == pytest.approx(want.match_prob, abs=1e-6)


def test_concurrent_requests_share_one_engine_call_and_one_vision_pass(engine: ItmEngine) -> None:
    first, second, third = (
        item(engine, 1, SENTENCES[:2]),
        item(engine, 2, SENTENCES[2:4]),
        item(engine, 1, SENTENCES[1:3]),
    )  # the third repeats image 1
    metrics = ServiceMetrics()

    async def scenario() -> None:
        # A full batch (6 sentences) runs at once; the long delay shows nothing waited for it.
        batcher = DynamicBatcher([engine], max_batch_sentences=6, max_delay_ms=60_000, metrics=metrics)
        await batcher.start()
        futures = [*batcher.submit([first]), *batcher.submit([second]), *batcher.submit([third])]
        results = await asyncio.gather(*futures)
        assert [len(row) for row in results] == [2, 2, 2]
        assert results[0][1] == results[2][0]  # same (image, sentence): same score
        await batcher.stop()

    run(scenario)
    assert histogram(metrics, "batch_sentences") == (1, 5)  # one call; image 1's sentences merged (3)
    assert engine.stats.images_encoded == 2
    assert metrics.value("hoidistill_teacher_images_encoded_total") == 2
    assert metrics.value("hoidistill_teacher_sentences_scored_total") == 5


def test_batches_stop_at_max_batch_sentences(engine: ItmEngine) -> None:
    metrics = ServiceMetrics()

    async def scenario() -> None:
        batcher = DynamicBatcher([engine], max_batch_sentences=4, max_delay_ms=20, metrics=metrics)
        await batcher.start()
        work = [item(engine, seed, SENTENCES[:2]) for seed in (1, 2, 3)] + [item(engine, 4, SENTENCES)]
        await asyncio.gather(*batcher.submit(work))
        await batcher.stop()

    run(scenario)
    # [2 + 2], [2], then the 6-sentence item alone (larger than a batch, it is not split).
    assert histogram(metrics, "batch_sentences") == (3, 12)


def test_a_digest_always_goes_to_the_same_replica(engine: ItmEngine, tiny_blip_dir: Path) -> None:
    engines = [engine, ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu"))]
    work = [item(engine, seed, SENTENCES[:1]) for seed in range(8)]

    async def scenario() -> DynamicBatcher:
        batcher = DynamicBatcher(engines, max_delay_ms=1)
        await batcher.start()
        await asyncio.gather(*batcher.submit(work))
        # By digest only: served by the replica that holds the image.
        again = [BatchItem(w.digest, None, SENTENCES[1:2]) for w in work]
        await asyncio.gather(*batcher.submit(again))
        await batcher.stop()
        return batcher

    batcher = run(scenario)
    homes = {batcher.replica_of(w.digest) for w in work}
    assert homes == {0, 1}  # 8 random digests land on both replicas
    for w in work:
        home = batcher.replica_of(w.digest)
        assert engines[home].has_image(w.digest) and not engines[1 - home].has_image(w.digest)
    assert sum(e.stats.images_encoded for e in engines) == len(work)


def test_unknown_digest_is_image_required_without_failing_the_batch(engine: ItmEngine) -> None:
    known = item(engine, 1, SENTENCES[:2])
    unknown = item(engine, 2, SENTENCES[:2], with_image=False)

    async def scenario() -> list[Any]:
        batcher = DynamicBatcher([engine], max_batch_sentences=4, max_delay_ms=1000)
        await batcher.start()
        outcomes = await asyncio.gather(*batcher.submit([unknown, known]), return_exceptions=True)
        await batcher.stop()
        return outcomes

    missing, scored = run(scenario)
    assert isinstance(missing, ImageRequiredError) and missing.digest == unknown.digest
    assert len(scored) == 2 and all(isinstance(score, ItmScore) for score in scored)


def test_full_queue_refuses_the_whole_request_with_a_retry_hint(engine: ItmEngine) -> None:
    gated = GatedEngine(engine)
    metrics = ServiceMetrics()

    async def scenario() -> None:
        batcher = DynamicBatcher([gated], max_queue=3, max_delay_ms=0, metrics=metrics)
        await batcher.start()
        running = batcher.submit([item(engine, 1, SENTENCES[:1])])
        await gated.wait_entered()  # that one is in the engine now, no longer queued
        waiting = batcher.submit([item(engine, 2, SENTENCES[:1]), item(engine, 3, SENTENCES[:1])])
        assert batcher.queued_items == 2
        with pytest.raises(OverloadedError, match="max_queue=3") as caught:
            batcher.submit([item(engine, 4, SENTENCES[:1]), item(engine, 5, SENTENCES[:1])])
        assert caught.value.retry_after_s > 0
        assert batcher.queued_items == 2  # nothing of the refused request was kept
        last = batcher.submit([item(engine, 6, SENTENCES[:1])])  # one still fits
        gated.gate.set()
        results = await asyncio.gather(*running, *waiting, *last)
        assert len(results) == 4
        await batcher.stop()

    run(scenario)
    assert metrics.value("hoidistill_teacher_rejected_total", {"reason": "queue_full"}) == 1


def test_cancelled_work_frees_its_slot_and_is_never_scored(engine: ItmEngine) -> None:
    gated = GatedEngine(engine)
    metrics = ServiceMetrics()

    async def scenario() -> None:
        batcher = DynamicBatcher([gated], max_queue=1, max_delay_ms=0, metrics=metrics)
        await batcher.start()
        running = batcher.submit([item(engine, 1, SENTENCES[:1])])
        await gated.wait_entered()
        (abandoned,) = batcher.submit([item(engine, 2, SENTENCES[1:4])])
        assert batcher.queued_items == 1
        abandoned.cancel()
        await asyncio.sleep(0)  # the done-callback runs
        assert batcher.queued_items == 0
        later = batcher.submit([item(engine, 3, SENTENCES[4:5])])  # the slot is free again
        gated.gate.set()
        await asyncio.gather(*running, *later)
        await batcher.stop()

    run(scenario)
    assert engine.stats.pairs_scored == 2  # the running one and the later one; not the abandoned 3
    assert metrics.value("hoidistill_teacher_dropped_total", {"reason": "cancelled"}) == 1


def test_work_past_its_deadline_is_dropped_before_the_engine(engine: ItmEngine) -> None:
    gated = GatedEngine(engine)
    metrics = ServiceMetrics()

    async def scenario() -> None:
        batcher = DynamicBatcher([gated], max_delay_ms=0, metrics=metrics)
        await batcher.start()
        running = batcher.submit([item(engine, 1, SENTENCES[:1])])
        await gated.wait_entered()
        loop = asyncio.get_running_loop()
        (late,) = batcher.submit([item(engine, 2, SENTENCES[1:4])], deadline=loop.time() + 0.05)
        await asyncio.sleep(0.1)  # the engine is still busy when the deadline passes
        gated.gate.set()
        await asyncio.gather(*running)
        with pytest.raises(TimeoutError, match="deadline passed while queued"):
            await late
        await batcher.stop()

    run(scenario)
    assert engine.stats.pairs_scored == 1 and engine.stats.images_encoded == 1
    assert metrics.value("hoidistill_teacher_dropped_total", {"reason": "deadline"}) == 1


def test_stop_drains_queued_work_then_refuses_new_work(engine: ItmEngine) -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher([engine], max_batch_sentences=2, max_delay_ms=50)
        await batcher.start()
        futures = batcher.submit([item(engine, seed, SENTENCES[:2]) for seed in range(3)])
        await batcher.stop(drain_timeout_s=60)
        assert all(future.done() and len(future.result()) == 2 for future in futures)
        with pytest.raises(ShuttingDownError):
            batcher.submit([item(engine, 9, SENTENCES[:1])])

    run(scenario)
    assert engine.stats.images_encoded == 3


def test_stop_fails_what_cannot_finish_within_the_drain_timeout(engine: ItmEngine) -> None:
    gated = GatedEngine(engine)

    async def scenario() -> None:
        batcher = DynamicBatcher([gated], max_delay_ms=0)
        await batcher.start()
        (running,) = batcher.submit([item(engine, 1, SENTENCES[:1])])
        await gated.wait_entered()
        (queued,) = batcher.submit([item(engine, 2, SENTENCES[:1])])
        await batcher.stop(drain_timeout_s=0.05)
        for future in (running, queued):
            with pytest.raises(ShuttingDownError):
                future.result()
        gated.gate.set()  # let the engine thread finish its call

    run(scenario)


def test_an_engine_failure_fails_its_batch_only(engine: ItmEngine) -> None:
    broken = BatchItem("f" * 64, PreparedImage("f" * 64, torch.zeros(1, 3, 5, 5)), SENTENCES[:1])

    async def scenario() -> None:
        batcher = DynamicBatcher([engine], max_delay_ms=0)
        await batcher.start()
        (failed,) = batcher.submit([broken])
        # The engine's own error reaches the caller: torch's, for an image smaller than a patch.
        with pytest.raises(RuntimeError, match=r"Kernel size can't be greater than actual input size"):
            await failed
        (fine,) = batcher.submit([item(engine, 1, SENTENCES[:2])])
        assert len(await fine) == 2  # the worker lives on
        await batcher.stop()

    run(scenario)


def test_retry_hint_follows_measured_engine_speed(engine: ItmEngine) -> None:
    gated = GatedEngine(engine)
    gated.gate.set()  # open while the batcher learns the engine's speed

    async def scenario() -> tuple[float, float, float, float]:
        batcher = DynamicBatcher([gated], max_delay_ms=0)
        await batcher.start()
        before = batcher.retry_hint()  # nothing timed yet: the default
        await asyncio.gather(*batcher.submit([item(engine, 1, SENTENCES)]))
        empty = batcher.retry_hint()  # measured, but nothing queued: the shortest hint
        # Hold the engine on one item so that what follows stays queued, then queue 6-sentence
        # items until the estimate (queued sentences x measured seconds per sentence) clears the
        # 10 ms floor; as many sentences again, one per item, must double it.
        gated.gate.clear()
        gated.entered.clear()
        running = batcher.submit([item(engine, 2, SENTENCES[:1])])
        await gated.wait_entered()
        futures: list[asyncio.Future] = []
        while batcher.retry_hint() <= 0.01:
            assert len(futures) < 100, "the hint does not grow with the queue"
            futures += batcher.submit([item(engine, 100 + len(futures), SENTENCES)])
        first = batcher.retry_hint()
        for seed in range(len(futures) * len(SENTENCES)):
            futures += batcher.submit([item(engine, 1000 + seed, SENTENCES[:1])])
        second = batcher.retry_hint()
        batcher.max_queue = batcher.queued_items
        with pytest.raises(OverloadedError) as caught:  # a refusal carries the same estimate
            batcher.submit([item(engine, 9999, SENTENCES)])
        assert caught.value.retry_after_s == second
        gated.gate.set()
        await asyncio.gather(*running, *futures)
        await batcher.stop()
        return before, empty, first, second

    before, empty, first, second = run(scenario)
    assert before == 0.5
    assert empty == 0.01
    assert 0.01 < first < second < 60.0
    assert second == pytest.approx(2 * first, rel=1e-9)  # proportional to the queued sentences
