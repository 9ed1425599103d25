"""Teacher endpoints: a list of gRPC / KServe v2 services with round robin and failover.

``EndpointPool`` spreads calls over ``grpc://a:50051,grpc://b:50051`` (or ``triton://host:8001``)
round robin; an endpoint that fails is skipped for ``cooldown_s`` while the call fails over to the
next one, then tried again (recovery). It talks to the teacher only through its clients
(``teacher_server.client``, ``teacher_server.triton_client``): no torch here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from student.teacher.types import ScoringClient
from teacher_server.errors import TeacherError

SCHEMES = ("grpc://", "grpcs://", "triton://")


def parse_endpoints(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"grpc://a:1,grpc://b:2"`` (or a list) -> the endpoints; raises ``TeacherError`` for a bad one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    endpoints = tuple(item.strip() for item in items if item.strip())
    if not endpoints:
        raise TeacherError(f"teacher endpoints {spec!r}: none given, expected e.g. grpc://host:50051")
    for endpoint in endpoints:
        if not endpoint.startswith(SCHEMES) or endpoint.split("://", 1)[1] in ("", "/"):
            raise TeacherError(
                f"teacher endpoint {endpoint!r}: expected grpc://host:port, grpcs://host:port or triton://host:port"
            )
    return endpoints


def open_client(endpoint: str, *, token: str | None, timeout_s: float, max_retries: int) -> ScoringClient:
    """A blocking client of one endpoint (native gRPC or KServe v2 / Triton)."""
    if endpoint.startswith("triton://"):
        from teacher_server.triton_client import TritonTeacherClient

        return TritonTeacherClient(endpoint, token=token, timeout_s=timeout_s, max_retries=max_retries)
    from teacher_server.client import TeacherClient

    return TeacherClient(endpoint, token=token, timeout_s=timeout_s, max_retries=max_retries)


@dataclass
class EndpointStats:
    """Calls per endpoint: answered, failed (and failed over), and when it may be tried again."""

    calls: int = 0
    failures: int = 0
    down_until: float = 0.0


class EndpointPool:
    """Round-robin load balancing with failover over teacher endpoints. Thread-safe.

    Args:
        endpoints: ``"grpc://a:50051,grpc://b:50051"`` or a list; ``triton://`` works the same.
        token: bearer token sent to every endpoint.
        timeout_s: bound of one call on one endpoint (its own retries included).
        cooldown_s: an endpoint that failed is left out for this long (unless all are out).
        max_retries: retries inside one endpoint's client before failing over (kept low: the
            next endpoint is a better bet than waiting for this one).
        client_factory: ``(endpoint) -> client``; default ``open_client``.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        cooldown_s: float = 2.0,
        max_retries: int = 1,
        client_factory: Callable[[str], ScoringClient] | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        factory = client_factory or (
            lambda e: open_client(e, token=token, timeout_s=timeout_s, max_retries=max_retries)
        )
        self._clients = [factory(endpoint) for endpoint in self.endpoints]
        self.stats = {endpoint: EndpointStats() for endpoint in self.endpoints}
        self._next = 0
        self._lock = threading.Lock()
        self.description = "teacher " + ",".join(self.endpoints)

    def _order(self) -> list[int]:
        """Endpoints to try for one call: round robin from the next one, those cooling down last."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.endpoints)
        order = [(start + i) % len(self.endpoints) for i in range(len(self.endpoints))]
        now = time.monotonic()
        up = [i for i in order if self.stats[self.endpoints[i]].down_until <= now]
        return up + [i for i in order if i not in up]

    def call(self, method: Callable[[ScoringClient], Any]) -> Any:
        """``method(client)`` on the next endpoint, failing over to the others; ``TeacherError`` if all fail."""
        errors = []
        for index in self._order():
            endpoint = self.endpoints[index]
            stats = self.stats[endpoint]
            try:
                result = method(self._clients[index])
            except (TeacherError, OSError) as error:
                with self._lock:
                    stats.failures += 1
                    stats.down_until = time.monotonic() + self.cooldown_s
                errors.append(f"{endpoint}: {error}")
                continue
            with self._lock:
                stats.calls += 1
                stats.down_until = 0.0
            return result
        raise TeacherError("every teacher endpoint failed: " + "; ".join(errors))

    def score(
        self, images: Sequence[Any], sentences: Sequence[Sequence[str]], regions: Sequence[Any] | None = None
    ) -> list[list[Any]]:
        """``TeacherScore`` of ``sentences[i][j]`` against ``images[i]`` (path or bytes) from some endpoint;
        ``regions[i]`` (optional) names the human-object pair of image i to score on."""
        if regions is None or all(region is None for region in regions):
            return self.call(lambda client: client.score(images, sentences, timeout_s=self.timeout_s))
        return self.call(lambda client: client.score(images, sentences, timeout_s=self.timeout_s, regions=regions))

    def fingerprint(self) -> str | None:
        """The teacher model's fingerprint (cache keys), or None when no endpoint says it."""
        info = self.call(lambda client: client.model_info(timeout_s=self.timeout_s))
        return getattr(info, "fingerprint", None) or None

    def close(self) -> None:
        for client in self._clients:
            client.close()
