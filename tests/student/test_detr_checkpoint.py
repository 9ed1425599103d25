"""Loading a DETR COCO checkpoint: written here by hand in DETR's exact key layout, at tiny sizes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from student.model import HOIDetector, ModelError, StudentModelConfig, load_detr_checkpoint, read_detr_checkpoint

torch.set_num_threads(1)
WIDTH, D, FFN, ENC_LAYERS, DEC_LAYERS, DETR_QUERIES = 8, 32, 64, 2, 3, 100
# Object index -> DETR classifier row (= COCO category id); DETR row 91 is its no-object class.
COCO_ROWS = {0: 1, 1: 2, 10: 11, 11: 13, 12: 14, 39: 44, 79: 90, 80: 91}


def detr_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A DETR-R18-shaped state dict (DETR's names, tiny widths), independent of our module code."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def conv(name: str, out_channels: int, in_channels: int, kernel: int) -> None:
        state[f"backbone.0.body.{name}.weight"] = rand(out_channels, in_channels, kernel, kernel)

    def batch_norm(name: str, channels: int) -> None:
        for buffer in ("weight", "bias", "running_mean"):
            state[f"backbone.0.body.{name}.{buffer}"] = rand(channels)
        state[f"backbone.0.body.{name}.running_var"] = rand(channels).abs() + 0.5

    conv("conv1", WIDTH, 3, 7)
    batch_norm("bn1", WIDTH)
    in_channels = WIDTH
    for stage in range(4):
        channels = WIDTH * 2**stage
        for block in range(2):  # ResNet-18: BasicBlocks, 2 per stage
            prefix = f"layer{stage + 1}.{block}"
            conv(f"{prefix}.conv1", channels, in_channels if block == 0 else channels, 3)
            batch_norm(f"{prefix}.bn1", channels)
            conv(f"{prefix}.conv2", channels, channels, 3)
            batch_norm(f"{prefix}.bn2", channels)
            if block == 0 and stage > 0:
                conv(f"{prefix}.downsample.0", channels, in_channels, 1)
                batch_norm(f"{prefix}.downsample.1", channels)
        in_channels = channels
    state["input_proj.weight"], state["input_proj.bias"] = rand(D, in_channels, 1, 1), rand(D)

    def attention(prefix: str) -> None:
        state[f"{prefix}.in_proj_weight"], state[f"{prefix}.in_proj_bias"] = rand(3 * D, D), rand(3 * D)
        state[f"{prefix}.out_proj.weight"], state[f"{prefix}.out_proj.bias"] = rand(D, D), rand(D)

    def layer(prefix: str, cross: bool) -> None:
        attention(f"{prefix}.self_attn")
        if cross:
            attention(f"{prefix}.multihead_attn")
        state[f"{prefix}.linear1.weight"], state[f"{prefix}.linear1.bias"] = rand(FFN, D), rand(FFN)
        state[f"{prefix}.linear2.weight"], state[f"{prefix}.linear2.bias"] = rand(D, FFN), rand(D)
        for norm in ("norm1", "norm2", "norm3") if cross else ("norm1", "norm2"):
            state[f"{prefix}.{norm}.weight"], state[f"{prefix}.{norm}.bias"] = rand(D), rand(D)

    for index in range(ENC_LAYERS):
        layer(f"transformer.encoder.layers.{index}", cross=False)
    for index in range(DEC_LAYERS):
        layer(f"transformer.decoder.layers.{index}", cross=True)
    state["transformer.decoder.norm.weight"], state["transformer.decoder.norm.bias"] = rand(D), rand(D)
    state["query_embed.weight"] = rand(DETR_QUERIES, D)
    state["class_embed.weight"], state["class_embed.bias"] = rand(92, D), rand(92)
    for index, out_dim in enumerate((D, D, 4)):
        state[f"bbox_embed.layers.{index}.weight"] = rand(out_dim, D)
        state[f"bbox_embed.layers.{index}.bias"] = rand(out_dim)
    return state


def tiny_model(kind: str, num_obj_classes: int = 80) -> HOIDetector:
    torch.manual_seed(0)
    config = StudentModelConfig.tiny(kind=kind)  # ResNet-18 width 8, d 32, FFN 64, 2 + 2 layers, 8 queries
    config.num_obj_classes = num_obj_classes
    return HOIDetector(config)


def _get(model: HOIDetector, name: str) -> torch.Tensor:
    return model.state_dict()[name]


def _check_shared_parts(model: HOIDetector, detr: dict[str, torch.Tensor]) -> None:
    for name in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.1.conv2.weight",
        "layer3.0.downsample.0.weight",
        "layer4.0.downsample.1.bias",
        "layer4.1.bn2.running_mean",
    ):
        assert torch.equal(_get(model, f"backbone.body.{name}"), detr[f"backbone.0.body.{name}"]), name
    assert torch.equal(model.input_proj.weight, detr["input_proj.weight"])
    for name in ("self_attn.in_proj_weight", "self_attn.out_proj.bias", "linear2.weight", "norm2.bias"):
        assert torch.equal(_get(model, f"encoder.layers.1.{name}"), detr[f"transformer.encoder.layers.1.{name}"])
    heads = model.decoder.heads
    for index, detr_row in COCO_ROWS.items():
        assert torch.equal(heads.obj_class_embed.weight[index], detr["class_embed.weight"][detr_row]), index
        assert torch.equal(heads.obj_class_embed.bias[index], detr["class_embed.bias"][detr_row]), index
    for box_head in (heads.sub_bbox_embed, heads.obj_bbox_embed):
        for index in range(3):
            assert torch.equal(box_head.layers[index].weight, detr[f"bbox_embed.layers.{index}.weight"])
            assert torch.equal(box_head.layers[index].bias, detr[f"bbox_embed.layers.{index}.bias"])
    # The two box heads are clones, not one shared tensor: training one leaves the other alone.
    with torch.no_grad():
        heads.sub_bbox_embed.layers[0].weight.add_(1.0)
    assert torch.equal(heads.obj_bbox_embed.layers[0].weight, detr["bbox_embed.layers.0.weight"])


def test_single_decoder_gets_every_detr_part() -> None:
    detr = detr_state_dict()
    model = tiny_model("single")
    report = load_detr_checkpoint(model, {"model": detr})
    _check_shared_parts(model, detr)
    for name in (
        "self_attn.in_proj_bias",
        "multihead_attn.in_proj_weight",
        "multihead_attn.out_proj.weight",
        "linear1.weight",
        "norm3.weight",
    ):
        for index in range(2):
            key = f"layers.{index}.{name}"
            assert torch.equal(_get(model, f"decoder.transformer.{key}"), detr[f"transformer.decoder.{key}"])
    assert torch.equal(model.decoder.transformer.norm.weight, detr["transformer.decoder.norm.weight"])
    assert torch.equal(model.decoder.query_embed.weight, detr["query_embed.weight"][:8])
    # Only the verb head is new; only the checkpoint's third decoder layer has no place.
    assert report.missing == ["decoder.heads.verb_class_embed.weight", "decoder.heads.verb_class_embed.bias"]
    assert sorted(report.unexpected) == sorted(k for k in detr if k.startswith("transformer.decoder.layers.2."))
    assert len(report.loaded) == len(model.state_dict()) - 2
    assert "loaded" in report.summary()


def test_three_branch_decoder_gets_detr_layers_in_every_branch() -> None:
    detr = detr_state_dict()
    model = tiny_model("three-branch")
    report = load_detr_checkpoint(model, {"model": detr})
    _check_shared_parts(model, detr)
    for branch in ("human", "object", "interaction"):
        for key in (
            "layers.0.multihead_attn.in_proj_weight",
            "layers.1.norm3.bias",
            "layers.1.linear1.weight",
            "norm.weight",
        ):
            assert torch.equal(_get(model, f"decoder.{branch}_branch.{key}"), detr[f"transformer.decoder.{key}"])
        assert torch.equal(_get(model, f"decoder.{branch}_query_embed.weight"), detr["query_embed.weight"][:8])
    # Branch copies are independent tensors.
    assert model.decoder.human_branch.norm.weight.data_ptr() != model.decoder.object_branch.norm.weight.data_ptr()
    new_parts = ("decoder.relation.", "decoder.fusion.", "decoder.heads.verb_class_embed.")
    assert report.missing and all(key.startswith(new_parts) for key in report.missing)
    assert any(key.startswith("decoder.relation.") for key in report.missing)
    assert not any(key.startswith(new_parts) for key in report.loaded)


def test_loads_from_a_file_in_the_released_layout(tmp_path: Path) -> None:
    detr = detr_state_dict(seed=1)
    path = tmp_path / "detr-r50-e632da11.pth"
    torch.save({"model": detr}, path)
    model = tiny_model("single")
    load_detr_checkpoint(model, path)
    _check_shared_parts(model, detr)
    loaded = tiny_model("single")
    load_detr_checkpoint(loaded, str(path))
    torch.testing.assert_close(
        loaded.state_dict()["encoder.layers.0.linear1.weight"], detr["transformer.encoder.layers.0.linear1.weight"]
    )
    outputs = loaded.eval()(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(outputs["pred_obj_logits"]).all()


def test_bare_and_ddp_prefixed_state_dicts_load() -> None:
    detr = detr_state_dict()
    model = tiny_model("single")
    load_detr_checkpoint(model, {f"module.{key}": value for key, value in detr.items()})
    _check_shared_parts(model, detr)


def test_bare_file_name_is_found_in_the_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    detr = detr_state_dict()
    torch.save({"model": detr}, tmp_path / "checkpoints" / "detr-test.pth")
    assert torch.equal(read_detr_checkpoint("detr-test.pth")["query_embed.weight"], detr["query_embed.weight"])


def test_missing_file_says_where_to_get_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    with pytest.raises(ModelError, match=r"no such file.*detr-r50-e632da11\.pth"):
        load_detr_checkpoint(tiny_model("single"), tmp_path / "nowhere.pth")
    with pytest.raises(ModelError, match="not supported"):
        read_detr_checkpoint("facebook/detr-resnet-50")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    # DETR training checkpoints also hold the argparse namespace; weights_only must refuse it.
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": detr_state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ModelError, match="plain tensors"):
        load_detr_checkpoint(tiny_model("single"), path)


def test_shape_mismatch_names_the_key_and_both_shapes() -> None:
    detr = detr_state_dict()
    detr["input_proj.weight"] = torch.randn(D, 99, 1, 1)
    with pytest.raises(ModelError, match=r"'input_proj.weight'.*\(32, 99, 1, 1\).*\(32, 64, 1, 1\)"):
        load_detr_checkpoint(tiny_model("single"), detr)


def test_too_few_query_rows_or_class_rows_are_errors() -> None:
    detr = detr_state_dict()
    detr["query_embed.weight"] = detr["query_embed.weight"][:4]
    with pytest.raises(ModelError, match=r"query_embed.weight.*num_queries=8"):
        load_detr_checkpoint(tiny_model("three-branch"), detr)
    detr = detr_state_dict()
    detr["class_embed.weight"] = detr["class_embed.weight"][:81]
    with pytest.raises(ModelError, match=r"class_embed.weight.*fewer than 92 rows"):
        load_detr_checkpoint(tiny_model("single"), detr)


def test_non_coco_classes_keep_their_own_classifier() -> None:
    detr = detr_state_dict()
    model = tiny_model("single", num_obj_classes=10)
    report = load_detr_checkpoint(model, detr)
    assert {"class_embed.weight", "class_embed.bias"} <= set(report.unexpected)
    assert "decoder.heads.obj_class_embed.weight" in report.missing
    assert torch.equal(model.decoder.heads.sub_bbox_embed.layers[2].bias, detr["bbox_embed.layers.2.bias"])
