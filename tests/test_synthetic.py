"""Synthetic HICO-format data: deterministic, valid through our own loader, boxes on the drawing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from student.__main__ import main as student_main
from student.data.hoi_dataset import HOIDataset
from student.data.synthetic import (
    INTERACTIONS,
    RARE_THRESHOLD,
    Recorder,
    draw_person,
    make_group,
    render_scene,
    write_synthetic_dataset,
)
from teacher_server.hoi.annotations import load_annotations, load_correspondence
from teacher_server.hoi.classes import HICO_HOIS, HICO_VERBS, OBJECT_NAMES, hico_correspondence

torch.set_num_threads(1)


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summary = write_synthetic_dataset(root, train=40, test=12, seed=3, progress=False)
    return root, summary


def test_layout_and_counts(small):
    root, summary = small
    train = json.loads((root / "annotations" / "trainval_hico.json").read_text())
    test = json.loads((root / "annotations" / "test_hico.json").read_text())
    assert len(train) == 40 and len(test) == 12
    assert len(list((root / "images" / "train").glob("*.jpg"))) == 40
    assert len(list((root / "images" / "test").glob("*.jpg"))) == 12
    assert summary.images == {"train": 40, "test": 12}
    assert summary.pairs["train"] == sum(len(e["annotations"]) // 2 for e in train)
    for entry in train + test:
        assert set(entry) == {"file_name", "annotations", "hoi_annotation"}
        assert 1 <= len(entry["annotations"]) // 2 <= 2
        assert all(set(box) == {"bbox", "category_id"} for box in entry["annotations"])
        assert all(isinstance(v, int) for box in entry["annotations"] for v in box["bbox"])


def test_correspondence_is_the_real_hico_table(small):
    root, _ = small
    assert (load_correspondence(root / "annotations" / "corre_hico.npy") == hico_correspondence()).all()


def test_files_load_through_the_dataset_with_every_check(small):
    root, _ = small
    annotations = load_annotations(
        root / "annotations" / "trainval_hico.json", "hico", image_root=root / "images" / "train"
    )
    used = {(h.verb, int(a.labels[h.object])) for a in annotations for h in a.hois}
    allowed = {(HICO_VERBS.index(v), OBJECT_NAMES.index(i.object_name)) for i in INTERACTIONS for v in i.verbs}
    assert used <= allowed
    for annotation in annotations:
        for h in annotation.hois:
            assert HICO_HOIS[h.hoi_id - 1] == (h.verb, annotation.labels[h.object])
            assert annotation.labels[h.subject] == 0
    dataset = HOIDataset(root / "images" / "test", root / "annotations" / "test_hico.json", "hico")
    image, target = dataset[0]
    assert image.shape[-2] == 128 and image.shape[-1] in (128, 144, 160)
    assert target["verb_labels"].sum() >= 1


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    root, _ = small
    write_synthetic_dataset(tmp_path / "again", train=40, test=12, seed=3, progress=False)
    assert files_of(tmp_path / "again") == files_of(root)
    write_synthetic_dataset(tmp_path / "other", train=40, test=12, seed=4, progress=False)
    other = files_of(tmp_path / "other")
    assert other["images/train/synth_train_000000.jpg"] != files_of(root)["images/train/synth_train_000000.jpg"]


def test_an_image_does_not_depend_on_how_many_are_written(small, tmp_path):
    root, _ = small
    write_synthetic_dataset(tmp_path / "few", train=3, test=0, seed=3, progress=False)
    name = "images/train/synth_train_000002.jpg"
    assert (tmp_path / "few" / name).read_bytes() == (root / name).read_bytes()


def blank_extent(draw_fn) -> tuple[list[float], list[int]]:
    """Draw one entity alone on white: (recorded box, pixel extent of what was drawn)."""
    image = Image.new("RGB", (400, 400), (255, 255, 255))
    recorder = Recorder(ImageDraw.Draw(image), origin=(200.0, 300.0))
    draw_fn(recorder)
    ys, xs = np.nonzero((np.asarray(image) != 255).any(axis=2))
    return recorder.box, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("interaction", INTERACTIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("facing", [-1, 1])
def test_recorded_boxes_fit_what_is_drawn(interaction, facing):
    group = make_group(interaction, 60.0, facing, np.random.default_rng(0))
    for draw_fn in (lambda rec: draw_person(rec, group.person), group.draw_object):
        box, pixels = blank_extent(draw_fn)
        for recorded, drawn in zip(box[:2], pixels[:2], strict=True):
            assert recorded - 1.5 <= drawn <= recorded + 1.5
        for recorded, drawn in zip(box[2:], pixels[2:], strict=True):
            assert recorded - 1.5 <= drawn <= recorded + 2.5


def boxes_of(scene):
    return [np.array(a["bbox"], dtype=float) for a in scene.annotations]


def overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def test_verbs_are_visible_in_the_geometry():
    """Riding: the person is above and on the object; looking or ignoring: apart; kicking: at the
    feet; flying: the kite above the head; the rest: touching."""
    seen = set()
    for index in range(100):
        scene = render_scene(np.random.default_rng([11, index]))
        boxes = boxes_of(scene)
        for k, interaction in enumerate(scene.interactions):
            person, obj = boxes[2 * k], boxes[2 * k + 1]
            seen.add(interaction.pose)
            if interaction.pose == "ride":  # on the object: higher, feet off the ground
                assert (
                    overlap(person, obj) > 0
                    and person[1] < obj[1]
                    and person[3] < obj[3] - 0.1 * (person[3] - person[1])
                )
            elif interaction.pose in ("look", "ignore"):
                assert overlap(person, obj) == 0
            elif interaction.pose == "fly":
                assert overlap(person, obj) == 0 and obj[3] < person[1] + 5
            elif interaction.pose == "kick":
                assert overlap(person, obj) > 0 and obj[1] > (person[1] + person[3]) / 2
            else:
                assert overlap(person, obj) > 0
        if len(scene.interactions) == 2:  # groups stand side by side
            assert boxes[1][2] <= min(boxes[2][0], boxes[3][0]) + 1 or boxes[0][0] >= max(boxes[2][2], boxes[3][2]) - 1
    assert seen == {"ride", "hold", "kick", "fly", "drink", "look", "ignore"}


def test_rare_and_common_triplets():
    counts = {}
    for index in range(300):
        for interaction in render_scene(np.random.default_rng([5, index])).interactions:
            counts[interaction.name] = counts.get(interaction.name, 0) + 1
    assert sum(1 for n in counts.values() if n < RARE_THRESHOLD) >= 3, counts
    assert sum(1 for n in counts.values() if n >= 2 * RARE_THRESHOLD) >= 6, counts


def test_command_line(tmp_path, capsys):
    assert student_main(["make-synthetic", "--out", str(tmp_path), "--train", "4", "--test", "2", "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert "train: 4 images" in output and "test: 2 images" in output
    assert len(json.loads((tmp_path / "annotations" / "trainval_hico.json").read_text())) == 4
    assert student_main(["make-synthetic", "--out", str(tmp_path), "--train", "-1", "--test", "2"]) == 2
    assert "image counts must be >= 0" in capsys.readouterr().out
