"""HICO-DET mAP, with the protocol of the reference Python evaluator of the DETR-line HOI codebases.

The protocol, step by step (``docs/evaluation.md`` has the same in prose):

1. Per image, predicted triplets whose (verb, object class) is invalid in ``corre_hico.npy`` are
   dropped, then the ``max_hois`` (100) highest-scoring triplets are kept (ties: file order).
2. Box IoU is class-aware with the +1 pixel convention: area = (x2 - x1 + 1) * (y2 - y1 + 1);
   boxes whose coordinates do not strictly overlap have IoU 0. A predicted triplet matches a
   ground-truth HOI of the same image and verb when the subject classes agree, the object classes
   agree, human IoU >= 0.5 and object IoU >= 0.5.
3. Predictions are taken by descending score; each goes to the matching ground truth with the
   largest min(human IoU, object IoU) (first in file order on ties). If that ground truth was
   already taken, the prediction is a false positive (it does not fall back to another one).
4. A triplet class is (subject class, object class, verb). Predicted classes absent from the test
   ground truth are ignored. AP per class is the 11-point VOC AP; mAP is the mean over the test
   ground truth's classes (a class without predictions has AP 0). Rare = fewer than 10 instances
   in the training annotations (a class absent from training counts as rare; the reference
   evaluator leaves such a class out of both Rare and Non-rare).
5. Known-Object: for each class, only predictions from images whose ground truth has an HOI with
   that object class take part (the ground-truth count is unchanged).

Everything is vectorised over the whole split: pairs of (prediction, ground truth of the same image
and verb) are built with a sorted join, so there is no Python loop over images or boxes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from student.evaluation.boxes import iou_touching_apart
from student.evaluation.predictions import EvaluationError, HoiSet, join_on_keys, segment_starts
from teacher_server.hoi.classes import HICO_VERBS, OBJECT_NAMES

MAX_HOIS = 100
IOU_THRESHOLD = 0.5
#: A triplet class with fewer training instances than this is "rare".
RARE_LIMIT = 10
NUM_OBJECTS = len(OBJECT_NAMES)
# The reference evaluator's recall points, np.arange(0, 1.1, 0.1) exactly (0.30000000000000004, ...):
# a recall of exactly 0.3 does not reach the fourth point there, so it must not here either.
RECALL_POINTS = np.arange(0.0, 1.1, 0.1)

Triplet = tuple[int, int, int]  # (subject class, object class, verb index)


@dataclass(frozen=True)
class SplitAp:
    """mAP over all, rare and non-rare triplet classes, as fractions (NaN: the split is empty)."""

    full: float
    rare: float
    non_rare: float

    def percent(self) -> dict[str, float | None]:
        return {"full": _percent(self.full), "rare": _percent(self.rare), "non_rare": _percent(self.non_rare)}


@dataclass(frozen=True, eq=False)  # arrays: no element-wise __eq__
class HicoResult:
    """Metrics of one evaluation plus the per-class numbers behind them."""

    default: SplitAp
    known_object: SplitAp
    mean_max_recall: float
    triplets: tuple[Triplet, ...]  # (C,) the test ground truth's triplet classes, sorted
    num_positives: np.ndarray  # (C,) int64 ground-truth instances per class
    rare: np.ndarray  # (C,) bool
    ap: np.ndarray  # (C,) float64 Default AP
    ap_known_object: np.ndarray  # (C,) float64 Known-Object AP
    max_recall: np.ndarray  # (C,) float64

    def summary(self) -> dict:
        """The CLI's JSON: ``{"default": {full, rare, non_rare}, "known_object": {...},
        "mean_max_recall"}`` in percent (``None`` for an empty split)."""
        return {
            "default": self.default.percent(),
            "known_object": self.known_object.percent(),
            "mean_max_recall": _percent(self.mean_max_recall),
        }

    def ap_by_triplet(self) -> dict[str, float]:
        """Default AP in percent of each test triplet class, keyed ``"verb object"`` (``"ride horse"``)."""
        return {
            f"{HICO_VERBS[verb]} {OBJECT_NAMES[obj]}": 100.0 * float(ap)
            for (_, obj, verb), ap in zip(self.triplets, self.ap, strict=True)
        }


def load_correspondence(path: str | Path) -> np.ndarray:
    """Read ``corre_hico.npy``: (117, 80) verb x object validity -> bool array."""
    path = Path(path)
    try:
        matrix = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise EvaluationError(f"{path}: no such file") from None
    except (ValueError, OSError) as error:
        raise EvaluationError(f"{path}: not a numpy .npy array ({error})") from None
    return check_correspondence(matrix, source=str(path))


def check_correspondence(matrix: np.ndarray, *, source: str = "correspondence") -> np.ndarray:
    """Validate a verb x object matrix ((117, 80), 0/1 or bool) and return it as bool."""
    expected = (len(HICO_VERBS), NUM_OBJECTS)
    matrix = np.asarray(matrix)
    if matrix.shape != expected:
        raise EvaluationError(f"{source}: shape {matrix.shape} is not (verbs, objects) = {expected}")
    if matrix.dtype != bool and not np.isin(matrix, (0, 1)).all():
        raise EvaluationError(f"{source}: values must be 0 or 1 (a validity mask)")
    return matrix.astype(bool)


def count_triplets(annotations: HoiSet) -> dict[Triplet, int]:
    """Instances per (subject class, object class, verb) in ground truth (the training set for Rare)."""
    codes = _triplet_codes(annotations, np.arange(len(annotations.verbs)))
    classes, counts = np.unique(codes, return_counts=True)
    return {_decode(int(code)): int(count) for code, count in zip(classes, counts, strict=True)}


def evaluate_hico(
    predictions: HoiSet,
    ground_truth: HoiSet,
    *,
    correspondence: np.ndarray,
    train_counts: Mapping[Triplet, int],
    max_hois: int = MAX_HOIS,
    iou_threshold: float = IOU_THRESHOLD,
) -> HicoResult:
    """HICO-DET Default and Known-Object mAP (Full, Rare, Non-rare) and mean max recall.

    Args:
        predictions: one image per ground-truth image, same order (see ``parse_predictions``).
        ground_truth: the test annotations.
        correspondence: (117, 80) bool, True where (verb, object) is a HICO-DET HOI.
        train_counts: instances per triplet class in the training annotations
            (:func:`count_triplets`), for the Rare / Non-rare split.
        max_hois: triplets kept per image after dropping invalid ones.
        iou_threshold: minimum human and object IoU of a match.
    """
    if predictions.num_images != ground_truth.num_images:
        raise EvaluationError(
            f"predictions cover {predictions.num_images} images but the annotations have {ground_truth.num_images}"
        )
    if (ground_truth.objects < 0).any() or (predictions.objects < 0).any():
        raise EvaluationError("HICO-DET HOIs always have an object: object_id -1 is a V-COCO convention")
    if max_hois < 1:
        raise EvaluationError(f"max_hois = {max_hois}: keep at least 1 triplet per image (the protocol: 100)")
    correspondence = check_correspondence(correspondence)

    gt_codes = _triplet_codes(ground_truth, np.arange(len(ground_truth.verbs)))
    classes, num_positives = np.unique(gt_codes, return_counts=True)

    kept = top_valid_triplets(predictions, correspondence, max_hois)
    true_positive = match_triplets(predictions, kept, ground_truth, iou_threshold)

    # Predictions of classes the test ground truth lacks take no part in any AP.
    codes = _triplet_codes(predictions, kept)
    class_of = np.searchsorted(classes, codes)
    known = class_of < len(classes)
    known[known] = classes[class_of[known]] == codes[known]
    scores = predictions.scores[kept]

    # Known-Object: image k takes part for object o when its ground truth has an HOI with o.
    has_object = np.zeros((ground_truth.num_images, NUM_OBJECTS), dtype=bool)
    has_object[ground_truth.hoi_image, ground_truth.labels[ground_truth.objects]] = True
    images = predictions.hoi_image[kept]
    object_classes = predictions.labels[predictions.objects[kept]]
    in_known_object = known & has_object[images, object_classes]

    ap, max_recall = ap_per_class(class_of[known], scores[known], true_positive[known], num_positives)
    ap_ko, _ = ap_per_class(
        class_of[in_known_object], scores[in_known_object], true_positive[in_known_object], num_positives
    )
    triplets = tuple(_decode(int(code)) for code in classes)
    rare = np.array([train_counts.get(t, 0) < RARE_LIMIT for t in triplets], dtype=bool)
    return HicoResult(
        default=_split(ap, rare),
        known_object=_split(ap_ko, rare),
        mean_max_recall=_mean(max_recall),
        triplets=triplets,
        num_positives=num_positives,
        rare=rare,
        ap=ap,
        ap_known_object=ap_ko,
        max_recall=max_recall,
    )


def top_valid_triplets(predictions: HoiSet, correspondence: np.ndarray, max_hois: int) -> np.ndarray:
    """Indices of the triplets that take part: valid (verb, object) pairs, best ``max_hois`` per image.

    Returns (K,) int64 HOI indices ordered by image, then descending score (file order on ties):
    the order in which the evaluator takes predictions.
    """
    object_classes = predictions.labels[predictions.objects]
    index = np.flatnonzero(correspondence[predictions.verbs, object_classes])
    images = predictions.hoi_image[index]
    order = np.lexsort((-predictions.scores[index], images))  # lexsort is stable
    index, images = index[order], images[order]
    rank = np.arange(len(index)) - np.searchsorted(images, images, side="left")
    return index[rank < max_hois]


def match_triplets(
    predictions: HoiSet, kept: np.ndarray, ground_truth: HoiSet, iou_threshold: float = IOU_THRESHOLD
) -> np.ndarray:
    """True positives among ``kept`` predictions (in evaluation order) -> (K,) bool.

    Each prediction goes to the matching ground truth with the largest min(human IoU, object
    IoU); the first prediction to reach a ground truth takes it, later ones are false positives.
    """
    key_scale = max(int(predictions.verbs.max(initial=0)), int(ground_truth.verbs.max(initial=0))) + 1
    pred_keys = predictions.hoi_image[kept] * key_scale + predictions.verbs[kept]
    gt_keys = ground_truth.hoi_image * key_scale + ground_truth.verbs
    pred, gt = join_on_keys(pred_keys, gt_keys)  # same image and verb

    pred_sub, pred_obj = predictions.subjects[kept][pred], predictions.objects[kept][pred]
    gt_sub, gt_obj = ground_truth.subjects[gt], ground_truth.objects[gt]
    same_classes = (predictions.labels[pred_sub] == ground_truth.labels[gt_sub]) & (
        predictions.labels[pred_obj] == ground_truth.labels[gt_obj]
    )
    iou_sub = iou_touching_apart(predictions.boxes[pred_sub], ground_truth.boxes[gt_sub])
    iou_obj = iou_touching_apart(predictions.boxes[pred_obj], ground_truth.boxes[gt_obj])
    match = same_classes & (iou_sub >= iou_threshold) & (iou_obj >= iou_threshold)
    pred, gt, overlap = pred[match], gt[match], np.minimum(iou_sub, iou_obj)[match]

    # Best ground truth per prediction: largest overlap, then the first in file order.
    order = np.lexsort((gt, -overlap, pred))
    pred, gt = pred[order], gt[order]
    first = segment_starts(pred)
    chosen_pred, chosen_gt = pred[first], gt[first]  # chosen_pred ascends = evaluation order
    _, winner = np.unique(chosen_gt, return_index=True)  # first prediction to reach each GT
    true_positive = np.zeros(len(kept), dtype=bool)
    true_positive[chosen_pred[winner]] = True
    return true_positive


def voc_ap_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point VOC AP: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t."""
    recall, precision = np.asarray(recall, dtype=float), np.asarray(precision, dtype=float)
    return float(sum(precision[recall >= t].max(initial=0.0) for t in RECALL_POINTS) / len(RECALL_POINTS))


def ap_per_class(
    class_of: np.ndarray, scores: np.ndarray, true_positive: np.ndarray, num_positives: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """11-point AP and max recall of every class at once -> ((C,), (C,)); 0 where no predictions.

    Args:
        class_of: (K,) class index of each prediction.
        scores: (K,) its score (ranks predictions inside a class, descending; ties: given order).
        true_positive: (K,) bool.
        num_positives: (C,) ground-truth instances per class (> 0).
    """
    num_classes = len(num_positives)
    ap, max_recall = np.zeros(num_classes), np.zeros(num_classes)
    if len(class_of) == 0:
        return ap, max_recall
    order = np.lexsort((-scores, class_of))
    classes, hits = class_of[order], true_positive[order].astype(np.float64)
    starts = segment_starts(classes)
    sizes = np.diff(np.r_[starts, len(classes)])
    cumulative = np.cumsum(hits)
    tp = cumulative - np.repeat(cumulative[starts] - hits[starts], sizes)  # cumsum restarted per class
    seen = np.arange(1, len(classes) + 1) - np.repeat(starts, sizes)
    recall = tp / num_positives[classes]
    precision = tp / seen
    group_ap = np.zeros(len(starts))
    for point in RECALL_POINTS:
        group_ap += np.maximum.reduceat(np.where(recall >= point, precision, 0.0), starts)
    ap[classes[starts]] = group_ap / len(RECALL_POINTS)
    max_recall[classes[starts]] = np.maximum.reduceat(recall, starts)
    return ap, max_recall


def _triplet_codes(hois: HoiSet, index: np.ndarray) -> np.ndarray:
    """(subject class, object class, verb) of HOIs ``index`` as one int64 each (see ``_decode``)."""
    subject = hois.labels[hois.subjects[index]]
    obj = hois.labels[hois.objects[index]]
    return (subject * NUM_OBJECTS + obj) * len(HICO_VERBS) + hois.verbs[index]


def _decode(code: int) -> Triplet:
    pair, verb = divmod(code, len(HICO_VERBS))
    subject, obj = divmod(pair, NUM_OBJECTS)
    return subject, obj, verb


def _split(ap: np.ndarray, rare: np.ndarray) -> SplitAp:
    return SplitAp(full=_mean(ap), rare=_mean(ap[rare]), non_rare=_mean(ap[~rare]))


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _percent(value: float) -> float | None:
    return None if np.isnan(value) else 100.0 * value
