"""How well a teacher ranks the verbs of annotated pairs: ``python -m teacher_server eval-itm``.

For every annotated (human, object) pair the teacher scores each candidate sentence of the pair's
object (every verb valid with it, ``candidate_sentences``) against what it is shown of the pair:

- ``--region image`` (the default): the whole image, the same view for every pair of the image;
- ``--region crop`` / ``--region mask``: the pair's own region (its human box and object box), as
  the engine renders it under that ``region_policy`` (``teacher_server.hoi.region``).

The pair's annotated verbs are its positives. Which candidates are negatives is the ``labels``
rule:

- ``image`` (the default with ``--region image``): the candidates that no pair of the same object
  class in the image has. Whole-image scoring cannot tell two people apart, so a verb that another
  person does with another object of the same class is neither right nor wrong here;
- ``pair`` (the default with ``--region crop|mask``): every candidate the pair itself lacks, the
  other pairs' verbs included. This is the per-pair truth, which only fully labelled pairs give
  (the synthetic world's; HICO-DET sometimes annotates one interaction on two boxes). Compare
  policies under one rule: ``--labels pair`` for all three is what ``bench/region_eval.py`` runs.

Metrics (pure numpy functions, testable on hand-made scores):

- ``roc_auc``: all positive vs all negative sentences, pooled over pairs (Mann-Whitney U, ties
  count 1/2): the chance that a true sentence outscores a false one;
- ``average_precision``: per pair, non-interpolated AP of its verb ranking; ``verb_map`` is the
  mean over pairs;
- ``top1``: the share of pairs whose best-scored candidate is a positive;
- ``completion``: what the student's ``soft`` distillation would take from this teacher. ``soft``
  completes a verb the label leaves out when the teacher's belief sigmoid(margin) reaches its
  ``confidence``; here, on fully labelled pairs, ``true_rate`` is the share of true verbs the
  teacher believes that much (the knowledge it can add), ``false_rate`` the share of false verbs
  (the wrong positives it would add), ``precision`` the true share of all believed verbs.

Each overall and split into HICO-DET's rare / non-rare: a triplet is rare with fewer than 10
instances in the training annotations; a pair is rare when one of its positive triplets is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from teacher_server.errors import TeacherError
from teacher_server.hoi.annotations import (
    BOX_POLICIES,
    ImageAnnotation,
    dataset_spec,
    load_annotations,
    resolve_correspondence,
)
from teacher_server.hoi.errors import DatasetError
from teacher_server.hoi.prompts import VARIANTS, SentenceTable
from teacher_server.hoi.region import REGION_POLICIES, Region
from teacher_server.logs import show_progress

#: The student's default ``distill.confidence`` for ``soft`` (``student/losses/distill.py``).
DEFAULT_CONFIDENCE = 0.8
#: HICO-DET: a triplet with fewer training instances than this is rare.
RARE_THRESHOLD = 10
TRAIN_FILES = {"hico": "trainval_hico.json", "vcoco": "trainval_vcoco.json"}
#: What the teacher is shown of a pair: the whole image, or its region under a policy.
REGION_MODES = ("image", *REGION_POLICIES)
#: Which candidates of a pair are negatives (module docstring).
LABEL_RULES = ("image", "pair")
#: ``synthetic.json`` (written by ``make-synthetic`` at the dataset root) and its list of the
#: two-person images, split -> file names. Read as plain JSON: the teacher imports no student code.
SYNTHETIC_SUMMARY = "synthetic.json"
TWO_PERSON_KEY = "two_person_images"


# ======================================================================================= metrics


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float | None:
    """Area under the ROC curve: P(a positive outscores a negative), ties counting 1/2.

    Mann-Whitney: with average ranks r (1 = lowest, tied scores share their mean rank),
    AUC = (sum of positive ranks - n+(n+ + 1)/2) / (n+ n-). None without positives or negatives.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ascending; equal values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Start of each run of equal values in sorted order, and the run each item belongs to.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + 1 + ends) / 2.0  # ranks starts+1 .. ends
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def average_precision(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float | None:
    """Non-interpolated average precision of ranking by ``scores`` (highest first).

    AP = sum over score thresholds t of (recall(t) - recall(previous t)) * precision(t). Tied scores
    form one threshold, so the result does not depend on the order of tied items. Without ties
    this is the mean, over positives, of the precision at each positive's rank. None without positives.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    positives = int(labels.sum())
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    ordered, hits = scores[order], labels[order]
    last_of_run = np.r_[ordered[1:] != ordered[:-1], True]  # one threshold per distinct score
    true_positives = np.cumsum(hits)[last_of_run]
    retrieved = np.flatnonzero(last_of_run) + 1
    recall_steps = np.diff(np.r_[0, true_positives]) / positives
    return float((recall_steps * true_positives / retrieved).sum())


def top1(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float | None:
    """1 when the best-scored item is a positive, 0 when not; the positive share of a tied top.

    (A tie at the top counts as a random pick among the tied items.) None for no items.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if scores.size == 0:
        return None
    return float(labels[scores == scores.max()].mean())


def completion_rates(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray, confidence: float
) -> dict[str, float | None]:
    """Shares of positives and negatives whose belief sigmoid(score) is at least ``confidence``.

    ``true_rate`` over positives, ``false_rate`` over negatives (None without any), ``precision``:
    positives among all believed items (None when none is believed).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}, expected 0 < confidence < 1")
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    # sigmoid(s) >= c  <=>  s >= logit(c): compare margins, no overflow for large |s|.
    believed = scores >= np.log(confidence / (1 - confidence))
    positives, negatives = int(labels.sum()), int((~labels).sum())
    believed_total = int(believed.sum())
    return {
        "true_rate": float(believed[labels].mean()) if positives else None,
        "false_rate": float(believed[~labels].mean()) if negatives else None,
        "precision": float(believed[labels].sum() / believed_total) if believed_total else None,
    }


# ===================================================================================== per pair


@dataclass(frozen=True)
class PairRanking:
    """One evaluated pair: the scores of its object's candidates and which are positives."""

    image: str
    object_index: int
    verbs: tuple[int, ...]  # (K,) candidate verb indices
    scores: np.ndarray  # (K,) match logits
    labels: np.ndarray  # (K,) bool, True = an annotated verb of the pair
    rare: bool | None  # None without training annotations


@dataclass
class ItmQuality:
    """The evaluated pairs of an annotation file and their metrics."""

    pairs: list[PairRanking]
    images: int
    skipped: dict[str, int]  # reason -> pairs: unknown_verbs, no_positive, no_negative
    has_rare_split: bool
    model: str = ""
    fingerprint: str = ""
    annotation_file: str = ""
    region: str = "image"  # "image", or the engine's region description ("crop:margin=0.1")
    labels: str = "image"  # the LABEL_RULES rule the negatives follow

    def metrics(self, pairs: Sequence[PairRanking]) -> dict[str, float | int | None]:
        """``auc`` (pooled), ``verb_map`` and ``top1`` (means over pairs), ``pairs``, ``sentences``."""
        if not pairs:
            return {"auc": None, "verb_map": None, "top1": None, "pairs": 0, "sentences": 0}
        scores, labels = _pooled(pairs)
        return {
            "auc": roc_auc(scores, labels),
            "verb_map": _mean(average_precision(pair.scores, pair.labels) for pair in pairs),
            "top1": _mean(top1(pair.scores, pair.labels) for pair in pairs),
            "pairs": len(pairs),
            "sentences": int(scores.size),
        }

    def summary(self, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
        """The JSON of ``eval-itm --json``: overall metrics, ``rare`` / ``non_rare`` (or null), and
        ``completion`` at ``confidence`` (``completion_rates``; null without pairs)."""
        result: dict[str, Any] = self.metrics(self.pairs)
        if self.pairs:
            scores, labels = _pooled(self.pairs)
            result["completion"] = {"confidence": confidence, **completion_rates(scores, labels, confidence)}
        else:
            result["completion"] = None
        for name, rare in (("rare", True), ("non_rare", False)):
            if self.has_rare_split:
                group = self.metrics([pair for pair in self.pairs if pair.rare is rare])
                result[name] = {key: group[key] for key in ("auc", "verb_map", "top1", "pairs")}
            else:
                result[name] = None
        result["images"] = self.images
        result["skipped"] = dict(self.skipped)
        result["region"] = self.region
        result["labels"] = self.labels
        return result

    def table(self, confidence: float = DEFAULT_CONFIDENCE) -> str:
        """A readable report: one row per split, metrics as fractions, then the completion rates."""
        summary = self.summary(confidence)
        lines = [
            f"model {self.model} (fingerprint {self.fingerprint}) on {self.annotation_file}: {self.images} images, "
            f"{summary['pairs']} pairs, {summary['sentences']} sentences",
            f"scored on: {'the whole image' if self.region == 'image' else 'each pair region, ' + self.region}; "
            f"negatives: {_NEGATIVES[self.labels]}",
            "skipped pairs: "
            + ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in self.skipped.items()),
            f"{'split':<10} {'pairs':>7} {'AUC':>7} {'verb mAP':>9} {'top-1':>7}",
        ]
        rows = [("all", summary)]
        rows += [(name.replace("_", "-"), summary[name]) for name in ("rare", "non_rare") if summary[name] is not None]
        for name, row in rows:
            cells = " ".join(
                f"{_fraction(row[key]):>{width}}" for key, width in (("auc", 7), ("verb_map", 9), ("top1", 7))
            )
            lines.append(f"{name:<10} {row['pairs']:>7} {cells}")
        if not self.has_rare_split:
            lines.append("no rare / non-rare split: no training annotations (give --train-annotations)")
        if (completion := summary["completion"]) is not None:
            lines.append(
                f"belief >= {confidence:g} (what soft distillation completes): "
                f"{_fraction(completion['true_rate'])} of true verbs, {_fraction(completion['false_rate'])} "
                f"of false ones, precision {_fraction(completion['precision'])}"
            )
        return "\n".join(lines)


_NEGATIVES = {"image": "verbs no pair of the object class in the image has", "pair": "every verb the pair lacks"}


def _pooled(pairs: Sequence[PairRanking]) -> tuple[np.ndarray, np.ndarray]:
    """Every pair's candidate scores and labels, end to end."""
    return np.concatenate([pair.scores for pair in pairs]), np.concatenate([pair.labels for pair in pairs])


def _mean(values: Any) -> float | None:
    kept = [value for value in values if value is not None]
    return float(np.mean(kept)) if kept else None


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@dataclass
class PairPlan:
    """A pair to score: its candidates, which are positive, which are left out."""

    image: ImageAnnotation
    object_index: int
    candidates: list[tuple[int, str]] = field(default_factory=list)  # (verb, sentence), labelled ones
    labels: list[bool] = field(default_factory=list)
    rare: bool | None = None
    boxes: tuple[int, int] = (0, -1)  # the pair's (subject, object) box indices; object -1 = none


def plan_pairs(
    annotation: ImageAnnotation,
    table: SentenceTable,
    rare_triplets: Callable[[int, int], bool] | None,
    skipped: Counter,
    labels: str = "image",
) -> list[PairPlan]:
    """The evaluable pairs of one image, with labelled candidates and regions; counts the skipped ones.

    A candidate of a pair is positive when it is one of the pair's verbs. ``labels="image"``: it is
    negative when no pair of the same object class in the image is known to have it (and none has
    unknown verbs); ``"pair"``: whenever the pair lacks it (another pair's verbs, or unknown verbs,
    say nothing about this pair). A pair without an object (V-COCO) has its human box as region.
    """
    if labels not in LABEL_RULES:
        raise DatasetError(f"labels must be one of {', '.join(LABEL_RULES)}, not {labels!r}")
    pairs = annotation.pairs()
    positives_of: dict[int, set[str]] = {}  # object class -> sentences true of some pair with it
    unknown_objects: set[int] = set()
    for pair in pairs:
        obj = annotation.object_class(pair.object)
        if not pair.verbs_known:
            unknown_objects.add(obj)
            continue
        positives_of.setdefault(obj, set()).update(s for v in pair.verbs if (s := table.sentence(v, obj)) is not None)
    plans = []
    for pair in pairs:
        if not pair.verbs_known:
            skipped["unknown_verbs"] += 1
            continue
        obj = annotation.object_class(pair.object)
        plan = PairPlan(annotation, obj, boxes=(pair.subject, pair.object))
        candidates = table.candidates(obj)
        for verb, sentence in candidates:
            if verb in pair.verbs:
                plan.candidates.append((verb, sentence))
                plan.labels.append(True)
            elif labels == "pair" or (sentence not in positives_of[obj] and obj not in unknown_objects):
                plan.candidates.append((verb, sentence))
                plan.labels.append(False)
        # An annotated verb the correspondence table does not list is still true: score it too.
        listed = {verb for verb, _ in candidates}
        for verb in pair.verbs:
            unlisted = table.sentence(verb, obj)
            if verb not in listed and unlisted is not None:
                plan.candidates.append((verb, unlisted))
                plan.labels.append(True)
        if not any(plan.labels):
            skipped["no_positive"] += 1
            continue
        if all(plan.labels):
            skipped["no_negative"] += 1
            continue
        if rare_triplets is not None:
            plan.rare = any(
                rare_triplets(verb, obj) for (verb, _), label in zip(plan.candidates, plan.labels, strict=True) if label
            )
        plans.append(plan)
    return plans


def pair_region(annotation: ImageAnnotation, subject: int, obj: int) -> Region:
    """The region of a pair: its human box and object box (the human box again without an object).

    Raises ``InvalidInputError`` (a TeacherError) naming the entry for an empty or inverted box.
    """
    human = annotation.boxes[subject]
    thing = annotation.boxes[obj] if obj >= 0 else human
    return Region.from_values(
        [*human.tolist(), *thing.tolist()], field=f"entry {annotation.index} ({annotation.file_name}) pair region"
    )


def image_selection(path: str | Path, key: str | None = None) -> frozenset[str]:
    """File names to evaluate, from a JSON file: a list, or ``key``'s value in an object.

    The value may be a list of file names or an object of such lists (``synthetic.json``'s
    ``two_person_images``: split -> file names), whose union is taken.
    """
    where = f"{path}" + (f":{key}" if key else "")
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"image list {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"image list {path} is not readable JSON: {error}") from None
    if key is not None:
        if not isinstance(value, dict) or key not in value:
            raise DatasetError(f"image list {where}: {path} has no key {key!r}")
        value = value[key]
    lists = value.values() if isinstance(value, dict) else [value]
    names: set[str] = set()
    for names_list in lists:
        if not isinstance(names_list, list) or not all(isinstance(name, str) for name in names_list):
            raise DatasetError(f"image list {where}: expected a list of file names (or an object of such lists)")
        names.update(names_list)
    return frozenset(names)


def two_person_images(annotation_file: str | Path) -> frozenset[str]:
    """The two-person (ambiguous) images that ``synthetic.json`` at the dataset root lists.

    The root is the parent of the annotation file's folder (``ROOT/annotations/test_hico.json``).
    """
    summary = Path(annotation_file).resolve().parent.parent / SYNTHETIC_SUMMARY
    if not summary.is_file():
        raise DatasetError(
            f"--only-two-person: {summary} does not exist (make-synthetic --two-person-rate writes it at the "
            "dataset root); give --images-from FILE:KEY instead"
        )
    return image_selection(summary, TWO_PERSON_KEY)


def training_triplet_counts(train_annotations: str | Path, dataset: str = "hico", box_policy: str = "error") -> Counter:
    """Instances of each (verb, object class) triplet in a training annotation file."""
    counts: Counter = Counter()
    for annotation in load_annotations(train_annotations, dataset, box_policy=box_policy):
        for hoi in annotation.hois:
            counts[(hoi.verb, annotation.object_class(hoi.object))] += 1
    return counts


def rare_rule(counts: Counter) -> Callable[[int, int], bool]:
    """(verb, object) -> rare: fewer than ``RARE_THRESHOLD`` training instances (unseen included)."""
    return lambda verb, obj: counts[(verb, obj)] < RARE_THRESHOLD


def default_train_annotations(annotation_file: str | Path, dataset: str) -> Path | None:
    """``trainval_<dataset>.json`` beside the evaluated file, when it exists."""
    candidate = Path(annotation_file).parent / TRAIN_FILES[dataset]
    return candidate if candidate.is_file() else None


# ==================================================================================== evaluation


def evaluate_itm(
    engine: Any,
    annotation_file: str | Path,
    image_root: str | Path,
    *,
    dataset: str = "hico",
    correspondence: np.ndarray | str | Path | None = None,
    train_annotations: str | Path | None = None,
    prompt_variant: str = "full",
    limit: int | None = None,
    progress: bool | None = None,
    batch_images: int = 16,
    box_policy: str = "error",
    regions: bool = False,
    labels: str | None = None,
    only_images: Collection[str] | None = None,
) -> ItmQuality:
    """Score every candidate sentence of every annotated pair with ``engine`` (an ``ItmEngine``).

    ``regions``: score each pair on its region, rendered by the engine's ``region_policy``
    (``EngineSettings``); False scores on the whole image. ``labels``: the ``LABEL_RULES`` rule of
    the negatives; None = ``pair`` with regions, ``image`` without. ``only_images``: evaluate
    these file names only (e.g. ``two_person_images``); names the file lacks are ignored.
    ``train_annotations``: for the rare / non-rare split; None = ``trainval_<dataset>.json`` beside
    ``annotation_file`` when it exists, else no split. ``limit``: the first N (selected) images only.
    ``progress``: a tqdm bar; None = when stderr is a terminal. ``box_policy``: boxes outside
    their image or inverted are an ``error``, or ``clamp``-ed / ``drop``-ped with their pairs.

    Raises:
        DatasetError: a malformed annotation, correspondence or training file, a missing image.
        InvalidInputError (a TeacherError): an image the engine refuses (corrupt, over a limit).
    """
    from tqdm import tqdm

    from teacher_server.engine import ImageSentences

    if prompt_variant not in VARIANTS:
        raise DatasetError(f"prompt_variant must be one of {list(VARIANTS)}, not {prompt_variant!r}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit = {limit}, expected >= 1")
    labels = labels or ("pair" if regions else "image")
    spec = dataset_spec(dataset)
    annotations = load_annotations(annotation_file, dataset, image_root=image_root, box_policy=box_policy)
    if only_images is not None:
        annotations = [annotation for annotation in annotations if annotation.file_name in only_images]
    annotations = annotations[:limit]
    table = SentenceTable(resolve_correspondence(annotation_file, dataset, correspondence), spec.verbs, prompt_variant)
    train_file = train_annotations or default_train_annotations(annotation_file, dataset)
    rare = rare_rule(training_triplet_counts(train_file, dataset, box_policy)) if train_file is not None else None
    skipped: Counter = Counter({"unknown_verbs": 0, "no_positive": 0, "no_negative": 0})
    planned = [(annotation, plan_pairs(annotation, table, rare, skipped, labels)) for annotation in annotations]
    planned = [(annotation, plans) for annotation, plans in planned if plans]
    show = show_progress(progress)
    results: list[PairRanking] = []
    with tqdm(total=len(annotations), desc="eval-itm", unit="img", disable=not show) as bar:
        bar.update(len(annotations) - len(planned))  # images without an evaluable pair
        for start in range(0, len(planned), batch_images):
            chunk = planned[start : start + batch_images]
            # One request per image (every pair's candidates on the whole image), or per pair.
            requests, owners = [], []
            for annotation, plans in chunk:
                groups = [[plan] for plan in plans] if regions else [plans]
                views = _prepare(
                    engine,
                    Path(image_root) / annotation.file_name,
                    annotation.index,
                    [pair_region(annotation, *group[0].boxes) if regions else None for group in groups],
                )
                for view, group in zip(views, groups, strict=True):
                    sentences = list(dict.fromkeys(s for plan in group for _, s in plan.candidates))
                    requests.append(ImageSentences(view.digest, view, sentences, region=view.region))
                    owners.append(group)
            scored = engine.score(requests)
            for request, scores, group in zip(requests, scored, owners, strict=True):
                logit = {s: score.match_logit for s, score in zip(request.sentences, scores, strict=True)}
                results += [_ranking(plan, logit) for plan in group]
            bar.update(len(chunk))
    return ItmQuality(
        pairs=results,
        images=len(annotations),
        skipped=dict(skipped),
        has_rare_split=rare is not None,
        model=getattr(engine, "model_id", ""),
        fingerprint=getattr(engine, "fingerprint", ""),
        annotation_file=str(annotation_file),
        region=engine.settings.region_description() if regions else "image",
        labels=labels,
    )


def _prepare(engine: Any, path: Path, index: int, regions: Sequence[Region | None]) -> list[Any]:
    """The engine's ``PreparedImage`` of each view (None = the whole image) of one annotated image,
    from one decode; errors name the entry and file (and the pair of a region)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"entry {index}: cannot read image {path}: {error.strerror or error}") from None
    names = [f"entry {index} ({path}) pair {k} region" for k in range(len(regions))]
    return engine.prepare_views(data, regions, field=f"entry {index} ({path})", region_fields=names)


def _ranking(plan: PairPlan, logit: dict[str, float]) -> PairRanking:
    return PairRanking(
        image=plan.image.file_name,
        object_index=plan.object_index,
        verbs=tuple(verb for verb, _ in plan.candidates),
        scores=np.array([logit[sentence] for _, sentence in plan.candidates], dtype=np.float64),
        labels=np.array(plan.labels, dtype=bool),
        rare=plan.rare,
    )


# =========================================================================================== CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``eval-itm``."""
    from teacher_server.engine import DEFAULT_MODEL

    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"hub id or save_pretrained directory (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--annotations", type=Path, required=True, help="annotation file to evaluate (test_hico.json)")
    parser.add_argument("--images", type=Path, required=True, help="directory of its images")
    parser.add_argument("--dataset", choices=["hico", "vcoco"], default="hico", help="annotation format (default hico)")
    parser.add_argument(
        "--correspondence",
        type=Path,
        help="verb x object validity .npy (default: corre_<dataset>.npy beside --annotations; hico: built in)",
    )
    parser.add_argument(
        "--train-annotations",
        type=Path,
        help="training annotations for the rare / non-rare split (default: trainval_<dataset>.json beside "
        "--annotations when it exists)",
    )
    parser.add_argument("--prompt-variant", choices=list(VARIANTS), default="full", help="(default full)")
    parser.add_argument("--limit", type=int, help="evaluate the first N (selected) images only")
    parser.add_argument(
        "--region",
        choices=REGION_MODES,
        default="image",
        help="score each pair on the whole image (the default), or on its region: the crop of the union box, "
        "or the image with the rest dimmed (mask)",
    )
    parser.add_argument(
        "--region-margin", type=float, default=0.1, help="crop: grow the union box by this share per side (0.1)"
    )
    parser.add_argument("--region-dim", type=float, default=0.8, help="mask: blend the rest towards grey (0.8)")
    parser.add_argument(
        "--labels",
        choices=LABEL_RULES,
        help="negatives: verbs no pair of the object class in the image has (image), or every verb the pair "
        "lacks (pair); default image with --region image, pair otherwise",
    )
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument(
        "--images-from",
        metavar="FILE[:KEY]",
        help="evaluate only the file names listed in a JSON file (at KEY; a list, or an object of lists)",
    )
    selection.add_argument(
        "--only-two-person",
        action="store_true",
        help=f"evaluate only the two-person images that {SYNTHETIC_SUMMARY} at the dataset root lists "
        f"(make-synthetic --two-person-rate)",
    )
    parser.add_argument(
        "--box-policy",
        choices=BOX_POLICIES,
        default="clamp",
        help="a box outside its image or inverted: error, clamp into the image, or drop (default clamp)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--itm-start-token", default="cls", choices=["cls", "enc"], help="as the model was trained")
    parser.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help=f"belief threshold of the completion rates, as distill.confidence (default {DEFAULT_CONFIDENCE})",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``eval-itm``: load the teacher, evaluate, print the table (and JSON); 2 on bad input."""
    from teacher_server.engine import EngineSettings, ItmEngine

    if not 0 < args.confidence < 1:
        print(f"eval-itm: --confidence = {args.confidence}, expected 0 < confidence < 1", file=sys.stderr)
        return 2
    regions = args.region != "image"
    try:
        only_images = _selected_images(args)
        engine = ItmEngine.from_pretrained(
            args.model,
            EngineSettings(
                device=args.device,
                dtype=args.dtype,
                itm_start_token=args.itm_start_token,
                # The whole image keeps the default policy: its fingerprint is today's.
                **(
                    {"region_policy": args.region, "region_margin": args.region_margin, "region_dim": args.region_dim}
                    if regions
                    else {}
                ),
            ),
        )
        quality = evaluate_itm(
            engine,
            args.annotations,
            args.images,
            dataset=args.dataset,
            correspondence=args.correspondence,
            train_annotations=args.train_annotations,
            prompt_variant=args.prompt_variant,
            limit=args.limit,
            progress=False if args.no_progress else None,
            box_policy=args.box_policy,
            regions=regions,
            labels=args.labels,
            only_images=only_images,
        )
    except (TeacherError, DatasetError) as error:
        print(f"eval-itm: {error}", file=sys.stderr)
        return 2
    print(quality.table(args.confidence))
    if args.json:
        print(json.dumps(quality.summary(args.confidence), allow_nan=False))
    return 0


def _selected_images(args: argparse.Namespace) -> frozenset[str] | None:
    """The file names ``--images-from`` / ``--only-two-person`` select; None = every image."""
    if args.only_two_person:
        return two_person_images(args.annotations)
    if args.images_from:
        # FILE:KEY; a colon that is part of the path (C:\\...) is not a key when FILE alone exists.
        path, colon, key = args.images_from.rpartition(":")
        if not colon or Path(args.images_from).is_file():
            return image_selection(args.images_from)
        return image_selection(path, key or None)
    return None
