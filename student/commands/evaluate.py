"""``python -m student evaluate``: run a checkpoint over the test split, write preds.json, print metrics.

    python -m student evaluate --checkpoint runs/hico/checkpoint.pth [--config student/configs/hico.yaml]
        [KEY=VALUE ...] [--output preds.json] [--json]

The model architecture always comes from the checkpoint (the config it was trained with);
``--config`` and the overrides choose the data (paths, test scale) and post-processing. Without
``--config`` the checkpoint's own config is used for everything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from student.builders import resolve_device
from student.checkpoint import load_checkpoint
from student.commands.common import USER_ERRORS, report_error
from student.config import ConfigError, TrainConfig, apply_overrides, config_from_dict, load_config
from student.evaluation import save_predictions
from student.evaluation.report import format_table
from student.inference import evaluate_model
from student.model import HOIDetector


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``evaluate``."""
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pth written by train")
    parser.add_argument(
        "--config", type=Path, help="YAML config of the data and eval settings (default: the checkpoint's)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.root=/data/hico")
    parser.add_argument("--output", type=Path, help="where to write preds.json (default: next to the checkpoint)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides run.device)")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON metrics (percent)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def evaluation_config(checkpoint_config: dict, config_path: Path | None, overrides: list[str]) -> TrainConfig:
    """The config to evaluate with: data/eval from ``config_path`` (+ overrides), model from the checkpoint."""
    if config_path is None:
        raw = apply_overrides(dict(checkpoint_config), overrides)
        return config_from_dict(raw)
    given = load_config(config_path, overrides)
    raw = given.to_dict()
    raw["model"] = checkpoint_config["model"]
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise ConfigError(f"{config_path} does not fit the checkpoint's model: {error}") from None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m student evaluate``."""
    started = time.perf_counter()
    overrides = list(args.overrides or [])
    if args.device:
        overrides.append(f"run.device={args.device}")
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        config = evaluation_config(checkpoint["config"], args.config, overrides)
        device = resolve_device(config.run.device)
        model = HOIDetector(config.model)
        model.load_state_dict(checkpoint["model"])
        model.to(device)
        entries, result = evaluate_model(model, config, device, progress=False if args.no_progress else None)
        assert result is not None  # one process: always scored
    except USER_ERRORS as error:
        return report_error("evaluate", error)
    output = args.output or args.checkpoint.with_name("preds.json")
    save_predictions(entries, output)
    position = checkpoint["position"]
    print(
        f"checkpoint {args.checkpoint} (epoch {position['epoch']}, step {position['global_step']}) on "
        f"{config.data.path('test_annotations')}: {len(entries)} images"
    )
    print(format_table(result.result))
    print(f"predictions written to {output} ({time.perf_counter() - started:.1f} s)")
    if args.json:
        print(json.dumps(result.summary))
    return 0
