"""Smoke test of ``bench/teacher_service.py``: a real tiny run, then its JSON line.

The run is the bench's default path (``python -m teacher_server serve`` as a child process) with
the score cache in a real Redis that only this test uses, at reduced counts. It checks the shape
of the result, never how fast; and, apart from the bench's own report, what the server left in
Redis: exactly the pairs the bench sent to the service, each equal to a reference engine's score.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import redis
from testkit import REPO
from testkit.teacher import reference_engine

from teacher_server.cache import KEY_PREFIX, decode_score
from teacher_server.engine import ImageSentences
from teacher_server.hoi.digest import image_digest

BENCH = REPO / "bench" / "teacher_service.py"
LEVELS = (1, 3)
SMOKE_ARGS = [
    "--size", "tiny",
    "--threads", "1",
    "--reps", "2",
    "--images", "2",
    "--sentences", "4",
    "--latency-sentences", "5",
    "--cold-reps", "1",
    "--warm-reps", "3",
    "--levels", ",".join(map(str, LEVELS)),
    "--conc-sentences", "3",
    "--conc-requests", "2",
    "--warm-conc-requests", "4",
]  # fmt: skip


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_teacher_service", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


def service_workload(bench: ModuleType) -> tuple[dict[str, tuple[bytes, list[str]]], set[str]]:
    """Replays the bench's deterministic images (``ImageFactory(seed=0)``, drawn in its order):
    (digest -> (image, sentences)) of every image sent to the service, and the digests only the in-process
    engine saw. Counts from ``SMOKE_ARGS``."""
    factory, texts = bench.ImageFactory(seed=0), bench.sentences
    service: dict[str, tuple[bytes, list[str]]] = {}
    engine_only: set[str] = set()

    def sent(blobs: list[bytes], sentences: list[str]) -> None:
        service.update({image_digest(blob): (blob, sentences) for blob in blobs})

    sent(factory.fresh(2), texts(4))  # warm-up: 2 images x min(--sentences, 8)
    for _ in range(2):  # (a) --reps 2: --images 2 in-process, 2 others through the service
        engine_only.update(image_digest(blob) for blob in factory.fresh(2))
        sent(factory.fresh(2), texts(4))
    sent(factory.fresh(1), texts(5))  # (b) --cold-reps 1, --latency-sentences 5
    for clients in LEVELS:  # (c) max(--conc-requests 2, clients) requests of 1 image x 3 sentences
        for _ in range(max(2, clients)):
            sent(factory.fresh(1), texts(3))
    return service, engine_only


def test_tiny_run_ends_with_the_measured_json(private_redis, bench: ModuleType, tiny_blip_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), *SMOKE_ARGS, "--redis-url", private_redis.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    # The human-readable tables come before it.
    assert any(line.startswith("(a)") for line in lines) and any(line.startswith("(c)") for line in lines)

    assert result["size"] == "tiny" and result["threads"] == 1
    assert result["server"].startswith("process") and result["cache"] == "redis"
    figures = (
        "service_ratio",
        "service_cpu_ratio",
        "warm_speedup",
        "engine_sentences_per_s",
        "service_sentences_per_s",
    )
    for key in figures:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert len(result["ratio_rows"]) == 2
    rows = result["ratio_rows"]
    assert [row["first"] for row in rows] == ["engine", "service"]  # the order flips every rep
    for row in rows:  # each ratio: the same pairs' in-process time over their service time
        assert row["ratio"] == pytest.approx(row["engine_s"] / row["service_s"], rel=1e-3)
        assert row["engine_cpu_s"] > 0 and row["service_cpu_s"] > 0
    total = sum(row["engine_s"] for row in rows) / sum(row["service_s"] for row in rows)
    assert result["service_ratio"] == pytest.approx(total, rel=1e-3)
    assert result["service_cpu_ratio"] == pytest.approx(
        sum(row["engine_cpu_s"] for row in rows) / sum(row["service_cpu_s"] for row in rows), rel=1e-3
    )
    assert result["warm_ms"] > 0 and result["cold_ms"] > 0
    assert result["warm_speedup"] == pytest.approx(result["cold_ms"] / result["warm_ms"], rel=1e-2)

    for table, sentences in (("concurrency", 3), ("concurrency_warm", 3)):
        rows = result[table]
        assert [row["clients"] for row in rows] == list(LEVELS)
        for row in rows:
            assert row["requests"] >= row["clients"]
            assert row["sentences"] == row["requests"] * sentences
            assert row["sentences_per_s"] == pytest.approx(row["sentences"] / row["seconds"], rel=1e-2)
            assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert all(row["uncached_scores"] == 0 for row in result["concurrency_warm"])

    checks = result["checks"]
    assert checks["scores_match_engine"] and checks["max_abs_diff_vs_engine"] <= 1e-6
    # (a) was cold on the service side: it encoded every image sent and scored every pair.
    assert checks["a_same_work"]
    assert checks["a_service_images_encoded"] == 2 * 2 and checks["a_service_sentences_scored"] == 2 * 2 * 4
    # (b) the warm repeats were all served by Redis, bit-equal to the cold answer.
    assert checks["b_cold_cached_scores"] == 0
    assert checks["b_warm_all_cached"] and checks["b_warm_cache_hits"] == 3 * 5
    assert result["loadavg_before"] and result["loadavg_after"]

    # What the server left in Redis, read apart from the bench: one key per image sent to the
    # service (none for the in-process engine's images), one field per sentence, each value the
    # score a separate engine on the same weights (the tiny model, seed 0) computes.
    service, engine_only = service_workload(bench)
    assert len(service) == 2 + 2 * 2 + 1 + (2 + 3) and len(engine_only) == 2 * 2
    engine = reference_engine(tiny_blip_dir)
    prefix = f"{KEY_PREFIX}:{engine.fingerprint}:"
    with redis.Redis.from_url(private_redis.url) as client:
        keys = sorted(key.decode() for key in client.scan_iter(match=f"{KEY_PREFIX}:*"))
        assert keys == sorted(f"{prefix}{{{digest}}}" for digest in service)
        for digest, (image, sentences) in service.items():
            stored = client.hgetall(f"{prefix}{{{digest}}}")
            assert sorted(stored) == sorted(sentence.encode() for sentence in sentences)
            assert client.ttl(f"{prefix}{{{digest}}}") > 0  # every write sets the lifetime (cache_ttl_s)
            expected = engine.score([ImageSentences(digest, engine.prepare_image(image), tuple(sentences))])[0]
            for sentence, want in zip(sentences, expected, strict=True):
                got = decode_score(stored[sentence.encode()])
                assert got is not None
                # float32 in Redis; batching and threads change the last bits only (1e-5 of a logit).
                assert got.match_logit == pytest.approx(want.match_logit, abs=1e-5), (digest, sentence)
                assert got.match_prob == pytest.approx(want.match_prob, abs=1e-5), (digest, sentence)


def test_percentiles_interpolate_linearly(bench: ModuleType) -> None:
    p50, p99 = bench.percentiles_ms([0.001, 0.002, 0.003, 0.004])
    assert p50 == pytest.approx(2.5) and p99 == pytest.approx(3.97)


def test_sentences_are_distinct(bench: ModuleType) -> None:
    texts = bench.sentences(300)
    assert len(set(texts)) == 300 and texts[0] == "a person ride a horse"


def test_images_are_fresh_jpegs(bench: ModuleType) -> None:
    factory = bench.ImageFactory(seed=0)
    images = factory.fresh(3) + factory.fresh(2)
    assert all(image[:3] == b"\xff\xd8\xff" for image in images)
    assert len({hashlib.sha256(image).hexdigest() for image in images}) == 5


def test_size_picks_default_counts_and_flags_override(bench: ModuleType) -> None:
    base = bench.parse_args(["--size", "base"])
    assert (base.images, base.sentences, base.levels) == (8, 32, [1, 2, 4, 8, 16])
    args = bench.parse_args(["--size", "base", "--images", "3", "--levels", "1,2"])
    assert (args.images, args.sentences, args.levels) == (3, 32, [1, 2])


@pytest.mark.parametrize("flags", [["--reps", "0"], ["--levels", "1,0"], ["--threads", "0"]])
def test_rejects_non_positive_counts(bench: ModuleType, flags: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        bench.parse_args(["--size", "tiny", *flags])
    assert raised.value.code == 2
