"""From the model's output dict to preds.json entries (HICO-DET and V-COCO), with optional triplet NMS.

Every query q proposes one (subject, object) pair; every verb v of it gives a triplet with

    score(q, v) = sigmoid(verb_logit[q, v]) * max_{o < 80} softmax(obj_logits[q])[o]

(the no-object class is left out of the max; its label is that argmax). Subjects are ``person``.
Then, per image: triplets whose (verb, object) is invalid in the correspondence matrix (when one
is given) are dropped, the ``top_k`` best are kept, and triplet NMS (when configured) runs on
those, as the reference codebases order it (``nms_order="top_k_first"``; so fewer than
``top_k`` may remain). ``nms_order="nms_first"`` runs NMS over every candidate before the cut.
Boxes are converted to absolute ``xyxy`` pixels of the original image (rounded to 0.01 px, which
keeps preds.json small and is far below what an IoU of 0.5 can notice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from student.box_ops import denormalize_cxcywh
from student.evaluation.boxes import iou_touching_shared
from student.evaluation.predictions import (
    COCO_IDS,
    NO_OBJECT_ID,
    VERB_ID_OFFSET,
    EvaluationError,
    verbs_of,
)
from teacher_server.hoi.classes import OBJECT_NAMES

NUM_OBJECTS = len(OBJECT_NAMES)
PERSON_COCO_ID = 1
#: When triplet NMS runs: on the top_k kept (the reference order) or over all candidates first.
NMS_ORDERS = ("top_k_first", "nms_first")
_OUTPUT_KEYS = ("pred_obj_logits", "pred_verb_logits", "pred_sub_boxes", "pred_obj_boxes")


@dataclass(frozen=True)
class TripletNms:
    """Triplet NMS: among triplets of one class (same object class and verb; subjects are all
    persons), a triplet is suppressed by a higher-scoring one when
    ``IoU_h ** alpha * IoU_o ** beta > threshold`` (IoU with the +1 pixel convention)."""

    threshold: float = 0.7
    alpha: float = 1.0
    beta: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"TripletNms.threshold = {self.threshold} is outside 0..1")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"TripletNms exponents must be >= 0, got alpha={self.alpha}, beta={self.beta}")

    def keep(
        self,
        sub_boxes: np.ndarray,  # (Q, 4) xyxy
        obj_boxes: np.ndarray,  # (Q, 4) xyxy
        obj_classes: np.ndarray,  # (Q,) int; one value per "class" of object (incl. "no object")
        scores: np.ndarray,  # (Q, V)
        valid: np.ndarray,  # (Q, V) bool: candidates
    ) -> np.ndarray:
        """Greedy NMS of every verb at once -> (Q, V) bool, True for the triplets kept."""
        num_queries, num_verbs = scores.shape
        overlap = _pairwise(sub_boxes) ** self.alpha * _pairwise(obj_boxes) ** self.beta
        suppresses = (overlap > self.threshold) & (obj_classes[:, None] == obj_classes[None, :])
        # Columns (verbs) are independent NMS problems with the same query-by-query overlap, so step r
        # handles the r-th best candidate of every verb in one vectorised update.
        order = np.argsort(-np.where(valid, scores, -np.inf), axis=0, kind="stable")
        alive = valid.copy()
        keep = np.zeros_like(valid)
        columns = np.arange(num_verbs)
        for rank in range(num_queries):
            query = order[rank]
            taken = alive[query, columns]
            if not taken.any():
                continue
            keep[query[taken], columns[taken]] = True
            alive[:, columns[taken]] &= ~suppresses[query[taken]].T
        return keep


@torch.no_grad()
def postprocess(
    outputs: Mapping[str, Tensor],
    orig_sizes: Tensor | Sequence[Sequence[int]],
    *,
    dataset: str = "hico",
    correspondence: np.ndarray | None = None,
    top_k: int | None = 100,
    nms: TripletNms | None = None,
    file_names: Sequence[str] | None = None,
    vcoco_no_object_role: bool = False,
    nms_order: str = "top_k_first",
) -> list[dict]:
    """Model outputs of a batch -> one preds.json entry per image.

    Args:
        outputs: ``pred_obj_logits (B, Q, 81)`` (last = no-object), ``pred_verb_logits (B, Q, V)``,
            ``pred_sub_boxes`` / ``pred_obj_boxes (B, Q, 4)`` cxcywh normalised; any device.
        orig_sizes: (B, 2) (height, width) of the original images, as in ``target["orig_size"]``.
        dataset: "hico" (verb ids 1..117 in the output) or "vcoco" (verb ids 0..28).
        correspondence: optional (V, 80) bool verb x object validity; invalid triplets are dropped
            before NMS and the top-k cut (the HICO-DET evaluator drops them anyway: dropping them
            here keeps them from taking top-k places).
        top_k: triplets kept per image (None: all Q x V).
        nms: optional triplet NMS.
        nms_order: ``top_k_first`` (default, the reference codebases' order: keep the top_k, then
            NMS among them) or ``nms_first`` (NMS over all candidates, then the top_k).
        file_names: optional, copied into the entries (the evaluator checks them).
        vcoco_no_object_role: V-COCO only. A pair whose most likely class of all 81 is the
            no-object class is emitted without object (``object_id = -1``, an empty role box, which
            scenario 1 needs for a role without object) and scored with that probability instead.

    Returns:
        ``[{"file_name"?, "predictions": [{"bbox", "category_id"}], "hoi_prediction":
        [{"subject_id", "object_id", "category_id", "score"}]}]``; only boxes used by a kept
        triplet are listed (subjects first, then objects).
    """
    for key in _OUTPUT_KEYS:
        if key not in outputs:
            raise EvaluationError(f"model outputs lack {key!r}: expected the keys {', '.join(_OUTPUT_KEYS)}")
    if nms_order not in NMS_ORDERS:
        raise EvaluationError(f"nms_order = {nms_order!r}: expected one of {', '.join(NMS_ORDERS)}")
    verbs = verbs_of(dataset)
    obj_logits = outputs["pred_obj_logits"].detach().float()
    verb_logits = outputs["pred_verb_logits"].detach().float()
    batch, num_queries, num_classes = obj_logits.shape
    if num_classes != NUM_OBJECTS + 1:
        raise EvaluationError(f"pred_obj_logits has {num_classes} classes, expected {NUM_OBJECTS} + no-object")
    if verb_logits.shape != (batch, num_queries, len(verbs)):
        raise EvaluationError(
            f"pred_verb_logits has shape {tuple(verb_logits.shape)}, "
            f"expected {(batch, num_queries, len(verbs))} for {dataset}"
        )
    sizes = torch.as_tensor(orig_sizes, dtype=torch.float32).to(obj_logits.device)
    if sizes.shape != (batch, 2):
        raise EvaluationError(f"orig_sizes has shape {tuple(sizes.shape)}, expected (batch, 2) = ({batch}, 2)")
    if file_names is not None and len(file_names) != batch:
        raise EvaluationError(f"{len(file_names)} file_names for a batch of {batch}")
    if correspondence is not None and np.shape(correspondence) != (len(verbs), NUM_OBJECTS):
        raise EvaluationError(
            f"correspondence has shape {np.shape(correspondence)}, expected {(len(verbs), NUM_OBJECTS)}"
        )

    obj_prob = obj_logits.softmax(-1)
    obj_score, obj_label = obj_prob[..., :NUM_OBJECTS].max(-1)
    no_object = torch.zeros_like(obj_label, dtype=torch.bool)
    if dataset == "vcoco" and vcoco_no_object_role:
        no_object = obj_prob[..., NUM_OBJECTS] > obj_score
        obj_score = torch.where(no_object, obj_prob[..., NUM_OBJECTS], obj_score)
    scores = verb_logits.sigmoid() * obj_score[..., None]
    height, width = sizes.unbind(-1)
    sub_boxes = denormalize_cxcywh(outputs["pred_sub_boxes"].detach().float(), width, height)
    obj_boxes = denormalize_cxcywh(outputs["pred_obj_boxes"].detach().float(), width, height)

    arrays = [t.cpu().numpy() for t in (scores, obj_label, no_object, sub_boxes, obj_boxes)]
    valid_pairs = None if correspondence is None else np.asarray(correspondence, dtype=bool)
    entries = []
    for image in range(batch):
        score, label, missing, sub, obj = (a[image] for a in arrays)
        entry = _image_entry(
            score,
            label,
            missing,
            sub,
            obj,
            correspondence=valid_pairs,
            top_k=top_k,
            nms=nms,
            nms_order=nms_order,
            verb_offset=VERB_ID_OFFSET[dataset],
        )
        if file_names is not None:
            entry = {"file_name": file_names[image], **entry}
        entries.append(entry)
    return entries


def _image_entry(
    scores: np.ndarray,  # (Q, V)
    labels: np.ndarray,  # (Q,) object index
    missing: np.ndarray,  # (Q,) bool: pair without object (V-COCO option)
    sub_boxes: np.ndarray,  # (Q, 4) xyxy pixels
    obj_boxes: np.ndarray,  # (Q, 4)
    *,
    correspondence: np.ndarray | None,
    top_k: int | None,
    nms: TripletNms | None,
    nms_order: str,
    verb_offset: int,
) -> dict:
    num_verbs = scores.shape[1]
    valid = np.ones(scores.shape, dtype=bool)
    if correspondence is not None:
        valid &= correspondence[:, labels].T | missing[:, None]

    def triplet_nms(candidates: np.ndarray) -> np.ndarray:  # (Q, V) bool -> the ones NMS keeps
        assert nms is not None  # called only when it is set
        classes = np.where(missing, NUM_OBJECTS, labels)
        return nms.keep(sub_boxes, np.where(missing[:, None], 0.0, obj_boxes), classes, scores, candidates)

    if nms is not None and nms_order == "nms_first":
        valid &= triplet_nms(valid)
    candidates = np.flatnonzero(valid.ravel())
    chosen = candidates[np.argsort(-scores.ravel()[candidates], kind="stable")]
    if top_k is not None:
        chosen = chosen[:top_k]
    if nms is not None and nms_order == "top_k_first":
        kept = np.zeros(scores.size, dtype=bool)
        kept[chosen] = True
        chosen = chosen[triplet_nms(kept.reshape(scores.shape)).ravel()[chosen]]  # still best first
    queries, verbs = np.divmod(chosen, num_verbs)

    # List each used query's subject box once, then the object boxes of those that have one.
    used = np.unique(queries)
    with_object = used[~missing[used]]
    subject_id = np.searchsorted(used, queries)
    object_id = np.where(missing[queries], NO_OBJECT_ID, len(used) + np.searchsorted(with_object, queries))
    boxes = np.concatenate((sub_boxes[used], obj_boxes[with_object])).round(2).tolist()
    categories = [PERSON_COCO_ID] * len(used) + COCO_IDS[labels[with_object]].tolist()
    return {
        "predictions": [{"bbox": box, "category_id": c} for box, c in zip(boxes, categories, strict=True)],
        "hoi_prediction": [
            {"subject_id": s, "object_id": o, "category_id": v, "score": p}
            for s, o, v, p in zip(
                subject_id.tolist(),
                object_id.tolist(),
                (verbs + verb_offset).tolist(),
                scores[queries, verbs].astype(np.float64).tolist(),
                strict=True,
            )
        ],
    }


def _pairwise(boxes: np.ndarray) -> np.ndarray:
    """(Q, 4) xyxy -> (Q, Q) IoU, touching boxes sharing a pixel row (the reference triplet NMS's)."""
    return iou_touching_shared(boxes[:, None], boxes[None])
