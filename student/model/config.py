"""Typed configuration of the student detector, and the model package's exception type.

A ``StudentModelConfig`` fully determines the architecture: ``HOIDetector(config)`` builds it,
``save_pretrained`` writes it as JSON next to the weights, ``from_pretrained`` reads it back.
Defaults are the paper's architecture (ResNet-50, 256 wide, 6 + 6 layers, 64 queries,
three-branch decoder); ``StudentModelConfig.tiny()`` is the small one tests and the demo use.
The sections are pydantic models (``student.validation``): unknown keys, wrong types and
out-of-range values raise ``ModelError`` naming the key (``backbone.depth``), the value and what
would be valid.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, get_args

from pydantic import Field, field_validator, model_validator

from student.validation import ConfigSection, Invalid, Number

DecoderKind = Literal["single", "three-branch"]
DECODER_KINDS: tuple[str, ...] = get_args(DecoderKind)
ResNetDepth = Literal[18, 34, 50, 101]
RESNET_DEPTHS: tuple[int, ...] = get_args(ResNetDepth)
PositiveInt = Annotated[int, Field(gt=0)]


class ModelError(Exception):
    """Base of every error the student model raises on purpose (config, checkpoints, inputs)."""


class ModelSection(ConfigSection):
    """A section of ``StudentModelConfig``: its errors are ``ModelError``."""

    error_type: ClassVar[type[Exception]] = ModelError


class BackboneConfig(ModelSection):
    """ResNet backbone.

    ``base_width`` is the channel count of the stem and of ``layer1`` (64 in torchvision's ResNets);
    every later stage doubles it. ``train_backbone`` False freezes the whole CNN; True trains
    ``layer2``-``layer4`` and keeps the stem and ``layer1`` frozen, as DETR does.
    """

    section: ClassVar[str] = "backbone"

    depth: ResNetDepth = 50
    base_width: PositiveInt = 64
    train_backbone: bool = True


class TransformerConfig(ModelSection):
    """DETR encoder / decoder sizes (the paper: 256 wide, 8 heads, FFN 2048, dropout 0.1, 6 + 6 layers)."""

    section: ClassVar[str] = "transformer"

    d_model: int = 256
    nhead: int = 8
    dim_feedforward: PositiveInt = 2048
    dropout: Annotated[Number, Field(ge=0, lt=1)] = 0.1
    num_encoder_layers: Annotated[int, Field(ge=0)] = 6
    num_decoder_layers: Annotated[int, Field(ge=1)] = 6

    @field_validator("d_model")
    @classmethod
    def _splits_into_sine_pairs(cls, d_model: int) -> int:
        if d_model <= 0 or d_model % 4:
            raise Invalid(
                f"got {d_model}, expected a positive multiple of 4 (the sine encoding gives d_model / 2 "
                "channels to each of y and x, as sin / cos pairs)"
            )
        return d_model

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> TransformerConfig:
        if self.nhead <= 0 or self.d_model % self.nhead:
            raise Invalid(f"got {self.nhead}, expected a positive divisor of d_model={self.d_model}", "nhead")
        return self


class DecoderConfig(ModelSection):
    """HOI decoder.

    ``kind``: ``single`` (QPIC: one query set, each query predicts a whole triplet) or
    ``three-branch`` (MUREN: human, object and interaction query sets with relational fusion).
    ``share_fusion`` (three-branch only): one set of gated fusion modules for all layers (the
    baseline's V-COCO setting) instead of one per layer (its HICO-DET setting).
    """

    section: ClassVar[str] = "decoder"

    kind: DecoderKind = "three-branch"
    num_queries: PositiveInt = 64
    share_fusion: bool = False


class StudentModelConfig(ModelSection):
    """Everything that defines a ``HOIDetector``.

    ``num_verbs``: 117 for HICO-DET, 29 for V-COCO. ``num_obj_classes``: 80 (COCO); the object
    classifier has one more output, the last, for "no object". ``to_dict`` / ``from_dict``
    round-trip it through JSON; ``from_dict`` fills missing keys with the defaults.
    """

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    transformer: TransformerConfig = Field(default_factory=TransformerConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    num_verbs: PositiveInt = 117
    num_obj_classes: PositiveInt = 80

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
