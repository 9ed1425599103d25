"""Images built to be expensive: size limits checked from the header, reduced-size decoding, every
pixel mode decoded to RGB, and the limits as the APIs report them (issue 15, finding 1).

Whether a picture was decoded is observed by counting calls of Pillow's ``ImageFile.load`` (the
real method still runs): a limit that holds "before decoding" must leave the count at zero.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from PIL import Image, ImageDraw, ImageFile, ImageOps
from testkit.http import b64, running_http
from testkit.teacher import png_bytes, running_teacher, teacher_settings
from transformers import BlipForImageTextRetrieval, BlipProcessor
from tritonclient.utils import InferenceServerException

from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2 as pb
from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine import (
    DEFAULT_MAX_IMAGE_ASPECT,
    DEFAULT_MAX_IMAGE_SIDE,
    EngineSettings,
    ItmEngine,
    load_image,
    open_image,
)
from teacher_server.errors import InvalidInputError
from teacher_server.hoi.region import Region

torch.set_num_threads(1)

# BLIP-base's processor resizes every view to 384 x 384 (the tiny model's: 32 x 32).
BLIP_BASE_SIZE = 384
# Draft vs full decode, in the processor's normalised units (pixel / 255 - mean) / std, std ~0.27:
# 0.25 is about 16 grey levels at the worst one of the 442,368 values, 0.01 about 0.7 of a grey
# level on average. Measured on this file's pictures (4000 x 3000 and 4001 x 3001, whole image and
# regions, turned or not): max 0.117 to 0.171, mean 0.0048 to 0.0068 (a JPEG's DCT scaling is not
# Pillow's bicubic filter).
DRAFT_MAX_DIFF, DRAFT_MEAN_DIFF = 0.25, 0.01


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of the pictures Pillow decodes while the test runs (a spy on ``ImageFile.load``)."""
    seen: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile):
        if self.tile:  # still undecoded (later calls on a loaded picture return at once)
            seen.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return seen


@pytest.fixture(scope="module")
def thin_bomb() -> bytes:
    """The finding: 39,000,000 x 1 pixels (under the 40 Mpx limit) in about 38 KB of PNG."""
    data = encoded(Image.new("L", (39_000_000, 1)), "PNG")
    assert len(data) < 64_000
    return data


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with what photos have: gradients, shapes with sharp edges, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width * 255, y / height * 255, (x + y) % 400 / 400 * 255], -1)
    pixels += rng.normal(0, 20, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    largest = max(4, min(width, height) // 10)
    for _ in range(200):
        x0, y0 = int(rng.integers(0, width - largest)), int(rng.integers(0, height - largest))
        size = rng.integers(2, largest, 2)
        draw.ellipse(
            (x0, y0, x0 + int(size[0]), y0 + int(size[1])), fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
    return image


# ------------------------------------------------------------------------- limits before decoding
def test_thin_png_under_the_pixel_limit_is_refused_before_decoding(engine: ItmEngine, thin_bomb, loads) -> None:
    with pytest.raises(InvalidInputError) as caught:
        engine.prepare_image(thin_bomb, field="items[0].image")
    assert str(caught.value) == (
        f"items[0].image: is 39000000 x 1 pixels; the longer side must be at most {DEFAULT_MAX_IMAGE_SIDE:,} "
        "pixels (max_image_side)"
    )
    assert caught.value.field == "items[0].image" and caught.value.too_large
    assert loads == []


def test_extreme_aspect_ratio_is_refused_before_decoding(engine: ItmEngine, loads) -> None:
    strip = encoded(Image.new("RGB", (16_000, 400)), "PNG")  # 6.4 Mpx, 40:1, every side within limits
    with pytest.raises(InvalidInputError) as caught:
        engine.prepare_image(strip)
    assert str(caught.value) == (
        f"image: is 16000 x 400 pixels, an aspect ratio of 40.0:1; at most {DEFAULT_MAX_IMAGE_ASPECT:g}:1 is "
        "accepted (max_image_aspect)"
    )
    assert loads == []


def test_size_limits_are_settings_and_real_photo_shapes_pass(tiny_blip_dir: Path) -> None:
    strict = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(max_image_side=100, max_image_aspect=2.5))
    with pytest.raises(InvalidInputError, match=r"is 50 x 101 pixels; the longer side must be at most 100 pixels"):
        strict.prepare_image(png_bytes(1, (50, 101)))
    with pytest.raises(InvalidInputError, match=r"aspect ratio of 3.0:1; at most 2.5:1 is accepted"):
        strict.prepare_image(png_bytes(2, (60, 20)))
    strict.prepare_image(png_bytes(3, (100, 40)))  # exactly at both limits
    # The defaults pass what cameras and phones make: 4:3, 3:2, 16:9 and a 6:1 panorama.
    for width, height in ((4032, 3024), (6000, 4000), (3840, 2160), (12_000, 2000), (2000, 12_000)):
        open_image(
            encoded(Image.new("L", (width, height)), "PNG"), max_bytes=1 << 30, max_pixels=40_000_000
        )  # no error


def test_region_outside_the_image_is_refused_before_decoding(engine: ItmEngine, loads) -> None:
    data = png_bytes(4, (40, 32))
    region = Region.from_values([0, 0, 10, 10, 5, 5, 60, 20])
    with pytest.raises(InvalidInputError, match=r"items\[0\]\.region\[6\]: is 60: outside the image"):
        engine.prepare_image(data, region=region, region_field="items[0].region")
    assert loads == []


# ----------------------------------------------------------------------------- reduced decoding
def test_blank_canvas_reaches_the_processor_small(engine: ItmEngine, loads) -> None:
    """The finding's 6000 x 6000 blank PNG (35 KB) is decoded whole (PNG has no reduced decode),
    but the processor gets it resized: it used to turn all 36 Mpx into float arrays."""
    canvas = Image.new("RGB", (6000, 6000), (90, 120, 200))
    data = encoded(canvas, "PNG")
    given: list[tuple[int, int]] = []
    processor = engine.processor.image_processor
    real_call = type(processor).__call__

    def recording_call(self, images, **kwargs):
        given.append(images.size)
        return real_call(self, images, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(processor), "__call__", recording_call)
        pixels = engine.prepare_image(data).pixel_values
    assert loads == [(6000, 6000)]
    assert given == [(32, 32)]  # the tiny model's processor size
    full = processor(images=canvas, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, full, atol=1e-6, rtol=0)  # flat colour: any resize gives it exactly


@pytest.fixture(scope="module")
def base_size_engine(tiny_blip_dir: Path) -> ItmEngine:
    """The tiny model with BLIP-base's image processor (384 x 384): the decode path at real scale."""
    processor = BlipProcessor.from_pretrained(tiny_blip_dir)
    processor.image_processor = type(processor.image_processor)(
        size={"height": BLIP_BASE_SIZE, "width": BLIP_BASE_SIZE}
    )
    model = BlipForImageTextRetrieval.from_pretrained(tiny_blip_dir)
    return ItmEngine(
        model, processor, model_id="tiny", weights_identity="tiny", settings=EngineSettings(device="cpu", dtype="fp32")
    )


@pytest.fixture(scope="module")
def large_jpeg() -> tuple[Image.Image, bytes]:
    image = photo(4000, 3000)
    return image, encoded(image, "JPEG", quality=90)


def assert_close_to_full_decode(drafted: torch.Tensor, full: torch.Tensor) -> None:
    difference = (drafted - full).abs()
    assert difference.max().item() <= DRAFT_MAX_DIFF, difference.max().item()
    assert difference.mean().item() <= DRAFT_MEAN_DIFF, difference.mean().item()


def test_large_jpeg_is_drafted_and_gives_the_full_decodes_input(base_size_engine: ItmEngine, large_jpeg, loads):
    _, data = large_jpeg
    pixels = base_size_engine.prepare_image(data).pixel_values
    # Decoded at 1/2 (2000 x 1500): 1/4 would leave 750 rows, under DRAFT_GAP x 384 = 768.
    assert loads == [(2000, 1500)]
    decoded = Image.open(io.BytesIO(data)).convert("RGB")  # the full decode, then BLIP's resize
    full = base_size_engine.processor.image_processor(images=decoded, return_tensors="pt")["pixel_values"]
    assert_close_to_full_decode(pixels, full)


def test_region_of_a_drafted_jpeg_is_the_same_view(base_size_engine: ItmEngine, large_jpeg, loads) -> None:
    _, data = large_jpeg
    region = Region.from_values([200, 300, 2200, 2600, 1500, 400, 3600, 2800])  # union 3400 x 2500
    pixels = base_size_engine.prepare_image(data, region=region).pixel_values
    assert loads == [(2000, 1500)]  # the union box keeps 1250 >= 768 rows at 1/2
    full_image = Image.open(io.BytesIO(data)).convert("RGB")
    full = base_size_engine.preprocess(base_size_engine.render(full_image, region))
    assert_close_to_full_decode(pixels, full)
    # A small pair needs every pixel: no draft.
    loads.clear()
    small = Region.from_values([100, 100, 400, 500, 300, 200, 600, 600])
    base_size_engine.prepare_image(data, region=small)
    assert loads == [(4000, 3000)]


def test_mask_policy_view_of_a_drafted_jpeg(base_size_engine: ItmEngine, large_jpeg, loads) -> None:
    """The mask policy dims the drafted picture outside the boxes (scaled, fractional here)."""
    _, data = large_jpeg
    masking = ItmEngine(
        base_size_engine.model,
        base_size_engine.processor,
        model_id="tiny",
        weights_identity="tiny",
        settings=EngineSettings(device="cpu", dtype="fp32", region_policy="mask"),
    )
    region = Region.from_values([201.3, 301.7, 2203, 2601, 1501, 401, 3601, 2801])
    pixels = masking.prepare_image(data, region=region).pixel_values
    assert loads == [(2000, 1500)]
    full_image = Image.open(io.BytesIO(data)).convert("RGB")
    assert_close_to_full_decode(pixels, masking.preprocess(masking.render(full_image, region)))


def test_draft_only_where_the_format_has_it(large_jpeg) -> None:
    image, jpeg = large_jpeg
    drafted, scale = load_image(open_image(jpeg, max_bytes=1 << 30, max_pixels=40_000_000), scale=0.2)
    assert (drafted.size, scale) == ((1000, 750), 0.25)  # 1/4 is the smallest scale keeping >= 0.2
    png = encoded(image.resize((800, 600)), "PNG")
    whole, scale = load_image(open_image(png, max_bytes=1 << 30, max_pixels=40_000_000), scale=0.2)
    assert (whole.size, scale) == ((800, 600), 1.0)


def test_small_images_reach_the_processor_untouched(engine: ItmEngine) -> None:
    """Nothing changes below 2 x DRAFT_GAP x the processor's size (JPEG) and below 2 x REDUCING_GAP
    x that size (every format): the pixels are the stock processor's, exactly (tiny model: 32 px)."""
    for data in (encoded(photo(120, 100, seed=3), "JPEG"), encoded(photo(190, 150, seed=4), "PNG")):
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        expected = engine.processor.image_processor(images=decoded, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(engine.prepare_image(data).pixel_values, expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------ pixel modes
def test_sixteen_bit_grey_png_is_scaled_not_clipped(engine: ItmEngine) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    data = encoded(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    decoded, _ = load_image(open_image(data, max_bytes=1 << 20, max_pixels=10_000))
    grey = np.asarray(decoded)[..., 0].astype(int)
    expected = np.round(ramp / 257).astype(int)
    assert decoded.mode == "RGB" and np.abs(grey - expected).max() <= 1  # Pillow's convert: 255 nearly everywhere


@pytest.mark.parametrize(
    ("image", "fmt", "options", "pixel"),
    [
        pytest.param(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", {}, (255, 0, 0), id="cmyk-jpeg"),
        pytest.param(Image.new("P", (16, 16), 1), "PNG", {"transparency": 0}, None, id="palette-transparency"),
        pytest.param(Image.new("LA", (16, 16), (200, 0)), "PNG", {}, (200, 200, 200), id="grey-alpha"),
        pytest.param(Image.new("1", (16, 16), 1), "PNG", {}, (255, 255, 255), id="bilevel"),
    ],
)
def test_every_mode_decodes_to_rgb(image: Image.Image, fmt: str, options: dict, pixel) -> None:
    if image.mode == "P":
        image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
        pixel = (10, 200, 30)
    decoded, _ = load_image(open_image(encoded(image, fmt, **options), max_bytes=1 << 20, max_pixels=10_000))
    assert decoded.mode == "RGB" and decoded.size == (16, 16)
    assert all(abs(a - b) <= 3 for a, b in zip(decoded.getpixel((8, 8)), pixel, strict=True))


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_their_first_frame(fmt: str, loads) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    decoded, _ = load_image(open_image(data, max_bytes=1 << 20, max_pixels=10_000))
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert decoded.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(decoded.getpixel((8, 8)), (250, 0, 0), strict=True))


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_other_photo_formats_are_accepted(fmt: str) -> None:
    decoded, _ = load_image(
        open_image(encoded(Image.new("RGB", (16, 16), (9, 99, 199)), fmt), max_bytes=1 << 20, max_pixels=10_000)
    )
    assert decoded.getpixel((8, 8)) == (9, 99, 199)


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "SGI", "ICO"])
def test_formats_no_photo_comes_in_are_refused(engine: ItmEngine, fmt: str, loads) -> None:
    """Pillow reads some forty formats; each is a parser that hostile bytes could reach."""
    data = encoded(Image.new("RGB", (16, 16)), fmt)
    with pytest.raises(
        InvalidInputError, match=r"not a decodable image file \([\d,]+ bytes; accepted: JPEG, PNG, WEBP"
    ):
        engine.prepare_image(data)
    assert loads == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_files_are_a_clear_error(engine: ItmEngine, fmt: str) -> None:
    data = encoded(photo(400, 300, seed=5), fmt)
    with pytest.raises(
        InvalidInputError, match=r"^items\[1\]\.image: (image data is truncated or corrupt|not a decod)"
    ):
        engine.prepare_image(data[: len(data) * 2 // 3], field="items[1].image")


# ------------------------------------------------------------------------------- through the APIs
@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator:
    with running_teacher(teacher_settings(tiny_blip_dir, max_image_aspect=4.0)) as running:
        yield running


def test_limits_reach_the_native_api_as_invalid_argument(teacher, thin_bomb) -> None:
    with grpc.insecure_channel(teacher.target) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        for data, detail in (
            (thin_bomb, "items[0].image: is 39000000 x 1 pixels; the longer side must be at most 16,384 pixels"),
            (png_bytes(5, (100, 20)), "items[0].image: is 100 x 20 pixels, an aspect ratio of 5.0:1; at most 4:1"),
        ):
            request = pb.ScoreRequest(items=[pb.ImageSentences(image=data, sentences=["a person ride a horse"])])
            with pytest.raises(grpc.RpcError) as caught:
                stub.Score(request, timeout=60)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith(detail), caught.value.details()
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert info.ready  # still serving


def test_limits_reach_kserve_naming_the_tensor_element(teacher, thin_bomb) -> None:
    client = triton.InferenceServerClient(url=teacher.target)
    try:
        images = triton.InferInput("IMAGE", [2], "BYTES")
        images.set_data_from_numpy(np.array([png_bytes(6), thin_bomb], dtype=np.object_))
        texts = triton.InferInput("TEXT", [2], "BYTES")
        texts.set_data_from_numpy(np.array([b"a person ride a horse"] * 2, dtype=np.object_))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("blip_itm", [images, texts])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert caught.value.message().startswith("IMAGE[1]: is 39000000 x 1 pixels; the longer side must be at most")
    finally:
        client.close()


def test_limits_reach_the_http_api_as_413_naming_the_field(tiny_blip_dir: Path, thin_bomb) -> None:
    with running_http(teacher_settings(tiny_blip_dir, max_image_side=1000)) as running, running.client() as client:
        response = client.post("/v1/score", json={"image": b64(thin_bomb), "sentences": ["a person ride a horse"]})
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["field"] == "image"
        assert error["message"] == (
            "image: is 39000000 x 1 pixels; the longer side must be at most 1,000 pixels (max_image_side)"
        )
        assert client.get("/v1/model").json()["limits"]["max_image_side"] == 1000


# ------------------------------------------------------------------------------ EXIF orientation
@pytest.mark.parametrize(
    ("stored", "orientation"),
    [
        pytest.param((4000, 3000), 6, id="turned-clockwise"),
        # Odd sides end in a partial pixel at 1/2, which turning or mirroring shows first.
        pytest.param((4001, 3001), 8, id="turned-anticlockwise-odd"),
        pytest.param((4001, 3001), 3, id="upside-down-odd"),
    ],
)
def test_turned_jpeg_is_drafted_and_its_regions_are_in_shown_pixels(
    base_size_engine: ItmEngine, loads, stored: tuple[int, int], orientation: int
) -> None:
    """A JPEG with an EXIF orientation: its regions (and the limits) are checked in shown pixels
    from the header, then it is drafted and each view resized from its exact box."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(photo(*stored, seed=7), "JPEG", quality=90, exif=exif.tobytes())
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    region = Region.from_values([100, 1000, 2600, 2900, 400, 1500, 2900, 2950])  # union 2800 x 1950
    for view in (None, region):
        loads.clear()
        pixels = base_size_engine.prepare_image(data, region=view).pixel_values
        assert loads == [((stored[0] + 1) // 2, (stored[1] + 1) // 2)]
        full = base_size_engine.preprocess(base_size_engine.render(shown, view))
        assert_close_to_full_decode(pixels, full)
    outside = Region.from_values([100, 100, 4500, 900, 200, 200, 300, 300])
    loads.clear()
    width, height = shown.size
    with pytest.raises(InvalidInputError, match=rf"region\[2\]: is 4500: outside the image .* {width}x{height} pixels"):
        base_size_engine.prepare_image(data, region=outside)
    assert loads == []
