"""Training curves of a run directory: one PNG with the loss terms per epoch and the test mAP.

    python -m student plot runs/hico                  # writes runs/hico/curves.png
    plot_training_curves(Path("runs/hico"), Path("curves.png"))

Reads what ``train`` writes (``student.training``): ``epochs.csv`` (one row per epoch: the means
of the loss terms, and the test mAP of the epochs that ``run.eval_every`` evaluated), plus
``metrics.json`` (the final evaluation) and ``config.yaml`` (which dataset, hence which mAP). Not
TensorBoard's event files: a run with ``run.tensorboard=false`` is drawn the same, and plotting
needs no tensorboard. Left panel: every ``loss*`` column that has a value, on a log scale when
all are positive (the terms differ by orders of magnitude). Right panel: the mAP against epochs.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CURVES_NAME = "curves.png"
#: The picture's size in pixels (width, height): FIGURE_INCHES at DPI.
FIGURE_INCHES = (12.0, 4.5)
DPI = 100
#: A fixed colour per curve, so that two runs' pictures compare at a glance (matplotlib's tab10).
CURVE_COLOURS: dict[str, str] = {
    "loss": "#1f77b4",
    "loss_hoi": "#ff7f0e",
    "loss_itm": "#2ca02c",
    "loss_obj_ce": "#d62728",
    "loss_verb_ce": "#9467bd",
    "loss_sub_bbox": "#8c564b",
    "loss_obj_bbox": "#e377c2",
    "loss_sub_giou": "#bcbd22",
    "loss_obj_giou": "#17becf",
    "map": "#000080",
}
_OTHER_COLOUR = "#7f7f7f"  # a loss column this table does not know yet
_MAP_NAMES = {"hico": "HICO-DET mAP (%), Default Full", "vcoco": "V-COCO role AP (%), scenario 1"}


class CurvesError(ValueError):
    """The run directory holds nothing to plot (no ``epochs.csv``, no rows, a malformed cell)."""


@dataclass
class RunCurves:
    """What the picture shows, read from a run directory.

    ``epochs``: the x of each ``epochs.csv`` row: epoch number (1-based) of a completed epoch,
    or its middle (``n - 0.5``) for one that ``schedule.max_steps`` stopped. ``losses``: column
    -> one value per row (NaN where the row has none). ``maps``: (x, mAP %) of the evaluated
    rows, then of the final evaluation (``final_map``) when the last row has none.
    """

    run_dir: Path
    epochs: list[float] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    maps: list[tuple[float, float]] = field(default_factory=list)
    final_map: tuple[float, float] | None = None
    map_name: str = "test mAP (%)"


def read_curves(run_dir: str | Path) -> RunCurves:
    """Read ``epochs.csv`` (and ``metrics.json``, ``config.yaml``) of ``run_dir``.

    Raises:
        CurvesError: ``run_dir`` is not a directory, has no ``epochs.csv`` or no row in it, or a
            cell is not a number (the message names the file, line and column).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CurvesError(f"{run_dir}: not a directory (expected a training run directory, run.output_dir)")
    path = run_dir / "epochs.csv"
    if not path.is_file():
        raise CurvesError(
            f"{path} does not exist: {run_dir} is not a training run directory, or its first epoch has "
            "not ended yet (train writes a row of epochs.csv after every epoch)"
        )
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise CurvesError(f"{path} has no epoch rows yet (train writes one after every epoch)")
    curves = RunCurves(run_dir=run_dir, map_name=_map_name(run_dir))
    columns = [column for column in rows[0] if column.startswith("loss")]
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        epoch = _number(row, "epoch", path, line)
        completed = row.get("completed", "1") != "0"
        x = epoch + 1 if completed else epoch + 0.5
        curves.epochs.append(x)
        for column in columns:
            curves.losses.setdefault(column, []).append(_number(row, column, path, line))
        value = _number(row, "map", path, line)
        if math.isfinite(value):
            curves.maps.append((x, value))
    curves.losses = {key: values for key, values in curves.losses.items() if any(map(math.isfinite, values))}
    final = _final_headline(run_dir)
    last = curves.epochs[-1]
    if final is not None and not (curves.maps and curves.maps[-1][0] == last):
        curves.final_map = (last, final)
    return curves


def plot_training_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves into one PNG (default ``RUN_DIR/curves.png``); returns its path.

    Raises:
        CurvesError: see ``read_curves``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = read_curves(run_dir)
    out = Path(out) if out is not None else curves.run_dir / CURVES_NAME
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    losses, maps = figure.subplots(1, 2, width_ratios=(3, 2))
    figure.suptitle(f"training run {curves.run_dir.resolve().name}")
    _draw_losses(losses, curves)
    _draw_maps(maps, curves)
    for axes in (losses, maps):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.25
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, format="png")
    return out


def _draw_losses(axes: Any, curves: RunCurves) -> None:
    for name, values in curves.losses.items():
        total = name == "loss"
        axes.plot(
            curves.epochs,
            values,
            label=name,
            color=CURVE_COLOURS.get(name, _OTHER_COLOUR),
            linewidth=2.5 if total else 1.5,
            marker="o",
            markersize=4,
            zorder=3 if total else 2,
        )
    values = [v for series in curves.losses.values() for v in series if math.isfinite(v)]
    if values and min(values) > 0:
        axes.set_yscale("log")  # the bbox terms are ~0.1, the class terms ~1, the total ~10
    axes.set_title("loss terms (epoch means)")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    if curves.losses:
        axes.legend(fontsize="small", ncols=2)


def _draw_maps(axes: Any, curves: RunCurves) -> None:
    colour = CURVE_COLOURS["map"]
    if curves.maps:
        xs, ys = zip(*curves.maps, strict=True)
        axes.plot(xs, ys, color=colour, linewidth=2, marker="o", label="evaluated (run.eval_every)")
    if curves.final_map is not None:
        axes.plot(*curves.final_map, color=colour, marker="*", markersize=14, linestyle="", label="final evaluation")
    if not curves.maps and curves.final_map is None:
        axes.text(
            0.5,
            0.5,
            "not evaluated yet\n(run.eval_every evaluates during training,\nrun.eval_at_end after it)",
            ha="center",
            va="center",
            transform=axes.transAxes,
        )
    else:
        axes.legend(fontsize="small")
    axes.set_xlim(0, max(curves.epochs) + 0.5)
    # From 0, so that a rise of a tenth of a point does not look like a leap.
    highest = max([y for _, y in curves.maps] + ([curves.final_map[1]] if curves.final_map else []), default=1.0)
    axes.set_ylim(0, highest * 1.15 + 0.5)
    axes.set_title("evaluation on the test split")
    axes.set_xlabel("epoch")
    axes.set_ylabel(curves.map_name)
    axes.grid(True, alpha=0.3)


def _number(row: dict[str, Any], column: str, path: Path, line: int) -> float:
    text = row.get(column)
    if text is None or text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise CurvesError(f"{path}, line {line}, column {column}: {text!r} is not a number") from None


def _map_name(run_dir: Path) -> str:
    """The headline metric's name, from the dataset in the run's ``config.yaml``."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        return _MAP_NAMES.get(config["data"]["dataset"], "test mAP (%)")
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "test mAP (%)"


def _final_headline(run_dir: Path) -> float | None:
    """The final evaluation's headline number (``metrics.json``), as ``EvalResult.headline`` reads it."""
    try:
        summary = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    value = summary.get("scenario_1") if "scenario_1" in summary else (summary.get("default") or {}).get("full")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
