"""The scoring service every transport calls: validate, read the cache, batch the misses, write back.

``ScoringService.score`` is the one entry point of the gRPC native API, KServe v2 and HTTP. Per
request it

1. validates every item before any work (counts, digest format, bytes matching their digest,
   sentences through the engine's tokenizer), naming the field (``items[2].sentences[0]``), in
   the validation threads;
2. looks every (image, sentence) up in the score cache in one pipelined round trip; a request
   answered wholly from the cache ends here;
3. asks the batcher to admit the misses (bounded by work items, pairs and image bytes; past that
   ``OverloadedError``: RESOURCE_EXHAUSTED / 429 with a retry hint) before decoding anything;
4. decodes the images of items that still miss something, in the decoding threads;
5. sends only the misses to the dynamic batcher (pairs already in flight for another request are
   awaited, not scored again) and awaits them, within the request's deadline;
6. writes the new scores to the cache and answers, marking per sentence what came from the cache.

Validation and decoding run in separate thread pools, so that slow decodes (large or hostile
images) can never delay a cached answer: a cache-only request needs only a validation thread and
one cache round trip. Decoding work is bounded by admission (step 3), not by a growing pool queue.

Scores are returned exactly as the cache stores them (float32), so a cached answer is bit-equal
to the fresh one; the engine computes in float32, so nothing is lost (fp32 engines: exact).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from teacher_server.batcher import BatchItem, DynamicBatcher, ShuttingDownError
from teacher_server.cache import (
    AsyncScoreCache,
    CachedScore,
    decode_score,
    encode_score,
    open_async_score_cache,
    round_trip,
)
from teacher_server.engine import EngineSettings, ItmEngine, ItmScore, PreparedImage
from teacher_server.errors import ImageRequiredError, InvalidInputError, ModelLoadError
from teacher_server.hoi.digest import image_digest, is_digest
from teacher_server.hoi.region import Region, view_id
from teacher_server.metrics import ServiceMetrics
from teacher_server.settings import ServerSettings

__all__ = ["ItemResult", "ScoreItem", "ScoringService", "ShuttingDownError"]

log = logging.getLogger(__name__)

LIMIT_FIELDS = (
    "max_image_bytes",
    "max_image_pixels",
    "max_images_per_request",
    "max_sentences_per_image",
    "max_sentence_tokens",
    "max_message_bytes",
    "max_image_side",
    "max_image_aspect",
)


@dataclass(frozen=True)
class ScoreItem:
    """One image of a request: its SHA-256 hex digest, optionally its file bytes, and sentences;
    with ``region``, the sentences are scored on that human-object pair of the image."""

    digest: str
    image: bytes | None
    sentences: tuple[str, ...]
    region: Region | None = None

    @property
    def view(self) -> str:
        return view_id(self.digest, self.region)


@dataclass(frozen=True)
class ItemResult:
    """Scores of one item, aligned with its sentences.

    ``image_required``: the item came without bytes and the teacher neither had all its scores
    cached nor holds the image; the lists are then empty and the client resends with bytes.
    """

    image_required: bool
    match_logit: list[float]
    match_prob: list[float]
    cached: list[bool]


_IMAGE_REQUIRED = ItemResult(image_required=True, match_logit=[], match_prob=[], cached=[])


def engine_settings(settings: ServerSettings, device: str) -> EngineSettings:
    """The engine part of the service settings, for one replica's device."""
    return EngineSettings(
        device=device,
        dtype=settings.dtype,
        itm_start_token=settings.itm_start_token,
        revision=settings.model_revision,
        vision_cache_mb=settings.vision_cache_mb,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_image_side=settings.max_image_side,
        max_image_aspect=settings.max_image_aspect,
        max_sentence_tokens=settings.max_sentence_tokens,
        text_batch_size=settings.text_batch_size,
        region_policy=settings.region_policy,
        region_margin=settings.region_margin,
        region_dim=settings.region_dim,
    )


class ScoringService:
    """Cache + dynamic batcher + engine replicas + metrics, behind one asyncio ``score`` call.

    Construct with ``from_settings`` (loads one engine per device) or directly with engines
    (tests, benches). ``start``/``stop`` must run in the event loop that calls ``score``.
    """

    def __init__(
        self,
        engines: Sequence[ItmEngine],
        settings: ServerSettings | None = None,
        *,
        cache: AsyncScoreCache | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        if not engines:
            raise ValueError("ScoringService needs at least one engine")
        fingerprints = {engine.fingerprint for engine in engines}
        if len(fingerprints) != 1:
            raise ModelLoadError(
                f"engine replicas disagree on the model fingerprint ({', '.join(sorted(fingerprints))}): "
                "every device must run the same model, dtype and ITM start token"
            )
        self.engines = tuple(engines)
        self.settings = settings or ServerSettings()
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        s = self.settings
        self.cache = (
            cache
            if cache is not None
            else open_async_score_cache(
                s.redis_url,
                ttl_s=s.cache_ttl_s,
                local_entries=s.local_cache_entries,
                timeout_s=s.redis_timeout_s,
                backoff_s=s.redis_backoff_s,
                backoff_max_s=s.redis_backoff_max_s,
                cluster=s.redis_cluster,
                on_error=lambda _: self.metrics.redis_errors.inc(),
                refresh_ttl_on_read=s.cache_refresh_ttl_on_read,
            )
        )
        self.batcher = DynamicBatcher(
            self.engines,
            max_batch_pairs=s.max_batch_pairs,
            max_batch_images=s.max_batch_images,
            max_delay_ms=s.max_delay_ms,
            max_queue=s.max_queue,
            max_queue_pairs=s.max_queue_pairs,
            max_queue_bytes=s.max_queue_bytes,
            max_queue_wait_s=s.max_queue_wait_s,
            metrics=self.metrics,
        )
        self._validator: ThreadPoolExecutor | None = None
        self._decoder: ThreadPoolExecutor | None = None
        self._accepting = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ScoringService:
        """Load one engine replica per ``settings.device`` entry (raises ``ModelLoadError``)."""
        engines = [
            ItmEngine.from_pretrained(settings.model, engine_settings(settings, device)) for device in settings.device
        ]
        return cls(engines, settings)

    # ------------------------------------------------------------------------------- lifecycle
    @property
    def fingerprint(self) -> str:
        return self.engines[0].fingerprint

    @property
    def ready(self) -> bool:
        """True between ``start`` and the beginning of ``stop``."""
        return self._accepting

    async def start(self) -> None:
        """Start the batcher workers, the validation and the image-decoding threads; the service is then ready."""
        if self._accepting:
            return
        threads = min(4, os.cpu_count() or 1)
        # Two pools: a request's validation (hashing, tokenizing) never queues behind decodes.
        self._validator = ThreadPoolExecutor(max(2, threads), thread_name_prefix="teacher-validate")
        self._decoder = ThreadPoolExecutor(threads, thread_name_prefix="teacher-decode")
        await self.batcher.start()
        self._accepting = True
        self.metrics.ready.set(1)
        log.info(
            "scoring service ready: model %s, fingerprint %s, %d replica(s) on %s, cache %s",
            self.engines[0].model_id,
            self.fingerprint,
            len(self.engines),
            ",".join(str(e.device) for e in self.engines),
            self.cache.backend,
            extra={
                "model": self.engines[0].model_id,
                "fingerprint": self.fingerprint,
                "devices": [str(e.device) for e in self.engines],
                "cache": self.cache.backend,
            },
        )

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Readiness off, new requests refused; in-flight requests finish for up to
        ``drain_timeout_s``; then what is left fails with ``ShuttingDownError``."""
        self._accepting = False
        self.metrics.ready.set(0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=drain_timeout_s)
        except TimeoutError:
            log.warning("%d request(s) still running after the drain timeout", self._inflight)
        await self.batcher.stop(max(0.0, deadline - loop.time()))
        await self.cache.close()
        for pool in (self._validator, self._decoder):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._validator = self._decoder = None

    def model_info(self) -> dict[str, Any]:
        """What clients may ask: model id, fingerprint, ITM start token, dtype, devices, limits."""
        engine = self.engines[0].describe()
        return {
            "model_id": engine["model_id"],
            "fingerprint": self.fingerprint,
            "weights": engine["weights"],
            "itm_start_token": engine["itm_start_token"],
            "region_policy": engine["region_policy"],
            "dtype": engine["dtype"],
            "devices": [str(e.device) for e in self.engines],
            "limits": {name: getattr(self.settings, name) for name in LIMIT_FIELDS},
            "batching": {
                "max_batch_pairs": self.settings.max_batch_pairs,
                "max_batch_sentences": self.settings.max_batch_pairs,  # the former name, for old readers
                "max_batch_images": self.settings.max_batch_images,
                "max_delay_ms": self.settings.max_delay_ms,
                "max_queue": self.settings.max_queue,
                "max_queue_pairs": self.settings.max_queue_pairs,
                "max_queue_bytes": self.settings.max_queue_bytes,
                "max_queue_wait_s": self.settings.max_queue_wait_s,
            },
            "cache": self.cache.backend,
        }

    # --------------------------------------------------------------------------------- scoring
    async def score(self, items: Sequence[ScoreItem], *, timeout_s: float | None = None) -> list[ItemResult]:
        """Scores of every item's sentences; see the module docstring for the steps.

        Raises ``InvalidInputError`` (nothing was scored), ``OverloadedError`` (queue full, or
        ``DeviceOutOfMemoryError`` for pairs the device cannot run even alone; ``retry_after_s``
        set), ``ShuttingDownError`` (draining), ``TimeoutError`` past ``timeout_s`` (queued work of
        this request is then dropped, not scored, unless another request awaits it too).
        """
        if not self._accepting:
            self.metrics.rejected.labels(reason="shutting_down").inc()
            raise ShuttingDownError()
        self._inflight += 1
        self._idle.clear()
        self.metrics.inflight.inc()
        try:
            if timeout_s is None:
                return await self._score(items, None)
            deadline = asyncio.get_running_loop().time() + timeout_s
            return await asyncio.wait_for(self._score(items, deadline), timeout=timeout_s)
        finally:
            self._inflight -= 1
            self.metrics.inflight.dec()
            if self._inflight == 0:
                self._idle.set()

    async def _score(self, items: Sequence[ScoreItem], deadline: float | None) -> list[ItemResult]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._validator, self._validate, items)
        unique = [tuple(dict.fromkeys(item.sentences)) for item in items]
        queries = [(item.view, sentences) for item, sentences in zip(items, unique, strict=True)]
        cached = await self.cache.lookup(self.fingerprint, queries)
        hits = sum(score is not None for row in cached for score in row)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(sum(len(row) for row in cached) - hits)
        found = [dict(zip(names, row, strict=True)) for names, row in zip(unique, cached, strict=True)]
        missing = [tuple(s for s, score in table.items() if score is None) for table in found]

        needy = [index for index, miss in enumerate(missing) if miss]
        if not needy:  # all from the cache: no admission, no decoding, no queue
            return [_result(item.sentences, found[i], {}) for i, item in enumerate(items)]
        # Digest-only misses whose view the replica does not hold (and whose bytes no sibling item
        # sent): answer at once rather than after a trip through the queue (the batcher re-checks,
        # for views evicted meanwhile).
        senders = {item.digest: item.image for item in items if item.image is not None}
        required = {i for i in needy if items[i].digest not in senders and not self._holds(items[i])}
        needy = [i for i in needy if i not in required]
        # Room in the queue before any decoding: refused work costs no decode time or memory.
        decoded_bytes = sum(len(senders[d]) for d in {items[i].digest for i in needy} if d in senders)
        admission = self.batcher.admit([(items[i].view, missing[i]) for i in needy], decoded_bytes, deadline=deadline)
        try:
            images = await self._prepare_images(items, needy)
            work = [BatchItem(items[i].digest, images.get(items[i].view), missing[i], items[i].region) for i in needy]
            futures = self.batcher.submit(work, deadline=deadline, admission=admission)
        finally:
            admission.release()  # what was not submitted (decoding failed, the request gave up)
        try:
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            for future in futures:  # frees queue slots; the batcher skips cancelled work
                future.cancel()
            raise

        fresh: dict[int, dict[str, CachedScore]] = {}
        failure: BaseException | None = None
        for index, outcome in zip(needy, outcomes, strict=True):
            if isinstance(outcome, ImageRequiredError):
                required.add(index)
            elif isinstance(outcome, BaseException):
                failure = failure or outcome  # the first item's error is the request's
            else:
                fresh[index] = {s: _as_cached(r) for s, r in zip(missing[index], outcome, strict=True)}
        if fresh:  # cached even when another item failed (e.g. out of device memory): not lost
            await self.cache.store(
                self.fingerprint,
                [
                    (items[i].view, {s: score for s, score in new.items() if _cacheable(score)})
                    for i, new in fresh.items()
                ],
            )
        if failure is not None:
            raise failure
        return [
            _IMAGE_REQUIRED if i in required else _result(item.sentences, found[i], fresh.get(i, {}))
            for i, item in enumerate(items)
        ]

    def _holds(self, item: ScoreItem) -> bool:
        """Whether the replica that scores the item's image holds the vision embedding of its view."""
        return self.engines[self.batcher.replica_of(item.digest)].has_image(item.digest, item.region)

    # ------------------------------------------------------------------------------ validation
    def _validate(self, items: Sequence[ScoreItem]) -> None:
        """Everything checkable without decoding an image (runs in a thread: hashing, tokenizing)."""
        s = self.settings
        if len(items) > s.max_images_per_request:
            raise InvalidInputError(
                "items",
                f"request has {len(items)} images, over the limit of {s.max_images_per_request} images per request",
                too_large=True,
            )
        engine = self.engines[0]
        for index, item in enumerate(items):
            name = f"items[{index}]"
            if not is_digest(item.digest):
                raise InvalidInputError(
                    f"{name}.digest",
                    "expected the SHA-256 of the image file as 64 lowercase hex "
                    f"characters, got {str(item.digest)[:80]!r}",
                )
            if isinstance(item.sentences, str | bytes):
                raise InvalidInputError(f"{name}.sentences", "expected a list of sentences, got one string")
            if not item.sentences:
                raise InvalidInputError(
                    f"{name}.sentences", f"no sentences; give 1 to {s.max_sentences_per_image} per image"
                )
            if len(item.sentences) > s.max_sentences_per_image:
                raise InvalidInputError(
                    f"{name}.sentences",
                    f"{len(item.sentences)} sentences, over the limit of "
                    f"{s.max_sentences_per_image} sentences per image",
                    too_large=True,
                )
            engine.check_sentences(item.sentences, field=f"{name}.sentences")
            if item.image is not None:
                if not isinstance(item.image, bytes | bytearray | memoryview):
                    raise InvalidInputError(
                        f"{name}.image", f"expected image file bytes, got {type(item.image).__name__}"
                    )
                if len(item.image) > s.max_image_bytes:  # before hashing it
                    raise InvalidInputError(
                        f"{name}.image",
                        f"image is {len(item.image):,} bytes, over the limit of {s.max_image_bytes:,} bytes",
                        too_large=True,
                    )
                actual = image_digest(item.image)
                if actual != item.digest:
                    raise InvalidInputError(
                        f"{name}.digest",
                        f"does not match the image bytes sent: their SHA-256 is {actual}; "
                        "the digest must be the SHA-256 hex of the image file",
                    )

    async def _prepare_images(self, items: Sequence[ScoreItem], needy: list[int]) -> dict[str, PreparedImage]:
        """Prepared views by view id: each image whose items still miss scores is decoded once (in
        a thread) and rendered for every needy view of it in the request; a digest-only item gets
        the bytes a sibling item of the same image sent."""
        loop = asyncio.get_running_loop()
        sender: dict[str, int] = {}  # digest -> the first item that sent its bytes
        for index, item in enumerate(items):
            if item.image is not None:
                sender.setdefault(item.digest, index)
        views: dict[str, dict[str, int]] = {}  # digest -> view -> the first needy item of that view
        for index in needy:
            item = items[index]
            if item.digest in sender:
                views.setdefault(item.digest, {}).setdefault(item.view, index)
        engine = self.engines[0]

        def prepare(digest: str, wanted: dict[str, int]) -> list[PreparedImage]:
            i = sender[digest]
            return engine.prepare_views(
                bytes(items[i].image or b""),
                [items[j].region for j in wanted.values()],
                digest=digest,
                field=f"items[{i}].image",
                region_fields=[f"items[{j}].region" for j in wanted.values()],
            )

        jobs = [loop.run_in_executor(self._decoder, prepare, d, wanted) for d, wanted in views.items()]
        prepared = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in prepared:  # in item order: the first bad item is reported
            if isinstance(outcome, BaseException):
                raise outcome
        return {view.view: view for group in prepared for view in group}  # type: ignore[union-attr]


def _as_cached(score: ItmScore) -> CachedScore:
    """The score as the cache will return it (float32); a non-finite one as is (never cached)."""
    try:
        return round_trip(score.match_logit, score.match_prob)
    except (ValueError, OverflowError):
        log.warning(
            "engine returned a non-cacheable score (%s, %s); not caching it", score.match_logit, score.match_prob
        )
        return CachedScore(score.match_logit, score.match_prob)


def _cacheable(score: CachedScore) -> bool:
    try:
        return decode_score(encode_score(score.match_logit, score.match_prob)) is not None
    except OverflowError:  # beyond float32
        return False


def _result(
    sentences: Sequence[str], found: dict[str, CachedScore | None], fresh: dict[str, CachedScore]
) -> ItemResult:
    """Align scores with the item's sentences (duplicates included)."""
    logits, probs, cached = [], [], []
    for sentence in sentences:
        hit = found.get(sentence)
        score = hit if hit is not None else fresh[sentence]
        logits.append(score.match_logit)
        probs.append(score.match_prob)
        cached.append(hit is not None)
    return ItemResult(image_required=False, match_logit=logits, match_prob=probs, cached=cached)
