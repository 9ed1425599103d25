"""``FinetuneSettings``: how to fine-tune, checked on construction (errors name the field and range)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from teacher_server.errors import FinetuneError
from teacher_server.hoi.prompts import VARIANTS
from teacher_server.hoi.region import REGION_POLICIES

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
#: What a training example shows BLIP: the whole image, or one pair's region under a policy.
REGION_MODES = ("image", *REGION_POLICIES)
_CHOICES: dict[str, tuple[str, ...]] = {
    "region": REGION_MODES,
    "schedule": SCHEDULES,
    "prompt_variant": tuple(VARIANTS),
    "itm_start_token": ("cls", "enc"),
    "precision": PRECISIONS,
}
#: Settings that change how a run executes but not what it computes: a resume may change them.
RESUME_FREE_SETTINGS = frozenset({"device", "num_threads", "checkpoint_every", "max_steps", "image_cache_mb"})
#: Settings added after runs were written without them, and the value such a run had in effect
#: (a run on whole images draws no other-pair negative and renders no region).
LATER_SETTINGS: dict[str, Any] = {"region": "image", "region_margin": 0.1, "region_dim": 0.8, "other_pair_negatives": 2}


def _count(default: int, low: int, high: int) -> Any:
    # strict: a float (2.5, or 2.0) or a bool is not a count.
    return Field(default, ge=low, le=high, strict=True)


def _number(default: float, *, high: float, low: float = 0.0, low_open: bool = False) -> Any:
    # strict: an int is a number, a bool or a string is not.
    return Field(default, gt=low, le=high, strict=True) if low_open else Field(default, ge=low, le=high, strict=True)


class FinetuneSettings(BaseModel):
    """How to fine-tune; every field is checked on construction, errors name the field and range.

    The defaults suit BLIP-base on a GPU; a tiny model wants ``lr=3e-4`` and few warm-up steps.
    Raises ``FinetuneError`` (``name = value is outside [low, high]``, one line per problem).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    epochs: int = _count(3, 1, 10_000)
    batch_images: int = _count(16, 1, 100_000)
    """Images per optimiser step; every positive and sampled negative of each comes along."""
    lr: float = _number(2e-5, high=1.0, low_open=True)
    weight_decay: float = _number(0.05, high=10.0)
    warmup_steps: int = _count(100, 0, 10_000_000)
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    schedule: str = "cosine"
    """After warm-up: ``cosine`` decay to 0 at the last step, or ``constant``."""
    grad_clip: float = _number(1.0, high=1e6)
    """Max global gradient norm; 0 disables clipping."""
    same_object_negatives: int = _count(2, 0, 64)
    """(a) per positive: valid verbs of its object that the image does not have."""
    seen_verb_negatives: int = _count(1, 0, 64)
    """(a') per positive: verbs of its object that the annotation file shows elsewhere (a positive of
    another image) but this image lacks: the confusable ones, which a uniform draw over all valid
    verbs rarely picks when the object has many verbs the data never shows."""
    other_object_negatives: int = _count(1, 0, 64)
    """(b) per positive: sentences about objects of the dataset that are not in the image."""
    swap_negatives: int = _count(1, 0, 64)
    """(c) per positive: other images' positives from the batch that are not positives here."""
    other_pair_negatives: int = _count(2, 0, 64)
    """(d) regions only, per pair: verbs another pair of the same image has and this pair lacks (the
    other person's "hold horse" beside this one's "ride horse"): true of the image, false of the pair."""
    region: str = "image"
    """What an example shows BLIP: ``image`` (whole images, one example per image), or one example
    per annotated pair, its region rendered as the engine renders it: ``crop`` or ``mask``."""
    region_margin: float = _number(0.1, high=2.0)
    """``crop``: grow the union box by this share of its size on each side (the engine's ``region_margin``)."""
    region_dim: float = _number(0.8, high=1.0)
    """``mask``: blend pixels outside both boxes towards grey by this much (the engine's ``region_dim``)."""
    prompt_variant: str = "full"
    itm_start_token: str = "cls"
    seed: int = _count(0, 0, 2**63 - 1)
    device: str = "auto"
    precision: str = "auto"
    """``auto``: bf16 autocast on CUDA (fp16 + grad scaling where bf16 is unsupported), fp32 on CPU."""
    num_threads: int = _count(0, 0, 1024)
    """torch CPU threads; 0 leaves torch's default."""
    checkpoint_every: int = _count(500, 0, 10_000_000)
    """Optimiser steps between checkpoints (also written at every epoch end); 0 = epoch ends only."""
    max_steps: int | None = Field(None, ge=1, le=10_000_000_000, strict=True)
    """Stop after this many steps in total (the schedule still spans all epochs); resume later."""
    image_cache_mb: float = _number(4096.0, high=1e9)
    """Preprocessed images kept in memory; past it, images are decoded again at each use."""

    def __init__(self, **values: Any) -> None:
        """Validate ``values``; ``FinetuneError`` names each bad field, its value and its range."""
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise FinetuneError("; ".join(_describe(problem) for problem in error.errors())) from None

    @field_validator(*_CHOICES)
    @classmethod
    def _one_of(cls, value: str, info: Any) -> str:
        choices = _CHOICES[info.field_name]
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return value

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for the checkpoint and ``finetune.json``)."""
        return self.model_dump()

    def differences(self, other: Mapping[str, Any], where: str = "the checkpoint") -> list[str]:
        """``name: this vs other`` for every setting (except the resume-free ones) that differs.

        A setting ``other`` predates (``LATER_SETTINGS``) counts with the value it had in effect.
        """
        mine = self.to_dict()
        theirs = {**LATER_SETTINGS, **other}
        return [
            f"{name}: {mine[name]!r} here vs {theirs.get(name)!r} in {where}"
            for name in mine
            if name not in RESUME_FREE_SETTINGS and mine[name] != theirs.get(name)
        ]

    def engine_region(self) -> dict[str, Any]:
        """The ``EngineSettings`` region fields that render this run's regions (empty for ``image``)."""
        if self.region == "image":
            return {}
        return {"region_policy": self.region, "region_margin": self.region_margin, "region_dim": self.region_dim}


def _range(name: str) -> str:
    """``[low, high]`` (``(low`` when the low end is open) of a field's bounds."""
    metadata = FinetuneSettings.model_fields[name].metadata
    low = next((f"[{m.ge}" for m in metadata if isinstance(m, Ge)), None) or next(
        (f"({m.gt}" for m in metadata if isinstance(m, Gt)), "(-inf"
    )
    high = next((f"{m.le}]" for m in metadata if isinstance(m, Le)), "inf)")
    return f"{low}, {high}"


def _describe(problem: Mapping[str, Any]) -> str:
    """One pydantic problem in the project's words: ``name = value`` and what was expected."""
    name = str(problem["loc"][0]) if problem["loc"] else "settings"
    value, kind = problem["input"], problem["type"]
    if kind == "extra_forbidden":
        return f"{name}: not a setting (the settings are {', '.join(FinetuneSettings.model_fields)})"
    if kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        return f"{name} = {value!r} is outside {_range(name)}"
    if kind == "value_error":  # our validators' own words
        return f"{name} = {value!r}, {problem['ctx']['error']}"
    if kind.startswith("int"):
        return f"{name} = {value!r}, expected an integer in {_range(name)}"
    if kind.startswith("float") or kind == "finite_number":
        return f"{name} = {value!r}, expected a number in {_range(name)}"
    return f"{name} = {value!r}: {problem['msg']}"
