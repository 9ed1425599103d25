"""Prometheus metrics of one teacher service, in a registry the service owns.

A registry per service (not the process-global default) lets tests and benches run several
services in one process without "duplicated timeseries" errors. Names are stable and prefixed
``hoidistill_teacher_``; the HTTP server exposes ``render()`` at ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "hoidistill_teacher"

# Queue waits from sub-millisecond (idle server) to many seconds (overload on CPU).
_QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Sentences per engine call, up to beyond the default max_batch_sentences (256).
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServiceMetrics:
    """Every metric of the service; transports call ``observe_request`` once per RPC."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "requests answered, by method and status code", ["method", "code"], registry=r
        )
        self.errors = Counter(
            f"{PREFIX}_errors", "requests answered with a status other than OK", ["method", "code"], registry=r
        )
        self.queue_seconds = Histogram(
            f"{PREFIX}_queue_seconds",
            "time a work item waited in the batcher before its engine call",
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.batch_sentences = Histogram(
            f"{PREFIX}_batch_sentences", "(image, sentence) pairs per engine call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.sentences_scored = Counter(
            f"{PREFIX}_sentences_scored", "distinct (image, sentence) pairs run through the engine", registry=r
        )
        self.images_encoded = Counter(
            f"{PREFIX}_images_encoded", "images run through the vision encoder (vision-LRU misses)", registry=r
        )
        self.cache_hits = Counter(f"{PREFIX}_cache_hits", "scores answered from the score cache", registry=r)
        self.cache_misses = Counter(f"{PREFIX}_cache_misses", "scores not in the score cache", registry=r)
        self.redis_errors = Counter(
            f"{PREFIX}_redis_errors", "failed Redis operations (the service then answers uncached)", registry=r
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected",
            "work refused before scoring, by reason (queue_full, shutting_down)",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            f"{PREFIX}_dropped",
            "queued work items dropped unscored, by reason (deadline, cancelled)",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge(f"{PREFIX}_inflight", "score requests being handled now", registry=r)
        self.queue_items = Gauge(
            f"{PREFIX}_queue_items", "work items admitted and not yet taken by an engine", registry=r
        )
        self.queue_pairs = Gauge(
            f"{PREFIX}_queue_pairs", "(image, sentence) pairs admitted and not yet taken by an engine", registry=r
        )
        self.queue_bytes = Gauge(
            f"{PREFIX}_queue_bytes",
            "bytes of image data held by admitted work not yet taken by an engine (files being decoded, "
            "prepared pixel tensors)",
            registry=r,
        )
        self.batch_images = Histogram(
            f"{PREFIX}_batch_images", "distinct image views per engine call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.single_flight_pairs = Counter(
            f"{PREFIX}_single_flight_pairs",
            "pairs a request awaited from a computation already queued or running instead of queueing them again",
            registry=r,
        )
        self.device_oom = Counter(
            f"{PREFIX}_device_oom",
            "engine calls that ran out of device memory (each is retried in halves)",
            registry=r,
        )
        self.ready = Gauge(
            f"{PREFIX}_ready", "1 when the service accepts work, 0 while starting or draining", registry=r
        )

    def observe_request(self, method: str, code: str) -> None:
        """Count one answered request; ``code`` is the gRPC status name (``OK``, ``INVALID_ARGUMENT``)
        or the HTTP status as text."""
        self.requests.labels(method=method, code=code).inc()
        if not (code == "OK" or (code.isdigit() and code.startswith(("2", "3")))):
            self.errors.labels(method=method, code=code).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its content type (for ``/metrics``)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample by its full name (``hoidistill_teacher_images_encoded_total``);
        0.0 when absent. For tests, benches and logs."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found
