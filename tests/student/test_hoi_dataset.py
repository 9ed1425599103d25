"""HOIDataset targets follow docs/contracts.md; collate_fn pads and masks."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from student.data.collate import collate_fn
from student.data.hoi_dataset import HOIDataset
from student.data.transforms import make_transforms
from teacher_server.hoi.classes import HICO_VERBS, OBJECT_NAMES, VCOCO_VERBS
from teacher_server.hoi.errors import DatasetError

torch.set_num_threads(1)

HORSE, CUP, BALL = 19, 47, 37  # COCO ids
RIDE, STRADDLE, HOLD, KICK = (HICO_VERBS.index(v) for v in ("ride", "straddle", "hold", "kick"))


def hico_entries() -> list[dict]:
    return [
        {  # one person rides+straddles a horse and holds a cup; a second person holds the same cup
            "file_name": "a.jpg",
            "annotations": [
                {"bbox": [10, 5, 40, 60], "category_id": 1},
                {"bbox": [0, 30, 80, 80], "category_id": HORSE},
                {"bbox": [40, 20, 50, 30], "category_id": CUP},
                {"bbox": [60, 0, 100, 50], "category_id": 1},
            ],
            "hoi_annotation": [
                {"subject_id": 0, "object_id": 1, "category_id": RIDE + 1, "hoi_category_id": 140},
                {"subject_id": 0, "object_id": 2, "category_id": HOLD + 1, "hoi_category_id": 298},
                {"subject_id": 0, "object_id": 1, "category_id": STRADDLE + 1, "hoi_category_id": 142},
                {"subject_id": 3, "object_id": 2, "category_id": HOLD + 1, "hoi_category_id": 298},
            ],
        },
        {
            "file_name": "b.png",
            "annotations": [
                {"bbox": [2, 2, 20, 30], "category_id": 1},
                {"bbox": [20, 25, 30, 35], "category_id": BALL},
            ],
            "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": KICK + 1, "hoi_category_id": 496}],
        },
        {"file_name": "c.jpg", "annotations": [], "hoi_annotation": []},
    ]


def make_files(root: Path, entries: list[dict], name: str = "trainval_hico.json") -> Path:
    (root / "images").mkdir(exist_ok=True)
    sizes = {"a.jpg": (100, 80), "b.png": (40, 60), "c.jpg": (30, 30)}
    for i, (file_name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (10 * i, 100, 200)).save(root / "images" / file_name)
    path = root / name
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def hico(tmp_path) -> HOIDataset:
    return HOIDataset(tmp_path / "images", make_files(tmp_path, hico_entries()), "hico")


def test_target_follows_the_contract(hico, tmp_path):
    image, target = hico[0]
    assert image.shape == (3, 80, 100) and image.dtype == torch.float32
    assert set(target) == {
        "obj_labels",
        "verb_labels",
        "verb_known",
        "sub_boxes",
        "obj_boxes",
        "size",
        "orig_size",
        "image_id",
        "file_name",
        "image_digest",
        "pair_regions_orig",
        "frame_affine",
    }
    assert target["verb_known"].tolist() == [True, True, True]
    # Three pairs: (0, horse) with ride+straddle merged, (0, cup), (3, cup), in order of appearance.
    assert target["obj_labels"].dtype == torch.long
    assert [OBJECT_NAMES[i] for i in target["obj_labels"]] == ["horse", "cup", "cup"]
    verbs = target["verb_labels"]
    assert verbs.shape == (3, 117) and verbs.dtype == torch.float32
    assert torch.nonzero(verbs).tolist() == [[0, RIDE], [0, STRADDLE], [1, HOLD], [2, HOLD]]
    # cxcywh normalised by the (unchanged) size 100 x 80.
    assert torch.allclose(target["sub_boxes"][0], torch.tensor([0.25, 32.5 / 80, 0.3, 55 / 80]))
    assert torch.allclose(target["obj_boxes"][0], torch.tensor([0.4, 55 / 80, 0.8, 50 / 80]))
    assert torch.allclose(target["sub_boxes"][2], torch.tensor([0.8, 25 / 80, 0.4, 50 / 80]))
    assert target["size"].tolist() == [80, 100] and target["orig_size"].tolist() == [80, 100]
    assert target["size"].dtype == torch.long
    assert target["image_id"] == 0 and target["file_name"] == "a.jpg"
    expected = hashlib.sha256((tmp_path / "images" / "a.jpg").read_bytes()).hexdigest()
    assert target["image_digest"] == expected == hico.image_digest(0)


def test_digest_is_of_the_original_file_whatever_the_augmentation(tmp_path):
    path = make_files(tmp_path, hico_entries())
    train = HOIDataset(tmp_path / "images", path, "hico", make_transforms("train", (48, 64), 96))
    plain = HOIDataset(tmp_path / "images", path, "hico")
    torch.manual_seed(0)
    image, target = train[0]
    assert image.shape[-2:] != (80, 100)
    assert target["orig_size"].tolist() == [80, 100]
    assert target["size"].tolist() == list(image.shape[-2:])
    assert target["image_digest"] == plain[0][1]["image_digest"]


def test_raw_annotation_and_introspection(hico):
    assert hico.raw_annotation(1) == hico_entries()[1]
    assert len(hico) == 3 and hico.num_verbs == 117 and hico.verbs == HICO_VERBS
    _, empty = hico[2]
    assert empty["verb_labels"].shape == (0, 117) and empty["sub_boxes"].shape == (0, 4)


def test_skip_empty_keeps_file_indices(tmp_path):
    entries = hico_entries()
    entries.insert(0, entries.pop())  # the empty image first
    dataset = HOIDataset(tmp_path / "images", make_files(tmp_path, entries), "hico", skip_empty=True)
    assert len(dataset) == 2
    assert [dataset[i][1]["image_id"] for i in range(2)] == [1, 2]
    assert dataset[0][1]["file_name"] == "a.jpg"


def test_truncation_warns_once_and_keeps_the_first_pairs(tmp_path):
    path = make_files(tmp_path, hico_entries())
    with pytest.warns(UserWarning, match=r"1 image\(s\) have more than max_pairs=2 .*a.jpg \(3\)"):
        dataset = HOIDataset(tmp_path / "images", path, "hico", max_pairs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, target = dataset[0]
    assert [OBJECT_NAMES[i] for i in target["obj_labels"]] == ["horse", "cup"]
    with pytest.raises(DatasetError, match="raise max_pairs"):
        HOIDataset(tmp_path / "images", path, "hico", max_pairs=2, on_truncate="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HOIDataset(tmp_path / "images", path, "hico", max_pairs=2, on_truncate="ignore")
        HOIDataset(tmp_path / "images", path, "hico", max_pairs=3)


def test_missing_image_is_reported_up_front_or_on_access(tmp_path):
    path = make_files(tmp_path, hico_entries())
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"entry 1 \(b.png\): file_name: image file .*b.png does not exist"):
        HOIDataset(tmp_path / "images", path, "hico")
    lazy = HOIDataset(tmp_path / "images", path, "hico", check_images=False)
    lazy[0]
    with pytest.raises(DatasetError, match=r"entry 1 \(b.png\): file_name: image file .*does not exist"):
        lazy[1]
    with pytest.raises(DatasetError, match=r"image directory .* does not exist"):
        HOIDataset(tmp_path / "nowhere", path, "hico")


def test_box_outside_image_is_caught_on_access_when_images_were_not_checked(tmp_path):
    entries = hico_entries()
    entries[1]["annotations"][1]["bbox"] = [20, 25, 30, 70]  # b.png is 60 px high
    path = make_files(tmp_path, entries)
    with pytest.raises(DatasetError, match=r"entry 1 \(b.png\): annotations\[1\].bbox .* outside the 40x60"):
        HOIDataset(tmp_path / "images", path, "hico")
    lazy = HOIDataset(tmp_path / "images", path, "hico", check_images=False)
    with pytest.raises(DatasetError, match=r"annotations\[1\].bbox .* outside the 40x60"):
        lazy[1]


def test_box_policy_clamps_or_drops_and_reports_what_it_fixed(tmp_path):
    entries = hico_entries()
    entries[1]["annotations"][1]["bbox"] = [20, 25, 30, 70]  # b.png is 60 px high: 10 px past it
    path = make_files(tmp_path, entries)
    with pytest.warns(UserWarning, match=r"box_policy=clamp: 1 box clamped into its image"):
        clamped = HOIDataset(tmp_path / "images", path, "hico", box_policy="clamp")
    assert clamped.box_fixes.boxes_clamped == 1
    _, target = clamped[1]  # the default transforms give cxcywh normalised by (w, h) = (40, 60)
    torch.testing.assert_close(target["obj_boxes"][0], torch.tensor([25 / 40, 42.5 / 60, 10 / 40, 35 / 60]))
    # Images not checked up front: the box is clamped when the image is read.
    lazy = HOIDataset(tmp_path / "images", path, "hico", box_policy="clamp", check_images=False)
    torch.testing.assert_close(lazy[1][1]["obj_boxes"], target["obj_boxes"])
    with pytest.warns(UserWarning, match=r"1 box dropped .* with 1 HOI .* 1 image left without pairs"):
        dropped = HOIDataset(tmp_path / "images", path, "hico", box_policy="drop", skip_empty=True)
    assert dropped.indices == [0]  # b.png lost its only pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file warns about nothing
        HOIDataset(tmp_path / "images", make_files(tmp_path, hico_entries()), "hico", box_policy="clamp")


def test_unreadable_image(tmp_path):
    path = make_files(tmp_path, hico_entries())
    (tmp_path / "images" / "b.png").write_bytes(b"not an image")
    lazy = HOIDataset(tmp_path / "images", path, "hico", check_images=False)
    with pytest.raises(DatasetError, match=r"entry 1 \(b.png\): file_name: .* is not a readable image"):
        lazy[1]


def test_vcoco_pair_without_object(tmp_path):
    entries = [
        {
            "file_name": "a.jpg",
            "annotations": [
                {"bbox": [10, 5, 40, 60], "category_id": 1},
                {"bbox": [40, 20, 50, 30], "category_id": CUP},
            ],
            "hoi_annotation": [
                {"subject_id": 0, "object_id": -1, "category_id": VCOCO_VERBS.index("stand")},
                {"subject_id": 0, "object_id": 1, "category_id": VCOCO_VERBS.index("hold_obj")},
                {"subject_id": 0, "object_id": -1, "category_id": VCOCO_VERBS.index("smile")},
            ],
        }
    ]
    dataset = HOIDataset(
        tmp_path / "images",
        make_files(tmp_path, entries, "trainval_vcoco.json"),
        "vcoco",
        make_transforms("train", (40, 48), 80),
    )
    for seed in range(5):  # whatever the flip / resize / crop, the no-object row stays zero
        torch.manual_seed(seed)
        _, target = dataset[0]
        assert target["verb_labels"].shape[1] == 29
        no_object = target["obj_labels"] == 80
        assert no_object.any()
        assert (target["obj_boxes"][no_object] == 0).all()
        stand_smile = target["verb_labels"][no_object][0]
        assert torch.nonzero(stand_smile).flatten().tolist() == [
            VCOCO_VERBS.index("stand"),
            VCOCO_VERBS.index("smile"),
        ]


def test_collate_pads_and_masks(hico):
    samples = [hico[0], hico[1]]  # 3x80x100 and 3x60x40
    images, masks, targets = collate_fn(samples)
    assert images.shape == (2, 3, 80, 100) and masks.shape == (2, 80, 100) and masks.dtype == torch.bool
    assert torch.equal(images[1, :, :60, :40], samples[1][0])
    assert (images[1, :, 60:, :] == 0).all() and (images[1, :, :, 40:] == 0).all()
    assert not masks[0].any()
    assert not masks[1, :60, :40].any() and masks[1, 60:, :].all() and masks[1, :, 40:].all()
    assert targets == [samples[0][1], samples[1][1]]
    with pytest.raises(ValueError):
        collate_fn([])


def test_data_loader_batches(hico):
    loader = DataLoader(hico, batch_size=3, collate_fn=collate_fn)
    images, masks, targets = next(iter(loader))
    assert images.shape == (3, 3, 80, 100) and masks.shape == (3, 80, 100)
    assert [t["image_id"] for t in targets] == [0, 1, 2]


def test_pairs_without_verbs_are_kept_with_unknown_verbs(tmp_path):
    # Image c gets a person and a ball linked as a pair whose verbs were never annotated: it is
    # no longer empty, and its pair's verbs are unknown (verb_known False), not negative.
    entries = hico_entries()
    entries[2]["annotations"] = [
        {"bbox": [2, 2, 15, 28], "category_id": 1},
        {"bbox": [16, 20, 24, 28], "category_id": BALL},
    ]
    entries[2]["pairs_without_verbs"] = [{"subject_id": 0, "object_id": 1}]
    dataset = HOIDataset(tmp_path / "images", make_files(tmp_path, entries), "hico", skip_empty=True)
    assert dataset.indices == [0, 1, 2]
    _, target = dataset[2]
    assert target["verb_known"].tolist() == [False]
    assert target["verb_labels"].sum() == 0
    assert [OBJECT_NAMES[i] for i in target["obj_labels"]] == ["sports ball"]
