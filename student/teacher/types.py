"""The vocabulary of the trainer's side of the teacher: queries, plans, scores, counters, interfaces.

Every other module of ``student.teacher`` imports from here, and this module imports none of
them, so the package has no import circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from teacher_server.hoi.region import Region, view_id


@dataclass(frozen=True)
class ScoreQuery:
    """The sentences one image (or one human-object pair of it) needs scored."""

    digest: str  # SHA-256 hex of the original image file
    image_path: Path  # where its bytes are, sent only when the teacher does not hold the image
    sentences: tuple[str, ...]
    region: Region | None = None  # the pair, in pixels of the original image; None = whole image

    @property
    def view(self) -> str:
        """The key of what the teacher sees (memo and cache): ``view_id(digest, region)``."""
        return view_id(self.digest, self.region)


class TeacherBackend(Protocol):
    """Anything that turns (image, sentences) queries into ITM margins z = l_match - l_nomatch."""

    description: str

    def score(self, queries: Sequence[ScoreQuery]) -> list[list[float]]:
        """Margins ``[i][j]`` of ``queries[i].sentences[j]``; raises ``TeacherError`` (or OSError)."""
        ...

    def close(self) -> None: ...


class ScoringClient(Protocol):
    """What ``TeacherClient`` and ``TritonTeacherClient`` have in common."""

    def score(
        self,
        images: Sequence[Any],
        sentences: Sequence[Sequence[str]],
        *,
        timeout_s: float | None = None,
        regions: Sequence[Any] | None = None,
    ) -> Any: ...

    def model_info(self, *, timeout_s: float | None = None) -> Any: ...

    def close(self) -> None: ...


@dataclass
class TeacherStats:
    """Counters since the adapter was made (the training log shows them)."""

    batches: int = 0
    pairs_requested: int = 0  # (view, sentence) lookups: a view is the whole image or one pair region
    memo_hits: int = 0
    pairs_scored: int = 0  # sent to the backend
    failed_batches: int = 0  # scoring failed and the ITM term of the batch was skipped


@dataclass(frozen=True)
class ScorePlan:
    """What a batch needs: ``teacher.region=image``: per target the image query (None when it needs
    no score); ``pair``: per target one query per distinct view (pair region) its pairs need."""

    queries: tuple[ScoreQuery | None, ...]


@dataclass
class BatchScores:
    """Margins by (view id, sentence) for one plan; ``failed`` when the teacher could not answer."""

    margins: dict[tuple[str, str], float] = field(default_factory=dict)
    failed: bool = False
