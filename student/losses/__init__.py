"""Training losses of the student: the HOI criterion and the distillation terms."""

from student.losses.distill import (
    DISTILL_VARIANTS,
    GROUND_TRUTH_VARIANTS,
    DistillSettings,
    KLStats,
    MarginStats,
    MarginTriplets,
    kl_distill_loss,
    margin_loss,
    select_margin_triplets,
    teacher_soft_targets,
    teacher_verb_margin,
)
from student.losses.hoi import SOFT_TARGET_KEY, HOICriterion, LossWeights, soft_focal_sum, verb_focal_loss
from student.matcher import HungarianMatcher, LossError

__all__ = [
    "DISTILL_VARIANTS",
    "GROUND_TRUTH_VARIANTS",
    "SOFT_TARGET_KEY",
    "DistillSettings",
    "HOICriterion",
    "HungarianMatcher",
    "KLStats",
    "LossError",
    "LossWeights",
    "MarginStats",
    "MarginTriplets",
    "kl_distill_loss",
    "margin_loss",
    "select_margin_triplets",
    "soft_focal_sum",
    "teacher_soft_targets",
    "teacher_verb_margin",
    "verb_focal_loss",
]
