"""The deployed topology as real processes on loopback: Redis, ``teacher_server serve``, prewarm,
and a 2-rank ``torchrun`` student on synthetic data (what docker compose runs, without Docker)."""

from __future__ import annotations

import csv
import json
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import RedisServer, free_port

from student.config import load_config
from student.teacher.prewarm import plan_items

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "student" / "configs" / "demo.yaml"
READY_TIMEOUT_S = 120
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOIDISTILL_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


class TeacherProcess:
    """``python -m teacher_server serve`` on fixed ports; ``start`` again after ``kill`` to restart it."""

    def __init__(self, model_dir: Path, redis_url: str | None = None) -> None:
        self.model_dir = model_dir
        self.redis_url = redis_url
        self.grpc_port, self.http_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        args = ["--model", str(self.model_dir), "--device", "cpu", "--dtype", "fp32", "--host", "127.0.0.1"]
        args += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port)]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "teacher_server", "serve", *args],
            cwd=REPO,
            env=clean_env(HOIDISTILL_MAX_DELAY_MS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        seen = []
        while True:
            line = lines.get(timeout=READY_TIMEOUT_S)
            if line is None:
                raise AssertionError("teacher exited before it was ready:\n" + "".join(seen))
            seen.append(line)
            if line.startswith("teacher ready"):
                return

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def metric(self, name: str) -> float:
        """One unlabelled sample of the teacher's /metrics (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


@pytest.fixture
def teacher_process(tiny_blip_dir: Path, private_redis: RedisServer) -> Iterator[TeacherProcess]:
    teacher = TeacherProcess(tiny_blip_dir, private_redis.url)
    teacher.start()
    yield teacher
    teacher.kill()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from student.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, 12, 4, seed=6, image_size=64, progress=False)
    return root


def tiny_overrides(root: Path, output: Path, *extra: str) -> list[str]:
    """demo.yaml shrunk to a seconds-long run (the same sizes as the trainer's own tests)."""
    return [
        f"data.root={root}",
        f"run.output_dir={output}",
        "data.scales=[64]",
        "data.max_size=96",
        "data.test_scale=64",
        "data.crop=false",
        "data.num_workers=0",
        "model.backbone.base_width=8",
        "model.transformer.d_model=32",
        "model.transformer.dim_feedforward=64",
        "model.transformer.num_encoder_layers=1",
        "model.decoder.num_queries=4",
        "optim.batch_size=2",
        "schedule.epochs=2",
        "schedule.lr_drop=[10]",
        "run.num_threads=1",
        "run.log_every=1",
        # kl: every matched pair with two scored candidates gets a term, whatever the tiny random
        # teacher says (soft, the default, adds a term only where the teacher is confident).
        "distill.variant=kl",
        *extra,
    ]


def student(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "student", *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def torchrun_command(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    return [
        *TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max_restarts={max_restarts}",
        "-m",
        "student",
        *args,
    ]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_prewarm_then_two_ranks_train_from_the_teachers_cache(
    teacher_process: TeacherProcess, data_root: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    config_args = ["--config", str(DEMO_CONFIG), "--teacher", teacher_process.endpoint]
    prewarm = student("prewarm", *config_args, "--no-progress", *tiny_overrides(data_root, tmp_path / "prewarm"))
    assert '"failed_images": 0' in prewarm.stdout
    items = plan_items(load_config(DEMO_CONFIG, tiny_overrides(data_root, output)))
    sentences = sum(len(item.sentences) for item in items)
    misses = teacher_process.metric("hoidistill_teacher_cache_misses_total")
    hits = teacher_process.metric("hoidistill_teacher_cache_hits_total")
    encoded = teacher_process.metric("hoidistill_teacher_images_encoded_total")
    # Digest-first: a first-time image misses once without its bytes, once more with them.
    assert misses == 2 * sentences and encoded == len(items)

    # The student's own memo is off, so both epochs ask the teacher; the cache answers all of it.
    # eval.batch_size=1: no padding, so the sharded evaluation below can be compared exactly.
    overrides = tiny_overrides(
        data_root, output, "teacher.memo_entries=0", "teacher.deadline_s=60", "eval.batch_size=1"
    )
    run = subprocess.run(
        torchrun_command(2, "train", *config_args, "--no-progress", *overrides),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Progress is logged on stderr, each line tagged with its rank; rank 1 logs warnings only.
    assert "[rank 0] INFO student.training: distributed: 2 ranks (gloo)" in run.stderr
    assert run.stderr.count("teacher: ") >= 1 and run.stderr.count("epoch 2/2") == 1  # rank 0 speaks alone
    assert "[rank 1] INFO" not in run.stderr
    assert teacher_process.metric("hoidistill_teacher_cache_misses_total") == misses
    assert teacher_process.metric("hoidistill_teacher_images_encoded_total") == encoded
    assert teacher_process.metric("hoidistill_teacher_cache_hits_total") - hits == 2 * sentences

    # Rank 0 wrote the run directory, one checkpoint, the logs of its own steps; no temporary files.
    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["config.yaml", "checkpoint.pth", "train_log.csv", "epochs.csv", "preds.json", "metrics.json"]
    )
    epochs = read_rows(output / "epochs.csv")
    assert [int(row["global_step"]) for row in epochs] == [3, 6]  # 12 images / (2 ranks x 2)
    assert all(float(row["loss_itm"]) >= 0 for row in epochs)
    steps = read_rows(output / "train_log.csv")
    assert len(steps) == 6 and all(float(row["itm_terms"]) > 0 for row in steps)
    assert all(float(row["teacher_failed_batches"]) == 0 for row in steps)

    # The final evaluation ran sharded over the 2 ranks and was gathered on rank 0: it equals one
    # process evaluating the same checkpoint, prediction for prediction (images one at a time:
    # batches padded to another width would move boxes by ~0.05 px).
    single_preds = tmp_path / "single_preds.json"
    evaluated = student(
        "evaluate",
        "--checkpoint",
        str(output / "checkpoint.pth"),
        "--output",
        str(single_preds),
        "--json",
        "--no-progress",
    )
    assert json.loads(evaluated.stdout.strip().splitlines()[-1]) == json.loads((output / "metrics.json").read_text())
    assert json.loads(single_preds.read_text()) == json.loads((output / "preds.json").read_text())
