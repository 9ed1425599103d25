"""``FinetuneSettings``: how to fine-tune, checked on construction (errors name the field and range)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from teacher_server.errors import FinetuneError
from teacher_server.hoi.prompts import VARIANTS

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
    """(a) per positive: valid verbs of its object that the image does not have."""
    seen_verb_negatives: int = 1
    """(a') per positive: verbs of its object that the annotation file shows elsewhere (a positive of
    another image) but this image lacks: the confusable ones, which a uniform draw over all valid
    verbs rarely picks when the object has many verbs the data never shows."""
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
