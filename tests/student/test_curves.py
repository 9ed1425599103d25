"""``student.curves`` and ``python -m student plot``: the PNG of a run's loss terms and mAP per epoch.

The run directories here are written by hand in the format of ``student.training`` (its
``EPOCH_COLUMNS``); tests/student/test_train.py plots a real training run's directory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from student.__main__ import main
from student.curves import CURVE_COLOURS, DPI, FIGURE_INCHES, CurvesError, plot_training_curves, read_curves
from student.training import EPOCH_COLUMNS

SIZE = (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))  # 1200 x 450


def write_run(run_dir: Path, rows: list[dict[str, object]], metrics: dict | None = None) -> Path:
    """A run directory with ``epochs.csv`` (``rows``, other columns empty) and a HICO-DET config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "epochs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, EPOCH_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in EPOCH_COLUMNS})
    (run_dir / "config.yaml").write_text("data:\n  dataset: hico\n")
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def falling_rows(epochs: int, *, evaluated: bool) -> list[dict[str, object]]:
    """Losses falling by a half per epoch (all terms > 0), mAP rising by 5 points when ``evaluated``."""
    rows = []
    for epoch in range(epochs):
        scale = 0.5**epoch
        row: dict[str, object] = {"epoch": epoch, "completed": 1, "loss": 8 * scale, "loss_hoi": 6 * scale}
        row.update(loss_itm=2 * scale, loss_obj_ce=1.5 * scale, loss_verb_ce=0.4 * scale, loss_sub_bbox=0.2 * scale)
        if evaluated:
            row["map"] = 5.0 * (epoch + 1)
        rows.append(row)
    return rows


def colour_pixels(picture: np.ndarray, colour: str, tolerance: int = 12) -> np.ndarray:
    """(H, W) bool: the pixels within ``tolerance`` of ``colour`` (``#rrggbb``) on every channel."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(picture[..., :3].astype(int) - rgb) <= tolerance).all(axis=-1)


def load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == SIZE
        return np.asarray(image.convert("RGB"))


def test_plot_draws_the_loss_terms_and_the_map(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", falling_rows(6, evaluated=True))
    out = plot_training_curves(run_dir)
    assert out == run_dir / "curves.png"
    picture = load(out)
    left, right = picture[:, : SIZE[0] // 2], picture[:, SIZE[0] * 2 // 3 :]  # width ratios 3:2
    # Each curve is a 1.5-2.5 px line with markers across most of its panel (hundreds of px), far
    # more than its legend sample (a ~20 px stroke, < 100 pixels).
    for term in ("loss", "loss_hoi", "loss_itm", "loss_obj_ce", "loss_verb_ce", "loss_sub_bbox"):
        assert colour_pixels(left, CURVE_COLOURS[term]).sum() > 300, term
    assert colour_pixels(right, CURVE_COLOURS["map"]).sum() > 300
    # The empty columns draw nothing: no pixel of their colours anywhere.
    for term in ("loss_obj_bbox", "loss_sub_giou", "loss_obj_giou"):
        assert not colour_pixels(picture, CURVE_COLOURS[term]).any(), term
    # The mAP rises: its pixels on the right of its panel lie higher (smaller y) than on the left.
    ys, xs = np.nonzero(colour_pixels(right, CURVE_COLOURS["map"]))
    middle = (xs.min() + xs.max()) / 2
    assert ys[xs > middle].mean() < ys[xs < middle].mean()


def test_plot_marks_the_final_evaluation_and_writes_where_asked(tmp_path: Path) -> None:
    # eval_every=0: only metrics.json holds an mAP (one star on the right panel).
    run_dir = write_run(tmp_path / "run", falling_rows(3, evaluated=False), {"default": {"full": 12.5}})
    curves = read_curves(run_dir)
    assert curves.maps == [] and curves.final_map == (3, 12.5)
    assert curves.map_name.startswith("HICO-DET mAP")
    out = plot_training_curves(run_dir, tmp_path / "elsewhere" / "c.png")
    assert out == tmp_path / "elsewhere" / "c.png" and not (run_dir / "curves.png").exists()
    right = load(out)[:, SIZE[0] * 2 // 3 :]
    assert colour_pixels(right, CURVE_COLOURS["map"]).sum() > 40  # the star (14 pt) and its legend entry
    # Without metrics.json nothing of the mAP's colour is drawn (the panel says "not evaluated yet").
    (run_dir / "metrics.json").unlink()
    bare = load(plot_training_curves(run_dir, tmp_path / "bare.png"))
    assert not colour_pixels(bare, CURVE_COLOURS["map"]).any()


def test_a_stopped_epoch_sits_at_its_middle(tmp_path: Path) -> None:
    rows = [{"epoch": 0, "completed": 1, "loss": 2.0}, {"epoch": 1, "completed": 0, "loss": 1.0}]
    curves = read_curves(write_run(tmp_path / "run", rows))
    assert curves.epochs == [1, 1.5] and list(curves.losses) == ["loss"]  # empty columns are left out


def run_plot(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plot", *argv])
    return code, out.getvalue(), err.getvalue()


def test_plot_command_prints_the_picture(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", falling_rows(2, evaluated=True))
    code, out, err = run_plot(str(run_dir), "--out", str(tmp_path / "p.png"))
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "p.png")
    load(tmp_path / "p.png")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d, "epochs.csv does not exist: {d} is not a training run directory"),
        (lambda d: d / "missing", "{d}/missing: not a directory"),
        (lambda d: write_run(d / "r", []), "epochs.csv has no epoch rows yet"),
        (lambda d: write_run(d / "r", [{"epoch": 0, "loss": "fast"}]), "line 2, column loss: 'fast' is not a number"),
    ],
    ids=["empty directory", "no directory", "header only", "bad cell"],
)
def test_plot_errors_name_what_is_missing(tmp_path: Path, make, expected: str) -> None:
    target = make(tmp_path)
    with pytest.raises(CurvesError):
        read_curves(target)
    code, out, err = run_plot(str(target))
    assert code == 2 and out == ""
    assert err.startswith("plot: ") and expected.format(d=tmp_path) in err, err
    assert not list(tmp_path.rglob("*.png"))
