"""Synthetic HICO-format data: deterministic, valid through our own loader, boxes on the drawing."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from student.__main__ import main as student_main
from student.data.hoi_dataset import HOIDataset
from student.data.synthetic import (
    ANNOTATION_FILES,
    INTERACTIONS,
    RARE_THRESHOLD,
    Recorder,
    cooccurring_triplets,
    draw_person,
    make_group,
    render_scene,
    sample_ambiguous_pair,
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
    assert "image counts must be >= 0" in capsys.readouterr().err


# -- the world's weaknesses: the teacher corpus, dropped co-occurring labels, unlabelled pairs ----


def entries_of(root, split="train"):
    names = {"train": "trainval_hico.json", "test": "test_hico.json", "val": "val_hico.json"}
    return json.loads((root / "annotations" / names.get(split, f"{split}_hico.json")).read_text())


def secondary_labels(entries) -> int:
    """Labels of co-occurring second verbs (sit_on/straddle beside ride, hold beside fly/drink_with)."""
    second = {(HICO_VERBS.index(v), OBJECT_NAMES.index(o)) for v, o in cooccurring_triplets()}
    count = 0
    for entry in entries:
        by_pair: dict = {}
        for hoi in entry["hoi_annotation"]:
            by_pair.setdefault((hoi["subject_id"], hoi["object_id"]), []).append(hoi)
        for hois in by_pair.values():
            count += sum(
                1
                for h in hois
                if len(hois) > 1 and (h["category_id"] - 1, HICO_HOIS[h["hoi_category_id"] - 1][1]) in second
            )
    return count


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The same world written clean and with both kinds of label noise (same seed, same images)."""
    clean = tmp_path_factory.mktemp("clean")
    noisy = tmp_path_factory.mktemp("noisy")
    args = {"train": 200, "test": 20, "seed": 11, "image_size": 64, "max_people": 1, "progress": False}
    write_synthetic_dataset(clean, **args)
    summary = write_synthetic_dataset(noisy, **args, drop_cooccurring=0.6, verb_label_fraction=0.7)
    return clean, noisy, summary


def test_cooccurring_triplets_are_the_second_verbs_of_two_verb_interactions():
    assert cooccurring_triplets() == [("hold", "cup"), ("hold", "kite"), ("sit_on", "bicycle"), ("straddle", "horse")]


def test_label_noise_leaves_the_images_and_the_test_split_alone(noisy):
    clean, noisy_root, _ = noisy
    clean_files, noisy_files = files_of(clean), files_of(noisy_root)
    images = [name for name in clean_files if name.startswith("images/")]
    assert images and all(clean_files[name] == noisy_files[name] for name in images)
    assert clean_files["annotations/test_hico.json"] == noisy_files["annotations/test_hico.json"]
    assert clean_files["annotations/trainval_hico.json"] != noisy_files["annotations/trainval_hico.json"]


def test_label_noise_rates_and_what_is_recorded(noisy):
    clean, noisy_root, summary = noisy
    clean_entries, noisy_entries = entries_of(clean), entries_of(noisy_root)
    pairs = sum(len({(h["subject_id"], h["object_id"]) for h in e["hoi_annotation"]}) for e in clean_entries)
    unlabelled = sum(len(e.get("pairs_without_verbs", [])) for e in noisy_entries)
    # Binomial(200 pairs, 0.3): mean 60, sd 6.5; [35, 85] is about 4 sd either side.
    assert pairs == 200 and 35 <= unlabelled <= 85
    assert summary.noise_counts.pairs_without_verbs == unlabelled
    # Of the second-verb labels on pairs that kept their verbs, about 60 % are dropped.
    kept_pairs = [e for e, n in zip(clean_entries, noisy_entries, strict=True) if not n.get("pairs_without_verbs")]
    before, after = secondary_labels(kept_pairs), secondary_labels(noisy_entries)
    assert summary.noise_counts.labels_dropped == before - after
    assert before >= 30 and 0.4 <= (before - after) / before <= 0.8
    # Every pair is still there: labelled, or listed without verbs; no other label was touched.
    for clean_entry, noisy_entry in zip(clean_entries, noisy_entries, strict=True):
        assert clean_entry["annotations"] == noisy_entry["annotations"]
        kept = {json.dumps(h, sort_keys=True) for h in noisy_entry["hoi_annotation"]}
        assert kept <= {json.dumps(h, sort_keys=True) for h in clean_entry["hoi_annotation"]}
    recorded = json.loads((noisy_root / "synthetic.json").read_text())
    assert recorded["arguments"]["drop_cooccurring"] == 0.6 and recorded["arguments"]["verb_label_fraction"] == 0.7
    assert recorded["dropped_triplets"] == ["hold cup", "hold kite", "sit_on bicycle", "straddle horse"]
    assert recorded["pairs_without_verbs"] == unlabelled
    # The noisy training file still loads, pairs without verbs included.
    dataset = HOIDataset(
        noisy_root / "images" / "train", noisy_root / "annotations" / "trainval_hico.json", skip_empty=True
    )
    assert len(dataset) == 200


def test_label_noise_is_deterministic_and_zero_noise_changes_nothing(noisy, tmp_path):
    clean, noisy_root, _ = noisy
    args = {"train": 200, "test": 20, "seed": 11, "image_size": 64, "max_people": 1, "progress": False}
    write_synthetic_dataset(tmp_path / "again", **args, drop_cooccurring=0.6, verb_label_fraction=0.7)
    assert files_of(tmp_path / "again") == files_of(noisy_root)
    write_synthetic_dataset(tmp_path / "zero", **args, drop_cooccurring=0.0, verb_label_fraction=1.0)
    assert files_of(tmp_path / "zero") == files_of(clean)


@pytest.mark.parametrize(("name", "value"), [("drop_cooccurring", 1.5), ("verb_label_fraction", -0.1)])
def test_label_noise_rates_are_checked(tmp_path, name, value):
    with pytest.raises(ValueError, match=name):
        write_synthetic_dataset(tmp_path, 2, 1, progress=False, **{name: value})


def test_teacher_corpus_and_validation_splits(tmp_path):
    summary = write_synthetic_dataset(
        tmp_path, 10, 5, val=6, corpus=300, corpus_seed=99, seed=2, image_size=64, max_people=1, progress=False
    )
    assert summary.images == {"train": 10, "test": 5, "val": 6, "corpus": 300}
    assert len(list((tmp_path / "images" / "corpus").glob("*.jpg"))) == 300
    corpus = load_annotations(
        tmp_path / "annotations" / "corpus_hico.json", "hico", image_root=tmp_path / "images" / "corpus"
    )
    assert len(entries_of(tmp_path, "val")) == 6
    # Balanced: each of the 19 interactions is about 1/19 of 300 images (mean 15.8, sd 3.9).
    names = Counter()
    for annotation in corpus:
        for pair in annotation.pairs():
            names[
                " ".join(sorted(HICO_VERBS[v] for v in pair.verbs))
                + " "
                + OBJECT_NAMES[int(annotation.labels[pair.object])]
            ] += 1
    assert len(names) == len(INTERACTIONS) and min(names.values()) >= 4, names
    # Its own seed: another corpus seed draws other images; the train split is not affected.
    other = tmp_path / "other"
    write_synthetic_dataset(
        other, 10, 5, corpus=3, corpus_seed=100, seed=2, image_size=64, max_people=1, progress=False
    )
    assert (other / "images" / "train" / "synth_train_000000.jpg").read_bytes() == (
        tmp_path / "images" / "train" / "synth_train_000000.jpg"
    ).read_bytes()
    assert (other / "images" / "corpus" / "synth_corpus_000000.jpg").read_bytes() != (
        tmp_path / "images" / "corpus" / "synth_corpus_000000.jpg"
    ).read_bytes()


def test_command_line_world_options(tmp_path, capsys):
    argv = ["make-synthetic", "--out", str(tmp_path), "--train", "30", "--test", "2", "--val", "2", "--corpus", "3"]
    argv += ["--drop-cooccurring", "1", "--verb-label-fraction", "0.5", "--image-size", "64", "--no-progress"]
    assert student_main(argv) == 0
    output = capsys.readouterr().out
    assert "corpus: 3 images" in output and "val: 2 images" in output
    assert "co-occurring verb labels dropped" in output and "pairs without verbs" in output


# -- ambiguity: two people, two objects of one class, different verbs ----------------------------


def union(a, b) -> list[float]:
    return [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]


def grown(box, fraction=0.1) -> list[float]:
    """``box`` grown by ``fraction`` of its width / height on every side."""
    w, h = box[2] - box[0], box[3] - box[1]
    return [box[0] - fraction * w, box[1] - fraction * h, box[2] + fraction * w, box[3] + fraction * h]


def box_distance(a, b) -> float:
    """Shortest distance between two boxes (0 when they touch or overlap)."""
    dx = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
    return float(np.hypot(dx, dy))


@pytest.fixture(scope="module")
def ambiguous(tmp_path_factory):
    """Every image a two-person one (rate 1), at the smallest image size, in every split."""
    root = tmp_path_factory.mktemp("ambiguous")
    summary = write_synthetic_dataset(
        root, 16, 8, val=4, corpus=8, seed=5, image_size=64, max_people=1, two_person_rate=1.0, progress=False
    )
    return root, summary


def test_two_person_images_have_two_pairs_of_one_class_with_different_verbs(ambiguous):
    root, summary = ambiguous
    for split in ("train", "test", "val", "corpus"):
        entries = entries_of(root, split)
        assert summary.two_person_images[split] == [e["file_name"] for e in entries]
        # The reader takes the files with every check, and sees each pair with its own instance.
        annotations = load_annotations(
            root / "annotations" / ANNOTATION_FILES[split], "hico", image_root=root / "images" / split
        )
        for annotation in annotations:
            pairs = sorted(annotation.pairs(), key=lambda pair: pair.subject)
            assert [int(annotation.labels[i]) for i in range(4)].count(0) == 2  # two humans
            assert [(p.subject, p.object) for p in pairs] == [(0, 1), (2, 3)]  # each its own object
            classes = {int(annotation.labels[p.object]) for p in pairs}
            assert len(classes) == 1 and 0 not in classes  # one object class, two instances
            assert set(pairs[0].verbs) != set(pairs[1].verbs)
            boxes = [np.asarray(box, dtype=float) for box in annotation.boxes]
            for own, other in ((0, 2), (2, 0)):
                person, obj = boxes[own], boxes[own + 1]
                # Nearer its own object than the other one (box to box: a flown kite is high
                # above its person, so box centres can be nearer the other, held kite).
                assert box_distance(person, obj) < box_distance(person, boxes[other + 1])
                # The pair's union box grown by 10 % holds nothing of the other pair.
                region = grown(union(person, obj))
                assert overlap(region, boxes[other]) == 0 and overlap(region, boxes[other + 1]) == 0
    assert "train: 16 images" in summary.describe() and "16 two-person (ambiguous) images" in summary.describe()


def test_ambiguous_pairs_cover_every_object_class():
    rng = np.random.default_rng(0)
    drawn = [sample_ambiguous_pair(rng, balanced=True) for _ in range(200)]
    assert all(a.object_name == b.object_name and a.verbs != b.verbs for a, b in drawn)
    assert {a.object_name for a, _ in drawn} == {i.object_name for i in INTERACTIONS}
    # Random order: the pair's first-drawn (long-tail) interaction is not always on the left.
    assert 0.3 <= np.mean([a.weight >= b.weight for a, b in drawn]) <= 0.7


def test_two_person_rate_zero_changes_nothing_and_other_images_keep_their_bytes(small, tmp_path):
    root, _ = small
    write_synthetic_dataset(tmp_path / "zero", train=40, test=12, seed=3, progress=False, two_person_rate=0.0)
    assert files_of(tmp_path / "zero") == files_of(root)
    # At rate 0.5 about half the images are two-person ones: Binomial(60, 0.5), sd 3.9, [17, 43]
    # is about 3.3 sd either side. The others are the same bytes as at rate 0 (own random stream).
    summary = write_synthetic_dataset(tmp_path / "half", train=40, test=20, seed=3, progress=False, two_person_rate=0.5)
    chosen = summary.two_person_images
    assert 17 <= len(chosen["train"]) + len(chosen["test"]) <= 43
    recorded = json.loads((tmp_path / "half" / "synthetic.json").read_text())
    assert recorded["arguments"]["two_person_rate"] == 0.5 and recorded["two_person_images"] == chosen
    for split in ("train", "test"):
        entries = entries_of(tmp_path / "half", split)
        for entry in entries:
            people = sum(1 for box in entry["annotations"] if box["category_id"] == 1)
            assert (people == 2) if entry["file_name"] in chosen[split] else people in (1, 2)
        if split == "train":  # the small fixture has the same 40 training images at rate 0
            same = [
                name
                for name in (e["file_name"] for e in entries)
                if (tmp_path / "half" / "images" / split / name).read_bytes()
                == (root / "images" / split / name).read_bytes()
            ]
            assert sorted(same + chosen[split]) == sorted(e["file_name"] for e in entries)


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_two_person_rate_is_checked(tmp_path, rate):
    with pytest.raises(ValueError, match=r"two_person_rate \(--two-person-rate\) must be in \[0, 1\]"):
        write_synthetic_dataset(tmp_path, 2, 1, progress=False, two_person_rate=rate)


def test_command_line_two_person_rate(tmp_path, capsys):
    argv = ["make-synthetic", "--out", str(tmp_path), "--train", "3", "--test", "2", "--image-size", "64"]
    assert student_main([*argv, "--two-person-rate", "1", "--no-progress"]) == 0
    assert "train: 3 images" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "synthetic.json").read_text())
    assert recorded["arguments"]["two_person_rate"] == 1.0
    assert recorded["two_person_images"]["test"] == ["synth_test_000000.jpg", "synth_test_000001.jpg"]
    assert student_main([*argv, "--two-person-rate", "2", "--no-progress"]) == 2
    assert "--two-person-rate" in capsys.readouterr().err
