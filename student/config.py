"""Typed training configuration: YAML recipe files plus ``key.sub=value`` overrides.

A run is fully described by one ``TrainConfig``::

    config = load_config("student/configs/hico.yaml", ["optim.lr=2e-4", "schedule.epochs=90"])

Sections: ``data``, ``model`` (the detector's own ``StudentModelConfig``), ``loss`` (matcher
costs and loss weights), ``distill`` (the ITM term), ``optim``, ``schedule``, ``teacher``,
``eval`` and ``run``, plus the top-level ``pretrained`` (a DETR COCO checkpoint to start from) and
``calibrate_bn_images`` (data-dependent statistics for a from-scratch CNN). Missing
keys take the defaults below; unknown keys, wrong types and out-of-range values raise
``ConfigError`` naming the full key (``optim.lr``), the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from student.data.transforms import DETR_SCALES
from student.losses import DistillSettings, LossError, LossWeights
from student.losses.matcher import HungarianMatcher
from student.model.config import ModelError, StudentModelConfig

DatasetName = Literal["hico", "vcoco"]
PromptVariant = Literal["full", "verb", "object"]


class ConfigError(ValueError):
    """A training configuration (file, override or value) is malformed; the message names the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DataConfig:
    """Where the dataset lives and how training images are augmented.

    Paths are relative to ``root`` unless absolute. The layout defaults are HICO-DET's as the
    DETR-line codebases ship it (``images/train2015``, ``annotations/trainval_hico.json``, ...).
    """

    dataset: DatasetName = "hico"
    root: str = "data/hico_20160224_det"
    train_images: str = "images/train2015"
    train_annotations: str = "annotations/trainval_hico.json"
    test_images: str = "images/test2015"
    test_annotations: str = "annotations/test_hico.json"
    correspondence: str = "annotations/corre_hico.npy"
    scales: list[int] = field(default_factory=lambda: list(DETR_SCALES))  # train: shorter side, random
    max_size: int = 1333  # longer side cap
    test_scale: int | None = None  # test: shorter side; None = max(scales)
    crop: bool = True  # DETR's random resize-crop half of the time
    color_jitter: float = 0.0
    max_pairs: int | None = None  # pairs kept per image; None = the number of queries
    num_workers: int = 2
    # A box outside its image (beyond 1 px) or inverted: error | clamp (clipped into the image, as
    # the reference codebases' loaders do; dropped when that cannot mend it) | drop. A dropped box
    # takes its HOIs along; a warning counts what was fixed in each file.
    box_policy: Literal["error", "clamp", "drop"] = "clamp"

    def __post_init__(self) -> None:
        _require(bool(self.scales), "data.scales", "needs at least one size")
        _require(all(s > 0 for s in self.scales), "data.scales", f"sizes must be > 0, got {self.scales}")
        _require(self.max_size >= max(self.scales), "data.max_size", f"{self.max_size} < max(scales)")
        _require(self.test_scale is None or self.test_scale > 0, "data.test_scale", "must be > 0")
        _require(0 <= self.color_jitter < 1, "data.color_jitter", f"got {self.color_jitter}, expected 0 <= x < 1")
        _require(self.max_pairs is None or self.max_pairs > 0, "data.max_pairs", "must be > 0")
        _require(self.num_workers >= 0, "data.num_workers", f"got {self.num_workers}, expected >= 0")

    def path(self, name: str) -> Path:
        """An absolute-or-root-relative path field (``train_images``, ...) resolved against ``root``."""
        value = Path(getattr(self, name)).expanduser()
        return value if value.is_absolute() else Path(self.root).expanduser() / value


@dataclass
class LossConfig:
    """Hungarian matcher costs and HOI loss weights (QPIC's and the paper's defaults)."""

    cost_obj_class: float = 1.0
    cost_verb_class: float = 1.0
    cost_bbox: float = 2.5
    cost_giou: float = 1.0
    bbox: float = 2.5
    giou: float = 1.0
    obj_class: float = 1.0
    verb_class: float = 1.0
    eos_coef: float = 0.1  # weight of the no-object class in the object cross-entropy
    aux_loss: bool = True  # losses on every decoder layer, not just the last

    def __post_init__(self) -> None:
        for name in ("cost_obj_class", "cost_verb_class", "cost_bbox", "cost_giou", "bbox", "giou"):
            _require(getattr(self, name) >= 0, f"loss.{name}", f"got {getattr(self, name)}, expected >= 0")
        for name in ("obj_class", "verb_class"):
            _require(getattr(self, name) >= 0, f"loss.{name}", f"got {getattr(self, name)}, expected >= 0")
        _require(0 <= self.eos_coef <= 1, "loss.eos_coef", f"got {self.eos_coef}, expected 0..1")

    def matcher(self) -> HungarianMatcher:
        return HungarianMatcher(self.cost_obj_class, self.cost_verb_class, self.cost_bbox, self.cost_giou)

    def weights(self) -> LossWeights:
        return LossWeights(bbox=self.bbox, giou=self.giou, obj_class=self.obj_class, verb_class=self.verb_class)


@dataclass
class DistillConfig:
    """The ITM distillation term (``docs/distillation.md``); it is on when a teacher is configured."""

    variant: Literal["kl", "margin", "soft"] = "kl"
    lambda_itm: float = 1.0
    tau: float = 1.0
    alpha: float = 1.0
    top_k: int = 8
    score_threshold: float = 0.2
    confidence: float = 0.7
    prompt_variant: PromptVariant = "full"

    def __post_init__(self) -> None:
        try:
            self.settings()
        except LossError as error:
            raise ConfigError(str(error).replace("DistillSettings.", "distill.")) from None

    def settings(self) -> DistillSettings:
        return DistillSettings(
            variant=self.variant,
            lambda_itm=self.lambda_itm,
            tau=self.tau,
            alpha=self.alpha,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            confidence=self.confidence,
        )


@dataclass
class OptimConfig:
    """AdamW (two learning rates), gradient clipping, mixed precision."""

    lr: float = 1e-4
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-4
    batch_size: int = 4  # per process
    clip_max_norm: float = 0.1  # 0 disables clipping
    amp: bool = True  # autocast + (for fp16) a grad scaler; only ever used on CUDA
    # auto: bf16 where the GPU has bf16 tensor cores (compute capability >= 8.0), else fp16.
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", f"got {self.lr}, expected > 0")
        _require(self.backbone_lr >= 0, "optim.backbone_lr", f"got {self.backbone_lr}, expected >= 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"got {self.weight_decay}, expected >= 0")
        _require(self.batch_size > 0, "optim.batch_size", f"got {self.batch_size}, expected > 0")
        _require(self.clip_max_norm >= 0, "optim.clip_max_norm", f"got {self.clip_max_norm}, expected >= 0")


@dataclass
class ScheduleConfig:
    """Epochs, the step learning-rate drop, and an optional cap on optimiser steps."""

    epochs: int = 100
    lr_drop: list[int] = field(default_factory=lambda: [60])  # epochs after which lr *= lr_gamma
    lr_gamma: float = 0.1
    max_steps: int | None = None  # stop after this many optimiser steps in total (smoke runs, tests)

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "schedule.epochs", f"got {self.epochs}, expected > 0")
        _require(all(e > 0 for e in self.lr_drop), "schedule.lr_drop", f"epochs must be > 0, got {self.lr_drop}")
        _require(0 < self.lr_gamma <= 1, "schedule.lr_gamma", f"got {self.lr_gamma}, expected 0 < x <= 1")
        _require(self.max_steps is None or self.max_steps > 0, "schedule.max_steps", "must be > 0")


@dataclass
class TeacherConfig:
    """Which ITM teacher scores the sentences, and what to do when it cannot.

    ``source``: ``none`` (no distillation), ``local`` (an in-process engine loading ``model``), or
    teacher service endpoints: ``grpc://host:port`` / ``grpcs://host:port`` / ``triton://host:port``,
    several separated by commas (round robin with failover). ``on_error``: ``skip`` drops the ITM
    term of a batch whose scores failed or came later than ``deadline_s`` (and counts it), ``fail``
    stops training. A service's scores are fetched ``prefetch`` batches ahead in a background
    thread (0: inside the step), and ``redis_url`` is read before any RPC (the cache the service
    fills; ``student prewarm`` fills it ahead of training). See ``docs/distributed.md``.
    """

    source: str = "none"
    model: str = "Salesforce/blip-itm-base-coco"  # local: hub id (from the local cache) or directory
    device: str = "auto"
    dtype: str = "auto"
    itm_start_token: Literal["cls", "enc"] = "cls"
    timeout_s: float = 60.0
    on_error: Literal["skip", "fail"] = "skip"
    token_env: str = "HOIDISTILL_AUTH_TOKEN"  # gRPC: bearer token read from this variable, if set
    memo_entries: int = 2_000_000  # in-process (digest, sentence) -> score memo
    redis_url: str | None = None  # service only: read-through of its score cache before any RPC
    prefetch: int = 2  # service only: batches whose scores are requested ahead; 0 = in the step
    deadline_s: float = 10.0  # service only: longest wait for a batch's scores (then on_error)

    def __post_init__(self) -> None:
        _require(
            self.source in ("none", "local") or self.is_service,
            "teacher.source",
            f"got {self.source!r}, expected 'none', 'local', 'grpc://host:port' or 'triton://host:port' "
            "(several endpoints: comma-separated)",
        )
        _require(self.prefetch >= 0, "teacher.prefetch", f"got {self.prefetch}, expected >= 0")
        _require(self.deadline_s > 0, "teacher.deadline_s", f"got {self.deadline_s}, expected > 0")
        _require(self.timeout_s > 0, "teacher.timeout_s", f"got {self.timeout_s}, expected > 0")
        _require(self.memo_entries >= 0, "teacher.memo_entries", f"got {self.memo_entries}, expected >= 0")

    @property
    def enabled(self) -> bool:
        return self.source != "none"

    @property
    def is_service(self) -> bool:
        """A remote teacher: every comma-separated endpoint is grpc://, grpcs:// or triton://."""
        parts = [part.strip() for part in self.source.split(",")]
        return all(part.startswith(("grpc://", "grpcs://", "triton://")) for part in parts)


@dataclass
class EvalConfig:
    """Post-processing of predictions for evaluation."""

    top_k: int = 100  # triplets kept per image (the HICO-DET protocol's 100)
    nms_threshold: float | None = None  # triplet NMS; None = off
    # top_k_first: keep top_k, then triplet NMS among them (the reference codebases' order);
    # nms_first: NMS over all candidates, then top_k.
    nms_order: Literal["top_k_first", "nms_first"] = "top_k_first"
    vcoco_no_object_role: bool = True  # V-COCO: emit object-less roles when "no object" wins
    batch_size: int = 8

    def __post_init__(self) -> None:
        _require(self.top_k > 0, "eval.top_k", f"got {self.top_k}, expected > 0")
        _require(self.nms_threshold is None or 0 <= self.nms_threshold <= 1, "eval.nms_threshold", "expected 0..1")
        _require(self.batch_size > 0, "eval.batch_size", f"got {self.batch_size}, expected > 0")


@dataclass
class RunConfig:
    """Where outputs go, seeds, device and logging."""

    output_dir: str = "runs/student"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # torch CPU threads; None = torch's default
    log_every: int = 20  # CSV rows every this many steps
    eval_every: int = 0  # evaluate on the test split every this many epochs; 0 = only at the end
    eval_at_end: bool = True
    progress: bool = True  # tqdm bar
    tf32: bool = True  # CUDA only: fp32 matrix products and convolutions on TF32 tensor cores

    def __post_init__(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "run.device",
            f"got {self.device!r}, expected auto, cpu, cuda or cuda:N",
        )
        _require(self.num_threads is None or self.num_threads > 0, "run.num_threads", "must be > 0")
        _require(self.log_every > 0, "run.log_every", f"got {self.log_every}, expected > 0")
        _require(self.eval_every >= 0, "run.eval_every", f"got {self.eval_every}, expected >= 0")


@dataclass
class TrainConfig:
    """One training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: StudentModelConfig = field(default_factory=StudentModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pretrained: str | None = None  # DETR COCO checkpoint (detr-r50-e632da11.pth layout) to start from
    # From scratch only: set the frozen batch-norm statistics of the random CNN from this many
    # training images (0 keeps the identity statistics). See builders.calibrate_frozen_batchnorm.
    calibrate_bn_images: int = 0

    def __post_init__(self) -> None:
        _require(self.calibrate_bn_images >= 0, "calibrate_bn_images", f"got {self.calibrate_bn_images}, expected >= 0")
        _require(
            not (self.pretrained and self.calibrate_bn_images),
            "calibrate_bn_images",
            "a pretrained backbone keeps its batch-norm statistics: set 0 when pretrained is set",
        )
        queries = self.model.decoder.num_queries
        _require(
            self.data.max_pairs is None or self.data.max_pairs <= queries,
            "data.max_pairs",
            f"got {self.data.max_pairs}, but model.decoder.num_queries={queries}: "
            "a query matches at most one pair, so the pairs past it would be silently ignored",
        )
        expected = {"hico": 117, "vcoco": 29}[self.data.dataset]
        _require(
            self.model.num_verbs == expected,
            "model.num_verbs",
            f"got {self.model.num_verbs}, but data.dataset={self.data.dataset!r} has {expected} verbs",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/torch.save-able); ``config_from_dict`` reads it back."""
        return asdict(self)

    def to_yaml(self) -> str:
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
    return _build(TrainConfig, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        keys = ", ".join(_join(where, k) for k in unknown)
        raise ConfigError(f"unknown key(s) {keys}; known keys{' of ' + where if where else ''}: {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ModelError as error:
        # The model's own validation names its keys relative to the model config ("backbone.depth").
        raise ConfigError(f"model.{error}") from None
    except (LossError, ValueError) as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and lightly convert) one value against its field's annotation."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {options}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: got {value!r}, expected one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected a list")
        items = [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        return value
    if hint is float:
        # PyYAML reads "1e-4" (no dot) as a string: accept any text float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover - all fields above
