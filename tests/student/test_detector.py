"""HOIDetector end to end on tiny configs: output contract, masks, gradients, frozen BN, groups, save/load, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from student.model import HOIDetector, ModelError, StudentModelConfig
from student.model.config import BackboneConfig, DecoderConfig, TransformerConfig
from student.model.detector import CONFIG_FILE, TORCH_FILE

torch.set_num_threads(1)
KEYS = ("pred_obj_logits", "pred_verb_logits", "pred_sub_boxes", "pred_obj_boxes")
KINDS = ["single", "three-branch"]


def _model(kind: str, seed: int = 0, **overrides) -> HOIDetector:
    torch.manual_seed(seed)
    config = StudentModelConfig.tiny(kind=kind, num_verbs=overrides.pop("num_verbs", 117))
    for name, value in overrides.items():
        setattr(config.backbone, name, value)
    return HOIDetector(config)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images (64 x 96 and 128 x 128) padded into one (2, 3, 128, 128) batch."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(2, 3, 128, 128)
    masks = torch.ones(2, 128, 128, dtype=torch.bool)
    images[0, :, :64, :96] = torch.randn(3, 64, 96, generator=generator)
    masks[0, :64, :96] = False
    images[1] = torch.randn(3, 128, 128, generator=generator)
    masks[1] = False
    return images, masks


def _loss(outputs: dict) -> torch.Tensor:
    layers = [outputs, *outputs["aux_outputs"]]
    return sum(layer[key].sum() for layer in layers for key in KEYS)


@pytest.mark.parametrize("kind", KINDS)
def test_output_contract(kind: str) -> None:
    model = _model(kind, num_verbs=29).eval()
    images, masks = _batch()
    outputs = model(images, masks)
    assert set(outputs) == {*KEYS, "aux_outputs"}
    queries = model.config.decoder.num_queries
    shapes = {
        "pred_obj_logits": (2, queries, 81),
        "pred_verb_logits": (2, queries, 29),
        "pred_sub_boxes": (2, queries, 4),
        "pred_obj_boxes": (2, queries, 4),
    }
    for layer in [outputs, *outputs["aux_outputs"]]:
        for key, shape in shapes.items():
            assert layer[key].shape == shape, key
        for key in ("pred_sub_boxes", "pred_obj_boxes"):
            assert (layer[key] >= 0).all() and (layer[key] <= 1).all()
    assert len(outputs["aux_outputs"]) == model.config.transformer.num_decoder_layers - 1
    assert set(outputs["aux_outputs"][0]) == set(KEYS)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_changes_nothing_after_the_cnn(kind: str) -> None:
    # An image's CNN features alone vs the same features placed in a larger, padded feature map
    # (padded cells full of garbage) batched with another image: predictions must agree.
    # The CNN itself cannot promise this (its receptive fields cross the border: see
    # HOIDetector.forward_features), so the comparison starts from its output.
    model = _model(kind).eval()
    images, masks = _batch()
    features, feature_mask = model.backbone(images[:1, :, :64, :96], masks[:1, :64, :96])
    assert features.shape[-2:] == (2, 3) and not feature_mask.any()
    alone = model.forward_features(features, feature_mask)
    padded = torch.randn(2, features.shape[1], 4, 4) * 5
    padded[0, :, :2, :3] = features[0]
    padded_mask = torch.ones(2, 4, 4, dtype=torch.bool)
    padded_mask[0, :2, :3] = False
    padded_mask[1] = False
    batched = model.forward_features(padded, padded_mask)
    for key in KEYS:
        torch.testing.assert_close(batched[key][:1], alone[key], atol=1e-5, rtol=1e-4)
    # The check has teeth: without the mask the garbage cells do change the prediction.
    unmasked = model.forward_features(padded, torch.zeros_like(padded_mask))
    assert not torch.allclose(unmasked["pred_obj_logits"][:1], alone["pred_obj_logits"], atol=1e-3)


def test_forward_is_backbone_then_forward_features() -> None:
    model = _model("three-branch").eval()
    images, masks = _batch()
    direct = model(images, masks)
    stepwise = model.forward_features(*model.backbone(images, masks))
    for key in KEYS:
        assert torch.equal(direct[key], stepwise[key])
    # Both images' downsampled masks are what the transformer sees: image 0 keeps a 2 x 3 corner.
    _, feature_mask = model.backbone(images, masks)
    assert (~feature_mask[0]).sum() == 6 and not feature_mask[1].any()


def test_masks_none_means_no_padding() -> None:
    model = _model("single").eval()
    images = torch.randn(1, 3, 64, 64)
    without = model(images)
    with_mask = model(images, torch.zeros(1, 64, 64, dtype=torch.bool))
    for key in KEYS:
        assert torch.equal(without[key], with_mask[key])


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_heads_encoder_and_trainable_backbone(kind: str) -> None:
    model = _model(kind).train()
    _loss(model(*_batch())).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in (
        "decoder.heads.verb_class_embed.weight",
        "decoder.heads.obj_class_embed.weight",
        "decoder.heads.sub_bbox_embed.layers.0.weight",
        "encoder.layers.0.self_attn.in_proj_weight",
        "input_proj.weight",
        "backbone.body.layer2.0.conv1.weight",
        "backbone.body.layer4.1.conv2.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["backbone.body.conv1.weight"] is None
    assert grads["backbone.body.layer1.0.conv1.weight"] is None


def test_frozen_backbone_gets_no_gradients() -> None:
    model = _model("single", train_backbone=False).train()
    _loss(model(*_batch())).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.input_proj.weight.grad is not None


def test_training_leaves_frozen_batch_norm_and_stem_untouched() -> None:
    model = _model("three-branch").train()
    buffers = {name: buffer.clone() for name, buffer in model.backbone.named_buffers()}
    stem = model.backbone.body.conv1.weight.clone()
    layer3 = model.backbone.body.layer3[0].conv1.weight.clone()
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-3, backbone_lr=1e-3, weight_decay=1e-4))
    for seed in range(2):
        optimizer.zero_grad()
        _loss(model(*_batch(seed))).backward()
        optimizer.step()
    for name, buffer in model.backbone.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert torch.equal(model.backbone.body.conv1.weight, stem)
    assert not torch.equal(model.backbone.body.layer3[0].conv1.weight, layer3)  # training did happen


def test_parameter_groups_cover_each_trainable_parameter_once() -> None:
    model = _model("three-branch")
    groups = model.parameter_groups(lr=1e-4, backbone_lr=1e-5, weight_decay=1e-4)
    by_name = {group["name"]: group for group in groups}
    assert by_name["transformer"]["lr"] == 1e-4 and by_name["backbone"]["lr"] == 1e-5
    assert all(group["weight_decay"] == 1e-4 for group in groups)
    ids = [id(p) for group in groups for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    backbone_ids = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in by_name["backbone"]["params"]} == backbone_ids
    frozen = _model("single", train_backbone=False)
    assert [group["name"] for group in frozen.parameter_groups(1e-4, 1e-5, 1e-4)] == ["transformer"]


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(kind: str, tmp_path: Path) -> None:
    model = _model(kind).eval()
    with torch.no_grad():  # make buffers non-default so their round trip is checked too
        model.backbone.body.bn1.running_mean.normal_()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == model.config.to_dict()
    loaded = HOIDetector.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    images, masks = _batch()
    first, second = model(images, masks), loaded(images, masks)
    for key in KEYS:
        assert torch.equal(first[key], second[key])


def test_loads_a_torch_state_dict_but_never_arbitrary_pickles(tmp_path: Path) -> None:
    model = _model("single").eval()
    (tmp_path / CONFIG_FILE).write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), tmp_path / TORCH_FILE)
    loaded = HOIDetector.from_pretrained(tmp_path)
    assert torch.equal(loaded.input_proj.weight, model.input_proj.weight)
    torch.save({"weights": model.state_dict(), "config": model.config}, tmp_path / TORCH_FILE)
    with pytest.raises(ModelError, match="not a plain tensor state dict"):
        HOIDetector.from_pretrained(tmp_path)


def test_from_pretrained_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        HOIDetector.from_pretrained(tmp_path)
    _model("single").save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["transformer"]["d_model"] = 64  # weights were saved for 32
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"do not fit config\.json"):
        HOIDetector.from_pretrained(tmp_path)
    config["transformer"]["d_model"] = 32
    config["decoder"]["kind"] = "three-branch"  # other modules than the saved ones
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelError, match="missing"):
        HOIDetector.from_pretrained(tmp_path)


def test_bad_inputs_are_named() -> None:
    model = _model("single")
    with pytest.raises(ModelError, match=r"images: expected shape \(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ModelError, match="masks: expected shape"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 32, 64, dtype=torch.bool))
    with pytest.raises(ModelError, match=r"torch\.bool"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64))


def test_config_defaults_are_the_paper_architecture() -> None:
    config = StudentModelConfig()
    assert (config.backbone.depth, config.backbone.base_width) == (50, 64)
    t = config.transformer
    assert (t.d_model, t.nhead, t.dim_feedforward, t.dropout) == (256, 8, 2048, 0.1)
    assert (t.num_encoder_layers, t.num_decoder_layers) == (6, 6)
    assert (config.decoder.kind, config.decoder.num_queries, config.num_verbs) == ("three-branch", 64, 117)


def test_config_round_trips_and_fills_defaults() -> None:
    config = StudentModelConfig(
        backbone=BackboneConfig(depth=34, base_width=16, train_backbone=False),
        transformer=TransformerConfig(d_model=64, nhead=2, dropout=0),
        decoder=DecoderConfig(kind="single", num_queries=100, share_fusion=True),
        num_verbs=29,
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert StudentModelConfig.from_dict(data) == config
    partial = StudentModelConfig.from_dict({"decoder": {"kind": "single"}, "num_verbs": 29})
    assert partial.decoder.kind == "single" and partial.num_verbs == 29 and partial.backbone.depth == 50


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"num_verb": 29}, r"unknown key\(s\) num_verb; known keys: \[.*'num_verbs'"),
        ({"decoder": {"queries": 3}}, r"unknown key\(s\) decoder\.queries; known keys of decoder"),
        ({"decoder": {"kind": "double"}}, r"decoder\.kind: got 'double'"),
        ({"backbone": {"depth": 152}}, r"backbone\.depth: got 152"),
        ({"backbone": {"train_backbone": "yes"}}, r"backbone\.train_backbone: got 'yes', expected true or false"),
        ({"transformer": {"d_model": 30}}, r"transformer\.d_model: got 30, expected a positive multiple of 4"),
        ({"transformer": {"nhead": 3}}, r"transformer\.nhead: got 3, expected a positive divisor of d_model=256"),
        ({"transformer": {"dropout": 1.5}}, r"transformer\.dropout"),
        ({"num_verbs": 2.5}, r"num_verbs: got 2.5, expected an integer"),
        ({"transformer": 3}, r"transformer: expected a mapping"),
    ],
)
def test_config_errors_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        StudentModelConfig.from_dict(data)
