"""The student: ``HOIDetector`` = ResNet -> 1x1 input projection -> DETR encoder -> HOI decoder -> heads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from student.model.backbone import Backbone
from student.model.config import ModelError, StudentModelConfig
from student.model.decoders import PREDICTION_KEYS, build_decoder
from student.model.position_encoding import PositionEmbeddingSine
from student.model.transformer import TransformerEncoder

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "model.pt"


class HOIDetector(nn.Module):
    """DETR-based HOI detector built from a ``StudentModelConfig``.

    ``forward(images, masks)`` returns, for the last decoder layer,
    ``pred_obj_logits`` (B, Q, C + 1), ``pred_verb_logits`` (B, Q, V), ``pred_sub_boxes`` and
    ``pred_obj_boxes`` (B, Q, 4) cxcywh in [0, 1] relative to each image's unpadded size, and
    ``aux_outputs``: the same four keys for every earlier decoder layer.
    """

    def __init__(self, config: StudentModelConfig) -> None:
        super().__init__()
        self.config = config
        t = config.transformer
        self.backbone = Backbone(config.backbone)
        self.position_encoding = PositionEmbeddingSine(t.d_model // 2)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, t.d_model, kernel_size=1)
        self.encoder = TransformerEncoder(t.d_model, t.nhead, t.dim_feedforward, t.dropout, t.num_encoder_layers)
        self.decoder = build_decoder(config)

    def forward(self, images: Tensor, masks: Tensor | None = None) -> dict[str, Any]:
        """images: (B, 3, H, W) normalised, zero-padded; masks: (B, H, W) bool, True = padding.

        ``masks`` None means no padding. Returns the dict described in the class docstring.
        """
        masks = self._check_inputs(images, masks)
        features, feature_mask = self.backbone(images, masks)  # (B, C, h, w), (B, h, w)
        return self.forward_features(features, feature_mask)

    def forward_features(self, features: Tensor, feature_mask: Tensor) -> dict[str, Any]:
        """The part after the CNN: features (B, C, h, w), feature_mask (B, h, w) True = padding -> outputs.

        Everything from here on honours the mask exactly: padded cells never change the
        predictions of an image. The CNN before it does not (as DETR's): its receptive fields
        cross the image border into the padding, so CNN features, and so predictions, of an
        image padded in a batch differ somewhat from the same image alone.
        """
        src = self.input_proj(features).flatten(2).transpose(1, 2)  # (B, h*w, d)
        pos = self.position_encoding(feature_mask).to(src.dtype).flatten(2).transpose(1, 2)  # (B, h*w, d)
        token_mask = feature_mask.flatten(1)  # (B, h*w)
        memory = self.encoder(src, pos, token_mask)
        per_layer = self.decoder(memory, token_mask, pos)  # each (L, B, Q, k)
        outputs: dict[str, Any] = {key: per_layer[key][-1] for key in PREDICTION_KEYS}
        outputs["aux_outputs"] = [
            {key: per_layer[key][index] for key in PREDICTION_KEYS} for index in range(self.num_decoder_layers - 1)
        ]
        return outputs

    @property
    def num_decoder_layers(self) -> int:
        return self.config.transformer.num_decoder_layers

    @staticmethod
    def _check_inputs(images: Tensor, masks: Tensor | None) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ModelError(f"images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if masks is None:
            return torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        if masks.shape != (batch, height, width):
            raise ModelError(
                f"masks: expected shape {(batch, height, width)} to match images, got {tuple(masks.shape)}"
            )
        if masks.dtype != torch.bool:
            raise ModelError(f"masks: expected dtype torch.bool (True = padding), got {masks.dtype}")
        return masks

    def parameter_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: trainable CNN parameters at ``backbone_lr``, everything else at ``lr``.

        Frozen parameters are left out; empty groups are dropped (e.g. a frozen backbone).
        Each group carries a ``name`` ("backbone" or "transformer") for logging.
        """
        backbone_params: list[nn.Parameter] = []
        other_params: list[nn.Parameter] = []
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                (backbone_params if name.startswith("backbone.") else other_params).append(parameter)
        groups = [
            {"name": "transformer", "params": other_params, "lr": lr, "weight_decay": weight_decay},
            {"name": "backbone", "params": backbone_params, "lr": backbone_lr, "weight_decay": weight_decay},
        ]
        return [group for group in groups if group["params"]]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and the weights (``model.safetensors``; ``model.pt`` without safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.state_dict().items()}
        try:
            from safetensors.torch import save_file
        except ImportError:  # the student extra does not require safetensors
            torch.save(state, directory / TORCH_FILE)
        else:
            save_file(state, str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> HOIDetector:
        """Build from ``config.json`` and load the weights saved by ``save_pretrained`` (strictly).

        Weights load from safetensors or, failing that, with ``torch.load(weights_only=True)``:
        nothing but tensors is ever unpickled.
        """
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise ModelError(f"{directory}: no {CONFIG_FILE}; expected a directory written by save_pretrained")
        try:
            config_data = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ModelError(f"{config_path}: not valid JSON ({error})") from error
        model = cls(StudentModelConfig.from_dict(config_data))
        state = _read_weights(directory, map_location)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise ModelError(f"{directory}: weights do not fit {CONFIG_FILE}: {error}") from error
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(
                f"{directory}: weights do not match {CONFIG_FILE}: missing {result.missing_keys[:10]}, "
                f"unexpected {result.unexpected_keys[:10]}"
            )
        return model.to(map_location)


def _read_weights(directory: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    safetensors_path, torch_path = directory / SAFETENSORS_FILE, directory / TORCH_FILE
    if safetensors_path.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ModelError(f"{safetensors_path}: reading it needs the 'safetensors' package") from error
        return load_file(str(safetensors_path), device=str(map_location))
    if torch_path.is_file():
        try:
            return torch.load(torch_path, map_location=map_location, weights_only=True)
        except Exception as error:  # weights_only refuses anything that is not plain tensors
            raise ModelError(f"{torch_path}: not a plain tensor state dict ({error})") from error
    raise ModelError(f"{directory}: no weights; expected {SAFETENSORS_FILE} or {TORCH_FILE}")
