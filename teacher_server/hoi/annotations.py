"""Load and validate HICO-DET / V-COCO annotation files (the DETR-line JSON format).

One entry per image::

    {"file_name": "HICO_train2015_00000001.jpg",
     "annotations": [{"bbox": [x1, y1, x2, y2], "category_id": 1}, ...],      # absolute pixels, COCO id
     "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 73,   # verb id
                         "hoi_category_id": 153}, ...]}                        # HICO only, 1..600

HICO-DET verb ids are 1..117 (``verb index = id - 1``); V-COCO's are 0..28 (already the index) and
``object_id = -1`` marks an action without object.

One optional key extends the format for data whose pairs are known but whose verbs are not (boxes
from a detector, verbs never annotated): ``"pairs_without_verbs": [{"subject_id": 0,
"object_id": 1}, ...]``. Such a pair takes part in box and object-class training, and its verbs
are *unknown*, not negative. Tools that do not know the key ignore it (then the pair's boxes are
simply unlinked), so files stay readable by the DETR-line codebases. The whole file is validated up front and every
problem is reported with the file, the entry index, the file name and the field.

Real files have a few boxes that stick out of their image by more than the 1 px tolerance, and
a few inverted ones (x2 < x1). ``box_policy`` says what happens to them: ``error`` (the default
here) reports them like any other problem; ``clamp`` clips a box into its image, as the reference
codebases' loaders do, and drops a box that clipping cannot mend (inverted, or empty once
clipped); ``drop`` drops every such box. A dropped box takes the HOIs and verb-less pairs that use
it along; ``read_annotations`` returns a ``BoxFixes`` count of all that, per file.

numpy and PIL only: no torch, so the evaluator and tools can use it cheaply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeGuard

import numpy as np

from teacher_server.hoi.classes import (
    COCO_OBJECT_IDS,
    HICO_HOIS,
    HICO_VERBS,
    NO_OBJECT_INDEX,
    OBJECT_NAMES,
    VCOCO_VERBS,
    coco_id_to_index,
    hico_correspondence,
    hico_hoi_id,
)
from teacher_server.hoi.errors import DatasetError

DatasetName = Literal["hico", "vcoco"]
BoxPolicy = Literal["error", "clamp", "drop"]
BOX_POLICIES: tuple[str, ...] = ("error", "clamp", "drop")

#: How many problems one DatasetError lists before it says "and N more".
MAX_REPORTED_PROBLEMS = 20
#: How many fixed boxes a ``BoxFixes`` summary names as examples.
MAX_REPORTED_FIXES = 3
#: Default correspondence file per dataset, looked for beside the annotation file.
CORRESPONDENCE_FILES = {"hico": "corre_hico.npy", "vcoco": "corre_vcoco.npy"}


@dataclass(frozen=True)
class DatasetSpec:
    """What differs between HICO-DET and V-COCO annotation files."""

    name: DatasetName
    verbs: tuple[str, ...]
    verb_id_base: int  # file verb id of verb index 0: 1 for HICO-DET, 0 for V-COCO
    allows_no_object: bool  # object_id = -1 permitted
    has_hoi_ids: bool  # hoi_category_id present and checked (HICO-DET)

    @property
    def num_verbs(self) -> int:
        return len(self.verbs)


DATASETS: dict[str, DatasetSpec] = {
    "hico": DatasetSpec("hico", HICO_VERBS, verb_id_base=1, allows_no_object=False, has_hoi_ids=True),
    "vcoco": DatasetSpec("vcoco", VCOCO_VERBS, verb_id_base=0, allows_no_object=True, has_hoi_ids=False),
}


def dataset_spec(dataset: str) -> DatasetSpec:
    """The spec of ``"hico"`` or ``"vcoco"``; DatasetError for anything else."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DatasetError(f"unknown dataset {dataset!r}: expected one of {sorted(DATASETS)}") from None


@dataclass(frozen=True)
class HOI:
    """One HOI of the file, with 0-based indices."""

    subject: int  # index into the image's boxes
    object: int  # index into the image's boxes, -1 = no object (V-COCO)
    verb: int  # verb index 0..V-1
    hoi_id: int | None  # HICO-DET hoi_category_id 1..600, None for V-COCO


@dataclass(frozen=True)
class HOIPair:
    """All HOIs of one (subject, object) box pair, merged (QPIC style).

    ``verbs_known`` False: a pair of ``pairs_without_verbs``, whose verbs were never annotated
    (``verbs`` is empty, and that says nothing about which verbs are true).
    """

    subject: int
    object: int  # -1 = no object
    verbs: tuple[int, ...]  # sorted, distinct verb indices
    verbs_known: bool = True


@dataclass(frozen=True)
class ImageAnnotation:
    """One validated entry of an annotation file.

    ``boxes`` are clipped to the image when its size was known at validation time.
    """

    index: int  # position in the annotation list (the ``image_id`` of samples)
    file_name: str
    boxes: np.ndarray  # (N, 4) float32 xyxy absolute pixels
    labels: np.ndarray  # (N,) int64 object class index 0..79
    hois: tuple[HOI, ...]
    raw: Mapping[str, Any]  # the entry exactly as read from the JSON (the evaluator works from it)
    image_size: tuple[int, int] | None = None  # (h, w) when the image was checked
    pairs_without_verbs: tuple[tuple[int, int], ...] = ()  # (subject, object) box indices

    def pairs(self) -> list[HOIPair]:
        """The HOIs merged by (subject, object), in order of first appearance; then the pairs
        without verbs (``verbs_known`` False), in file order."""
        unknown = [HOIPair(sub, obj, (), verbs_known=False) for sub, obj in self.pairs_without_verbs]
        return merge_pairs(self.hois) + unknown

    def object_class(self, object_box: int) -> int:
        """Object class of a pair's object box; ``NO_OBJECT_INDEX`` (80) for a V-COCO pair without one."""
        return int(self.labels[object_box]) if object_box >= 0 else NO_OBJECT_INDEX

    @property
    def has_pairs(self) -> bool:
        """Whether the image has any HOI pair, with or without verbs."""
        return bool(self.hois or self.pairs_without_verbs)


def merge_pairs(hois: Sequence[HOI]) -> list[HOIPair]:
    """Merge HOIs sharing the same (subject, object) box indices into one multi-verb pair."""
    verbs_of: dict[tuple[int, int], set[int]] = {}
    for hoi in hois:
        verbs_of.setdefault((hoi.subject, hoi.object), set()).add(hoi.verb)
    return [HOIPair(sub, obj, tuple(sorted(verbs))) for (sub, obj), verbs in verbs_of.items()]


class _Problems:
    """Collects validation problems of a file so that one error reports many of them."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        shown = self.messages[:MAX_REPORTED_PROBLEMS]
        more = len(self.messages) - len(shown)
        lines = "\n  ".join(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise DatasetError(f"{self.source}: {len(self.messages)} problem(s):\n  {lines}{tail}")


@dataclass
class BoxFixes:
    """What a ``box_policy`` other than ``error`` changed in one annotation file (counts)."""

    source: str
    policy: str
    boxes_clamped: int = 0  # clipped into their image
    boxes_dropped: int = 0  # inverted, outside the image (drop), or empty once clipped (clamp)
    hois_dropped: int = 0  # HOIs whose subject or object box was dropped
    pairs_without_verbs_dropped: int = 0
    images_changed: int = 0
    images_left_without_pairs: int = 0  # had pairs in the file, none once fixed
    examples: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        """Whether anything was changed."""
        return bool(self.boxes_clamped or self.boxes_dropped)

    def add(self, other: BoxFixes) -> None:
        """Add the counts (and examples, up to the limit) of ``other``."""
        for name in (
            "boxes_clamped",
            "boxes_dropped",
            "hois_dropped",
            "pairs_without_verbs_dropped",
            "images_changed",
            "images_left_without_pairs",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples.extend(other.examples[: MAX_REPORTED_FIXES - len(self.examples)])

    def summary(self) -> str:
        """One line for logs: what was fixed and examples; ``""`` when nothing was."""
        if not self.any:
            return ""
        text = (
            f"{self.source}: box_policy={self.policy}: {_count(self.boxes_clamped, 'box')} clamped into its image, "
            f"{_count(self.boxes_dropped, 'box')} dropped (inverted, outside the image or empty once clamped) "
            f"with {_count(self.hois_dropped, 'HOI')} and {_count(self.pairs_without_verbs_dropped, 'pair')} "
            f"without verbs, in {_count(self.images_changed, 'image')}; "
            f"{_count(self.images_left_without_pairs, 'image')} left without pairs"
        )
        return text + (f"; e.g. {'; '.join(self.examples)}" if self.examples else "")


def _count(number: int, noun: str) -> str:
    plural = {"box": "boxes"}.get(noun, noun + "s")
    return f"{number} {noun if number == 1 else plural}"


@dataclass(frozen=True)
class AnnotationFile:
    """A validated annotation file: its entries in file order and what ``box_policy`` fixed."""

    images: list[ImageAnnotation]
    fixes: BoxFixes


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass in Python; a JSON true is never a valid id.
    return isinstance(value, int) and not isinstance(value, bool)


def _index_range(count: int) -> str:
    return f"0..{count - 1} (the image has {count} boxes)" if count else "(but the image has no boxes)"


@dataclass(frozen=True)
class _BoxCheck:
    """The outcome for one box: ``box`` to keep (None: dropped or malformed), ``error`` to report,
    ``fixed`` what the policy did (``clamped`` / ``dropped``, None when nothing)."""

    box: list[float] | None
    error: str | None = None
    fixed: str | None = None


def _check_box(bbox: Any, image_size: tuple[int, int] | None, tolerance: float, policy: str = "error") -> _BoxCheck:
    """Validate one [x1, y1, x2, y2] and apply ``policy`` to a box outside its image or inverted.

    Within ``tolerance`` px of the image a box is clipped silently (annotation tools commonly
    write x2 = width with 1-based coordinates). A malformed box is an error whatever the policy.
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return _BoxCheck(None, f"= {bbox!r}, expected a list [x1, y1, x2, y2] of 4 numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return _BoxCheck(None, f"= {bbox!r}, expected 4 finite numbers")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if x2 < x1 or y2 < y1:
        if policy == "error":
            return _BoxCheck(None, f"= {list(bbox)} is inverted: expected x1 <= x2 and y1 <= y2")
        return _BoxCheck(None, fixed="dropped")  # clamping cannot tell which corner is right
    if image_size is None:  # only the origin can be checked before the image is known
        if min(x1, y1) >= -tolerance:
            return _BoxCheck([x1, y1, x2, y2])
        if policy == "error":
            return _BoxCheck(None, f"= {list(bbox)} has negative coordinates (tolerance {tolerance} px)")
        if policy == "drop" or x2 <= 0 or y2 <= 0:
            return _BoxCheck(None, fixed="dropped")
        return _BoxCheck([max(x1, 0.0), max(y1, 0.0), x2, y2], fixed="clamped")
    height, width = image_size
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if x1 >= -tolerance and y1 >= -tolerance and x2 <= width + tolerance and y2 <= height + tolerance:
        return _BoxCheck(clipped)
    if policy == "error":
        return _BoxCheck(
            None,
            f"= {list(bbox)} lies outside the {width}x{height} (w x h) image "
            f"(allowed x in [0, {width}], y in [0, {height}], tolerance {tolerance} px)",
        )
    if policy == "drop" or clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return _BoxCheck(None, fixed="dropped")  # clamp: nothing of it lies in the image
    return _BoxCheck(clipped, fixed="clamped")


def _parse_entry(
    entry: Any,
    index: int,
    spec: DatasetSpec,
    problems: _Problems,
    *,
    image_size: tuple[int, int] | None = None,
    box_tolerance: float = 1.0,
    box_policy: str = "error",
    fixes: BoxFixes | None = None,
) -> ImageAnnotation | None:
    """Validate one entry; record problems and return None when it is unusable.

    Box indices of the result count only the boxes kept (``box_policy`` may drop some); what the
    policy changed is added to ``fixes``.
    """
    where = f"entry {index}"
    if not isinstance(entry, Mapping):
        problems.add(where, f"expected an object with file_name, annotations, hoi_annotation, got {entry!r:.80}")
        return None
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        problems.add(where, f"file_name = {file_name!r}, expected a non-empty string")
        return None
    where = f"entry {index} ({file_name})"
    ok = True
    boxes_in = entry.get("annotations")
    hois_in = entry.get("hoi_annotation")
    if not isinstance(boxes_in, list):
        problems.add(where, f"annotations = {boxes_in!r:.80}, expected a list of boxes")
        return None
    if not isinstance(hois_in, list):
        problems.add(where, f"hoi_annotation = {hois_in!r:.80}, expected a list")
        return None

    fixed = BoxFixes(problems.source, box_policy)
    boxes: list[list[float]] = []
    labels: list[int] = []
    kept: list[int | None] = []  # file box index -> index among the kept boxes (None: dropped)
    for j, box in enumerate(boxes_in):
        field = f"annotations[{j}]"
        kept.append(None)
        if not isinstance(box, Mapping):
            problems.add(where, f"{field} = {box!r:.80}, expected an object with bbox and category_id")
            ok = False
            continue
        check = _check_box(box.get("bbox"), image_size, box_tolerance, box_policy)
        if check.error is not None:
            problems.add(where, f"{field}.bbox {check.error}")
            ok = False
        category = box.get("category_id")
        if not _is_int(category) or category not in COCO_OBJECT_IDS:
            problems.add(where, f"{field}.category_id = {category!r} is not one of the 80 valid COCO ids (1..90)")
            ok = False
        if check.fixed is not None and len(fixed.examples) < MAX_REPORTED_FIXES:
            outcome = "dropped" if check.box is None else f"clamped to {_plain(check.box)}"
            fixed.examples.append(f"{where}: {field}.bbox {_plain(box.get('bbox'))} {outcome}")
        fixed.boxes_clamped += check.fixed == "clamped"
        fixed.boxes_dropped += check.fixed == "dropped"
        if ok and check.box is not None:
            assert _is_int(category)  # ok says so
            kept[j] = len(boxes)
            boxes.append(check.box)
            labels.append(coco_id_to_index(category))

    num_boxes = len(boxes_in)
    min_verb, max_verb = spec.verb_id_base, spec.verb_id_base + spec.num_verbs - 1
    min_object = -1 if spec.allows_no_object else 0
    hois: list[HOI] = []
    for k, hoi in enumerate(hois_in):
        field = f"hoi_annotation[{k}]"
        if not isinstance(hoi, Mapping):
            problems.add(where, f"{field} = {hoi!r:.80}, expected an object")
            ok = False
            continue
        subject, obj, verb_id = hoi.get("subject_id"), hoi.get("object_id"), hoi.get("category_id")
        hoi_ok = True
        if not _is_int(subject) or not 0 <= subject < num_boxes:
            problems.add(
                where,
                f"{field}.subject_id = {subject!r}, expected a box index {_index_range(num_boxes)}",
            )
            hoi_ok = False
        if not _is_int(obj) or not min_object <= obj < num_boxes:
            allowed = "-1 (no object) or " if spec.allows_no_object else ""
            problems.add(
                where,
                f"{field}.object_id = {obj!r}, expected {allowed}a box index {_index_range(num_boxes)}",
            )
            hoi_ok = False
        if not _is_int(verb_id) or not min_verb <= verb_id <= max_verb:
            problems.add(
                where,
                f"{field}.category_id = {verb_id!r} is outside {min_verb}..{max_verb} ({spec.name} verb id)",
            )
            hoi_ok = False
        hoi_id = hoi.get("hoi_category_id") if spec.has_hoi_ids else None
        if hoi_ok and hoi_id is not None and (not _is_int(hoi_id) or not 1 <= hoi_id <= len(HICO_HOIS)):
            problems.add(where, f"{field}.hoi_category_id = {hoi_id!r} is outside 1..{len(HICO_HOIS)}")
            hoi_ok = False
        if not hoi_ok:
            ok = False
            continue
        if not ok:
            continue  # the boxes have problems: the checks below need them
        assert _is_int(subject) and _is_int(obj) and _is_int(verb_id)  # hoi_ok says so
        kept_subject, kept_obj = kept[subject], kept[obj] if obj >= 0 else -1
        if kept_subject is None or kept_obj is None:
            fixed.hois_dropped += 1  # box_policy dropped a box it uses
            continue
        subject, obj = kept_subject, kept_obj
        if labels[subject] != 0:
            problems.add(
                where,
                f"{field}.subject_id = {hoi.get('subject_id')} points at a "
                f"{OBJECT_NAMES[labels[subject]]!r} box, expected a person (category_id 1)",
            )
            ok = False
            continue
        if spec.has_hoi_ids:
            verb = verb_id - spec.verb_id_base
            if hoi_id is None:
                try:  # optional in the file: derived from (verb, object)
                    hoi_id = hico_hoi_id(verb, labels[obj])
                except DatasetError as error:
                    problems.add(where, f"{field}: {error}")
                    hoi_ok = False
            elif HICO_HOIS[hoi_id - 1] != (verb, labels[obj]):
                expected_verb, expected_obj = HICO_HOIS[hoi_id - 1]
                problems.add(
                    where,
                    f"{field}.hoi_category_id = {hoi_id} means "
                    f"({HICO_VERBS[expected_verb]}, {OBJECT_NAMES[expected_obj]}) but the "
                    f"pair is ({HICO_VERBS[verb]}, {OBJECT_NAMES[labels[obj]]})",
                )
                hoi_ok = False
        if not hoi_ok:
            ok = False
            continue
        hois.append(HOI(subject, obj, verb_id - spec.verb_id_base, hoi_id))

    pairs_without_verbs = _parse_pairs_without_verbs(
        entry.get("pairs_without_verbs", []), where, problems, labels if ok else None, kept, spec, hois, fixed
    )
    if pairs_without_verbs is None or not ok:
        return None
    if fixed.any:
        fixed.images_changed = 1
        had_pairs = bool(hois_in) or bool(entry.get("pairs_without_verbs"))
        fixed.images_left_without_pairs = int(had_pairs and not hois and not pairs_without_verbs)
    if fixes is not None:
        fixes.add(fixed)
    return ImageAnnotation(
        index=index,
        file_name=file_name,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        hois=tuple(hois),
        raw=entry,
        image_size=image_size,
        pairs_without_verbs=pairs_without_verbs,
    )


def _plain(box: Any) -> Any:
    """A box for messages: whole numbers without ``.0``."""
    if not isinstance(box, (list, tuple)):
        return box
    return [int(v) if isinstance(v, float) and v.is_integer() else v for v in box]


def _parse_pairs_without_verbs(
    items: Any,
    where: str,
    problems: _Problems,
    labels: list[int] | None,
    kept: Sequence[int | None],
    spec: DatasetSpec,
    hois: Sequence[HOI],
    fixes: BoxFixes,
) -> tuple[tuple[int, int], ...] | None:
    """Validate the optional ``pairs_without_verbs`` list; None (problems recorded) when malformed.

    ``labels`` None: the boxes already had problems, so the person check is left out.
    ``kept``: file box index -> index among the kept boxes, None for a box the policy dropped
    (a pair using one is dropped too, and counted in ``fixes``). Returned pairs use kept indices.
    """
    num_boxes = len(kept)
    if not isinstance(items, list):
        problems.add(where, f"pairs_without_verbs = {items!r:.80}, expected a list of {{subject_id, object_id}}")
        return None
    labelled = {(hoi.subject, hoi.object) for hoi in hois}
    min_object = -1 if spec.allows_no_object else 0
    result: list[tuple[int, int]] = []
    ok = True
    for k, item in enumerate(items):
        field = f"pairs_without_verbs[{k}]"
        if not isinstance(item, Mapping):
            problems.add(where, f"{field} = {item!r:.80}, expected an object with subject_id and object_id")
            ok = False
            continue
        subject, obj = item.get("subject_id"), item.get("object_id")
        if not _is_int(subject) or not 0 <= subject < num_boxes:
            problems.add(where, f"{field}.subject_id = {subject!r}, expected a box index {_index_range(num_boxes)}")
            ok = False
            continue
        if not _is_int(obj) or not min_object <= obj < num_boxes:
            problems.add(where, f"{field}.object_id = {obj!r}, expected a box index {_index_range(num_boxes)}")
            ok = False
            continue
        if labels is None:
            continue  # the boxes have problems: the checks below need them
        kept_subject, kept_obj = kept[subject], kept[obj] if obj >= 0 else -1
        if kept_subject is None or kept_obj is None:
            fixes.pairs_without_verbs_dropped += 1
            continue
        file_subject, file_obj = subject, obj  # messages name the file's indices
        subject, obj = kept_subject, kept_obj
        if labels[subject] != 0:
            problems.add(
                where,
                f"{field}.subject_id = {file_subject} points at a {OBJECT_NAMES[labels[subject]]!r} box, "
                "expected a person (category_id 1)",
            )
            ok = False
            continue
        if (subject, obj) in labelled:
            problems.add(
                where, f"{field} = ({file_subject}, {file_obj}) also has verbs in hoi_annotation: list it in one place"
            )
            ok = False
            continue
        if (subject, obj) in result:
            problems.add(where, f"{field} = ({file_subject}, {file_obj}) is listed twice")
            ok = False
            continue
        result.append((subject, obj))
    return tuple(result) if ok else None


def read_image_size(path: Path) -> tuple[int, int]:
    """(h, w) of an image file from its header; DatasetError when missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise DatasetError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"image file {path} is not a readable image: {error}") from None
    return height, width


def load_annotations(
    path: str | Path,
    dataset: str = "hico",
    *,
    image_root: str | Path | None = None,
    box_tolerance: float = 1.0,
    box_policy: str = "error",
) -> list[ImageAnnotation]:
    """Read and validate a whole annotation file: ``read_annotations(...).images``."""
    return read_annotations(
        path, dataset, image_root=image_root, box_tolerance=box_tolerance, box_policy=box_policy
    ).images


def read_annotations(
    path: str | Path,
    dataset: str = "hico",
    *,
    image_root: str | Path | None = None,
    box_tolerance: float = 1.0,
    box_policy: str = "error",
) -> AnnotationFile:
    """Read and validate a whole annotation file; the entries and what ``box_policy`` fixed.

    Args:
        path: ``trainval_hico.json``, ``test_hico.json``, ``trainval_vcoco.json``, ...
        dataset: ``"hico"`` or ``"vcoco"`` (verb ids, no-object rule, HOI ids).
        image_root: directory of the images; when given every image must exist and every box must
            lie inside its image (header read only, not decoded).
        box_tolerance: pixels a box may stick out of the image (then clipped); annotation tools
            commonly write x2 = width with 1-based coordinates.
        box_policy: a box further out of its image, or inverted: ``error`` (a problem),
            ``clamp`` (clipped into the image; dropped when clipping cannot mend it) or ``drop``;
            a dropped box takes the HOIs and verb-less pairs that use it along. Without
            ``image_root`` only the box itself is checked here (``annotation_in_image`` later).

    Raises:
        DatasetError: the file is missing, not JSON, or has problems; the message lists them
            (file, entry index and file name, field, what would be valid).
    """
    spec = dataset_spec(dataset)
    check_box_policy(box_policy)
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as handle:
            entries = json.load(handle)
    except FileNotFoundError:
        raise DatasetError(f"annotation file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{source}: not valid JSON: {error}") from None
    if not isinstance(entries, list):
        raise DatasetError(f"{source}: expected a JSON list of image entries, got {type(entries).__name__}")

    problems = _Problems(source)
    fixes = BoxFixes(source, box_policy)
    root = Path(image_root) if image_root is not None else None
    result: list[ImageAnnotation] = []
    for index, entry in enumerate(entries):
        image_size = None
        if root is not None and isinstance(entry, Mapping) and isinstance(entry.get("file_name"), str):
            try:
                image_size = read_image_size(root / entry["file_name"])
            except DatasetError as error:
                problems.add(f"entry {index} ({entry['file_name']})", f"file_name: {error}")
                continue
        parsed = _parse_entry(
            entry,
            index,
            spec,
            problems,
            image_size=image_size,
            box_tolerance=box_tolerance,
            box_policy=box_policy,
            fixes=fixes,
        )
        if parsed is not None:
            result.append(parsed)
    problems.raise_if_any()
    return AnnotationFile(result, fixes)


def check_box_policy(box_policy: str) -> None:
    """DatasetError unless ``box_policy`` is one of ``BOX_POLICIES``."""
    if box_policy not in BOX_POLICIES:
        raise DatasetError(f"box_policy = {box_policy!r}: expected one of {', '.join(BOX_POLICIES)}")


def annotation_in_image(
    annotation: ImageAnnotation,
    image_size: tuple[int, int],
    dataset: str,
    *,
    source: str,
    box_tolerance: float = 1.0,
    box_policy: str = "error",
) -> ImageAnnotation:
    """``annotation`` validated again against its image's size (h, w), ``box_policy`` applied.

    For entries loaded without ``image_root``: the dataset calls this once the image is open.
    Raises DatasetError naming the entry and the box (policy ``error``).
    """
    problems = _Problems(source)
    parsed = _parse_entry(
        annotation.raw,
        annotation.index,
        dataset_spec(dataset),
        problems,
        image_size=image_size,
        box_tolerance=box_tolerance,
        box_policy=box_policy,
    )
    problems.raise_if_any()
    assert parsed is not None  # no problems: parsed
    return parsed


def check_boxes_in_image(
    annotation: ImageAnnotation, image_size: tuple[int, int], *, source: str, box_tolerance: float = 1.0
) -> np.ndarray:
    """Boxes of ``annotation`` validated against and clipped to ``image_size`` (h, w) -> (N, 4).

    Policy ``error``: a box outside the image (beyond ``box_tolerance``) is a DatasetError.
    """
    problems = _Problems(source)
    clipped = []
    for j, box in enumerate(annotation.boxes.tolist()):
        check = _check_box(box, image_size, box_tolerance)
        if check.error is not None:
            problems.add(f"entry {annotation.index} ({annotation.file_name})", f"annotations[{j}].bbox {check.error}")
        else:
            clipped.append(check.box)
    problems.raise_if_any()
    return np.asarray(clipped, dtype=np.float32).reshape(-1, 4)


def load_correspondence(path: str | Path, dataset: str = "hico") -> np.ndarray:
    """Read ``corre_hico.npy`` / ``corre_vcoco.npy``: (V, 80) bool verb x object validity."""
    spec = dataset_spec(dataset)
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"correspondence file {path} does not exist") from None
    except ValueError as error:
        raise DatasetError(f"{path}: not a numpy array file: {error}") from None
    expected = (spec.num_verbs, len(OBJECT_NAMES))
    if array.shape != expected:
        raise DatasetError(f"{path}: shape {array.shape}, expected {expected} ({spec.name} verbs x objects)")
    return array.astype(bool)


def resolve_correspondence(
    annotation_file: str | Path, dataset: str, correspondence: np.ndarray | str | Path | None
) -> np.ndarray:
    """The (V, 80) verb x object validity table of a dataset.

    ``correspondence``: an array, a ``.npy`` path, or None for ``corre_<dataset>.npy`` beside the
    annotation file; HICO-DET falls back to the built-in table when that file is absent.
    """
    spec = dataset_spec(dataset)
    if isinstance(correspondence, np.ndarray):
        if correspondence.shape[0] != spec.num_verbs:
            raise DatasetError(
                f"correspondence has {correspondence.shape[0]} verb rows, {dataset} has {spec.num_verbs}"
            )
        return correspondence.astype(bool)
    if correspondence is not None:
        return load_correspondence(correspondence, dataset)
    beside = Path(annotation_file).parent / CORRESPONDENCE_FILES[dataset]
    if beside.is_file():
        return load_correspondence(beside, dataset)
    if dataset == "hico":
        return hico_correspondence()
    raise DatasetError(f"no {beside.name} beside {annotation_file}: pass --correspondence for {dataset}")
