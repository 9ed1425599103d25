"""Training losses of the student: the HOI criterion and the distillation terms."""

from student.losses.distill import (
    DistillSettings,
    KLStats,
    MarginStats,
    MarginTriplets,
    kl_distill_loss,
    margin_loss,
    select_margin_triplets,
    teacher_verb_margin,
)
from student.losses.hoi import HOICriterion, LossWeights, verb_focal_loss
from student.matcher import HungarianMatcher, LossError

__all__ = [
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
    "teacher_verb_margin",
    "verb_focal_loss",
]
