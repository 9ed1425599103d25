"""Fixtures of every area: real Redis servers, the tiny BLIP model, engines, synthetic data.

Each area's own fixtures are in ``teacher/``, ``student/``, ``deploy/`` and ``system/``
``conftest.py``; helpers that are not fixtures are in the ``testkit`` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from testkit.servers import RedisServer, free_port
from testkit.student import write_synthetic

if TYPE_CHECKING:
    from teacher_server.engine import ItmEngine

# Tests never reach a model hub: everything they load, they build and save themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Redis on a free loopback port, shared by the session (flush what you use)."""
    server = RedisServer(port=free_port(), workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real Redis that only this test uses: stop and restart it freely."""
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BLIP ITM model + processor saved in the ``save_pretrained`` layout."""
    from teacher_server.tiny_model import make_tiny_model

    directory = tmp_path_factory.mktemp("tiny-blip")
    make_tiny_model(directory, seed=0)
    return directory


@pytest.fixture
def engine(tiny_blip_dir: Path) -> ItmEngine:
    """A fresh fp32 CPU engine on the tiny model, its own vision cache and counters (loads in
    about 0.1 s): the engine under test, or the reference that served scores must equal."""
    from testkit.teacher import reference_engine

    return reference_engine(tiny_blip_dir)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``synthetic_data(train, test, seed=...)``: a synthetic dataset root (64 px images), written
    once per set of arguments in the session and shared; treat it as read-only."""
    written: dict[tuple, Path] = {}

    def get(train: int, test: int, *, seed: int, **options) -> Path:
        key = (train, test, seed, tuple(sorted(options.items())))
        if key not in written:
            root = tmp_path_factory.mktemp("synthetic")
            write_synthetic(root, train, test, seed=seed, **options)
            written[key] = root
        return written[key]

    return get
