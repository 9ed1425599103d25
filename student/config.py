"""Typed training configuration: YAML recipe files plus ``key.sub=value`` overrides.

A run is fully described by one ``TrainConfig``::

    config = load_config("student/configs/hico.yaml", ["optim.lr=2e-4", "schedule.epochs=90"])

Sections: ``data``, ``model`` (the detector's own ``StudentModelConfig``), ``loss`` (matcher
costs and loss weights), ``distill`` (the ITM term), ``optim``, ``schedule``, ``teacher``,
``eval`` and ``run``, plus the top-level ``pretrained`` (a DETR COCO checkpoint to start from) and
``calibrate_bn_images`` (data-dependent statistics for a from-scratch CNN). Missing keys take the
defaults below; unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the
full key (``optim.lr``), the value and what would be valid. The sections are pydantic models
(``student.validation``); ``to_dict`` / ``config_from_dict`` round-trip a config through the
plain dict a checkpoint stores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from student.data.transforms import DETR_SCALES
from student.losses import DistillSettings, LossError, LossWeights
from student.losses.matcher import HungarianMatcher
from student.model.config import StudentModelConfig
from student.validation import ConfigSection, Invalid, Number

DatasetName = Literal["hico", "vcoco"]
PromptVariant = Literal["full", "verb", "object"]
NUM_VERBS = {"hico": 117, "vcoco": 29}
SERVICE_SCHEMES = ("grpc://", "grpcs://", "triton://")

# Bounded field types (pydantic checks them; the error names the bound).
Positive = Annotated[Number, Field(gt=0)]
NonNegative = Annotated[Number, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class ConfigError(ValueError):
    """A training configuration (file, override or value) is malformed; the message names the key."""


class Section(ConfigSection):
    """A section of ``TrainConfig``: its errors are ``ConfigError``."""

    error_type: ClassVar[type[Exception]] = ConfigError


class DataConfig(Section):
    """Where the dataset lives and how training images are augmented.

    Paths are relative to ``root`` unless absolute. The layout defaults are HICO-DET's as the
    DETR-line codebases ship it (``images/train2015``, ``annotations/trainval_hico.json``, ...).
    """

    section: ClassVar[str] = "data"

    dataset: DatasetName = "hico"
    root: str = "data/hico_20160224_det"
    train_images: str = "images/train2015"
    train_annotations: str = "annotations/trainval_hico.json"
    test_images: str = "images/test2015"
    test_annotations: str = "annotations/test_hico.json"
    correspondence: str = "annotations/corre_hico.npy"
    scales: Annotated[list[PositiveInt], Field(min_length=1)] = Field(default_factory=lambda: list(DETR_SCALES))
    max_size: PositiveInt = 1333  # longer side cap
    test_scale: PositiveInt | None = None  # test: shorter side; None = max(scales)
    crop: bool = True  # DETR's random resize-crop half of the time
    color_jitter: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    max_pairs: PositiveInt | None = None  # pairs kept per image; None = the number of queries
    num_workers: NonNegativeInt = 2
    # A box outside its image (beyond 1 px) or inverted: error | clamp (clipped into the image, as
    # the reference codebases' loaders do; dropped when that cannot mend it) | drop. A dropped box
    # takes its HOIs along; a warning counts what was fixed in each file.
    box_policy: Literal["error", "clamp", "drop"] = "clamp"

    @model_validator(mode="after")
    def _sizes_fit(self) -> DataConfig:
        if self.max_size < max(self.scales):
            raise Invalid(f"got {self.max_size}, expected >= max(scales) = {max(self.scales)}", "max_size")
        return self

    def path(self, name: str) -> Path:
        """An absolute-or-root-relative path field (``train_images``, ...) resolved against ``root``."""
        value = Path(getattr(self, name)).expanduser()
        return value if value.is_absolute() else Path(self.root).expanduser() / value


class LossConfig(Section):
    """Hungarian matcher costs and HOI loss weights (QPIC's and the paper's defaults)."""

    section: ClassVar[str] = "loss"

    cost_obj_class: NonNegative = 1.0
    cost_verb_class: NonNegative = 1.0
    cost_bbox: NonNegative = 2.5
    cost_giou: NonNegative = 1.0
    bbox: NonNegative = 2.5
    giou: NonNegative = 1.0
    obj_class: NonNegative = 1.0
    verb_class: NonNegative = 1.0
    eos_coef: Annotated[Number, Field(ge=0, le=1)] = 0.1  # weight of the no-object class in the object CE
    aux_loss: bool = True  # losses on every decoder layer, not just the last

    def matcher(self) -> HungarianMatcher:
        """The Hungarian matcher with these costs."""
        return HungarianMatcher(self.cost_obj_class, self.cost_verb_class, self.cost_bbox, self.cost_giou)

    def weights(self) -> LossWeights:
        """The HOI criterion's term weights."""
        return LossWeights(bbox=self.bbox, giou=self.giou, obj_class=self.obj_class, verb_class=self.verb_class)


class DistillConfig(Section):
    """The ITM distillation term (``docs/distillation.md``); it is on when a teacher is configured."""

    section: ClassVar[str] = "distill"

    variant: Literal["kl", "margin", "soft"] = "soft"
    lambda_itm: Number = 1.0
    tau: Number = 1.0
    alpha: Number = 1.0
    top_k: int = 8
    score_threshold: Number = 0.2
    confidence: Number = 0.8
    prompt_variant: PromptVariant = "full"

    @model_validator(mode="after")
    def _valid_settings(self) -> DistillConfig:
        # DistillSettings (the loss's own settings) holds the ranges; one place says what is valid.
        try:
            self.settings()
        except LossError as error:
            field, _, message = str(error).removeprefix("DistillSettings.").partition(": ")
            raise Invalid(message, field) from None
        return self

    def settings(self) -> DistillSettings:
        """The loss's ``DistillSettings`` of this section."""
        return DistillSettings(
            variant=self.variant,
            lambda_itm=self.lambda_itm,
            tau=self.tau,
            alpha=self.alpha,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            confidence=self.confidence,
        )


class OptimConfig(Section):
    """AdamW (two learning rates), gradient clipping, mixed precision."""

    section: ClassVar[str] = "optim"

    lr: Positive = 1e-4
    backbone_lr: NonNegative = 1e-5
    weight_decay: NonNegative = 1e-4
    batch_size: PositiveInt = 4  # per process
    clip_max_norm: NonNegative = 0.1  # 0 disables clipping
    amp: bool = True  # autocast + (for fp16) a grad scaler; only ever used on CUDA
    # auto: bf16 where the GPU has bf16 tensor cores (compute capability >= 8.0), else fp16.
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"


class ScheduleConfig(Section):
    """Epochs, the step learning-rate drop, and an optional cap on optimiser steps."""

    section: ClassVar[str] = "schedule"

    epochs: PositiveInt = 100
    lr_drop: list[PositiveInt] = Field(default_factory=lambda: [60])  # epochs after which lr *= lr_gamma
    lr_gamma: Annotated[Number, Field(gt=0, le=1)] = 0.1
    max_steps: PositiveInt | None = None  # stop after this many optimiser steps in total (smoke runs, tests)


class TeacherConfig(Section):
    """Which ITM teacher scores the sentences, and what to do when it cannot.

    ``source``: ``none`` (no distillation), ``local`` (an in-process engine loading ``model``), or
    teacher service endpoints: ``grpc://host:port`` / ``grpcs://host:port`` / ``triton://host:port``,
    several separated by commas (round robin with failover). ``on_error``: ``skip`` drops the ITM
    term of a batch whose scores failed or came later than ``deadline_s`` (and counts it), ``fail``
    stops training. A service's scores are fetched ``prefetch`` batches ahead in a background
    thread (0: inside the step), and ``redis_url`` is read before any RPC (the cache the service
    fills; ``student prewarm`` fills it ahead of training). See ``docs/distributed.md``.
    """

    section: ClassVar[str] = "teacher"

    source: str = "none"
    model: str = "Salesforce/blip-itm-base-coco"  # local: hub id (from the local cache) or directory
    device: str = "auto"
    dtype: str = "auto"
    itm_start_token: Literal["cls", "enc"] = "cls"
    timeout_s: Positive = 60.0
    on_error: Literal["skip", "fail"] = "skip"
    token_env: str = "HOIDISTILL_AUTH_TOKEN"  # gRPC: bearer token read from this variable, if set
    memo_entries: NonNegativeInt = 2_000_000  # in-process (view, sentence) -> score memo
    redis_url: str | None = None  # service only: read-through of its score cache before any RPC
    prefetch: NonNegativeInt = 2  # service only: batches whose scores are requested ahead; 0 = in the step
    deadline_s: Positive = 10.0  # service only: longest wait for a batch's scores (then on_error)
    # What a sentence is scored on: image (the whole original image) | pair (each ground-truth
    # pair's human + object boxes in original pixels; margin: the predicted boxes). A pair without
    # a usable region falls back to the whole image. See docs/distillation.md.
    region: Literal["image", "pair"] = "image"

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source not in ("none", "local") and not _is_service(source):
            raise Invalid(
                f"got {source!r}, expected 'none', 'local', 'grpc://host:port' or 'triton://host:port' "
                "(several endpoints: comma-separated)"
            )
        return source

    @property
    def enabled(self) -> bool:
        """A teacher is configured (the ITM term is on)."""
        return self.source != "none"

    @property
    def is_service(self) -> bool:
        """A remote teacher: every comma-separated endpoint is grpc://, grpcs:// or triton://."""
        return _is_service(self.source)


def _is_service(source: str) -> bool:
    return all(part.strip().startswith(SERVICE_SCHEMES) for part in source.split(","))


class EvalConfig(Section):
    """Post-processing of predictions for evaluation."""

    section: ClassVar[str] = "eval"

    top_k: PositiveInt = 100  # triplets kept per image (the HICO-DET protocol's 100)
    nms_threshold: Annotated[Number, Field(ge=0, le=1)] | None = None  # triplet NMS; None = off
    # top_k_first: keep top_k, then triplet NMS among them (the reference codebases' order);
    # nms_first: NMS over all candidates, then top_k.
    nms_order: Literal["top_k_first", "nms_first"] = "top_k_first"
    vcoco_no_object_role: bool = True  # V-COCO: emit object-less roles when "no object" wins
    batch_size: PositiveInt = 8


class RunConfig(Section):
    """Where outputs go, seeds, device and logging."""

    section: ClassVar[str] = "run"

    output_dir: str = "runs/student"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: PositiveInt | None = None  # torch CPU threads; None = torch's default
    log_every: PositiveInt = 20  # CSV rows every this many steps
    eval_every: NonNegativeInt = 0  # evaluate on the test split every this many epochs; 0 = only at the end
    eval_at_end: bool = True
    # tqdm bars: true = when stderr is a terminal (a log file gets the log's one line per epoch,
    # not every redraw of a bar); always = into a file or pipe too; false = never.
    progress: bool | Literal["always"] = True
    tensorboard: bool = True  # also write TensorBoard event files into output_dir (rank 0)
    tf32: bool = True  # CUDA only: fp32 matrix products and convolutions on TF32 tensor cores

    @field_validator("progress", mode="before")
    @classmethod
    def _known_progress(cls, progress: Any) -> Any:
        # Not 1 or 0 (equal to True and False, but not what the key takes).
        if not (isinstance(progress, bool) or progress == "always"):
            raise Invalid(f"got {progress!r}, expected true, false or always")
        return progress

    def tqdm_progress(self, main: bool = True) -> bool | None:
        """``progress`` as ``teacher_server.logs.show_progress`` takes it (None = on a terminal);
        False off rank 0 (``main`` False): one bar per job, not one per rank."""
        if not main or self.progress is False:
            return False
        return True if self.progress == "always" else None

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise Invalid(f"got {device!r}, expected auto, cpu, cuda or cuda:N")
        return device


class TrainConfig(Section):
    """One training run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: StudentModelConfig = Field(default_factory=StudentModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    pretrained: str | None = None  # DETR COCO checkpoint (detr-r50-e632da11.pth layout) to start from
    # From scratch only: set the frozen batch-norm statistics of the random CNN from this many
    # training images (0 keeps the identity statistics). See builders.calibrate_frozen_batchnorm.
    calibrate_bn_images: NonNegativeInt = 0

    @model_validator(mode="after")
    def _sections_agree(self) -> TrainConfig:
        if self.pretrained and self.calibrate_bn_images:
            raise Invalid(
                "a pretrained backbone keeps its batch-norm statistics: set 0 when pretrained is set",
                "calibrate_bn_images",
            )
        queries = self.model.decoder.num_queries
        if self.data.max_pairs is not None and self.data.max_pairs > queries:
            raise Invalid(
                f"got {self.data.max_pairs}, but model.decoder.num_queries={queries}: "
                "a query matches at most one pair, so the pairs past it would be silently ignored",
                "data.max_pairs",
            )
        expected = NUM_VERBS[self.data.dataset]
        if self.model.num_verbs != expected:
            raise Invalid(
                f"got {self.model.num_verbs}, but data.dataset={self.data.dataset!r} has {expected} verbs",
                "model.num_verbs",
            )
        return self

    def to_yaml(self) -> str:
        """The config as a YAML recipe (``load_config`` reads it back)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading ----------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (None: all defaults), apply ``key.sub=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(loaded).__name__}")
        raw = loaded or {}
    apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b=value`` entries into the nested dict ``raw`` (in place); values are parsed as YAML."""
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {override!r}: expected key.sub=value, e.g. optim.lr=2e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: value is not valid YAML ({error})") from None
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build and validate a ``TrainConfig`` from a nested dict (e.g. ``TrainConfig.to_dict()``)."""
    return TrainConfig.from_dict(data)
