"""The trainer's side of the teacher: sentences for a batch, their scores, ``teacher_verb_margin``.

``--teacher none|local|grpc://host:port`` selects a backend (``student.teacher.backends``);
``TeacherScores``, the adapter to the losses, wraps it for the training loop:

    teacher = TeacherScores.from_config(config.teacher, verbs=HICO_VERBS, correspondence=corre,
                                        image_root=train_images, prompt_variant="full")
    stats = teacher.annotate(targets)   # sets targets[i]["teacher_verb_margin"] (P, V), NaN = none

The work is split in three steps so that a later asynchronous client can run them apart:
``plan(targets)`` (which sentences of which image: known from the ground truth alone, so also
for a batch that is not trained on yet), ``fetch(plan)`` (the only step that talks to the
teacher; results are kept in an in-process memo keyed by (view, sentence)) and
``apply(plan, scores, targets)``. ``prefetch(targets)`` runs the first two ahead of time.

The teacher always scores the ORIGINAL image file (by its SHA-256 digest), never the augmented
tensor, so every epoch after the first is served from the memo (or the service's cache).

``region`` (``teacher.region``) says what of that file a sentence is scored on:

- ``image``: the whole image; every pair of one object class in an image gets the same scores.
- ``pair``: each ground-truth pair's own region, ``Region(human box, object box)`` in pixels of
  the original file (``target["pair_regions_orig"]``, taken from the annotation before any
  augmentation, so the plan still depends on the ground truth only and prefetches and
  prewarms). Pairs that share boxes share a view. A pair without a usable region (no object box,
  a box empty after clipping to the image, or a target without ``pair_regions_orig``) falls
  back to the whole image. For ``margin`` the predicted triplets are scored on the predicted
  boxes mapped back to original pixels (``frame_affine``); a box that is degenerate there gets
  no score (NaN: the loss skips the triplet).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from student.box_ops import denormalize_cxcywh, frame_to_original
from student.losses.distill import TEACHER_KEY, MarginTriplets, teacher_verb_margin
from student.teacher.backends import build_backend
from student.teacher.types import BatchScores, ScorePlan, ScoreQuery, TeacherBackend, TeacherStats
from teacher_server.errors import InvalidInputError, TeacherError
from teacher_server.hoi.classes import OBJECT_NAMES
from teacher_server.hoi.prompts import Variant, candidate_sentences, triplet_sentence
from teacher_server.hoi.region import Region, view_id

log = logging.getLogger(__name__)

TeacherRegion = Literal["image", "pair"]
TEACHER_REGIONS: tuple[str, ...] = ("image", "pair")
REGIONS_KEY = "pair_regions_orig"
AFFINE_KEY = "frame_affine"
# A box narrower or lower than this (original pixels, after clipping to the image) names no pair.
MIN_REGION_SIDE_PX = 1.0


def pair_region(values: Sequence[float], orig_size: Sequence[int] | None = None) -> Region | None:
    """The ``Region`` of eight original-pixel numbers (human xyxy, object xyxy), or None when unusable.

    ``orig_size`` (h, w): both boxes are clipped to the image first (the service refuses a region
    outside it). Unusable: a non-finite value, or a box with a side under ``MIN_REGION_SIDE_PX``
    after clipping (a pair without object has an all-zero object box).
    """
    numbers = [float(v) for v in values]
    if orig_size is not None:
        height, width = (float(v) for v in orig_size)
        limits = (width, height, width, height) * 2
        numbers = [min(max(v, 0.0), limit) for v, limit in zip(numbers, limits, strict=True)]
    for offset in (0, 4):
        x1, y1, x2, y2 = numbers[offset : offset + 4]
        if not (x2 - x1 >= MIN_REGION_SIDE_PX and y2 - y1 >= MIN_REGION_SIDE_PX):  # False for NaN too
            return None
    try:
        return Region.from_values(numbers)
    except InvalidInputError:
        return None


class TeacherScores:
    """Builds ``teacher_verb_margin`` (P, V) for each target of a batch with a ``TeacherBackend``.

    Args:
        backend: the teacher, or None (then ``annotate`` does nothing).
        verbs: the dataset's verb names (V).
        correspondence: (V, 80) bool verb x object validity: the candidates of a pair's object.
        image_root: directory of the split's images (``target["file_name"]`` is relative to it).
        prompt_variant: ``full`` / ``verb`` / ``object`` (``teacher_server.hoi.prompts``).
        on_error: ``skip`` (a failed batch gets no teacher key: its ITM term is skipped, counted in
            ``stats.failed_batches``) or ``fail`` (raise ``TeacherError``).
        memo_entries: LRU bound of the (view, sentence) -> margin memo (0 disables it).
        region: ``image`` (sentences scored on the whole image) or ``pair`` (on each pair's region;
            the module docstring says how, and what falls back to the whole image).
    """

    def __init__(
        self,
        backend: TeacherBackend | None,
        *,
        verbs: Sequence[str],
        correspondence: np.ndarray,
        image_root: str | Path,
        prompt_variant: Variant = "full",
        on_error: str = "skip",
        memo_entries: int = 2_000_000,
        region: TeacherRegion = "image",
    ) -> None:
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        if region not in TEACHER_REGIONS:
            raise ValueError(f"region must be 'image' or 'pair', got {region!r}")
        self.region = region
        self.backend = backend
        self.verbs = tuple(verbs)
        self.correspondence = np.asarray(correspondence, dtype=bool)
        if self.correspondence.shape != (len(self.verbs), len(OBJECT_NAMES)):
            raise ValueError(
                f"correspondence has shape {self.correspondence.shape}, expected ({len(self.verbs)}, "
                f"{len(OBJECT_NAMES)}) (verbs x objects)"
            )
        self.image_root = Path(image_root)
        self.prompt_variant = prompt_variant
        self.on_error = on_error
        self.memo_entries = memo_entries
        self.stats = TeacherStats()
        self._memo: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._sentences: dict[int, dict[int, str]] = {}  # object -> verb -> sentence
        self._warned = False

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        verbs: Sequence[str],
        correspondence: np.ndarray,
        image_root: str | Path,
        prompt_variant: Variant = "full",
        model: str | Path | None = None,
    ) -> TeacherScores:
        """From a ``TeacherConfig``; ``model`` overrides ``config.model`` (e.g. the demo's resolved teacher)."""
        backend = build_backend(
            config.source,
            model=model if model is not None else config.model,
            device=config.device,
            dtype=config.dtype,
            itm_start_token=config.itm_start_token,
            timeout_s=config.timeout_s,
            token=os.environ.get(config.token_env) or None,
            redis_url=config.redis_url,
        )
        return cls(
            backend,
            verbs=verbs,
            correspondence=correspondence,
            image_root=image_root,
            prompt_variant=prompt_variant,
            on_error=config.on_error,
            memo_entries=config.memo_entries,
            region=config.region,
        )

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def description(self) -> str:
        return self.backend.description if self.backend is not None else "no teacher"

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    # -- sentences ---------------------------------------------------------------------------

    def sentences_of_object(self, obj: int) -> dict[int, str]:
        """verb index -> sentence for every verb valid with object ``obj`` (empty for "no object")."""
        if obj not in self._sentences:
            if not 0 <= obj < len(OBJECT_NAMES):
                self._sentences[obj] = {}
            else:
                pairs = candidate_sentences(obj, self.correspondence, self.verbs, self.prompt_variant)
                self._sentences[obj] = dict(pairs)
        return self._sentences[obj]

    def _query(
        self, target: Mapping[str, Any], sentences: Sequence[str], region: Region | None = None
    ) -> ScoreQuery | None:
        unique = tuple(dict.fromkeys(sentences))
        if not unique:
            return None
        return ScoreQuery(target["image_digest"], self.image_root / target["file_name"], unique, region)

    def pair_regions(self, target: Mapping[str, Any]) -> list[Region | None]:
        """The region each ground-truth pair is scored on (P,): None = the whole image.

        Always None with ``region="image"``; with ``pair``, ``pair_region`` of the pair's row of
        ``target["pair_regions_orig"]`` (None where unusable, or when the target has no such key).
        """
        count = int(target["obj_labels"].shape[0])
        rows = target.get(REGIONS_KEY)
        if self.region == "image" or rows is None:
            return [None] * count
        if tuple(rows.shape) != (count, 8):
            raise ValueError(f"target[{REGIONS_KEY!r}]: expected shape ({count}, 8), got {tuple(rows.shape)}")
        orig_size = target["orig_size"].tolist() if "orig_size" in target else None
        return [pair_region(row, orig_size) for row in rows.detach().cpu().tolist()]

    # -- the three steps ---------------------------------------------------------------------

    def plan(self, targets: Sequence[Mapping[str, Any]]) -> ScorePlan:
        """The candidate sentences of every pair's object (ground truth only).

        ``image``: one query per target (None when it needs none); ``pair``: one query per
        distinct view (pair region, or the whole image for a pair without one) of each target.
        """
        queries: list[ScoreQuery | None] = []
        for target in targets:
            objects = [int(o) for o in target["obj_labels"].tolist()]
            if self.region == "image":
                sentences = [s for obj in dict.fromkeys(objects) for s in self.sentences_of_object(obj).values()]
                queries.append(self._query(target, sentences))
                continue
            by_view: dict[Region | None, list[str]] = {}
            for obj, region in zip(objects, self.pair_regions(target), strict=True):
                by_view.setdefault(region, []).extend(self.sentences_of_object(obj).values())
            queries.extend(q for region, sentences in by_view.items() if (q := self._query(target, sentences, region)))
        return ScorePlan(tuple(queries))

    def fetch(self, plan: ScorePlan) -> BatchScores:
        """Scores of every (view, sentence) of ``plan``: from the memo, the rest from the backend."""
        result = BatchScores()
        if self.backend is None:
            result.failed = True
            return result
        missing: list[ScoreQuery] = []
        for query in plan.queries:
            if query is None:
                continue
            todo = []
            for sentence in query.sentences:
                self.stats.pairs_requested += 1
                value = self._memo_get((query.view, sentence))
                if value is None:
                    todo.append(sentence)
                else:
                    self.stats.memo_hits += 1
                    result.margins[(query.view, sentence)] = value
            if todo:
                missing.append(ScoreQuery(query.digest, query.image_path, tuple(todo), query.region))
        if not missing:
            return result
        try:
            scored = self.backend.score(missing)
        except (TeacherError, OSError) as error:
            return self._failed(result, error)
        for query, margins in zip(missing, scored, strict=True):
            for sentence, margin in zip(query.sentences, margins, strict=True):
                result.margins[(query.view, sentence)] = float(margin)
                self._memo_put((query.view, sentence), float(margin))
            self.stats.pairs_scored += len(query.sentences)
        return result

    def apply(self, plan: ScorePlan, scores: BatchScores, targets: Sequence[dict[str, Any]]) -> int:
        """Set ``teacher_verb_margin`` (P, V) on each target; returns the number of pairs given scores.

        Row p holds the scores of pair p's view (``pair_regions``). A failed fetch sets nothing
        (the loss then skips those images); a score missing from ``scores`` is NaN.
        """
        if scores.failed:
            return 0
        given = 0
        for target in targets:
            labels = target["obj_labels"].cpu()
            views = [view_id(target["image_digest"], region) for region in self.pair_regions(target)]

            def score(verb: int, obj: int, pair: int, views: list[str] = views) -> float | None:
                sentence = self.sentences_of_object(obj).get(verb)
                return None if sentence is None else scores.margins.get((views[pair], sentence))

            margin = teacher_verb_margin(labels, self.correspondence, score)
            target[TEACHER_KEY] = margin.to(target["verb_labels"].device)
            given += int(torch.isfinite(margin).any(-1).sum())
        return given

    def annotate(self, targets: Sequence[dict[str, Any]]) -> int:
        """plan + fetch + apply for one batch; returns the number of pairs with at least one score."""
        if self.backend is None:
            return 0
        self.stats.batches += 1
        plan = self.plan(targets)
        return self.apply(plan, self.fetch(plan), targets)

    def prefetch(self, targets: Sequence[Mapping[str, Any]]) -> None:
        """Score a future batch's sentences now, into the memo (synchronously, for the time being).

        The hook an asynchronous client fills in: the sentences depend on the ground truth
        only, so they can be asked for while the student trains on the batch before.
        """
        if self.backend is not None:
            self.fetch(self.plan(targets))

    def triplet_margins(
        self, targets: Sequence[Mapping[str, Any]], triplets: Sequence[MarginTriplets]
    ) -> list[Tensor | None]:
        """The ``margin`` variant: z of each predicted triplet's sentence, (T,) per image (NaN: none).

        ``image``: scored on the whole image. ``pair``: on the triplet's predicted human and object
        boxes mapped to original pixels (``triplet_regions``); a degenerate one gets NaN. None for
        an image when the teacher failed (the loss skips it).
        """
        # Per image, per triplet: (view key, sentence), None when it gets no score.
        asks_per_image: list[list[tuple[str, str] | None]] = []
        queries: list[ScoreQuery | None] = []
        for target, image_triplets in zip(targets, triplets, strict=True):
            regions: list[Region | None] | None = (
                self.triplet_regions(target, image_triplets) if self.region == "pair" else None
            )
            asks: list[tuple[str, str] | None] = []
            by_view: dict[Region | None, list[str]] = {}
            for t, (verb, obj) in enumerate(
                zip(image_triplets.verb.tolist(), image_triplets.obj.tolist(), strict=True)
            ):
                name = OBJECT_NAMES[obj] if 0 <= obj < len(OBJECT_NAMES) else None
                sentence = triplet_sentence(self.verbs[verb], name, self.prompt_variant)
                region = regions[t] if regions is not None else None
                if sentence is None or (regions is not None and region is None):
                    asks.append(None)
                    continue
                asks.append((view_id(target["image_digest"], region), sentence))
                by_view.setdefault(region, []).append(sentence)
            asks_per_image.append(asks)
            queries.extend(self._query(target, sentences, region) for region, sentences in by_view.items())
        self.stats.batches += 1
        scores = self.fetch(ScorePlan(tuple(queries)))
        if scores.failed:
            return [None] * len(triplets)
        return [
            torch.tensor(
                [float("nan") if ask is None else scores.margins.get(ask, float("nan")) for ask in asks],
                dtype=torch.float32,
            )
            for asks in asks_per_image
        ]

    def triplet_regions(self, target: Mapping[str, Any], triplets: MarginTriplets) -> list[Region | None]:
        """Each predicted triplet's region in original pixels (T,); None where it is degenerate.

        The network's boxes are cxcywh normalised by the augmented image's size
        (``target["size"]``); ``frame_to_original`` undoes the augmentation with
        ``target["frame_affine"]`` and clips to ``target["orig_size"]``. Without boxes or an
        affine (hand-built targets) nothing can be mapped: every triplet is None.
        """
        count = len(triplets)
        affine = target.get(AFFINE_KEY)
        if triplets.sub_boxes is None or triplets.obj_boxes is None or affine is None or count == 0:
            return [None] * count
        height, width = (int(v) for v in target["size"].tolist())
        orig_height, orig_width = (int(v) for v in target["orig_size"].tolist())
        orig_size = (orig_height, orig_width)
        boxes = torch.cat(
            [
                frame_to_original(denormalize_cxcywh(b.detach().float().cpu(), width, height), affine.cpu(), orig_size)
                for b in (triplets.sub_boxes, triplets.obj_boxes)
            ],
            dim=-1,
        )
        return [pair_region(row) for row in boxes.tolist()]

    # -- internals ---------------------------------------------------------------------------

    def _failed(self, result: BatchScores, error: Exception) -> BatchScores:
        if self.on_error == "fail":
            raise TeacherError(f"{self.description}: scoring failed ({type(error).__name__}: {error})") from error
        self.stats.failed_batches += 1
        if not self._warned:
            log.warning("%s: scoring failed, ITM term skipped for this batch (%s)", self.description, error)
            self._warned = True
        result.failed = True
        return result

    def _memo_get(self, key: tuple[str, str]) -> float | None:
        value = self._memo.get(key)
        if value is not None:
            self._memo.move_to_end(key)
        return value

    def _memo_put(self, key: tuple[str, str], value: float) -> None:
        if self.memo_entries <= 0:
            return
        self._memo[key] = value
        if len(self._memo) > self.memo_entries:
            self._memo.popitem(last=False)
