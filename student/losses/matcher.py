"""Hungarian matching of HOI queries to ground-truth human-object pairs (QPIC-style costs).

Each query predicts one (human box, object box, object class, verbs) tuple; each ground-truth
pair is one (subject, object) annotation with a multi-hot verb vector. The matcher picks the
one-to-one assignment of queries to pairs with the least total cost, per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from student.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# The model keys the matcher reads; everything else in the output dict is ignored.
OUTPUT_KEYS = ("pred_obj_logits", "pred_verb_logits", "pred_sub_boxes", "pred_obj_boxes")
TARGET_KEYS = ("obj_labels", "verb_labels", "sub_boxes", "obj_boxes")

MatchIndices = list[tuple[Tensor, Tensor]]  # per image: (query idx (K,), pair idx (K,)), CPU int64


class LossError(ValueError):
    """Malformed model outputs or targets given to the matcher, the HOI criterion or a distillation loss."""


def has_object_box(obj_boxes: Tensor) -> Tensor:
    """(P, 4) cxcywh -> (P,) bool: False for pairs without an object (V-COCO: the box row is all zero)."""
    return (obj_boxes != 0).any(dim=-1)


def check_outputs(outputs: Mapping[str, Tensor], where: str = "outputs") -> tuple[int, int, int]:
    """Check the model output dict against ``docs/contracts.md``; returns (B, Q, V).

    Raises ``LossError`` naming the key and the expected shape.
    """
    for key in OUTPUT_KEYS:
        if key not in outputs:
            raise LossError(f"{where}: missing key {key!r}; the model must return {', '.join(OUTPUT_KEYS)}")
    obj_logits = outputs["pred_obj_logits"]
    if obj_logits.dim() != 3:
        raise LossError(f"{where}['pred_obj_logits']: expected (B, Q, C+1), got {tuple(obj_logits.shape)}")
    batch, queries, _ = obj_logits.shape
    verbs = outputs["pred_verb_logits"]
    if verbs.dim() != 3 or verbs.shape[:2] != (batch, queries):
        raise LossError(f"{where}['pred_verb_logits']: expected ({batch}, {queries}, V), got {tuple(verbs.shape)}")
    for key in ("pred_sub_boxes", "pred_obj_boxes"):
        if tuple(outputs[key].shape) != (batch, queries, 4):
            raise LossError(f"{where}[{key!r}]: expected ({batch}, {queries}, 4), got {tuple(outputs[key].shape)}")
    return batch, queries, verbs.shape[-1]


def check_targets(targets: Sequence[Mapping[str, Tensor]], batch: int, num_verbs: int) -> None:
    """Check one target dict per image (``docs/contracts.md``): consistent pair counts P and V verb columns.

    Raises ``LossError`` naming ``targets[i]['field']``, the shape found and the one expected.
    """
    if len(targets) != batch:
        raise LossError(f"targets: {len(targets)} entries for a batch of {batch} images")
    for i, target in enumerate(targets):
        for key in TARGET_KEYS:
            if key not in target:
                raise LossError(f"targets[{i}]: missing key {key!r}; expected {', '.join(TARGET_KEYS)}")
        pairs = target["obj_labels"].shape[0]
        expected = {
            "obj_labels": (pairs,),
            "verb_labels": (pairs, num_verbs),
            "sub_boxes": (pairs, 4),
            "obj_boxes": (pairs, 4),
        }
        for key, shape in expected.items():
            if tuple(target[key].shape) != shape:
                raise LossError(
                    f"targets[{i}][{key!r}]: expected shape {shape} (P={pairs}, V={num_verbs}), "
                    f"got {tuple(target[key].shape)}"
                )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth pairs minimising a weighted cost.

    Cost of query q for pair p (all terms weighted by the constructor's arguments):
      - object class: ``-softmax(obj_logits)[q, obj_label[p]]`` (label 80 = "no object" for V-COCO
        pairs without one, as QPIC);
      - verbs: ``-(t.sigmoid(s) / sum t + (1-t).(1-sigmoid(s)) / sum (1-t)) / 2``, a term is 0 when
        its denominator is 0; 0 for a pair whose ``verb_known`` is False (verbs never annotated);
      - L1: ``max(|h_q - h_p|_1, |o_q - o_p|_1)`` on cxcywh boxes;
      - GIoU: ``max(-GIoU(h_q, h_p), -GIoU(o_q, o_p))``;
    where pairs without an object box use the human terms only.
    """

    def __init__(
        self,
        cost_obj_class: float = 1.0,
        cost_verb_class: float = 1.0,
        cost_bbox: float = 2.5,
        cost_giou: float = 1.0,
    ) -> None:
        super().__init__()
        if min(cost_obj_class, cost_verb_class, cost_bbox, cost_giou) < 0:
            raise LossError(
                "HungarianMatcher: costs must be >= 0, got "
                f"obj={cost_obj_class}, verb={cost_verb_class}, bbox={cost_bbox}, giou={cost_giou}"
            )
        if cost_obj_class == cost_verb_class == cost_bbox == cost_giou == 0:
            raise LossError("HungarianMatcher: at least one cost must be > 0")
        self.cost_obj_class = cost_obj_class
        self.cost_verb_class = cost_verb_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> MatchIndices:
        """Match every image of the batch.

        outputs: model dict with ``pred_obj_logits`` (B, Q, 81), ``pred_verb_logits`` (B, Q, V),
            ``pred_sub_boxes`` and ``pred_obj_boxes`` (B, Q, 4) cxcywh normalised.
        targets: B dicts with ``obj_labels`` (P,), ``verb_labels`` (P, V), ``sub_boxes`` and
            ``obj_boxes`` (P, 4) cxcywh normalised.
        Returns per image ``(query_idx, pair_idx)``: CPU int64 tensors of length min(Q, P), sorted by
        query index; both empty for an image with no pairs.
        """
        indices: MatchIndices = []
        for b, cost in enumerate(self.batch_costs(outputs, targets)):
            if not np.isfinite(cost).all():
                raise LossError(f"matcher: image {b} has a non-finite cost (NaN or inf in the model outputs)")
            rows, cols = linear_sum_assignment(cost)
            query_idx = torch.as_tensor(rows, dtype=torch.int64)
            pair_idx = torch.as_tensor(cols, dtype=torch.int64)
            order = torch.argsort(query_idx)
            indices.append((query_idx[order], pair_idx[order]))
        return indices

    @torch.no_grad()
    def batch_costs(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> list[np.ndarray]:
        """Per image b, its (Q, P_b) cost as a float numpy array on the host.

        As DETR: one (B*Q, sum P) cost of every query against every pair of the batch on the
        model's device, one copy to the host (a GPU synchronises once per decoder layer, not once
        per image), then each image keeps its own columns. Every cost term is computed row by
        row and column by column, so each image's block equals ``cost_matrix`` of that image alone.
        """
        batch, queries, num_verbs = check_outputs(outputs)
        check_targets(targets, batch, num_verbs)
        sizes = [int(target["obj_labels"].shape[0]) for target in targets]
        flat = {key: outputs[key].flatten(0, 1) for key in OUTPUT_KEYS}  # (B*Q, k)
        device = flat["pred_obj_logits"].device
        joined = {key: torch.cat([target[key].to(device) for target in targets]) for key in TARGET_KEYS}
        if any("verb_known" in target for target in targets):
            joined["verb_known"] = torch.cat(
                [
                    target["verb_known"].to(device)
                    if "verb_known" in target
                    else torch.ones(size, dtype=torch.bool, device=device)
                    for target, size in zip(targets, sizes, strict=True)
                ]
            )
        cost = self.cost_matrix(flat, joined).view(batch, queries, -1).cpu().numpy()  # the one host copy
        starts = np.cumsum([0, *sizes])
        return [cost[b, :, starts[b] : starts[b + 1]] for b in range(batch)]

    def cost_matrix(self, prediction: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
        """The (N, P) cost of N query predictions (the four output keys, (N, k) each: one image's
        queries, or a whole batch's flattened) against P ground-truth pairs."""
        obj_logits = prediction["pred_obj_logits"]
        device, dtype = obj_logits.device, obj_logits.dtype
        obj_labels = target["obj_labels"].to(device)
        verb_labels = target["verb_labels"].to(device=device, dtype=dtype)
        sub_boxes = target["sub_boxes"].to(device=device, dtype=dtype)
        obj_boxes = target["obj_boxes"].to(device=device, dtype=dtype)

        cost_obj = -obj_logits.softmax(-1)[:, obj_labels]  # (N, P)
        cost_verb = verb_cost(prediction["pred_verb_logits"], verb_labels)
        if "verb_known" in target:  # a pair whose verbs were never annotated: no verb cost
            cost_verb = cost_verb * target["verb_known"].to(device=device, dtype=dtype)[None, :]
        with_object = has_object_box(obj_boxes)[None, :]  # (1, P)

        pred_sub, pred_obj = prediction["pred_sub_boxes"], prediction["pred_obj_boxes"]
        l1_sub = torch.cdist(pred_sub, sub_boxes, p=1)
        l1_obj = torch.cdist(pred_obj, obj_boxes, p=1)
        cost_bbox = torch.where(with_object, torch.maximum(l1_sub, l1_obj), l1_sub)

        giou_sub = -generalized_box_iou(box_cxcywh_to_xyxy(pred_sub), box_cxcywh_to_xyxy(sub_boxes))
        giou_obj = -generalized_box_iou(box_cxcywh_to_xyxy(pred_obj), box_cxcywh_to_xyxy(obj_boxes))
        cost_giou = torch.where(with_object, torch.maximum(giou_sub, giou_obj), giou_sub)

        return (
            self.cost_obj_class * cost_obj
            + self.cost_verb_class * cost_verb
            + self.cost_bbox * cost_bbox
            + self.cost_giou * cost_giou
        )


def verb_cost(verb_logits: Tensor, verb_labels: Tensor) -> Tensor:
    """QPIC's verb cost: (Q, V) logits and (P, V) multi-hot labels -> (Q, P).

    The mean predicted probability over the pair's positive verbs plus the mean "not" probability
    over its negative verbs, negated and halved. A pair with no positive (or no negative) verb has
    a zero sum there, and so a zero term rather than a division by zero.
    """
    # The products accumulate in float64 and round once: BLAS picks its summation order by the
    # matrix shapes, and in fp32 a batch's (B*Q, sum P) product would differ in the last bit from
    # one image's (Q, P) one; in float64 that difference vanishes in the final rounding.
    prob = verb_logits.double().sigmoid()
    labels = verb_labels.double()
    positives = labels.sum(-1).clamp(min=1e-6)  # the numerator is 0 too when the sum is 0
    negatives = (1 - labels).sum(-1).clamp(min=1e-6)
    match_pos = prob @ labels.T / positives[None, :]
    match_neg = (1 - prob) @ (1 - labels).T / negatives[None, :]
    return (-(match_pos + match_neg) / 2).to(verb_logits.dtype)
