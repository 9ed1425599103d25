"""What annotations or a JSONL file say about sentences, and the negatives a step samples from it.

From annotations, an example is either a whole image (``regions=False``, as the engine scores an
item without a region) or one annotated pair's region (``regions=True``: the human box and the
object box, rendered at training time by the run's ``region`` policy exactly as the engine renders
it, so the teacher learns on the inputs it is later scored on).

Whole images: an image's positives are the sentences of all its annotated pairs, and each
positive brings hard negatives:

- (a) *same object*: valid verbs of the positive's object that no pair of the image has;
- (b) *other object*: a sentence about an object of the dataset that is not in the image;
- (c) *swap*: another image's positive from the same batch, unless it is a positive here.

A pair whose verbs were never annotated (``verbs_known`` False) says nothing about its verbs: it
adds no positive and blocks its object's sentences from being negatives of that image.

Pair regions: a pair's positives are its own verbs' sentences; (a) are the valid verbs of its
object that the *pair* lacks (another pair's verbs included: the region names this pair); (b) and
(c) as above; and (d) *other pair*: the verbs another pair of the same image has with an object of
the same class and this pair lacks, the hardest negative a region has (true of the image, false of
the pair: whole-image training cannot teach it). A pair without verbs is no example and blocks
nothing: its verbs say nothing about another pair.

Randomness is a function of (seed, epoch, image index) only, so a resumed run samples what an
uninterrupted one would. numpy only: no torch.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from teacher_server.errors import FinetuneError
from teacher_server.finetune.settings import FinetuneSettings
from teacher_server.hoi.annotations import ImageAnnotation, dataset_spec, read_annotations, resolve_correspondence
from teacher_server.hoi.prompts import VARIANTS, SentenceTable
from teacher_server.hoi.region import Region

#: How many problems of one input file an error lists before it says "and N more".
MAX_REPORTED_PROBLEMS = 20


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
    region: Region | None = None  # a pair's example: its human and object boxes (original pixels)
    pair_pool: tuple[str, ...] = ()  # (d): other pairs' verbs of the same object class, false here

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
    regions: bool = False  # one example per pair region (True) or per whole image

    def summary(self) -> dict[str, Any]:
        """Plain numbers for ``finetune.json`` and the log."""
        return {
            "source": self.source,
            "images": len(self.images),
            "skipped_images": self.skipped_images,
            "positives": sum(len(image.positives) for image in self.images),
            "given_negatives": sum(len(image.given_negatives) for image in self.images),
            "objects": len(self.object_sentences),
            "unit": "pair region" if self.regions else "image",
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
                # Only pair examples carry these: whole-image runs keep the digest they had.
                *([image.region.canonical(), list(image.pair_pool)] if image.region is not None else []),
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
    regions: bool = False,
) -> FinetuneExamples:
    """Training images from a HICO-DET / V-COCO annotation file (every image must exist).

    ``regions``: one example per annotated pair (its region; ``pair_examples``) instead of one
    per image; train it with ``FinetuneSettings(region="crop" | "mask")``.

    ``box_policy``: a box outside its image or inverted is an ``error``, or ``clamp``-ed / ``drop``-ped
    with its pairs (``teacher_server.hoi.annotations.read_annotations``; one warning counts the fixes).

    Raises:
        DatasetError: the file is malformed (unknown verb id, missing image, ...), as the reader says.
        FinetuneError: the file has no image, or no image with a usable pair.
    """
    if prompt_variant not in VARIANTS:
        raise FinetuneError(f"prompt_variant = {prompt_variant!r}, expected one of {', '.join(VARIANTS)}")
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
        where = f"{source} entry {annotation.index}"
        if regions:
            images += pair_examples(annotation, root, table, where=where, seen=seen)
            continue
        example = image_example(annotation, root, table, where=where, seen=seen)
        if example is not None:
            images.append(example)
    if not images:
        raise FinetuneError(
            f"{annotation_file}: none of its {len(annotations)} images has a usable pair (a verb with a "
            "sentence, or a valid verb to deny); pairs without verbs and empty images teach nothing"
        )
    objects = sorted({a.object_class(p.object) for a in annotations for p in a.pairs()})
    object_sentences = tuple(
        (obj, tuple(dict.fromkeys(s for _, s in table.candidates(obj)))) for obj in objects if table.candidates(obj)
    )
    return FinetuneExamples(
        images=tuple(images),
        object_sentences=object_sentences,
        source=str(annotation_file),
        prompt_variant=prompt_variant,
        skipped_images=len(annotations) - len({image.name for image in images}),
        counts=counts,
        regions=regions,
    )


def seen_sentences(annotations: Sequence[ImageAnnotation], table: SentenceTable) -> frozenset[str]:
    """The sentences that are true of at least one image of the file (an annotated verb of a pair)."""
    return frozenset(
        sentence
        for annotation in annotations
        for pair in annotation.pairs()
        if pair.verbs_known
        for verb in pair.verbs
        if (sentence := table.sentence(verb, annotation.object_class(pair.object))) is not None
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
        for _, sentence in table.candidates(annotation.object_class(pair.object))
    }
    positive_objects: dict[str, int] = {}
    for pair in known:
        obj = annotation.object_class(pair.object)
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
        objects = dict.fromkeys(annotation.object_class(pair.object) for pair in known)
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


def pair_examples(
    annotation: ImageAnnotation,
    image_root: Path,
    table: SentenceTable,
    *,
    where: str,
    seen: frozenset[str] = frozenset(),
) -> list[ImageExample]:
    """One example per annotated pair of the image (module docstring: pair regions).

    A pair without an object (V-COCO) has its human box as the region's object box.
    """
    known = [pair for pair in annotation.pairs() if pair.verbs_known]
    truths: list[tuple[int, set[str]]] = []  # per known pair: its object class, its true sentences
    for pair in known:
        obj = annotation.object_class(pair.object)
        truths.append((obj, {s for verb in pair.verbs if (s := table.sentence(verb, obj)) is not None}))
    examples = []
    for index, (pair, (obj, positives)) in enumerate(zip(known, truths, strict=True)):
        hard = tuple(dict.fromkeys(s for _, s in table.candidates(obj) if s not in positives))
        if not positives and not hard:
            continue
        others = [s for k, (other, true) in enumerate(truths) if k != index and other == obj for s in sorted(true)]
        human = annotation.boxes[pair.subject]
        thing = annotation.boxes[pair.object] if pair.object >= 0 else human
        name = f"{where} pair {index}"
        examples.append(
            ImageExample(
                name=annotation.file_name,
                path=image_root / annotation.file_name,
                where=f"{where} ({annotation.file_name}) pair {index}",
                positives=tuple(sorted(positives)),
                # One (a) slot per positive, as for images (one slot when it has none).
                hard_pools=(hard,) * max(len(positives), 1),
                seen_pools=(tuple(s for s in hard if s in seen),) * max(len(positives), 1),
                present_objects=frozenset(int(label) for label in annotation.labels),
                region=Region.from_values([*human.tolist(), *thing.tolist()], field=f"{name} region"),
                pair_pool=tuple(dict.fromkeys(s for s in others if s not in positives)),
            )
        )
    return examples


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
    therefore do not depend on the rest of the batch, one for (c), one for (d) (pair regions only:
    whole-image runs draw what they drew before it existed). A pair appears at most once.
    """
    images = [examples.images[i] for i in batch]
    result: list[TrainingPair] = []
    for slot, (index, image) in enumerate(zip(batch, images, strict=True)):
        own = np.random.default_rng([settings.seed, epoch, 1, index])
        swap = np.random.default_rng([settings.seed, epoch, 2, index])
        others = [other for k, other in enumerate(images) if k != slot]
        negatives = _negatives_of(image, others, examples.object_sentences, (own, swap), settings)
        if image.pair_pool and settings.other_pair_negatives:
            other_pair = np.random.default_rng([settings.seed, epoch, 3, index])
            picked = _pick(image.pair_pool, settings.other_pair_negatives, other_pair)
            negatives = list(dict.fromkeys([*negatives, *picked]))
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
