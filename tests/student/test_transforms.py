"""Augmentation keeps boxes on the pixels they annotate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from student.box_ops import denormalize_cxcywh, frame_to_original
from student.data.transforms import (
    SMALL_MAX_SIZE,
    SMALL_SCALES,
    BoxesToCxcywh,
    ColorJitter,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    crop,
    identity_affine,
    make_transforms,
    resized_shape,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def scene(no_object_pair: bool = False):
    """A 160x120 (w x h) grey image: a red 'human' and a blue 'object' rectangle, one pair on them.

    Optionally a second pair (V-COCO style) with the same human and no object.
    """
    image = Image.new("RGB", (160, 120), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    sub, obj = (20, 30, 60, 100), (90, 50, 140, 80)
    # PIL fills the end pixel: a box [x1, y1, x2, y2] covers pixels x1..x2-1.
    draw.rectangle((sub[0], sub[1], sub[2] - 1, sub[3] - 1), fill=RED)
    draw.rectangle((obj[0], obj[1], obj[2] - 1, obj[3] - 1), fill=BLUE)
    pairs = 2 if no_object_pair else 1
    target = {
        "sub_boxes": torch.tensor([sub] * pairs, dtype=torch.float32),
        "obj_boxes": torch.tensor([obj, (0, 0, 0, 0)][:pairs], dtype=torch.float32),
        "has_object": torch.tensor([True, False][:pairs]),
        "obj_labels": torch.tensor([32, 80][:pairs]),
        "verb_labels": torch.eye(2)[:pairs],
        "size": torch.tensor([120, 160]),
        "orig_size": torch.tensor([120, 160]),
        "image_id": 3,
    }
    return image, target


def colour_box(image: torch.Tensor, colour) -> list[float] | None:
    """xyxy extent (pixel edges) of pixels close to ``colour`` in a (3, H, W) [0, 1] tensor."""
    reference = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
    mask = (image - reference).abs().max(dim=0).values < 0.25
    if not mask.any():
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def assert_encloses(box: torch.Tensor, region: list[float], slack: float = 1.5) -> None:
    """The box encloses the colour region and fits it tightly (resampling blurs edges by ~1 px)."""
    x1, y1, x2, y2 = box.tolist()
    rx1, ry1, rx2, ry2 = region
    assert x1 - slack <= rx1 and y1 - slack <= ry1 and rx2 <= x2 + slack and ry2 <= y2 + slack, (box, region)
    assert rx1 <= x1 + slack and ry1 <= y1 + slack and x2 - slack <= rx2 and y2 - slack <= ry2, (box, region)


GEOMETRIC = [
    pytest.param(RandomHorizontalFlip(p=1.0), id="flip"),
    pytest.param(RandomResize([200], max_size=400), id="upscale"),
    pytest.param(RandomResize([64], max_size=100), id="downscale"),
    pytest.param(RandomSizeCrop(70, 110), id="crop"),
    pytest.param(make_transforms("train", SMALL_SCALES, SMALL_MAX_SIZE).transforms[1], id="train-select"),
]


@pytest.mark.parametrize("transform", GEOMETRIC)
@pytest.mark.parametrize("seed", range(6))
def test_boxes_still_enclose_their_colour(transform, seed):
    torch.manual_seed(seed)
    image, target = scene()
    pipeline = Compose([transform, ToTensor(), BoxesToCxcywh()])  # no Normalize: keep colours
    tensor, out = pipeline(image, target)
    height, width = tensor.shape[-2:]
    assert out["size"].tolist() == [height, width]
    sub = denormalize_cxcywh(out["sub_boxes"], width, height)
    obj = denormalize_cxcywh(out["obj_boxes"], width, height)
    red, blue = colour_box(tensor, RED), colour_box(tensor, BLUE)
    if len(sub):
        assert red is not None and blue is not None
        assert_encloses(sub[0], red)
        assert_encloses(obj[0], blue)
    else:  # the crop lost the pair: then one of the colours must be (nearly) gone
        assert red is None or blue is None


def test_flip_mirrors_boxes_and_twice_is_identity():
    image, target = scene()
    flip = RandomHorizontalFlip(p=1.0)
    flipped, once = flip(image, target)
    assert once["sub_boxes"].tolist() == [[100.0, 30.0, 140.0, 100.0]]
    back, twice = flip(flipped, once)
    assert torch.equal(twice["sub_boxes"], target["sub_boxes"])
    assert np.array_equal(np.asarray(back), np.asarray(image))
    _, untouched = RandomHorizontalFlip(p=0.0)(image, target)
    assert untouched is target


def test_resized_shape():
    assert resized_shape(120, 160, 60, None) == (60, 80)
    assert resized_shape(160, 120, 60, None) == (80, 60)
    assert resized_shape(100, 400, 200, 500) == (125, 500), "longer side capped by max_size"


def test_random_resize_picks_one_of_the_sizes():
    image, target = scene()
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        resized, out = RandomResize([60, 90])(image, target)
        assert min(resized.size) in (60, 90)
        assert out["size"].tolist() == [resized.height, resized.width]
        seen.add(min(resized.size))
    assert seen == {60, 90}


def test_crop_drops_pairs_that_lose_a_box_and_keeps_pairs_without_object():
    image, target = scene(no_object_pair=True)
    # Left half: the human stays, the object (x 90..140) is cut away.
    cropped, out = crop(image, target, (0, 0, 120, 80))
    assert cropped.size == (80, 120)
    assert out["obj_labels"].tolist() == [80], "only the pair without object survives"
    assert out["obj_boxes"].tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert out["sub_boxes"].tolist() == [[20.0, 30.0, 60.0, 100.0]]
    assert out["verb_labels"].tolist() == [[0.0, 1.0]]
    # Shifted crop: boxes move and are clipped to it.
    _, shifted = crop(image, target, (40, 30, 50, 100))
    assert shifted["sub_boxes"][0].tolist() == [0.0, 0.0, 30.0, 50.0]
    assert shifted["obj_boxes"][0].tolist() == [60.0, 10.0, 100.0, 40.0]
    assert shifted["size"].tolist() == [50, 100]


def test_random_size_crop_retries_rather_than_losing_every_pair():
    image, target = scene()
    for seed in range(10):
        torch.manual_seed(seed)
        _, out = RandomSizeCrop(20, 30, max_tries=50)(image, target)
        assert len(out["sub_boxes"]) == 1


def test_boxes_to_cxcywh_keeps_no_object_rows_zero():
    image, target = scene(no_object_pair=True)
    _, out = Compose([ToTensor(), BoxesToCxcywh()])(image, target)
    assert "has_object" not in out
    assert torch.allclose(out["sub_boxes"][0], torch.tensor([40 / 160, 65 / 120, 40 / 160, 70 / 120]))
    assert torch.allclose(out["obj_boxes"][0], torch.tensor([115 / 160, 65 / 120, 50 / 160, 30 / 120]))
    assert out["obj_boxes"][1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert out["image_id"] == 3 and out["orig_size"].tolist() == [120, 160]


def test_to_tensor_and_normalize():
    image = Image.new("RGB", (4, 2), (124, 116, 104))  # ImageNet mean in 0..255
    tensor, _ = Compose([ToTensor(), Normalize()])(image, {})
    assert tensor.shape == (3, 2, 4) and tensor.dtype == torch.float32
    assert tensor.abs().max() < 0.01


def test_color_jitter_changes_pixels_not_boxes():
    torch.manual_seed(0)
    image, target = scene()
    jittered, out = ColorJitter(0.4, 0.4, 0.4)(image, target)
    assert out is target and jittered.size == image.size
    assert not np.array_equal(np.asarray(jittered), np.asarray(image))


def test_random_select_uses_both_branches():
    calls = []
    first = lambda image, target: (calls.append("first"), (image, target))[1]  # noqa: E731
    second = lambda image, target: (calls.append("second"), (image, target))[1]  # noqa: E731
    select = RandomSelect(first, second, p=0.5)
    torch.manual_seed(0)
    for _ in range(20):
        select(None, {})
    assert set(calls) == {"first", "second"}


def test_make_transforms_test_split_resizes_to_the_largest_scale():
    image, target = scene()
    tensor, out = make_transforms("test", SMALL_SCALES, SMALL_MAX_SIZE)(image, target)
    assert tensor.shape == (3, 160, 213)
    assert out["size"].tolist() == [160, 213] and out["orig_size"].tolist() == [120, 160]


def test_make_transforms_train_output_is_a_model_input():
    torch.manual_seed(1)
    image, target = scene()
    tensor, out = make_transforms("train", SMALL_SCALES, SMALL_MAX_SIZE, color_jitter=0.2)(image, target)
    assert tensor.dim() == 3 and tensor.shape[0] == 3
    assert min(tensor.shape[-2:]) <= max(SMALL_SCALES) and max(tensor.shape[-2:]) <= SMALL_MAX_SIZE
    assert out["sub_boxes"].shape[-1] == 4 and (out["sub_boxes"] >= 0).all() and (out["sub_boxes"] <= 1).all()


def test_make_transforms_without_scales_keeps_the_size_and_rejects_unknown_splits():
    image, target = scene()
    tensor, _ = make_transforms("test", scales=None)(image, target)
    assert tensor.shape == (3, 120, 160)
    with pytest.raises(ValueError, match="split"):
        make_transforms("val")  # type: ignore[arg-type]


def with_frame(target: dict) -> dict:
    """``scene``'s target as the dataset builds it: original-pixel regions and the identity frame."""
    regions = torch.cat((target["sub_boxes"], target["obj_boxes"]), dim=1)
    return {**target, "pair_regions_orig": regions, "frame_affine": identity_affine()}


@pytest.mark.parametrize("transform", GEOMETRIC)
@pytest.mark.parametrize("seed", range(6))
def test_the_frame_affine_maps_augmented_boxes_back_to_the_original(transform, seed):
    torch.manual_seed(seed)
    image, target = scene(no_object_pair=True)
    target = with_frame(target)
    tensor, out = Compose([transform, ToTensor(), BoxesToCxcywh()])(image, target)
    height, width = tensor.shape[-2:]
    # The original-pixel regions are per-pair rows: untouched, and dropped with their pair.
    kept = len(out["obj_labels"])
    assert out["pair_regions_orig"].shape == (kept, 8)
    assert torch.equal(out["pair_regions_orig"], target["pair_regions_orig"][:kept])
    assert out["obj_labels"].tolist() == target["obj_labels"][:kept].tolist()
    if kept:
        # Boxes the crop did not clip come back exactly (resizes are float scales: to 1e-3 px).
        sub = denormalize_cxcywh(out["sub_boxes"][:1], width, height)
        obj = denormalize_cxcywh(out["obj_boxes"][:1], width, height)
        box = lambda b: frame_to_original(b, out["frame_affine"], (120, 160))[0].tolist()  # noqa: E731
        checked = 0
        for predicted, colour, original in ((sub, RED, [20, 30, 60, 100]), (obj, BLUE, [90, 50, 140, 80])):
            extent = colour_box(tensor, colour)
            # Only a box no crop edge cut is whole in the frame (a cut one maps back to its cut part).
            if extent is not None and extent[0] > 0 and extent[1] > 0 and extent[2] < width and extent[3] < height:
                assert box(predicted) == pytest.approx(original, abs=1e-3)
                checked += 1
        assert checked or isinstance(transform, (RandomSizeCrop, RandomSelect))


def test_flip_resize_crop_compose_into_one_affine():
    image, target = scene()
    target = with_frame(target)
    torch.manual_seed(0)
    _, flipped = RandomHorizontalFlip(p=1.0)(image, target)
    # Mirror in a 160 px wide image: x = -1 * x_orig + 160.
    assert flipped["frame_affine"].tolist() == [-1.0, 160.0, 1.0, 0.0]
    resized_image, resized = RandomResize([60])(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped)
    # 160x120 -> 80x60: both scales 0.5; then x = -0.5 x_orig + 80, y = 0.5 y_orig.
    assert resized["frame_affine"].tolist() == [-0.5, 80.0, 0.5, 0.0]
    _, cropped = crop(resized_image, resized, (5, 10, 50, 60))
    # A crop at (top 5, left 10) shifts: x = -0.5 x_orig + 70, y = 0.5 y_orig - 5.
    assert cropped["frame_affine"].tolist() == [-0.5, 70.0, 0.5, -5.0]
    # The human box [20, 30, 60, 100] in the final frame: x 70 - 30 = 40 .. 70 - 10 = 60, y 10 .. 45.
    assert cropped["sub_boxes"].tolist() == [[40.0, 10.0, 60.0, 45.0]]
    back = frame_to_original(cropped["sub_boxes"], cropped["frame_affine"], (120, 160))
    assert back.tolist() == [[20.0, 30.0, 60.0, 100.0]]
    assert torch.equal(cropped["pair_regions_orig"], target["pair_regions_orig"])


def test_frame_to_original_clamps_to_the_image_and_refuses_a_zero_scale():
    boxes = torch.tensor([[-10.0, -4.0, 30.0, 200.0]])
    assert frame_to_original(boxes, [1.0, 0.0, 1.0, 0.0], (120, 160)).tolist() == [[0.0, 0.0, 30.0, 120.0]]
    with pytest.raises(ValueError, match="scale of 0"):
        frame_to_original(boxes, [0.0, 0.0, 1.0, 0.0])
