"""Dynamic batching: concurrent requests' work merged into few engine calls, one worker per replica.

Requests ``submit`` work items (one image + its uncached sentences) and await one future per
item. Each engine replica has a queue and an asyncio worker; the worker waits until its queue
holds ``max_batch_sentences`` sentences or its oldest item has waited ``max_delay_ms``, then runs
one ``engine.score`` call in the replica's own one-thread executor (the event loop never blocks
on torch). Items about the same image in one call share one vision-encoder pass; an image digest
always goes to the same replica (by hash), so across calls the replica's vision LRU serves it.

Admission is bounded: ``max_queue`` work items may wait in total; a request whose items do not
all fit is refused whole with ``OverloadedError`` and a retry hint. Queued items whose request
gave up (future cancelled) or whose deadline passed are dropped before reaching an engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from teacher_server.engine import ImageSentences, ItmScore, PreparedImage
from teacher_server.errors import ImageRequiredError, OverloadedError
from teacher_server.hoi.region import Region, view_id
from teacher_server.metrics import ServiceMetrics

if TYPE_CHECKING:
    from teacher_server.engine import ItmEngine

log = logging.getLogger(__name__)

_DEFAULT_RETRY_S = 0.5  # retry hint before any engine call has been timed
_RETRY_RANGE_S = (0.01, 60.0)


class ShuttingDownError(OverloadedError):
    """The service is draining for shutdown; retry on another replica (gRPC ``UNAVAILABLE``)."""

    def __init__(self) -> None:
        super().__init__(
            "the teacher is shutting down and accepts no new work; retry another replica", retry_after_s=1.0
        )


@dataclass(frozen=True)
class BatchItem:
    """Work for the engine: sentences to score against one image view (``image=None``: by digest
    only); ``region`` names the human-object pair, None the whole image."""

    digest: str
    image: PreparedImage | None
    sentences: tuple[str, ...]
    region: Region | None = None

    @property
    def view(self) -> str:
        return view_id(self.digest, self.region)


@dataclass(eq=False)
class _Queued:
    item: BatchItem
    future: asyncio.Future[list[ItmScore]]
    deadline: float | None  # loop.time() after which the work is worthless
    enqueued_at: float
    replica: _Replica
    waiting: bool = True  # still counted in the queue


@dataclass(eq=False)
class _Replica:
    index: int
    engine: ItmEngine
    executor: ThreadPoolExecutor
    queue: deque[_Queued] = field(default_factory=deque)
    sentences: int = 0  # sentences of the live (still waiting) items
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


@dataclass(frozen=True)
class _CallResult:
    scores: dict[str, dict[str, ItmScore]]  # view id -> sentence -> score
    image_required: frozenset[str]
    images_encoded: int
    sentences_scored: int
    seconds: float


class DynamicBatcher:
    """Merges concurrent work into engine calls across ``engines`` (one replica per device)."""

    def __init__(
        self,
        engines: Sequence[ItmEngine],
        *,
        max_batch_sentences: int = 256,
        max_delay_ms: float = 5.0,
        max_queue: int = 1024,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        if not engines:
            raise ValueError("DynamicBatcher needs at least one engine")
        self.engines = tuple(engines)
        self.max_batch_sentences = max_batch_sentences
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self._replicas: list[_Replica] = []
        self._queued_items = 0
        self._accepting = False
        self._closing = False
        self._seconds_per_sentence: float | None = None  # moving average, for retry hints

    # ------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start one worker (and one engine thread) per replica; must run inside the event loop."""
        if self._replicas:
            return
        self._closing = False
        for index, engine in enumerate(self.engines):
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"teacher-engine-{index}")
            replica = _Replica(index, engine, executor)
            replica.task = asyncio.create_task(self._work(replica), name=f"teacher-batcher-{index}")
            self._replicas.append(replica)
        self._accepting = True

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let queued and running work finish for up to ``drain_timeout_s``, then
        fail what is left with ``ShuttingDownError`` and release the engine threads."""
        self._accepting = False
        self._closing = True
        for replica in self._replicas:
            replica.wakeup.set()
        tasks = [replica.task for replica in self._replicas if replica.task is not None]
        if tasks:
            _, unfinished = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for task in unfinished:
                task.cancel()
            if unfinished:
                log.warning("drain timeout (%.3g s): failing work still queued", drain_timeout_s)
                await asyncio.gather(*unfinished, return_exceptions=True)
        for replica in self._replicas:
            while replica.queue:
                queued = replica.queue.popleft()
                self._release(queued)
                if not queued.future.done():
                    queued.future.set_exception(ShuttingDownError())
            replica.executor.shutdown(wait=False, cancel_futures=True)
        self._replicas.clear()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queued_items(self) -> int:
        """Work items waiting for an engine (not counting those being scored now)."""
        return self._queued_items

    def replica_of(self, digest: str) -> int:
        """The replica that scores ``digest``: fixed per digest, so its vision LRU keeps serving it."""
        return int(digest[:8], 16) % len(self.engines)

    # ------------------------------------------------------------------------------ submission
    def submit(self, items: Sequence[BatchItem], *, deadline: float | None = None) -> list[asyncio.Future]:
        """Enqueue all ``items`` or none; one future per item resolving to its scores, in order.

        ``deadline`` is a ``loop.time()`` instant; work still queued after it is dropped and its
        future raises ``TimeoutError``. A future raises ``ImageRequiredError`` when its item has no
        image and the replica does not hold the digest. Raises ``OverloadedError`` (with
        ``retry_after_s``) when the queue cannot take every item, ``ShuttingDownError`` when stopping.
        """
        if not items:  # everything came from the cache: nothing to admit
            return []
        if not self._accepting:
            self.metrics.rejected.labels(reason="shutting_down").inc()
            raise ShuttingDownError()
        # A request larger than the whole queue still runs when the queue is empty (else never).
        if self._queued_items and self._queued_items + len(items) > self.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            retry = self.retry_hint()
            raise OverloadedError(
                f"teacher queue is full: {self._queued_items} of max_queue={self.max_queue} work items "
                f"waiting, this request adds {len(items)}; retry after {retry:.2f} s",
                retry_after_s=retry,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for item in items:
            replica = self._replicas[self.replica_of(item.digest)]
            queued = _Queued(item, loop.create_future(), deadline, now, replica)
            # A request that gives up (cancel) frees its queue slots at once, not when popped.
            queued.future.add_done_callback(lambda _, q=queued: self._release(q))
            replica.queue.append(queued)
            replica.sentences += len(item.sentences)
            self._queued_items += 1
            replica.wakeup.set()
            futures.append(queued.future)
        self.metrics.queue_items.set(self._queued_items)
        return futures

    def retry_hint(self) -> float:
        """Seconds until the queued work is likely done, from the measured engine speed."""
        if self._seconds_per_sentence is None:
            return _DEFAULT_RETRY_S
        sentences = sum(replica.sentences for replica in self._replicas)
        estimate = sentences * self._seconds_per_sentence / max(1, len(self._replicas))
        return min(max(estimate, _RETRY_RANGE_S[0]), _RETRY_RANGE_S[1])

    def _release(self, queued: _Queued) -> None:
        """Stop counting ``queued`` in the queue (idempotent)."""
        if queued.waiting:
            queued.waiting = False
            queued.replica.sentences -= len(queued.item.sentences)
            self._queued_items -= 1
            self.metrics.queue_items.set(self._queued_items)

    # ---------------------------------------------------------------------------------- worker
    async def _work(self, replica: _Replica) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._live(replica):
                if self._closing:
                    return
                replica.wakeup.clear()
                await replica.wakeup.wait()
                continue
            # Fill: more sentences may arrive until the batch is full or the oldest has waited enough.
            oldest = next(q for q in replica.queue if q.waiting).enqueued_at
            while replica.sentences < self.max_batch_sentences and not self._closing:
                remaining = oldest + self.max_delay_s - loop.time()
                if remaining <= 0:
                    break
                replica.wakeup.clear()
                try:
                    await asyncio.wait_for(replica.wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(replica, loop.time())
            if batch:
                await self._run(replica, batch, loop)

    def _live(self, replica: _Replica) -> bool:
        while replica.queue and not replica.queue[0].waiting:
            self._discard_cancelled(replica)
        return bool(replica.queue)

    def _discard_cancelled(self, replica: _Replica) -> None:
        """Pop the head item, whose request gave up while it waited (already released)."""
        replica.queue.popleft()
        self.metrics.dropped.labels(reason="cancelled").inc()

    def _take(self, replica: _Replica, now: float) -> list[_Queued]:
        """Pop the next batch: live items in arrival order up to ``max_batch_sentences`` sentences
        (an item larger than that runs alone). Expired items are failed and skipped."""
        batch: list[_Queued] = []
        sentences = 0
        while replica.queue:
            queued = replica.queue[0]
            if not queued.waiting:
                self._discard_cancelled(replica)
                continue
            if queued.deadline is not None and now >= queued.deadline:
                replica.queue.popleft()
                self._release(queued)
                queued.future.set_exception(TimeoutError("deadline passed while queued; not scored"))
                self.metrics.dropped.labels(reason="deadline").inc()
                continue
            size = len(queued.item.sentences)
            if batch and sentences + size > self.max_batch_sentences:
                break
            replica.queue.popleft()
            self._release(queued)
            batch.append(queued)
            sentences += size
        return batch

    async def _run(self, replica: _Replica, batch: list[_Queued], loop: asyncio.AbstractEventLoop) -> None:
        start = loop.time()
        for queued in batch:
            self.metrics.queue_seconds.observe(start - queued.enqueued_at)
        # One engine request per view: the union of its sentences (the engine deduplicates too).
        images: dict[str, PreparedImage | None] = {}
        sentences: dict[str, dict[str, None]] = {}
        first: dict[str, BatchItem] = {}
        for queued in batch:
            item = queued.item
            first.setdefault(item.view, item)
            if images.get(item.view) is None:
                images[item.view] = item.image
            sentences.setdefault(item.view, {}).update(dict.fromkeys(item.sentences))
        requests = [ImageSentences(first[v].digest, images[v], tuple(sentences[v]), first[v].region) for v in images]
        self.metrics.batch_sentences.observe(sum(len(r.sentences) for r in requests))
        try:
            result = await loop.run_in_executor(replica.executor, _score_call, replica.engine, requests)
        except asyncio.CancelledError:  # stop() gave up draining: nobody will deliver these results
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(ShuttingDownError())
            raise
        except Exception as error:  # an engine failure fails this batch only; the worker lives on
            log.exception("engine replica %d failed a batch of %d items", replica.index, len(batch))
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(error)
            return
        self._learn_speed(result)
        self.metrics.images_encoded.inc(result.images_encoded)
        self.metrics.sentences_scored.inc(result.sentences_scored)
        for queued in batch:
            if queued.future.done():  # its request gave up while the engine ran
                continue
            if queued.item.view in result.image_required:
                queued.future.set_exception(ImageRequiredError(queued.item.view))
            else:
                table = result.scores[queued.item.view]
                queued.future.set_result([table[s] for s in queued.item.sentences])

    def _learn_speed(self, result: _CallResult) -> None:
        if result.sentences_scored == 0:
            return
        sample = result.seconds / result.sentences_scored
        previous = self._seconds_per_sentence
        self._seconds_per_sentence = sample if previous is None else 0.8 * previous + 0.2 * sample


def _score_call(engine: ItmEngine, requests: list[ImageSentences]) -> _CallResult:
    """Runs in the replica's thread: one ``engine.score`` call, digest-only items it cannot serve
    set aside (answered "image required") instead of failing the whole batch."""
    started = time.perf_counter()
    required = {r.view for r in requests if r.image is None and not engine.has_image(r.digest, r.region)}
    todo = [r for r in requests if r.view not in required]
    encoded_before, scored_before = engine.stats.images_encoded, engine.stats.sentences_scored
    results: list[list[ItmScore]] = []
    while todo:
        try:
            results = engine.score(todo)
            break
        except ImageRequiredError as error:  # evicted between has_image and score: set it aside
            required.add(error.digest)
            todo = [r for r in todo if r.view != error.digest]
    return _CallResult(
        scores={r.view: dict(zip(r.sentences, row, strict=True)) for r, row in zip(todo, results, strict=True)},
        image_required=frozenset(required),
        images_encoded=engine.stats.images_encoded - encoded_before,
        sentences_scored=engine.stats.sentences_scored - scored_before,
        seconds=time.perf_counter() - started,
    )
