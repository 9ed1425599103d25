"""ResNet backbone: torchvision layout, frozen batch norm, DETR's trainability rule, stride-32 output + mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from student.model.backbone import Backbone, FrozenBatchNorm2d, ResNet
from student.model.config import BackboneConfig, ModelError

torch.set_num_threads(1)


def test_resnet50_matches_torchvision_layout_and_size() -> None:
    body = ResNet(depth=50, base_width=64)
    state = body.state_dict()
    expected_shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_mean": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.bias": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
    }
    for name, shape in expected_shapes.items():
        assert tuple(state[name].shape) == shape, name
    assert "layer3.6.conv1.weight" not in state  # ResNet-50 has 3, 4, 6, 3 blocks
    assert "layer4.3.conv1.weight" not in state
    assert not any(name.startswith("fc.") for name in state)
    assert not any(name.endswith("num_batches_tracked") for name in state)
    assert body.num_channels == 2048
    # torchvision's resnet50 has 25,557,032 parameters: convs + batch-norm affine terms + fc (2048 * 1000 + 1000).
    conv_params = sum(p.numel() for p in body.parameters())
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in body.modules() if isinstance(m, FrozenBatchNorm2d))
    assert conv_params + bn_affine + 2048 * 1000 + 1000 == 25_557_032


def test_resnet18_uses_basic_blocks_and_downsamples_only_where_needed() -> None:
    state = ResNet(depth=18, base_width=8).state_dict()
    assert tuple(state["layer1.0.conv1.weight"].shape) == (8, 8, 3, 3)
    assert "layer1.0.downsample.0.weight" not in state  # same width, stride 1: identity shortcut
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (16, 8, 1, 1)
    assert "layer1.0.conv3.weight" not in state
    assert "layer4.1.conv2.weight" in state and "layer4.2.conv1.weight" not in state


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_every_depth_gives_stride_32_features(depth: int) -> None:
    backbone = Backbone(BackboneConfig(depth=depth, base_width=4))
    images = torch.randn(1, 3, 100, 70)
    features, mask = backbone(images, torch.zeros(1, 100, 70, dtype=torch.bool))
    expansion = 1 if depth < 50 else 4
    assert features.shape == (1, 4 * 8 * expansion, 4, 3)  # ceil(100 / 32), ceil(70 / 32)
    assert backbone.num_channels == features.shape[1]
    assert mask.shape == (1, 4, 3) and mask.dtype == torch.bool


def test_mask_is_downsampled_to_the_feature_map() -> None:
    backbone = Backbone(BackboneConfig(depth=18, base_width=4))
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[0, :, 64:] = True  # right half of image 0 is padding
    masks[1, 96:, :] = True  # bottom quarter of image 1 is padding
    _, mask = backbone(torch.randn(2, 3, 128, 128), masks)
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[0, :, 2:] = True
    expected[1, 3:, :] = True
    assert torch.equal(mask, expected)


def test_unsupported_depth_is_rejected() -> None:
    with pytest.raises(ModelError, match="depth"):
        ResNet(depth=20)
    with pytest.raises(ModelError, match=r"backbone\.depth"):
        BackboneConfig(depth=152)


def test_frozen_batch_norm_equals_batch_norm_in_eval_and_has_nothing_to_train() -> None:
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(6, eps=1e-5).eval()
    with torch.no_grad():
        reference.weight.copy_(torch.randn(6))
        reference.bias.copy_(torch.randn(6))
        reference.running_mean.copy_(torch.randn(6))
        reference.running_var.copy_(torch.rand(6) + 0.1)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(reference.state_dict())  # carries num_batches_tracked, which FrozenBN drops
    assert list(frozen.parameters()) == []
    frozen.train()  # train mode must not switch to batch statistics or update the running ones
    before = {name: buffer.clone() for name, buffer in frozen.named_buffers()}
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    torch.testing.assert_close(frozen(x), reference(x), atol=1e-5, rtol=1e-5)
    for name, buffer in frozen.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_frozen_batch_norm_keeps_the_input_dtype_under_autocast() -> None:
    # fp32 buffers times a bf16 input promote to fp32: every frozen batch norm of the ResNet would
    # hand the next convolution fp32 activations (twice the memory traffic) under autocast.
    generator = torch.Generator().manual_seed(0)
    frozen = FrozenBatchNorm2d(4)
    frozen.running_var.copy_(torch.rand(4, generator=generator) + 0.5)
    frozen.weight.copy_(torch.randn(4, generator=generator))
    conv = nn.Conv2d(3, 4, 3, bias=False)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(x)
        out = frozen(features)
    assert features.dtype == out.dtype == torch.bfloat16
    # The scale and shift are still computed in fp32 and rounded once.
    torch.testing.assert_close(out.float(), frozen(features.float()), atol=0.05, rtol=0.02)
    assert frozen(torch.ones(1, 4, 2, 2, dtype=torch.float16)).dtype == torch.float16


def test_frozen_batch_norm_starts_as_identity_so_zeros_stay_zero() -> None:
    out = FrozenBatchNorm2d(3)(torch.zeros(1, 3, 2, 2))
    assert torch.equal(out, torch.zeros(1, 3, 2, 2))
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(FrozenBatchNorm2d(3)(x), x, atol=1e-4, rtol=1e-5)


def test_train_backbone_trains_only_layer2_to_layer4() -> None:
    backbone = Backbone(BackboneConfig(depth=18, base_width=4, train_backbone=True))
    for name, parameter in backbone.named_parameters():
        trainable = name.startswith(("body.layer2.", "body.layer3.", "body.layer4."))
        assert parameter.requires_grad == trainable, name
    assert any(p.requires_grad for p in backbone.parameters())


def test_frozen_backbone_trains_nothing() -> None:
    backbone = Backbone(BackboneConfig(depth=18, base_width=4, train_backbone=False))
    assert not any(p.requires_grad for p in backbone.parameters())


def test_gradients_reach_layer2_and_not_the_stem() -> None:
    backbone = Backbone(BackboneConfig(depth=18, base_width=4)).train()
    features, _ = backbone(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    features.square().sum().backward()
    assert backbone.body.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert backbone.body.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert backbone.body.conv1.weight.grad is None
    assert backbone.body.layer1[0].conv1.weight.grad is None
