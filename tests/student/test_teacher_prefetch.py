"""Endpoint pool, cache read-through and background prefetch against real teacher servers and Redis."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from testkit import DEMO_CONFIG
from testkit.servers import RedisServer, free_port
from testkit.teacher import RunningTeacher, score_calls, start_teacher, teacher_settings

from student.builders import build_train_dataset, correspondence_of
from student.config import load_config
from student.data.collate import collate_fn
from student.losses.distill import TEACHER_KEY
from student.teacher import (
    EndpointPool,
    PrefetchingLoader,
    ReadThroughBackend,
    ScoreQuery,
    TeacherPrefetcher,
    TeacherScores,
)
from student.teacher.pool import parse_endpoints
from teacher_server.cache import encode_score, open_score_cache, score_key, sentence_field
from teacher_server.errors import TeacherError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def config(synthetic_data) -> Any:
    root = synthetic_data(8, 2, seed=4)
    return load_config(DEMO_CONFIG, [f"data.root={root}", "data.scales=[64]", "data.max_size=96", "data.crop=false"])


@pytest.fixture(scope="module")
def batches(config: Any) -> list[tuple[Any, Any, list[dict[str, Any]]]]:
    dataset = build_train_dataset(config)
    return [collate_fn([dataset[i], dataset[i + 1]]) for i in range(0, len(dataset) - 1, 2)]


def adapter(config: Any, backend: Any, **kwargs: Any) -> TeacherScores:
    return TeacherScores(
        backend,
        verbs=build_train_dataset(config).verbs,
        correspondence=correspondence_of(config),
        image_root=config.data.path("train_images"),
        **kwargs,
    )


def fresh_targets(batch: tuple[Any, Any, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [dict(target) for target in batch[2]]


def test_parse_endpoints() -> None:
    assert parse_endpoints("grpc://a:1, grpc://b:2") == ("grpc://a:1", "grpc://b:2")
    assert parse_endpoints(["triton://t:8001"]) == ("triton://t:8001",)
    for bad in ("", "a:1", "http://a:1", "grpc://"):
        with pytest.raises(TeacherError, match="teacher endpoint"):
            parse_endpoints(bad)


def test_round_robin_failover_and_recovery(tiny_blip_dir: Path, teacher: RunningTeacher, config: Any) -> None:
    port = free_port()
    second = start_teacher(teacher_settings(tiny_blip_dir, grpc_port=port))
    a, b = f"grpc://{teacher.target}", f"grpc://127.0.0.1:{port}"
    image = next(iter(config.data.path("train_images").iterdir()))
    pool = EndpointPool([a, b], timeout_s=5, cooldown_s=0.3)
    try:
        for _ in range(4):
            pool.score([image], [["a person ride a horse"]])
        assert pool.stats[a].calls == pool.stats[b].calls == 2
        second.stop()
        for _ in range(3):  # b is down: every call fails over to a
            assert len(pool.score([image], [["a person ride a horse"]])[0]) == 1
        assert pool.stats[b].failures >= 1 and pool.stats[a].calls == 5
        second = start_teacher(teacher_settings(tiny_blip_dir, grpc_port=port))
        # b is tried again after each cool-down; it answers once gRPC has reconnected (its
        # channel backs off about a second between connection attempts).
        deadline = time.monotonic() + 20
        while pool.stats[b].calls == 2 and time.monotonic() < deadline:
            pool.score([image], [["a person ride a horse"]])
            time.sleep(0.1)
        assert pool.stats[b].calls > 2
    finally:
        pool.close()
        second.stop()
    dead = EndpointPool(f"grpc://127.0.0.1:{free_port()}", timeout_s=1)
    try:
        with pytest.raises(TeacherError, match="every teacher endpoint failed"):
            dead.score([image], [["a person ride a horse"]])
    finally:
        dead.close()


def test_read_through_serves_the_cache_without_rpcs(
    teacher: RunningTeacher, redis_server: RedisServer, config: Any
) -> None:
    image = sorted(config.data.path("train_images").iterdir())[0]
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    sentences = ("a person hold a cup", "a person kick a sports ball")
    backend = ReadThroughBackend(EndpointPool(f"grpc://{teacher.target}"), open_score_cache(redis_server.url))
    try:
        # A score stored under ANOTHER model's fingerprint is never read.
        client = redis.Redis.from_url(redis_server.url)
        client.hset(score_key("another-model", digest), sentence_field(sentences[0]), encode_score(99.0, 1.0))
        client.close()
        query = ScoreQuery(digest, image, sentences)
        first = backend.score([query])
        assert first[0][0] != pytest.approx(99.0)
        calls = score_calls(teacher)
        again = backend.score([query])
        assert again[0] == pytest.approx(first[0], abs=1e-6)
        assert score_calls(teacher) == calls and backend.cache_hits == 2
    finally:
        backend.close()


@pytest.mark.parametrize("region", ["image", "pair"])
def test_prefetch_gives_the_synchronous_margins(
    teacher: RunningTeacher, config: Any, batches: list, region: str
) -> None:
    reference = adapter(config, ReadThroughBackend(EndpointPool(f"grpc://{teacher.target}")), region=region)
    prefetcher = TeacherPrefetcher(
        adapter(config, ReadThroughBackend(EndpointPool(f"grpc://{teacher.target}")), region=region), deadline_s=30
    )
    try:
        seen = 0
        for images, masks, targets in PrefetchingLoader(batches, prefetcher, lead=2):
            expected = fresh_targets((images, masks, targets))
            reference.annotate(expected)
            got = fresh_targets((images, masks, targets))
            assert prefetcher.annotate(got) > 0
            for mine, theirs in zip(got, expected, strict=True):
                torch.testing.assert_close(mine[TEACHER_KEY], theirs[TEACHER_KEY], equal_nan=True)
            seen += 1
        assert seen == len(batches) == len(PrefetchingLoader(batches, prefetcher))
        stats = prefetcher.prefetch_stats
        assert stats.submitted == len(batches) and stats.ready_in_time == len(batches)
        assert stats.late_batches == stats.failed_batches == 0
        assert "prefetch" in prefetcher.description and prefetcher.enabled
    finally:
        prefetcher.close()
        reference.close()


class GatedBackend:
    """The real backend, but each call waits until the test opens the gate (a slow teacher)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.gate = threading.Event()
        self.description = "gated " + backend.description

    def score(self, queries: Sequence[ScoreQuery]) -> list[list[float]]:
        self.gate.wait(30)
        return self.backend.score(queries)

    def close(self) -> None:
        self.backend.close()


def test_late_scores_skip_the_batch_and_land_later(teacher: RunningTeacher, config: Any, batches: list) -> None:
    gated = GatedBackend(ReadThroughBackend(EndpointPool(f"grpc://{teacher.target}")))
    prefetcher = TeacherPrefetcher(adapter(config, gated), deadline_s=0.2)
    try:
        prefetcher.submit(batches[0][2])
        targets = fresh_targets(batches[0])
        assert prefetcher.annotate(targets) == 0
        assert all(TEACHER_KEY not in t for t in targets)
        assert prefetcher.prefetch_stats.late_batches == 1 and prefetcher.stats.failed_batches == 1
        gated.gate.set()
        deadline = time.monotonic() + 30
        while prefetcher.stats.pairs_scored == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        targets = fresh_targets(batches[0])
        assert prefetcher.annotate(targets) > 0  # the late answer went to the memo
        assert all(TEACHER_KEY in t for t in targets)
    finally:
        prefetcher.close()


def test_teacher_down_is_skipped_counted_and_recovered(tiny_blip_dir: Path, config: Any, batches: list) -> None:
    port = free_port()
    pool = EndpointPool(f"grpc://127.0.0.1:{port}", timeout_s=2, cooldown_s=0.1)
    prefetcher = TeacherPrefetcher(adapter(config, ReadThroughBackend(pool)), deadline_s=20)
    restarted = None
    try:
        targets = fresh_targets(batches[0])
        assert prefetcher.annotate(targets) == 0 and TEACHER_KEY not in targets[0]
        assert prefetcher.stats.failed_batches == 1 and prefetcher.prefetch_stats.failed_batches == 1
        restarted = start_teacher(teacher_settings(tiny_blip_dir, grpc_port=port))
        # Training goes on: batches are skipped until the channel has reconnected, then scored.
        deadline, given = time.monotonic() + 20, 0
        while given == 0 and time.monotonic() < deadline:
            targets = fresh_targets(batches[1])
            given = prefetcher.annotate(targets)
            time.sleep(0.1)
        assert given > 0 and TEACHER_KEY in targets[0]
        skipped = prefetcher.stats.failed_batches
        assert skipped == prefetcher.prefetch_stats.failed_batches >= 1
        assert prefetcher.annotate(fresh_targets(batches[2])) > 0
        assert prefetcher.stats.failed_batches == skipped
    finally:
        prefetcher.close()
        if restarted is not None:
            restarted.stop()


def test_fail_policy_raises(config: Any, batches: list) -> None:
    pool = EndpointPool(f"grpc://127.0.0.1:{free_port()}", timeout_s=1)
    prefetcher = TeacherPrefetcher(
        adapter(config, ReadThroughBackend(pool), on_error="fail"), deadline_s=10, on_error="fail"
    )
    try:
        with pytest.raises(TeacherError, match="every teacher endpoint failed"):
            prefetcher.annotate(fresh_targets(batches[0]))
    finally:
        prefetcher.close()
    with pytest.raises(ValueError, match="on_error"):
        TeacherPrefetcher(adapter(config, None), on_error="maybe")
    with pytest.raises(ValueError, match="lead"):
        PrefetchingLoader([], TeacherPrefetcher(adapter(config, None)), lead=0)
