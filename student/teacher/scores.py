"""The trainer's side of the teacher: sentences for a batch, their scores, ``teacher_verb_margin``.

``--teacher none|local|grpc://host:port`` selects a backend (``student.teacher.backends``);
``TeacherScores``, the adapter to the losses, wraps it for the training loop:

    teacher = TeacherScores.from_config(config.teacher, verbs=HICO_VERBS, correspondence=corre,
                                        image_root=train_images, prompt_variant="full")
    stats = teacher.annotate(targets)   # sets targets[i]["teacher_verb_margin"] (P, V), NaN = none

The work is split in three steps so that a later asynchronous client can run them apart:
``plan(targets)`` (which sentences of which image: known from the ground truth alone, so also
for a batch that is not trained on yet), ``fetch(plan)`` (the only step that talks to the
teacher; results are kept in an in-process memo keyed by (image digest, sentence)) and
``apply(plan, scores, targets)``. ``prefetch(targets)`` runs the first two ahead of time.

The teacher always scores the ORIGINAL image file (by its SHA-256 digest), never the augmented
tensor, so every epoch after the first is served from the memo (or the service's cache).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from student.losses.distill import TEACHER_KEY, MarginTriplets, teacher_verb_margin
from student.teacher.backends import build_backend
from student.teacher.types import BatchScores, ScorePlan, ScoreQuery, TeacherBackend, TeacherStats
from teacher_server.errors import TeacherError
from teacher_server.hoi.classes import OBJECT_NAMES
from teacher_server.hoi.prompts import Variant, candidate_sentences, triplet_sentence

log = logging.getLogger(__name__)


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
        memo_entries: LRU bound of the (digest, sentence) -> margin memo (0 disables it).
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
    ) -> None:
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
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

    def _query(self, target: Mapping[str, Any], sentences: Sequence[str]) -> ScoreQuery | None:
        unique = tuple(dict.fromkeys(sentences))
        if not unique:
            return None
        return ScoreQuery(target["image_digest"], self.image_root / target["file_name"], unique)

    # -- the three steps ---------------------------------------------------------------------

    def plan(self, targets: Sequence[Mapping[str, Any]]) -> ScorePlan:
        """The candidate sentences of every pair's object, per image (ground truth only)."""
        queries = []
        for target in targets:
            sentences = [
                sentence
                for obj in dict.fromkeys(int(o) for o in target["obj_labels"].tolist())
                for sentence in self.sentences_of_object(obj).values()
            ]
            queries.append(self._query(target, sentences))
        return ScorePlan(tuple(queries))

    def fetch(self, plan: ScorePlan) -> BatchScores:
        """Scores of every (image, sentence) of ``plan``: from the memo, the rest from the backend."""
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
                value = self._memo_get((query.digest, sentence))
                if value is None:
                    todo.append(sentence)
                else:
                    self.stats.memo_hits += 1
                    result.margins[(query.digest, sentence)] = value
            if todo:
                missing.append(ScoreQuery(query.digest, query.image_path, tuple(todo)))
        if not missing:
            return result
        try:
            scored = self.backend.score(missing)
        except (TeacherError, OSError) as error:
            return self._failed(result, error)
        for query, margins in zip(missing, scored, strict=True):
            for sentence, margin in zip(query.sentences, margins, strict=True):
                result.margins[(query.digest, sentence)] = float(margin)
                self._memo_put((query.digest, sentence), float(margin))
            self.stats.pairs_scored += len(query.sentences)
        return result

    def apply(self, plan: ScorePlan, scores: BatchScores, targets: Sequence[dict[str, Any]]) -> int:
        """Set ``teacher_verb_margin`` (P, V) on each target; returns the number of pairs given scores.

        A failed fetch sets nothing (the loss then skips those images); a score missing from
        ``scores`` is NaN.
        """
        if scores.failed:
            return 0
        given = 0
        for query, target in zip(plan.queries, targets, strict=True):
            labels = target["obj_labels"].cpu()
            digest = target["image_digest"]

            def score(verb: int, obj: int, digest: str = digest) -> float | None:
                sentence = self.sentences_of_object(obj).get(verb)
                return None if sentence is None else scores.margins.get((digest, sentence))

            margin = teacher_verb_margin(labels, self.correspondence, score)
            target[TEACHER_KEY] = margin.to(target["verb_labels"].device)
            given += int(torch.isfinite(margin).any(-1).sum()) if query is not None else 0
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

        None for an image when the teacher failed (the loss skips it).
        """
        sentences_per_image = []
        for image_triplets in triplets:
            sentences = []
            for verb, obj in zip(image_triplets.verb.tolist(), image_triplets.obj.tolist(), strict=True):
                name = OBJECT_NAMES[obj] if 0 <= obj < len(OBJECT_NAMES) else None
                sentences.append(triplet_sentence(self.verbs[verb], name, self.prompt_variant))
            sentences_per_image.append(sentences)
        plan = ScorePlan(
            tuple(
                self._query(target, [s for s in sentences if s is not None])
                for target, sentences in zip(targets, sentences_per_image, strict=True)
            )
        )
        self.stats.batches += 1
        scores = self.fetch(plan)
        if scores.failed:
            return [None] * len(triplets)
        result: list[Tensor | None] = []
        for target, sentences in zip(targets, sentences_per_image, strict=True):
            values = [
                float("nan") if s is None else scores.margins.get((target["image_digest"], s), float("nan"))
                for s in sentences
            ]
            result.append(torch.tensor(values, dtype=torch.float32))
        return result

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
