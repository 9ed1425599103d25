"""Dynamic batching: concurrent requests' work merged into few engine calls, one worker per replica.

Requests ``submit`` work items (one image view + its uncached sentences) and await one future per
item. Each engine replica has a queue and an asyncio worker; the worker waits until its queue
holds ``max_batch_pairs`` pairs (or ``max_batch_images`` views) or its oldest item has waited
``max_delay_ms``, then takes at most that much into one ``engine.score`` call, run in the
replica's own one-thread executor (the event loop never blocks on torch). A burst is thus served
in several capped batches, the first answered while the later ones still wait: latency grows with
the queue instead of every request waiting for one giant call. Items about the same image in one
call share one vision-encoder pass; an image digest always goes to the same replica (by hash), so
across calls the replica's vision LRU serves it.

Single flight: a (view, sentence) pair is computed at most once at a time. A request asking for a
pair that is already queued or running awaits that computation instead of queueing it again; the
queued work is dropped only when every request waiting on it gave up.

Admission is bounded three ways, counted over work admitted but not yet taken by an engine (being
decoded, or queued): ``max_queue`` work items, ``max_queue_pairs`` (image, sentence) pairs and
``max_queue_bytes`` bytes of image data (the encoded files while they are decoded, the prepared
pixel tensors once queued); and by time: once an engine call has been timed, new work is refused
when the work already waiting needs more than ``max_queue_wait_s`` of engine time, or more than
the request's deadline leaves (it would time out later, after costing a decode and memory). A
request whose new work does not fit is refused whole with
``OverloadedError`` naming the limit and a retry hint; when nothing is queued, any one request is
admitted (else an oversized one could never run). ``admit`` reserves the capacity before the
service decodes images, so a flood of cold requests cannot pile decoded images up in memory.
Queued items whose requests all gave up (futures cancelled) or whose deadline passed are dropped
before reaching an engine.

The retry hint estimates when the queued work will have drained: each replica's queued pairs and
images, in capped calls, at the engine speed measured as ``seconds = a + b * pairs + c * images``
per call (a least-squares fit over recent calls, so the fixed cost per call, the parallel speed of
large batches and the vision encoder are all counted); replicas drain in parallel.

Device faults: when an engine call raises ``torch.cuda.OutOfMemoryError``, the device's cached
memory is released and the call is retried in halves (first by items, then an item's sentences)
down to one pair; only the pairs that fail even alone answer ``DeviceOutOfMemoryError`` (an
``OverloadedError``: RESOURCE_EXHAUSTED / HTTP 429), the rest of the batch is scored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from teacher_server.engine import ImageSentences, ItmScore, PreparedImage
from teacher_server.errors import DeviceOutOfMemoryError, ImageRequiredError, OverloadedError
from teacher_server.hoi.region import Region, view_id
from teacher_server.metrics import ServiceMetrics

if TYPE_CHECKING:
    from teacher_server.engine import ItmEngine

log = logging.getLogger(__name__)

_DEFAULT_RETRY_S = 0.5  # retry hint before any engine call has been timed
_RETRY_RANGE_S = (0.01, 60.0)
_SPEED_DECAY = 0.9  # weight of older engine calls in the speed fit, per new call (~10 calls' memory)


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


@dataclass
class _Load:
    """Work counted against the queue bounds."""

    items: int = 0
    pairs: int = 0
    nbytes: int = 0


class Admission:
    """Queue capacity reserved for one request's cold work while its images are decoded.

    ``DynamicBatcher.admit`` returns it; ``submit(..., admission=...)`` turns the reservation into
    the queued work's own counts; ``release`` (idempotent; call it in a ``finally``) frees what was
    reserved but never submitted, e.g. when decoding failed.
    """

    def __init__(self, batcher: DynamicBatcher, load: _Load) -> None:
        self._batcher = batcher
        self._load = load
        self._open = True

    def release(self) -> None:
        """Return the reservation to the queue (no-op once released or submitted)."""
        if self._open:
            self._open = False
            self._batcher._unhold(self._load, reserved=True)


@dataclass(eq=False)
class _Work:
    """One queued unit: new pairs of one view, computed once for every request that waits on them."""

    item: BatchItem  # sentences: the pairs this unit computes (none of them in flight elsewhere)
    # Shared by every request that waits on it: sentence -> score, or the error of that one pair.
    future: asyncio.Future[dict[str, ItmScore | BaseException]]
    deadline: float | None  # loop.time() after which no waiting request wants it
    enqueued_at: float
    replica: _Replica
    load: _Load
    waiters: int = 0  # requests awaiting at least one of its pairs
    waiting: bool = True  # still in the queue, counted against its bounds


@dataclass(eq=False)
class _Replica:
    index: int
    engine: ItmEngine
    executor: ThreadPoolExecutor
    queue: deque[_Work] = field(default_factory=deque)
    pairs: int = 0  # pairs of the live (still waiting) work
    works: int = 0  # live work units (an upper bound on the distinct views they need)
    images: int = 0  # live work units that bring an image to encode
    calls: int = 0  # engine calls made
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


@dataclass(frozen=True)
class _CallResult:
    scores: dict[str, dict[str, ItmScore]]  # view id -> sentence -> score
    image_required: frozenset[str]
    out_of_memory: frozenset[tuple[str, str]]  # (view, sentence) pairs that failed even alone
    oom_errors: int
    images_encoded: int
    sentences_scored: int
    seconds: float


class DynamicBatcher:
    """Merges concurrent work into engine calls across ``engines`` (one replica per device)."""

    def __init__(
        self,
        engines: Sequence[ItmEngine],
        *,
        max_batch_pairs: int | None = None,
        max_batch_images: int = 64,
        max_delay_ms: float = 5.0,
        max_queue: int = 1024,
        max_queue_pairs: int = 16384,
        max_queue_bytes: int = 1 << 30,
        max_queue_wait_s: float = 10.0,
        metrics: ServiceMetrics | None = None,
        max_batch_sentences: int | None = None,
    ) -> None:
        """``max_batch_sentences`` is the former name of ``max_batch_pairs`` (give one; default 256)."""
        if not engines:
            raise ValueError("DynamicBatcher needs at least one engine")
        if max_batch_pairs is not None and max_batch_sentences is not None and max_batch_pairs != max_batch_sentences:
            raise ValueError("max_batch_sentences is the former name of max_batch_pairs: give one of them")
        self.engines = tuple(engines)
        self.max_batch_pairs = max_batch_pairs or max_batch_sentences or 256
        self.max_batch_images = max_batch_images
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_pairs = max_queue_pairs
        self.max_queue_bytes = max_queue_bytes
        self.max_queue_wait_s = max_queue_wait_s
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self._replicas: list[_Replica] = []
        self._held = _Load()  # reserved + queued, against the bounds
        self._reserved = _Load()  # admitted, not yet submitted (images being decoded)
        self._inflight: dict[tuple[str, str], _Work] = {}  # (view, sentence) -> its queued or running work
        self._accepting = False
        self._closing = False
        # Exponentially weighted normal equations of the fit seconds = a + b * pairs + c * images
        # per engine call, over the features (1, pairs, images encoded) (see retry_hint).
        self._gram = np.zeros((3, 3))
        self._moment = np.zeros(3)

    @property
    def max_batch_sentences(self) -> int:
        """The former name of ``max_batch_pairs``."""
        return self.max_batch_pairs

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
                work = replica.queue.popleft()
                self._release(work)
                _fail(work, ShuttingDownError)
            replica.executor.shutdown(wait=False, cancel_futures=True)
        self._replicas.clear()
        await asyncio.sleep(0)  # the requests' futures follow their work's (done-callbacks) before we return

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queued_items(self) -> int:
        """Work items admitted and not yet taken by an engine (being decoded, or queued)."""
        return self._held.items

    @property
    def queued_pairs(self) -> int:
        """(image, sentence) pairs admitted and not yet taken by an engine."""
        return self._held.pairs

    @property
    def queued_bytes(self) -> int:
        """Bytes of image data held by admitted work not yet taken by an engine."""
        return self._held.nbytes

    def replica_of(self, digest: str) -> int:
        """The replica that scores ``digest``: fixed per digest, so its vision LRU keeps serving it."""
        return int(digest[:8], 16) % len(self.engines)

    # ------------------------------------------------------------------------------ admission
    def admit(
        self, wanted: Sequence[tuple[str, Sequence[str]]], nbytes: int, *, deadline: float | None = None
    ) -> Admission:
        """Reserve queue room for ``wanted`` ((view id, sentences) per item) and ``nbytes`` of image
        data before the caller decodes images; pairs already in flight need no room.

        Raises ``OverloadedError`` (naming the limit, with ``retry_after_s``) when it does not fit
        (also when the work queued ahead would outlast ``max_queue_wait_s`` or the request's
        ``deadline``, a ``loop.time()`` instant), ``ShuttingDownError`` when stopping.
        """
        if not self._accepting:
            self.metrics.rejected.labels(reason="shutting_down").inc()
            raise ShuttingDownError()
        load = _Load(nbytes=nbytes)
        for view, sentences in wanted:
            new = sum((view, s) not in self._inflight for s in dict.fromkeys(sentences))
            load.items += new > 0
            load.pairs += new
        self._check_room(load, deadline)
        self._hold(load)
        self._add(self._reserved, load)
        return Admission(self, load)

    def _check_room(self, load: _Load, deadline: float | None = None) -> None:
        # A request larger than the whole queue still runs when the queue is empty (else never).
        if not self._held.items or not load.items:
            return
        for held, adds, limit, name, unit in (
            (self._held.items, load.items, self.max_queue, "max_queue", "work items"),
            (self._held.pairs, load.pairs, self.max_queue_pairs, "max_queue_pairs", "pairs"),
            (self._held.nbytes, load.nbytes, self.max_queue_bytes, "max_queue_bytes", "bytes of images"),
        ):
            if held + adds > limit:
                self.metrics.rejected.labels(reason="queue_full").inc()
                retry = self.retry_hint()
                raise OverloadedError(
                    f"teacher queue is full: {held:,} of {name}={limit} {unit} waiting, this request "
                    f"adds {adds:,}; retry after {retry:.2f} s",
                    retry_after_s=retry,
                )
        # By time, at the measured engine speed: counts alone cannot know the device (16,384 pairs
        # are seconds on a GPU, minutes on a CPU), and work admitted behind more than the caller
        # will wait is a timeout later, after it has cost memory and a decode: refuse it now.
        wait = self._drain_seconds()
        if wait is None:
            return
        if self.max_queue_wait_s and wait > self.max_queue_wait_s:
            reason, detail = "queue_wait", f"over max_queue_wait_s={self.max_queue_wait_s:g}"
        elif deadline is not None and wait > deadline - asyncio.get_running_loop().time():
            reason, detail = "deadline", "more than this request's deadline leaves"
        else:
            return
        self.metrics.rejected.labels(reason=reason).inc()
        retry = self.retry_hint()
        raise OverloadedError(
            f"teacher queue is full: the work waiting needs about {wait:.2f} s of engine time, {detail}; "
            f"retry after {retry:.2f} s",
            retry_after_s=retry,
        )

    def _hold(self, load: _Load) -> None:
        self._add(self._held, load)
        self._show_queue()

    def _unhold(self, load: _Load, *, reserved: bool = False) -> None:
        self._add(self._held, load, sign=-1)
        if reserved:
            self._add(self._reserved, load, sign=-1)
        self._show_queue()

    @staticmethod
    def _add(total: _Load, load: _Load, sign: int = 1) -> None:
        total.items += sign * load.items
        total.pairs += sign * load.pairs
        total.nbytes += sign * load.nbytes

    def _show_queue(self) -> None:
        self.metrics.queue_items.set(self._held.items)
        self.metrics.queue_pairs.set(self._held.pairs)
        self.metrics.queue_bytes.set(self._held.nbytes)

    # ------------------------------------------------------------------------------ submission
    def submit(
        self,
        items: Sequence[BatchItem],
        *,
        deadline: float | None = None,
        admission: Admission | None = None,
    ) -> list[asyncio.Future]:
        """Enqueue all ``items`` or none; one future per item resolving to its scores, in order.

        Pairs already queued or running (single flight) are awaited, not queued again.
        ``deadline`` is a ``loop.time()`` instant; work still queued after it (and after every
        other request waiting on it) is dropped and its future raises ``TimeoutError``. A future
        raises ``ImageRequiredError`` when its item has no image and the replica does not hold the
        digest, ``DeviceOutOfMemoryError`` for pairs the device cannot run even alone. With
        ``admission`` (from ``admit``) the room was reserved already; without it, raises
        ``OverloadedError`` (with ``retry_after_s``) when the queue cannot take every item, and
        ``ShuttingDownError`` when stopping.
        """
        if not items:  # everything came from the cache: nothing to admit
            if admission is not None:
                admission.release()
            return []
        if not self._accepting:
            if admission is not None:
                admission.release()
            self.metrics.rejected.labels(reason="shutting_down").inc()
            raise ShuttingDownError()
        # Plan first (nothing changes if the request is refused): per item, its new sentences.
        planned: set[tuple[str, str]] = set()
        plans: list[list[str]] = []
        tensors: dict[int, int] = {}  # id(pixel tensor) -> bytes: a view shared by items counts once
        load = _Load()
        for item in items:
            fresh = (s for s in dict.fromkeys(item.sentences) if (item.view, s) not in planned)
            new = [s for s in fresh if not self._joinable(item, s)]
            planned.update((item.view, s) for s in new)
            plans.append(new)
            if new:
                load.items += 1
                load.pairs += len(new)
                if item.image is not None:
                    pixels = item.image.pixel_values
                    tensors[id(pixels)] = pixels.element_size() * pixels.nelement()
        load.nbytes = sum(tensors.values())
        if admission is None:
            self._check_room(load, deadline)
        else:
            admission.release()  # the reservation becomes the queued work's own counts below
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        counted: set[int] = set()
        joined = 0
        for item, new in zip(items, plans, strict=True):
            parts: dict[int, _Work] = {}
            if new:
                replica = self._replicas[self.replica_of(item.digest)]
                nbytes = 0
                if item.image is not None and id(item.image.pixel_values) not in counted:
                    counted.add(id(item.image.pixel_values))
                    nbytes = tensors[id(item.image.pixel_values)]
                work = _Work(
                    BatchItem(item.digest, item.image, tuple(new), item.region),
                    loop.create_future(),
                    deadline,
                    now,
                    replica,
                    _Load(1, len(new), nbytes),
                )
                for sentence in new:
                    self._inflight[(item.view, sentence)] = work
                work.future.add_done_callback(lambda _, w=work: self._landed(w))
                self._hold(work.load)
                replica.queue.append(work)
                replica.pairs += len(new)
                replica.works += 1
                replica.images += item.image is not None
                replica.wakeup.set()
                parts[id(work)] = work
            sources = []
            for sentence in item.sentences:
                work = self._inflight[(item.view, sentence)]
                if id(work) not in parts:
                    parts[id(work)] = work
                    # Joined: the work now serves this request's deadline too.
                    work.deadline = None if deadline is None or work.deadline is None else max(deadline, work.deadline)
                sources.append(work)
            joined += len(set(item.sentences)) - len(new)
            for work in parts.values():
                work.waiters += 1
            futures.append(self._follow(loop, item.sentences, sources, list(parts.values())))
        if joined:
            self.metrics.single_flight_pairs.inc(joined)
        return futures

    def _joinable(self, item: BatchItem, sentence: str) -> bool:
        """Whether the pair is in flight in a form that serves ``item``: work that carries its
        image (or ``item`` has none either), so joining never turns sent bytes into "image required"."""
        work = self._inflight.get((item.view, sentence))
        return work is not None and not work.future.done() and (work.item.image is not None or item.image is None)

    def _landed(self, work: _Work) -> None:
        """A work's computation ended: later requests for its pairs compute them anew (or read the cache)."""
        for sentence in work.item.sentences:
            key = (work.item.view, sentence)
            if self._inflight.get(key) is work:
                del self._inflight[key]
        if not work.future.cancelled():
            work.future.exception()  # retrieved here: every request may have given up on it

    def _follow(
        self,
        loop: asyncio.AbstractEventLoop,
        sentences: Sequence[str],
        sources: list[_Work],
        parts: list[_Work],
    ) -> asyncio.Future:
        """One request item's future: the scores of ``sentences`` (each from its work in
        ``sources``), in order, or the first error among them.

        Cancelling it withdraws the request from every work it waits on (``parts``); work nobody
        waits on any more is dropped from the queue unscored.
        """
        result: asyncio.Future[list[ItmScore]] = loop.create_future()
        remaining = len(parts)

        def landed(_: asyncio.Future) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining or result.done():
                return
            scores: list[ItmScore] = []
            for sentence, work in zip(sentences, sources, strict=True):
                if work.future.cancelled():
                    result.set_exception(ShuttingDownError())
                    return
                error = work.future.exception()
                outcome = error if error is not None else work.future.result()[sentence]
                if isinstance(outcome, BaseException):
                    result.set_exception(outcome)
                    return
                scores.append(outcome)
            result.set_result(scores)

        def withdrawn(_: asyncio.Future) -> None:
            if not result.cancelled():
                return
            for work in parts:
                work.waiters -= 1
                if work.waiters <= 0 and work.waiting:
                    self._release(work)  # the worker pops it unscored
                    work.future.cancel()

        for work in parts:
            work.future.add_done_callback(landed)
        result.add_done_callback(withdrawn)
        return result

    def retry_hint(self) -> float:
        """Seconds until the queued work is likely done: per replica, its queued pairs in calls of
        at most ``max_batch_pairs`` pairs and ``max_batch_images`` images, at the fitted cost
        ``a + b * pairs + c * images`` per call; replicas drain in parallel, so the slowest one
        counts. The call running now is not counted (at most one call's time; leaving it out
        keeps the hint a function of the queue alone)."""
        wait = self._drain_seconds()
        if wait is None:
            return _DEFAULT_RETRY_S
        return min(max(wait, _RETRY_RANGE_S[0]), _RETRY_RANGE_S[1])

    def _drain_seconds(self) -> float | None:
        """``retry_hint``'s estimate, unbounded; None before any engine call was timed."""
        speed = self._speed()
        if speed is None or not self._replicas:
            return None
        per_call, per_pair, per_image = speed
        # Work still being decoded is not on a replica yet: share it out evenly.
        extra_pairs = self._reserved.pairs / len(self._replicas)
        extra_images = self._reserved.items / len(self._replicas)
        slowest = 0.0
        for replica in self._replicas:
            pairs, images = replica.pairs + extra_pairs, replica.images + extra_images
            calls = max(math.ceil(pairs / self.max_batch_pairs), math.ceil(images / self.max_batch_images))
            slowest = max(slowest, calls * per_call + pairs * per_pair + images * per_image)
        return slowest

    def _speed(self) -> tuple[float, float, float] | None:
        """(seconds per call, per pair, per image encoded) from the weighted least-squares fit of
        recent calls; None before the first."""
        gram, moment = self._gram, self._moment
        if gram[0, 0] == 0:
            return None
        # The image term only where calls so far differed in images encoded independently of
        # their count (else, e.g. one image per call, its cost is the per-call cost's).
        if np.linalg.cond(gram) < 1e8:
            full = np.linalg.solve(gram, moment)
            if (full >= 0).all():
                return float(full[0]), float(full[1]), float(full[2])
        if np.linalg.cond(gram[:2, :2]) < 1e8:  # calls of more than one size so far
            calls_and_pairs = np.linalg.solve(gram[:2, :2], moment[:2])
            if (calls_and_pairs >= 0).all():
                return float(calls_and_pairs[0]), float(calls_and_pairs[1]), 0.0
        # One call size so far, or larger calls were faster (noise): all of the time per pair.
        return 0.0, float(moment[0] / max(gram[0, 1], 1e-9)), 0.0

    def _learn_speed(self, replica: _Replica, result: _CallResult) -> None:
        replica.calls += 1
        if result.sentences_scored == 0 or result.oom_errors:  # a call with failed halves times nothing useful
            return
        # A replica's first call pays one-time costs (allocation, kernel choice): it counts a tenth.
        weight = 0.1 if replica.calls == 1 else 1.0
        features = np.array([1.0, result.sentences_scored, result.images_encoded])
        self._gram = _SPEED_DECAY * self._gram + weight * np.outer(features, features)
        self._moment = _SPEED_DECAY * self._moment + weight * features * result.seconds

    def _release(self, work: _Work) -> None:
        """Stop counting ``work`` in the queue (idempotent)."""
        if work.waiting:
            work.waiting = False
            work.replica.pairs -= len(work.item.sentences)
            work.replica.works -= 1
            work.replica.images -= work.item.image is not None
            self._unhold(work.load)

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
            # Fill: more work may arrive until a batch is full or the oldest has waited enough.
            oldest = next(w for w in replica.queue if w.waiting).enqueued_at
            while replica.pairs < self.max_batch_pairs and replica.works < self.max_batch_images and not self._closing:
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
        """Pop the head work, whose requests all gave up while it waited (already released)."""
        replica.queue.popleft()
        self.metrics.dropped.labels(reason="cancelled").inc()

    def _take(self, replica: _Replica, now: float) -> list[_Work]:
        """Pop the next batch: live work in arrival order up to ``max_batch_pairs`` pairs and
        ``max_batch_images`` distinct views (work larger than that runs alone). Expired work is
        failed and skipped."""
        batch: list[_Work] = []
        pairs = 0
        views: set[str] = set()
        while replica.queue:
            work = replica.queue[0]
            if not work.waiting:
                self._discard_cancelled(replica)
                continue
            if work.deadline is not None and now >= work.deadline:
                replica.queue.popleft()
                self._release(work)
                _fail(work, lambda: TimeoutError("deadline passed while queued; not scored"))
                self.metrics.dropped.labels(reason="deadline").inc()
                continue
            size = len(work.item.sentences)
            more_views = len(views | {work.item.view})
            if batch and (pairs + size > self.max_batch_pairs or more_views > self.max_batch_images):
                break
            replica.queue.popleft()
            self._release(work)
            batch.append(work)
            pairs += size
            views.add(work.item.view)
        return batch

    async def _run(self, replica: _Replica, batch: list[_Work], loop: asyncio.AbstractEventLoop) -> None:
        start = loop.time()
        for work in batch:
            self.metrics.queue_seconds.observe(start - work.enqueued_at)
        # One engine request per view: the union of its sentences (the engine deduplicates too).
        images: dict[str, PreparedImage | None] = {}
        sentences: dict[str, dict[str, None]] = {}
        first: dict[str, BatchItem] = {}
        for work in batch:
            item = work.item
            first.setdefault(item.view, item)
            if images.get(item.view) is None:
                images[item.view] = item.image
            sentences.setdefault(item.view, {}).update(dict.fromkeys(item.sentences))
        requests = [ImageSentences(first[v].digest, images[v], tuple(sentences[v]), first[v].region) for v in images]
        pair_count = sum(len(r.sentences) for r in requests)
        self.metrics.batch_sentences.observe(pair_count)
        self.metrics.batch_images.observe(len(requests))
        try:
            result = await loop.run_in_executor(replica.executor, _score_call, replica.engine, requests)
        except asyncio.CancelledError:  # stop() gave up draining: nobody will deliver these results
            for work in batch:
                _fail(work, ShuttingDownError)
            raise
        except Exception as error:  # an engine failure fails this batch only; the worker lives on
            log.exception("engine replica %d failed a batch of %d items", replica.index, len(batch))
            for work in batch:
                _fail(work, lambda error=error: error)
            return
        self._learn_speed(replica, result)
        self.metrics.images_encoded.inc(result.images_encoded)
        self.metrics.sentences_scored.inc(result.sentences_scored)
        if result.oom_errors:
            self.metrics.device_oom.inc(result.oom_errors)
        for work in batch:
            if work.future.done():  # every request waiting on it gave up while the engine ran
                continue
            view = work.item.view
            if view in result.image_required:
                work.future.set_exception(ImageRequiredError(view))
                continue
            outcomes: dict[str, ItmScore | BaseException] = {}
            for sentence in work.item.sentences:
                if (view, sentence) in result.out_of_memory:
                    outcomes[sentence] = DeviceOutOfMemoryError(
                        f"the device of engine replica {replica.index} ran out of memory scoring image "
                        f"{work.item.digest} with sentence {sentence!r} even alone; retry later or on "
                        "another replica",
                        retry_after_s=self.retry_hint(),
                    )
                else:
                    outcomes[sentence] = result.scores[view][sentence]
            work.future.set_result(outcomes)


def _fail(work: _Work, error: Callable[[], BaseException]) -> None:
    """Fail ``work`` (every pair of it) with a fresh ``error()``, unless it already ended."""
    if not work.future.done():
        work.future.set_exception(error())


def free_device_memory(engine: ItmEngine) -> None:
    """Give the CUDA caching allocator's unused blocks back after an out-of-memory error (no-op on
    CPU), so that the retried halves start from the memory that is really free."""
    if engine.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _halves(requests: list[ImageSentences]) -> list[list[ImageSentences]] | None:
    """Split a batch in two: by items, else the one item's sentences; None for a single pair."""
    if len(requests) > 1:
        middle = len(requests) // 2
        return [requests[:middle], requests[middle:]]
    (request,) = requests
    if len(request.sentences) > 1:
        middle = len(request.sentences) // 2
        return [
            [ImageSentences(request.digest, request.image, tuple(part), request.region)]
            for part in (request.sentences[:middle], request.sentences[middle:])
        ]
    return None


def _score_call(engine: ItmEngine, requests: list[ImageSentences]) -> _CallResult:
    """Runs in the replica's thread: ``engine.score`` on the batch, digest-only items it cannot
    serve set aside (answered "image required") instead of failing the whole batch, and a batch
    the device has no memory for retried in halves down to single pairs."""
    started = time.perf_counter()
    required = {r.view for r in requests if r.image is None and not engine.has_image(r.digest, r.region)}
    encoded_before, scored_before = engine.stats.images_encoded, engine.stats.sentences_scored
    scores: dict[str, dict[str, ItmScore]] = {}
    out_of_memory: set[tuple[str, str]] = set()
    oom_errors = 0
    stack = [[r for r in requests if r.view not in required]]
    while stack:
        todo = [r for r in stack.pop() if r.view not in required]
        if not todo:
            continue
        try:
            rows = engine.score(todo)
        except ImageRequiredError as error:  # evicted between has_image and score: set it aside
            required.add(error.digest)
            stack.append(todo)
            continue
        except torch.cuda.OutOfMemoryError:
            oom_errors += 1
            free_device_memory(engine)
            halves = _halves(todo)
            if halves is None:
                (alone,) = todo
                log.warning("device out of memory on a single pair (view %s); answering RESOURCE_EXHAUSTED", alone.view)
                out_of_memory.update((alone.view, s) for s in alone.sentences)
            else:
                stack.extend(reversed(halves))  # the first half runs first
            continue
        for request, row in zip(todo, rows, strict=True):
            scores.setdefault(request.view, {}).update(zip(request.sentences, row, strict=True))
    if oom_errors:
        log.warning(
            "engine %s ran out of device memory %d time(s) in a batch of %d items; "
            "retried in halves, %d pair(s) failed",
            engine.device,
            oom_errors,
            len(requests),
            len(out_of_memory),
        )
    return _CallResult(
        scores=scores,
        image_required=frozenset(required),
        out_of_memory=frozenset(out_of_memory),
        oom_errors=oom_errors,
        images_encoded=engine.stats.images_encoded - encoded_before,
        sentences_scored=engine.stats.sentences_scored - scored_before,
        seconds=time.perf_counter() - started,
    )
