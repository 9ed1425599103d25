"""Load and validate ``preds.json`` and annotation files into one flat, numpy representation.

Predictions and ground truth share one schema (the HICO-DET / V-COCO format of the DETR-line HOI
codebases), so one parser reads both; only the key names differ:

- annotations: ``{file_name, annotations: [{bbox, category_id}], hoi_annotation: [{subject_id,
  object_id, category_id}]}``
- predictions: ``{file_name, predictions: [{bbox, category_id}], hoi_prediction: [{subject_id,
  object_id, category_id, score}]}``

``bbox`` is ``[x1, y1, x2, y2]`` in pixels of the original image, box ``category_id`` a COCO id,
HOI ``category_id`` a verb id (HICO-DET 1..117, V-COCO 0..28 as in ``trainval_vcoco.json``), and
``object_id = -1`` means "no object" (V-COCO only).

A whole split becomes one :class:`HoiSet` of concatenated arrays (boxes and HOIs of every image,
with the image each belongs to), so that the evaluators work on all images at once with numpy
instead of looping over Python dicts. Every malformed value raises :class:`EvaluationError`
naming the file, the image (index and file name), the field and what would be valid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from teacher_server.hoi.classes import COCO_OBJECT_IDS, HICO_VERBS, VCOCO_VERBS

Dataset = Literal["hico", "vcoco"]
Kind = Literal["annotations", "predictions"]

DATASETS: tuple[str, ...] = ("hico", "vcoco")

#: File verb id = verb index + offset: HICO-DET numbers verbs from 1, V-COCO files from 0.
VERB_ID_OFFSET: dict[str, int] = {"hico": 1, "vcoco": 0}

#: ``object_id`` of a V-COCO HOI without an object.
NO_OBJECT_ID = -1

# (list key, HOI list key) per file kind.
_KEYS: dict[str, tuple[str, str]] = {
    "annotations": ("annotations", "hoi_annotation"),
    "predictions": ("predictions", "hoi_prediction"),
}

# COCO id -> object index, -1 for the ten ids COCO never used (a lookup table: vectorised mapping).
_COCO_TO_INDEX = np.full(max(COCO_OBJECT_IDS) + 1, -1, dtype=np.int64)
_COCO_TO_INDEX[list(COCO_OBJECT_IDS)] = np.arange(len(COCO_OBJECT_IDS))
COCO_IDS = np.asarray(COCO_OBJECT_IDS, dtype=np.int64)


class EvaluationError(ValueError):
    """A predictions file, annotation file or evaluation input is malformed or inconsistent.

    Messages name the file, the image (index in the list and file name), the field and what would
    be valid, e.g. ``preds.json: entry 3 (HICO_test2015_00000004.jpg): hoi_prediction[7].subject_id
    = 12 is outside 0..9 (the entry has 10 predictions)``.
    """


def verbs_of(dataset: str) -> tuple[str, ...]:
    """The verb names of ``dataset`` ("hico" or "vcoco"), index = verb index."""
    if dataset == "hico":
        return HICO_VERBS
    if dataset == "vcoco":
        return VCOCO_VERBS
    raise EvaluationError(f"dataset {dataset!r} is unknown: use one of {', '.join(DATASETS)}")


@dataclass(frozen=True, eq=False)  # arrays: no element-wise __eq__
class HoiSet:
    """Boxes and HOIs of every image of a split, concatenated (predictions or ground truth).

    Box and HOI ``i`` of image ``k`` live at ``box_offsets[k] + i`` / ``hoi_offsets[k] + i``;
    ``subjects`` and ``objects`` are global box indices (``objects`` is -1 for "no object").
    """

    file_names: tuple[str, ...]  # (I,) "" where a predictions entry named none
    box_offsets: np.ndarray  # (I + 1,) int64
    boxes: np.ndarray  # (N, 4) float64 xyxy pixels
    labels: np.ndarray  # (N,) int64 object index 0..79
    hoi_offsets: np.ndarray  # (I + 1,) int64
    subjects: np.ndarray  # (M,) int64 global box index
    objects: np.ndarray  # (M,) int64 global box index or -1
    verbs: np.ndarray  # (M,) int64 verb index (0-based)
    scores: np.ndarray  # (M,) float64; 1 for ground truth

    @property
    def num_images(self) -> int:
        return len(self.file_names)

    @property
    def box_image(self) -> np.ndarray:
        """(N,) int64 image index of every box."""
        return np.repeat(np.arange(self.num_images), np.diff(self.box_offsets))

    @property
    def hoi_image(self) -> np.ndarray:
        """(M,) int64 image index of every HOI."""
        return np.repeat(np.arange(self.num_images), np.diff(self.hoi_offsets))


def load_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing file or a syntax error into :class:`EvaluationError`."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise EvaluationError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvaluationError(f"{path}: not valid JSON ({error})") from None


def load_annotations(path: str | Path, dataset: str) -> HoiSet:
    """Read ``test_hico.json`` / ``trainval_vcoco.json``-style ground truth into a :class:`HoiSet`."""
    return parse_hoi_entries(load_json(path), dataset=dataset, kind="annotations", source=str(path))


def load_predictions(path: str | Path, dataset: str, ground_truth: HoiSet) -> HoiSet:
    """Read ``preds.json`` (one entry per image of ``ground_truth``, same order) into a :class:`HoiSet`."""
    return parse_predictions(load_json(path), dataset, ground_truth, source=str(path))


def parse_predictions(entries: Any, dataset: str, ground_truth: HoiSet, *, source: str = "predictions") -> HoiSet:
    """Validate in-memory preds.json entries (e.g. from :func:`postprocess`) against ``ground_truth``.

    The list must have one entry per ground-truth image, in the same order; an entry's
    ``file_name``, when present, must equal the annotation's.
    """
    return parse_hoi_entries(
        entries,
        dataset=dataset,
        kind="predictions",
        source=source,
        expected_file_names=ground_truth.file_names,
    )


def save_predictions(entries: Sequence[dict], path: str | Path) -> None:
    """Write preds.json entries to ``path`` (atomically: a reader never sees half a file)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w") as handle:
        json.dump(list(entries), handle, allow_nan=False)
    partial.replace(path)


def parse_hoi_entries(
    entries: Any,
    *,
    dataset: str,
    kind: Kind,
    source: str,
    expected_file_names: Sequence[str] | None = None,
) -> HoiSet:
    """Validate a list of per-image entries (annotations or predictions) into a :class:`HoiSet`.

    Args:
        entries: the decoded JSON list.
        dataset: "hico" (verb ids 1..117, every HOI has an object) or "vcoco" (verb ids 0..28,
            ``object_id`` -1 allowed).
        kind: "annotations" or "predictions" (which keys to read; predictions carry a score).
        source: name used in error messages (usually the file path).
        expected_file_names: for predictions, the annotation file names the entries align with.

    Raises:
        EvaluationError: naming the entry, the field and what would be valid.
    """
    num_verbs = len(verbs_of(dataset))
    box_key, hoi_key = _KEYS[kind]
    if not isinstance(entries, list):
        raise EvaluationError(f"{source}: expected a JSON list with one entry per image, got {type(entries).__name__}")
    if expected_file_names is not None and len(entries) != len(expected_file_names):
        raise EvaluationError(
            f"{source}: has {len(entries)} entries but the annotations have "
            f"{len(expected_file_names)} images; "
            "list one entry per test image, in the order of the annotation file"
        )

    file_names: list[str] = []
    box_lists: list[list] = []
    hoi_lists: list[list] = []
    for index, entry in enumerate(entries):
        expected = expected_file_names[index] if expected_file_names is not None else None
        where = f"{source}: entry {index}"
        if not isinstance(entry, dict):
            raise EvaluationError(f"{where}: expected an object with {box_key!r} and {hoi_key!r}, got {entry!r:.80}")
        name = entry.get("file_name")
        if name is not None and not isinstance(name, str):
            raise EvaluationError(f"{where}: file_name = {name!r:.80} is not a string")
        if expected is not None and name is not None and name != expected:
            raise EvaluationError(
                f"{where} ({name}): file_name differs from the annotations' {expected!r} at the same index; "
                "entries must follow the order of the annotation file"
            )
        name = name if name is not None else (expected or "")
        for key in (box_key, hoi_key):
            if key not in entry:
                raise EvaluationError(f"{where} ({name or '?'}): the key {key!r} is missing")
            if not isinstance(entry[key], list):
                raise EvaluationError(f"{where} ({name or '?'}): {key} is not a list (got {type(entry[key]).__name__})")
        file_names.append(name)
        box_lists.append(entry[box_key])
        hoi_lists.append(entry[hoi_key])

    box_offsets = np.concatenate(([0], np.cumsum([len(b) for b in box_lists], dtype=np.int64)))
    hoi_offsets = np.concatenate(([0], np.cumsum([len(h) for h in hoi_lists], dtype=np.int64)))
    boxes_flat = [item for items in box_lists for item in items]
    hois_flat = [item for items in hoi_lists for item in items]
    box_where = _Locator(source, file_names, box_offsets, box_key)
    hoi_where = _Locator(source, file_names, hoi_offsets, hoi_key)

    boxes = _box_column(boxes_flat, box_where)
    coco_ids = _int_column(boxes_flat, "category_id", box_where)
    bad = (coco_ids < 0) | (coco_ids >= len(_COCO_TO_INDEX))
    labels = np.full(len(coco_ids), -1, dtype=np.int64)
    labels[~bad] = _COCO_TO_INDEX[coco_ids[~bad]]
    _check(labels >= 0, box_where, "category_id", coco_ids, "is not one of the 80 valid COCO ids")

    subjects = _int_column(hois_flat, "subject_id", hoi_where)
    objects = _int_column(hois_flat, "object_id", hoi_where)
    verb_ids = _int_column(hois_flat, "category_id", hoi_where)
    hoi_image = np.repeat(np.arange(len(file_names)), np.diff(hoi_offsets))
    num_boxes = np.diff(box_offsets)[hoi_image]
    noun = box_key

    def range_text(i: int) -> str:
        return f"is outside 0..{num_boxes[i] - 1} (the entry has {num_boxes[i]} {noun})"

    _check((subjects >= 0) & (subjects < num_boxes), hoi_where, "subject_id", subjects, range_text)
    allow_none = dataset == "vcoco"
    ok_object = (objects >= 0) & (objects < num_boxes)
    if allow_none:
        ok_object |= objects == NO_OBJECT_ID
    _check(
        ok_object,
        hoi_where,
        "object_id",
        objects,
        lambda i: range_text(i) + (" and is not -1 (no object)" if allow_none else ""),
    )
    offset = VERB_ID_OFFSET[dataset]
    verbs = verb_ids - offset
    _check(
        (verbs >= 0) & (verbs < num_verbs),
        hoi_where,
        "category_id",
        verb_ids,
        f"is not a {dataset} verb id ({offset}..{num_verbs - 1 + offset})",
    )

    if kind == "predictions":
        scores = _float_column(hois_flat, "score", hoi_where)
    else:
        scores = np.ones(len(hois_flat), dtype=np.float64)

    start = box_offsets[hoi_image]
    return HoiSet(
        file_names=tuple(file_names),
        box_offsets=box_offsets,
        boxes=boxes,
        labels=labels,
        hoi_offsets=hoi_offsets,
        subjects=subjects + start,
        objects=np.where(objects >= 0, objects + start, NO_OBJECT_ID),
        verbs=verbs,
        scores=scores,
    )


def join_on_keys(left_keys: np.ndarray, right_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j) with ``left_keys[i] == right_keys[j]``, without a Python loop.

    Returns ``(left_index, right_index)`` sorted by ``i``; for one ``i`` the ``j`` are ascending.
    Used to pair each prediction with the ground truth of the same image (and verb).
    """
    right_order = np.argsort(right_keys, kind="stable")
    sorted_right = right_keys[right_order]
    start = np.searchsorted(sorted_right, left_keys, side="left")
    counts = np.searchsorted(sorted_right, left_keys, side="right") - start
    left_index = np.repeat(np.arange(len(left_keys)), counts)
    within = np.arange(len(left_index)) - np.repeat(np.cumsum(counts) - counts, counts)
    right_index = right_order[np.repeat(start, counts) + within]
    return left_index, right_index


def segment_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Start index of every run of equal values in ``sorted_keys`` (empty input: no runs)."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


# ----------------------------------------------------------------------------------------------
# Column extraction with precise error messages. The fast path builds one numpy array per field
# over all images; only when it finds a problem does a slow scan locate the first bad item.


@dataclass(frozen=True)
class _Locator:
    """Turns a flat item index into "file: entry k (name): key[i].field"."""

    source: str
    file_names: list[str]
    offsets: np.ndarray
    key: str

    def __call__(self, flat: int, field: str | None = None) -> str:
        image = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        local = flat - int(self.offsets[image])
        name = self.file_names[image] or "?"
        item = f"{self.key}[{local}]" + (f".{field}" if field else "")
        return f"{self.source}: entry {image} ({name}): {item}"


def _raw_values(items: list, field: str, where: _Locator) -> list:
    try:
        return [item[field] for item in items]
    except (KeyError, TypeError, IndexError):
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise EvaluationError(f"{where(i)} is not an object (got {item!r:.80})") from None
            if field not in item:
                raise EvaluationError(f"{where(i)}: the key {field!r} is missing") from None
        raise


def _int_column(items: list, field: str, where: _Locator) -> np.ndarray:
    values = _raw_values(items, field, where)
    if not values:
        return np.zeros(0, dtype=np.int64)
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        array = np.asarray([None])  # ragged nested lists: fall through to the scan below
    if array.dtype.kind in "iu" and array.ndim == 1:
        return array.astype(np.int64)
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EvaluationError(f"{where(i, field)} = {value!r:.80} is not an integer")
        if abs(value) >= 2**62:
            raise EvaluationError(f"{where(i, field)} = {value} is out of range")
    raise EvaluationError(f"{where(0, field)}: the values of {field!r} do not form an integer column")


def _float_column(items: list, field: str, where: _Locator) -> np.ndarray:
    values = _raw_values(items, field, where)
    if not values:
        return np.zeros(0, dtype=np.float64)
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        array = np.asarray([None])
    if array.dtype.kind in "iuf" and array.ndim == 1 and np.isfinite(array).all():
        return array.astype(np.float64)
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvaluationError(f"{where(i, field)} = {value!r:.80} is not a finite number")
    raise EvaluationError(f"{where(0, field)}: the values of {field!r} do not form a number column")


def _box_column(items: list, where: _Locator) -> np.ndarray:
    values = _raw_values(items, "bbox", where)
    if not values:
        return np.zeros((0, 4), dtype=np.float64)
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        array = np.asarray([None])
    if array.dtype.kind in "iuf" and array.shape == (len(values), 4) and np.isfinite(array).all():
        return array.astype(np.float64)
    for i, value in enumerate(values):
        ok = (
            isinstance(value, list)
            and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        )
        if not ok:
            raise EvaluationError(f"{where(i, 'bbox')} = {value!r:.80} is not [x1, y1, x2, y2] of 4 finite numbers")
    raise EvaluationError(f"{where(0, 'bbox')}: the boxes do not form an (N, 4) array of numbers")


def _check(
    ok: np.ndarray, where: _Locator, field: str, values: np.ndarray, problem: str | Callable[[int], str]
) -> None:
    bad = np.flatnonzero(~ok)
    if bad.size:
        i = int(bad[0])
        text = problem(i) if callable(problem) else problem
        raise EvaluationError(f"{where(i, field)} = {int(values[i])} {text}")
