"""ResNet backbone with frozen batch norm, laid out like torchvision's ResNet (no torchvision needed).

Parameter and buffer names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ...), so DETR's ``backbone.0.body.<name>`` keys map one to one onto
``Backbone.body.<name>``. Blocks are torchvision's "v1.5" (the stride sits on the 3x3 conv).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student.model.config import BackboneConfig, ModelError

# depth -> (block kind, blocks per stage)
_RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms, all buffers (nothing trains, nothing updates).

    Same buffers as DETR's (``weight``, ``bias``, ``running_mean``, ``running_var``; eps 1e-5).
    Initialised to the identity (up to eps), so a zero input stays exactly zero.
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torchvision / plain BatchNorm2d checkpoints carry a counter we do not keep.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W), in x's dtype
        # Scale and shift in fp32 (the buffers' dtype), then cast to x's dtype: under autocast
        # x is bf16/fp16, and fp32 buffers would otherwise promote every activation to fp32.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = FrozenBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = FrozenBatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk without pooling head or ``fc``: (B, 3, H, W) -> (B, C, ceil(H/32), ceil(W/32))."""

    # Added by name in __init__ (add_module), as torchvision names them.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, depth: int = 50, base_width: int = 64) -> None:
        super().__init__()
        if depth not in _RESNET_LAYOUTS:
            raise ModelError(f"ResNet depth {depth} is not supported; expected one of {sorted(_RESNET_LAYOUTS)}")
        kind, blocks = _RESNET_LAYOUTS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base_width
        for stage, num_blocks in enumerate(blocks):
            width = base_width * 2**stage
            stride = 1 if stage == 0 else 2
            layer, in_channels = self._make_layer(block, in_channels, width, num_blocks, stride)
            self.add_module(f"layer{stage + 1}", layer)
        self.num_channels = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _make_layer(
        block: type[BasicBlock] | type[Bottleneck], in_channels: int, width: int, num_blocks: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        out_channels = width * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), FrozenBatchNorm2d(out_channels))
        layers = [block(in_channels, width, stride, downsample)]
        layers += [block(out_channels, width) for _ in range(num_blocks - 1)]
        return nn.Sequential(*layers), out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Backbone(nn.Module):
    """The CNN of the detector: last feature map (stride 32) plus the padding mask at that resolution.

    Trainability follows DETR: with ``train_backbone`` only ``layer2``-``layer4`` train (the stem
    and ``layer1`` stay frozen); without it, nothing in the CNN trains. Batch norm is always frozen.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.body = ResNet(config.depth, config.base_width)
        self.num_channels = self.body.num_channels
        trainable_stages = ("layer2.", "layer3.", "layer4.")
        for name, parameter in self.body.named_parameters():
            parameter.requires_grad_(config.train_backbone and name.startswith(trainable_stages))

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """images: (B, 3, H, W); masks: (B, H, W) bool, True = padding.

        Returns ``features`` (B, C, h, w) and ``mask`` (B, h, w) bool, True = padding, where
        h, w = ceil(H / 32), ceil(W / 32).
        """
        features = self.body(images)
        # Nearest-neighbour downsampling as DETR: feature cell i reads the input pixel at i * H / h.
        mask = F.interpolate(masks[:, None].float(), size=features.shape[-2:]).to(torch.bool)[:, 0]
        return features, mask
