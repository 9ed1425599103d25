"""Run a trained student on image files: its triplets in original pixels, drawn, optionally judged by the teacher.

``python -m student predict`` is a thin wrapper of ``predict_files``; so can be any tool that wants
the pictures (the demo). The steps, each reusing what ``evaluate`` runs:

1. ``Predictor.from_checkpoint``: the model of a ``train`` checkpoint (its config's ``model``),
   and the config's test transform (``student.builders.build_test_transforms``);
2. ``Predictor.predict``: one image through that transform, the model, and
   ``student.evaluation.postprocess`` (the preds.json post-processing: scores, the dataset's
   verb x object validity, triplet NMS, boxes mapped back to the original pixels); the
   ``top_k`` best triplets scoring at least ``threshold`` are kept;
3. ``teacher_match``: with a teacher service, each triplet's sentence
   (``teacher_server.hoi.prompts.triplet_sentence``) is scored on the pair's region (human box,
   object box; clipped to the image as training clips them, the whole image when a box is
   unusable) and its ``match_prob`` recorded;
4. ``student.drawing.draw_pairs`` draws the triplets of each pair on the original image.

The JSON document (``predictions_document``) is described by ``PREDICTIONS_SCHEMA``
(``student/schemas/predictions.schema.json``).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from student.builders import build_amp, build_test_transforms, resolve_device
from student.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from student.config import ConfigError, TrainConfig, config_from_dict
from student.drawing import LabelLine, PairDrawing, draw_pairs
from student.engine import AmpSettings, outputs_to_float
from student.evaluation.postprocess import TripletNms, postprocess
from student.evaluation.predictions import NO_OBJECT_ID, VERB_ID_OFFSET, verbs_of
from student.model import HOIDetector
from student.teacher.scores import pair_region
from teacher_server.hoi.classes import OBJECT_NAMES, coco_id_to_index, hico_correspondence
from teacher_server.hoi.prompts import triplet_sentence
from teacher_server.hoi.region import Region

if TYPE_CHECKING:
    from teacher_server.client import TeacherClient

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the original image

#: Image files a directory argument contributes (by suffix, case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: The JSON Schema of ``predictions_document`` (package data).
PREDICTIONS_SCHEMA = "schemas/predictions.schema.json"

DEFAULT_THRESHOLD = 0.3
DEFAULT_TOP_K = 10
DEFAULT_TEACHER_THRESHOLD = 0.5
# Several queries often find the same pair with the same verb: a picture shows it once. 0.7 is the
# reference triplet NMS's threshold (``TripletNms``); 1 turns it off (an overlap never exceeds 1).
DEFAULT_NMS_THRESHOLD = 0.7


class PredictError(ValueError):
    """An image, output or setting ``predict`` cannot use; the message names the file or flag."""


def predictions_schema() -> dict[str, Any]:
    """The JSON Schema of ``predictions_document``'s output, read from the package."""
    return json.loads(resources.files("student").joinpath(PREDICTIONS_SCHEMA).read_text())


@dataclass(frozen=True)
class Triplet:
    """One (person, verb, object) the student detects; boxes in pixels of the original image.

    ``object`` and ``object_box`` are None for an action without object (V-COCO). ``teacher``:
    the teacher's ``match_prob`` of the triplet's sentence on the pair, None when not asked.
    """

    verb: str
    object: str | None
    score: float
    human_box: Box
    object_box: Box | None
    teacher: float | None = None

    def sentence(self) -> str | None:
        """The teacher's sentence of the triplet; None for HICO-DET's ``no_interaction``."""
        return triplet_sentence(self.verb, self.object)

    def label(self) -> str:
        """``ride horse 0.91``: what the picture writes next to the pair."""
        words = self.verb if self.object is None else f"{self.verb} {self.object}"
        return f"{words.replace('_', ' ')} {self.score:.2f}"

    def to_json(self) -> dict[str, Any]:
        return {
            "verb": self.verb,
            "object": self.object,
            "score": round(self.score, 4),
            "human_box": [round(v, 2) for v in self.human_box],
            "object_box": None if self.object_box is None else [round(v, 2) for v in self.object_box],
            "teacher": None if self.teacher is None else round(self.teacher, 4),
        }


@dataclass(frozen=True)
class PredictSettings:
    """What is kept: the ``top_k`` best triplets of an image scoring at least ``threshold``, after
    triplet NMS at ``nms_threshold`` (``TripletNms``: among triplets of one verb and object, one
    whose ``IoU_h * IoU_o ** 0.5`` with a better one exceeds it is dropped; 1 = no NMS); the
    teacher rejects a triplet whose ``match_prob`` is below ``teacher_threshold``."""

    threshold: float = DEFAULT_THRESHOLD
    top_k: int = DEFAULT_TOP_K
    teacher_threshold: float = DEFAULT_TEACHER_THRESHOLD
    nms_threshold: float = DEFAULT_NMS_THRESHOLD

    def __post_init__(self) -> None:
        for name in ("threshold", "teacher_threshold", "nms_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise PredictError(f"{name.replace('_', '-')} = {value}: expected a probability in 0..1")
        if self.top_k < 1:
            raise PredictError(f"top = {self.top_k}: expected at least 1 triplet per image")


# -- the model ---------------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself, or ``path/checkpoint.pth`` for a run directory; a clear error otherwise."""
    if path.is_dir():
        inside = path / CHECKPOINT_NAME
        if inside.is_file():
            return inside
        raise CheckpointError(
            f"checkpoint {path} is a directory without {CHECKPOINT_NAME}: predict needs the "
            "checkpoint.pth that `python -m student train` writes (a teacher model directory is not one)"
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


class Predictor:
    """A student model and its test transform: image -> triplets in original pixels."""

    def __init__(
        self,
        model: HOIDetector,
        config: TrainConfig,
        device: torch.device,
        *,
        settings: PredictSettings | None = None,
        correspondence: np.ndarray | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.device = device
        self.settings = settings or PredictSettings()
        self.correspondence = correspondence
        self.transforms = build_test_transforms(config)
        self.amp: AmpSettings = build_amp(config, device)[0]
        self.nms = TripletNms(threshold=self.settings.nms_threshold)
        self.verbs = verbs_of(config.data.dataset)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str = "auto", settings: PredictSettings | None = None
    ) -> Predictor:
        """The model of a ``train`` checkpoint (file or run directory) on ``device`` (auto | cpu | cuda[:N]).

        Raises ``CheckpointError`` naming the file when it is missing, not a student training
        checkpoint, lacks the model config, or holds weights that do not fit that config.
        """
        path = resolve_checkpoint(Path(path))
        checkpoint = load_checkpoint(path)
        raw = checkpoint["config"]
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
            raise CheckpointError(f"{path}: the checkpoint's config has no model section (config.model)")
        try:
            config = config_from_dict(raw)
        except ConfigError as error:
            raise CheckpointError(f"{path}: the checkpoint's config is not valid: {error}") from None
        model = HOIDetector(config.model)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise CheckpointError(
                f"{path}: the model weights do not fit the checkpoint's config.model: {error}"
            ) from None
        return cls(
            model, config, resolve_device(device), settings=settings, correspondence=_correspondence(config, path)
        )

    @torch.no_grad()
    def predict(self, image: Image.Image) -> list[Triplet]:
        """The kept triplets of ``image`` (any PIL mode), best first, boxes in its own pixels."""
        from student.data.collate import collate_fn

        rgb = image.convert("RGB")
        empty = torch.zeros(0, 4)
        target = {"sub_boxes": empty, "obj_boxes": empty, "has_object": torch.zeros(0, dtype=torch.bool)}
        tensor, target = self.transforms(rgb, target)
        images, masks, _ = collate_fn([(tensor, target)])
        with self.amp.context(self.device):
            outputs = self.model(images.to(self.device), masks.to(self.device))
        entry = postprocess(
            outputs_to_float(outputs),
            [(rgb.height, rgb.width)],
            dataset=self.config.data.dataset,
            correspondence=self.correspondence,
            top_k=self.settings.top_k,
            nms=self.nms,
            nms_order="nms_first",  # then top_k distinct triplets, not top_k minus duplicates
            vcoco_no_object_role=self.config.eval.vcoco_no_object_role,
        )[0]
        return [t for t in self._triplets(entry) if t.score >= self.settings.threshold]

    def _triplets(self, entry: dict[str, Any]) -> list[Triplet]:
        """A preds.json entry's HOIs as ``Triplet``s, in its order (best first)."""
        boxes = entry["predictions"]
        offset = VERB_ID_OFFSET[self.config.data.dataset]
        triplets = []
        for hoi in entry["hoi_prediction"]:
            obj = None if hoi["object_id"] == NO_OBJECT_ID else boxes[hoi["object_id"]]
            triplets.append(
                Triplet(
                    verb=self.verbs[hoi["category_id"] - offset],
                    object=None if obj is None else OBJECT_NAMES[coco_id_to_index(obj["category_id"])],
                    score=float(hoi["score"]),
                    human_box=tuple(boxes[hoi["subject_id"]]["bbox"]),
                    object_box=None if obj is None else tuple(obj["bbox"]),
                )
            )
        return triplets


def _correspondence(config: TrainConfig, checkpoint: Path) -> np.ndarray | None:
    """The verb x object validity of the checkpoint's dataset: its data's file when it is at hand,
    else HICO-DET's built-in table (V-COCO: none, every pair is kept)."""
    from teacher_server.hoi.annotations import load_correspondence

    path = config.data.path("correspondence")
    if path.is_file():
        return load_correspondence(path, config.data.dataset)
    if config.data.dataset == "hico":
        return hico_correspondence()
    log.info("%s: no %s, so no verb x object filter (V-COCO)", checkpoint, path)
    return None


# -- images ------------------------------------------------------------------------------------


def image_files(sources: Iterable[str | Path]) -> list[Path]:
    """Each source as given, or for a directory its image files (by ``IMAGE_SUFFIXES``), sorted."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PredictError(f"{source}: a directory without image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise PredictError(f"{source}: no such image file or directory")
    return files


def read_image(path: Path) -> tuple[Image.Image, bytes]:
    """The decoded image (RGB) and the file's bytes (what the teacher is sent and keys by digest)."""
    try:
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as error:
        raise PredictError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None
    return image.convert("RGB"), data


# -- the teacher -------------------------------------------------------------------------------


def teacher_match(
    client: TeacherClient, image: bytes, size: tuple[int, int], triplets: Sequence[Triplet]
) -> list[Triplet]:
    """``triplets`` with ``teacher`` set to the match_prob of each one's sentence on its pair.

    ``size``: the image's (height, width).
    A pair is scored on its region (both boxes clipped to the image, as training does; the whole
    image when a box is then too small: ``student.teacher.scores.pair_region``); one request
    item per distinct region. A triplet without sentence (``no_interaction``) keeps None.
    """
    views: dict[Region | None, list[str]] = {}
    keys: list[tuple[Region | None, str] | None] = []
    for triplet in triplets:
        sentence = triplet.sentence()
        if sentence is None:
            keys.append(None)
            continue
        region = None if triplet.object_box is None else pair_region((*triplet.human_box, *triplet.object_box), size)
        sentences = views.setdefault(region, [])
        if sentence not in sentences:
            sentences.append(sentence)
        keys.append((region, sentence))
    if not views:
        return list(triplets)
    regions = list(views)
    scores = client.score([image] * len(regions), [views[r] for r in regions], regions=regions)
    probability = {
        (region, sentence): score.match_prob
        for region, row in zip(regions, scores, strict=True)
        for sentence, score in zip(views[region], row, strict=True)
    }
    return [
        triplet if key is None else replace(triplet, teacher=float(probability[key]))
        for triplet, key in zip(triplets, keys, strict=True)
    ]


# -- pictures and the JSON document ------------------------------------------------------------


def pair_drawings(triplets: Sequence[Triplet], teacher_threshold: float) -> list[PairDrawing]:
    """One ``PairDrawing`` per distinct (human box, object box), in order of its best triplet.

    Its label has a line per triplet (``ride horse 0.91``), each followed, when the teacher was
    asked, by a line ``teacher 0.87``, crossed when the teacher rejects the triplet
    (``match_prob < teacher_threshold``). The pair is drawn as rejected (grey, dashed) when the
    teacher rejects every triplet of it that it was asked about.
    """
    groups: dict[tuple[Box, Box | None], list[Triplet]] = {}
    for triplet in triplets:
        groups.setdefault((triplet.human_box, triplet.object_box), []).append(triplet)
    drawings = []
    for (human, obj), members in groups.items():
        lines: list[LabelLine] = []
        verdicts = []
        for triplet in members:
            lines.append(LabelLine(triplet.label()))
            if triplet.teacher is not None:
                rejected = triplet.teacher < teacher_threshold
                verdicts.append(rejected)
                lines.append(LabelLine(f"teacher {triplet.teacher:.2f}", crossed=rejected))
        drawings.append(PairDrawing(human, obj, tuple(lines), rejected=bool(verdicts) and all(verdicts)))
    return drawings


def picture_paths(files: Sequence[Path], out_dir: Path) -> list[Path]:
    """``out_dir/<stem>.png`` for each file; a repeated stem gets ``-2``, ``-3``... (never overwrites a sibling)."""
    used: set[str] = set()
    paths = []
    for file in files:
        name, count = file.stem, 1
        while name in used:
            count += 1
            name = f"{file.stem}-{count}"
        used.add(name)
        paths.append(out_dir / f"{name}.png")
    return paths


@dataclass(frozen=True)
class ImagePrediction:
    """What ``predict_files`` did with one image file: its picture and its kept triplets."""

    file: Path
    picture: Path
    triplets: tuple[Triplet, ...]


def predictions_document(results: Sequence[ImagePrediction]) -> dict[str, Any]:
    """``{"images": [{"file", "picture", "triplets": [...]}]}``: the document ``PREDICTIONS_SCHEMA`` describes."""
    return {
        "images": [
            {"file": str(r.file), "picture": str(r.picture), "triplets": [t.to_json() for t in r.triplets]}
            for r in results
        ]
    }


def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    out_dir: Path,
    *,
    teacher: TeacherClient | None = None,
    on_image: Callable[[ImagePrediction], None] | None = None,
) -> list[ImagePrediction]:
    """Predict, (with ``teacher``) judge and draw every file, in order.

    Pictures go to ``picture_paths(files, out_dir)``. ``on_image`` is called after each image
    (the command's progress bar). Stops at the first unreadable image with a ``PredictError``
    naming it (the pictures of the images before it are written).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PredictError(f"--out {out_dir}: cannot create the directory ({error})") from None
    results = []
    for file, picture in zip(files, picture_paths(files, out_dir), strict=True):
        image, data = read_image(file)
        triplets = predictor.predict(image)
        if teacher is not None and triplets:
            triplets = teacher_match(teacher, data, (image.height, image.width), triplets)
        drawn = draw_pairs(image, pair_drawings(triplets, predictor.settings.teacher_threshold))
        try:
            drawn.save(picture, format="PNG")
        except OSError as error:
            raise PredictError(f"{picture}: cannot write the picture ({error})") from None
        result = ImagePrediction(file, picture, tuple(triplets))
        results.append(result)
        if on_image is not None:
            on_image(result)
    return results
