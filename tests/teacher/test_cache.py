"""Score cache: codec, in-process LRU, real Redis (sync and asyncio), outages, Redis Cluster."""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st
from testkit.servers import RedisServer, free_port

from teacher_server.cache import (
    KEY_PREFIX,
    AsyncLocalScoreCache,
    AsyncRedisScoreCache,
    CachedScore,
    CacheStats,
    LocalScoreCache,
    RedisHealth,
    RedisScoreCache,
    decode_score,
    encode_score,
    open_async_score_cache,
    open_score_cache,
    redacted_url,
    round_trip,
    score_key,
)
from teacher_server.hoi.digest import image_digest, is_digest
from teacher_server.hoi.region import Region, view_id

FP = "fp0001"
OTHER_FP = "fp0002"
D1 = "1" * 64
D2 = "2" * 64
D3 = "3" * 64
S1 = CachedScore(1.25, 0.75)
S2 = CachedScore(-3.5, 0.03125)


class FakeClock:
    """A monotonic clock the test moves by hand: back-off windows without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unique_fp(request: pytest.FixtureRequest) -> str:
    """A fingerprint per test, so tests sharing the session Redis never see each other's keys."""
    return "t" + str(abs(hash(request.node.nodeid)))[:20]


# ------------------------------------------------------------------------------------------ codec
def test_key_scheme_is_versioned_and_tags_the_digest() -> None:
    key = score_key("0a1b2c3d4e5f6789", D1)
    assert key == f"hoidistill:score:v1:0a1b2c3d4e5f6789:{{{D1}}}"
    assert key.startswith(KEY_PREFIX + ":")
    # Redis Cluster hashes the text between the first "{" and the next "}": the digest.
    assert key[key.index("{") + 1 : key.index("}")] == D1


def test_a_region_has_its_own_key_in_its_images_hash_tag() -> None:
    pair = Region.from_values([10.4, 5, 60, 90.6, 30, 40, 120, 100])
    key = score_key(FP, view_id(D1, pair))
    assert key == f"{KEY_PREFIX}:{FP}:{{{D1}}}:r=10,5,60,91,30,40,120,100"
    assert key[key.index("{") + 1 : key.index("}")] == D1  # the image's slot
    # Rounded to whole pixels: the same pair of the same ground truth, the same key; another
    # pair or the whole image, another key.
    assert score_key(FP, view_id(D1, Region.from_values([10, 5, 60, 91, 30, 40, 120, 100]))) == key
    other = Region.from_values([10, 5, 60, 91, 30, 40, 121, 100])
    assert len({key, score_key(FP, view_id(D1, other)), score_key(FP, D1)}) == 3


@pytest.mark.parametrize("view", [D1 + "/", D1 + "/1,2,3", D1 + "/1,2,3,4,5,6,7,8.5", D1 + "/a,b,c,d,e,f,g,h"])
def test_key_refuses_malformed_regions(view: str) -> None:
    with pytest.raises(ValueError, match="canonical region"):
        score_key(FP, view)


@pytest.mark.parametrize("fingerprint", ["", "a:b", "a{b}", "x" * 65, "sp ace"])
def test_key_refuses_fingerprints_that_would_break_the_scheme(fingerprint: str) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        score_key(fingerprint, D1)


def test_image_digest_is_sha256_of_the_file_bytes() -> None:
    # FIPS 180-2 test vectors: SHA-256("") and SHA-256("abc").
    assert image_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert image_digest(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert is_digest(image_digest(b"\x89PNG"))
    assert score_key(FP, image_digest(b"abc")) == f"{KEY_PREFIX}:{FP}:{{{image_digest(b'abc')}}}"


@pytest.mark.parametrize("digest", ["", "A" * 64, "1" * 63, "g" * 64, "1" * 64 + "\n"])
def test_key_refuses_non_sha256_digests(digest: str) -> None:
    assert not is_digest(digest)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        score_key(FP, digest)


def test_value_is_two_little_endian_float32() -> None:
    raw = encode_score(1.5, 0.25)
    assert raw == struct.pack("<ff", 1.5, 0.25) and len(raw) == 8
    assert decode_score(raw) == CachedScore(1.5, 0.25)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"\x00" * 7,
        b"\x00" * 9,
        struct.pack("<ff", math.nan, 0.5),
        struct.pack("<ff", math.inf, 0.5),
        struct.pack("<ff", 1.0, math.nan),
        struct.pack("<ff", 1.0, 1.5),
        struct.pack("<ff", 1.0, -0.1),
        b"\x80\x04\x95...",  # a pickle is just 8 wrong bytes to us
        struct.pack("<d", 0.5),
    ],
)
def test_malformed_values_decode_as_misses(raw: bytes | None) -> None:
    assert decode_score(raw) is None


@given(
    logit=st.floats(allow_nan=False, allow_infinity=False, width=32),
    prob=st.floats(min_value=0.0, max_value=1.0, width=32),
)
def test_float32_scores_round_trip_exactly(logit: float, prob: float) -> None:
    assert decode_score(encode_score(logit, prob)) == CachedScore(logit, prob)
    assert round_trip(logit, prob) == CachedScore(logit, prob)


def test_round_trip_refuses_uncacheable_scores() -> None:
    with pytest.raises(ValueError, match="not cacheable"):
        round_trip(math.nan, 0.5)


def test_cache_module_does_not_import_torch() -> None:
    code = "import sys, teacher_server.cache; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ------------------------------------------------------------------------------------------ local
def test_local_cache_stores_and_misses_per_fingerprint() -> None:
    cache = LocalScoreCache(max_entries=100)
    cache.store(FP, [(D1, {"a": S1, "b": S2})])
    assert cache.lookup(FP, [(D1, ["a", "b", "c"]), (D2, ["a"])]) == [[S1, S2, None], [None]]
    assert cache.lookup(OTHER_FP, [(D1, ["a"])]) == [[None]]
    assert (cache.stats.hits, cache.stats.misses) == (2, 3)


def test_local_cache_is_bounded_and_least_recently_used() -> None:
    cache = LocalScoreCache(max_entries=2)
    cache.store(FP, [(D1, {"a": S1, "b": S1})])
    cache.lookup(FP, [(D1, ["a"])])  # "a" is now more recent than "b"
    cache.store(FP, [(D1, {"c": S2})])
    assert len(cache) == 2
    assert cache.lookup(FP, [(D1, ["a", "b", "c"])]) == [[S1, None, S2]]


def test_local_cache_treats_corrupt_value_as_miss_and_can_be_disabled() -> None:
    cache = LocalScoreCache(max_entries=10)
    cache.put_raw(FP, D1, "a", b"garbage")
    assert cache.lookup(FP, [(D1, ["a"])]) == [[None]]
    disabled = LocalScoreCache(max_entries=0)
    disabled.store(FP, [(D1, {"a": S1})])
    assert disabled.lookup(FP, [(D1, ["a"])]) == [[None]]


def test_async_local_cache_answers_like_the_sync_one() -> None:
    async def scenario() -> list[list[CachedScore | None]]:
        cache = open_async_score_cache(None, local_entries=10)
        assert isinstance(cache, AsyncLocalScoreCache) and cache.backend == "local"
        await cache.store(FP, [(D1, {"a": S1})])
        result = await cache.lookup(FP, [(D1, ["a", "b"])])
        await cache.close()
        return result

    assert asyncio.run(scenario()) == [[S1, None]]


# ------------------------------------------------------------------------------------ sync Redis
class CountingRedis(redis.Redis):
    """A real client that counts pipeline round trips."""

    round_trips = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = super().pipeline(*args, **kwargs)
        execute = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            CountingRedis.round_trips += 1
            return execute(*a, **k)

        pipe.execute = counted
        return pipe


def test_redis_store_and_lookup_in_one_round_trip_each(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    fp = unique_fp(request)
    client = CountingRedis.from_url(redis_server.url)
    cache = RedisScoreCache(client, ttl_s=3600)
    CountingRedis.round_trips = 0
    cache.store(fp, [(D1, {"a": S1, "b": S2}), (D2, {"a": S2}), (D1, {"c": S1})])
    assert CountingRedis.round_trips == 1
    result = cache.lookup(fp, [(D1, ["a", "b", "c", "z"]), (D2, ["a"]), (D3, ["a"]), (D3, [])])
    assert CountingRedis.round_trips == 2
    assert result == [[S1, S2, S1, None], [S2], [None], []]
    assert (cache.stats.hits, cache.stats.misses) == (4, 2)
    # The stored layout is exactly the documented one.
    raw = client.hgetall(score_key(fp, D1))
    assert raw == {b"a": encode_score(1.25, 0.75), b"b": encode_score(-3.5, 0.03125), b"c": encode_score(1.25, 0.75)}
    cache.close()


def test_redis_keys_expire_and_each_write_renews_them(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    fp = unique_fp(request)
    cache = RedisScoreCache.from_url(redis_server.url, ttl_s=500)
    cache.store(fp, [(D1, {"a": S1})])
    key = score_key(fp, D1)
    assert 0 < cache.client.ttl(key) <= 500
    cache.client.expire(key, 5)
    cache.store(fp, [(D1, {"b": S2})])
    assert cache.client.ttl(key) > 5
    cache.close()


def test_redis_fingerprints_never_share_scores(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    fp = unique_fp(request)
    cache = RedisScoreCache.from_url(redis_server.url, ttl_s=60)
    cache.store(fp, [(D1, {"a": S1})])
    assert cache.lookup(fp + "x", [(D1, ["a"])]) == [[None]]
    assert cache.lookup(fp, [(D1, ["a"])]) == [[S1]]
    cache.close()


def test_redis_corrupt_values_are_misses(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    fp = unique_fp(request)
    cache = RedisScoreCache.from_url(redis_server.url, ttl_s=60)
    cache.store(fp, [(D1, {"ok": S1})])
    cache.client.hset(
        score_key(fp, D1),
        mapping={
            "short": b"abc",
            "nan": struct.pack("<ff", math.nan, 0.5),
            "prob": struct.pack("<ff", 0.0, 7.0),
        },
    )
    assert cache.lookup(fp, [(D1, ["ok", "short", "nan", "prob"])]) == [[S1, None, None, None]]
    assert cache.health.up and cache.stats.redis_errors == 0  # bad values are not an outage
    cache.close()


def test_redis_wrong_type_key_is_a_counted_miss_not_an_outage(
    redis_server: RedisServer, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    fp = unique_fp(request)
    errors: list[BaseException] = []
    cache = RedisScoreCache.from_url(redis_server.url, ttl_s=60, on_error=errors.append)
    cache.client.set(score_key(fp, D1), b"not a hash")
    cache.store(fp, [(D2, {"a": S1})])
    with caplog.at_level(logging.WARNING, logger="teacher_server.cache"):
        for _ in range(3):
            assert cache.lookup(fp, [(D1, ["a"]), (D2, ["a"])]) == [[None], [S1]]
    assert cache.health.up
    assert cache.stats.redis_errors == 3 and len(errors) == 3
    assert sum("WRONGTYPE" in record.getMessage() for record in caplog.records) == 1
    cache.close()


def test_sync_outage_misses_logs_once_skips_and_comes_back(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    errors: list[BaseException] = []
    cache = open_score_cache(private_redis.url, ttl_s=60, backoff_s=1.0, backoff_max_s=8.0, on_error=errors.append)
    assert isinstance(cache, RedisScoreCache)
    cache.health._clock = clock  # the back-off window moves only when the test says so
    cache.store(FP, [(D1, {"a": S1})])
    assert cache.lookup(FP, [(D1, ["a"])]) == [[S1]]

    private_redis.stop()
    with caplog.at_level(logging.WARNING, logger="teacher_server.cache"):
        for _ in range(5):
            assert cache.lookup(FP, [(D1, ["a"])]) == [[None]]  # answered, never raised
            cache.store(FP, [(D2, {"b": S2})])  # dropped
        assert not cache.health.up
        # One attempt failed; every later call inside the window did not even try Redis.
        assert cache.stats.redis_errors == 1 and len(errors) == 1
        assert cache.stats.skipped == 9 and cache.stats.outages == 1
        clock.now += 1.0  # the window has passed: the next call probes (and fails again)
        assert cache.lookup(FP, [(D1, ["a"])]) == [[None]]
        assert cache.stats.redis_errors == 2

        private_redis.start()  # a fresh, empty Redis on the same port
        clock.now += 2.0  # past the doubled window
        assert cache.lookup(FP, [(D1, ["a"])]) == [[None]]  # reachable; the old data is gone
        assert cache.health.up
        cache.store(FP, [(D2, {"b": S2})])
        assert cache.lookup(FP, [(D2, ["b"])]) == [[S2]]
    messages = [record.getMessage() for record in caplog.records]
    assert sum("unreachable" in message for message in messages) == 1
    assert sum("reachable again" in message for message in messages) == 1
    assert cache.stats.outages == 1
    cache.close()


def test_redis_password_is_not_logged() -> None:
    port = free_port()  # nothing listens: the first lookup fails and logs the URL
    cache = RedisScoreCache.from_url(f"redis://user:hunter2@127.0.0.1:{port}/0", ttl_s=60)
    assert "hunter2" not in cache.health.name and "***" in cache.health.name
    assert cache.lookup(FP, [(D1, ["a"])]) == [[None]]
    cache.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@h:6379/0", "redis://user:***@h:6379/0"),
        ("rediss://:hunter2@h:6380/1?ssl_ca_certs=/ca.pem", "rediss://:***@h:6380/1?ssl_ca_certs=/ca.pem"),
        ("redis://h:6379/0?db=1&password=hunter2", "redis://h:6379/0?db=1&password=***"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redacted_url_hides_every_form_of_password(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


# ------------------------------------------------------------------------------------ health logic
def test_health_hands_out_one_probe_per_window_doubling_to_the_cap() -> None:
    clock = FakeClock()
    stats = CacheStats()
    health = RedisHealth("r", stats, backoff_s=1.0, backoff_max_s=4.0, clock=clock)
    assert health.take_probe() and health.take_probe()  # up: always
    health.failed(OSError("down"))
    windows = []
    for _ in range(4):
        start = clock.now
        while not health.take_probe():
            clock.now += 0.25
        windows.append(clock.now - start)
        assert not health.take_probe()  # the ticket is taken: others skip
        health.failed(OSError("still down"))
    assert windows == [1.0, 2.0, 4.0, 4.0]
    health.succeeded()
    assert health.up and stats.outages == 1 and stats.redis_errors == 5
    health.failed(OSError("down again"))
    assert stats.outages == 2
    clock.now += 1.0
    assert health.take_probe()  # the window restarted at its base after the recovery


# ----------------------------------------------------------------------------------- async Redis
def test_async_redis_round_trip_and_corruption(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    fp = unique_fp(request)

    async def scenario() -> None:
        cache = open_async_score_cache(redis_server.url, ttl_s=60)
        assert isinstance(cache, AsyncRedisScoreCache) and cache.backend == "redis"
        await cache.store(fp, [(D1, {"a": S1, "b": S2})])
        assert await cache.lookup(fp, [(D1, ["a", "b", "c"]), (D2, ["a"])]) == [[S1, S2, None], [None]]
        await cache.client.hset(score_key(fp, D1), "a", b"\xff" * 8)
        assert await cache.lookup(fp, [(D1, ["a", "b"])]) == [[None, S2]]
        assert await cache.lookup(OTHER_FP, [(D1, ["b"])]) == [[None]]
        await cache.close()

    asyncio.run(scenario())


def test_async_outage_probes_in_the_background_and_recovers(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        cache = AsyncRedisScoreCache(
            redis.asyncio.Redis.from_url(private_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5),
            ttl_s=60,
            backoff_s=1.0,
            clock=clock,
        )
        await cache.store(FP, [(D1, {"a": S1})])
        private_redis.stop()
        with caplog.at_level(logging.WARNING, logger="teacher_server.cache"):
            for _ in range(4):
                assert await cache.lookup(FP, [(D1, ["a"])]) == [[None]]
            assert cache.stats.redis_errors == 1 and cache.stats.skipped == 3
            private_redis.start()
            clock.now += 1.0
            # The request does not wait for Redis: it answers "miss" and a probe runs behind it.
            assert await cache.lookup(FP, [(D1, ["a"])]) == [[None]]
            assert cache._probe_task is not None
            await cache._probe_task
            assert cache.health.up
            await cache.store(FP, [(D2, {"b": S2})])
            assert await cache.lookup(FP, [(D2, ["b"])]) == [[S2]]
        messages = [record.getMessage() for record in caplog.records]
        assert sum("unreachable" in message for message in messages) == 1
        assert sum("reachable again" in message for message in messages) == 1
        await cache.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------- Redis Cluster
@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[str]:
    """A real one-node Redis Cluster (all 16384 slots on one node) on a free port."""
    port = free_port()
    process = subprocess.Popen(
        # The cluster bus defaults to port + 10000, past 65535 for high ephemeral ports: name it.
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--cluster-port",
            str(free_port()),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(tmp_path / "nodes.conf"),
            "--dir",
            str(tmp_path),
            "--logfile",
            str(tmp_path / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        client = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log_text = (tmp_path / "redis.log").read_text(errors="replace")
                pytest.fail(f"redis-server (cluster mode) exited: {log_text[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    client = redis.Redis(port=port)
                    break
            except OSError:
                time.sleep(0.05)
        assert client is not None, "redis-server (cluster mode) did not start"
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster never reached cluster_state:ok"
            time.sleep(0.1)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_redis_cluster_keeps_an_image_in_one_slot_and_works_sync_and_async(redis_cluster: str) -> None:
    cache = open_score_cache(redis_cluster, ttl_s=60, cluster=True)
    assert isinstance(cache, RedisScoreCache)
    cache.store(FP, [(D1, {"a": S1}), (D2, {"b": S2})])  # different slots, one pipeline
    assert cache.lookup(FP, [(D1, ["a"]), (D2, ["b", "c"])]) == [[S1], [S2, None]]
    # The hash tag puts every fingerprint's key of an image in the digest's slot.
    slot = cache.client.keyslot(D1)
    assert cache.client.keyslot(score_key(FP, D1)) == cache.client.keyslot(score_key(OTHER_FP, D1)) == slot
    assert cache.client.keyslot(score_key(FP, D2)) != slot
    # A region of the image is in the image's slot too, and is read and written beside it.
    pair = view_id(D1, Region.from_values([1, 2, 3, 4, 5, 6, 7, 8]))
    assert cache.client.keyslot(score_key(FP, pair)) == slot
    cache.store(FP, [(pair, {"a": S2})])
    assert cache.lookup(FP, [(D1, ["a"]), (pair, ["a"])]) == [[S1], [S2]]
    cache.close()

    async def scenario() -> list[list[CachedScore | None]]:
        async_cache = open_async_score_cache(redis_cluster, ttl_s=60, cluster=True)
        result = await async_cache.lookup(FP, [(D1, ["a"]), (D2, ["b"])])
        await async_cache.close()
        return result

    assert asyncio.run(scenario()) == [[S1], [S2]]


# ------------------------------------------------------------- back-off per probe, not per request
def test_concurrent_failures_back_off_once_per_probe_not_per_request(private_redis: RedisServer) -> None:
    # Issue 15: requests already in flight when Redis died each doubled the back-off, so 8 of them
    # pushed it from 1 s to the 30 s cap and a 10 s Redis restart cost 30 s without the cache.
    clock = FakeClock()
    in_flight = 8

    async def scenario() -> None:
        cache = AsyncRedisScoreCache(
            redis.asyncio.Redis.from_url(private_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5),
            ttl_s=60,
            backoff_s=1.0,
            backoff_max_s=30.0,
            clock=clock,
        )
        await cache.store(FP, [(D1, {"a": S1})])
        private_redis.stop()
        # All eight pass the breaker while Redis is believed up, then all fail.
        rows = await asyncio.gather(*(cache.lookup(FP, [(D1, ["a"])]) for _ in range(in_flight)))
        assert rows == [[[None]]] * in_flight
        assert cache.stats.redis_errors == in_flight and cache.stats.outages == 1
        assert not cache.health.up and cache.stats.probes == 0

        private_redis.start()  # back before the first window ends (an empty Redis, same port)
        clock.now += 1.0  # one back-off period: the first step, not 2^7 of them
        assert await cache.lookup(FP, [(D1, ["a"])]) == [[None]]  # answered at once; a probe starts
        assert cache._probe_task is not None, "no probe after one back-off period"
        await cache._probe_task
        assert cache.health.up and cache.stats.probes == 1
        await cache.store(FP, [(D2, {"b": S2})])
        assert await cache.lookup(FP, [(D2, ["b"])]) == [[S2]]  # the cache is used again
        await cache.close()

    asyncio.run(scenario())


def test_health_doubles_per_failed_probe_not_per_failure_in_flight() -> None:
    clock = FakeClock()
    stats = CacheStats()
    health = RedisHealth("r", stats, backoff_s=1.0, backoff_max_s=30.0, clock=clock)
    for _ in range(8):  # eight requests that were in flight when Redis went away
        health.failed(OSError("down"))
    assert health.window_s == 1.0 and stats.redis_errors == 8 and stats.outages == 1
    clock.now += 0.5
    health.failed(OSError("late reply"))  # does not push the next probe out either
    clock.now += 0.5
    assert health.take_probe() and stats.probes == 1  # one window after the outage began
    health.failed(OSError("probe failed"))  # the probe's own failure: the window doubles
    health.failed(OSError("another late reply"))  # a failure that held no ticket: no doubling
    assert health.window_s == 2.0
    clock.now += 2.0
    assert health.take_probe() and not health.take_probe()
    health.failed(OSError("probe failed"))
    assert health.window_s == 4.0 and stats.probes == 2


# ----------------------------------------------------------------------------- TTL refresh on read
@pytest.mark.parametrize("refresh", [True, False])
def test_a_hit_renews_the_ttl_only_when_asked_in_the_same_round_trip(
    redis_server: RedisServer, request: pytest.FixtureRequest, refresh: bool
) -> None:
    fp = unique_fp(request)
    client = CountingRedis.from_url(redis_server.url)
    cache = RedisScoreCache(client, ttl_s=500, refresh_ttl_on_read=refresh)
    cache.store(fp, [(D1, {"a": S1}), (D2, {"b": S2})])
    for digest in (D1, D2):
        client.expire(score_key(fp, digest), 5)  # as if written long ago
    CountingRedis.round_trips = 0
    assert cache.lookup(fp, [(D1, ["a", "z"]), (D2, ["b"]), (D3, ["c"])]) == [[S1, None], [S2], [None]]
    assert CountingRedis.round_trips == 1  # the EXPIREs ride in the lookup's pipeline
    for digest in (D1, D2):
        ttl = client.ttl(score_key(fp, digest))
        assert (ttl > 5) if refresh else (0 < ttl <= 5)
    assert client.exists(score_key(fp, D3)) == 0  # a miss creates nothing
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    cache.close()


def test_async_hit_renews_the_ttl_when_asked(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    fp = unique_fp(request)

    async def scenario(refresh: bool) -> int:
        cache = open_async_score_cache(redis_server.url, ttl_s=500, refresh_ttl_on_read=refresh)
        await cache.store(fp, [(D1, {"a": S1})])
        await cache.client.expire(score_key(fp, D1), 5)
        assert await cache.lookup(fp, [(D1, ["a", "b"])]) == [[S1, None]]
        ttl = await cache.client.ttl(score_key(fp, D1))
        await cache.close()
        return ttl

    assert asyncio.run(scenario(True)) > 5
    assert 0 < asyncio.run(scenario(False)) <= 5


def test_refresh_on_a_read_only_replica_reads_and_counts_the_refused_expire(
    redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    # docs/cache.md: with the TTL refresh on, reads are writes; a replica refuses the EXPIRE
    # (READONLY), the scores are still used and the refusal is counted, not an outage.
    fp = unique_fp(request)
    RedisScoreCache.from_url(redis_server.url, ttl_s=500).store(fp, [(D1, {"a": S1})])
    replica = RedisServer(
        port=free_port(), workdir=tmp_path, extra_args=("--replicaof", "127.0.0.1", str(redis_server.port))
    )
    replica.start()
    try:
        cache = RedisScoreCache.from_url(replica.url, ttl_s=500, refresh_ttl_on_read=True)
        deadline = time.monotonic() + 30  # a wait for the first sync, not a timing assertion
        while cache.client.exists(score_key(fp, D1)) == 0:
            assert time.monotonic() < deadline, "the replica never synchronised"
            time.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="teacher_server.cache"):
            for _ in range(2):
                assert cache.lookup(fp, [(D1, ["a"])]) == [[S1]]
        assert cache.health.up and cache.stats.outages == 0 and cache.stats.redis_errors == 2
        assert sum("ReadOnlyError" in record.getMessage() for record in caplog.records) == 1  # once per kind
        cache.close()
    finally:
        replica.stop()
