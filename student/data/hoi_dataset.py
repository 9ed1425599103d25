"""HICO-DET and V-COCO as a ``torch.utils.data.Dataset`` of (image, target) samples.

A sample's target is the per-image dict of ``docs/contracts.md``: ``obj_labels (P,)``,
``verb_labels (P, V)`` multi-hot (HOIs of the same (subject, object) boxes merged into one pair),
``verb_known (P,)`` bool (False for a pair of ``pairs_without_verbs``: its verbs are unknown, not negative),
``sub_boxes``/``obj_boxes (P, 4)`` cxcywh normalised, ``size``/``orig_size (2,)`` (h, w),
``image_id`` (index into the annotation list), ``file_name`` and ``image_digest`` (SHA-256 of the
original file bytes: the teacher scores the un-augmented original), and for the teacher's pair
regions ``pair_regions_orig (P, 8)`` (each pair's human and object box, xyxy pixels of the
original file, untouched by augmentation) and ``frame_affine (4,)`` (original pixels -> the
augmented frame, see ``student.data.transforms``).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from teacher_server.hoi.annotations import (
    BoxFixes,
    ImageAnnotation,
    annotation_in_image,
    dataset_spec,
    read_annotations,
)
from teacher_server.hoi.classes import NO_OBJECT_INDEX
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.errors import DatasetError
from student.data.transforms import Transform, identity_affine, make_transforms

TruncatePolicy = Literal["warn", "ignore", "error"]


class HOIDataset(Dataset):
    """Images and HOI targets of one annotation file.

    Args:
        root_images: directory the ``file_name`` entries are relative to.
        annotation_file: ``trainval_hico.json`` / ``test_hico.json`` / V-COCO equivalents.
        dataset: ``"hico"`` (117 verbs) or ``"vcoco"`` (29 verbs, pairs without object).
        transforms: ``(PIL image, target) -> (tensor, target)``, see ``student.data.transforms``;
            default: no resize, just tensor + ImageNet normalisation + cxcywh boxes.
        max_pairs: keep at most this many merged pairs per image (e.g. the number of queries);
            None keeps all. Which images are cut is known at construction and reported per
            ``on_truncate``: "warn" (one warning), "ignore", or "error" (DatasetError).
        check_images: read every image header at construction: missing files and boxes outside
            their image raise DatasetError before training starts (otherwise on first access).
        box_tolerance: pixels a box may stick out of its image before ``box_policy`` applies.
        box_policy: a box further out of its image, or inverted: ``error`` (DatasetError),
            ``clamp`` (clipped into the image, as the reference codebases do; dropped when
            clipping cannot mend it) or ``drop``; a dropped box takes its HOIs along. What was
            fixed is ``box_fixes``, reported in one warning.
        skip_empty: leave out images without any HOI (``image_id`` keeps the file's indices).

    Raises:
        DatasetError: problems in the annotation file or images, naming file, entry and field.
    """

    def __init__(
        self,
        root_images: str | Path,
        annotation_file: str | Path,
        dataset: Literal["hico", "vcoco"] = "hico",
        transforms: Transform | None = None,
        *,
        max_pairs: int | None = None,
        on_truncate: TruncatePolicy = "warn",
        check_images: bool = True,
        box_tolerance: float = 1.0,
        box_policy: str = "error",
        skip_empty: bool = False,
    ) -> None:
        self.spec = dataset_spec(dataset)
        self.root_images = Path(root_images)
        self.annotation_file = Path(annotation_file)
        if not self.root_images.is_dir():
            raise DatasetError(f"image directory {self.root_images} does not exist")
        if on_truncate not in ("warn", "ignore", "error"):
            raise ValueError(f"on_truncate must be 'warn', 'ignore' or 'error', got {on_truncate!r}")
        self.transforms = transforms if transforms is not None else make_transforms("test", scales=None)
        self.max_pairs = max_pairs
        self.box_tolerance = box_tolerance
        self.box_policy = box_policy
        loaded = read_annotations(
            self.annotation_file,
            dataset,
            image_root=self.root_images if check_images else None,
            box_tolerance=box_tolerance,
            box_policy=box_policy,
        )
        #: Every entry of the file, validated, in file order (``annotations[image_id]``).
        self.annotations: list[ImageAnnotation] = loaded.images
        #: What ``box_policy`` clamped and dropped (known for every image when ``check_images``).
        self.box_fixes: BoxFixes = loaded.fixes
        self.indices = [a.index for a in self.annotations if a.has_pairs or not skip_empty]
        if self.box_fixes.any:
            warnings.warn(self.box_fixes.summary(), stacklevel=2)
        self._report_truncation(on_truncate)

    # -- introspection ---------------------------------------------------------------------------

    @property
    def verbs(self) -> tuple[str, ...]:
        return self.spec.verbs

    @property
    def num_verbs(self) -> int:
        return self.spec.num_verbs

    def raw_annotation(self, image_id: int) -> dict[str, Any]:
        """The JSON entry of ``image_id`` exactly as in the file (what the evaluator works from)."""
        return dict(self.annotations[image_id].raw)

    def _report_truncation(self, policy: TruncatePolicy) -> None:
        if self.max_pairs is None or policy == "ignore":
            return
        over = [(i, len(self.annotations[i].pairs())) for i in self.indices]
        over = [(i, n) for i, n in over if n > self.max_pairs]
        if not over:
            return
        worst = max(n for _, n in over)
        examples = ", ".join(f"{self.annotations[i].file_name} ({n})" for i, n in over[:3])
        message = (
            f"{self.annotation_file}: {len(over)} image(s) have more than max_pairs={self.max_pairs} HOI "
            f"pairs (up to {worst}; e.g. {examples}); only their first {self.max_pairs} pairs are used"
        )
        if policy == "error":
            raise DatasetError(message + ": raise max_pairs or pass on_truncate='warn'")
        warnings.warn(message, stacklevel=3)

    # -- samples ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.indices)

    def read_image_bytes(self, image_id: int) -> bytes:
        """The original file bytes of ``image_id`` (what the teacher scores and the digest hashes)."""
        annotation = self.annotations[image_id]
        path = self.root_images / annotation.file_name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DatasetError(
                f"{self.annotation_file}: entry {image_id} ({annotation.file_name}): file_name: image file "
                f"{path} does not exist"
            ) from None

    def image_digest(self, image_id: int) -> str:
        """SHA-256 hex of the original image file of ``image_id``."""
        return image_digest(self.read_image_bytes(image_id))

    def __getitem__(self, idx: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.indices[idx]
        annotation = self.annotations[image_id]
        data = self.read_image_bytes(image_id)
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise DatasetError(
                f"{self.annotation_file}: entry {image_id} ({annotation.file_name}): file_name: "
                f"{self.root_images / annotation.file_name} is not a readable image: {error}"
            ) from None
        orig_size = (image.height, image.width)
        if annotation.image_size != orig_size:  # images not checked up front: check the boxes now
            annotation = annotation_in_image(
                annotation,
                orig_size,
                self.spec.name,
                source=str(self.annotation_file),
                box_tolerance=self.box_tolerance,
                box_policy=self.box_policy,
            )
        target = self.build_target(annotation, annotation.boxes, orig_size)
        target.update(image_id=image_id, file_name=annotation.file_name, image_digest=image_digest(data))
        return self.transforms(image, target)

    def build_target(
        self, annotation: ImageAnnotation, boxes: np.ndarray, orig_size: tuple[int, int]
    ) -> dict[str, Any]:
        """Merged pairs of ``annotation`` as absolute-xyxy tensors, ready for the transforms.

        ``boxes``: (N, 4) xyxy pixels of the image's annotated boxes.
        """
        pairs = annotation.pairs()
        if self.max_pairs is not None:
            pairs = pairs[: self.max_pairs]
        count = len(pairs)
        sub_boxes = torch.zeros(count, 4)
        obj_boxes = torch.zeros(count, 4)
        has_object = torch.zeros(count, dtype=torch.bool)
        obj_labels = torch.full((count,), NO_OBJECT_INDEX, dtype=torch.long)
        verb_labels = torch.zeros(count, self.num_verbs)
        verb_known = torch.ones(count, dtype=torch.bool)
        box_tensor = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))
        for p, pair in enumerate(pairs):
            sub_boxes[p] = box_tensor[pair.subject]
            if pair.object >= 0:
                obj_boxes[p] = box_tensor[pair.object]
                has_object[p] = True
                obj_labels[p] = int(annotation.labels[pair.object])
            verb_labels[p, list(pair.verbs)] = 1.0
            verb_known[p] = pair.verbs_known
        size = torch.tensor(orig_size)
        # The original-pixel boxes travel as one more per-pair row (filtered with the pairs when a
        # crop drops some), so the teacher's pair regions stay aligned with obj_labels.
        pair_regions = torch.cat((sub_boxes, obj_boxes), dim=1)
        return {
            "sub_boxes": sub_boxes,
            "obj_boxes": obj_boxes,
            "has_object": has_object,
            "obj_labels": obj_labels,
            "verb_labels": verb_labels,
            "verb_known": verb_known,
            "size": size,
            "orig_size": size.clone(),
            "pair_regions_orig": pair_regions,
            "frame_affine": identity_affine(),
        }
