"""Typed configuration of the student detector, and the model package's exception type.

A ``StudentModelConfig`` fully determines the architecture: ``HOIDetector(config)`` builds it,
``save_pretrained`` writes it as JSON next to the weights, ``from_pretrained`` reads it back.
Defaults are the paper's architecture (ResNet-50, 256 wide, 6 + 6 layers, 64 queries,
three-branch decoder); ``StudentModelConfig.tiny()`` is the small one tests and the demo use.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

DecoderKind = Literal["single", "three-branch"]
DECODER_KINDS: tuple[str, ...] = ("single", "three-branch")
RESNET_DEPTHS: tuple[int, ...] = (18, 34, 50, 101)


class ModelError(Exception):
    """Base of every error the student model raises on purpose (config, checkpoints, inputs)."""


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ModelError(f"{where}: {message}")


@dataclass
class BackboneConfig:
    """ResNet backbone.

    ``base_width`` is the channel count of the stem and of ``layer1`` (64 in torchvision's ResNets);
    every later stage doubles it. ``train_backbone`` False freezes the whole CNN; True trains
    ``layer2``-``layer4`` and keeps the stem and ``layer1`` frozen, as DETR does.
    """

    depth: int = 50
    base_width: int = 64
    train_backbone: bool = True

    def __post_init__(self) -> None:
        _require(
            self.depth in RESNET_DEPTHS,
            "backbone.depth",
            f"got {self.depth}, expected one of {RESNET_DEPTHS}",
        )
        _require(self.base_width > 0, "backbone.base_width", f"got {self.base_width}, expected > 0")


@dataclass
class TransformerConfig:
    """DETR encoder / decoder sizes (the paper: 256 wide, 8 heads, FFN 2048, dropout 0.1, 6 + 6 layers)."""

    d_model: int = 256
    nhead: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6

    def __post_init__(self) -> None:
        _require(
            self.d_model > 0 and self.d_model % 4 == 0,
            "transformer.d_model",
            f"got {self.d_model}, expected a positive multiple of 4 (the sine encoding gives d_model / 2 "
            "channels to each of y and x, as sin / cos pairs)",
        )
        _require(
            self.nhead > 0 and self.d_model % self.nhead == 0,
            "transformer.nhead",
            f"got {self.nhead}, expected a positive divisor of d_model={self.d_model}",
        )
        _require(
            self.dim_feedforward > 0,
            "transformer.dim_feedforward",
            f"got {self.dim_feedforward}, expected > 0",
        )
        _require(0.0 <= self.dropout < 1.0, "transformer.dropout", f"got {self.dropout}, expected 0 <= p < 1")
        _require(
            self.num_encoder_layers >= 0,
            "transformer.num_encoder_layers",
            f"got {self.num_encoder_layers}, expected >= 0",
        )
        _require(
            self.num_decoder_layers >= 1,
            "transformer.num_decoder_layers",
            f"got {self.num_decoder_layers}, expected >= 1",
        )


@dataclass
class DecoderConfig:
    """HOI decoder.

    ``kind``: ``single`` (QPIC: one query set, each query predicts a whole triplet) or
    ``three-branch`` (MUREN: human, object and interaction query sets with relational fusion).
    ``share_fusion`` (three-branch only): one set of gated fusion modules for all layers (the
    baseline's V-COCO setting) instead of one per layer (its HICO-DET setting).
    """

    kind: DecoderKind = "three-branch"
    num_queries: int = 64
    share_fusion: bool = False

    def __post_init__(self) -> None:
        _require(self.kind in DECODER_KINDS, "decoder.kind", f"got {self.kind!r}, expected one of {DECODER_KINDS}")
        _require(self.num_queries > 0, "decoder.num_queries", f"got {self.num_queries}, expected > 0")


@dataclass
class StudentModelConfig:
    """Everything that defines a ``HOIDetector``.

    ``num_verbs``: 117 for HICO-DET, 29 for V-COCO. ``num_obj_classes``: 80 (COCO); the object
    classifier has one more output, the last, for "no object".
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    num_verbs: int = 117
    num_obj_classes: int = 80

    def __post_init__(self) -> None:
        _require(self.num_verbs > 0, "num_verbs", f"got {self.num_verbs}, expected > 0")
        _require(self.num_obj_classes > 0, "num_obj_classes", f"got {self.num_obj_classes}, expected > 0")

    @classmethod
    def tiny(cls, kind: DecoderKind = "three-branch", num_verbs: int = 117, num_queries: int = 8) -> StudentModelConfig:
        """A model small enough for tests and the CPU demo (ResNet-18 at width 8, 32 wide, 2 + 2 layers)."""
        return cls(
            backbone=BackboneConfig(depth=18, base_width=8),
            transformer=TransformerConfig(
                d_model=32,
                nhead=4,
                dim_feedforward=64,
                dropout=0.0,
                num_encoder_layers=2,
                num_decoder_layers=2,
            ),
            decoder=DecoderConfig(kind=kind, num_queries=num_queries),
            num_verbs=num_verbs,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable nested dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentModelConfig:
        """Inverse of ``to_dict``: missing fields take defaults; unknown or mistyped ones raise ModelError.

        Values are validated as when constructing the dataclasses directly.
        """
        return _from_dict(cls, data, where="model config")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ModelError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where != "model config" else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, key)
        else:
            kwargs[name] = _check_scalar(value, hint, key)
    return cls(**kwargs)


def _check_scalar(value: Any, hint: Any, where: str) -> Any:
    """Type-check one JSON scalar against its field's annotation (int, float, bool or a Literal of str)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ModelError(f"{where}: got {value!r}, expected one of {allowed}")
        return value
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(hint, type) and not isinstance(hint, types.GenericAlias):
        ok = isinstance(value, hint)
    else:  # pragma: no cover - every field today is one of the cases above
        ok = True
    if not ok:
        raise ModelError(f"{where}: got {value!r} ({type(value).__name__}), expected {getattr(hint, '__name__', hint)}")
    return value
