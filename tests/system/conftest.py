"""Fixtures of the tests across the parts (topology, faults, demo, docs, lint, dependencies, GPU
check): the teacher as its own process, Redis that survives a restart, the topology's dataset."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from testkit.processes import TeacherProcess
from testkit.servers import RedisServer, free_port


@pytest.fixture(scope="module")
def data_root(synthetic_data: Callable[..., Path]) -> Path:
    """12 training and 4 test images: 6 steps of 2 images per epoch."""
    return synthetic_data(12, 4, seed=6)


@pytest.fixture
def teacher_process(tiny_blip_dir: Path, private_redis: RedisServer) -> Iterator[TeacherProcess]:
    """``python -m teacher_server serve`` on the tiny model with a private Redis; killed at the end."""
    teacher = TeacherProcess(tiny_blip_dir, private_redis.url)
    teacher.start()
    yield teacher
    teacher.kill()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis of this test that keeps its data across ``stop``/``start`` (append-only file)."""
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis", persistent=True)
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()
