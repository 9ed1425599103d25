"""Evidence maps (``teacher_server.explain``) on the tiny BLIP: the map's shape and range, the
Grad-CAM against an independent autograd computation through the stock forward, layers,
regions and the overlay picture."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from testkit.teacher import png_bytes, reference_scores

from teacher_server.engine import EngineSettings, ItmEngine
from teacher_server.errors import InvalidInputError, ModelLoadError, OverloadedError
from teacher_server.explain import Explainer, heat_colours, overlay, resolve_layer
from teacher_server.hoi.region import Region, render_region

SENTENCES = ["a person ride a horse", "a person hold a cup", "a dog"]
# The tiny model: 32 px images in 8 px patches -> a 4 x 4 grid; 2 text layers.
GRID = 32 // 8


def reference_cam(engine: ItmEngine, image: bytes, sentence: str, layer: int) -> torch.Tensor:
    """The map by hand: the stock ``BlipForImageTextRetrieval.forward`` with autograd on (the
    pixels require a gradient), the layer's cross-attention probabilities caught by a forward hook
    and their gradient by ``retain_grad``; then the formula of the module docstring, one token at a time."""
    model = engine.model
    pixels = engine.prepare_image(image).pixel_values.clone().requires_grad_(True)
    encoded = engine.tokenizer(sentence, return_tensors="pt")
    caught: list[torch.Tensor] = []

    def keep(_module, _args, output):
        output[1].retain_grad()
        caught.append(output[1])

    hook = model.text_encoder.encoder.layer[layer].crossattention.self.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(
                input_ids=encoded["input_ids"], pixel_values=pixels, attention_mask=encoded["attention_mask"]
            ).itm_score
            logits[0, 1].backward()
    finally:
        hook.remove()
    (attention,) = caught
    grad = attention.grad
    assert grad is not None
    ids = encoded["input_ids"][0].tolist()
    last = layer == len(model.text_encoder.encoder.layer) - 1
    # [CLS] is first and [SEP] last; at the last layer only [CLS] reaches the ITM head.
    tokens = [0] if last else list(range(1, len(ids) - 1))
    per_token = []
    for t in tokens:
        heads = [attention[0, h, t, 1:] * grad[0, h, t, 1:].clamp(min=0) for h in range(attention.shape[1])]
        per_token.append(torch.stack(heads).mean(0))
    cam = torch.stack(per_token).mean(0).detach().view(GRID, GRID)
    return cam / cam.max()


@pytest.fixture
def explainer(engine: ItmEngine) -> Explainer:
    return Explainer(engine)


def test_maps_have_the_patch_grid_shape_values_in_unit_range_and_the_scores(
    explainer: Explainer, engine: ItmEngine
) -> None:
    image = png_bytes(3, (50, 40))
    explanation = explainer.explain(image, SENTENCES)
    assert (explanation.rows, explanation.cols, explanation.layer) == (GRID, GRID, 0)
    assert explanation.view_box == (0, 0, 50, 40)  # the whole image
    for sentence, evidence, score in zip(
        SENTENCES, explanation.maps, reference_scores(engine, image, SENTENCES), strict=True
    ):
        assert evidence.sentence == sentence
        assert evidence.grid.shape == (GRID, GRID) and evidence.grid.dtype == torch.float32
        assert float(evidence.grid.min()) >= 0.0 and float(evidence.grid.max()) == pytest.approx(1.0)
        assert len(set(evidence.grid.flatten().tolist())) > 1  # not flat: the map says something
        assert evidence.match_prob == pytest.approx(score.match_prob, abs=1e-5)
        assert evidence.match_logit == pytest.approx(score.match_logit, abs=1e-4)


@pytest.mark.parametrize("layer", [0, 1])
def test_grad_cam_equals_an_independent_autograd_computation(
    explainer: Explainer, engine: ItmEngine, layer: int
) -> None:
    image = png_bytes(8, (48, 48))
    # Sentences of different lengths in one batch: padding must not leak into any map.
    explanation = explainer.explain(image, ["a person ride a horse", "a cup"], layer=layer)
    for evidence in explanation.maps:
        expected = reference_cam(engine, image, evidence.sentence, layer)
        torch.testing.assert_close(evidence.grid, expected, atol=1e-5, rtol=1e-4)


def test_layers_resolve_and_a_missing_layer_names_the_field(engine: ItmEngine) -> None:
    assert resolve_layer(None, 12) == 8  # BLIP's demo layer
    assert resolve_layer(None, 2) == 0  # below the last, whose word tokens get no gradient
    assert resolve_layer(None, 1) == 0
    assert resolve_layer(-1, 2) == 1
    with pytest.raises(InvalidInputError, match=r"layer 2 is not one of the text tower's 2 layers") as caught:
        resolve_layer(2, 2)
    assert caught.value.field == "layer"
    with pytest.raises(ModelLoadError, match="explain_layer: layer -3"):
        Explainer(engine, layer=-3)


def test_limits_name_the_field(engine: ItmEngine) -> None:
    explainer = Explainer(engine, max_sentences=2)
    image = png_bytes(1)
    with pytest.raises(InvalidInputError, match="3 sentences, over the limit of 2") as caught:
        explainer.explain(image, ["a", "b", "c"])
    assert caught.value.field == "sentences" and caught.value.too_large
    with pytest.raises(InvalidInputError, match="sentence is empty") as caught:
        explainer.explain(image, ["a person", " "])
    assert caught.value.field == "sentences[1]"
    with pytest.raises(InvalidInputError, match="not a decodable image") as caught:
        explainer.explain(b"not an image", ["a person"])
    assert caught.value.field == "image"
    outside = Region.from_values([0, 0, 10, 10, 5, 5, 90, 20])
    with pytest.raises(InvalidInputError, match="outside the image") as caught:
        explainer.explain(png_bytes(1, (40, 32)), ["a person"], region=outside)
    assert caught.value.field == "region[6]"


def test_the_engines_shape_limits_hold_for_evidence_maps_too(tiny_blip_dir) -> None:
    """A deployer's max_image_side / max_image_aspect bound /v1/explain's decode as they bound scoring."""
    strict = ItmEngine.from_pretrained(str(tiny_blip_dir), EngineSettings(max_image_side=64, max_image_aspect=2.0))
    explainer = Explainer(strict)
    with pytest.raises(InvalidInputError, match="max_image_aspect") as caught:
        explainer.explain(png_bytes(1, (60, 20)), ["a person"])
    assert caught.value.field == "image"
    with pytest.raises(InvalidInputError, match="max_image_side"):
        explainer.explain(png_bytes(1, (80, 60)), ["a person"])
    assert explainer.explain(png_bytes(1, (60, 40)), ["a person"]).maps


def test_a_busy_explainer_refuses_rather_than_queues(engine: ItmEngine) -> None:
    explainer = Explainer(engine, concurrency=1)
    assert explainer._slots.acquire(blocking=False)  # one request in flight
    try:
        with pytest.raises(OverloadedError, match=r"1 evidence map request\(s\) already running") as caught:
            explainer.explain(png_bytes(2), ["a person"])
        assert caught.value.retry_after_s > 0
    finally:
        explainer._slots.release()
    assert explainer.explain(png_bytes(2), ["a person"]).maps  # free again


def test_a_region_maps_the_view_the_model_saw(explainer: Explainer, engine: ItmEngine) -> None:
    data = png_bytes(5, (80, 60))
    region = Region.from_values([10, 10, 30, 50, 40, 20, 60, 40])
    explanation = explainer.explain(data, ["a person ride a horse"], region=region)
    # crop policy, margin 0.1: the union (10, 10, 60, 50) grows by 5 x 4 px on each side.
    assert explanation.view_box == (5, 6, 65, 54)
    # The same map as for the crop sent as an image of its own.
    crop = render_region(Image.open(io.BytesIO(data)).convert("RGB"), region)
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    alone = explainer.explain(buffer.getvalue(), ["a person ride a horse"])
    torch.testing.assert_close(explanation.maps[0].grid, alone.maps[0].grid, atol=1e-5, rtol=1e-4)


def test_overlay_colours_the_seen_pixels_and_dims_the_rest() -> None:
    assert heat_colours(np.array([0.0, 1.0])).tolist() == [[0, 0, 128], [128, 0, 0]]
    image = Image.new("RGB", (40, 30), (255, 255, 255))
    grid = torch.zeros(2, 2)
    grid[0, 0] = 1.0  # the top-left patch holds all the evidence
    picture = overlay(image, grid, (10, 0, 40, 30))
    assert picture.size == image.size
    pixels = np.asarray(picture).astype(int)
    # Outside the view: dimmed towards grey, 255 * (1 - 0.6) + 128 * 0.6 = 178.8 (PIL rounds down).
    assert (abs(pixels[:, :10] - 178.8) <= 1).all()
    top_left, bottom_right = pixels[1, 11], pixels[28, 38]
    assert top_left[0] > top_left[2]  # towards red
    assert bottom_right[2] > bottom_right[0]  # towards blue
