"""Faults under load: two teacher processes sharing one Redis, behind one client endpoint list.

While client threads keep scoring (``TeacherClient`` unary calls and an ``AsyncTeacherClient``
stream, all on the target ``ipv4:127.0.0.1:P1,127.0.0.1:P2``), the test restarts Redis, sends
SIGTERM to one teacher (it must drain and exit 0; then it is started again) and kills the other
with SIGKILL (then starts it again). Every request must come back with the score a reference
engine computes for that image and sentence (no wrong score), or not at all, and not at all never
happens: the client retries UNAVAILABLE and gRPC's round_robin sends the retry to the teacher that
is up (no lost request). Each fault waits until some requests succeeded after the previous one, so
every fault happens under load; the counts are asserted, never a time.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from testkit.processes import TeacherProcess
from testkit.servers import RedisServer
from testkit.teacher import png_bytes, reference_scores, wait_until

from teacher_server.client import AsyncTeacherClient, TeacherClient, TeacherRpcError
from teacher_server.engine import ItmEngine

IMAGES = 16
SENTENCES = [f"a person {verb} a {obj}" for verb in ("ride", "hold", "feed") for obj in ("horse", "cup", "dog")]
PER_REQUEST = 4  # sentences of one request, drawn from SENTENCES
UNARY_CLIENTS = 3
# Generous: a retry may wait for a teacher to start again (seconds on a busy machine); the
# assertion is that no request runs out of it, not how long any took.
CLIENT_TIMEOUT_S = 60.0
MAX_RETRIES = 12
ANSWERS_BETWEEN_FAULTS = 25  # requests answered after each fault before the next one
TOLERANCE = 1e-5  # batch composition changes the float sums in the last digits, never more


@dataclass
class Tally:
    """What the load saw: answers checked against the reference, failures by code."""

    answered: int = 0
    wrong: list[str] = field(default_factory=list)
    lost: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stage: str = "start"  # the fault going on, named in failures

    def check(self, image: int, texts: Sequence[str], scores: Sequence, reference: dict) -> None:
        with self.lock:
            self.answered += 1
            for text, score in zip(texts, scores, strict=True):
                want = reference[image][text]
                if (
                    abs(score.match_logit - want.match_logit) > TOLERANCE
                    or abs(score.match_prob - want.match_prob) > TOLERANCE
                ):
                    self.wrong.append(f"image {image} {text!r}: {score} != {want}")

    def fail(self, error: BaseException, door: str) -> None:
        with self.lock:
            code = error.code.name if isinstance(error, TeacherRpcError) else type(error).__name__
            self.lost[f"{door} during {self.stage}: {code}: {error}"[:300]] += 1


def draw(rng: random.Random) -> tuple[int, list[str]]:
    return rng.randrange(IMAGES), rng.sample(SENTENCES, PER_REQUEST)


def unary_load(
    target: str, images: list[bytes], reference: dict, tally: Tally, stop: threading.Event, seed: int
) -> None:
    rng = random.Random(seed)
    with TeacherClient(target, timeout_s=CLIENT_TIMEOUT_S, max_retries=MAX_RETRIES, backoff_s=0.1) as client:
        while not stop.is_set():
            image, texts = draw(rng)
            try:
                (scores,) = client.score([images[image]], [texts])
            except Exception as exc:  # every failure is a lost request: counted, then asserted
                tally.fail(exc, "Score")
            else:
                tally.check(image, texts, scores, reference)


def stream_load(target: str, images: list[bytes], reference: dict, tally: Tally, stop: threading.Event) -> None:
    """Requests over one ``ScoreStream`` at a time, several in flight (the trainer's client)."""

    async def run() -> None:
        rng = random.Random(99)
        async with AsyncTeacherClient(
            target, timeout_s=CLIENT_TIMEOUT_S, max_retries=MAX_RETRIES, backoff_s=0.1
        ) as client:

            async def one() -> None:
                image, texts = draw(rng)
                try:
                    (scores,) = await client.score([images[image]], [texts])
                except Exception as exc:
                    tally.fail(exc, "ScoreStream")
                else:
                    tally.check(image, texts, scores, reference)

            while not stop.is_set():
                await asyncio.gather(*(one() for _ in range(3)))

    asyncio.run(run())


def lookups(teacher: TeacherProcess) -> float:
    """Pairs this teacher process looked up in the score cache since it started (hit or miss)."""
    return teacher.metric("hoidistill_teacher_cache_hits_total") + teacher.metric(
        "hoidistill_teacher_cache_misses_total"
    )


def answered_more(tally: Tally, count: int) -> Callable[[], bool]:
    target = tally.answered + count
    return lambda: tally.answered >= target


@pytest.mark.slow
def test_restarts_and_kills_under_load_lose_no_request_and_return_no_wrong_score(
    tiny_blip_dir: Path, private_redis: RedisServer, engine: ItmEngine
) -> None:
    images = [png_bytes(seed, (48 + seed, 40)) for seed in range(IMAGES)]
    reference = {
        index: dict(zip(SENTENCES, reference_scores(engine, image, SENTENCES), strict=True))
        for index, image in enumerate(images)
    }
    teachers = [TeacherProcess(tiny_blip_dir, private_redis.url) for _ in range(2)]
    stop = threading.Event()
    tally = Tally()
    threads: list[threading.Thread] = []
    try:
        for teacher in teachers:
            teacher.start()
        target = "ipv4:" + ",".join(f"127.0.0.1:{teacher.grpc_port}" for teacher in teachers)
        threads = [
            threading.Thread(target=unary_load, args=(target, images, reference, tally, stop, seed), daemon=True)
            for seed in range(UNARY_CLIENTS)
        ]
        threads.append(threading.Thread(target=stream_load, args=(target, images, reference, tally, stop), daemon=True))
        for thread in threads:
            thread.start()
        wait_until(answered_more(tally, ANSWERS_BETWEEN_FAULTS), "load before the faults", timeout_s=120)
        for teacher in teachers:  # both carry the load before the faults: round robin spreads it
            wait_until(lambda teacher=teacher: lookups(teacher) > 0, "calls reaching each teacher", timeout_s=120)

        # 1. Redis restarts (empty: the teachers recompute what it held, and write it again).
        tally.stage = "Redis restart"
        private_redis.stop()
        private_redis.start()
        wait_until(answered_more(tally, ANSWERS_BETWEEN_FAULTS), "answers after the Redis restart", timeout_s=120)

        # 2. SIGTERM: the first teacher drains and exits 0; its calls go to the second meanwhile.
        first = teachers[0].process
        assert first is not None
        tally.stage = "SIGTERM of teacher 0"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        wait_until(answered_more(tally, ANSWERS_BETWEEN_FAULTS), "answers with one teacher", timeout_s=120)
        tally.stage = "restart of teacher 0"
        teachers[0].start()
        # The clients' channels reconnect to it (gRPC's reconnect back-off: seconds) and use it again.
        wait_until(lambda: lookups(teachers[0]) > 0, "calls reaching the restarted teacher", timeout_s=120)

        # 3. SIGKILL: the second teacher dies mid-work; in-flight calls fail over to the first.
        tally.stage = "SIGKILL of teacher 1"
        teachers[1].kill()
        wait_until(answered_more(tally, ANSWERS_BETWEEN_FAULTS), "answers after the kill", timeout_s=120)
        tally.stage = "restart of teacher 1"
        teachers[1].start()
        wait_until(lambda: lookups(teachers[1]) > 0, "calls reaching the killed teacher again", timeout_s=120)
        wait_until(answered_more(tally, ANSWERS_BETWEEN_FAULTS), "answers after the second restart", timeout_s=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 10)
        for teacher in teachers:
            teacher.kill()
    assert not [thread.name for thread in threads if thread.is_alive()]
    assert tally.wrong == []
    assert sum(tally.lost.values()) == 0, dict(tally.lost)
    assert tally.answered >= 5 * ANSWERS_BETWEEN_FAULTS
