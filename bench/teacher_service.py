"""The teacher service against the bare engine: transport cost, score cache, concurrent clients.

    python bench/teacher_service.py --size base    # BLIP-base architecture, random weights (~10 min)
    python bench/teacher_service.py --size tiny    # the test model, seconds

One run measures, side by side on the same weights and torch thread budget:

(a) ``service_ratio``: the same work (``--images`` fresh JPEG images x ``--sentences`` sentences)
    scored by the in-process ``ItmEngine`` (decode + preprocess + one ``score`` call) and through
    the gRPC service with ``TeacherClient`` (digest-first request, "image required", resend with
    bytes, validation, cache lookup, batcher, the same engine call, cache write). Both sides see
    fresh images, so both the score cache and the vision LRU miss: the same model work. The two
    run alternately ``--reps`` times, the order flipping each rep (engine, service, service,
    engine, ...: a linear drift of the machine's load cancels); the figure is the service's
    throughput over all its runs divided by the engine's (total pairs / total seconds each).
    CPU seconds are counted too (this process plus the server process, both sides), because on a
    shared machine the wall clock also measures the neighbours: ``service_cpu_ratio`` = engine
    CPU seconds / service CPU seconds for the same work.
(b) ``warm_speedup``: latency of one request (1 image x ``--latency-sentences``) the first time
    (cold: everything is computed) over the same request again (warm: every score comes from the
    score cache: the in-process LRU, or Redis with ``--redis-url``); medians over repeats.
(c) 1, 2, 4, 8, 16 concurrent clients (``--levels``), each a thread with its own
    ``TeacherClient`` (own channel), sending requests back to back: throughput in sentences/s
    and p50/p99 latency, once cold (every request a fresh image, all scored by the model) and
    once warm (the cold table's requests again, all served from the score cache).

The server: ``--server process`` (default) runs ``python -m teacher_server serve`` as a child
process with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``, the deployed code path with
its own interpreter (no GIL shared with the clients); ``--server thread`` runs ``TeacherServer``
in a background thread of this process over the very engine object the in-process side uses
(``torch.set_num_threads`` is process-wide, so the budget is the same by construction). The
bench's own engine runs with ``torch.set_num_threads(--threads)``.

Tables go to stdout; the last line is one JSON object with ``service_ratio``, ``warm_speedup``,
``concurrency`` and ``concurrency_warm`` (rows per client count), ``size``, ``threads``, the load
average before and after, and ``checks`` (metrics and scores confirming what was measured).
Percentiles are numpy's linear interpolation: with fewer than 100 requests, p99 is close to the max.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from teacher_server.client import TeacherClient, TeacherScore  # noqa: E402

PROFILES: dict[str, dict[str, Any]] = {
    # base: 9.6 minutes measured on the 2-core dev machine at load average 3-5, more than half of
    # it the cold concurrency table (every request encodes a new image); a busier machine
    # stretches it. Lower --conc-requests / --levels to shorten it. tiny: a smoke run.
    "base": {
        "images": 8,
        "sentences": 32,
        "reps": 2,
        "latency_sentences": 32,
        "cold_reps": 2,
        "warm_reps": 30,
        "conc_images": 1,
        "conc_sentences": 8,
        "conc_requests": 8,
        "warm_conc_requests": 160,
    },
    "tiny": {
        "images": 8,
        "sentences": 32,
        "reps": 3,
        "latency_sentences": 32,
        "cold_reps": 3,
        "warm_reps": 30,
        "conc_images": 1,
        "conc_sentences": 8,
        "conc_requests": 16,
        "warm_conc_requests": 160,
    },
}
VERBS = ("ride", "hold", "kick", "eat", "sit on", "walk", "throw", "carry", "read", "repair", "watch", "wash")
OBJECTS = ("horse", "cup", "sports ball", "pizza", "bench", "dog", "frisbee", "surfboard", "book", "bicycle", "tv")
START_TIMEOUT_S = 600.0  # the base model loads slowly on a busy machine
CALL_TIMEOUT_S = 1800.0  # a 16-client burst of cold base requests queues for minutes on 2 cores


# ------------------------------------------------------------------------------------- workload
def sentences(count: int) -> list[str]:
    """``count`` distinct HOI sentences ("a person ride a horse", ...)."""
    out = []
    for index in range(count):
        verb, obj = VERBS[index % len(VERBS)], OBJECTS[(index // len(VERBS)) % len(OBJECTS)]
        round_ = index // (len(VERBS) * len(OBJECTS))
        out.append(f"a person {verb} a {obj}" + (f" number {round_}" if round_ else ""))
    return out


class ImageFactory:
    """Fresh 640 x 480 JPEG images, photo-like (smooth colour fields + grain), never the same twice.

    Each has its own SHA-256, so neither the score cache nor the vision LRU has seen it.
    """

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def fresh(self, count: int) -> list[bytes]:
        return [self._one() for _ in range(count)]

    def _one(self) -> bytes:
        coarse = Image.fromarray(self._rng.integers(0, 256, (15, 20, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((640, 480), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = self._rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        return buffer.getvalue()


def make_model(size: str, directory: Path) -> None:
    """Tiny: the test model. Base: BLIP-base shapes (ViT-B/16 at 384 px, 12-layer BERT-base text)."""
    from teacher_server.tiny_model import make_model_of_size

    make_model_of_size(size, directory)


def percentiles_ms(latencies_s: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds, numpy's linear interpolation."""
    p50, p99 = np.percentile(np.asarray(latencies_s, dtype=np.float64) * 1000.0, [50, 99])
    return float(p50), float(p99)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


# -------------------------------------------------------------------------------------- servers
class BenchServer(Protocol):
    """A running teacher the bench talks to over loopback gRPC."""

    target: str
    description: str

    def metric(self, name: str) -> float:
        """Current value of one unlabelled service metric (full sample name)."""

    def cpu_seconds(self) -> float:
        """CPU time the server used so far beyond this process (0 when it runs inside it)."""

    def stop(self) -> None: ...


@dataclass
class ThreadServer:
    """``TeacherServer`` in this process, its asyncio loop in a background thread, over ``engine``."""

    engine: Any
    settings: Any
    target: str = ""
    description: str = "thread (TeacherServer in this process, same engine object)"
    _loop: Any = None
    _thread: threading.Thread | None = None
    _server: Any = None

    def start(self) -> ThreadServer:
        import asyncio

        from teacher_server.server import TeacherServer
        from teacher_server.service import ScoringService

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-teacher-loop", daemon=True)
        self._thread.start()

        async def build() -> tuple[Any, int]:
            server = TeacherServer(self.settings, ScoringService([self.engine], self.settings))
            return server, await server.start()

        self._server, port = asyncio.run_coroutine_threadsafe(build(), self._loop).result(START_TIMEOUT_S)
        self.target = f"127.0.0.1:{port}"
        return self

    def metric(self, name: str) -> float:
        return self._server.service.metrics.value(name)

    def cpu_seconds(self) -> float:
        return 0.0  # its threads are in this process: time.process_time() counts them

    def stop(self) -> None:
        import asyncio

        if self._server is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._server.stop(5.0), self._loop).result(60)
        finally:
            self._server = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()


@dataclass
class ProcessServer:
    """``python -m teacher_server serve`` as a child process, ready when gRPC health says SERVING."""

    model_dir: Path
    threads: int
    redis_url: str | None
    log_path: Path
    target: str = ""
    description: str = ""
    extra_args: tuple[str, ...] = ()  # more ``serve`` flags (bench/teacher_load.py: --serve-arg)
    _process: subprocess.Popen | None = None
    _http_port: int = 0
    _log: Any = None

    def launch(self) -> ProcessServer:
        """Start the child (it loads the model while the bench loads its own engine)."""
        grpc_port, self._http_port = free_port(), free_port()
        command = [
            sys.executable,
            "-m",
            "teacher_server",
            "serve",
            "--log-level",
            "WARNING",
            "--model",
            str(self.model_dir),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(self._http_port),
        ]
        if self.redis_url:
            command += ["--redis-url", self.redis_url]
        command += list(self.extra_args)
        # Settings come from the flags only: a stray HOIDISTILL_* variable must not change the bench.
        env = {key: value for key, value in os.environ.items() if not key.startswith("HOIDISTILL_")}
        threads = str(self.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.target = f"127.0.0.1:{grpc_port}"
        self.description = (
            f"process (python -m teacher_server serve, OMP_NUM_THREADS={threads}, pid {self._process.pid})"
        )
        return self

    @property
    def pid(self) -> int | None:
        """The child's process id (None before ``launch`` and after ``stop``)."""
        return None if self._process is None else self._process.pid

    @property
    def http_url(self) -> str:
        """Base URL of the child's HTTP API (``/v1/score``, ``/metrics``)."""
        return f"http://127.0.0.1:{self._http_port}"

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self._process is None or self._process.poll() is not None:
                    raise RuntimeError(f"the teacher server exited while starting:\n{self._log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet: the model is still loading
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the teacher server was not ready after {timeout_s:.0f} s:\n{self._log_tail()}")
                time.sleep(0.5)

    def metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self._http_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return float(sample.value)
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the child, all its threads, from ``/proc`` (Linux)."""
        if self._process is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self._process.pid}/stat").read_text()
        except OSError:
            return math.nan  # not Linux: CPU figures are then NaN, the wall-clock ones still hold
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # graceful: readiness off, drain, exit
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        self._log.close()

    def _log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------- measurements
@dataclass
class Checks:
    """Evidence that each figure measured what it says, collected along the way."""

    max_abs_diff: float = 0.0  # |service score - engine score| over the warm-up pairs
    service_images_encoded: int = 0  # by the server during (a)'s service runs
    service_images_sent: int = 0
    service_sentences_scored: int = 0
    service_sentences_sent: int = 0
    cold_cached_scores: int = 0  # scores marked cached in cold answers (must be 0)
    warm_uncached_scores: int = 0  # scores not marked cached in warm answers (must be 0)
    warm_changed_scores: int = 0  # warm scores differing from the cold answer (must be 0)
    warm_cache_hits: int = 0  # cache-hit metric during the warm repeats
    warm_sentences_asked: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff_vs_engine": self.max_abs_diff,
            "scores_match_engine": self.max_abs_diff <= 1e-6,
            "a_service_images_encoded": self.service_images_encoded,
            "a_service_images_sent": self.service_images_sent,
            "a_service_sentences_scored": self.service_sentences_scored,
            "a_service_sentences_sent": self.service_sentences_sent,
            "a_same_work": self.service_images_encoded == self.service_images_sent
            and self.service_sentences_scored == self.service_sentences_sent,
            "b_cold_cached_scores": self.cold_cached_scores,
            "b_warm_uncached_scores": self.warm_uncached_scores,
            "b_warm_changed_scores": self.warm_changed_scores,
            "b_warm_cache_hits": self.warm_cache_hits,
            "b_warm_sentences_asked": self.warm_sentences_asked,
            "b_warm_all_cached": self.warm_uncached_scores == 0
            and self.warm_changed_scores == 0
            and self.warm_cache_hits == self.warm_sentences_asked,
            "notes": self.notes,
        }


def engine_seconds(engine: Any, blobs: Sequence[bytes], texts: Sequence[str]) -> tuple[float, list[list[Any]]]:
    """In-process: decode + preprocess every image, then one ``score`` call (as the batcher makes).

    Returns the seconds and the ``ItmScore`` rows, one per image."""
    from teacher_server.engine import ImageSentences

    start = time.perf_counter()
    prepared = [engine.prepare_image(blob) for blob in blobs]
    results = engine.score([ImageSentences(p.digest, p, list(texts)) for p in prepared])
    return time.perf_counter() - start, results


def client_seconds(
    client: TeacherClient, blobs: Sequence[bytes], texts: Sequence[str]
) -> tuple[float, list[list[TeacherScore]]]:
    """Through the service: one ``TeacherClient.score`` call, digest-first with the resend of bytes."""
    start = time.perf_counter()
    results = client.score(list(blobs), [list(texts)] * len(blobs), timeout_s=CALL_TIMEOUT_S)
    return time.perf_counter() - start, results


def warm_up(engine: Any, client: TeacherClient, factory: ImageFactory, texts: Sequence[str], checks: Checks) -> None:
    """First calls pay for allocators and lazy imports; they also pin down score equality
    (the service's logits and probabilities against the in-process engine's, same images)."""
    client.model_info(timeout_s=60)  # the client asks the limits once; not part of any timing
    blobs = factory.fresh(2)
    _, expected = engine_seconds(engine, blobs, texts)
    _, served = client_seconds(client, blobs, texts)
    for got_row, want_row in zip(served, expected, strict=True):
        for got, want in zip(got_row, want_row, strict=True):
            diff = max(abs(got.match_prob - want.match_prob), abs(got.match_logit - want.match_logit))
            checks.max_abs_diff = max(checks.max_abs_diff, diff)


def measure_service_ratio(
    engine: Any,
    client: TeacherClient,
    server: BenchServer,
    factory: ImageFactory,
    *,
    images: int,
    texts: Sequence[str],
    reps: int,
    checks: Checks,
) -> dict[str, Any]:
    """(a) The same cold work in-process and through gRPC, alternating; throughput ratio."""
    pairs = images * len(texts)
    rows = []
    print(f"\n(a) {images} images x {len(texts)} sentences = {pairs} pairs, cold caches, {reps} rep(s)")
    print(
        "{:>3}  {:>9}  {:>9}  {:>13}  {:>14}  {:>6}  {:>12}  {:>13}".format(
            "rep", "engine s", "service s", "engine sent/s", "service sent/s", "ratio", "engine cpu s", "service cpu s"
        )
    )
    for rep in range(reps):
        engine_blobs, service_blobs = factory.fresh(images), factory.fresh(images)
        before = (
            server.metric("hoidistill_teacher_images_encoded_total"),
            server.metric("hoidistill_teacher_sentences_scored_total"),
        )

        def run_engine(blobs: list[bytes] = engine_blobs) -> float:
            return engine_seconds(engine, blobs, texts)[0]

        def run_service(blobs: list[bytes] = service_blobs) -> float:
            return client_seconds(client, blobs, texts)[0]

        order: list[tuple[str, Callable[[], float]]] = [("engine", run_engine), ("service", run_service)]
        if rep % 2:
            order.reverse()
        seconds, cpu = {}, {}
        for name, run in order:
            cpu_before = time.process_time() + server.cpu_seconds()
            seconds[name] = run()
            cpu[name] = time.process_time() + server.cpu_seconds() - cpu_before
        checks.service_images_encoded += int(server.metric("hoidistill_teacher_images_encoded_total") - before[0])
        checks.service_sentences_scored += int(server.metric("hoidistill_teacher_sentences_scored_total") - before[1])
        checks.service_images_sent += images
        checks.service_sentences_sent += pairs
        ratio = seconds["engine"] / seconds["service"]  # throughputs of the same pairs
        rows.append(
            {
                "first": order[0][0],
                "engine_s": seconds["engine"],
                "service_s": seconds["service"],
                "ratio": ratio,
                "engine_cpu_s": cpu["engine"],
                "service_cpu_s": cpu["service"],
            }
        )
        print(
            f"{rep:>3}  {seconds['engine']:>9.3f}  {seconds['service']:>9.3f}  {pairs / seconds['engine']:>13.2f}  "
            f"{pairs / seconds['service']:>14.2f}  {ratio:>6.3f}  {cpu['engine']:>12.2f}  {cpu['service']:>13.2f}",
            flush=True,
        )
    engine_s, service_s = (sum(row[key] for row in rows) for key in ("engine_s", "service_s"))
    engine_cpu, service_cpu = (sum(row[key] for row in rows) for key in ("engine_cpu_s", "service_cpu_s"))
    return {
        "service_ratio": engine_s / service_s,  # = service pairs/s over all runs / engine pairs/s
        "engine_sentences_per_s": pairs * reps / engine_s,
        "service_sentences_per_s": pairs * reps / service_s,
        "service_cpu_ratio": engine_cpu / service_cpu if service_cpu > 0 else math.nan,
        "median_paired_ratio": statistics.median(row["ratio"] for row in rows),
        "rows": rows,
    }


def measure_warm_speedup(
    client: TeacherClient,
    server: BenchServer,
    factory: ImageFactory,
    *,
    texts: Sequence[str],
    cold_reps: int,
    warm_reps: int,
    checks: Checks,
) -> dict[str, Any]:
    """(b) One request cold (new image), then the identical request again from the score cache."""
    cold, warm = [], []
    for _ in range(cold_reps):
        blobs = factory.fresh(1)
        seconds, first = client_seconds(client, blobs, texts)
        cold.append(seconds)
        checks.cold_cached_scores += sum(score.cached for score in first[0])
        hits_before = server.metric("hoidistill_teacher_cache_hits_total")
        for _ in range(max(1, warm_reps // cold_reps)):
            seconds, again = client_seconds(client, blobs, texts)
            warm.append(seconds)
            checks.warm_uncached_scores += sum(not score.cached for score in again[0])
            checks.warm_changed_scores += sum(
                (a.match_logit, a.match_prob) != (b.match_logit, b.match_prob)
                for a, b in zip(again[0], first[0], strict=True)
            )
            checks.warm_sentences_asked += len(texts)
        checks.warm_cache_hits += int(server.metric("hoidistill_teacher_cache_hits_total") - hits_before)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    print(f"\n(b) 1 image x {len(texts)} sentences, same request cold then warm")
    print(f"    cold  median {cold_s * 1000:10.2f} ms  over {len(cold)} fresh image(s)")
    print(f"    warm  median {warm_s * 1000:10.2f} ms  over {len(warm)} repeats (every score from the cache)")
    print(f"    warm_speedup {cold_s / warm_s:10.1f}x", flush=True)
    return {"warm_speedup": cold_s / warm_s, "cold_ms": cold_s * 1000, "warm_ms": warm_s * 1000}


@dataclass(frozen=True)
class Request:
    blobs: list[bytes]
    texts: list[list[str]]

    @property
    def sentences(self) -> int:
        return sum(len(group) for group in self.texts)


def run_level(
    target: str, clients: int, requests: Sequence[Request]
) -> tuple[dict[str, Any], list[list[TeacherScore]]]:
    """``clients`` threads, each its own ``TeacherClient``, sending their share of ``requests``
    back to back from a common start; throughput over the whole level, latency per request."""
    shares = [list(requests[index::clients]) for index in range(clients)]
    connections = [TeacherClient(target, timeout_s=CALL_TIMEOUT_S, max_retries=8) for _ in range(clients)]
    for connection in connections:  # channel up and limits known before the clock starts
        connection.model_info(timeout_s=60)
    start_line = threading.Barrier(clients + 1)

    def client_loop(connection: TeacherClient, share: list[Request]) -> list[tuple[float, list[list[TeacherScore]]]]:
        start_line.wait()
        done = []
        for request in share:
            began = time.perf_counter()
            scores = connection.score(request.blobs, request.texts, timeout_s=CALL_TIMEOUT_S)
            done.append((time.perf_counter() - began, scores))
        return done

    try:
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client_loop, c, s) for c, s in zip(connections, shares, strict=True)]
            start_line.wait()
            began = time.perf_counter()
            outcomes = [future.result() for future in futures]
            wall = time.perf_counter() - began
    finally:
        for connection in connections:
            connection.close()
    latencies = [seconds for outcome in outcomes for seconds, _ in outcome]
    answers = [scores for outcome in outcomes for _, scores in outcome]
    scored = sum(request.sentences for request in requests)
    p50, p99 = percentiles_ms(latencies)
    row = {
        "clients": clients,
        "requests": len(requests),
        "sentences": scored,
        "seconds": wall,
        "sentences_per_s": scored / wall,
        "p50_ms": p50,
        "p99_ms": p99,
    }
    return row, answers


def print_level(row: dict[str, Any]) -> None:
    print(
        f"{row['clients']:>7}  {row['requests']:>8}  {row['sentences']:>9}  {row['seconds']:>8.2f}  "
        f"{row['sentences_per_s']:>11.2f}  {row['p50_ms']:>10.1f}  {row['p99_ms']:>10.1f}",
        flush=True,
    )


LEVEL_HEADER = "{:>7}  {:>8}  {:>9}  {:>8}  {:>11}  {:>10}  {:>10}".format(
    "clients", "requests", "sentences", "wall s", "sentences/s", "p50 ms", "p99 ms"
)


def measure_concurrency(
    target: str,
    factory: ImageFactory,
    *,
    levels: Sequence[int],
    images: int,
    texts: Sequence[str],
    requests_per_level: int,
    warm_requests_per_level: int,
    checks: Checks,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(c) Cold then warm tables over client counts; every client sends at least one request
    (with more clients than ``requests_per_level``, the level is one simultaneous burst)."""
    cold_rows, seen = [], []
    print(f"\n(c) concurrent clients, cold: every request {images} fresh image(s) x {len(texts)} sentences")
    print(LEVEL_HEADER)
    for clients in levels:
        count = max(requests_per_level, clients)
        requests = [Request(factory.fresh(images), [list(texts)] * images) for _ in range(count)]
        row, answers = run_level(target, clients, requests)
        checks.cold_cached_scores += sum(s.cached for answer in answers for group in answer for s in group)
        cold_rows.append(row)
        seen.extend(requests)
        print_level(row)
    warm_rows = []
    print("\n(c) concurrent clients, warm: the cold requests again, every score from the cache")
    print(LEVEL_HEADER)
    for clients in levels:
        count = max(warm_requests_per_level, clients)
        requests = [seen[index % len(seen)] for index in range(count)]
        row, answers = run_level(target, clients, requests)
        uncached = sum(not s.cached for answer in answers for group in answer for s in group)
        if uncached:  # the LRU may have evicted some; say so rather than hide it
            checks.notes.append(f"warm table, {clients} clients: {uncached} scores were not cached")
        row["uncached_scores"] = uncached
        warm_rows.append(row)
        print_level(row)
    return cold_rows, warm_rows


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(PROFILES), default="tiny", help="model size (default tiny)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads, both sides (default: all cores)"
    )
    parser.add_argument(
        "--server",
        choices=("process", "thread"),
        default="process",
        help="serve from a child process (default) or a thread of this process; see the module docstring",
    )
    parser.add_argument(
        "--redis-url", default=None, help="score cache in Redis (then (b) measures the Redis path); default in-process"
    )
    counts = parser.add_argument_group("counts (defaults depend on --size)")
    counts.add_argument("--images", type=int, help="(a) images per run")
    counts.add_argument("--sentences", type=int, help="(a) sentences per image")
    counts.add_argument("--reps", type=int, help="(a) alternating engine/service repetitions")
    counts.add_argument("--latency-sentences", type=int, help="(b) sentences of the one-image request")
    counts.add_argument("--cold-reps", type=int, help="(b) cold requests, each with a fresh image")
    counts.add_argument("--warm-reps", type=int, help="(b) warm repeats in total")
    counts.add_argument("--levels", default="1,2,4,8,16", help="(c) client counts (default 1,2,4,8,16)")
    counts.add_argument("--conc-images", type=int, help="(c) images per request")
    counts.add_argument("--conc-sentences", type=int, help="(c) sentences per image")
    counts.add_argument("--conc-requests", type=int, help="(c) cold requests per level (at least 1 per client)")
    counts.add_argument("--warm-conc-requests", type=int, help="(c) warm requests per level")
    args = parser.parse_args(argv)
    for name, value in PROFILES[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.levels = [int(level) for level in args.levels.split(",")]
    for name in (*PROFILES[args.size], "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(level < 1 for level in args.levels):
        parser.error(f"--levels must be positive client counts, got {args.levels}")
    return args


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    # SystemExit unwinds through the finally blocks: the server child is stopped, the temporary
    # model directory (about 1 GB at base) removed.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from teacher_server.cli import quiet_library_chatter
    from teacher_server.engine import ItmEngine
    from teacher_server.service import engine_settings
    from teacher_server.settings import ServerSettings

    torch.set_num_threads(args.threads)
    quiet_library_chatter()
    load_before = load_average()
    print(f"load average before: {load_before} on {os.cpu_count()} cores", flush=True)
    checks = Checks()
    factory = ImageFactory(seed=0)
    with tempfile.TemporaryDirectory(prefix="bench-teacher-service-") as tmp:
        model_dir = Path(tmp) / "model"
        print(f"building a random {args.size} BLIP ITM model ...", flush=True)
        make_model(args.size, model_dir)
        settings = ServerSettings(
            model=str(model_dir),
            device=("cpu",),
            dtype="fp32",
            host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            redis_url=args.redis_url,
            drain_timeout_s=5.0,
        )
        server: Any = None
        if args.server == "process":  # launched first: it loads its model while we load ours
            server = ProcessServer(model_dir, args.threads, args.redis_url, Path(tmp) / "server.log").launch()
        try:
            # The engine settings the service derives from the same settings: identical engines.
            engine = ItmEngine.from_pretrained(model_dir, engine_settings(settings, "cpu"))
            if args.server == "process":
                server.wait_ready()
            else:
                server = ThreadServer(engine, settings).start()
            print(f"server: {server.description} at {server.target}; cache: {args.redis_url or 'in-process LRU'}")
            with TeacherClient(server.target, timeout_s=CALL_TIMEOUT_S) as client:
                warm_up(engine, client, factory, sentences(min(args.sentences, 8)), checks)
                ratio = measure_service_ratio(
                    engine,
                    client,
                    server,
                    factory,
                    images=args.images,
                    texts=sentences(args.sentences),
                    reps=args.reps,
                    checks=checks,
                )
                latency = measure_warm_speedup(
                    client,
                    server,
                    factory,
                    texts=sentences(args.latency_sentences),
                    cold_reps=args.cold_reps,
                    warm_reps=args.warm_reps,
                    checks=checks,
                )
            cold_rows, warm_rows = measure_concurrency(
                server.target,
                factory,
                levels=args.levels,
                images=args.conc_images,
                texts=sentences(args.conc_sentences),
                requests_per_level=args.conc_requests,
                warm_requests_per_level=args.warm_conc_requests,
                checks=checks,
            )
            description = server.description
        finally:
            if server is not None:
                server.stop()
    load_after = load_average()
    print(
        f"\nservice_ratio {ratio['service_ratio']:.3f} (target >= 0.9; by CPU seconds "
        f"{ratio['service_cpu_ratio']:.3f}), warm_speedup {latency['warm_speedup']:.1f} (target >= 50); "
        f"load average after: {load_after}"
    )
    result = {
        "size": args.size,
        "threads": args.threads,
        "server": description,
        "cache": "redis" if args.redis_url else "local",
        "service_ratio": round(ratio["service_ratio"], 4),
        "warm_speedup": round(latency["warm_speedup"], 2),
        "engine_sentences_per_s": round(ratio["engine_sentences_per_s"], 3),
        "service_sentences_per_s": round(ratio["service_sentences_per_s"], 3),
        "service_cpu_ratio": _round(ratio["service_cpu_ratio"], 4),
        "median_paired_ratio": round(ratio["median_paired_ratio"], 4),
        "ratio_rows": [_rounded(row) for row in ratio["rows"]],
        "cold_ms": round(latency["cold_ms"], 3),
        "warm_ms": round(latency["warm_ms"], 3),
        "concurrency": [_rounded(row) for row in cold_rows],
        "concurrency_warm": [_rounded(row) for row in warm_rows],
        "workload": {
            "a": f"{args.images} images x {args.sentences} sentences, {args.reps} reps",
            "b": f"1 image x {args.latency_sentences} sentences, {args.cold_reps} cold, {args.warm_reps} warm",
            "c": f"{args.conc_images} image(s) x {args.conc_sentences} sentences per request",
        },
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpu_count": os.cpu_count(),
        "checks": checks.as_dict(),
    }
    print(json.dumps(result))
    return 0


def _round(value: float, digits: int) -> float | None:
    """Rounded for the JSON line; NaN (not measurable here) becomes null."""
    return round(value, digits) if math.isfinite(value) else None


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {key: _round(value, 6) if isinstance(value, float) else value for key, value in row.items()}


if __name__ == "__main__":
    sys.exit(main())
