"""Fixtures of the student's tests; the root ``conftest.py`` has the tiny teacher model, the
Redis servers and ``synthetic_data`` (a dataset per set of arguments, written once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from testkit.servers import RedisServer
from testkit.teacher import RunningTeacher, running_teacher, teacher_settings


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path, redis_server: RedisServer) -> Iterator[RunningTeacher]:
    """A teacher service (in-process, loopback gRPC) on the tiny model, caching in the session's Redis."""
    with running_teacher(teacher_settings(tiny_blip_dir, redis_url=redis_server.url)) as running:
        yield running
