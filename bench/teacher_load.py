"""The teacher under load: warm and cold requests from separate processes, ramped past saturation.

    python bench/teacher_load.py                     # BLIP-base shapes, random weights, 10 minutes
    python bench/teacher_load.py --tiny --duration 60     # the test model: a quick look
    python bench/teacher_load.py --tiny --soak 10    # 10 minutes of steady overload, RSS sampled

What runs: a private ``redis-server`` (the score cache; the in-process cache when none is
installed) and ``python -m teacher_server serve`` as a child process (``bench/teacher_service.py``'s
``ProcessServer``; ``--serve-arg`` passes more flags, e.g. ``--serve-arg=--max-queue=64``). The
bench scores ``--warm-images`` images x ``--warm-sentences`` sentences once (the warm set, now in
the cache), then measures the capacity: ``--calib-clients`` threads sending cold requests back to
back (closed loop) for the first part of the run, beside warm requests at ``--warm-rate``.

Then the load, open loop: ``--clients`` processes send cold requests (a never-seen image x
``--cold-sentences`` sentences: every pair is scored by the model) and ``--warm-clients`` processes
send warm requests (one image of the warm set with its sentences: every score is in the cache), each
process with its own gRPC channels and HTTP client, on a fixed timetable whatever the answers
(requests are not held back when the server is slow, so the queue really fills). Each process
cycles its requests over the three doors: ``ScoreStream`` (``AsyncTeacherClient``, one stream),
``Score`` (unary) and ``POST /v1/score`` (JSON). No client retries: every refusal is counted.
The cold rate ramps in phases, ``--phases`` multiples of the measured capacity (default 0.25, 0.5,
1, 2, 4); warm requests arrive at ``--warm-rate`` per second in every phase. A request belongs
to the phase in which it was sent; ``served`` counts the answers that arrived inside the phase.

A cold image is one of a few JPEGs made per process with a unique comment segment (a counter):
its own SHA-256, so neither the score cache nor the vision cache (keyed by digest) has it, while
the client spends microseconds, not milliseconds, making it; decoders ignore the comment.

Reported per phase: offered and served requests/s and pairs/s, p50/p95/p99 latency of the warm
and the cold requests that succeeded (numpy's linear interpolation), errors by status code (gRPC
names; ``HTTP_<status>`` for the HTTP door), requests skipped because a client already had
``--max-outstanding`` in flight, and the server's RSS (``/proc``) at the start and end of the
phase. The last line is one JSON object: ``pairs_per_s_saturated`` (cold pairs answered per
second, mean over the phases at >= 2x capacity), ``warm_p99_ms_saturated`` (p99 of warm requests
sent during those phases), ``errors_other`` (errors other than RESOURCE_EXHAUSTED / HTTP 429, the
whole run), ``rss_growth_pct`` (server RSS after the load drained over RSS before it), ``phases``
(the table), the capacity, the settings and ``checks``.

``--soak MINUTES``: one phase of that length at ``--soak-load`` x capacity (default 2: saturated)
plus the warm rate, RSS sampled every ``--rss-every`` seconds; ``rss_growth_pct`` is then from the
end of the warm-up (``--soak-warmup`` seconds, default 20 % of the soak, at most 120 s) to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.teacher_service import ImageFactory, ProcessServer, load_average, sentences  # noqa: E402
from teacher_server.client import TeacherClient, TeacherRpcError  # noqa: E402

TRANSPORTS = ("stream", "score", "http")
DEFAULT_PHASES = (0.25, 0.5, 1.0, 2.0, 4.0)
SATURATED = 2.0  # phases at or above this multiple of the capacity count as saturated
SPARED_CODES = frozenset({"RESOURCE_EXHAUSTED", "HTTP_429"})  # the refusals overload is allowed
SCORE_PATH = "/v1/score"
# The server's own counts over the whole run (its /metrics), to explain the table: a warm answer
# not cached goes with Redis errors; engine work with sentences scored.
SERVER_COUNTERS = ("redis_errors_total", "sentences_scored_total", "images_encoded_total", "cache_hits_total")
START_GRACE_S = 1.0  # between "every client is connected" and the first send


# ------------------------------------------------------------------------------------- requests
def unique_jpeg(base: bytes, tag: str) -> bytes:
    """``base`` (a JPEG) with a comment segment holding ``tag`` after its SOI marker: the same
    pixels, a different SHA-256. Decoders skip COM segments (JPEG, ITU T.81, B.2.4.5)."""
    payload = tag.encode()
    if base[:2] != b"\xff\xd8" or len(payload) > 65533:
        raise ValueError("base must be a JPEG and tag at most 65533 bytes")
    return base[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + base[2:]


@dataclass(frozen=True)
class ClientPlan:
    """What one client process does: its kind, its timetable and how it reaches the server."""

    worker: int
    kind: str  # "warm" or "cold"
    target: str  # gRPC host:port
    http_url: str
    phases: tuple[tuple[float, float, float], ...]  # (start offset s, duration s, requests/s of this process)
    texts: tuple[str, ...]
    warm_images: tuple[bytes, ...] = ()
    timeout_s: float = 30.0
    max_outstanding: int = 1000
    seed: int = 0


# One answered or refused request: phase, kind, transport, sent and done (epoch s), latency (s),
# status code ("OK", a gRPC code name, "HTTP_<status>", "SKIPPED"), pairs asked, pairs not cached.
Record = tuple[int, str, str, float, float, float, str, int, int]


def client_process(plan: ClientPlan, ready: Any, go: Any, start_at: Any, results: Any) -> None:
    """Entry point of a client process (spawned): connect, wait for the start, run the timetable,
    send every record back through ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the run ends
    try:
        records = asyncio.run(_drive(plan, ready, go, start_at))
        results.put((plan.worker, records, None))
    except BaseException as exc:  # reported by the parent, which fails the run
        results.put((plan.worker, [], f"{type(exc).__name__}: {exc}"))


async def _drive(plan: ClientPlan, ready: Any, go: Any, start_at: Any) -> list[Record]:
    import httpx

    from teacher_server.client import AsyncTeacherClient

    stream = AsyncTeacherClient(plan.target, timeout_s=plan.timeout_s, max_retries=0, use_stream=True)
    unary = AsyncTeacherClient(plan.target, timeout_s=plan.timeout_s, max_retries=0, use_stream=False)
    limits = httpx.Limits(max_connections=plan.max_outstanding, max_keepalive_connections=plan.max_outstanding)
    http = httpx.AsyncClient(base_url=plan.http_url, timeout=plan.timeout_s + 5.0, limits=limits)
    rng = random.Random(plan.seed)
    bases = ImageFactory(seed=10_000 + plan.worker).fresh(4) if plan.kind == "cold" else []
    records: list[Record] = []
    try:
        await stream.model_info(timeout_s=120)  # channels up, limits known, before the clock starts
        await unary.model_info(timeout_s=120)
        (await http.get("/healthz")).raise_for_status()
        ready.put(plan.worker)
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        t0 = start_at.value
        pending: set[asyncio.Task] = set()
        counter = 0
        for index, (offset, duration, rate) in enumerate(plan.phases):
            if rate <= 0:
                continue
            begin, end = t0 + offset, t0 + offset + duration
            next_at = begin + rng.uniform(0.0, 1.0 / rate)  # processes out of step with each other
            while next_at < end:
                delay = next_at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                transport = TRANSPORTS[counter % len(TRANSPORTS)]
                if len(pending) >= plan.max_outstanding:
                    now = time.time()
                    records.append((index, plan.kind, transport, now, now, 0.0, "SKIPPED", 0, 0))
                else:
                    if plan.kind == "cold":
                        image = unique_jpeg(bases[counter % len(bases)], f"{plan.worker}-{counter}")
                    else:
                        image = plan.warm_images[rng.randrange(len(plan.warm_images))]
                    task = asyncio.create_task(
                        _one(index, plan, transport, image, stream, unary, http, records), name=f"request-{counter}"
                    )
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                counter += 1
                next_at += 1.0 / rate
        if pending:
            await asyncio.gather(*pending)
    finally:
        await http.aclose()
        await stream.close()
        await unary.close()
    return records


async def _one(
    phase: int,
    plan: ClientPlan,
    transport: str,
    image: bytes,
    stream: Any,
    unary: Any,
    http: Any,
    records: list[Record],
) -> None:
    import httpx

    texts = list(plan.texts)
    sent = time.time()
    began = time.perf_counter()
    code, uncached = "OK", 0
    try:
        if transport == "http":
            reply = await http.post(
                SCORE_PATH,
                json={"image": base64.b64encode(image).decode(), "sentences": texts},
                params={"timeout_ms": int(plan.timeout_s * 1000)},
            )
            if reply.status_code == 200:
                uncached = sum(not row["cached"] for row in reply.json()["scores"])
            else:
                code = f"HTTP_{reply.status_code}"
        else:
            client = stream if transport == "stream" else unary
            (scores,) = await client.score([image], [texts])
            uncached = sum(not score.cached for score in scores)
    except TeacherRpcError as exc:
        code = exc.code.name
    except httpx.TimeoutException:
        code = "HTTP_TIMEOUT"
    except httpx.HTTPError as exc:
        code = f"HTTP_{type(exc).__name__}"
    except Exception as exc:  # any other failure is counted under its type
        code = type(exc).__name__
    latency = time.perf_counter() - began
    records.append((phase, plan.kind, transport, sent, sent + latency, latency, code, len(texts), uncached))


# ---------------------------------------------------------------------------------- the server
def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from ``/proc/PID/status`` (Linux; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class RssSampler:
    """Samples a process's RSS every ``every_s`` seconds in a thread: ``samples`` = (epoch s, bytes)."""

    pid: int
    every_s: float
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> int:
        value = rss_bytes(self.pid)
        self.samples.append((time.time(), value))
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample()

    def at(self, when: float) -> int:
        """The sample nearest to ``when`` (0 with none)."""
        if not self.samples:
            return 0
        return min(self.samples, key=lambda sample: abs(sample[0] - when))[1]


def prewarm(target: str, images: Sequence[bytes], texts: Sequence[str], timeout_s: float) -> int:
    """Score the warm set once (it lands in the cache); returns how many of its scores a second
    ask still did not find cached (0 expected)."""
    with TeacherClient(target, timeout_s=timeout_s, max_retries=8) as client:
        for start in range(0, len(images), 8):
            chunk = list(images[start : start + 8])
            client.score(chunk, [list(texts)] * len(chunk))
        again = client.score(list(images), [list(texts)] * len(images))
    return sum(not score.cached for row in again for score in row)


def calibrate(
    target: str,
    clients: int,
    seconds: float,
    texts: Sequence[str],
    timeout_s: float,
    warm: tuple[Sequence[bytes], Sequence[str], float] | None = None,
) -> dict[str, float]:
    """Closed loop: ``clients`` threads send cold requests back to back for ``seconds``; the
    capacity is the requests (and pairs) answered per second. ``warm`` = (images, sentences,
    requests/s): one more thread sends those cached requests meanwhile (unary ``Score``), so the
    capacity is the one left for cold work beside the warm load of the phases."""
    stop_at = time.monotonic() + seconds
    done: list[float] = []
    lock = threading.Lock()

    def loop(index: int) -> None:
        bases = ImageFactory(seed=20_000 + index).fresh(2)
        with TeacherClient(target, timeout_s=timeout_s, max_retries=8) as client:
            client.model_info(timeout_s=60)
            counter = 0
            while time.monotonic() < stop_at:
                image = unique_jpeg(bases[counter % 2], f"calibrate-{index}-{counter}")
                began = time.perf_counter()
                client.score([image], [list(texts)])
                with lock:
                    done.append(time.perf_counter() - began)
                counter += 1

    def warm_loop(images: Sequence[bytes], warm_texts: Sequence[str], rate: float) -> None:
        with TeacherClient(target, timeout_s=timeout_s, max_retries=8) as client:
            next_at, counter = time.monotonic(), 0
            while next_at < stop_at:
                time.sleep(max(0.0, next_at - time.monotonic()))
                client.score([images[counter % len(images)]], [list(warm_texts)])
                counter += 1
                next_at += 1.0 / rate  # behind schedule: catch up at once (open loop)

    began = time.monotonic()
    threads = [threading.Thread(target=loop, args=(index,), daemon=True) for index in range(clients)]
    if warm is not None:
        threads.append(threading.Thread(target=warm_loop, args=warm, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began  # the last requests may finish after stop_at: count them
    if not done:
        raise RuntimeError("calibration answered no request")
    return {
        "requests_per_s": len(done) / elapsed,
        "pairs_per_s": len(done) * len(texts) / elapsed,
        "requests": len(done),
        "seconds": elapsed,
        "median_latency_ms": statistics.median(done) * 1000,
    }


# ------------------------------------------------------------------------------------- summary
def percentiles(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms (numpy's linear interpolation); None with no sample."""
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000.0, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2)}


@dataclass(frozen=True)
class Phase:
    name: str
    load: float  # cold rate as a multiple of the capacity
    offset_s: float
    duration_s: float
    cold_rps: float  # offered, all cold processes together
    warm_rps: float


def summarise_phase(phase: Phase, index: int, records: Sequence[Record], t0: float, rss: RssSampler) -> dict[str, Any]:
    """One row of the table: what was offered and served in ``phase``, latencies, errors, RSS."""
    begin, end = t0 + phase.offset_s, t0 + phase.offset_s + phase.duration_s
    mine = [r for r in records if r[0] == index]
    sent = [r for r in mine if r[6] != "SKIPPED"]
    served = [r for r in records if r[6] == "OK" and begin <= r[4] < end]
    row: dict[str, Any] = {
        "phase": phase.name,
        "load_x": phase.load,
        "seconds": round(phase.duration_s, 2),
        "offered_rps": round(len(mine) / phase.duration_s, 3),
        "offered_pairs_per_s": round(sum(r[7] for r in mine) / phase.duration_s, 2),
        "offered_cold_rps": round(sum(r[1] == "cold" for r in mine) / phase.duration_s, 3),
        "offered_warm_rps": round(sum(r[1] == "warm" for r in mine) / phase.duration_s, 3),
        "served_rps": round(len(served) / phase.duration_s, 3),
        "served_pairs_per_s": round(sum(r[7] for r in served) / phase.duration_s, 2),
        "served_cold_pairs_per_s": round(sum(r[7] for r in served if r[1] == "cold") / phase.duration_s, 2),
        "sent": len(sent),
        "skipped": len(mine) - len(sent),
        "ok": sum(r[6] == "OK" for r in sent),
        "errors": dict(sorted(Counter(r[6] for r in sent if r[6] != "OK").items())),
        "rss_start_mb": round(rss.at(begin) / 2**20, 1),
        "rss_end_mb": round(rss.at(end) / 2**20, 1),
    }
    for kind in ("warm", "cold"):
        latencies = [r[5] for r in sent if r[1] == kind and r[6] == "OK"]
        row.update({f"{kind}_{key}": value for key, value in percentiles(latencies).items()})
    # Per door and kind: where the failures and the slow answers are.
    row["doors"] = {
        f"{kind}_{door}": {
            "ok": sum(r[6] == "OK" for r in group),
            "failed": sum(r[6] != "OK" for r in group),
            "p50_ms": percentiles([r[5] for r in group if r[6] == "OK"])["p50_ms"],
        }
        for kind in ("warm", "cold")
        for door in TRANSPORTS
        if (group := [r for r in sent if r[1] == kind and r[2] == door])
    }
    return row


TABLE_COLUMNS = (
    ("phase", "{:>8}"),
    ("offered_cold_rps", "{:>9.2f}"),
    ("offered_warm_rps", "{:>9.2f}"),
    ("served_rps", "{:>8.2f}"),
    ("served_pairs_per_s", "{:>9.1f}"),
    ("warm_p50_ms", "{:>8}"),
    ("warm_p99_ms", "{:>8}"),
    ("cold_p50_ms", "{:>9}"),
    ("cold_p99_ms", "{:>9}"),
    ("rss_end_mb", "{:>8.1f}"),
)
TABLE_HEADER = (
    "   phase  cold/s in warm/s in  served/s  pairs/s  warm p50 warm p99  cold p50  cold p99  rss MiB  errors"
)


def table_line(row: dict[str, Any]) -> str:
    cells = []
    for key, fmt in TABLE_COLUMNS:
        value = row[key]
        cells.append(fmt.format("-" if value is None else value))
    errors = ", ".join(f"{code} {count}" for code, count in row["errors"].items()) or "0"
    if row["skipped"]:
        errors += f" (+{row['skipped']} skipped)"
    return " ".join(cells) + "  " + errors


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--tiny", action="store_true", help="the tiny test model (default: BLIP-base shapes)")
    model.add_argument("--model", help="a model directory or a hub id in the local cache (default: random weights)")
    parser.add_argument("--duration", type=float, default=600.0, help="the whole run, seconds (default 600)")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="one steady saturated phase this long")
    parser.add_argument("--soak-load", type=float, default=2.0, help="soak cold load, x capacity (default 2)")
    parser.add_argument("--soak-warmup", type=float, help="seconds of the soak before the RSS baseline")
    parser.add_argument("--phases", default=",".join(map(str, DEFAULT_PHASES)), help="cold loads, x capacity")
    parser.add_argument("--calib-share", type=float, default=0.12, help="share of --duration spent calibrating")
    parser.add_argument("--calib-clients", type=int, default=4, help="closed-loop threads measuring capacity")
    parser.add_argument("--capacity", type=float, help="cold requests/s to take as capacity (skips calibration)")
    parser.add_argument("--clients", type=int, default=2, help="cold client processes (default 2)")
    parser.add_argument("--warm-clients", type=int, default=2, help="warm client processes (default 2)")
    parser.add_argument("--warm-rate", type=float, default=10.0, help="warm requests/s, every phase (default 10)")
    parser.add_argument("--warm-images", type=int, default=16, help="images in the warm set")
    parser.add_argument("--warm-sentences", type=int, default=32, help="sentences per warm request")
    parser.add_argument("--cold-sentences", type=int, default=32, help="sentences per cold request")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="client deadline of every request")
    parser.add_argument("--max-outstanding", type=int, default=1000, help="in flight per client process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="server torch threads")
    parser.add_argument("--rss-every", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--no-redis", action="store_true", help="in-process score cache instead of Redis")
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="extra flag for serve (repeat; --serve-arg=--max-queue=64)"
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress lines (default: on a tty)"
    )
    args = parser.parse_args(argv)
    args.phases = [float(value) for value in args.phases.split(",") if value.strip()]
    for name in ("clients", "warm_clients", "warm_images", "warm_sentences", "cold_sentences", "calib_clients"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("duration", "timeout_s", "rss_every", "warm_rate"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.phases or any(value <= 0 for value in args.phases):
        parser.error(f"--phases must be positive multiples of the capacity, got {args.phases}")
    if args.soak is not None and args.soak <= 0:
        parser.error(f"--soak must be > 0 minutes, got {args.soak}")
    if not 0 < args.calib_share < 1:
        parser.error(f"--calib-share must be in (0, 1), got {args.calib_share}")
    return args


def plan_phases(args: argparse.Namespace, capacity_rps: float, load_s: float) -> list[Phase]:
    """The timetable: ramp phases over ``load_s`` seconds, or one soak phase."""
    if args.soak is not None:
        return [Phase("soak", args.soak_load, 0.0, load_s, args.soak_load * capacity_rps, args.warm_rate)]
    each = load_s / len(args.phases)
    return [
        Phase(f"{load:g}x", load, index * each, each, load * capacity_rps, args.warm_rate)
        for index, load in enumerate(args.phases)
    ]


def run_clients(
    args: argparse.Namespace,
    server: ProcessServer,
    phases: Sequence[Phase],
    warm_images: Sequence[bytes],
    rss: RssSampler,
    say: Any,
) -> tuple[float, list[Record]]:
    """Start the client processes, release them together, wait for their records."""
    context = multiprocessing.get_context("spawn")  # no forked gRPC state
    ready, results = context.Queue(), context.Queue()
    go, start_at = context.Event(), context.Value("d", 0.0)
    plans = []
    for worker in range(args.clients + args.warm_clients):
        cold = worker < args.clients
        share = args.clients if cold else args.warm_clients
        timetable = tuple((p.offset_s, p.duration_s, (p.cold_rps if cold else p.warm_rps) / share) for p in phases)
        plans.append(
            ClientPlan(
                worker=worker,
                kind="cold" if cold else "warm",
                target=server.target,
                http_url=server.http_url,
                phases=timetable,
                texts=tuple(sentences(args.cold_sentences if cold else args.warm_sentences)),
                warm_images=() if cold else tuple(warm_images),
                timeout_s=args.timeout_s,
                max_outstanding=args.max_outstanding,
                seed=worker,
            )
        )
    processes = [
        context.Process(target=client_process, args=(plan, ready, go, start_at, results), daemon=True) for plan in plans
    ]
    for process in processes:
        process.start()
    try:
        for _ in plans:
            ready.get(timeout=300)
        t0 = time.time() + START_GRACE_S
        start_at.value = t0
        go.set()
        end = t0 + sum(p.duration_s for p in phases)
        for phase in phases:
            say(
                f"phase {phase.name}: cold {phase.cold_rps:.2f}/s + warm {phase.warm_rps:.2f}/s "
                f"for {phase.duration_s:.0f} s"
            )
            time.sleep(max(0.0, t0 + phase.offset_s + phase.duration_s - time.time()))
            say(f"  server RSS {rss.sample() / 2**20:.1f} MiB")
        records: list[Record] = []
        failures = []
        for _ in plans:  # read before join: a child blocks until its large record list is taken
            worker, got, failure = results.get(timeout=max(60.0, end - time.time()) + args.timeout_s + 120)
            records.extend(got)
            if failure:
                failures.append(f"client {worker}: {failure}")
        if failures:
            raise RuntimeError("client processes failed: " + "; ".join(failures))
        return t0, records
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))  # finally blocks clean up
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from student.demo import redis_process
    from teacher_server.logs import show_progress
    from teacher_server.tiny_model import make_model_of_size

    progress = show_progress(args.progress)

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    began = time.monotonic()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-teacher-load-") as tmp:
        work = Path(tmp)
        if args.model:
            model_dir, model_name = args.model, args.model
        else:
            size = "tiny" if args.tiny else "base"
            say(f"building a random {size} BLIP ITM model ...")
            model_dir = str(make_model_of_size(size, work / "model"))
            model_name = "tiny random BLIP" if args.tiny else "BLIP-base shapes, random weights"
        with redis_process(work) as found_redis:
            redis_url = None if args.no_redis else found_redis
            server = ProcessServer(
                Path(model_dir), args.threads, redis_url, work / "server.log", extra_args=tuple(args.serve_arg)
            )
            server.launch()
            try:
                server.wait_ready()
                assert server.pid is not None
                say(
                    f"server ready at {server.target} ({time.monotonic() - began:.0f} s); cache: {redis_url or 'local'}"
                )
                warm_texts = sentences(args.warm_sentences)
                warm_images = ImageFactory(seed=1).fresh(args.warm_images)
                warm_not_cached = prewarm(server.target, warm_images, warm_texts, args.timeout_s * 4)
                setup_s = time.monotonic() - began
                if args.soak is not None:
                    load_s = args.soak * 60.0
                    calib_s = max(10.0, min(60.0, 0.05 * load_s))
                else:
                    calib_s = max(5.0, args.calib_share * args.duration)
                    load_s = args.duration - calib_s
                if args.capacity:
                    capacity = {"requests_per_s": args.capacity, "pairs_per_s": args.capacity * args.cold_sentences}
                else:
                    say(f"calibrating for {calib_s:.0f} s ({args.calib_clients} closed-loop clients) ...")
                    capacity = calibrate(
                        server.target,
                        args.calib_clients,
                        calib_s,
                        sentences(args.cold_sentences),
                        args.timeout_s * 4,
                        warm=(warm_images, warm_texts, args.warm_rate),
                    )
                say(f"capacity: {capacity['requests_per_s']:.2f} cold requests/s")
                phases = plan_phases(args, capacity["requests_per_s"], load_s)
                rss = RssSampler(server.pid, args.rss_every).start()
                rss_before = rss.samples[0][1]
                try:
                    t0, records = run_clients(args, server, phases, warm_images, rss, say)
                finally:
                    rss.stop()
                rss_after = rss.samples[-1][1]
                counters = {name: server.metric(f"hoidistill_teacher_{name}") for name in SERVER_COUNTERS}
            finally:
                server.stop()
    rows = [summarise_phase(phase, index, records, t0, rss) for index, phase in enumerate(phases)]
    print(
        f"\n{model_name}; capacity {capacity['requests_per_s']:.2f} cold requests/s "
        f"({capacity['pairs_per_s']:.1f} pairs/s) of 1 image x {args.cold_sentences} sentences"
    )
    print(TABLE_HEADER)
    for row in rows:
        print(table_line(row))

    saturated_indices = [i for i, phase in enumerate(phases) if phase.load >= SATURATED]
    saturated = [rows[i] for i in saturated_indices]
    warm_saturated = [r[5] for r in records if r[0] in saturated_indices and r[1] == "warm" and r[6] == "OK"]
    codes = Counter(r[6] for r in records if r[6] not in ("OK", "SKIPPED"))
    if args.soak is not None:
        warmup = args.soak_warmup if args.soak_warmup is not None else min(120.0, 0.2 * load_s)
        rss_base = rss.at(t0 + warmup)
    else:
        warmup, rss_base = 0.0, rss_before
    result = {
        "mode": "soak" if args.soak is not None else "ramp",
        "model": model_name,
        "pairs_per_s_saturated": round(statistics.fmean(r["served_cold_pairs_per_s"] for r in saturated), 2)
        if saturated
        else None,
        "warm_p99_ms_saturated": percentiles(warm_saturated)["p99_ms"],
        "errors_other": sum(count for code, count in codes.items() if code not in SPARED_CODES),
        "rss_growth_pct": round(100.0 * (rss_after - rss_base) / rss_base, 2) if rss_base else None,
        "errors": dict(sorted(codes.items())),
        "skipped": sum(r[6] == "SKIPPED" for r in records),
        "capacity": {key: round(value, 3) for key, value in capacity.items()},
        "phases": rows,
        "rss_mb": {
            "before_load": round(rss_before / 2**20, 1),
            "baseline": round(rss_base / 2**20, 1),
            "after_load": round(rss_after / 2**20, 1),
            "max": round(max(value for _, value in rss.samples) / 2**20, 1),
            "warmup_s": round(warmup, 1),
            "samples": len(rss.samples),
            # (seconds since the load began, MiB), at most 30 evenly spaced: growing or levelling off
            "trace": [
                [round(when - t0, 1), round(value / 2**20, 1)]
                for when, value in rss.samples[:: max(1, math.ceil(len(rss.samples) / 30))]
            ],
        },
        "workload": {
            "cold": f"1 new image x {args.cold_sentences} sentences, {args.clients} processes",
            "warm": f"1 of {args.warm_images} cached images x {args.warm_sentences} sentences, "
            f"{args.warm_clients} processes, {args.warm_rate:g}/s",
            "transports": list(TRANSPORTS),
            "timeout_s": args.timeout_s,
            "serve_args": list(args.serve_arg),
            "threads": args.threads,
            "cache": "redis" if redis_url else "local",
        },
        "checks": {
            "warm_set_not_cached": warm_not_cached,
            "warm_answers_not_cached": sum(r[8] for r in records if r[1] == "warm" and r[6] == "OK"),
            "cold_answers_cached": sum(r[7] - r[8] for r in records if r[1] == "cold" and r[6] == "OK"),
        },
        "server_counters": counters,
        "setup_s": round(setup_s, 1),
        "seconds": round(time.monotonic() - began, 1),
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
