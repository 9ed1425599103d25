"""Distillation of the ITM teacher into the student's verb (and object) predictions.

Three variants, all documented with their formulas in ``docs/distillation.md``:

- ``kl`` (default): for each query matched to a ground-truth pair, the student's verb logits over
  the verbs valid with the pair's object are pulled toward the softmax of the teacher's margins.
  The candidates depend on the ground truth only, so the scores can be fetched ahead of the step.
- ``margin``: the VLM-HOI paper's hinge (its eq. 4), given a gradient path through the student's
  confidence of each predicted triplet. Two steps: ``select_margin_triplets`` (which triplets the
  teacher must score) and ``margin_loss`` (once the scores are back).
- ``soft``: the teacher completes the verb labels. A candidate verb that the label does not
  assert (or any candidate of a pair whose verbs were never annotated) and that the teacher
  believes, sigmoid(z / tau) >= ``confidence``, becomes a soft positive of the verb focal loss
  with that probability as its target (``teacher_soft_targets``; the criterion's
  ``loss_verb_soft``). Everything else stays with the label. Prefetchable like ``kl``.

The teacher margin is ``z = l_match - l_nomatch`` of a sentence against the original image (the
whole image, or with ``teacher.region=pair`` the pair's region of it); it is a constant here, NaN
where a score is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from torch import Tensor

from student.losses.matcher import LossError, MatchIndices, check_outputs

DistillVariant = Literal["kl", "margin", "soft"]
DISTILL_VARIANTS: tuple[str, ...] = ("kl", "margin", "soft")
# Variants whose sentences depend on the ground truth only: scored before the step, prefetchable.
GROUND_TRUTH_VARIANTS: tuple[str, ...] = ("kl", "soft")
TEACHER_KEY = "teacher_verb_margin"


@dataclass(frozen=True)
class DistillSettings:
    """Settings of the distillation term: L_total = L_HOI + lambda_itm * L_ITM."""

    variant: DistillVariant = "soft"
    lambda_itm: float = 1.0
    tau: float = 1.0  # kl: temperature of both softmaxes (the term is scaled by tau^2); soft: of sigmoid(z / tau)
    alpha: float = 1.0  # margin: the positive margin of the paper's hinge (1 was its best)
    top_k: int = 8  # margin: at most this many negatives per image, most confident first
    score_threshold: float = 0.2  # margin: a triplet is "predicted" from this confidence up
    confidence: float = 0.8  # soft: the teacher completes a verb it believes with sigmoid(z / tau) >= this

    def __post_init__(self) -> None:
        if self.variant not in DISTILL_VARIANTS:
            raise LossError(
                f"DistillSettings.variant: {self.variant!r} is not one of {', '.join(map(repr, DISTILL_VARIANTS))}"
            )
        if self.lambda_itm < 0:
            raise LossError(f"DistillSettings.lambda_itm: must be >= 0, got {self.lambda_itm}")
        if not self.tau > 0:
            raise LossError(f"DistillSettings.tau: must be > 0, got {self.tau}")
        if self.alpha < 0:
            raise LossError(f"DistillSettings.alpha: must be >= 0, got {self.alpha}")
        if self.top_k < 0:
            raise LossError(f"DistillSettings.top_k: must be >= 0, got {self.top_k}")
        if not 0 <= self.score_threshold <= 1:
            raise LossError(f"DistillSettings.score_threshold: must be in [0, 1], got {self.score_threshold}")
        if not 0 <= self.confidence < 1:
            raise LossError(f"DistillSettings.confidence: must be in [0, 1), got {self.confidence}")


class KLStats(TypedDict):
    num_terms: int  # matched pairs that contributed a KL term
    num_skipped: int  # matched pairs without one: fewer than 2 scored candidates, or no teacher row


class MarginStats(TypedDict):
    num_terms: int  # triplets with a teacher score (positives + negatives)
    num_skipped: int  # triplets without one (NaN score, or no scores for the image)
    num_positive: int
    num_negative: int


# -- kl ----------------------------------------------------------------------------------------


def teacher_verb_margin(
    obj_labels: Tensor, correspondence: np.ndarray | Tensor, score: Callable[[int, int, int], float | None]
) -> Tensor:
    """Build a target's ``teacher_verb_margin`` (P, V): z of (verb v, object of pair p) on pair p's view.

    obj_labels: (P,) object index per pair (>= number of object classes: no object, an all-NaN row).
    correspondence: (V, C) bool, verb v valid with object o (e.g. ``hico_correspondence()``).
    score: (verb index, object index, pair index) -> the teacher's margin for that pair (scored on
        the whole image or on the pair's region), or None when it has none (a missing score, or a
        verb with no sentence such as "no_interaction"). NaN elsewhere.
    """
    valid = torch.as_tensor(np.asarray(correspondence), dtype=torch.bool)
    if valid.dim() != 2:
        raise LossError(f"teacher_verb_margin: correspondence must be (V, C), got {tuple(valid.shape)}")
    num_verbs, num_objects = valid.shape
    margin = torch.full((obj_labels.shape[0], num_verbs), float("nan"), dtype=torch.float32)
    for p, obj in enumerate(obj_labels.tolist()):
        if not 0 <= obj < num_objects:
            continue
        for verb in torch.nonzero(valid[:, obj]).flatten().tolist():
            value = score(verb, obj, p)
            if value is not None:
                margin[p, verb] = float(value)
    return margin


def kl_distill_loss(
    outputs: Mapping[str, Any], indices: MatchIndices, targets: Sequence[Mapping[str, Any]], tau: float = 1.0
) -> tuple[Tensor, KLStats]:
    """tau^2 * KL(teacher || student) over each matched pair's candidate verbs, averaged over pairs.

    outputs: the final layer's dict (``pred_verb_logits`` (B, Q, V) is read).
    indices: the matcher's (query idx, pair idx) per image for that layer.
    targets: B dicts; ``teacher_verb_margin`` (P, V) with NaN for non-candidates and missing scores.
        An image without the key contributes nothing.
    For a matched (q, p), the candidates c are the finite entries of row p. With fewer than 2 the
    pair is skipped: a softmax over one candidate is 1 whatever the scores, so it carries no
    information (and its KL is 0 anyway). Returns (loss, stats); with no term at all the loss is
    a zero that is still connected to the logits, so every rank runs the same backward.
    """
    if not tau > 0:
        raise LossError(f"kl_distill_loss: tau must be > 0, got {tau}")
    batch, _, num_verbs = check_outputs(outputs)
    _check_batch(indices, targets, batch)
    verb_logits: Tensor = outputs["pred_verb_logits"]
    student_rows, teacher_rows = [], []
    skipped = 0
    for b, (query_idx, pair_idx) in enumerate(indices):
        margin = targets[b].get(TEACHER_KEY)
        if margin is None:
            skipped += len(query_idx)
            continue
        pairs = targets[b]["obj_labels"].shape[0]
        if tuple(margin.shape) != (pairs, num_verbs):
            raise LossError(
                f"targets[{b}][{TEACHER_KEY!r}]: expected shape ({pairs}, {num_verbs}), got {tuple(margin.shape)}"
            )
        teacher = margin.to(device=verb_logits.device, dtype=verb_logits.dtype)[pair_idx.to(verb_logits.device)]
        enough = torch.isfinite(teacher).sum(-1) >= 2
        skipped += int((~enough).sum())
        student_rows.append(verb_logits[b, query_idx.to(verb_logits.device)][enough])
        teacher_rows.append(teacher[enough])
    num_terms = sum(row.shape[0] for row in student_rows)
    if num_terms == 0:
        return _connected_zero(verb_logits), KLStats(num_terms=0, num_skipped=skipped)
    terms = candidate_kl(torch.cat(student_rows), torch.cat(teacher_rows), tau)
    return terms.mean(), KLStats(num_terms=num_terms, num_skipped=skipped)


def candidate_kl(student_logits: Tensor, teacher_margins: Tensor, tau: float) -> Tensor:
    """Per row: tau^2 * KL(softmax(z_c / tau) || softmax(s_c / tau)) over the finite entries c of z.

    student_logits, teacher_margins: (N, V); every row of ``teacher_margins`` has >= 1 finite entry.
    Returns (N,). Entries outside c are masked to -inf before each softmax and to 0 after the log,
    so neither the value nor the gradient sees a NaN.
    """
    candidate = torch.isfinite(teacher_margins)
    teacher_logp = torch.where(candidate, teacher_margins, -torch.inf).div(tau).log_softmax(-1)
    student_logp = student_logits.masked_fill(~candidate, -torch.inf).div(tau).log_softmax(-1)
    teacher_logp = torch.where(candidate, teacher_logp, 0.0)
    student_logp = torch.where(candidate, student_logp, 0.0)
    kl = (teacher_logp.exp() * candidate * (teacher_logp - student_logp)).sum(-1)
    return tau**2 * kl


# -- soft ----------------------------------------------------------------------------------------


def teacher_soft_targets(
    margin: Tensor,
    verb_labels: Tensor,
    verb_known: Tensor | None = None,
    tau: float = 1.0,
    confidence: float = 0.0,
) -> Tensor:
    """The ``soft`` variant's targets (P, V): sigmoid(z / tau) where the teacher completes a label, NaN elsewhere.

    margin: (P, V) ``teacher_verb_margin`` (NaN for non-candidates and missing scores).
    verb_labels: (P, V) multi-hot ground truth; verb_known: (P,) bool, False for a pair whose verbs
        were never annotated (default: all known).
    An entry is completed when it has a score, the label does not assert it, and the teacher
    believes it: sigmoid(z / tau) >= ``confidence``. An annotated verb stays a hard positive
    (annotators omit, they rarely invent), and a verb the teacher doubts stays with the label
    (a negative, or no term at all for a pair without verbs): an uninformed teacher, whose
    scores sit in the middle, then changes nothing.
    """
    if not tau > 0:
        raise LossError(f"teacher_soft_targets: tau must be > 0, got {tau}")
    if margin.shape != verb_labels.shape:
        raise LossError(
            f"teacher_soft_targets: {TEACHER_KEY} {tuple(margin.shape)} and verb_labels "
            f"{tuple(verb_labels.shape)} must have the same shape (P, V)"
        )
    asserted = verb_labels > 0.5
    if verb_known is not None:
        asserted = asserted & verb_known.to(torch.bool)[:, None]
    belief = torch.sigmoid(margin.float() / tau)  # NaN where there is no score
    completed = torch.isfinite(margin) & ~asserted & (belief >= confidence)
    return torch.where(completed, belief, torch.nan)


# -- margin ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarginTriplets:
    """Predicted triplets of one image for the ``margin`` loss; (T,) CPU tensors each.

    The sentence of triplet t is built from (verb[t], obj[t]); the teacher's z for it, with the
    student's confidence of (query[t], verb[t], obj[t]), gives its term.
    """

    query: Tensor  # (T,) int64
    verb: Tensor  # (T,) int64
    obj: Tensor  # (T,) int64, a real object class (never "no object")
    is_positive: Tensor  # (T,) bool: agrees with the ground truth of the pair the query is matched to
    # (T, 4) the query's predicted human / object box, cxcywh normalised by the (augmented) image
    # size: what ``teacher.region=pair`` scores the triplet on. None: not known (whole image).
    sub_boxes: Tensor | None = None
    obj_boxes: Tensor | None = None

    def __len__(self) -> int:
        return int(self.query.shape[0])


def triplet_confidence(
    outputs: Mapping[str, Any], batch_index: int, query: Tensor, verb: Tensor, obj: Tensor
) -> Tensor:
    """Student confidence sigmoid(verb logit) * softmax(object logits)[obj] of (T,) triplets -> (T,)."""
    verb_logits: Tensor = outputs["pred_verb_logits"][batch_index]  # (Q, V)
    obj_logits: Tensor = outputs["pred_obj_logits"][batch_index]  # (Q, C+1)
    device = verb_logits.device
    query, verb, obj = query.to(device), verb.to(device), obj.to(device)
    return verb_logits[query, verb].sigmoid() * obj_logits[query].softmax(-1).gather(1, obj[:, None])[:, 0]


@torch.no_grad()
def select_margin_triplets(
    outputs: Mapping[str, Any],
    indices: MatchIndices,
    targets: Sequence[Mapping[str, Any]],
    top_k: int = 8,
    score_threshold: float = 0.2,
    *,
    skip_verbs: Collection[int] = (),
) -> list[MarginTriplets]:
    """The positive and negative predicted triplets of each image, for the teacher to score.

    A query whose top object class is "no object" predicts nothing (the paper excludes those). For
    the others, with o = the query's top object class and confidence c(q, v) = sigmoid(verb logit)
    * softmax(object logits)[o], the query predicts (q, v, o) for its top verb and for every verb
    with c >= ``score_threshold``.
    - positive: q is matched to pair p, o is p's object and v is one of p's verbs;
    - negative: any other predicted triplet with c >= ``score_threshold``; the ``top_k`` most
      confident per image are kept (positives are never capped: at most one per GT verb of a pair).
    skip_verbs: verb indices that make no sentence (e.g. HICO's "no_interaction").
    """
    if top_k < 0 or not 0 <= score_threshold <= 1:
        raise LossError(
            f"select_margin_triplets: need top_k >= 0 and score_threshold in [0, 1], got {top_k} and {score_threshold}"
        )
    batch, queries, num_verbs = check_outputs(outputs)
    _check_batch(indices, targets, batch)
    obj_prob = outputs["pred_obj_logits"].detach().float().softmax(-1)  # (B, Q, C+1)
    verb_prob = outputs["pred_verb_logits"].detach().float().sigmoid()  # (B, Q, V)
    no_object = obj_prob.shape[-1] - 1
    out_of_range = sorted(v for v in skip_verbs if not 0 <= v < num_verbs)
    if out_of_range:
        raise LossError(f"select_margin_triplets: skip_verbs {out_of_range} outside 0..{num_verbs - 1}")
    allowed = torch.ones(num_verbs, dtype=torch.bool)
    allowed[torch.as_tensor(sorted(skip_verbs), dtype=torch.int64)] = False
    result = []
    for b, (query_idx, pair_idx) in enumerate(indices):
        obj_score, obj_cls = obj_prob[b].cpu().max(-1)  # (Q,)
        confidence = verb_prob[b].cpu() * obj_score[:, None]  # (Q, V)
        confident = confidence >= score_threshold
        predicted = confident.clone()
        predicted[torch.arange(queries), confidence.argmax(-1)] = True
        predicted &= (obj_cls != no_object)[:, None] & allowed[None, :]

        agrees = torch.zeros(queries, num_verbs, dtype=torch.bool)
        labels = targets[b]["obj_labels"].cpu()[pair_idx]
        verbs = targets[b]["verb_labels"].cpu()[pair_idx] > 0.5
        agrees[query_idx] = (obj_cls[query_idx] == labels)[:, None] & verbs

        positive = predicted & agrees
        negative = predicted & confident & ~agrees
        neg_q, neg_v = torch.nonzero(negative, as_tuple=True)
        keep = confidence[neg_q, neg_v].argsort(descending=True, stable=True)[:top_k]
        pos_q, pos_v = torch.nonzero(positive, as_tuple=True)
        query = torch.cat([pos_q, neg_q[keep]])
        verb = torch.cat([pos_v, neg_v[keep]])
        is_positive = torch.cat([torch.ones_like(pos_q, dtype=torch.bool), torch.zeros_like(keep, dtype=torch.bool)])
        sub_boxes, obj_boxes = (
            outputs[key][b].detach().float().cpu()[query] if key in outputs else None
            for key in ("pred_sub_boxes", "pred_obj_boxes")
        )
        result.append(
            MarginTriplets(
                query=query,
                verb=verb,
                obj=obj_cls[query],
                is_positive=is_positive,
                sub_boxes=sub_boxes,
                obj_boxes=obj_boxes,
            )
        )
    return result


def margin_loss(
    outputs: Mapping[str, Any],
    triplets: Sequence[MarginTriplets],
    teacher_margins: Sequence[Tensor | None],
    alpha: float = 1.0,
) -> tuple[Tensor, MarginStats]:
    """The paper's eq. 4 on the student-weighted teacher score c * z, averaged over scored triplets.

    L = mean( sum_pos max(0, alpha - c_i z_i) + sum_neg max(0, c_j z_j) )
    with c the student's confidence of the triplet (the only thing carrying a gradient) and z the
    teacher's margin for its sentence. For a positive, raising c lowers the loss when the teacher
    accepts it (z > 0) and lowering c does when it rejects it (z < 0); for a negative, the loss
    pushes c down in proportion to how much the teacher believes it (eq. 4's "negative scores
    low"), and a negative the teacher rejects earns nothing (the hinge at 0).

    teacher_margins: per image a (T,) tensor aligned with ``triplets[b]`` (NaN = no score: that
        triplet is skipped), or None when the image has no scores at all.
    """
    if alpha < 0:
        raise LossError(f"margin_loss: alpha must be >= 0, got {alpha}")
    batch, _, _ = check_outputs(outputs)
    if len(triplets) != batch or len(teacher_margins) != batch:
        raise LossError(
            f"margin_loss: {len(triplets)} triplet sets and {len(teacher_margins)} margin "
            f"tensors for a batch of {batch} images"
        )
    verb_logits: Tensor = outputs["pred_verb_logits"]
    terms, skipped, positives, negatives = [], 0, 0, 0
    for b, (image_triplets, margin) in enumerate(zip(triplets, teacher_margins, strict=True)):
        if margin is None:
            skipped += len(image_triplets)
            continue
        if tuple(margin.shape) != (len(image_triplets),):
            raise LossError(
                f"teacher_margins[{b}]: expected shape ({len(image_triplets)},), one per triplet, "
                f"got {tuple(margin.shape)}"
            )
        z = margin.to(device=verb_logits.device, dtype=verb_logits.dtype)
        scored = torch.isfinite(z)
        skipped += int((~scored).sum())
        is_positive = image_triplets.is_positive.to(verb_logits.device)[scored]
        confidence = triplet_confidence(
            outputs,
            b,
            image_triplets.query[scored.cpu()],
            image_triplets.verb[scored.cpu()],
            image_triplets.obj[scored.cpu()],
        )
        weighted = confidence * z[scored]
        terms.append(torch.where(is_positive, (alpha - weighted).clamp(min=0), weighted.clamp(min=0)))
        positives += int(is_positive.sum())
        negatives += int((~is_positive).sum())
    stats = MarginStats(
        num_terms=positives + negatives, num_skipped=skipped, num_positive=positives, num_negative=negatives
    )
    if stats["num_terms"] == 0:
        return _connected_zero(verb_logits, outputs["pred_obj_logits"]), stats
    return torch.cat(terms).mean(), stats


# -- helpers -----------------------------------------------------------------------------------


def _check_batch(indices: MatchIndices, targets: Sequence[Mapping[str, Any]], batch: int) -> None:
    if len(indices) != batch or len(targets) != batch:
        raise LossError(f"{len(indices)} match index pairs and {len(targets)} targets for a batch of {batch} images")


def _connected_zero(*tensors: Tensor) -> Tensor:
    """0 that has a grad_fn through ``tensors``: backward then reaches (with zeros) every parameter."""
    return sum((0.0 * t.sum() for t in tensors), torch.zeros((), device=tensors[0].device, dtype=tensors[0].dtype))
