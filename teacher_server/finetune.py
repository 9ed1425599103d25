"""Fine-tune a BLIP image-text-matching teacher: ``python -m teacher_server finetune``.

A random or generic teacher knows little about human-object interactions; this command adapts a
``BlipForImageTextRetrieval`` with its own ITM objective (2-class cross-entropy of ``itm_head``,
class 1 = match) on image-sentence pairs, so that it ranks the verbs of a pair before anyone
distils from it. Pairs come from HOI annotations (HICO-DET / V-COCO format) or a JSONL file.

From annotations, scoring is whole-image (as the engine scores): an image's positives are the
sentences of all its annotated pairs, and each positive brings hard negatives:

- (a) *same object*: valid verbs of the positive's object that no pair of the image has;
- (b) *other object*: a sentence about an object of the dataset that is not in the image;
- (c) *swap*: another image's positive from the same batch, unless it is a positive here.

A pair whose verbs were never annotated (``verbs_known`` False) says nothing about its verbs: it
adds no positive and blocks its object's sentences from being negatives of that image.

Training is image-factored like the engine: the vision encoder runs once per image of a batch and
its tokens are indexed for every sentence of that image. Randomness is a function of (seed,
epoch, image index) only, so a run resumed from ``OUT/finetune_checkpoint.pt`` ends with the
same weights, bit for bit, as a run that never stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from teacher_server.engine import (
    DEFAULT_MODEL,
    EngineSettings,
    ItmEngine,
    decode_image,
    itm_start_token_id,
    load_blip_itm,
    resolve_device,
)
from teacher_server.errors import InvalidInputError, TeacherError
from teacher_server.hoi.annotations import (
    BOX_POLICIES,
    ImageAnnotation,
    dataset_spec,
    load_correspondence,
    read_annotations,
)
from teacher_server.hoi.classes import NO_OBJECT_INDEX, OBJECT_NAMES, hico_correspondence
from teacher_server.hoi.errors import DatasetError
from teacher_server.hoi.prompts import VARIANTS, candidate_sentences, triplet_sentence
from teacher_server.precision import PrecisionError, choose_dtype, device_capability, fp32_linear

CHECKPOINT_NAME = "finetune_checkpoint.pt"
SUMMARY_NAME = "finetune.json"
CHECKPOINT_FORMAT = 1
#: Default correspondence file per dataset, looked for beside the annotation file.
CORRESPONDENCE_FILES = {"hico": "corre_hico.npy", "vcoco": "corre_vcoco.npy"}
MAX_REPORTED_PROBLEMS = 20


class FinetuneError(TeacherError, ValueError):
    """Fine-tuning input or state is wrong: the message names the file, line or field, and why."""


# =============================================================================== annotations
# What HOI annotations say about the sentences of an image; eval-itm uses the same rules.


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


def pair_object(annotation: ImageAnnotation, object_box: int) -> int:
    """Object class of a pair's object box; ``NO_OBJECT_INDEX`` (80) for a V-COCO pair without one."""
    return int(annotation.labels[object_box]) if object_box >= 0 else NO_OBJECT_INDEX


class SentenceTable:
    """Sentences of (verb, object) triplets and the candidates of each object, computed once.

    Every sentence comes from ``triplet_sentence`` / ``candidate_sentences``, the project's one
    sentence function, so the teacher is trained and evaluated on what the student asks it.
    """

    def __init__(self, correspondence: np.ndarray, verbs: Sequence[str], variant: str = "full") -> None:
        if variant not in VARIANTS:
            raise FinetuneError(f"prompt_variant must be one of {list(VARIANTS)}, not {variant!r}")
        self.correspondence = correspondence
        self.verbs = tuple(verbs)
        self.variant = variant
        self._candidates: dict[int, tuple[tuple[int, str], ...]] = {}

    def candidates(self, obj: int) -> tuple[tuple[int, str], ...]:
        """``(verb index, sentence)`` of every verb valid with object class ``obj`` (none for no_interaction)."""
        if obj not in self._candidates:
            found = candidate_sentences(obj, self.correspondence, self.verbs, self.variant)  # type: ignore[arg-type]
            self._candidates[obj] = tuple(found)
        return self._candidates[obj]

    def sentence(self, verb: int, obj: int) -> str | None:
        """The sentence of (person, verb, object); None for no_interaction."""
        name = OBJECT_NAMES[obj] if obj < len(OBJECT_NAMES) else None
        return triplet_sentence(self.verbs[verb], name, self.variant)  # type: ignore[arg-type]


# ==================================================================================== examples


@dataclass(frozen=True)
class ImageExample:
    """One training image and what its labels say about sentences.

    ``hard_pools[k]`` are the (a)-negatives of slot k: one slot per positive, or, for an image
    without positives (e.g. only no_interaction), one per object class of its annotated pairs.
    """

    name: str  # as written in the annotation file / JSONL (digests use it, not the absolute path)
    path: Path
    where: str  # "trainval_hico.json entry 3 (x.jpg)" or "pairs.jsonl line 7", for error messages
    positives: tuple[str, ...]
    hard_pools: tuple[tuple[str, ...], ...] = ()
    seen_pools: tuple[tuple[str, ...], ...] = ()  # per slot: the part of hard_pools[k] the file shows as true
    present_objects: frozenset[int] = frozenset()
    blocked: frozenset[str] = frozenset()  # sentences of unknown-verb pairs: neither true nor false
    given_negatives: tuple[str, ...] = ()  # JSONL label-0 rows, used every epoch

    def is_negative(self, sentence: str) -> bool:
        """Whether ``sentence`` may serve as a negative of this image."""
        return sentence not in self.positives and sentence not in self.blocked


@dataclass(frozen=True)
class FinetuneExamples:
    """Training images with their sentences, plus the (b) pool: object class -> its sentences."""

    images: tuple[ImageExample, ...]
    object_sentences: tuple[tuple[int, tuple[str, ...]], ...]
    source: str
    prompt_variant: str | None  # None for JSONL (sentences given as they are)
    skipped_images: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    sentence_origins: Mapping[str, str] = field(default_factory=dict)  # JSONL sentence -> "file line N"

    def summary(self) -> dict[str, Any]:
        """Plain numbers for ``finetune.json`` and the log."""
        return {
            "source": self.source,
            "images": len(self.images),
            "skipped_images": self.skipped_images,
            "positives": sum(len(image.positives) for image in self.images),
            "given_negatives": sum(len(image.given_negatives) for image in self.images),
            "objects": len(self.object_sentences),
            **self.counts,
        }

    def digest(self) -> str:
        """SHA-256 of everything sampling reads: a resumed run must see the same data."""
        canonical = [
            [
                image.name,
                list(image.positives),
                [list(pool) for pool in image.hard_pools],
                [list(pool) for pool in image.seen_pools],
                sorted(image.present_objects),
                sorted(image.blocked),
                list(image.given_negatives),
            ]
            for image in self.images
        ]
        blob = json.dumps([canonical, [[o, list(s)] for o, s in self.object_sentences]], separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def examples_from_annotations(
    annotation_file: str | Path,
    image_root: str | Path,
    *,
    dataset: str = "hico",
    correspondence: np.ndarray | str | Path | None = None,
    prompt_variant: str = "full",
    box_policy: str = "error",
) -> FinetuneExamples:
    """Training images from a HICO-DET / V-COCO annotation file (every image must exist).

    ``box_policy``: a box outside its image or inverted is an ``error``, or ``clamp``-ed / ``drop``-ped
    with its pairs (``teacher_server.hoi.annotations.read_annotations``; one warning counts the fixes).

    Raises:
        DatasetError: the file is malformed (unknown verb id, missing image, ...), as the reader says.
        FinetuneError: the file has no image, or no image with a usable pair.
    """
    spec = dataset_spec(dataset)
    loaded = read_annotations(annotation_file, dataset, image_root=image_root, box_policy=box_policy)
    if loaded.fixes.any:
        warnings.warn(loaded.fixes.summary(), stacklevel=2)
    annotations = loaded.images
    if not annotations:
        raise FinetuneError(f"{annotation_file}: the annotation file lists no images")
    table = SentenceTable(resolve_correspondence(annotation_file, dataset, correspondence), spec.verbs, prompt_variant)
    root = Path(image_root)
    source = Path(annotation_file).name
    images: list[ImageExample] = []
    counts = {"pairs": 0, "pairs_without_verbs": 0}
    seen = seen_sentences(annotations, table)
    for annotation in annotations:
        pairs = annotation.pairs()
        counts["pairs"] += sum(pair.verbs_known for pair in pairs)
        counts["pairs_without_verbs"] += sum(not pair.verbs_known for pair in pairs)
        example = image_example(annotation, root, table, where=f"{source} entry {annotation.index}", seen=seen)
        if example is not None:
            images.append(example)
    if not images:
        raise FinetuneError(
            f"{annotation_file}: none of its {len(annotations)} images has a usable pair (a verb with a "
            "sentence, or a valid verb to deny); pairs without verbs and empty images teach nothing"
        )
    objects = sorted({pair_object(a, p.object) for a in annotations for p in a.pairs()})
    object_sentences = tuple(
        (obj, tuple(dict.fromkeys(s for _, s in table.candidates(obj)))) for obj in objects if table.candidates(obj)
    )
    return FinetuneExamples(
        images=tuple(images),
        object_sentences=object_sentences,
        source=str(annotation_file),
        prompt_variant=prompt_variant,
        skipped_images=len(annotations) - len(images),
        counts=counts,
    )


def seen_sentences(annotations: Sequence[ImageAnnotation], table: SentenceTable) -> frozenset[str]:
    """The sentences that are true of at least one image of the file (an annotated verb of a pair)."""
    return frozenset(
        sentence
        for annotation in annotations
        for pair in annotation.pairs()
        if pair.verbs_known
        for verb in pair.verbs
        if (sentence := table.sentence(verb, pair_object(annotation, pair.object))) is not None
    )


def image_example(
    annotation: ImageAnnotation,
    image_root: Path,
    table: SentenceTable,
    *,
    where: str,
    seen: frozenset[str] = frozenset(),
) -> ImageExample | None:
    """What one annotated image says about sentences; None when it says nothing usable.

    ``seen``: sentences true somewhere in the file (``seen_sentences``); each hard pool's share of
    them is its ``seen_pools`` entry, the confusable negatives.
    """
    pairs = annotation.pairs()
    known = [pair for pair in pairs if pair.verbs_known]
    blocked = {
        sentence
        for pair in pairs
        if not pair.verbs_known
        for _, sentence in table.candidates(pair_object(annotation, pair.object))
    }
    positive_objects: dict[str, int] = {}
    for pair in known:
        obj = pair_object(annotation, pair.object)
        for verb in pair.verbs:
            sentence = table.sentence(verb, obj)
            if sentence is not None:
                positive_objects.setdefault(sentence, obj)
    positives = tuple(sorted(positive_objects))
    # Unknown verbs of one pair cannot undo what another pair of the image says is true.
    blocked -= set(positives)

    def pool(obj: int) -> tuple[str, ...]:
        excluded = blocked | set(positives)
        return tuple(dict.fromkeys(s for _, s in table.candidates(obj) if s not in excluded))

    if positives:
        hard_pools = tuple(pool(positive_objects[sentence]) for sentence in positives)
    else:
        objects = dict.fromkeys(pair_object(annotation, pair.object) for pair in known)
        hard_pools = tuple(p for p in (pool(obj) for obj in objects) if p)
    if not positives and not hard_pools:
        return None
    return ImageExample(
        name=annotation.file_name,
        path=image_root / annotation.file_name,
        where=f"{where} ({annotation.file_name})",
        positives=positives,
        hard_pools=hard_pools,
        seen_pools=tuple(tuple(s for s in pool if s in seen) for pool in hard_pools),
        present_objects=frozenset(int(label) for label in annotation.labels),
        blocked=frozenset(blocked),
    )


class _Problems:
    """Problems of one input file, reported together (the first few, then a count)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_if_any(self) -> None:
        if self.messages:
            shown = "\n  ".join(self.messages[:MAX_REPORTED_PROBLEMS])
            more = len(self.messages) - MAX_REPORTED_PROBLEMS
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise FinetuneError(f"{self.source}: {len(self.messages)} problem(s):\n  {shown}{tail}")


def examples_from_jsonl(path: str | Path, image_root: str | Path) -> FinetuneExamples:
    """Training images from JSONL rows ``{"image": path, "sentence": str, "label": 0 | 1}``.

    Image paths are relative to ``image_root`` (or absolute). Every row is validated; all problems
    are reported at once with their line numbers and fields.
    """
    path, root = Path(path), Path(image_root)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FinetuneError(f"JSONL file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FinetuneError(f"JSONL file {path} is not readable text: {error}") from None
    problems = _Problems(str(path))
    rows: dict[str, dict[str, tuple[int, int]]] = {}  # image -> sentence -> (label, line)
    first_line: dict[str, int] = {}
    origins: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _jsonl_row(line, number, root, problems)
        if row is None:
            continue
        image, sentence, label = row
        seen = rows.setdefault(image, {}).get(sentence)
        if seen is not None and seen[0] != label:
            problems.add(f"line {number}: label = {label} contradicts line {seen[1]} (same image and sentence)")
            continue
        rows[image].setdefault(sentence, (label, number))
        first_line.setdefault(image, number)
        origins.setdefault(sentence, f"{path.name} line {number}")
    problems.raise_if_any()
    if not rows:
        raise FinetuneError(f"{path}: no rows (expected one JSON object per line)")
    images = tuple(
        ImageExample(
            name=image,
            path=_jsonl_image_path(image, root),
            where=f"{path.name} line {first_line[image]}",
            positives=tuple(sorted(s for s, (label, _) in sentences.items() if label == 1)),
            given_negatives=tuple(sorted(s for s, (label, _) in sentences.items() if label == 0)),
        )
        for image, sentences in rows.items()
    )
    return FinetuneExamples(
        images=images, object_sentences=(), source=str(path), prompt_variant=None, sentence_origins=origins
    )


def _jsonl_image_path(image: str, root: Path) -> Path:
    candidate = Path(image)
    return candidate if candidate.is_absolute() else root / candidate


def _jsonl_row(line: str, number: int, root: Path, problems: _Problems) -> tuple[str, str, int] | None:
    """Validate one JSONL line; record what is wrong and return None, or (image, sentence, label)."""
    where = f"line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        problems.add(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
        return None
    if not isinstance(row, dict):
        problems.add(f"{where}: expected an object {{image, sentence, label}}, got {type(row).__name__}")
        return None
    ok = True
    image, sentence, label = row.get("image"), row.get("sentence"), row.get("label")
    if not isinstance(image, str) or not image.strip():
        problems.add(f"{where}: image = {image!r}, expected a non-empty path string")
        ok = False
    elif not _jsonl_image_path(image, root).is_file():
        problems.add(f"{where}: image = {image!r}: file {_jsonl_image_path(image, root)} does not exist")
        ok = False
    if not isinstance(sentence, str) or not sentence.strip():
        problems.add(f"{where}: sentence = {sentence!r}, expected a non-empty string")
        ok = False
    # bool is an int in Python; a JSON true is not a label.
    if isinstance(label, bool) or label not in (0, 1):
        problems.add(f"{where}: label = {label!r}, expected 0 (no match) or 1 (match)")
        ok = False
    return (image, sentence.strip(), int(label)) if ok else None


# ==================================================================================== settings

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
#: Settings that change how a run executes but not what it computes: a resume may change them.
RESUME_FREE_SETTINGS = frozenset({"device", "num_threads", "checkpoint_every", "max_steps", "image_cache_mb"})


@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune; every field is checked on construction, errors name the field and range.

    The defaults suit BLIP-base on a GPU; a tiny model wants ``lr=3e-4`` and few warm-up steps.
    """

    epochs: int = 3
    batch_images: int = 16
    """Images per optimiser step; every positive and sampled negative of each comes along."""
    lr: float = 2e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    schedule: str = "cosine"
    """After warm-up: ``cosine`` decay to 0 at the last step, or ``constant``."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    same_object_negatives: int = 2
    seen_verb_negatives: int = 1
    """(a') per positive: verbs of its object that the annotation file shows elsewhere (a positive of
    another image) but this image lacks: the confusable ones, which a uniform draw over all valid
    verbs rarely picks when the object has many verbs the data never shows."""
    """(a) per positive: valid verbs of its object that the image does not have."""
    other_object_negatives: int = 1
    """(b) per positive: sentences about objects of the dataset that are not in the image."""
    swap_negatives: int = 1
    """(c) per positive: other images' positives from the batch that are not positives here."""
    prompt_variant: str = "full"
    itm_start_token: str = "cls"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    """``auto``: bf16 autocast on CUDA (fp16 + grad scaling where bf16 is unsupported), fp32 on CPU."""
    num_threads: int = 0
    """torch CPU threads; 0 leaves torch's default."""
    checkpoint_every: int = 500
    """Optimiser steps between checkpoints (also written at every epoch end); 0 = epoch ends only."""
    max_steps: int | None = None
    """Stop after this many steps in total (the schedule still spans all epochs); resume later."""
    image_cache_mb: float = 4096.0
    """Preprocessed images kept in memory; past it, images are decoded again at each use."""

    def __post_init__(self) -> None:
        _check_range("epochs", self.epochs, 1, 10_000)
        _check_range("batch_images", self.batch_images, 1, 100_000)
        _check_range("lr", self.lr, 0.0, 1.0, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        _check_range("warmup_steps", self.warmup_steps, 0, 10_000_000)
        _check_range("grad_clip", self.grad_clip, 0.0, 1e6)
        for name in ("same_object_negatives", "seen_verb_negatives", "other_object_negatives", "swap_negatives"):
            _check_range(name, getattr(self, name), 0, 64)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("prompt_variant", self.prompt_variant, VARIANTS)
        _check_choice("itm_start_token", self.itm_start_token, ("cls", "enc"))
        _check_choice("precision", self.precision, PRECISIONS)
        _check_range("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise FinetuneError(f"device = {self.device!r}, expected auto, cpu, cuda or cuda:N")
        _check_range("num_threads", self.num_threads, 0, 1024)
        _check_range("checkpoint_every", self.checkpoint_every, 0, 10_000_000)
        if self.max_steps is not None:
            _check_range("max_steps", self.max_steps, 1, 10_000_000_000)
        _check_range("image_cache_mb", self.image_cache_mb, 0.0, 1e9)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for the checkpoint and ``finetune.json``)."""
        return asdict(self)

    def differences(self, other: Mapping[str, Any], where: str = "the checkpoint") -> list[str]:
        """``name: this vs other`` for every setting (except the resume-free ones) that differs."""
        mine = self.to_dict()
        return [
            f"{name}: {mine[name]!r} here vs {other.get(name)!r} in {where}"
            for name in mine
            if name not in RESUME_FREE_SETTINGS and mine[name] != other.get(name)
        ]


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    integral = isinstance(low, int) and isinstance(high, int)
    kind = "an integer" if integral else "a number"
    valid_type = isinstance(value, int) if integral else isinstance(value, int | float)
    if isinstance(value, bool) or not valid_type or (not integral and not math.isfinite(value)):
        raise FinetuneError(f"{name} = {value!r}, expected {kind} in {'(' if low_open else '['}{low}, {high}]")
    if value < low or value > high or (low_open and value == low):
        raise FinetuneError(f"{name} = {value!r} is outside {'(' if low_open else '['}{low}, {high}]")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise FinetuneError(f"{name} = {value!r}, expected one of {', '.join(choices)}")


# ===================================================================================== sampling


@dataclass(frozen=True)
class TrainingPair:
    """One (image of the batch, sentence, label) row of a step."""

    image: int  # position in the step's image batch
    sentence: str
    label: int  # 1 = match


def epoch_order(num_images: int, seed: int, epoch: int) -> list[int]:
    """Image order of an epoch: a function of (seed, epoch) only, so resuming cannot change it."""
    # The trailing 0 tags this stream apart from the per-image streams [seed, epoch, 1|2, i].
    return np.random.default_rng([seed, epoch, 0]).permutation(num_images).tolist()


def sample_pairs(
    examples: FinetuneExamples, batch: Sequence[int], *, epoch: int, settings: FinetuneSettings
) -> list[TrainingPair]:
    """Positives and sampled negatives of the images ``batch`` (indices into ``examples.images``).

    Image i's draws come from RNGs seeded by (seed, epoch, i): one stream for (a) and (b), which
    therefore do not depend on the rest of the batch, one for (c). A pair appears at most once.
    """
    images = [examples.images[i] for i in batch]
    result: list[TrainingPair] = []
    for slot, (index, image) in enumerate(zip(batch, images, strict=True)):
        own = np.random.default_rng([settings.seed, epoch, 1, index])
        swap = np.random.default_rng([settings.seed, epoch, 2, index])
        others = [other for k, other in enumerate(images) if k != slot]
        negatives = _negatives_of(image, others, examples.object_sentences, (own, swap), settings)
        result += [TrainingPair(slot, sentence, 1) for sentence in image.positives]
        result += [TrainingPair(slot, sentence, 0) for sentence in negatives]
    return result


def _negatives_of(
    image: ImageExample,
    others: Sequence[ImageExample],
    object_sentences: Sequence[tuple[int, tuple[str, ...]]],
    rngs: tuple[np.random.Generator, np.random.Generator],
    settings: FinetuneSettings,
) -> list[str]:
    """The image's negatives for one step: given ones, then (a), (b), (c) per slot, deduplicated.

    ``rngs``: the (a)/(b) stream and the (c) stream of this image and epoch.
    """
    rng, swap_rng = rngs
    chosen: dict[str, None] = dict.fromkeys(image.given_negatives)
    absent = [sentences for obj, sentences in object_sentences if obj not in image.present_objects]
    swaps = list(dict.fromkeys(s for other in others for s in other.positives if image.is_negative(s)))
    slots = max(len(image.positives), len(image.hard_pools))
    for slot in range(slots):
        pool = image.hard_pools[slot] if slot < len(image.hard_pools) else ()
        chosen.update(dict.fromkeys(_pick(pool, settings.same_object_negatives, rng)))
        if settings.seen_verb_negatives:  # drawn only when asked: older runs keep their streams
            seen = image.seen_pools[slot] if slot < len(image.seen_pools) else ()
            chosen.update(dict.fromkeys(_pick(seen, settings.seen_verb_negatives, rng)))
        for _ in range(settings.other_object_negatives if absent else 0):
            sentences = absent[int(rng.integers(len(absent)))]
            allowed = [s for s in sentences if image.is_negative(s)]
            if allowed:
                chosen[allowed[int(rng.integers(len(allowed)))]] = None
        chosen.update(dict.fromkeys(_pick(swaps, settings.swap_negatives, swap_rng)))
    return list(chosen)


def _pick(pool: Sequence[str], count: int, rng: np.random.Generator) -> list[str]:
    """Up to ``count`` distinct items of ``pool``, uniformly."""
    if not pool or count <= 0:
        return []
    picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[int(i)] for i in picked]


# ======================================================================================== model


def itm_logits(
    model: torch.nn.Module, pixel_values: Tensor, image_index: Tensor, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """ITM logits (P, 2) [no-match, match] of P (image, sentence) pairs, vision run once per image.

    pixel_values: (I, 3, S, S); image_index: (P,) long, the image of each pair, in 0..I-1;
    input_ids, attention_mask: (P, L). The same computation as
    ``BlipForImageTextRetrieval.forward(..., use_itm_head=True)`` on ``pixel_values[image_index]``,
    without running the vision encoder again for every sentence of an image.
    """
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (I, N, Dv)
    pair_embeds = image_embeds[image_index]  # (P, N, Dv); gradients add up per image
    image_mask = torch.ones(pair_embeds.shape[:-1], dtype=torch.long, device=pair_embeds.device)
    hidden = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=pair_embeds,
        encoder_attention_mask=image_mask,
    ).last_hidden_state  # (P, L, D)
    # The head in fp32 even under autocast: the loss and P(match) read the difference of two logits.
    return fp32_linear(model.itm_head, hidden[:, 0])


def balanced_itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over positives and mean over negatives, averaged.

    logits: (P, 2); labels: (P,) long 0/1. Averaging the two means keeps the sampled
    positive/negative ratio from biasing the calibration of P(match).
    """
    losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    parts = [losses[labels == label].mean() for label in (1, 0) if bool((labels == label).any())]
    return torch.stack(parts).mean()


class ItmTokens:
    """Token ids of ITM text, built as the engine builds them (start-token policy included)."""

    def __init__(self, tokenizer: Any, policy: str, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.start_id = itm_start_token_id(tokenizer, policy)
        self.max_tokens = max_tokens
        self.pad_id = tokenizer.pad_token_id or 0
        self._ids: dict[str, tuple[int, ...]] = {}

    def ids(self, sentence: str) -> tuple[int, ...]:
        """``[CLS] ... [SEP]`` ids of ``sentence``, with the first replaced by the start token."""
        if sentence not in self._ids:
            ids = tuple(self.tokenizer(sentence, add_special_tokens=True)["input_ids"])
            self._ids[sentence] = ids if self.start_id is None else (self.start_id, *ids[1:])
        return self._ids[sentence]

    def batch(self, sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (P, L), right-padded."""
        rows = [self.ids(sentence) for sentence in sentences]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = 1
        return input_ids, mask

    def check(self, examples: FinetuneExamples) -> None:
        """Refuse sentences the engine would refuse (over its token limit), naming where they are from."""
        for image in examples.images:
            for sentence in (*image.positives, *image.given_negatives):
                count = len(self.ids(sentence))
                if count > self.max_tokens:
                    where = examples.sentence_origins.get(sentence, image.where)
                    raise FinetuneError(
                        f"{where}: sentence {sentence[:60]!r} is {count} tokens (with [CLS] and [SEP]), "
                        f"over the engine's limit of {self.max_tokens}"
                    )


class ImageStore:
    """Preprocessed pixels (3, S, S) of the training images, decoded once while they fit in memory."""

    def __init__(self, examples: FinetuneExamples, image_processor: Any, capacity_mb: float) -> None:
        self.examples = examples
        self.image_processor = image_processor
        size = image_processor.size
        side_h, side_w = size["height"] or 384, size["width"] or 384
        self.bytes_per_image = 3 * side_h * side_w * 4
        fits = len(examples.images) * self.bytes_per_image <= capacity_mb * 1024 * 1024
        self._held: dict[int, Tensor] | None = {} if fits else None
        self._limits = EngineSettings()

    def preload(self, progress: bool) -> None:
        """Decode every image now (when they fit), so a bad file fails before the first step."""
        if self._held is None:
            return
        from tqdm import tqdm

        count = len(self.examples.images)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = tqdm(pool.map(self._decode, range(count)), total=count, desc="images", disable=not progress)
            for index, pixels in enumerate(decoded):
                self._held[index] = pixels

    def pixels(self, indices: Sequence[int]) -> Tensor:
        """(B, 3, S, S) float32 pixels of images ``indices``."""
        if self._held is not None:
            missing = [i for i in indices if i not in self._held]
            for index in missing:
                self._held[index] = self._decode(index)
            return torch.stack([self._held[i] for i in indices])
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return torch.stack(list(pool.map(self._decode, indices)))

    def _decode(self, index: int) -> Tensor:
        image = self.examples.images[index]
        try:
            data = image.path.read_bytes()
        except OSError as error:
            raise FinetuneError(f"{image.where}: cannot read image {image.path}: {error.strerror or error}") from None
        try:
            decoded = decode_image(
                data, max_bytes=self._limits.max_image_bytes, max_pixels=self._limits.max_image_pixels
            )
        except InvalidInputError as error:
            raise FinetuneError(f"{image.where}: {image.path}: {error.reason}") from None
        return self.image_processor(images=decoded, return_tensors="pt")["pixel_values"][0]


# ============================================================================ checkpoint, state


@dataclass
class Position:
    """Where a run stands. After epoch e's last step: ``epoch = e + 1, batches_done = 0``."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0


@dataclass
class EpochLog:
    """Running sums of one epoch (kept in the checkpoint, so a resumed epoch reports the same mean)."""

    loss_sum: float = 0.0
    steps: int = 0
    pairs: int = 0
    positives: int = 0
    seconds: float = 0.0

    def line(self, epoch: int, epochs: int) -> str:
        return (
            f"epoch {epoch + 1}/{epochs}: loss {self.mean_loss:.4f}, {self.pairs} pairs "
            f"({self.positives} positive), {self.steps} steps, {self.seconds:.1f} s"
        )

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and numbers (``weights_only``-loadable)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng`` (CUDA states only where CUDA is present)."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(w) for w in python["words"].tolist()), python["gauss"]))
    saved = state["numpy"]
    np.random.set_state(
        (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"], saved["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``<path>.tmp``, fsync'd, then renamed: readers see old or new, never half."""
    partial = path.with_name(path.name + ".tmp")
    try:
        with partial.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A fine-tuning checkpoint, read with the safe unpickler (tensors and plain values only)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the safe unpickler refuses anything else, with varied types
        raise FinetuneError(
            f"{path}: not a readable fine-tuning checkpoint ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"{path}: not a fine-tuning checkpoint of format {CHECKPOINT_FORMAT}")
    return checkpoint


# ======================================================================================= training


@dataclass
class FinetuneResult:
    """What a fine-tuning call did. ``fingerprint`` is None while the run is not complete."""

    out: Path
    fingerprint: str | None
    steps: int
    epoch_losses: list[float]
    seconds: float
    complete: bool = True
    total_steps: int = 0


@dataclass
class _Run:
    """Everything one training run holds while it runs."""

    model: torch.nn.Module
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokens: ItmTokens
    images: ImageStore
    base_model: str
    base_weights: str
    steps_per_epoch: int
    position: Position = field(default_factory=Position)
    epochs: list[EpochLog] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * len(self.epochs)


def finetune(
    model: str | Path,
    out: str | Path,
    examples: FinetuneExamples,
    settings: FinetuneSettings,
    *,
    resume: bool = False,
    progress: bool | None = None,
    say: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune the BLIP ITM model ``model`` (hub id or directory) on ``examples`` into ``out``.

    ``out`` receives ``save_pretrained`` of the model and the base's processor (loadable by
    ``ItmEngine.from_pretrained`` and ``serve --model``), ``finetune.json``, and while the run
    is unfinished ``finetune_checkpoint.pt``. ``resume``: continue the run held in ``out`` (or
    start when it holds none). ``progress``: tqdm bars; None = when stderr is a terminal.

    Raises:
        FinetuneError: bad settings or data, an ``out`` holding something else, a checkpoint of a
            different run. ModelLoadError (a TeacherError): the base model cannot be loaded.
    """
    started = time.perf_counter()
    out = Path(out)
    show = sys.stderr.isatty() if progress is None else progress
    if examples.prompt_variant is not None and examples.prompt_variant != settings.prompt_variant:
        raise FinetuneError(
            f"prompt_variant = {settings.prompt_variant!r} but the examples were built with {examples.prompt_variant!r}"
        )
    checkpoint = _claim_output(out, resume=resume)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if checkpoint is None and resume and (out / SUMMARY_NAME).is_file():
        return _finished_run(out, examples, settings, started, say)
    run = _start_run(model, examples, settings)
    if checkpoint is None:
        _seed_everything(settings.seed)
        say(
            f"fine-tuning {run.base_model} on {len(examples.images)} images of {examples.source} "
            f"({examples.skipped_images} skipped): {run.total_steps} steps on {run.device}"
        )
    else:
        _restore(run, checkpoint, examples, settings)
        say(f"resuming {out / CHECKPOINT_NAME} at step {run.position.step} of {run.total_steps}")
    run.images.preload(show)
    complete = _train(run, examples, settings, out, show, say)
    if not complete:
        _write_summary(out, run, examples, settings, complete=False, fingerprint=None)
        say(f"stopped at step {run.position.step} of {run.total_steps} (max_steps); resume to continue")
        return _result(out, None, run, started, complete=False)
    fingerprint = _save_output(out, run, examples, settings)
    say(f"wrote {out} (fingerprint {fingerprint}; serve it with --itm-start-token {settings.itm_start_token})")
    return _result(out, fingerprint, run, started, complete=True)


def _result(out: Path, fingerprint: str | None, run: _Run, started: float, *, complete: bool) -> FinetuneResult:
    losses = [log.mean_loss for log in run.epochs[: run.position.epoch]]
    return FinetuneResult(
        out, fingerprint, run.position.step, losses, time.perf_counter() - started, complete, run.total_steps
    )


def _claim_output(out: Path, *, resume: bool) -> dict[str, Any] | None:
    """Check that ``out`` may receive this run; returns the checkpoint to resume from, if any."""
    checkpoint_path = out / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file, expected a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return None
    is_run = checkpoint_path.is_file() or (out / SUMMARY_NAME).is_file()
    if not is_run:
        raise FinetuneError(
            f"--out {out} is not empty and holds no fine-tuning run ({', '.join(held[:4])}"
            f"{', ...' if len(held) > 4 else ''}): choose a new or empty directory"
        )
    if not resume:
        raise FinetuneError(
            f"--out {out} already holds a fine-tuning run ({SUMMARY_NAME} / {CHECKPOINT_NAME}): pass --resume to "
            "continue it, or choose another --out"
        )
    return load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast_dtype(settings: FinetuneSettings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32)."""
    if device.type != "cuda":
        if settings.precision in ("bf16", "fp16"):
            raise FinetuneError(f"precision = {settings.precision!r} needs a CUDA device; this run is on {device}")
        return None
    try:
        # bf16 only where this device has bf16 tensor cores (compute capability >= 8.0).
        return choose_dtype(settings.precision, device_capability(device), name="precision")
    except PrecisionError as error:
        raise FinetuneError(str(error)) from None


def _start_run(model: str | Path, examples: FinetuneExamples, settings: FinetuneSettings) -> _Run:
    """Load the base model and build the optimiser, schedule and data plumbing."""
    try:
        device = resolve_device(settings.device)
    except TeacherError as error:
        raise FinetuneError(f"device: {error}") from None
    autocast_dtype = _autocast_dtype(settings, device)
    loaded = load_blip_itm(model, revision=None, dtype=torch.float32)
    network = loaded.model.to(device).train()
    network.requires_grad_(True)
    tokens = ItmTokens(loaded.processor.tokenizer, settings.itm_start_token, EngineSettings().max_sentence_tokens)
    tokens.check(examples)
    steps_per_epoch = math.ceil(len(examples.images) / settings.batch_images)
    optimizer = torch.optim.AdamW(_parameter_groups(network, settings.weight_decay), lr=settings.lr)
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, total))
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    return _Run(
        model=network,
        processor=loaded.processor,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        device=device,
        autocast_dtype=autocast_dtype,
        tokens=tokens,
        images=ImageStore(examples, loaded.processor.image_processor, settings.image_cache_mb),
        base_model=loaded.model_id,
        base_weights=loaded.weights_identity,
        steps_per_epoch=steps_per_epoch,
        epochs=[EpochLog() for _ in range(settings.epochs)],
    )


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings (decay would shrink them to 0)."""
    decay, keep = [], []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "embedding" in name or "norm" in name.lower()
        (keep if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _schedule(settings: FinetuneSettings, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up, then cosine to 0 at ``total_steps`` (or constant)."""
    warmup = settings.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if settings.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _restore(run: _Run, checkpoint: Mapping[str, Any], examples: FinetuneExamples, settings: FinetuneSettings) -> None:
    """Load a checkpoint into ``run`` after checking that it is this run (settings, data, base model)."""
    problems = settings.differences(checkpoint["settings"])
    if checkpoint["data_digest"] != examples.digest():
        held = checkpoint["data"].get("images")
        problems.append(
            f"training data: {len(examples.images)} images from {examples.source} here vs {held} images from "
            f"{checkpoint['data'].get('source')} in the checkpoint (different annotations, JSONL, correspondence "
            "or prompt variant)"
        )
    if checkpoint["base_weights"] != run.base_weights:
        problems.append(f"base model: {run.base_model} here vs {checkpoint['base_model']} in the checkpoint")
    if problems:
        raise FinetuneError("cannot resume: the run in --out differs:\n  " + "\n  ".join(problems))
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.scaler is not None and checkpoint.get("scaler") is not None:
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.position = Position(**checkpoint["position"])
    run.epochs = [EpochLog(**log) for log in checkpoint["epochs"]]
    restore_rng(checkpoint["rng"])


def _save_checkpoint(out: Path, run: _Run, examples: FinetuneExamples, settings: FinetuneSettings) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": {name: tensor.detach().cpu() for name, tensor in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "position": asdict(run.position),
        "epochs": [asdict(log) for log in run.epochs],
        "rng": capture_rng(),
        "settings": settings.to_dict(),
        "data_digest": examples.digest(),
        "data": examples.summary(),
        "base_model": run.base_model,
        "base_weights": run.base_weights,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / CHECKPOINT_NAME, lambda handle: torch.save(payload, handle))


def _batches(num_images: int, settings: FinetuneSettings, epoch: int, skip: int) -> Iterator[list[int]]:
    """Image-index batches of an epoch, from batch ``skip`` on."""
    order = epoch_order(num_images, settings.seed, epoch)
    size = settings.batch_images
    for start in range(skip * size, num_images, size):
        yield order[start : start + size]


def _train(
    run: _Run, examples: FinetuneExamples, settings: FinetuneSettings, out: Path, show: bool, say: Callable[[str], None]
) -> bool:
    """Run the remaining steps; True when every epoch is done, False when stopped by ``max_steps``."""
    from tqdm import tqdm

    while run.position.epoch < settings.epochs:
        epoch, log = run.position.epoch, run.epochs[run.position.epoch]
        bar = tqdm(
            total=run.steps_per_epoch,
            initial=run.position.batches_done,
            desc=f"epoch {epoch + 1}/{settings.epochs}",
            unit="step",
            disable=not show,
        )
        with bar:
            for batch in _batches(len(examples.images), settings, epoch, run.position.batches_done):
                if settings.max_steps is not None and run.position.step >= settings.max_steps:
                    _save_checkpoint(out, run, examples, settings)
                    return False
                tick = time.perf_counter()
                loss, pairs = _step(run, examples, batch, epoch, settings)
                log.loss_sum += loss
                log.steps += 1
                log.pairs += len(pairs)
                log.positives += sum(pair.label for pair in pairs)
                log.seconds += time.perf_counter() - tick
                run.position.batches_done += 1
                run.position.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if settings.checkpoint_every and run.position.step % settings.checkpoint_every == 0:
                    _save_checkpoint(out, run, examples, settings)
        run.position = Position(epoch + 1, 0, run.position.step)
        say(log.line(epoch, settings.epochs))
        _save_checkpoint(out, run, examples, settings)
    return True


def _step(
    run: _Run, examples: FinetuneExamples, batch: Sequence[int], epoch: int, settings: FinetuneSettings
) -> tuple[float, list[TrainingPair]]:
    """One optimiser step on the images ``batch``; returns (loss, the pairs it trained on)."""
    pairs = sample_pairs(examples, batch, epoch=epoch, settings=settings)
    pixels = run.images.pixels(batch).to(run.device, non_blocking=True)
    input_ids, mask = run.tokens.batch([pair.sentence for pair in pairs])
    image_index = torch.tensor([pair.image for pair in pairs], dtype=torch.long, device=run.device)
    labels = torch.tensor([pair.label for pair in pairs], dtype=torch.long, device=run.device)
    autocast = (
        torch.autocast(device_type=run.device.type, dtype=run.autocast_dtype)
        if run.autocast_dtype is not None
        else nullcontext()
    )
    with autocast:
        logits = itm_logits(run.model, pixels, image_index, input_ids.to(run.device), mask.to(run.device))
    loss = balanced_itm_loss(logits, labels)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    return float(loss.detach()), pairs


# ========================================================================================= output


def _write_summary(
    out: Path,
    run: _Run,
    examples: FinetuneExamples,
    settings: FinetuneSettings,
    *,
    complete: bool,
    fingerprint: str | None,
) -> None:
    summary = {
        "base_model": run.base_model,
        "base_weights": run.base_weights,
        "complete": complete,
        "fingerprint": fingerprint,
        "itm_start_token": settings.itm_start_token,
        "steps": run.position.step,
        "total_steps": run.total_steps,
        "settings": settings.to_dict(),
        "data": examples.summary(),
        "data_digest": examples.digest(),
        "epochs": [
            {"epoch": index + 1, "loss": log.mean_loss, **asdict(log)}
            for index, log in enumerate(run.epochs[: run.position.epoch])
        ],
    }
    text = json.dumps(summary, indent=2) + "\n"
    write_atomically(out / SUMMARY_NAME, lambda handle: handle.write(text.encode()))


def _save_output(out: Path, run: _Run, examples: FinetuneExamples, settings: FinetuneSettings) -> str:
    """Save model + processor, then drop the checkpoint; returns the engine fingerprint of ``out``."""
    run.model.eval().to("cpu").save_pretrained(out)
    run.processor.save_pretrained(out)
    _write_summary(out, run, examples, settings, complete=True, fingerprint=None)
    # The engine hashes every *.pt beside the weights: the checkpoint must go before it looks.
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    run.optimizer.state.clear()  # free memory before the engine loads its copy
    fingerprint = output_fingerprint(out, settings)
    _write_summary(out, run, examples, settings, complete=True, fingerprint=fingerprint)
    return fingerprint


def output_fingerprint(out: str | Path, settings: FinetuneSettings) -> str:
    """The fingerprint ``serve --model OUT`` computes on this device, with the run's start token."""
    engine = ItmEngine.from_pretrained(
        out, EngineSettings(device=settings.device, itm_start_token=settings.itm_start_token)
    )
    return engine.fingerprint


def _finished_run(
    out: Path, examples: FinetuneExamples, settings: FinetuneSettings, started: float, say: Callable[[str], None]
) -> FinetuneResult:
    """``resume`` on a run that already completed: nothing to train if it is the same run."""
    summary = json.loads((out / SUMMARY_NAME).read_text())
    problems = settings.differences(summary.get("settings", {}), where=SUMMARY_NAME)
    if summary.get("data_digest") != examples.digest():
        problems.append("training data: differs from the finished run's")
    if problems:
        raise FinetuneError("cannot resume: the finished run in --out differs:\n  " + "\n  ".join(problems))
    if not summary.get("complete"):
        raise FinetuneError(f"--out {out}: {SUMMARY_NAME} says the run is unfinished but {CHECKPOINT_NAME} is missing")
    fingerprint = output_fingerprint(out, settings)
    say(f"{out} already holds this run, complete (fingerprint {fingerprint})")
    losses = [epoch["loss"] for epoch in summary["epochs"]]
    return FinetuneResult(
        out, fingerprint, summary["steps"], losses, time.perf_counter() - started, True, summary["total_steps"]
    )


# ============================================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``finetune``; defaults suit BLIP-base on a GPU (see docs/teacher-quality.md)."""
    defaults = FinetuneSettings()
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--annotations", type=Path, help="HICO-DET / V-COCO annotation file (trainval_hico.json)")
    source.add_argument("--jsonl", type=Path, help='image-sentence pairs, one {"image", "sentence", "label"} per line')
    data.add_argument("--images", type=Path, required=True, help="directory the image paths are relative to")
    data.add_argument("--dataset", choices=["hico", "vcoco"], default="hico", help="annotation format (default hico)")
    data.add_argument(
        "--correspondence",
        type=Path,
        help="verb x object validity .npy (default: corre_<dataset>.npy beside --annotations; hico: built in)",
    )
    data.add_argument(
        "--box-policy",
        choices=BOX_POLICIES,
        default="clamp",
        help="--annotations: a box outside its image or inverted is an error, clamped into the image "
        "(dropped when that cannot mend it) or dropped, with its pairs (default clamp, as training)",
    )
    data.add_argument(
        "--prompt-variant",
        choices=list(VARIANTS),
        default=defaults.prompt_variant,
        help="sentence template: verb and object, verb only or object only (default full)",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"base model: hub id or save_pretrained directory (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (model, processor, finetune.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (start it when there is none)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=defaults.epochs, help=f"(default {defaults.epochs})")
    train.add_argument(
        "--batch-images",
        type=int,
        default=defaults.batch_images,
        help=f"images per step (default {defaults.batch_images})",
    )
    train.add_argument(
        "--lr", type=float, default=defaults.lr, help=f"AdamW peak LR (default {defaults.lr}; tiny models: 3e-4)"
    )
    train.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help=f"(default {defaults.weight_decay})"
    )
    train.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help=f"(default {defaults.warmup_steps})"
    )
    train.add_argument(
        "--schedule", choices=SCHEDULES, default=defaults.schedule, help="after warm-up (default cosine)"
    )
    train.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help=f"max gradient norm, 0 = off (default {defaults.grad_clip})",
    )
    train.add_argument(
        "--same-object-negatives",
        type=int,
        default=defaults.same_object_negatives,
        help=f"(a) per positive: valid verbs of its object the image lacks (default {defaults.same_object_negatives})",
    )
    parser.add_argument(
        "--seen-verb-negatives",
        type=int,
        default=defaults.seen_verb_negatives,
        help="(a') per positive: verbs of its object that other images of the file have and this one lacks "
        f"(default {defaults.seen_verb_negatives})",
    )
    train.add_argument(
        "--other-object-negatives",
        type=int,
        default=defaults.other_object_negatives,
        help=f"(b) per positive: sentences about objects not in the image (default {defaults.other_object_negatives})",
    )
    train.add_argument(
        "--swap-negatives",
        type=int,
        default=defaults.swap_negatives,
        help=f"(c) per positive: other images' positives from the batch (default {defaults.swap_negatives})",
    )
    train.add_argument(
        "--itm-start-token",
        choices=["cls", "enc"],
        default=defaults.itm_start_token,
        help="token that starts the ITM text, as the engine will score it (default cls)",
    )
    train.add_argument(
        "--seed", type=int, default=defaults.seed, help="same seed + same data = same weights (default 0)"
    )
    run_group = parser.add_argument_group("execution")
    run_group.add_argument(
        "--device", default=defaults.device, help="auto (CUDA when present, the default), cpu, cuda, cuda:N"
    )
    run_group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="auto: bf16 (else fp16) autocast on CUDA, fp32 on CPU",
    )
    run_group.add_argument("--threads", type=int, default=defaults.num_threads, help="torch CPU threads, 0 = default")
    run_group.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help=f"steps between checkpoints, 0 = epoch ends only (default {defaults.checkpoint_every})",
    )
    run_group.add_argument("--max-steps", type=int, help="stop after this many steps in total; --resume continues")
    run_group.add_argument(
        "--image-cache-mb",
        type=float,
        default=defaults.image_cache_mb,
        help="decoded images kept in memory (default 4096)",
    )
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """Map the flags onto ``FinetuneSettings`` (which validates them)."""
    return FinetuneSettings(
        epochs=args.epochs,
        batch_images=args.batch_images,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        grad_clip=args.grad_clip,
        same_object_negatives=args.same_object_negatives,
        seen_verb_negatives=args.seen_verb_negatives,
        other_object_negatives=args.other_object_negatives,
        swap_negatives=args.swap_negatives,
        prompt_variant=args.prompt_variant,
        itm_start_token=args.itm_start_token,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        num_threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        max_steps=args.max_steps,
        image_cache_mb=args.image_cache_mb,
    )


def run(args: argparse.Namespace) -> int:
    """``finetune``: build the examples, train, print where the model went; 2 on bad input."""
    try:
        settings = settings_from_args(args)
        if args.jsonl is not None:
            examples = examples_from_jsonl(args.jsonl, args.images)
        else:
            examples = examples_from_annotations(
                args.annotations,
                args.images,
                dataset=args.dataset,
                correspondence=args.correspondence,
                prompt_variant=args.prompt_variant,
                box_policy=args.box_policy,
            )
        finetune(
            args.model, args.out, examples, settings, resume=args.resume, progress=False if args.no_progress else None
        )
    except (TeacherError, DatasetError) as error:
        print(f"finetune: {error}", file=sys.stderr)
        return 2
    return 0
