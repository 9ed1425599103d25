"""Score cache: Redis (shared by every replica and trainer) or an in-process LRU, one interface.

Layout (see ``docs/cache.md``): one Redis hash per (model fingerprint, image digest),

    key   = hoidistill:score:v1:<fingerprint>:{<sha256 hex of the image file>}
    field = the sentence, UTF-8
    value = struct '<ff' = (match_logit, match_prob), 8 bytes little-endian float32

The braces are a Redis Cluster hash tag: all sentences of one image live in one slot, and one
``HMGET`` reads them. A human-object region of the image (``teacher_server.hoi.region``) has its
own hash, ``...:{<digest>}:r=<canonical region>`` (eight whole pixels): in the image's slot, and
never confused with the whole image's or another region's scores. Values are parsed with
``struct`` only (never unpickled); anything that is not 8 bytes of two finite floats with a
probability in [0, 1] reads as a miss.

Redis is an accelerator, never a dependency: when it is unreachable, lookups answer "all miss",
writes are dropped, the outage is logged once and counted, and Redis is tried again after a
back-off window (the asyncio flavour probes in the background, so no request waits for a dead
Redis). Both a sync flavour (the trainer's read-through) and an asyncio flavour (the service)
exist; they share the codec, the command building and the outage bookkeeping below.

The digest itself (``image_digest``, ``is_digest``) lives in ``teacher_server.hoi.digest``, which
imports neither redis nor torch. This module must not import torch: the student's data loader
imports it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff

from teacher_server.hoi.region import split_view

log = logging.getLogger(__name__)

KEY_PREFIX = "hoidistill:score:v1"
VALUE = struct.Struct("<ff")  # (match_logit, match_prob)
_FINGERPRINT = re.compile(r"[0-9A-Za-z._-]{1,64}")
# Raised by a whole round trip: Redis is not usable right now (refused, reset, timeout, loading).
_OUTAGE_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)
# The same conditions reported per command inside a pipeline reply (a cluster node down, ...).
# Other per-command errors (WRONGTYPE on a foreign key, OOM on write) only miss that key.
_REPLY_OUTAGES = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    redis_errors.TryAgainError,
)


@dataclass(frozen=True)
class CachedScore:
    """One cached (image, sentence) score, as the engine's ``ItmScore`` (same field names)."""

    match_logit: float
    match_prob: float


# A lookup: (image view id, sentences) -> one result per sentence, None = miss. A view id is the
# image digest, or ``<digest>/<canonical region>`` for one human-object pair (``view_id``).
Query = tuple[str, Sequence[str]]
# A write: (image view id, sentence -> score).
Entry = tuple[str, Mapping[str, Any]]


# --------------------------------------------------------------------------------------- codec
def score_key(fingerprint: str, view: str) -> str:
    """The Redis key of one image view's scores under one model fingerprint.

    ``fingerprint``: the engine's short model hash ([0-9A-Za-z._-], at most 64 characters; no
    braces or colons, so the digest is the only hash tag). ``view``: the image digest (64
    lowercase hex), or ``<digest>/<canonical region>`` for one human-object pair of it.
    """
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"fingerprint {fingerprint!r} must be 1-64 characters of [0-9A-Za-z._-]")
    try:
        digest, region = split_view(view)
    except ValueError:
        raise ValueError(
            f"digest {view!r:.140} must be a SHA-256 hex digest (64 lowercase hex characters), "
            "optionally followed by '/' and a canonical region"
        ) from None
    key = f"{KEY_PREFIX}:{fingerprint}:{{{digest}}}"
    return key if region is None else f"{key}:r={region}"


def sentence_field(sentence: str) -> bytes:
    """The hash field of a sentence: its UTF-8 bytes (lone surrogates kept, not an error)."""
    return sentence.encode("utf-8", "surrogatepass")


def encode_score(match_logit: float, match_prob: float) -> bytes:
    """8 bytes: the two values as little-endian float32."""
    return VALUE.pack(match_logit, match_prob)


def decode_score(raw: bytes | None) -> CachedScore | None:
    """The score in ``raw``, or None (a miss) for anything that is not a well-formed value."""
    if raw is None or len(raw) != VALUE.size:
        return None
    logit, prob = VALUE.unpack(raw)
    if not (math.isfinite(logit) and 0.0 <= prob <= 1.0):  # NaN fails the range check too
        return None
    return CachedScore(logit, prob)


def round_trip(match_logit: float, match_prob: float) -> CachedScore:
    """A score exactly as the cache will return it (float32), so fresh and cached answers agree."""
    decoded = decode_score(encode_score(match_logit, match_prob))
    if decoded is None:
        raise ValueError(
            f"score ({match_logit}, {match_prob}) is not cacheable: non-finite or probability outside [0, 1]"
        )
    return decoded


def redacted_url(url: str) -> str:
    """The URL with its password (``user:pass@`` or a ``password=`` query) replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        parts = parts._replace(netloc=user + netloc)
    if "password=" in parts.query:
        parts = parts._replace(query=re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query))
    return urlunsplit(parts)


# ------------------------------------------------------------------------------------- counters
@dataclass
class CacheStats:
    """Monotonic counters of one cache (the service exports them as metrics)."""

    hits: int = 0
    misses: int = 0
    redis_errors: int = 0
    """Failed Redis operations (commands and probes)."""
    outages: int = 0
    """Transitions from reachable to unreachable."""
    skipped: int = 0
    """Operations answered without trying Redis because it was in its back-off window."""
    probes: int = 0
    """Probe tickets handed out while Redis was down (one per elapsed back-off window)."""

    def count(self, results: Sequence[Sequence[CachedScore | None]]) -> None:
        for row in results:
            hits = sum(score is not None for score in row)
            self.hits += hits
            self.misses += len(row) - hits


class RedisHealth:
    """Outage bookkeeping: log once per outage, count errors, gate retries by a back-off window.

    While Redis is down, ``take_probe()`` hands out one probe per window (so only one caller
    pays a connection attempt); each failed probe doubles the window up to ``backoff_max_s``.
    Failures of operations that were already in flight when Redis went away (they passed the
    breaker while it was up) are counted but move neither the window nor the next probe: eight
    concurrent requests failing together are one outage, not eight failed probes.
    """

    def __init__(
        self,
        name: str,
        stats: CacheStats,
        *,
        backoff_s: float,
        backoff_max_s: float,
        on_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.stats = stats
        self.backoff_s = backoff_s
        self.backoff_max_s = max(backoff_max_s, backoff_s)
        self._on_error = on_error
        self._clock = clock
        self._lock = threading.Lock()
        self._up = True
        self._window = backoff_s
        self._retry_at = 0.0
        self._probe_out = False  # a probe ticket is out; its failure (and only it) doubles the window
        self._logged_kinds: set[str] = set()

    @property
    def up(self) -> bool:
        return self._up

    @property
    def window_s(self) -> float:
        """The current back-off window: ``backoff_s`` after an outage began, doubled per failed probe."""
        return self._window

    def take_probe(self) -> bool:
        """While down: True once per elapsed back-off window (the caller then tries Redis)."""
        with self._lock:
            if self._up:
                return True
            now = self._clock()
            if now < self._retry_at:
                self.stats.skipped += 1
                return False
            self._retry_at = now + self._window  # the ticket: others skip until it has run
            self._probe_out = True
            self.stats.probes += 1
            return True

    def failed(self, error: BaseException) -> None:
        """Count a failed Redis operation; go down, or back off further after a failed probe."""
        with self._lock:
            self.stats.redis_errors += 1
            if self._up:
                self._up = False
                self._window = self.backoff_s
                self._retry_at = self._clock() + self._window
                self._probe_out = False
                self.stats.outages += 1
                log.warning(
                    "Redis score cache at %s is unreachable (%s: %s); serving without the cache and "
                    "retrying every %.3g-%.3g s",
                    self.name,
                    type(error).__name__,
                    error,
                    self.backoff_s,
                    self.backoff_max_s,
                    extra={"redis": self.name, "error": f"{type(error).__name__}: {error}"},
                )
            elif self._probe_out:  # the probe of this window failed: wait twice as long
                self._probe_out = False
                self._window = min(self._window * 2, self.backoff_max_s)
                self._retry_at = self._clock() + self._window
                log.debug("Redis at %s still unreachable: %s", self.name, error)
            # else: an operation that was in flight when Redis went away; counted, nothing more.
        if self._on_error is not None:
            self._on_error(error)

    def command_errors(self, errors: Sequence[Exception]) -> None:
        """Per-command errors in a reply (the key misses): counted, each kind logged once."""
        with self._lock:
            self.stats.redis_errors += len(errors)
            new = {type(e).__name__: e for e in errors if type(e).__name__ not in self._logged_kinds}
            self._logged_kinds.update(new)
        for kind, error in new.items():
            log.warning(
                "Redis at %s refused a score-cache command (%s: %s); that command is skipped for such keys: "
                "a read is a miss, a write or TTL renewal is dropped (logged once per kind)",
                self.name,
                kind,
                error,
            )
        if self._on_error is not None:
            for error in errors:
                self._on_error(error)

    def check(self, replies: Sequence[Any]) -> None:
        """Raise the first outage-like error of a pipeline reply; count the other errors."""
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        for error in errors:
            if isinstance(error, _REPLY_OUTAGES):
                raise error
        if errors:
            self.command_errors(errors)

    def succeeded(self) -> None:
        with self._lock:
            self._probe_out = False
            if self._up:
                return
            self._up = True
            self._window = self.backoff_s
        log.warning("Redis score cache at %s is reachable again; using it", self.name)


def _queue_lookups(
    pipe: Any, fingerprint: str, queries: Sequence[Query], refresh_ttl_s: int | None = None
) -> list[int]:
    """Queue one HMGET per query with sentences; returns the indices of the queued queries.

    With ``refresh_ttl_s``, each HMGET is followed by ``EXPIRE key refresh_ttl_s`` in the same
    pipeline (no extra round trip): a read renews the image's lifetime as a write does. EXPIRE on
    a key that does not exist does nothing, so a miss creates no key.
    """
    queued = []
    for index, (digest, sentences) in enumerate(queries):
        if sentences:
            key = score_key(fingerprint, digest)
            pipe.hmget(key, [sentence_field(s) for s in sentences])
            if refresh_ttl_s is not None:
                pipe.expire(key, refresh_ttl_s)
            queued.append(index)
    return queued


def _decode_lookups(
    queries: Sequence[Query], queued: list[int], replies: Sequence[Any], *, refreshed: bool = False
) -> list[list[CachedScore | None]]:
    """The scores of the HMGET replies (with ``refreshed``, every other reply is an EXPIRE's)."""
    results: list[list[CachedScore | None]] = [[None] * len(sentences) for _, sentences in queries]
    for index, reply in zip(queued, replies[::2] if refreshed else replies, strict=True):
        if isinstance(reply, Exception):  # e.g. WRONGTYPE: someone else's key; a miss (counted)
            continue
        results[index] = [decode_score(raw) for raw in reply]
    return results


def _queue_writes(pipe: Any, fingerprint: str, entries: Sequence[Entry], ttl_s: int) -> int:
    """Queue HSET + EXPIRE per image (entries of the same image merged); returns commands queued."""
    merged: dict[str, dict[bytes, bytes]] = {}
    for digest, scores in entries:
        fields = merged.setdefault(digest, {})
        for sentence, score in scores.items():
            fields[sentence_field(sentence)] = encode_score(score.match_logit, score.match_prob)
    for digest, fields in merged.items():
        if fields:
            key = score_key(fingerprint, digest)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, ttl_s)  # every write renews the image's lifetime
    return sum(2 for fields in merged.values() if fields)


def _client_options(timeout_s: float, retry_class: type) -> dict[str, Any]:
    """Short timeouts and one immediate retry instead of redis-py's default retries with back-off.

    The retry lets a restarted Redis be picked up on a fresh connection without an error; a dead
    one fails within about 2 x timeout (a refused connection at once), and then the back-off
    window keeps later requests from trying at all.
    """
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": retry_class(NoBackoff(), 1),
    }


# ----------------------------------------------------------------------------------- interfaces
class ScoreCache(ABC):
    """Synchronous score cache (the trainer's read-through)."""

    backend: str
    stats: CacheStats

    @abstractmethod
    def lookup(self, fingerprint: str, queries: Sequence[Query]) -> list[list[CachedScore | None]]:
        """Per query, per sentence: the cached score or None. Never raises for an outage.

        ``queries``: (image digest, sentences) pairs; ``ValueError`` for a digest or fingerprint
        that ``score_key`` refuses (callers validate digests first).
        """

    @abstractmethod
    def store(self, fingerprint: str, entries: Sequence[Entry]) -> None:
        """Write scores (objects with ``match_logit`` and ``match_prob``). Dropped during an outage."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""


class AsyncScoreCache(ABC):
    """Asyncio score cache (the service)."""

    backend: str
    stats: CacheStats

    @abstractmethod
    async def lookup(self, fingerprint: str, queries: Sequence[Query]) -> list[list[CachedScore | None]]:
        """Per query, per sentence: the cached score or None. Never raises for an outage."""

    @abstractmethod
    async def store(self, fingerprint: str, entries: Sequence[Entry]) -> None:
        """Write scores. Dropped during an outage."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# -------------------------------------------------------------------------------- local backend
class LocalScoreCache(ScoreCache):
    """In-process LRU of encoded values, bounded by ``max_entries`` (image, sentence) pairs.

    Values go through the same codec as Redis, so both backends answer identically. Thread-safe.
    ``max_entries=0`` disables caching.
    """

    backend = "local"

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, fingerprint: str, queries: Sequence[Query]) -> list[list[CachedScore | None]]:
        results = []
        with self._lock:
            for digest, sentences in queries:
                row = []
                for sentence in sentences:
                    key = (fingerprint, digest, sentence)
                    raw = self._entries.get(key)
                    if raw is not None:
                        self._entries.move_to_end(key)
                    row.append(decode_score(raw))
                results.append(row)
            self.stats.count(results)
        return results

    def store(self, fingerprint: str, entries: Sequence[Entry]) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            for digest, scores in entries:
                for sentence, score in scores.items():
                    key = (fingerprint, digest, sentence)
                    self._entries[key] = encode_score(score.match_logit, score.match_prob)
                    self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def put_raw(self, fingerprint: str, digest: str, sentence: str, raw: bytes) -> None:
        """Store an already-encoded value as is (tests use it to plant corrupted values)."""
        with self._lock:
            self._entries[(fingerprint, digest, sentence)] = raw


class AsyncLocalScoreCache(AsyncScoreCache):
    """The in-process LRU behind the asyncio interface (its operations take microseconds)."""

    backend = "local"

    def __init__(self, local: LocalScoreCache) -> None:
        self.local = local
        self.stats = local.stats

    async def lookup(self, fingerprint: str, queries: Sequence[Query]) -> list[list[CachedScore | None]]:
        return self.local.lookup(fingerprint, queries)

    async def store(self, fingerprint: str, entries: Sequence[Entry]) -> None:
        self.local.store(fingerprint, entries)


# -------------------------------------------------------------------------------- Redis backend
class RedisScoreCache(ScoreCache):
    """Sync Redis backend: one pipelined round trip per lookup or store.

    During an outage one caller per back-off window probes inline (bounded by the socket
    timeout); the others answer at once without Redis.
    """

    backend = "redis"

    def __init__(
        self,
        client: redis.Redis | Any,
        *,
        ttl_s: int,
        name: str = "redis",
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        on_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_ttl_on_read: bool = False,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.refresh_ttl_on_read = refresh_ttl_on_read
        self.stats = CacheStats()
        self.health = RedisHealth(
            name, self.stats, backoff_s=backoff_s, backoff_max_s=backoff_max_s, on_error=on_error, clock=clock
        )

    @property
    def _refresh_ttl_s(self) -> int | None:
        return self.ttl_s if self.refresh_ttl_on_read else None

    @classmethod
    def from_url(
        cls, url: str, *, ttl_s: int, timeout_s: float = 0.5, cluster: bool = False, **options: Any
    ) -> RedisScoreCache:
        """Connect lazily (the first command connects) to a Redis or Redis Cluster URL."""
        from redis.cluster import RedisCluster
        from redis.retry import Retry

        client_class = RedisCluster if cluster else redis.Redis
        client = client_class.from_url(url, **_client_options(timeout_s, Retry))
        return cls(client, ttl_s=ttl_s, name=redacted_url(url), **options)

    def lookup(self, fingerprint: str, queries: Sequence[Query]) -> list[list[CachedScore | None]]:
        misses: list[list[CachedScore | None]] = [[None] * len(sentences) for _, sentences in queries]
        if not any(sentences for _, sentences in queries) or not self.health.take_probe():
            self.stats.count(misses)
            return misses
        try:
            pipe = self.client.pipeline(transaction=False)
            queued = _queue_lookups(pipe, fingerprint, queries, self._refresh_ttl_s)
            replies = pipe.execute(raise_on_error=False)
            self.health.check(replies)
            results = _decode_lookups(queries, queued, replies, refreshed=self.refresh_ttl_on_read)
        except _OUTAGE_ERRORS as error:
            self.health.failed(error)
            results = misses
        else:
            self.health.succeeded()
        self.stats.count(results)
        return results

    def store(self, fingerprint: str, entries: Sequence[Entry]) -> None:
        if not any(scores for _, scores in entries) or not self.health.take_probe():
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            _queue_writes(pipe, fingerprint, entries, self.ttl_s)
            self.health.check(pipe.execute(raise_on_error=False))
        except _OUTAGE_ERRORS as error:
            self.health.failed(error)
        else:
            self.health.succeeded()

    def close(self) -> None:
        self.client.close()


class AsyncRedisScoreCache(AsyncScoreCache):
    """Asyncio Redis backend. During an outage requests never touch Redis: a background task
    probes it (``PING``) once per back-off window and switches the cache back on when it answers.
    """

    backend = "redis"

    def __init__(
        self,
        client: redis.asyncio.Redis | Any,
        *,
        ttl_s: int,
        name: str = "redis",
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        on_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_ttl_on_read: bool = False,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.refresh_ttl_on_read = refresh_ttl_on_read
        self.stats = CacheStats()
        self.health = RedisHealth(
            name, self.stats, backoff_s=backoff_s, backoff_max_s=backoff_max_s, on_error=on_error, clock=clock
        )
        self._probe_task: asyncio.Task | None = None

    @property
    def _refresh_ttl_s(self) -> int | None:
        return self.ttl_s if self.refresh_ttl_on_read else None

    @classmethod
    def from_url(
        cls, url: str, *, ttl_s: int, timeout_s: float = 0.5, cluster: bool = False, **options: Any
    ) -> AsyncRedisScoreCache:
        """Connect lazily (the first command connects) to a Redis or Redis Cluster URL."""
        from redis.asyncio.cluster import RedisCluster
        from redis.asyncio.retry import Retry

        client_class = RedisCluster if cluster else redis.asyncio.Redis
        client = client_class.from_url(url, **_client_options(timeout_s, Retry))
        return cls(client, ttl_s=ttl_s, name=redacted_url(url), **options)

    def _usable(self) -> bool:
        """True when Redis is believed up; else maybe start a background probe and say False."""
        if self.health.up:
            return True
        if self.health.take_probe() and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe())
        return False

    async def _probe(self) -> None:
        try:
            await self.client.ping()
        except _OUTAGE_ERRORS as error:
            self.health.failed(error)
        else:
            self.health.succeeded()

    async def lookup(self, fingerprint: str, queries: Sequence[Query]) -> list[list[CachedScore | None]]:
        misses: list[list[CachedScore | None]] = [[None] * len(sentences) for _, sentences in queries]
        if not any(sentences for _, sentences in queries) or not self._usable():
            self.stats.count(misses)
            return misses
        try:
            pipe = self.client.pipeline(transaction=False)
            queued = _queue_lookups(pipe, fingerprint, queries, self._refresh_ttl_s)
            replies = await pipe.execute(raise_on_error=False)
            self.health.check(replies)
            results = _decode_lookups(queries, queued, replies, refreshed=self.refresh_ttl_on_read)
        except _OUTAGE_ERRORS as error:
            self.health.failed(error)
            results = misses
        self.stats.count(results)
        return results

    async def store(self, fingerprint: str, entries: Sequence[Entry]) -> None:
        if not any(scores for _, scores in entries) or not self._usable():
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            _queue_writes(pipe, fingerprint, entries, self.ttl_s)
            self.health.check(await pipe.execute(raise_on_error=False))
        except _OUTAGE_ERRORS as error:
            self.health.failed(error)

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        await self.client.aclose()


# ------------------------------------------------------------------------------------ factories
def open_score_cache(
    redis_url: str | None,
    *,
    ttl_s: int = 7 * 24 * 3600,
    local_entries: int = 200_000,
    timeout_s: float = 0.5,
    backoff_s: float = 1.0,
    backoff_max_s: float = 30.0,
    cluster: bool = False,
    on_error: Callable[[BaseException], None] | None = None,
    refresh_ttl_on_read: bool = False,
) -> ScoreCache:
    """Redis when ``redis_url`` is given, else the in-process LRU (sync flavour).

    ``refresh_ttl_on_read``: a lookup renews each looked-up image's TTL (docs/cache.md: the cost).
    """
    if redis_url is None:
        return LocalScoreCache(local_entries)
    return RedisScoreCache.from_url(
        redis_url,
        ttl_s=ttl_s,
        timeout_s=timeout_s,
        cluster=cluster,
        backoff_s=backoff_s,
        backoff_max_s=backoff_max_s,
        on_error=on_error,
        refresh_ttl_on_read=refresh_ttl_on_read,
    )


def open_async_score_cache(
    redis_url: str | None,
    *,
    ttl_s: int = 7 * 24 * 3600,
    local_entries: int = 200_000,
    timeout_s: float = 0.5,
    backoff_s: float = 1.0,
    backoff_max_s: float = 30.0,
    cluster: bool = False,
    on_error: Callable[[BaseException], None] | None = None,
    refresh_ttl_on_read: bool = False,
) -> AsyncScoreCache:
    """Redis when ``redis_url`` is given, else the in-process LRU (asyncio flavour); options as
    ``open_score_cache``."""
    if redis_url is None:
        return AsyncLocalScoreCache(LocalScoreCache(local_entries))
    return AsyncRedisScoreCache.from_url(
        redis_url,
        ttl_s=ttl_s,
        timeout_s=timeout_s,
        cluster=cluster,
        backoff_s=backoff_s,
        backoff_max_s=backoff_max_s,
        on_error=on_error,
        refresh_ttl_on_read=refresh_ttl_on_read,
    )
