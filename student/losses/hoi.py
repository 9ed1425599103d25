"""The HOI detection criterion: Hungarian matching, then box, object-class and verb losses.

L_HOI = w_bbox * (L1_human + L1_object) + w_giou * (GIoU_human + GIoU_object)
        + w_obj * CE_object + w_verb * focal_verb,
summed over the final decoder layer and every auxiliary layer (suffix ``_{i}``).

Two optional target keys change which verb entries the focal loss sees:
- ``verb_known (P,)`` bool: a pair whose verbs were never annotated (False) has no verb term at
  all, neither positive nor negative (its boxes and object class still count);
- ``verb_soft_target (P, V)``: teacher-completed targets in [0, 1] (the ``soft`` distillation,
  ``docs/distillation.md``), NaN where the label decides. Those entries leave the focal loss and
  form their own term ``loss_verb_soft``: the same focal loss with a soft target t (quality focal
  loss, ``-|t - p|^2 (t log p + (1 - t) log(1 - p))``, which equals the focal loss at t in {0, 1}).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from student.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from student.losses.matcher import HungarianMatcher, LossError, MatchIndices, check_outputs, has_object_box

LOSS_NAMES = ("obj_labels", "verb_labels", "boxes")
VERB_KNOWN_KEY = "verb_known"
SOFT_TARGET_KEY = "verb_soft_target"

# Loss term -> the LossWeights field that scales it. Aux layers add "_{i}" to the term name.
TERM_WEIGHTS = {
    "loss_obj_ce": "obj_class",
    "loss_verb_ce": "verb_class",
    "loss_verb_soft": "verb_class",
    "loss_sub_bbox": "bbox",
    "loss_obj_bbox": "bbox",
    "loss_sub_giou": "giou",
    "loss_obj_giou": "giou",
}
_AUX_SUFFIX = re.compile(r"^(?P<base>.+?)(?:_(?P<layer>\d+))?$")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the HOI loss terms (the paper's lambda_1..4); defaults are QPIC's and the paper's."""

    bbox: float = 2.5  # L1, applied to the human and the object box alike
    giou: float = 1.0
    obj_class: float = 1.0
    verb_class: float = 1.0

    def __post_init__(self) -> None:
        for name in ("bbox", "giou", "obj_class", "verb_class"):
            if getattr(self, name) < 0:
                raise LossError(f"LossWeights.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class PairCounts:
    """The loss denominators of a batch, averaged over ranks and at least 1.

    pairs / pairs_with_object: ground-truth pairs (box losses); verb_positives: positive verb
    labels plus the sum of the soft targets (the focal losses); obj_class_weight: the sum of the
    object cross-entropy's class weights over every query (1 for a matched object class, ``eos_coef`` for "no object").
    Each rank divides its sums by the same averaged numbers, so DDP's gradient mean equals the
    gradient of one process holding the whole global batch.
    """

    pairs: float
    pairs_with_object: float
    verb_positives: float | None = None  # None: the local count of the logits' own targets
    obj_class_weight: float | None = None  # None: the local weight sum (a weighted mean)


def verb_focal_loss(
    logits: Tensor, targets: Tensor, num_positives: float | None = None, weight: Tensor | None = None
) -> Tensor:
    """QPIC's verb focal loss (CornerNet's form, gamma 2, no alpha), normalised by the positives.

    logits: (..., V) raw verb logits; targets: (..., V) multi-hot (1 = positive).
    Returns a scalar: -(sum_pos (1-p)^2 log p + sum_neg p^2 log(1-p)) / max(#positives, 1).
    ``num_positives``: the denominator to use instead of this batch's own count (the global
    count under DDP, ``PairCounts.verb_positives``). ``weight``: (..., V) 0/1, the entries that
    take part (default: all).
    log p and log(1-p) are taken as logsigmoid(+-x), which stays finite where sigmoid saturates.
    """
    prob = logits.sigmoid()
    positive = targets > 0.5
    pos_term = (1 - prob).pow(2) * F.logsigmoid(logits)
    neg_term = prob.pow(2) * F.logsigmoid(-logits)
    terms = torch.where(positive, pos_term, neg_term)
    if weight is not None:
        terms = terms * weight
        positive = positive & (weight > 0)
    if num_positives is None:
        return -terms.sum() / positive.sum().clamp(min=1)
    return -terms.sum() / max(num_positives, 1.0)


def soft_focal_sum(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Sum of the focal loss with soft targets t over the finite entries of ``soft_targets``.

    Per entry ``-|t - p|^2 (t log p + (1 - t) log(1 - p))`` with p = sigmoid(logit): the quality
    focal loss (Li et al., GFL) at gamma 2, which is exactly ``verb_focal_loss``'s term when t is 0
    or 1. logits, soft_targets: (..., V); NaN targets take no part (value and gradient 0).
    """
    entries = torch.isfinite(soft_targets)
    target = torch.where(entries, soft_targets, 0.0).to(logits.dtype)
    prob = logits.sigmoid()
    cross_entropy = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits))
    return torch.where(entries, (target - prob).abs().pow(2) * cross_entropy, 0.0).sum()


class HOICriterion(nn.Module):
    """DETR-style set criterion for HOI: match queries to pairs, then one small method per loss.

    Returns a dict of unweighted loss terms (``loss_*``, ``loss_*_{i}`` for aux layer i) plus the
    logging metric ``obj_class_error``; ``weighted_total`` turns it into the scalar to minimise.
    """

    class_weight: Tensor  # (C + 1,) buffer: 1 per class, eos_coef for "no object"

    def __init__(
        self,
        *,
        num_obj_classes: int = 80,
        num_verbs: int,
        matcher: HungarianMatcher | None = None,
        weights: LossWeights | None = None,
        eos_coef: float = 0.1,
        losses: Sequence[str] = LOSS_NAMES,
    ) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in LOSS_NAMES]
        if unknown:
            raise LossError(f"HOICriterion: unknown losses {unknown}; choose from {list(LOSS_NAMES)}")
        if not 0 <= eos_coef <= 1:
            raise LossError(f"HOICriterion: eos_coef must be in [0, 1], got {eos_coef}")
        if num_verbs < 1 or num_obj_classes < 1:
            raise LossError(
                f"HOICriterion: need num_verbs >= 1 and num_obj_classes >= 1, got {num_verbs} and {num_obj_classes}"
            )
        self.num_obj_classes = num_obj_classes
        self.num_verbs = num_verbs
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = weights if weights is not None else LossWeights()
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        # Down-weights the "no object" class, which most queries carry.
        class_weight = torch.ones(num_obj_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    def forward(
        self,
        outputs: Mapping[str, Any],
        targets: Sequence[Mapping[str, Tensor]],
        indices: MatchIndices | None = None,
    ) -> dict[str, Tensor]:
        """All loss terms of the final layer and of each ``outputs["aux_outputs"][i]``.

        indices: the final layer's matching if the caller already has it (e.g. to reuse it for
        distillation); aux layers are always matched afresh, as DETR does.
        """
        _, _, num_verbs = check_outputs(outputs)
        if num_verbs != self.num_verbs:
            raise LossError(f"outputs['pred_verb_logits']: {num_verbs} verbs, the criterion expects {self.num_verbs}")
        if indices is None:
            indices = self.matcher(outputs, targets)
        counts = self.num_pairs(
            targets, outputs["pred_verb_logits"].device, num_queries=outputs["pred_verb_logits"].shape[1]
        )
        result = self._layer_losses(outputs, targets, indices, counts, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            aux_indices = self.matcher(aux, targets)
            for key, value in self._layer_losses(aux, targets, aux_indices, counts, log=False).items():
                result[f"{key}_{i}"] = value
        return result

    def weighted_total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Sum of weight * term over every ``loss_*`` entry (aux included); metrics are ignored."""
        total: Tensor | None = None
        for key, value in losses.items():
            if not key.startswith("loss_"):
                continue
            match = _AUX_SUFFIX.match(key)
            base = match.group("base") if match else key
            if base not in TERM_WEIGHTS:
                raise LossError(f"weighted_total: no weight for loss term {key!r}; known: {sorted(TERM_WEIGHTS)}")
            term = getattr(self.weights, TERM_WEIGHTS[base]) * value
            total = term if total is None else total + term
        if total is None:
            raise LossError("weighted_total: no loss_* terms given")
        return total

    def num_pairs(
        self, targets: Sequence[Mapping[str, Tensor]], device: torch.device, num_queries: int | None = None
    ) -> PairCounts:
        """The loss denominators of this rank's batch: all-reduced and averaged when distributed.

        Every rank divides its loss sums by the same numbers, so DDP's gradient average equals
        the gradient of one process normalising by the global counts (DETR's convention for the
        boxes, extended here to the verb positives and the object class weights). The counts
        assume every pair is matched, which holds when no image has more pairs than queries (the
        trainer keeps at most ``num_queries`` pairs per image). ``num_queries`` None: the
        object class weight is left to each batch (a local weighted mean).
        """
        pairs = sum(int(t["obj_labels"].shape[0]) for t in targets)
        with_object = sum(int(has_object_box(t["obj_boxes"]).sum()) for t in targets)
        positives = sum(float((t["verb_labels"] > 0.5).sum()) for t in targets)
        # Soft targets count by their mass: a teacher-completed label is a (partial) positive.
        positives += sum(
            float(torch.nan_to_num(t[SOFT_TARGET_KEY], nan=0.0).sum()) for t in targets if SOFT_TARGET_KEY in t
        )
        class_weight = 0.0
        if num_queries is not None:
            weight = self.class_weight.double().cpu()
            for t in targets:
                labels = t["obj_labels"].to("cpu", torch.int64)[:num_queries]
                class_weight += float(weight[labels].sum()) + (num_queries - labels.shape[0]) * self.eos_coef
        counts = torch.tensor([pairs, with_object, positives, class_weight], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            counts = counts / dist.get_world_size()
        values = counts.clamp(min=1).tolist()
        return PairCounts(
            pairs=values[0],
            pairs_with_object=values[1],
            verb_positives=values[2],
            obj_class_weight=values[3] if num_queries is not None else None,
        )

    # -- one method per loss, selected by name -------------------------------------------------

    def loss_obj_labels(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: MatchIndices,
        counts: PairCounts,
        log: bool = True,
    ) -> dict[str, Tensor]:
        """Object cross-entropy over all queries; unmatched ones target "no object" (weight eos_coef)."""
        logits = outputs["pred_obj_logits"]  # (B, Q, C+1)
        batch_idx, query_idx = _flat_query_index(indices, logits.device)
        matched_labels = torch.cat([t["obj_labels"][pair] for t, (_, pair) in zip(targets, indices, strict=True)])
        matched_labels = matched_labels.to(device=logits.device, dtype=torch.int64)
        classes = torch.full(logits.shape[:2], self.num_obj_classes, dtype=torch.int64, device=logits.device)
        classes[batch_idx, query_idx] = matched_labels
        weight = self.class_weight.to(device=logits.device, dtype=logits.dtype)
        if counts.obj_class_weight is None:
            loss = F.cross_entropy(logits.transpose(1, 2), classes, weight)
        else:  # the same weighted mean, its denominator shared by all ranks
            per_query = F.cross_entropy(logits.transpose(1, 2), classes, weight, reduction="none")
            loss = per_query.sum() / counts.obj_class_weight
        result = {"loss_obj_ce": loss}
        if log:
            result["obj_class_error"] = _top1_error(logits[batch_idx, query_idx].detach(), matched_labels)
        return result

    def loss_verb_labels(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: MatchIndices,
        counts: PairCounts,
        log: bool = True,
    ) -> dict[str, Tensor]:
        """Verb focal loss over all queries; unmatched queries target no verb at all.

        A matched pair with ``verb_known`` False takes no verb term; entries with a finite
        ``verb_soft_target`` form ``loss_verb_soft`` instead (see the module docstring).
        """
        logits = outputs["pred_verb_logits"]  # (B, Q, V)
        batch_idx, query_idx = _flat_query_index(indices, logits.device)
        pairs = [pair for _, pair in indices]
        matched = torch.cat([t["verb_labels"][pair] for t, pair in zip(targets, pairs, strict=True)])
        verb_targets = torch.zeros_like(logits)
        verb_targets[batch_idx, query_idx] = matched.to(verb_targets)
        weight = None
        if any(VERB_KNOWN_KEY in t for t in targets):
            known = torch.cat(
                [
                    t[VERB_KNOWN_KEY][pair] if VERB_KNOWN_KEY in t else torch.ones(len(pair), dtype=torch.bool)
                    for t, pair in zip(targets, pairs, strict=True)
                ]
            )
            weight = torch.ones_like(logits)
            weight[batch_idx, query_idx] = known.to(device=logits.device, dtype=logits.dtype)[:, None]
        result: dict[str, Tensor] = {}
        if any(SOFT_TARGET_KEY in t for t in targets):
            soft = torch.full_like(logits, float("nan"))
            rows = [
                t[SOFT_TARGET_KEY][pair]
                if SOFT_TARGET_KEY in t
                else torch.full((len(pair), logits.shape[-1]), torch.nan)
                for t, pair in zip(targets, pairs, strict=True)
            ]
            soft[batch_idx, query_idx] = torch.cat(rows).to(soft)
            fixed = (~torch.isfinite(soft)).to(logits.dtype)
            weight = fixed if weight is None else weight * fixed
            result["loss_verb_soft"] = soft_focal_sum(logits, soft) / max(counts.verb_positives or 1.0, 1.0)
        result["loss_verb_ce"] = verb_focal_loss(logits, verb_targets, counts.verb_positives, weight)
        return result

    def loss_boxes(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: MatchIndices,
        counts: PairCounts,
        log: bool = True,
    ) -> dict[str, Tensor]:
        """L1 and GIoU of matched human boxes, and of matched object boxes where the object exists."""
        device = outputs["pred_sub_boxes"].device
        batch_idx, query_idx = _flat_query_index(indices, device)
        pred_sub = outputs["pred_sub_boxes"][batch_idx, query_idx]  # (K, 4)
        pred_obj = outputs["pred_obj_boxes"][batch_idx, query_idx]
        pairs = [pair for _, pair in indices]
        tgt_sub = torch.cat([t["sub_boxes"][p] for t, p in zip(targets, pairs, strict=True)]).to(pred_sub)
        tgt_obj = torch.cat([t["obj_boxes"][p] for t, p in zip(targets, pairs, strict=True)]).to(pred_obj)
        # V-COCO pairs without an object carry a zero box: no object regression for them.
        exists = has_object_box(tgt_obj)
        pred_obj, tgt_obj = pred_obj[exists], tgt_obj[exists]
        return {
            "loss_sub_bbox": F.l1_loss(pred_sub, tgt_sub, reduction="sum") / counts.pairs,
            "loss_obj_bbox": F.l1_loss(pred_obj, tgt_obj, reduction="sum") / counts.pairs_with_object,
            "loss_sub_giou": _giou_loss(pred_sub, tgt_sub) / counts.pairs,
            "loss_obj_giou": _giou_loss(pred_obj, tgt_obj) / counts.pairs_with_object,
        }

    def _layer_losses(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: MatchIndices,
        counts: PairCounts,
        log: bool,
    ) -> dict[str, Tensor]:
        methods: dict[str, Callable[..., dict[str, Tensor]]] = {
            "obj_labels": self.loss_obj_labels,
            "verb_labels": self.loss_verb_labels,
            "boxes": self.loss_boxes,
        }
        result: dict[str, Tensor] = {}
        for name in self.losses:
            result.update(methods[name](outputs, targets, indices, counts, log=log))
        return result


def _flat_query_index(indices: MatchIndices, device: torch.device) -> tuple[Tensor, Tensor]:
    """Matching as flat (batch idx (K,), query idx (K,)) over the batch, for advanced indexing."""
    batch_idx = torch.cat([torch.full_like(query, b) for b, (query, _) in enumerate(indices)])
    query_idx = torch.cat([query for query, _ in indices])
    return batch_idx.to(device), query_idx.to(device)


def _giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Sum over rows of 1 - GIoU of (K, 4) cxcywh box pairs, row by row."""
    if pred.shape[0] == 0:
        return pred.sum()  # a zero that stays in the graph
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    return (1 - torch.diag(giou)).sum()


def _top1_error(logits: Tensor, labels: Tensor) -> Tensor:
    """Percentage of matched queries whose argmax object class is wrong; 0 when nothing is matched."""
    if labels.numel() == 0:
        return logits.new_zeros(())
    return 100.0 * (logits.argmax(-1) != labels).float().mean()
