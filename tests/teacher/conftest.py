"""Fixtures of the teacher's tests (``teacher_server``); the root ``conftest.py`` has the tiny
model (``tiny_blip_dir``), ``engine`` and the Redis servers. Each file starts its own servers
(``testkit.teacher.running_teacher``, ``testkit.http.running_http``): their limits differ."""

from __future__ import annotations

from pathlib import Path

import pytest
from testkit.teacher import reference_engine

from teacher_server.engine import ItmEngine


@pytest.fixture(scope="module")
def reference(tiny_blip_dir: Path) -> ItmEngine:
    """A second engine on the same weights as ``engine``: what answers served through the batcher
    or the service must equal (its own caches and counters, untouched by the code under test)."""
    return reference_engine(tiny_blip_dir)
