"""Background prefetch of teacher scores with a per-batch deadline.

``TeacherPrefetcher`` wraps a ``TeacherScores`` (the trainer's adapter) and runs its ``fetch`` in a
background thread. ``PrefetchingLoader`` hands it the targets of the next ``lead`` batches (for
``kl`` and ``soft`` the candidate sentences depend on the ground truth only), so their scores
arrive while the current batch trains. ``annotate`` waits at most ``deadline_s``; when the scores
are late or the teacher is down the batch trains without its ITM term and is counted (``skip``,
the default) or training stops (``fail``).

The prefetcher offers the ``TeacherScores`` interface the training loop uses (``enabled``,
``description``, ``stats``, ``annotate``, ``triplet_margins``, ``close``), so it drops in for it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from student.teacher.scores import TeacherScores
from student.teacher.types import BatchScores, ScorePlan
from teacher_server.errors import TeacherError

log = logging.getLogger(__name__)


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
