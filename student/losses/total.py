"""The weighted total the optimiser minimises: L_total = L_HOI + lambda_itm * L_ITM.

``TrainingLoss`` matches the final decoder layer once and hands that matching to both the HOI
criterion (``student.losses.hoi``) and the distillation term (``student.losses.distill``). The
teacher it may ask (``margin`` only) is anything with the ``MarginTeacher`` interface, in practice
``student.teacher.TeacherScores``; the loss package itself never imports the teacher adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from student.losses.distill import (
    TEACHER_KEY,
    DistillSettings,
    KLStats,
    MarginStats,
    MarginTriplets,
    kl_distill_loss,
    margin_loss,
    select_margin_triplets,
    teacher_soft_targets,
)
from student.losses.hoi import SOFT_TARGET_KEY, HOICriterion

# Loss terms of the last decoder layer shown in the progress bar and the CSV log.
MAIN_TERMS = (
    "loss_obj_ce",
    "loss_verb_ce",
    "loss_sub_bbox",
    "loss_obj_bbox",
    "loss_sub_giou",
    "loss_obj_giou",
)


@dataclass
class LossResult:
    """The scalar to minimise and its parts as floats (for logs)."""

    total: Tensor
    terms: dict[str, float]


class MarginTeacher(Protocol):
    """What ``TrainingLoss`` needs of a teacher: whether it is on, and (``margin``) triplet scores."""

    @property
    def enabled(self) -> bool: ...

    def triplet_margins(
        self, targets: Sequence[Mapping[str, Any]], triplets: Sequence[MarginTriplets]
    ) -> list[Tensor | None]:
        """z of each predicted triplet's sentence, (T,) per image; None for an image the teacher failed."""
        ...


class TrainingLoss:
    """L_total = L_HOI + lambda_itm * L_ITM (``docs/distillation.md``).

    The final layer is matched once; that matching serves both the HOI criterion and the
    distillation term. ``teacher`` None (or disabled) leaves out L_ITM. For ``kl`` and ``soft`` the
    targets must already carry ``teacher_verb_margin`` (``TeacherScores.annotate``); for
    ``margin`` the teacher is asked here, because the triplets depend on this step's predictions.
    For ``soft``, L_ITM is the criterion's ``loss_verb_soft`` terms (every decoder layer): the
    verb entries the teacher completes, taken out of the focal loss of L_HOI.
    """

    def __init__(
        self,
        criterion: HOICriterion,
        distill: DistillSettings,
        teacher: MarginTeacher | None = None,
        *,
        aux_loss: bool = True,
        skip_verbs: Sequence[int] = (),
    ) -> None:
        self.criterion = criterion
        self.distill = distill
        self.teacher = teacher if teacher is not None and teacher.enabled else None
        self.aux_loss = aux_loss
        self.skip_verbs = tuple(skip_verbs)

    def __call__(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> LossResult:
        if not self.aux_loss:
            outputs = {key: value for key, value in outputs.items() if key != "aux_outputs"}
        soft = self.teacher is not None and self.distill.variant == "soft"
        if soft:
            targets = [with_soft_targets(target, self.distill.tau, self.distill.confidence) for target in targets]
        indices = self.criterion.matcher(outputs, targets)
        losses = self.criterion(outputs, targets, indices)
        soft_terms = {key: value for key, value in losses.items() if key.startswith("loss_verb_soft")}
        hoi = self.criterion.weighted_total({key: value for key, value in losses.items() if key not in soft_terms})
        terms = {key: float(losses[key].detach()) for key in (*MAIN_TERMS, "obj_class_error") if key in losses}
        terms["loss_hoi"] = float(hoi.detach())
        total = hoi
        if self.teacher is not None:
            stats: Mapping[str, int] | KLStats | MarginStats
            if soft:
                itm, stats = self.soft_term(soft_terms, outputs, indices, targets)
            else:
                itm, stats = self.distillation(outputs, indices, targets)
            total = hoi + self.distill.lambda_itm * itm
            terms["loss_itm"] = float(itm.detach())
            terms["itm_terms"] = float(stats["num_terms"])
            terms["itm_skipped"] = float(stats["num_skipped"])
        terms["loss"] = float(total.detach())
        return LossResult(total, terms)

    def distillation(
        self, outputs: Mapping[str, Any], indices: Any, targets: Sequence[Mapping[str, Any]]
    ) -> tuple[Tensor, KLStats | MarginStats]:
        """L_ITM of the final layer (its matching ``indices``) and the loss's stats (``num_terms``...)."""
        if self.distill.variant == "kl":
            return kl_distill_loss(outputs, indices, targets, tau=self.distill.tau)
        assert self.teacher is not None
        triplets = select_margin_triplets(
            outputs,
            indices,
            targets,
            self.distill.top_k,
            self.distill.score_threshold,
            skip_verbs=self.skip_verbs,
        )
        margins = self.teacher.triplet_margins(targets, triplets)
        return margin_loss(outputs, triplets, margins, alpha=self.distill.alpha)

    def soft_term(
        self,
        soft_terms: Mapping[str, Tensor],
        outputs: Mapping[str, Any],
        indices: Any,
        targets: Sequence[Mapping[str, Any]],
    ) -> tuple[Tensor, Mapping[str, int]]:
        """The ``soft`` L_ITM: the weighted ``loss_verb_soft`` terms of every layer, and its stats.

        num_terms: matched pairs with at least one teacher-completed verb; num_skipped: matched
        pairs without (no scores, or every candidate asserted by the label).
        """
        completed = [
            torch.isfinite(target[SOFT_TARGET_KEY][pair]).any(-1)
            if SOFT_TARGET_KEY in target
            else torch.zeros(len(pair), dtype=torch.bool)
            for target, (_, pair) in zip(targets, indices, strict=True)
        ]
        num_terms = sum(int(rows.sum()) for rows in completed)
        stats = {"num_terms": num_terms, "num_skipped": sum(len(rows) for rows in completed) - num_terms}
        if not soft_terms:  # no target had scores: a zero that still reaches the logits
            return 0.0 * outputs["pred_verb_logits"].sum(), stats
        return self.criterion.weighted_total(soft_terms), stats


def with_soft_targets(target: Mapping[str, Any], tau: float, confidence: float) -> Mapping[str, Any]:
    """A shallow copy of ``target`` with ``verb_soft_target`` built from its teacher margins (if any)."""
    margin = target.get(TEACHER_KEY)
    if margin is None:
        return target
    soft = teacher_soft_targets(margin, target["verb_labels"], target.get("verb_known"), tau, confidence)
    return {**target, SOFT_TARGET_KEY: soft.to(target["verb_labels"].device)}
