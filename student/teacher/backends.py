"""Teacher backends: what turns (image, sentences) queries into ITM margins z = l_match - l_nomatch.

- ``LocalTeacher``: an in-process ``teacher_server.engine.ItmEngine`` (``--teacher local``);
- ``GrpcTeacher`` / ``TritonTeacher``: one teacher service (native gRPC or KServe v2);
- ``ReadThroughBackend``: the shared score cache (Redis) first, an ``EndpointPool`` for the misses.

``build_backend`` picks one from ``teacher.source``; each satisfies ``TeacherBackend``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from student.teacher.pool import SCHEMES, EndpointPool
from student.teacher.types import ScoreQuery, TeacherBackend
from teacher_server.errors import TeacherError

log = logging.getLogger(__name__)


class LocalTeacher:
    """An in-process ``ItmEngine``: image bytes are read and encoded only for images it does not hold."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.description = f"local engine {engine.model_id} (fingerprint {engine.fingerprint}, {engine.device})"

    @classmethod
    def load(
        cls, model: str | Path, *, device: str = "auto", dtype: str = "auto", itm_start_token: str = "cls"
    ) -> LocalTeacher:
        """Load ``model`` (directory or hub id from the local cache) into an engine."""
        from teacher_server.engine import EngineSettings, ItmEngine

        settings = EngineSettings(device=device, dtype=dtype, itm_start_token=itm_start_token)
        return cls(ItmEngine.from_pretrained(model, settings))

    def score(self, queries: Sequence[ScoreQuery]) -> list[list[float]]:
        from teacher_server.engine import ImageSentences

        requests = []
        for query in queries:
            image = None
            if not self.engine.has_image(query.digest, query.region):
                image = self.engine.prepare_image(
                    query.image_path.read_bytes(), digest=query.digest, region=query.region
                )
            requests.append(ImageSentences(query.digest, image, list(query.sentences), query.region))
        return [[s.match_logit for s in scores] for scores in self.engine.score(requests)]

    def close(self) -> None:
        return None


class GrpcTeacher:
    """A teacher service reached with ``TeacherClient`` (digest first, bytes only when asked)."""

    def __init__(self, target: str, *, token: str | None = None, timeout_s: float = 60.0) -> None:
        from teacher_server.client import TeacherClient

        self.client = TeacherClient(target, token=token, timeout_s=timeout_s)
        self.description = f"gRPC teacher at {target}"

    def score(self, queries: Sequence[ScoreQuery]) -> list[list[float]]:
        paths, sentences = [q.image_path for q in queries], [list(q.sentences) for q in queries]
        if any(q.region is not None for q in queries):
            results = self.client.score(paths, sentences, regions=[q.region for q in queries])
        else:  # a Triton client without REGION support still serves whole images
            results = self.client.score(paths, sentences)
        return [[s.match_logit for s in scores] for scores in results]

    def close(self) -> None:
        self.client.close()


class TritonTeacher(GrpcTeacher):
    """A teacher served by Triton Inference Server (deploy/triton), reached with TritonTeacherClient."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 60.0) -> None:
        from teacher_server.triton_client import TritonTeacherClient

        self.client = TritonTeacherClient(url, token=token, timeout_s=timeout_s)
        self.description = f"Triton teacher at {url} (model blip_itm)"


class ReadThroughBackend:
    """A ``TeacherBackend``: the score cache first, the pool for the misses.

    The fingerprint is asked from the teacher once (lazily): cached scores of another model are
    never read. Until the teacher has answered it, every lookup goes to the pool.
    """

    def __init__(self, pool: EndpointPool, cache: Any | None = None) -> None:
        self.pool = pool
        self.cache = cache
        self._fingerprint: str | None = None
        self.cache_hits = 0
        self.description = pool.description + (f" (read-through {cache.backend} cache)" if cache is not None else "")

    def fingerprint(self) -> str | None:
        if self._fingerprint is None and self.cache is not None:
            try:
                self._fingerprint = self.pool.fingerprint()
            except TeacherError as error:
                log.debug("no fingerprint yet (%s): cache read-through off for now", error)
        return self._fingerprint

    def score(self, queries: Sequence[ScoreQuery]) -> list[list[float]]:
        results: list[list[float | None]] = [[None] * len(q.sentences) for q in queries]
        fingerprint = self.fingerprint()
        if fingerprint is not None and self.cache is not None:
            found = self.cache.lookup(fingerprint, [(q.view, list(q.sentences)) for q in queries])
            for row, hits in zip(results, found, strict=True):
                for j, hit in enumerate(hits):
                    if hit is not None:
                        row[j] = float(hit.match_logit)
                        self.cache_hits += 1
        todo = [
            (i, [j for j, value in enumerate(row) if value is None]) for i, row in enumerate(results) if None in row
        ]
        if todo:
            scored = self.pool.score(
                [queries[i].image_path for i, _ in todo],
                [[queries[i].sentences[j] for j in missing] for i, missing in todo],
                [queries[i].region for i, _ in todo],
            )
            for (i, missing), scores in zip(todo, scored, strict=True):
                for j, score in zip(missing, scores, strict=True):
                    results[i][j] = float(score.match_logit)
        return [[float(value) for value in row] for row in results]

    def close(self) -> None:
        self.pool.close()
        if self.cache is not None:
            self.cache.close()


def build_remote_teacher(
    endpoints: str,
    *,
    redis_url: str | None = None,
    token: str | None = None,
    timeout_s: float = 30.0,
    cooldown_s: float = 2.0,
) -> ReadThroughBackend:
    """Pool over ``endpoints`` plus (with ``redis_url``) a read-through of the shared Redis cache."""
    cache = None
    if redis_url:
        from teacher_server.cache import open_score_cache

        cache = open_score_cache(redis_url)
    return ReadThroughBackend(EndpointPool(endpoints, token=token, timeout_s=timeout_s, cooldown_s=cooldown_s), cache)


def build_backend(
    source: str,
    *,
    model: str | Path = "Salesforce/blip-itm-base-coco",
    device: str = "auto",
    dtype: str = "auto",
    itm_start_token: str = "cls",
    timeout_s: float = 60.0,
    token: str | None = None,
    redis_url: str | None = None,
) -> TeacherBackend | None:
    """``none`` -> None; ``local`` -> ``LocalTeacher(model)``; ``grpc://h:p`` / ``grpcs://h:p`` -> ``GrpcTeacher``;
    ``triton://h:p`` -> ``TritonTeacher``; several comma-separated endpoints, or any with ``redis_url``,
    -> ``ReadThroughBackend`` (round robin, failover, Redis read first)."""
    if source == "none":
        return None
    if source == "local":
        return LocalTeacher.load(model, device=device, dtype=dtype, itm_start_token=itm_start_token)
    if "," in source or (redis_url and source.startswith(SCHEMES)):
        # Several endpoints (round robin, failover) and/or a Redis read-through before any RPC.
        return build_remote_teacher(source, redis_url=redis_url, token=token, timeout_s=timeout_s)
    if source.startswith(("grpc://", "grpcs://")):
        return GrpcTeacher(source, token=token, timeout_s=timeout_s)
    if source.startswith("triton://"):
        return TritonTeacher(source, token=token, timeout_s=timeout_s)
    raise TeacherError(f"teacher {source!r}: expected 'none', 'local', 'grpc://host:port' or 'triton://host:port'")
