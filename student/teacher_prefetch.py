"""The trainer's remote teacher: endpoint pool, Redis read-through, background prefetch with a deadline.

Three layers, each usable alone, stacked by ``build_remote_teacher``:

- ``EndpointPool``: a list of teacher endpoints (``grpc://a:50051,grpc://b:50051`` or
  ``triton://host:8001``); calls go round robin; an endpoint that fails is skipped for
  ``cooldown_s`` while the call fails over to the next one, then tried again (recovery).
- ``ReadThroughBackend``: looks every (image, sentence) up in the shared score cache
  (``teacher_server.cache``, keyed by the teacher's model fingerprint) before any RPC, and asks
  the pool only for the misses. It never writes: the teacher service fills the cache.
- ``TeacherPrefetcher``: wraps a ``TeacherScores`` (the trainer's adapter) and runs its ``fetch``
  in a background thread. ``PrefetchingLoader`` hands it the targets of the next ``lead``
  batches (for ``kl`` the candidate sentences depend on the ground truth only), so their scores
  arrive while the current batch trains. ``annotate`` waits at most ``deadline_s``; when the
  scores are late or the teacher is down the batch trains without its ITM term and is counted
  (``skip``, the default) or training stops (``fail``).

The prefetcher offers the ``TeacherScores`` interface the training loop uses (``enabled``,
``description``, ``stats``, ``annotate``, ``triplet_margins``, ``close``), so it drops in for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

from student.teacher_scores import BatchScores, ScorePlan, ScoreQuery, TeacherScores
from teacher_server.errors import TeacherError

log = logging.getLogger(__name__)

SCHEMES = ("grpc://", "grpcs://", "triton://")


class ScoringClient(Protocol):
    """What ``TeacherClient`` and ``TritonTeacherClient`` have in common."""

    def score(
        self, images: Sequence[Any], sentences: Sequence[Sequence[str]], *, timeout_s: float | None = None
    ) -> Any: ...

    def model_info(self, *, timeout_s: float | None = None) -> Any: ...

    def close(self) -> None: ...


def parse_endpoints(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"grpc://a:1,grpc://b:2"`` (or a list) -> the endpoints; raises ``TeacherError`` for a bad one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    endpoints = tuple(item.strip() for item in items if item.strip())
    if not endpoints:
        raise TeacherError(f"teacher endpoints {spec!r}: none given, expected e.g. grpc://host:50051")
    for endpoint in endpoints:
        if not endpoint.startswith(SCHEMES) or endpoint.split("://", 1)[1] in ("", "/"):
            raise TeacherError(
                f"teacher endpoint {endpoint!r}: expected grpc://host:port, grpcs://host:port or triton://host:port"
            )
    return endpoints


def open_client(endpoint: str, *, token: str | None, timeout_s: float, max_retries: int) -> ScoringClient:
    """A blocking client of one endpoint (native gRPC or KServe v2 / Triton)."""
    if endpoint.startswith("triton://"):
        from teacher_server.triton_client import TritonTeacherClient

        return TritonTeacherClient(endpoint, token=token, timeout_s=timeout_s, max_retries=max_retries)
    from teacher_server.client import TeacherClient

    return TeacherClient(endpoint, token=token, timeout_s=timeout_s, max_retries=max_retries)


@dataclass
class EndpointStats:
    """Calls per endpoint: answered, failed (and failed over), and when it may be tried again."""

    calls: int = 0
    failures: int = 0
    down_until: float = 0.0


class EndpointPool:
    """Round-robin load balancing with failover over teacher endpoints. Thread-safe.

    Args:
        endpoints: ``"grpc://a:50051,grpc://b:50051"`` or a list; ``triton://`` works the same.
        token: bearer token sent to every endpoint.
        timeout_s: bound of one call on one endpoint (its own retries included).
        cooldown_s: an endpoint that failed is left out for this long (unless all are out).
        max_retries: retries inside one endpoint's client before failing over (kept low: the
            next endpoint is a better bet than waiting for this one).
        client_factory: ``(endpoint) -> client``; default ``open_client``.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        cooldown_s: float = 2.0,
        max_retries: int = 1,
        client_factory: Callable[[str], ScoringClient] | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        factory = client_factory or (
            lambda e: open_client(e, token=token, timeout_s=timeout_s, max_retries=max_retries)
        )
        self._clients = [factory(endpoint) for endpoint in self.endpoints]
        self.stats = {endpoint: EndpointStats() for endpoint in self.endpoints}
        self._next = 0
        self._lock = threading.Lock()
        self.description = "teacher " + ",".join(self.endpoints)

    def _order(self) -> list[int]:
        """Endpoints to try for one call: round robin from the next one, those cooling down last."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.endpoints)
        order = [(start + i) % len(self.endpoints) for i in range(len(self.endpoints))]
        now = time.monotonic()
        up = [i for i in order if self.stats[self.endpoints[i]].down_until <= now]
        return up + [i for i in order if i not in up]

    def call(self, method: Callable[[ScoringClient], Any]) -> Any:
        """``method(client)`` on the next endpoint, failing over to the others; ``TeacherError`` if all fail."""
        errors = []
        for index in self._order():
            endpoint = self.endpoints[index]
            stats = self.stats[endpoint]
            try:
                result = method(self._clients[index])
            except (TeacherError, OSError) as error:
                with self._lock:
                    stats.failures += 1
                    stats.down_until = time.monotonic() + self.cooldown_s
                errors.append(f"{endpoint}: {error}")
                continue
            with self._lock:
                stats.calls += 1
                stats.down_until = 0.0
            return result
        raise TeacherError("every teacher endpoint failed: " + "; ".join(errors))

    def score(self, images: Sequence[Any], sentences: Sequence[Sequence[str]]) -> list[list[Any]]:
        """``TeacherScore`` of ``sentences[i][j]`` against ``images[i]`` (path or bytes) from some endpoint."""
        return self.call(lambda client: client.score(images, sentences, timeout_s=self.timeout_s))

    def fingerprint(self) -> str | None:
        """The teacher model's fingerprint (cache keys), or None when no endpoint says it."""
        info = self.call(lambda client: client.model_info(timeout_s=self.timeout_s))
        return getattr(info, "fingerprint", None) or None

    def close(self) -> None:
        for client in self._clients:
            client.close()


class ReadThroughBackend:
    """A ``TeacherBackend`` (``student.teacher_scores``): the score cache first, the pool for the misses.

    The fingerprint is asked from the teacher once (lazily): cached scores of another model are
    never read. Until the teacher has answered it, every lookup goes to the pool.
    """

    def __init__(self, pool: EndpointPool, cache: Any | None = None) -> None:
        self.pool = pool
        self.cache = cache
        self._fingerprint: str | None = None
        self.cache_hits = 0
        self.description = pool.description + (f" (read-through {cache.backend} cache)" if cache is not None else "")

    def fingerprint(self) -> str | None:
        if self._fingerprint is None and self.cache is not None:
            try:
                self._fingerprint = self.pool.fingerprint()
            except TeacherError as error:
                log.debug("no fingerprint yet (%s): cache read-through off for now", error)
        return self._fingerprint

    def score(self, queries: Sequence[ScoreQuery]) -> list[list[float]]:
        results: list[list[float | None]] = [[None] * len(q.sentences) for q in queries]
        fingerprint = self.fingerprint()
        if fingerprint is not None and self.cache is not None:
            found = self.cache.lookup(fingerprint, [(q.digest, list(q.sentences)) for q in queries])
            for row, hits in zip(results, found, strict=True):
                for j, hit in enumerate(hits):
                    if hit is not None:
                        row[j] = float(hit.match_logit)
                        self.cache_hits += 1
        todo = [
            (i, [j for j, value in enumerate(row) if value is None]) for i, row in enumerate(results) if None in row
        ]
        if todo:
            scored = self.pool.score(
                [queries[i].image_path for i, _ in todo],
                [[queries[i].sentences[j] for j in missing] for i, missing in todo],
            )
            for (i, missing), scores in zip(todo, scored, strict=True):
                for j, score in zip(missing, scores, strict=True):
                    results[i][j] = float(score.match_logit)
        return [[float(value) for value in row] for row in results]  # type: ignore[arg-type]

    def close(self) -> None:
        self.pool.close()
        if self.cache is not None:
            self.cache.close()


def build_remote_teacher(
    endpoints: str,
    *,
    redis_url: str | None = None,
    token: str | None = None,
    timeout_s: float = 30.0,
    cooldown_s: float = 2.0,
) -> ReadThroughBackend:
    """Pool over ``endpoints`` plus (with ``redis_url``) a read-through of the shared Redis cache."""
    cache = None
    if redis_url:
        from teacher_server.cache import open_score_cache

        cache = open_score_cache(redis_url)
    return ReadThroughBackend(EndpointPool(endpoints, token=token, timeout_s=timeout_s, cooldown_s=cooldown_s), cache)


# -- prefetch ------------------------------------------------------------------------------------


@dataclass
class PrefetchStats:
    """Counters of the prefetcher (the training log shows them)."""

    submitted: int = 0  # plans handed to the background thread ahead of their batch
    ready_in_time: int = 0  # batches whose scores were there by the deadline
    late_batches: int = 0  # deadline passed: ITM term skipped (scores still land in the memo)
    failed_batches: int = 0  # the teacher could not answer: ITM term skipped


class TeacherPrefetcher:
    """Background fetching of teacher scores for ``TeacherScores`` with a per-batch deadline.

    Args:
        scores: the adapter that plans sentences, keeps the memo and applies margins.
        deadline_s: how long ``annotate`` waits for a batch's scores (from the call).
        on_error: ``skip`` (late or failed batch: no ITM term, counted) or ``fail`` (raise
            ``TeacherError``).
        max_pending: plans kept in flight; older ones are dropped from the index (their scores
            still go to the memo).
    """

    def __init__(
        self, scores: TeacherScores, *, deadline_s: float = 10.0, on_error: str = "skip", max_pending: int = 16
    ) -> None:
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.scores = scores
        self.deadline_s = deadline_s
        self.on_error = on_error
        self.max_pending = max_pending
        self.prefetch_stats = PrefetchStats()
        # One worker: TeacherScores' memo and counters are not thread-safe, so every fetch runs in
        # this one thread, in submission order (the next batch's scores come first).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-prefetch")
        self._pending: OrderedDict[ScorePlan, Future[BatchScores]] = OrderedDict()
        self._lock = threading.Lock()
        self._warned = False

    # The TeacherScores interface of the training loop.
    @property
    def enabled(self) -> bool:
        return self.scores.enabled

    @property
    def description(self) -> str:
        return self.scores.description + f" (prefetch, deadline {self.deadline_s:g} s, on_error={self.on_error})"

    @property
    def stats(self) -> Any:
        return self.scores.stats

    def _fetch(self, plan: ScorePlan) -> BatchScores:
        # Failures are answered by policy here, never raised into the worker (skip) ...
        try:
            return self.scores.fetch(plan)
        except TeacherError:
            if self.on_error == "fail":
                raise
            return BatchScores(failed=True)

    def submit(self, targets: Sequence[Mapping[str, Any]]) -> ScorePlan:
        """Start fetching the scores of a future batch (returns at once)."""
        plan = self.scores.plan(targets)
        with self._lock:
            if plan not in self._pending:
                self._pending[plan] = self._executor.submit(self._fetch, plan)
                self.prefetch_stats.submitted += 1
                while len(self._pending) > self.max_pending:
                    self._pending.popitem(last=False)
        return plan

    def annotate(self, targets: Sequence[dict[str, Any]]) -> int:
        """Set ``teacher_verb_margin`` on the targets when the scores arrive within the deadline.

        Returns the number of pairs given scores (0 when the batch's ITM term is skipped).
        """
        if not self.enabled:
            return 0
        self.scores.stats.batches += 1
        plan = self.scores.plan(targets)
        with self._lock:
            future = self._pending.pop(plan, None)
        if future is None:
            future = self._executor.submit(self._fetch, plan)
        try:
            result = future.result(timeout=self.deadline_s)
        except FutureTimeout:
            self.prefetch_stats.late_batches += 1
            return self._skip(f"scores not there after {self.deadline_s:g} s")
        if result.failed:
            # TeacherScores.fetch has counted it in stats.failed_batches already.
            self.prefetch_stats.failed_batches += 1
            return self._skip("the teacher did not answer", count=False)
        self.prefetch_stats.ready_in_time += 1
        return self.scores.apply(plan, result, targets)

    def _skip(self, why: str, *, count: bool = True) -> int:
        if self.on_error == "fail":
            raise TeacherError(f"{self.scores.description}: {why} (teacher.on_error=fail)")
        if not self._warned:
            log.warning("%s: %s; ITM term skipped for this batch (counted, warned once)", self.description, why)
            self._warned = True
        if count:
            self.scores.stats.failed_batches += 1
        return 0

    def triplet_margins(self, targets: Sequence[Mapping[str, Any]], triplets: Sequence[Any]) -> list[Any]:
        """The ``margin`` variant depends on this step's predictions: no prefetch, asked in the worker."""
        return self._executor.submit(self.scores.triplet_margins, targets, triplets).result()

    def close(self) -> None:
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        self._executor.shutdown(wait=True)
        self.scores.close()


class PrefetchingLoader:
    """Iterates ``loader`` ``lead`` batches ahead, handing each batch's targets to ``prefetcher.submit``.

    Drop-in for the loader in the training loop (same ``len``); the batch being trained on and
    the next ``lead`` ones have their scores requested.
    """

    def __init__(self, loader: Any, prefetcher: TeacherPrefetcher, lead: int = 2) -> None:
        if lead < 1:
            raise ValueError(f"lead must be >= 1, got {lead}")
        self.loader = loader
        self.prefetcher = prefetcher
        self.lead = lead

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        window: list[Any] = []
        for batch in iterator:
            self.prefetcher.submit(batch[2])
            window.append(batch)
            if len(window) > self.lead:
                yield window.pop(0)
        yield from window
