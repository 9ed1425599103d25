"""ScoringService end to end in process: real tiny BLIP, real Redis, real batcher and cache."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import torch
from testkit.servers import RedisServer
from testkit.teacher import SENTENCES, GatedEngine, image_bytes, with_bytes

from teacher_server.cache import score_key
from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine, ItmScore
from teacher_server.errors import InvalidInputError, ModelLoadError, OverloadedError
from teacher_server.hoi.digest import image_digest
from teacher_server.metrics import ServiceMetrics
from teacher_server.service import ItemResult, ScoreItem, ScoringService, ShuttingDownError, engine_settings
from teacher_server.settings import ServerSettings

torch.set_num_threads(1)
T = TypeVar("T")


def by_digest(seed: int, sentences: Sequence[str]) -> ScoreItem:
    return ScoreItem(image_digest(image_bytes(seed)), None, tuple(sentences))


def settings_for(model_dir: Path, **overrides: Any) -> ServerSettings:
    return ServerSettings(model=str(model_dir), device=("cpu",), max_delay_ms=1.0, **overrides)


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(scenario())


async def started(service: ScoringService) -> ScoringService:
    await service.start()
    return service


def assert_engine_scores(reference: ItmEngine, item: ScoreItem, result: ItemResult) -> None:
    assert item.image is not None
    prepared = reference.prepare_image(item.image)
    (expected,) = reference.score([ImageSentences(item.digest, prepared, item.sentences)])
    assert not result.image_required
    assert len(result.match_logit) == len(result.match_prob) == len(result.cached) == len(item.sentences)
    for logit, prob, want in zip(result.match_logit, result.match_prob, expected, strict=True):
        assert logit == pytest.approx(want.match_logit, abs=1e-6)
        assert prob == pytest.approx(want.match_prob, abs=1e-6)


# ------------------------------------------------------------------------------ scores and cache
@pytest.mark.parametrize("backend", ["local", "redis"])
def test_scores_equal_the_engine_and_a_repeat_comes_all_from_the_cache(
    backend: str, tiny_blip_dir: Path, reference: ItmEngine, redis_server: RedisServer
) -> None:
    redis_url = redis_server.url if backend == "redis" else None
    if redis_url:
        redis.Redis.from_url(redis_url).flushdb()
    items = [with_bytes(1, SENTENCES[:4] + SENTENCES[:1]), with_bytes(2, SENTENCES[3:])]

    async def scenario() -> tuple[list[ItemResult], list[ItemResult], ScoringService]:
        service = await started(ScoringService.from_settings(settings_for(tiny_blip_dir, redis_url=redis_url)))
        first = await service.score(items)
        second = await service.score(items)
        await service.stop()
        return first, second, service

    first, second, service = run(scenario)
    assert service.cache.backend == backend
    for item, result in zip(items, first, strict=True):
        assert_engine_scores(reference, item, result)
        assert not any(result.cached)
    assert first[0].match_logit[0] == first[0].match_logit[4]  # a repeated sentence, same score
    for fresh, again in zip(first, second, strict=True):
        assert all(again.cached)
        assert again.match_logit == fresh.match_logit and again.match_prob == fresh.match_prob
    (engine,) = service.engines
    assert engine.stats.pairs_scored == 4 + 3  # distinct per item, and nothing for the repeat
    assert service.metrics.value("hoidistill_teacher_cache_hits_total") == 7
    assert service.metrics.value("hoidistill_teacher_cache_misses_total") == 7


def test_only_sentences_missing_from_the_cache_are_scored(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    async def scenario() -> ItemResult:
        service = await started(ScoringService([engine], settings_for(tiny_blip_dir)))
        await service.score([with_bytes(1, SENTENCES[:2])])
        (result,) = await service.score([by_digest(1, SENTENCES[:3])])
        await service.stop()
        return result

    result = run(scenario)
    assert result.cached == [True, True, False]
    assert engine.stats.pairs_scored == 3 and engine.stats.images_encoded == 1


def test_a_different_fingerprint_never_sees_the_first_models_scores(
    tiny_blip_dir: Path, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    item = with_bytes(3, SENTENCES[:3])

    async def scenario() -> tuple[ItemResult, ItemResult, str, str]:
        cls_service = await started(
            ScoringService.from_settings(settings_for(tiny_blip_dir, redis_url=redis_server.url))
        )
        enc_service = await started(
            ScoringService.from_settings(settings_for(tiny_blip_dir, redis_url=redis_server.url, itm_start_token="enc"))
        )
        (first,) = await cls_service.score([item])
        (other,) = await enc_service.score([item])
        for service in (cls_service, enc_service):
            await service.stop()
        return first, other, cls_service.fingerprint, enc_service.fingerprint

    first, other, cls_fp, enc_fp = run(scenario)
    assert cls_fp != enc_fp
    assert not any(first.cached) and not any(other.cached)  # same image and sentences, other model
    assert other.match_logit != first.match_logit
    assert client.exists(score_key(cls_fp, item.digest)) and client.exists(score_key(enc_fp, item.digest))


def test_a_corrupted_cache_value_is_a_miss_and_gets_rewritten(tiny_blip_dir: Path, redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    item = with_bytes(4, SENTENCES[:3])

    async def scenario() -> tuple[ItemResult, ItemResult, ItemResult, str]:
        service = await started(ScoringService.from_settings(settings_for(tiny_blip_dir, redis_url=redis_server.url)))
        (first,) = await service.score([item])
        key = score_key(service.fingerprint, item.digest)
        client.hset(key, SENTENCES[1], b"\x00garbage")
        (repaired,) = await service.score([item])
        (again,) = await service.score([item])
        await service.stop()
        return first, repaired, again, key

    first, repaired, again, key = run(scenario)
    assert repaired.cached == [True, False, True]
    # The cached sentences come back bit for bit; the rescored one ran in a batch of one instead of
    # three, and CPU matmul kernels block by batch size, so it agrees to float32 rounding only.
    assert [repaired.match_logit[k] for k in (0, 2)] == [first.match_logit[k] for k in (0, 2)]
    assert repaired.match_logit[1] == pytest.approx(first.match_logit[1], rel=1e-5, abs=1e-6)
    assert all(again.cached)
    assert len(client.hget(key, SENTENCES[1])) == 8


def test_eight_concurrent_requests_about_a_new_image_encode_it_once(tiny_blip_dir: Path) -> None:
    async def scenario() -> tuple[list[list[ItemResult]], ScoringService]:
        service = await started(ScoringService.from_settings(settings_for(tiny_blip_dir)))
        requests = [[with_bytes(5, SENTENCES[i % 3 : i % 3 + 3])] for i in range(8)]
        results = await asyncio.gather(*(service.score(request) for request in requests))
        await service.stop()
        return results, service

    results, service = run(scenario)
    assert all(not result[0].image_required and len(result[0].match_logit) == 3 for result in results)
    assert service.metrics.value("hoidistill_teacher_images_encoded_total") == 1
    assert service.engines[0].stats.images_encoded == 1


# -------------------------------------------------------------------------------- Redis outage
def test_redis_outage_answers_uncached_logs_once_and_uses_redis_again_after_restart(
    tiny_blip_dir: Path, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(
        tiny_blip_dir, redis_url=private_redis.url, redis_backoff_s=0.02, redis_backoff_max_s=0.05, redis_timeout_s=0.5
    )

    async def scenario() -> ScoringService:
        service = await started(ScoringService.from_settings(settings))
        (first,) = await service.score([with_bytes(6, SENTENCES[:2])])
        assert not any(first.cached)
        private_redis.stop()
        with caplog.at_level(logging.WARNING, logger="teacher_server.cache"):
            for round_ in range(4):
                (result,) = await service.score([with_bytes(6, SENTENCES[: 2 + round_])])
                assert not any(result.cached)  # answered, without the cache
            private_redis.start()
            for _ in range(500):  # the service finds Redis again by itself
                (result,) = await service.score([with_bytes(6, SENTENCES[:2])])
                if all(result.cached):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the service never used Redis again after it restarted")
        await service.stop()
        return service

    service = run(scenario)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("unreachable" in message for message in messages) == 1
    assert sum("reachable again" in message for message in messages) == 1
    assert service.metrics.value("hoidistill_teacher_redis_errors_total") >= 1


# ------------------------------------------------------------------------- admission and deadlines
def test_a_full_queue_raises_overloaded_with_a_retry_hint(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    gated = GatedEngine(engine)

    async def scenario() -> None:
        service = await started(ScoringService([gated], settings_for(tiny_blip_dir, max_queue=1)))
        running = asyncio.create_task(service.score([with_bytes(1, SENTENCES[:1])]))
        await gated.wait_entered()
        waiting = asyncio.create_task(service.score([with_bytes(2, SENTENCES[:1])]))
        while service.batcher.queued_items < 1:
            await asyncio.sleep(0.005)
        with pytest.raises(OverloadedError, match="queue is full") as caught:
            await service.score([with_bytes(3, SENTENCES[:1])])
        assert caught.value.retry_after_s > 0
        gated.gate.set()
        assert len(await running) == len(await waiting) == 1
        # Refused work left nothing behind: the service keeps serving.
        (result,) = await service.score([with_bytes(3, SENTENCES[:1])])
        assert not result.cached[0]
        await service.stop()

    run(scenario)


def test_a_request_past_its_deadline_times_out_and_its_work_is_dropped(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    gated = GatedEngine(engine)

    async def scenario() -> None:
        service = await started(ScoringService([gated], settings_for(tiny_blip_dir)))
        running = asyncio.create_task(service.score([with_bytes(1, SENTENCES[:1])]))
        await gated.wait_entered()
        with pytest.raises(TimeoutError):
            await service.score([with_bytes(2, SENTENCES[1:5])], timeout_s=0.2)
        assert service.batcher.queued_items == 0  # its queued work left with it
        gated.gate.set()
        await running
        with pytest.raises(TimeoutError):  # already expired: nothing even starts
            await service.score([with_bytes(3, SENTENCES[:2])], timeout_s=0)
        await service.stop()

    run(scenario)
    assert engine.stats.pairs_scored == 1 and engine.stats.images_encoded == 1


# ---------------------------------------------------------------------------------- validation
PNG_SIZE = len(image_bytes(0))


def _case(name: str, items: list[ScoreItem], field: str, fragment: str, **limits: int) -> Any:
    return pytest.param(items, field, fragment, limits, id=name)


@pytest.mark.parametrize(
    ("items", "field", "fragment", "limits"),
    [
        _case(
            "too many images",
            [with_bytes(i, SENTENCES[:1]) for i in range(3)],
            "items",
            "over the limit of 2 images per request",
            max_images_per_request=2,
        ),
        _case(
            "too many sentences",
            [with_bytes(1, SENTENCES[:4])],
            "items[0].sentences",
            "4 sentences, over the limit of 3 sentences per image",
            max_sentences_per_image=3,
        ),
        _case("no sentences", [with_bytes(1, [])], "items[0].sentences", "no sentences"),
        _case(
            "one string as sentences", [ScoreItem("0" * 64, None, "a person")], "items[0].sentences", "got one string"
        ),
        _case(
            "sentence over the token limit",
            [with_bytes(1, SENTENCES[:1]), with_bytes(2, ["a person", "a person " * 10])],
            "items[1].sentences[1]",
            "over the limit of 8 tokens",
            max_sentence_tokens=8,
        ),
        _case("empty sentence", [with_bytes(1, ["  "])], "items[0].sentences[0]", "empty"),
        _case("upper-case digest", [ScoreItem("A" * 64, None, SENTENCES[:1])], "items[0].digest", "64 lowercase hex"),
        _case(
            "digest of other bytes",
            [with_bytes(1, SENTENCES[:1]), ScoreItem(image_digest(image_bytes(1)), image_bytes(2), SENTENCES[:1])],
            "items[1].digest",
            "does not match the image bytes",
        ),
        _case(
            "corrupt image bytes",
            [
                with_bytes(1, SENTENCES[:1]),
                ScoreItem(image_digest(b"\x89PNG garbage"), b"\x89PNG garbage", SENTENCES[:1]),
            ],
            "items[1].image",
            "not a decodable image",
        ),
        _case(
            "image over the byte limit",
            [with_bytes(1, SENTENCES[:1])],
            "items[0].image",
            f"{PNG_SIZE:,} bytes, over the limit of 1,000 bytes",
            max_image_bytes=1000,
        ),
        _case(
            "image over the pixel limit",
            [with_bytes(1, SENTENCES[:1])],
            "items[0].image",
            "over the limit of 1,000 pixels",
            max_image_pixels=1000,
        ),
    ],
)
def test_bad_input_names_the_field_and_limit_and_nothing_is_scored(
    items: list[ScoreItem], field: str, fragment: str, limits: dict[str, int], tiny_blip_dir: Path
) -> None:
    async def scenario() -> ScoringService:
        service = await started(ScoringService.from_settings(settings_for(tiny_blip_dir, **limits)))
        with pytest.raises(InvalidInputError) as caught:
            await service.score(items)
        assert caught.value.field == field
        assert fragment in str(caught.value)
        assert service.engines[0].stats.pairs_scored == 0 and service.batcher.queued_items == 0
        small = image_bytes(9, size=(8, 8))  # within every limit above
        (result,) = await service.score([ScoreItem(image_digest(small), small, SENTENCES[:1])])  # served
        assert len(result.match_logit) == 1
        await service.stop()
        return service

    run(scenario)


# ------------------------------------------------------------------------- content addressing
def test_digest_only_items_need_the_image_once(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    async def scenario() -> None:
        service = await started(ScoringService([engine], settings_for(tiny_blip_dir)))
        (unknown,) = await service.score([by_digest(7, SENTENCES[:2])])
        assert unknown == ItemResult(image_required=True, match_logit=[], match_prob=[], cached=[])
        assert service.metrics.value("hoidistill_teacher_batch_sentences_count") == 0  # never queued
        (sent,) = await service.score([with_bytes(7, SENTENCES[:2])])
        assert not sent.image_required and sent.cached == [False, False]
        (known,) = await service.score([by_digest(7, SENTENCES[2:4])])  # new sentences, image held
        assert not known.image_required and known.cached == [False, False]
        # A digest-only item rides on the bytes a sibling item of the same request carries.
        sibling, carrier = await service.score([by_digest(8, SENTENCES[:1]), with_bytes(8, SENTENCES[1:2])])
        assert not sibling.image_required and not carrier.image_required
        await service.stop()

    run(scenario)
    assert engine.stats.images_encoded == 2


class NonFiniteEngine:
    """A real engine whose score for one sentence is replaced by NaN (a broken-model fault)."""

    BROKEN = "a person break a model"

    def __init__(self, engine: ItmEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def score(self, requests: Sequence[ImageSentences]) -> list[list[ItmScore]]:
        rows = self._engine.score(requests)
        return [
            [
                ItmScore(math.nan, math.nan) if s == self.BROKEN else score
                for s, score in zip(r.sentences, row, strict=True)
            ]
            for r, row in zip(requests, rows, strict=True)
        ]


def test_a_non_finite_score_is_returned_but_never_cached(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    item = with_bytes(11, [SENTENCES[0], NonFiniteEngine.BROKEN])

    async def scenario() -> tuple[ItemResult, ItemResult]:
        service = await started(ScoringService([NonFiniteEngine(engine)], settings_for(tiny_blip_dir)))
        first, again = (await service.score([item]))[0], (await service.score([item]))[0]
        await service.stop()
        return first, again

    first, again = run(scenario)
    assert math.isfinite(first.match_logit[0]) and math.isnan(first.match_logit[1])
    assert again.cached == [True, False]


def test_cached_scores_need_no_image_even_on_a_fresh_replica(tiny_blip_dir: Path, redis_server: RedisServer) -> None:
    redis.Redis.from_url(redis_server.url).flushdb()
    settings = settings_for(tiny_blip_dir, redis_url=redis_server.url)

    async def scenario() -> ItemResult:
        first = await started(ScoringService.from_settings(settings))
        await first.score([with_bytes(10, SENTENCES[:3])])
        await first.stop()
        second = await started(ScoringService.from_settings(settings))  # holds no image at all
        (result,) = await second.score([by_digest(10, SENTENCES[:3])])
        await second.stop()
        return result

    result = run(scenario)
    assert not result.image_required and all(result.cached)


# --------------------------------------------------------------------------- lifecycle, info
def test_model_info_names_model_fingerprint_and_limits(tiny_blip_dir: Path) -> None:
    settings = settings_for(tiny_blip_dir, max_sentences_per_image=100)
    service = ScoringService.from_settings(settings)
    info = service.model_info()
    assert info["model_id"] == str(tiny_blip_dir)
    assert info["fingerprint"] == service.engines[0].fingerprint == service.fingerprint
    assert info["itm_start_token"] == "cls" and info["dtype"] == "fp32" and info["devices"] == ["cpu"]
    assert info["limits"]["max_sentences_per_image"] == 100
    assert set(info["limits"]) == {
        "max_image_bytes",
        "max_image_pixels",
        "max_images_per_request",
        "max_sentences_per_image",
        "max_sentence_tokens",
        "max_message_bytes",
        "max_image_side",
        "max_image_aspect",
    }
    assert info["cache"] == "local"


def test_engine_settings_carry_the_service_limits() -> None:
    settings = ServerSettings(
        dtype="fp32",
        itm_start_token="enc",
        max_sentence_tokens=12,
        vision_cache_mb=3,
        max_image_pixels=99,
        text_batch_size=7,
    )
    engine = engine_settings(settings, "cuda:1")
    assert (engine.device, engine.dtype, engine.itm_start_token) == ("cuda:1", "fp32", "enc")
    assert (engine.max_sentence_tokens, engine.vision_cache_mb, engine.max_image_pixels, engine.text_batch_size) == (
        12,
        3,
        99,
        7,
    )


def test_replicas_must_share_one_fingerprint(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    other = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu", itm_start_token="enc"))
    with pytest.raises(ModelLoadError, match="disagree on the model fingerprint"):
        ScoringService([engine, other])


def test_lifecycle_readiness_and_drain(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    gated = GatedEngine(engine)

    async def scenario() -> None:
        service = ScoringService([gated], settings_for(tiny_blip_dir))
        assert not service.ready
        with pytest.raises(ShuttingDownError):
            await service.score([with_bytes(1, SENTENCES[:1])])
        await service.start()
        assert service.ready and service.metrics.value("hoidistill_teacher_ready") == 1
        running = asyncio.create_task(service.score([with_bytes(1, SENTENCES[:2])]))
        await gated.wait_entered()
        assert service.metrics.value("hoidistill_teacher_inflight") == 1
        stopping = asyncio.create_task(service.stop(drain_timeout_s=60))
        await asyncio.sleep(0.01)
        assert not service.ready and service.metrics.value("hoidistill_teacher_ready") == 0
        with pytest.raises(ShuttingDownError):  # refused while draining
            await service.score([with_bytes(2, SENTENCES[:1])])
        gated.gate.set()
        (result,) = await running  # in-flight work finished during the drain
        assert len(result.match_logit) == 2
        await stopping
        assert service.metrics.value("hoidistill_teacher_inflight") == 0

    run(scenario)


def test_two_replicas_score_like_one(tiny_blip_dir: Path, engine: ItmEngine, reference: ItmEngine) -> None:
    engines = [engine, ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu"))]
    items = [with_bytes(seed, SENTENCES[:2]) for seed in range(20, 26)]

    async def scenario() -> list[ItemResult]:
        service = await started(ScoringService(engines, settings_for(tiny_blip_dir)))
        results = await service.score(items)
        await service.stop()
        return results

    for item, result in zip(items, run(scenario), strict=True):
        assert_engine_scores(reference, item, result)
    assert all(e.stats.images_encoded > 0 for e in engines)


# -------------------------------------------------------------------------------------- metrics
def test_metrics_render_every_documented_series() -> None:
    metrics = ServiceMetrics()
    metrics.observe_request("Score", "OK")
    metrics.observe_request("Score", "INVALID_ARGUMENT")
    metrics.observe_request("/v1/score", "200")
    text, content_type = metrics.render()
    body = text.decode()
    assert content_type.startswith("text/plain")
    assert 'hoidistill_teacher_requests_total{code="OK",method="Score"} 1.0' in body
    assert 'hoidistill_teacher_errors_total{code="INVALID_ARGUMENT",method="Score"} 1.0' in body
    assert 'hoidistill_teacher_errors_total{code="OK"' not in body and 'code="200",method="/v1/score"} 1.0' in body
    for name in (
        "queue_seconds",
        "batch_sentences",
        "sentences_scored_total",
        "images_encoded_total",
        "cache_hits_total",
        "cache_misses_total",
        "redis_errors_total",
        "inflight",
        "ready",
    ):
        assert f"hoidistill_teacher_{name}" in body, name
    # A registry per service: two services in one process do not collide.
    assert ServiceMetrics().registry is not metrics.registry


def test_settings_dataclass_is_what_the_service_reads() -> None:
    # Every limit the service reports is a ServerSettings field (keeps model_info honest).
    names = set(ServerSettings.model_fields)
    from teacher_server.service import LIMIT_FIELDS

    assert set(LIMIT_FIELDS) <= names
