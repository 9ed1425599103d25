"""The engine on human-object regions: it scores exactly what the stock BLIP scores on the rendered
view, keys views apart (fingerprint, vision LRU) and refuses regions that are not in the image;
``render_region``'s crop and mask pixel by pixel."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForImageTextRetrieval, BlipProcessor

from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
from teacher_server.errors import ImageRequiredError, InvalidInputError
from teacher_server.hoi.region import Region, render_region

SENTENCES = ["a person ride a horse", "a person hold a cup", "a person kick a sports ball"]
# A 60 x 48 image; the human box and the object box side by side, away from the edges.
WIDTH, HEIGHT = 60, 48
REGION = Region(human=(10.0, 8.0, 22.0, 40.0), object=(20.0, 20.0, 38.0, 36.0))
OTHER = Region(human=(40.0, 4.0, 50.0, 44.0), object=(44.0, 30.0, 58.0, 46.0))


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stock(tiny_blip_dir: Path) -> tuple[BlipForImageTextRetrieval, BlipProcessor]:
    return BlipForImageTextRetrieval.from_pretrained(tiny_blip_dir).eval(), BlipProcessor.from_pretrained(tiny_blip_dir)


def stock_logit(stock, view: Image.Image, sentence: str) -> float:
    """The stock forward's match margin (logit 1 - logit 0) of ``sentence`` on the rendered view."""
    model, processor = stock
    inputs = processor(images=view, text=sentence, return_tensors="pt")
    with torch.no_grad():
        logits = model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
            use_itm_head=True,
        ).itm_score[0]
    return (logits[1] - logits[0]).item()


@pytest.mark.parametrize(("policy", "margin", "dim"), [("crop", 0.1, 0.8), ("mask", 0.1, 0.6)])
def test_region_scores_equal_the_stock_forward_on_the_rendered_view(
    tiny_blip_dir: Path, stock, policy: str, margin: float, dim: float
) -> None:
    engine = ItmEngine.from_pretrained(
        tiny_blip_dir, EngineSettings(dtype="fp32", region_policy=policy, region_margin=margin, region_dim=dim)
    )
    data = png_bytes(1)
    views = engine.prepare_views(data, [REGION, OTHER, None])
    requests = [ImageSentences(v.digest, v, SENTENCES, region=v.region) for v in views]
    results = engine.score(requests)
    original = Image.open(io.BytesIO(data)).convert("RGB")
    for region, scores in zip([REGION, OTHER], results[:2], strict=True):
        view = render_region(original, region, policy=policy, margin=margin, dim=dim)
        for sentence, score in zip(SENTENCES, scores, strict=True):
            assert score.match_logit == pytest.approx(stock_logit(stock, view, sentence), abs=1e-4)
    # The whole image is the stock forward on the image itself, and the views score differently
    # (the comparison above is not satisfied by one score for everything).
    for sentence, score in zip(SENTENCES, results[2], strict=True):
        assert score.match_logit == pytest.approx(stock_logit(stock, original, sentence), abs=1e-4)
    assert abs(results[0][0].match_logit - results[1][0].match_logit) > 1e-4
    assert abs(results[0][0].match_logit - results[2][0].match_logit) > 1e-4


def test_the_fingerprint_names_the_policy_and_its_parameter(tiny_blip_dir: Path) -> None:
    def fingerprint(**region) -> str:
        return ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(**region)).fingerprint

    prints = {
        fingerprint(region_policy="crop", region_margin=0.1),
        fingerprint(region_policy="crop", region_margin=0.2),
        fingerprint(region_policy="mask", region_dim=0.8),
        fingerprint(region_policy="mask", region_dim=0.5),
    }
    assert len(prints) == 4
    # A parameter the policy does not use is not part of its identity.
    assert fingerprint(region_policy="crop", region_dim=0.3) == fingerprint(region_policy="crop", region_dim=0.8)


def test_the_vision_lru_holds_a_region_apart_from_its_image(engine: ItmEngine) -> None:
    data = png_bytes(2)
    (region_view,) = engine.prepare_views(data, [REGION])
    digest = region_view.digest
    engine.score([ImageSentences(digest, region_view, SENTENCES[:1], region=REGION)])
    assert engine.has_image(digest, REGION)
    assert not engine.has_image(digest) and not engine.has_image(digest, OTHER)
    whole = engine.prepare_image(data)
    engine.score([ImageSentences(digest, whole, SENTENCES[:1])])
    assert engine.has_image(digest) and engine.has_image(digest, REGION)
    # A digest-only item reuses what the LRU holds for its view, and only for its view.
    (held,) = engine.score([ImageSentences(digest, None, SENTENCES[:1], region=REGION)])
    (fresh,) = engine.score([ImageSentences(digest, region_view, SENTENCES[:1], region=REGION)])
    (image_score,) = engine.score([ImageSentences(digest, None, SENTENCES[:1])])
    assert held[0].match_logit == fresh[0].match_logit != image_score[0].match_logit
    with pytest.raises(ImageRequiredError):
        engine.score([ImageSentences(digest, None, SENTENCES[:1], region=OTHER)])


def test_a_region_outside_the_image_or_inverted_is_refused_naming_the_field(engine: ItmEngine) -> None:
    data = png_bytes(3)
    outside = Region(human=(10.0, 8.0, 22.0, 40.0), object=(20.0, 20.0, WIDTH + 5.0, 36.0))
    with pytest.raises(InvalidInputError) as refused:
        engine.prepare_image(data, region=outside, region_field="items[2].region")
    assert refused.value.field == "items[2].region[6]" and f"at most {WIDTH}" in refused.value.reason
    with pytest.raises(InvalidInputError) as refused:
        engine.prepare_views(data, [REGION, outside], region_fields=["a", "b"])
    assert refused.value.field == "b[6]"
    with pytest.raises(InvalidInputError) as inverted:
        Region.from_values([10, 8, 22, 40, 38, 20, 20, 36], field="items[0].region")
    assert inverted.value.field == "items[0].region[4:8]" and "inverted" in inverted.value.reason
    # Within one pixel of the edge is rounding, not an error.
    engine.prepare_image(data, region=Region(human=(0.0, 0.0, WIDTH + 1.0, 10.0), object=REGION.object))


# -- render_region -------------------------------------------------------------------------------


def gradient_image() -> Image.Image:
    """Every pixel distinct enough to locate: R = x, G = y, B = 200."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(WIDTH)[None, :]
    pixels[..., 1] = np.arange(HEIGHT)[:, None]
    pixels[..., 2] = 200
    return Image.fromarray(pixels)


def test_crop_is_the_union_grown_by_the_margin_and_clipped() -> None:
    image = gradient_image()
    # Union (10, 8, 38, 40): 28 x 32; margin 0.25 grows it by 7 and 8 on each side -> (3, 0, 45, 48).
    crop = np.asarray(render_region(image, REGION, policy="crop", margin=0.25))
    assert crop.shape == (48, 42, 3)
    assert (crop[0, 0, 0], crop[0, 0, 1]) == (3, 0) and (crop[-1, -1, 0], crop[-1, -1, 1]) == (44, 47)
    # No margin: exactly the union box.
    exact = np.asarray(render_region(image, REGION, policy="crop", margin=0.0))
    assert exact.shape == (32, 28, 3) and (exact[0, 0, 0], exact[0, 0, 1]) == (10, 8)
    # Clipped at the image border: the union of OTHER is (40, 4, 58, 46); margin 0.5 -> x 31..67, y 0..67.
    clipped = np.asarray(render_region(image, OTHER, policy="crop", margin=0.5))
    assert clipped.shape == (HEIGHT, WIDTH - 31, 3)


def test_mask_keeps_the_boxes_and_dims_the_rest() -> None:
    image = gradient_image()
    original = np.asarray(image).astype(int)
    masked = np.asarray(render_region(image, REGION, policy="mask", dim=0.75)).astype(int)
    assert masked.shape == original.shape
    inside = np.zeros((HEIGHT, WIDTH), dtype=bool)
    inside[8:40, 10:22] = True  # human box
    inside[20:36, 20:38] = True  # object box
    np.testing.assert_array_equal(masked[inside], original[inside])
    # Outside: blended towards grey 128 by 0.75: 0.25 * pixel + 0.75 * 128 (PIL rounds, +-1).
    expected = 0.25 * original[~inside] + 0.75 * 128
    assert np.abs(masked[~inside] - expected).max() <= 1
    # dim 0 leaves the image untouched; dim 1 is flat grey outside.
    np.testing.assert_array_equal(np.asarray(render_region(image, REGION, policy="mask", dim=0.0)), original)
    assert (np.asarray(render_region(image, REGION, policy="mask", dim=1.0))[~inside] == 128).all()


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="crop, mask"):
        render_region(gradient_image(), REGION, policy="blur")
