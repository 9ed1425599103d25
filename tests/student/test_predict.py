"""``python -m student predict``: a trained tiny student on synthetic images, its pictures and JSON,
judged by a real gRPC teacher (tiny BLIP), and the errors a user can cause."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image
from testkit import DEMO_CONFIG
from testkit.student import tiny_overrides
from testkit.teacher import RunningTeacher

from student.__main__ import main
from student.drawing import (
    CROSS_COLOUR,
    HUMAN_COLOUR,
    OBJECT_COLOUR,
    REJECTED_COLOUR,
    LabelLine,
    PairDrawing,
    PictureScale,
    draw_pairs,
)
from student.predict import PredictError, PredictSettings, Triplet, pair_drawings, picture_paths, predictions_schema
from teacher_server.client import TeacherClient
from teacher_server.hoi.prompts import triplet_sentence
from teacher_server.hoi.region import Region

TOP = 3


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data_root(synthetic_data) -> Path:
    # 128 px images as the demo makes them (the pictures' smallest legible case).
    return synthetic_data(8, 3, seed=14, image_size=128)


@pytest.fixture(scope="module")
def checkpoint(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train`` for one epoch at the tiny sizes: a real student checkpoint in seconds."""
    output = tmp_path_factory.mktemp("run")
    code, _, err = run_cli(
        "train",
        "--config",
        str(DEMO_CONFIG),
        *tiny_overrides(data_root, output, "schedule.epochs=1", "run.progress=false", "calibrate_bn_images=2"),
        "--teacher",
        "none",
    )
    assert code == 0, err
    return output / "checkpoint.pth"


@pytest.fixture(scope="module")
def predicted(checkpoint: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """``predict --json`` on the test images' directory (threshold 0: an untrained student's scores are low)."""
    out = tmp_path_factory.mktemp("pictures")
    code, stdout, err = run_cli(
        "predict",
        "--checkpoint",
        str(checkpoint),
        str(data_root / "images" / "test"),
        "--out",
        str(out),
        "--threshold",
        "0",
        "--top",
        str(TOP),
        "--device",
        "cpu",
        "--json",
    )
    assert code == 0, err
    return last_json(stdout), err


def drawn_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Where a box's outline lies: its corners rounded to whole pixels, clipped to the image."""
    x1, x2 = (min(max(round(v), 0), width - 1) for v in (box[0], box[2]))
    y1, y2 = (min(max(round(v), 0), height - 1) for v in (box[1], box[3]))
    return x1, y1, x2, y2


def edge_share(picture: np.ndarray, box: list[float], colour: tuple[int, int, int]) -> float:
    """Share of the pixels on the top edge of ``box`` that have ``colour``."""
    height, width = picture.shape[:2]
    x1, y1, x2, _ = drawn_box(box, width, height)
    row = picture[y1, x1 : x2 + 1]
    return float((row == colour).all(axis=-1).mean())


def box_edge_colours(picture: np.ndarray, box: list[float]) -> set[tuple[int, ...]]:
    """The colours at the middle of the four edges of ``box`` as drawn."""
    height, width = picture.shape[:2]
    x1, y1, x2, y2 = drawn_box(box, width, height)
    mid_x, mid_y = (x1 + x2) // 2, (y1 + y2) // 2
    return {tuple(picture[y, x].tolist()) for x, y in ((mid_x, y1), (mid_x, y2), (x1, mid_y), (x2, mid_y))}


# -- the JSON and the pictures -------------------------------------------------------------------


def test_the_json_validates_against_its_schema(predicted: tuple[dict, str], data_root: Path) -> None:
    document, err = predicted
    schema = predictions_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(document)
    files = sorted((data_root / "images" / "test").iterdir())
    assert [image["file"] for image in document["images"]] == [str(f) for f in files]
    for image in document["images"]:
        scores = [t["score"] for t in image["triplets"]]
        assert 1 <= len(scores) <= TOP and scores == sorted(scores, reverse=True)
        assert all(t["teacher"] is None for t in image["triplets"])
    assert err == ""  # no progress bar off a terminal (stderr is not one here)
    # The schema refuses what the contract forbids: a box of 3 numbers, a teacher of 1.5.
    bad = json.loads(json.dumps(document))
    bad["images"][0]["triplets"][0]["human_box"] = [0, 0, 1]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad["images"][0]["triplets"][0].update(human_box=[0, 0, 1, 1], teacher=1.5)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_the_boxes_are_drawn_where_the_predictions_say(predicted: tuple[dict, str]) -> None:
    document, _ = predicted
    for image in document["images"]:
        with Image.open(image["file"]) as original, Image.open(image["picture"]) as drawn:
            assert drawn.size == original.size and drawn.format == "PNG"
            picture = np.asarray(drawn.convert("RGB"))
        for triplet in image["triplets"]:
            # Human boxes are drawn last, in one colour: nothing covers their outline.
            assert box_edge_colours(picture, triplet["human_box"]) == {HUMAN_COLOUR}, triplet
            # An object box's outline may be crossed by a human box's; most of its top edge is its own.
            assert edge_share(picture, triplet["object_box"], OBJECT_COLOUR) > 0.5, triplet


def test_the_predictions_are_the_evaluate_commands(
    predicted: tuple[dict, str], checkpoint: Path, data_root: Path, tmp_path: Path
) -> None:
    # The same model run as evaluate (its test transform, post-processing and mapping back to the
    # original pixels): each image's best triplet is preds.json's best (NMS never drops the best).
    # One image per batch, so that no padding changes the CNN's outputs.
    preds = tmp_path / "preds.json"
    code, _, err = run_cli(
        "evaluate", "--checkpoint", str(checkpoint), "eval.batch_size=1", "--output", str(preds), "--no-progress"
    )
    assert code == 0, err
    from student.evaluation.predictions import verbs_of
    from teacher_server.hoi.classes import OBJECT_NAMES, coco_id_to_index

    by_name = {entry["file_name"]: entry for entry in json.loads(preds.read_text())}
    for image in predicted[0]["images"]:
        entry = by_name[Path(image["file"]).name]
        best = max(entry["hoi_prediction"], key=lambda hoi: hoi["score"])
        obj = entry["predictions"][best["object_id"]]
        first = image["triplets"][0]
        assert first["verb"] == verbs_of("hico")[best["category_id"] - 1]
        assert first["object"] == OBJECT_NAMES[coco_id_to_index(obj["category_id"])]
        # preds.json holds the same 0.01-px rounded boxes, read back through float32.
        assert first["human_box"] == pytest.approx(entry["predictions"][best["subject_id"]]["bbox"], abs=1e-4)
        assert first["object_box"] == pytest.approx(obj["bbox"], abs=1e-4)
        assert first["score"] == pytest.approx(best["score"], abs=1e-4)


# -- the teacher -----------------------------------------------------------------------------------


def test_the_teacher_scores_each_sentence_on_its_pair(
    teacher: RunningTeacher, checkpoint: Path, data_root: Path, tmp_path: Path
) -> None:
    image = sorted((data_root / "images" / "test").iterdir())[0]
    runs = {}
    for threshold in ("0", "1"):  # the teacher accepts everything / rejects everything
        code, out, err = run_cli(
            "predict",
            "--checkpoint",
            str(checkpoint),
            str(image),
            "--out",
            str(tmp_path / threshold),
            "--threshold",
            "0",
            "--top",
            str(TOP),
            "--teacher",
            f"grpc://{teacher.target}",
            "--teacher-threshold",
            threshold,
            "--json",
        )
        assert code == 0, err
        runs[threshold] = last_json(out)["images"][0]
        jsonschema.validate(last_json(out), predictions_schema())
    assert runs["0"]["triplets"] == runs["1"]["triplets"]
    triplets = runs["0"]["triplets"]
    with Image.open(image) as original:
        width, height = original.size
    with TeacherClient(teacher.target) as client:
        for triplet in triplets:
            # The pair's region: both boxes clipped to the image (the service refuses boxes outside it).
            limits = (width, height, width, height) * 2
            values = [
                min(max(v, 0.0), limit)
                for v, limit in zip(triplet["human_box"] + triplet["object_box"], limits, strict=True)
            ]
            sentence = triplet_sentence(triplet["verb"], triplet["object"])
            direct = client.score([image], [[sentence]], regions=[Region.from_values(values)])[0][0]
            assert triplet["teacher"] == pytest.approx(direct.match_prob, abs=1e-4)
    accepted = np.asarray(Image.open(runs["0"]["picture"]).convert("RGB"))
    rejected = np.asarray(Image.open(runs["1"]["picture"]).convert("RGB"))
    for triplet in triplets:
        assert box_edge_colours(accepted, triplet["human_box"]) == {HUMAN_COLOUR}
        # Rejected: grey dashed outlines (a dash starts at each box's left end), a red cross in the label.
        assert edge_share(rejected, triplet["human_box"], REJECTED_COLOUR) > 0.3
        assert edge_share(rejected, triplet["human_box"], HUMAN_COLOUR) == 0.0
    # The red of the cross is drawn only when the teacher rejects (compared with the photo's own pixels).
    with Image.open(image) as original:
        red_before = int((np.asarray(original.convert("RGB")) == CROSS_COLOUR).all(axis=-1).sum())
    assert int((accepted == CROSS_COLOUR).all(axis=-1).sum()) == red_before
    assert int((rejected == CROSS_COLOUR).all(axis=-1).sum()) > red_before


# -- errors ----------------------------------------------------------------------------------------


def test_a_corrupt_image_is_named(checkpoint: Path, data_root: Path, tmp_path: Path) -> None:
    good = sorted((data_root / "images" / "test").iterdir())[0]
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is no JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    for bad in (garbage, truncated):
        code, out, err = run_cli("predict", "--checkpoint", str(checkpoint), str(bad), "--out", str(tmp_path / "o"))
        assert code == 2 and err.startswith(f"predict: {bad}: not a readable image"), err
        assert out == ""
    code, _, err = run_cli("predict", "--checkpoint", str(checkpoint), str(tmp_path / "missing.jpg"))
    assert code == 2 and "missing.jpg: no such image file" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli("predict", "--checkpoint", str(checkpoint), str(empty))
    assert code == 2 and f"{empty}: a directory without image files" in err


def test_a_checkpoint_of_the_wrong_kind_is_named(
    checkpoint: Path, data_root: Path, tiny_blip_dir: Path, tmp_path: Path
) -> None:
    image = str(sorted((data_root / "images" / "test").iterdir())[0])
    random_file = tmp_path / "random.pth"
    random_file.write_bytes(bytes(range(256)) * 4)
    foreign = tmp_path / "detr.pth"
    torch.save({"model": {"weight": torch.zeros(2)}}, foreign)
    no_model = tmp_path / "no_model.pth"
    payload = torch.load(checkpoint, weights_only=True)
    del payload["config"]["model"]
    torch.save(payload, no_model)
    wrong_shapes = tmp_path / "wrong_shapes.pth"
    payload = torch.load(checkpoint, weights_only=True)
    payload["config"]["model"]["transformer"]["d_model"] = 48
    torch.save(payload, wrong_shapes)
    expected = {
        tiny_blip_dir: "is a directory without checkpoint.pth",
        tiny_blip_dir / "model.safetensors": "not a training checkpoint of this project",
        random_file: "not a readable checkpoint",
        foreign: "not a training checkpoint of this project",
        no_model: "has no model section (config.model)",
        wrong_shapes: "the model weights do not fit the checkpoint's config.model",
        tmp_path / "missing.pth": "does not exist",
    }
    for path, message in expected.items():
        code, out, err = run_cli("predict", "--checkpoint", str(path), image, "--out", str(tmp_path / "o"))
        assert code == 2 and str(path) in err and message in err, (path, err)
        assert out == ""
    # A run directory stands for its checkpoint.
    code, _, err = run_cli("predict", "--checkpoint", str(checkpoint.parent), image, "--out", str(tmp_path / "o"))
    assert code == 0, err


def test_bad_settings_name_the_flag(checkpoint: Path, data_root: Path) -> None:
    image = str(sorted((data_root / "images" / "test").iterdir())[0])
    for flags, message in (
        (["--threshold", "1.5"], "threshold = 1.5"),
        (["--top", "0"], "top = 0"),
        (["--teacher", "http://x:1"], "--teacher http://x:1"),
        (["--device", "cuda:7"], "run.device"),
    ):
        code, _, err = run_cli("predict", "--checkpoint", str(checkpoint), image, *flags)
        assert code == 2 and message in err, (flags, err)
    with pytest.raises(PredictError, match="nms-threshold"):
        PredictSettings(nms_threshold=-0.1)


# -- drawing ---------------------------------------------------------------------------------------


def test_drawn_boxes_links_and_labels_at_small_and_large_sizes() -> None:
    for size, human, obj in (
        ((128, 96), (10.4, 40.0, 50.0, 90.0), (70.0, 50.0, 120.0, 80.0)),
        ((1600, 1200), (130.0, 500.0, 625.0, 1125.0), (875.0, 625.0, 1500.0, 1000.0)),
    ):
        image = Image.new("RGB", size, (128, 128, 128))
        pairs = [PairDrawing(human, obj, (LabelLine("ride horse 0.91"), LabelLine("teacher 0.87")))]
        picture = np.asarray(draw_pairs(image, pairs))
        scale = PictureScale.of(*size)
        assert picture.shape == (size[1], size[0], 3)
        assert box_edge_colours(picture, list(human)) == {HUMAN_COLOUR}
        assert box_edge_colours(picture, list(obj)) == {OBJECT_COLOUR}
        # The outline is line_width pixels thick, drawn inward from the box's edge.
        x1, y1, x2, _ = drawn_box(human, *size)
        column = picture[y1 : y1 + scale.line_width + 1, (x1 + x2) // 2]
        assert (column[: scale.line_width] == HUMAN_COLOUR).all() and (column[-1] != HUMAN_COLOUR).any()
        # The label: light (anti-aliased white) text above the human box, as high as the font is.
        label = picture[:y1, x1 : x1 + 10 * scale.font_size]
        text_rows = np.flatnonzero((label > 200).all(axis=-1).any(axis=1))
        assert len(text_rows) >= scale.font_size  # two lines of text, each about font_size high
    assert PictureScale.of(128, 96) == PictureScale(line_width=1, font_size=10)
    assert PictureScale.of(1920, 1080) == PictureScale(line_width=4, font_size=45)


def test_pairs_group_their_triplets_and_a_rejected_pair_is_grey() -> None:
    human, obj = (1.0, 2.0, 30.0, 40.0), (20.0, 10.0, 60.0, 50.0)
    triplets = [
        Triplet("ride", "horse", 0.91, human, obj, teacher=0.87),
        Triplet("feed", "horse", 0.5, human, obj, teacher=0.12),
        Triplet("hold", "cup", 0.4, human, (5.0, 5.0, 9.0, 9.0), teacher=0.2),
    ]
    first, second = pair_drawings(triplets, teacher_threshold=0.5)
    assert [line.text for line in first.lines] == ["ride horse 0.91", "teacher 0.87", "feed horse 0.50", "teacher 0.12"]
    assert [line.crossed for line in first.lines] == [False, False, False, True] and not first.rejected
    assert second.rejected and second.lines[1].crossed
    untaught = pair_drawings([Triplet("ride", "horse", 0.9, human, obj)], teacher_threshold=0.5)
    assert untaught[0].lines == (LabelLine("ride horse 0.90"),) and not untaught[0].rejected
    lower = PairDrawing((20.0, 50.0, 60.0, 90.0), (40.0, 60.0, 80.0, 80.0), second.lines, rejected=True)
    picture = np.asarray(draw_pairs(Image.new("RGB", (96, 96)), [lower]))
    assert 0.3 < edge_share(picture, list(lower.human_box), REJECTED_COLOUR) < 1.0  # dashed: gaps
    assert edge_share(picture, list(lower.human_box), HUMAN_COLOUR) == 0.0


def test_pictures_never_overwrite_each_other(tmp_path: Path) -> None:
    files = [Path("a/cat.jpg"), Path("b/cat.png"), Path("dog.jpg"), Path("c/cat.jpg")]
    assert picture_paths(files, tmp_path) == [tmp_path / n for n in ("cat.png", "cat-2.png", "dog.png", "cat-3.png")]
