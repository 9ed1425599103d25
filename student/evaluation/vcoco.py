"""V-COCO role AP, scenario 1 and scenario 2, as the official ``vsrl_eval`` defines them.

Computed directly from our annotation format (``test_vcoco.json``-style: 29 role-split verbs such
as ``eat_obj`` / ``eat_instr``, ``object_id = -1`` for a role without object) and preds.json
triplets, with no pickle and no Python 2 step. ``vsrl_eval`` in our terms:

- A role class is a role-split verb with a role (``hold_obj``, ``eat_instr``, ...): 25 of them.
  Agent-only actions (``stand``, ``walk``, ``run``, ``smile``) have no role AP. The mean leaves
  out ``point`` (as the V-COCO paper's numbers do), so it runs over 24 classes.
- Ground-truth persons are the person boxes of the image (and any HOI subject). A person "has"
  an action when it is the subject of any HOI of that action (``eat`` for ``eat_obj`` and
  ``eat_instr``); positives of a role class = persons having its action. Its ground-truth role
  boxes are the objects of that person's HOIs with that verb; none -> "no role object".
- Ground-truth boxes follow the official convention: ``vsrl_eval`` reads COCO's ``[x, y, w, h]``
  as ``x2 = x + w - 1`` (inclusive pixel ends), while ``test_vcoco.json`` of the DETR-line
  codebases stores ``x2 = x + w``. With ``ground_truth_boxes="detr"`` (default) the evaluator
  takes 1 off ``x2`` and ``y2`` of the ground truth (never below ``x1``/``y1``); ``"official"``
  reads a file that already holds inclusive ends as it is. Near IoU 0.5 it decides: a
  100 x 100 px person and an agent covering half of it score 0.502 one way and 0.492 the other.
- Each predicted triplet of a role verb is one detection: agent box = its subject box, role box
  = its object box (``object_id = -1``: empty), score = its score. Taken by descending score,
  the agent goes to the ground-truth person of the image with the largest IoU (+1 pixel
  convention; first person on ties). It is a true positive when that person has the action,
  agent IoU >= 0.5 and role IoU >= 0.5, and no earlier detection took that (person, role
  class); otherwise a false positive.
- Role IoU when the person has no role object: scenario 1 counts 1 only if the predicted role
  box is empty (``object_id`` -1, or a box of all zeros), else 0; scenario 2 counts 1 always.
- AP is the all-point (area under the interpolated curve) VOC AP; a class without ground truth
  has no AP and no part in the mean.
- ``vsrl_eval`` skips a detection whose best person is not annotated in V-COCO. Our format cannot
  tell an unannotated person from an annotated one without any action; with
  ``ignore_persons_without_actions=True`` (default) a person that is the subject of no HOI is
  treated as unannotated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from student.evaluation.boxes import iou_touching_shared
from student.evaluation.predictions import EvaluationError, HoiSet, join_on_keys, segment_starts
from teacher_server.hoi.classes import VCOCO_VERBS

IOU_THRESHOLD = 0.5
ROLE_SUFFIXES = ("obj", "instr")
#: How the ground-truth file stores box ends: ``detr`` x2 = x + w (converted), ``official`` x + w - 1.
GROUND_TRUTH_BOXES = ("detr", "official")
#: Actions whose role classes are left out of the mean role AP.
EXCLUDED_ACTIONS: tuple[str, ...] = ("point",)
PERSON = 0  # object index of "person"


@dataclass(frozen=True)
class RoleClass:
    """One role-split V-COCO verb with a role, e.g. verb 8 ``eat_obj`` = action ``eat``, role ``obj``."""

    verb: int
    name: str
    action: str
    role: str


def split_verb(name: str) -> tuple[str, str | None]:
    """``"talk_on_phone_instr"`` -> ``("talk_on_phone", "instr")``; ``"stand"`` -> ``("stand", None)``."""
    action, _, role = name.rpartition("_")
    if action and role in ROLE_SUFFIXES:
        return action, role
    return name, None


def role_classes(verbs: tuple[str, ...] = VCOCO_VERBS) -> tuple[RoleClass, ...]:
    """The role classes among ``verbs`` (verbs with a role), in verb order."""
    classes = []
    for index, name in enumerate(verbs):
        action, role = split_verb(name)
        if role is not None:
            classes.append(RoleClass(verb=index, name=name, action=action, role=role))
    return tuple(classes)


@dataclass(frozen=True)
class VcocoResult:
    """Mean role AP of both scenarios (fractions) and the per-class numbers behind them."""

    scenario_1: float
    scenario_2: float
    role_ap_1: dict[str, float]  # role verb name -> AP (NaN: no ground truth)
    role_ap_2: dict[str, float]
    num_positives: dict[str, int]

    def summary(self) -> dict:
        """The CLI's JSON: ``{"scenario_1", "scenario_2"}`` in percent (``None`` if undefined)."""
        return {"scenario_1": _percent(self.scenario_1), "scenario_2": _percent(self.scenario_2)}


def evaluate_vcoco(
    predictions: HoiSet,
    ground_truth: HoiSet,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    ignore_persons_without_actions: bool = True,
    ground_truth_boxes: str = "detr",
) -> VcocoResult:
    """V-COCO role AP in scenario 1 and 2 (see the module docstring for the protocol).

    Args:
        predictions: one image per ground-truth image, same order; verbs are V-COCO verb indices.
        ground_truth: the test annotations.
        iou_threshold: minimum agent and role IoU of a true positive.
        ignore_persons_without_actions: skip detections whose best person has no HOI at all
            (``vsrl_eval`` skips persons V-COCO did not annotate).
        ground_truth_boxes: ``detr`` (the file's x2 = x + w, as the DETR-line ``test_vcoco.json``;
            converted to the official x + w - 1) or ``official`` (used as they are).
    """
    if ground_truth_boxes not in GROUND_TRUTH_BOXES:
        raise EvaluationError(
            f"ground_truth_boxes = {ground_truth_boxes!r}: expected one of {', '.join(GROUND_TRUTH_BOXES)}"
        )
    if predictions.num_images != ground_truth.num_images:
        raise EvaluationError(
            f"predictions cover {predictions.num_images} images but the annotations have {ground_truth.num_images}"
        )
    num_verbs = len(VCOCO_VERBS)
    actions = sorted({split_verb(name)[0] for name in VCOCO_VERBS})
    action_of_verb = np.array([actions.index(split_verb(name)[0]) for name in VCOCO_VERBS])
    classes = role_classes()
    has_role = np.zeros(num_verbs, dtype=bool)
    has_role[[c.verb for c in classes]] = True
    gt = ground_truth
    gt_boxes = official_box_ends(gt.boxes) if ground_truth_boxes == "detr" else gt.boxes

    # Ground-truth persons, the actions each has, and their role objects.
    is_person = gt.labels == PERSON
    is_person[gt.subjects] = True
    persons = np.flatnonzero(is_person)  # global box indices, grouped by image
    action_keys = np.unique(gt.subjects * len(actions) + action_of_verb[gt.verbs])
    positives_per_action = np.bincount(action_keys % len(actions), minlength=len(actions))
    ignored = np.zeros(len(gt.labels), dtype=bool)
    if ignore_persons_without_actions:
        ignored[:] = True
        ignored[gt.subjects] = False
    with_object = gt.objects >= 0
    role_keys = gt.subjects[with_object] * num_verbs + gt.verbs[with_object]
    role_boxes = gt_boxes[gt.objects[with_object]]

    # Detections: predicted triplets of role verbs.
    index = np.flatnonzero(has_role[predictions.verbs])
    verbs = predictions.verbs[index]
    images = predictions.hoi_image[index]
    scores = predictions.scores[index]
    agents = predictions.boxes[predictions.subjects[index]]
    objects = predictions.objects[index]
    predicted_roles = predictions.boxes[np.maximum(objects, 0)]
    predicted_roles[objects < 0] = np.nan
    count = len(index)

    # The agent goes to the best-overlapping person of its image (first person on ties).
    det, person = join_on_keys(images, gt.box_image[persons])
    overlap = iou_touching_shared(agents[det], gt_boxes[persons[person]])
    order = np.lexsort((person, -overlap, det))
    det, person, overlap = det[order], person[order], overlap[order]
    first = segment_starts(det)
    best_person = np.full(count, -1)
    best_overlap = np.zeros(count)
    best_person[det[first]] = persons[person[first]]
    best_overlap[det[first]] = overlap[first]
    matched = best_person >= 0
    # vsrl_eval skips (not even a false positive) a detection whose best person is not annotated.
    best_ignored = np.zeros(count, dtype=bool)
    best_ignored[matched] = ignored[best_person[matched]]
    counted = ~best_ignored
    true_action = matched & np.isin(best_person * len(actions) + action_of_verb[verbs], action_keys)

    # Role overlap with the person's ground-truth role box(es) of this verb (best one if several).
    det_keys = np.where(matched, best_person * num_verbs + verbs, -1)
    det, role = join_on_keys(det_keys, role_keys)
    role_overlap = iou_touching_shared(predicted_roles[det], role_boxes[role])  # 0 for a NaN (no) role box
    has_gt_role = np.zeros(count, dtype=bool)
    has_gt_role[det] = True
    best_role_overlap = np.zeros(count)
    np.maximum.at(best_role_overlap, det, role_overlap)
    empty_role = np.isnan(predicted_roles).all(axis=1) | (predicted_roles == 0).all(axis=1)
    role_overlap_by_scenario = (
        np.where(has_gt_role, best_role_overlap, np.where(empty_role, 1.0, 0.0)),  # scenario 1
        np.where(has_gt_role, best_role_overlap, 1.0),  # scenario 2
    )

    num_positives = {c.name: int(positives_per_action[actions.index(c.action)]) for c in classes}
    results = []
    for role_overlap_s in role_overlap_by_scenario:
        agent_ok = counted & true_action & (best_overlap >= iou_threshold)
        candidate = agent_ok & (role_overlap_s >= iou_threshold)
        true_positive = _first_per_key(candidate, best_person * num_verbs + verbs, scores)
        role_ap = {}
        for c in classes:
            mine = counted & (verbs == c.verb)
            role_ap[c.name] = _role_ap(scores[mine], true_positive[mine], num_positives[c.name])
        results.append(role_ap)

    def mean(role_ap: dict[str, float]) -> float:
        values = [role_ap[c.name] for c in classes if c.action not in EXCLUDED_ACTIONS]
        values = [ap for ap in values if not np.isnan(ap)]
        return float(np.mean(values)) if values else float("nan")

    return VcocoResult(
        scenario_1=mean(results[0]),
        scenario_2=mean(results[1]),
        role_ap_1=results[0],
        role_ap_2=results[1],
        num_positives=num_positives,
    )


def official_box_ends(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy with exclusive ends (x2 = x + w) -> ``vsrl_eval``'s inclusive ends (x2 = x + w - 1).

    As ``vsrl_eval`` builds x2 = x1 + max(0, w - 1): a box narrower than one pixel keeps x2 = x1.
    """
    converted = np.array(boxes, dtype=np.float64, copy=True)
    converted[:, 2] = np.maximum(converted[:, 0], converted[:, 2] - 1)
    converted[:, 3] = np.maximum(converted[:, 1], converted[:, 3] - 1)
    return converted


def voc_ap_all_points(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point VOC AP: area under the precision envelope (precision made non-increasing)."""
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _first_per_key(candidate: np.ndarray, keys: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """True for the highest-scoring candidate of each key (ties: the earlier one) -> (K,) bool."""
    index = np.flatnonzero(candidate)
    index = index[np.argsort(-scores[index], kind="stable")]
    _, first = np.unique(keys[index], return_index=True)
    result = np.zeros(len(candidate), dtype=bool)
    result[index[first]] = True
    return result


def _role_ap(scores: np.ndarray, true_positive: np.ndarray, num_positives: int) -> float:
    if num_positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(true_positive[order])
    fp = np.cumsum(~true_positive[order])
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap_all_points(recall, precision)


def _percent(value: float) -> float | None:
    return None if np.isnan(value) else 100.0 * value
