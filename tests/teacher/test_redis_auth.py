"""The score cache against a real ``redis-server`` that wants credentials: a password, an ACL user
limited to the cache's keys and commands, and TLS (``rediss://``, with client certificates).

What a deployer gets: the right credentials work for lookups and writes (sync, asyncio and the
whole service); wrong ones are the documented outage (answers without the cache, one warning
naming the error, counted in ``hoidistill_teacher_redis_errors_total``), never a failed request;
no password ever reaches a log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
import torch
from testkit.servers import RedisServer, free_port
from testkit.teacher import Certificates, make_certificates, png_bytes, running_teacher, teacher_settings

from teacher_server.cache import (
    AsyncRedisScoreCache,
    CachedScore,
    RedisScoreCache,
    open_async_score_cache,
    open_score_cache,
    score_key,
)
from teacher_server.client import TeacherClient

torch.set_num_threads(1)

FP = "fp-acl"
D1 = "a" * 64
S1 = CachedScore(0.5, 0.625)
ADMIN_PASSWORD = "admin-pw-51c0e2"  # the default user's (requirepass)
USER, PASSWORD = "alice", "alice-pw-9d4e7b"
WRONG_PASSWORD = "not-alice-pw-33f8a1"
# The least the cache needs: its four commands on its own keys. redis-py's CLIENT SETINFO on
# connect may be refused: it ignores that.
ACL = (USER, "on", f">{PASSWORD}", "~hoidistill:*", "resetchannels", "-@all", "+hmget", "+hset", "+expire", "+ping")
SENTENCES = ["a person ride a horse"]


def auth_args() -> tuple[str, ...]:
    return ("--requirepass", ADMIN_PASSWORD, "--user", *ACL)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path, extra_args=auth_args())
    server.start()
    yield server
    server.stop()


def url(server: RedisServer, password: str = PASSWORD, scheme: str = "redis", **query: str) -> str:
    tail = f"?{urlencode(query)}" if query else ""
    return f"{scheme}://{USER}:{password}@127.0.0.1:{server.port}/0{tail}"


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)


# ---------------------------------------------------------------------------- password + ACL
def test_acl_user_reads_and_writes_the_cache_and_nothing_else(acl_redis: RedisServer) -> None:
    cache = open_score_cache(url(acl_redis), ttl_s=60, refresh_ttl_on_read=True)
    assert isinstance(cache, RedisScoreCache)
    cache.store(FP, [(D1, {"a": S1})])
    assert cache.lookup(FP, [(D1, ["a", "b"])]) == [[S1, None]]
    assert cache.health.up and cache.stats.redis_errors == 0
    assert PASSWORD not in cache.health.name and f"{USER}:***@" in cache.health.name
    # The ACL is real: the same user may not touch other keys or other commands.
    with redis.Redis.from_url(url(acl_redis)) as alice:
        with pytest.raises(redis.exceptions.NoPermissionError):
            alice.hset("other:key", "f", "v")
        with pytest.raises(redis.exceptions.NoPermissionError):
            alice.flushall()
    with redis.Redis(port=acl_redis.port, password=ADMIN_PASSWORD) as admin:
        assert admin.hget(score_key(FP, D1), "a") is not None
    cache.close()

    async def scenario() -> list[list[CachedScore | None]]:
        async_cache = open_async_score_cache(url(acl_redis), ttl_s=60)
        try:
            return await async_cache.lookup(FP, [(D1, ["a"])])
        finally:
            await async_cache.close()

    assert asyncio.run(scenario()) == [[S1]]


def test_wrong_password_is_a_logged_counted_outage_that_never_shows_the_password(
    acl_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        cache = open_score_cache(url(acl_redis, WRONG_PASSWORD), ttl_s=60, on_error=errors.append)
        for _ in range(3):
            assert cache.lookup(FP, [(D1, ["a"])]) == [[None]]  # answered, never raised
            cache.store(FP, [(D1, {"a": S1})])  # dropped
        cache.close()
    assert not cache.health.up and cache.stats.outages == 1
    assert cache.stats.redis_errors == len(errors) == 1  # the others waited for the back-off window
    assert isinstance(errors[0], redis.exceptions.AuthenticationError)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "AuthenticationError" in warnings[0] and "invalid username-password pair" in warnings[0]
    assert f"redis://{USER}:***@127.0.0.1:{acl_redis.port}/0" in warnings[0]
    for secret in (WRONG_PASSWORD, PASSWORD, ADMIN_PASSWORD):
        assert secret not in logged_text(caplog)


def test_the_service_with_a_password_file_and_with_a_wrong_password(
    acl_redis: RedisServer, tiny_blip_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")  # as `echo pw > file` writes it
    good = teacher_settings(
        tiny_blip_dir,
        redis_url=f"redis://{USER}@127.0.0.1:{acl_redis.port}/0",
        redis_password_file=str(secret),
        cache_refresh_ttl_on_read=True,
    )
    with caplog.at_level(logging.DEBUG), running_teacher(good) as teacher:
        assert teacher.service.cache.refresh_ttl_on_read
        with TeacherClient(teacher.target, max_images_per_request=8) as client:
            assert [s.cached for s in client.score([png_bytes(7)], [SENTENCES])[0]] == [False]
            assert [s.cached for s in client.score([png_bytes(7)], [SENTENCES])[0]] == [True]
        assert teacher.metric("hoidistill_teacher_redis_errors_total") == 0

    secret.write_text(WRONG_PASSWORD)
    wrong = good.model_copy(update={"redis_url": url(acl_redis, WRONG_PASSWORD)})
    with caplog.at_level(logging.DEBUG), running_teacher(wrong) as teacher:
        with TeacherClient(teacher.target, max_images_per_request=8) as client:
            for _ in range(2):  # scored, just never from the cache
                assert [s.cached for s in client.score([png_bytes(8)], [SENTENCES])[0]] == [False]
        assert teacher.metric("hoidistill_teacher_redis_errors_total") >= 1
    assert "invalid username-password pair" in logged_text(caplog)
    for secret_text in (WRONG_PASSWORD, PASSWORD, ADMIN_PASSWORD):
        assert secret_text not in logged_text(caplog)


# ------------------------------------------------------------------------------------ rediss://
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("redis-certs"))


@pytest.fixture
def tls_redis(tmp_path: Path, certs: Certificates) -> Iterator[RedisServer]:
    """Debian's redis-server is built with TLS: the TLS port only, client certificates required."""
    port = free_port()
    tls = (
        *("--port", "0", "--tls-port", str(port)),
        *("--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key)),
        *("--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes"),
    )
    server = RedisServer(port=port, workdir=tmp_path, extra_args=(*auth_args(), *tls))
    server.start()
    yield server
    server.stop()


def tls_url(server: RedisServer, certs: Certificates, ca: Path | None = None) -> str:
    # redis-py takes its TLS options from the URL's query (ssl_ca_certs, ssl_certfile, ...).
    return url(
        server,
        scheme="rediss",
        ssl_ca_certs=str(ca or certs.ca),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
    )


def test_rediss_with_acl_user_and_client_certificate(tls_redis: RedisServer, certs: Certificates) -> None:
    cache = open_score_cache(tls_url(tls_redis, certs), ttl_s=60)
    assert isinstance(cache, RedisScoreCache)
    cache.store(FP, [(D1, {"a": S1})])
    assert cache.lookup(FP, [(D1, ["a"])]) == [[S1]] and cache.health.up
    assert cache.client.connection_pool.connection_class is redis.SSLConnection
    cache.close()

    async def scenario() -> list[list[CachedScore | None]]:
        async_cache = open_async_score_cache(tls_url(tls_redis, certs), ttl_s=60)
        assert isinstance(async_cache, AsyncRedisScoreCache)
        try:
            return await async_cache.lookup(FP, [(D1, ["a"])])
        finally:
            await async_cache.close()

    assert asyncio.run(scenario()) == [[S1]]
    # Plain text against the TLS port: no answer, an outage, not a crash.
    plain = open_score_cache(f"redis://{USER}:{PASSWORD}@127.0.0.1:{tls_redis.port}/0", ttl_s=60, timeout_s=2)
    assert plain.lookup(FP, [(D1, ["a"])]) == [[None]] and not plain.health.up
    plain.close()


def test_rediss_refuses_a_server_from_another_ca(
    tls_redis: RedisServer, certs: Certificates, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other")
    with caplog.at_level(logging.WARNING, logger="teacher_server.cache"):
        cache = open_score_cache(tls_url(tls_redis, certs, ca=other.ca), ttl_s=60)
        assert cache.lookup(FP, [(D1, ["a"])]) == [[None]]
        cache.close()
    assert not cache.health.up
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "certificate verify failed" in warning and PASSWORD not in warning
