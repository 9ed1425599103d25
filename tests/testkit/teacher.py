"""A real teacher server for tests, in-process: its own asyncio loop in a background thread.

Tests talk to it over loopback with real clients (ours, grpcio stubs, tritonclient) while the
test thread stays synchronous. ``RunningTeacher.call`` runs a coroutine in the server's loop
(e.g. to read the service's metrics or stop the server).
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from teacher_server import grpc_api
from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine, ItmScore
from teacher_server.hoi.digest import image_digest
from teacher_server.server import TeacherServer
from teacher_server.service import ScoreItem, ScoringService, engine_settings
from teacher_server.settings import ServerSettings

T = TypeVar("T")
START_TIMEOUT_S = 120.0
SCORE_METHOD = f"{grpc_api.SERVICE_NAME}/Score"
LONG_SENTENCE = "a person ride a horse and hold a cup with a dog on a bench"  # > 16 tokens
# Six distinct triplet sentences, for tests that score a batch.
SENTENCES = (
    "a person ride a horse",
    "a person eat a pizza",
    "a person hold a cup",
    "a person fly a kite",
    "a person sit on a bench",
    "a person kick a sports ball",
)


def teacher_settings(model_dir: Path, **overrides: Any) -> ServerSettings:
    """Settings for a loopback test server on a free gRPC port, fp32 on CPU, small batching delay."""
    values: dict[str, Any] = {
        "model": str(model_dir),
        "device": ("cpu",),
        "dtype": "fp32",
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "max_delay_ms": 1.0,
        "drain_timeout_s": 5.0,
    }
    values.update(overrides)
    return ServerSettings(**values)


@dataclass
class RunningTeacher:
    """A started ``TeacherServer`` and the thread whose loop runs it."""

    settings: ServerSettings
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    server: TeacherServer
    port: int
    stopped: bool = field(default=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def service(self) -> ScoringService:
        return self.server.service

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        """Run ``coroutine`` in the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.service.metrics.value(name, labels)

    def stop(self, drain_timeout_s: float | None = None) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            self.call(self.server.stop(drain_timeout_s), timeout_s=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


def score_calls(teacher: RunningTeacher, code: str = "OK") -> float:
    """Score RPCs the teacher answered with ``code``, from its metrics."""
    return teacher.metric("hoidistill_teacher_requests_total", {"method": SCORE_METHOD, "code": code})


def start_teacher(settings: ServerSettings, service: ScoringService | None = None) -> RunningTeacher:
    """Build (loading the model unless ``service`` is given) and start a server in a new thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="teacher-test-loop", daemon=True)
    thread.start()

    async def build() -> tuple[TeacherServer, int]:
        server = TeacherServer(settings, service)
        return server, await server.start()

    try:
        server, port = asyncio.run_coroutine_threadsafe(build(), loop).result(START_TIMEOUT_S)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        raise
    return RunningTeacher(settings, loop, thread, server, port)


@contextmanager
def running_teacher(settings: ServerSettings, service: ScoringService | None = None) -> Iterator[RunningTeacher]:
    teacher = start_teacher(settings, service)
    try:
        yield teacher
    finally:
        teacher.stop()


def image_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small random RGB PNG from numpy's generator (the service and overload tests' images)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def with_bytes(seed: int, sentences: Sequence[str]) -> ScoreItem:
    """A ``ScoreItem`` carrying ``image_bytes(seed)`` and its digest."""
    data = image_bytes(seed)
    return ScoreItem(image_digest(data), data, tuple(sentences))


def png_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A small random RGB PNG, different for every seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", size)
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reference_engine(model_dir: Path) -> ItmEngine:
    """The engine the server runs, loaded directly: the scores every transport must reproduce."""
    return ItmEngine.from_pretrained(model_dir, EngineSettings(device="cpu", dtype="fp32"))


def reference_scores(engine: ItmEngine, image: bytes, sentences: Sequence[str]) -> list[ItmScore]:
    prepared = engine.prepare_image(image)
    return engine.score([ImageSentences(prepared.digest, prepared, list(sentences))])[0]


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throw-away CA, a server certificate (localhost, 127.0.0.1) and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    import subprocess

    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def make_certificates(directory: Path) -> Certificates:
    """Generate the certificates with the ``openssl`` CLI (the ``cryptography`` package is not installed)."""
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *curve,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    for name, usage, alt_names in (
        ("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
        ("client", "clientAuth", "DNS:trainer"),
    ):
        (directory / f"{name}.ext").write_text(f"subjectAltName={alt_names}\nextendedKeyUsage={usage}\n")
        _openssl("req", *curve, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=directory,
        )
    return Certificates(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )


class GatedEngine:
    """A real engine whose ``score`` waits until the test opens the gate: keeps a replica busy."""

    def __init__(self, engine: ItmEngine) -> None:
        self._engine = engine
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def score(self, requests: Sequence[ImageSentences]) -> list[list[ItmScore]]:
        self.entered.set()
        assert self.gate.wait(timeout=60), "test never opened the gate"
        return self._engine.score(requests)

    async def wait_entered(self) -> None:
        while not self.entered.is_set():
            await asyncio.sleep(0.005)


def gated_service(settings: ServerSettings) -> tuple[ScoringService, GatedEngine]:
    """A service of ``settings`` whose one engine replica waits at a gate: while the gate is shut,
    the first work sits in the engine and later work in the queue, however slow the machine."""
    engine = ItmEngine.from_pretrained(settings.model, engine_settings(settings, settings.device[0]))
    gated = GatedEngine(engine)
    return ScoringService([gated], settings), gated


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll ``condition`` (every 5 ms) until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)
