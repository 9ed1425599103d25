"""The student's loss, in one folder.

- ``matcher``: Hungarian matching of queries to ground-truth pairs, the output / target checks and
  ``LossError``;
- ``hoi``: the HOI detection terms (``HOICriterion``: boxes, object class, verb focal loss);
- ``distill``: the distillation terms (``kl``, ``margin``, ``soft``) and the teacher's targets;
- ``total``: the weighted total the optimiser minimises (``TrainingLoss``).
"""

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
from student.losses.matcher import HungarianMatcher, LossError
from student.losses.total import MAIN_TERMS, LossResult, MarginTeacher, TrainingLoss

__all__ = [
    "DISTILL_VARIANTS",
    "GROUND_TRUTH_VARIANTS",
    "MAIN_TERMS",
    "SOFT_TARGET_KEY",
    "DistillSettings",
    "HOICriterion",
    "HungarianMatcher",
    "KLStats",
    "LossError",
    "LossResult",
    "LossWeights",
    "MarginStats",
    "MarginTeacher",
    "MarginTriplets",
    "TrainingLoss",
    "kl_distill_loss",
    "margin_loss",
    "select_margin_triplets",
    "soft_focal_sum",
    "teacher_soft_targets",
    "teacher_verb_margin",
    "verb_focal_loss",
]
