"""``student prewarm`` against a real teacher server (loopback gRPC) and a real Redis."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from testkit import DEMO_CONFIG
from testkit.servers import RedisServer, free_port
from testkit.teacher import (
    RunningTeacher,
    reference_engine,
    reference_scores,
    score_calls,
)

from student.__main__ import main
from student.builders import build_train_dataset, correspondence_of
from student.config import load_config
from student.teacher import EndpointPool, TeacherScores
from student.teacher.prewarm import PrewarmError, plan_items, prewarm
from teacher_server.cache import open_score_cache

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(synthetic_data) -> Path:
    return synthetic_data(10, 2, seed=3)


def overrides(root: Path, output: Path) -> list[str]:
    return [f"data.root={root}", f"run.output_dir={output}", "data.scales=[64]", "data.max_size=96"]


@pytest.mark.parametrize("region", ["image", "pair"])
def test_plan_items_are_the_sentences_training_asks_for(data_root: Path, tmp_path: Path, region: str) -> None:
    # Training's augmentation (flip, crop) is on: the plan must not depend on it.
    config = load_config(DEMO_CONFIG, [*overrides(data_root, tmp_path), f"teacher.region={region}"])
    items = plan_items(config)
    dataset = build_train_dataset(config)
    adapter = TeacherScores(
        None,
        verbs=dataset.verbs,
        correspondence=correspondence_of(config),
        image_root=config.data.path("train_images"),
        region=config.teacher.region,
    )
    by_view = {item.view: item for item in items}
    assert len(by_view) == len(items) >= len(dataset) > 0
    asked = set()
    for index in range(len(dataset)):
        _, target = dataset[index]
        queries = adapter.plan([target]).queries
        if region == "image":
            assert len(queries) == 1
        for query in queries:
            assert query is not None
            assert set(query.sentences) <= set(by_view[query.view].sentences)
            asked.add(query.view)
    if region == "pair":  # a view per pair region, none of them the whole image
        assert all(item.region is not None for item in items) and len(items) > len(dataset)
    # A crop may drop pairs from a sample; over the set every prewarmed view is asked for.
    assert asked <= set(by_view)


@pytest.mark.parametrize("region", ["image", "pair"])
def test_after_a_full_prewarm_training_asks_the_teacher_nothing(
    tiny_blip_dir: Path, redis_server: RedisServer, tmp_path: Path, synthetic_data, region: str
) -> None:
    from testkit.student import tiny_overrides
    from testkit.teacher import running_teacher, teacher_settings

    from student.training import train

    # Its own Redis database and teacher: nothing another test scored is in the cache.
    redis_url = redis_server.url.rsplit("/", 1)[0] + ("/5" if region == "image" else "/6")
    root = synthetic_data(6, 2, seed=8, two_person_rate=0.5)
    settings = [
        *tiny_overrides(root, tmp_path / "run", "data.crop=true", "optim.batch_size=2", "schedule.epochs=1"),
        "run.progress=false",
        "run.eval_at_end=false",
        "distill.variant=kl",
        f"teacher.region={region}",
        f"teacher.redis_url={redis_url}",
    ]
    with running_teacher(teacher_settings(tiny_blip_dir, redis_url=redis_url)) as server:
        config = load_config(DEMO_CONFIG, [*settings, f"teacher.source=grpc://{server.target}"])
        items = plan_items(config)
        with contextlib.closing(EndpointPool(f"grpc://{server.target}")) as pool:
            done = prewarm(items, pool, progress_file=None, progress=False)
        assert done.scored_images == len(items) > 0 and done.failed_images == 0
        if region == "pair":
            assert all(item.region is not None for item in items)
        calls = score_calls(server)
        result = train(config)
        # Every score came from Redis: not one Score RPC, so the teacher's model ran for nothing.
        assert score_calls(server) == calls
        assert result.teacher_stats["pairs_scored"] > 0
        assert result.teacher_stats["cache_hits"] == result.teacher_stats["pairs_scored"]
        assert result.teacher_stats["failed_batches"] == 0


def test_prewarm_fills_the_cache_and_resumes(
    data_root: Path, tmp_path: Path, teacher: RunningTeacher, redis_server: RedisServer, tiny_blip_dir: Path
) -> None:
    config = load_config(DEMO_CONFIG, overrides(data_root, tmp_path))
    items = plan_items(config)
    pool = EndpointPool(f"grpc://{teacher.target}")
    fingerprint = pool.fingerprint()
    assert fingerprint
    progress_file = tmp_path / "done.txt"
    cache = open_score_cache(redis_server.url)
    try:
        first = prewarm(items, pool, workers=3, images_per_request=2, progress_file=progress_file, progress=False)
        assert first.scored_images == len(items) and first.failed_images == 0
        assert first.sentences == sum(len(item.sentences) for item in items)
        # Every sentence is now in Redis under the teacher's fingerprint, equal to what a separate
        # engine on the same weights computes (not to the service, which would answer from Redis).
        cached = cache.lookup(fingerprint, [(item.digest, list(item.sentences)) for item in items])
        assert all(hit is not None for row in cached for hit in row)
        engine = reference_engine(tiny_blip_dir)
        assert engine.fingerprint == fingerprint
        for item, row in zip(items, cached, strict=True):
            expected = reference_scores(engine, item.path.read_bytes(), item.sentences)
            # float32 in Redis: logits of a few units round at ~1e-7; 1e-5 leaves batching noise room.
            assert [h.match_logit for h in row] == pytest.approx([s.match_logit for s in expected], abs=1e-5)
            assert [h.match_prob for h in row] == pytest.approx([s.match_prob for s in expected], abs=1e-5)

        # A re-run skips everything from the progress file: no Score call at all.
        calls = score_calls(teacher)
        again = prewarm(items, pool, progress_file=progress_file, progress=False)
        assert again.skipped_done == len(items) and again.scored_images == 0
        assert score_calls(teacher) == calls

        # Without the progress file, the cache read says everything is there.
        fresh = prewarm(items, pool, progress_file=tmp_path / "other.txt", cache=cache, progress=False)
        assert fresh.skipped_cached == len(items) and fresh.scored_images == 0
        assert score_calls(teacher) == calls
    finally:
        pool.close()
        cache.close()


def test_progress_file_of_another_model_is_started_afresh(data_root: Path, tmp_path: Path, teacher) -> None:
    config = load_config(DEMO_CONFIG, overrides(data_root, tmp_path))
    items = plan_items(config)[:2]
    progress_file = tmp_path / "done.txt"
    progress_file.write_text("# hoi-distill prewarm, teacher fingerprint OTHER\n" + items[0].digest + "\n")
    with contextlib.closing(EndpointPool(f"grpc://{teacher.target}")) as pool:
        result = prewarm(items, pool, progress_file=progress_file, progress=False)
    assert result.skipped_done == 0 and result.scored_images == 2
    assert "OTHER" not in progress_file.read_text()


def test_a_dead_endpoint_fails_over_and_no_teacher_is_an_error(data_root: Path, tmp_path: Path, teacher) -> None:
    config = load_config(DEMO_CONFIG, overrides(data_root, tmp_path))
    items = plan_items(config)[:4]
    dead = f"grpc://127.0.0.1:{free_port()}"
    with contextlib.closing(EndpointPool(f"{dead},grpc://{teacher.target}", timeout_s=5)) as pool:
        result = prewarm(items, pool, workers=2, images_per_request=1, progress=False)
        assert result.scored_images == 4 and result.failed_images == 0
        assert pool.stats[dead].failures >= 1 and pool.stats[dead].calls == 0
    with (
        contextlib.closing(EndpointPool(dead, timeout_s=2)) as pool,
        pytest.raises(PrewarmError, match="does not answer"),
    ):
        prewarm(items, pool, progress=False)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_command_line(data_root: Path, tmp_path: Path, teacher: RunningTeacher, redis_server: RedisServer) -> None:
    args = ["prewarm", "--config", str(DEMO_CONFIG), "--teacher", f"grpc://{teacher.target}", "--no-progress"]
    code, out, err = run_cli(*args, "--redis", redis_server.url, *overrides(data_root, tmp_path))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["images"] == len(plan_items(load_config(DEMO_CONFIG, overrides(data_root, tmp_path))))
    assert summary["failed_images"] == 0
    assert (tmp_path / "prewarm_done.txt").is_file()

    code, _, err = run_cli(
        "prewarm", "--config", str(DEMO_CONFIG), "--teacher", "local", *overrides(data_root, tmp_path)
    )
    assert code == 2 and "needs a teacher service" in err
    code, _, err = run_cli("prewarm", "--config", str(DEMO_CONFIG), "optim.lr=-1", *overrides(data_root, tmp_path))
    assert code == 2 and "optim.lr" in err
