"""Training end to end on a tiny synthetic set: the CLI, the loop, data order, distillation, evaluate."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import DEMO_CONFIG
from testkit.student import tiny_overrides
from torch import nn

from student.__main__ import main
from student.builders import (
    build_initial_model,
    build_test_dataset,
    build_test_loader,
    build_train_dataset,
    build_train_loader,
    calibration_batch,
    correspondence_of,
)
from student.config import load_config
from student.engine import EpochSampler, SeededSamples, StepInfo, score_predictions
from student.inference import evaluate_model
from student.losses import DistillSettings, HOICriterion, TrainingLoss
from student.losses.distill import TEACHER_KEY
from student.training import train


@pytest.fixture(scope="module")
def data_root(synthetic_data) -> Path:
    return synthetic_data(12, 4, seed=1)


def tiny(root: Path, output: Path, *extra: str) -> list[str]:
    """Overrides that turn demo.yaml into a seconds-long run on ``root``, without a teacher."""
    return tiny_overrides(
        root,
        output,
        "optim.batch_size=4",
        "optim.lr=1e-3",
        "optim.backbone_lr=1e-3",
        "schedule.epochs=2",
        "schedule.lr_drop=[1]",
        "run.progress=false",
        "run.log_every=1",
        "teacher.source=none",
        *extra,
    )


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def read_log(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def trained_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m student train`` without a teacher, 2 epochs, evaluated at the end."""
    output = tmp_path_factory.mktemp("run-none")
    code, out, err = run_cli("train", "--config", str(DEMO_CONFIG), *tiny(data_root, output), "--teacher", "none")
    assert code == 0, err
    assert "teacher: no teacher" in err and "test: {" in out  # progress in the log, results on stdout
    return output


def test_train_writes_every_output(trained_run: Path, data_root: Path) -> None:
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "train_log.csv", "epochs.csv", "checkpoint.pth", "preds.json", "metrics.json"} <= names
    rows = read_log(trained_run / "train_log.csv")
    assert len(rows) == 6  # 12 images / batch 4 = 3 steps per epoch, 2 epochs, a row per step
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    assert all(row["loss_itm"] == "" for row in rows)  # no teacher, no distillation term
    assert [float(row["lr"]) for row in rows] == [1e-3] * 3 + [pytest.approx(1e-4)] * 3  # step drop after 1
    epochs = read_log(trained_run / "epochs.csv")
    assert [row["epoch"] for row in epochs] == ["0", "1"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(metrics) == {"default", "known_object", "mean_max_recall"}
    assert len(json.loads((trained_run / "preds.json").read_text())) == 4
    saved = load_config(trained_run / "config.yaml")
    assert saved.data.root == str(data_root) and saved.teacher.source == "none"


def test_train_writes_tensorboard_events_of_the_csv_numbers(trained_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list(trained_run.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(trained_run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    terms = ("loss", "loss_hoi", "loss_obj_ce", "loss_verb_ce", "loss_sub_bbox", "loss_obj_bbox")
    assert {f"train/{term}" for term in (*terms, "grad_norm")} <= tags
    assert {f"epoch/{term}" for term in terms} | {"lr/transformer", "lr/backbone", "eval/map"} <= tags
    assert not any("loss_itm" in tag for tag in tags)  # no teacher: the CSV cell is empty too

    def series(tag: str) -> list[tuple[int, float]]:
        return [(event.step, event.value) for event in events.Scalars(tag)]

    # log_every=1: a train/ point per CSV row, at its global step (TensorBoard stores float32).
    rows = read_log(trained_run / "train_log.csv")
    assert series("train/loss") == [(int(r["global_step"]), pytest.approx(float(r["loss"]), rel=1e-5)) for r in rows]
    # The step drop after epoch 1 (lr_drop=[1]) shows from step 4 on.
    assert series("lr/transformer") == [(step, pytest.approx(1e-3 if step <= 3 else 1e-4)) for step in range(1, 7)]
    # Each epoch's means at the step where it ended (3 steps per epoch), as epochs.csv has them.
    epochs = read_log(trained_run / "epochs.csv")
    for term in terms:
        assert series(f"epoch/{term}") == [
            (3, pytest.approx(float(epochs[0][term]), rel=1e-5)),
            (6, pytest.approx(float(epochs[1][term]), rel=1e-5)),
        ]
    # eval_every=0: one evaluation, the final one, at the last step; its mAP is metrics.json's.
    final = json.loads((trained_run / "metrics.json").read_text())["default"]["full"]
    assert series("eval/map") == [(6, pytest.approx(final, abs=1e-4))]


def test_plot_command_draws_a_training_run(trained_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    from student.curves import CURVE_COLOURS, DPI, FIGURE_INCHES

    code, out, err = run_cli("plot", str(trained_run), "--out", str(tmp_path / "curves.png"))
    assert code == 0, err
    assert out.strip() == str(tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (FIGURE_INCHES[0] * DPI, FIGURE_INCHES[1] * DPI)
        pixels = np.array(image.convert("RGB"), dtype=int)
    # Two epochs: a short segment per term; the total's colour in the loss panel (left half), the
    # final evaluation's star in the mAP panel (right third).
    for colour, columns in ((CURVE_COLOURS["loss"], slice(0, 600)), (CURVE_COLOURS["map"], slice(800, None))):
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels[:, columns] - rgb) <= 12).all(axis=-1).sum() > 40, colour


def test_tensorboard_can_be_turned_off_and_a_fresh_run_drops_old_events(data_root: Path, tmp_path: Path) -> None:
    stale = tmp_path / "events.out.tfevents.1.old-run"
    stale.write_bytes(b"not this run")
    args = tiny(data_root, tmp_path, "run.tensorboard=false", "schedule.max_steps=1", "run.eval_at_end=false")
    code, _, err = run_cli("train", "--config", str(DEMO_CONFIG), *args)
    assert code == 0, err
    assert (tmp_path / "epochs.csv").is_file() and not list(tmp_path.glob("events.out.tfevents.*"))


def test_a_log_file_gets_epoch_lines_and_no_progress_bars(data_root: Path, tmp_path: Path) -> None:
    """stderr to a file (not a terminal): the default run.progress (true: bars on a terminal)
    draws no bar; run.progress=always still does (so this test would see bars that leaked)."""

    def train_to_file(name: str, *extra: str) -> str:
        overrides = [o for o in tiny(data_root, tmp_path / name, *extra) if o != "run.progress=false"]
        log = tmp_path / f"{name}.log"
        with log.open("w") as handle, contextlib.redirect_stderr(handle), contextlib.redirect_stdout(io.StringIO()):
            assert main(["train", "--config", str(DEMO_CONFIG), *overrides]) == 0
        return log.read_bytes().decode()  # not read_text(): it would turn each \r into \n

    quiet = train_to_file("quiet")  # 2 epochs of 3 steps, then the final evaluation
    assert "\r" not in quiet and "it/s" not in quiet
    epoch_lines = [line for line in quiet.splitlines() if " student.training: epoch " in line]
    assert [line.split(" student.training: ")[1][:9] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    shown = train_to_file("shown", "run.progress=always", "schedule.epochs=1", "run.eval_at_end=false")
    assert "\r" in shown and "epoch 0:" in shown  # tqdm's redraws of the bar "epoch 0"


def test_train_with_the_local_teacher_adds_the_itm_term(
    data_root: Path, tmp_path: Path, tiny_blip_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code, out, err = run_cli(
        "train",
        "--config",
        str(DEMO_CONFIG),
        # kl: a term for every matched pair with >= 2 scored candidates, even from a random teacher.
        *tiny(data_root, tmp_path, f"teacher.model={tiny_blip_dir}", "distill.variant=kl", "run.eval_at_end=false"),
        "--teacher",
        "local",
    )
    assert code == 0, err
    assert "teacher: local engine" in err and "done in" in out.splitlines()[-1]
    rows = read_log(tmp_path / "train_log.csv")
    itm = [float(row["loss_itm"]) for row in rows]
    assert all(math.isfinite(value) and value >= 0 for value in itm)
    assert sum(float(row["itm_terms"]) for row in rows) > 0  # matched pairs with >= 2 scored candidates
    # Every epoch after the first is served from the memo: no new pairs were scored in epoch 2.
    first, second = (message for message in caplog.messages if message.startswith("epoch "))
    scored_first = int(first.split("teacher: ")[1].split(" pairs scored")[0])
    scored_second = int(second.split("teacher: ")[1].split(" pairs scored")[0])
    assert scored_first > 0 and scored_second == scored_first


def test_margin_variant_trains(data_root: Path, tmp_path: Path, tiny_blip_dir: Path) -> None:
    steps: list[StepInfo] = []
    config = load_config(
        DEMO_CONFIG,
        tiny(
            data_root,
            tmp_path,
            "teacher.source=local",
            f"teacher.model={tiny_blip_dir}",
            "distill.variant=margin",
            "distill.score_threshold=0.0",  # every triplet counts as predicted: the teacher is asked
            "schedule.max_steps=2",
            "run.eval_at_end=false",
        ),
    )
    result = train(config, hooks=[steps.append])
    assert len(steps) == 2
    assert all(math.isfinite(step.terms["loss_itm"]) for step in steps)
    assert sum(step.terms["itm_terms"] for step in steps) > 0
    assert result.teacher_stats["pairs_scored"] > 0


def test_the_loss_falls_when_overfitting_four_images(data_root: Path, tmp_path: Path) -> None:
    steps: list[StepInfo] = []
    config = load_config(
        DEMO_CONFIG,
        tiny(
            data_root,
            tmp_path,
            "optim.lr=2e-3",
            "optim.backbone_lr=2e-3",
            "schedule.epochs=1",
            "schedule.max_steps=30",
            "schedule.lr_drop=[100]",
            "run.eval_at_end=false",
        ),
    )
    config.data.train_annotations = str(_first_images(data_root, tmp_path, 4))
    config.schedule.epochs = 30  # 1 batch per epoch
    train(config, hooks=[steps.append])
    losses = [step.terms["loss"] for step in steps]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses


def _first_images(root: Path, tmp_path: Path, count: int) -> Path:
    entries = json.loads((root / "annotations" / "trainval_hico.json").read_text())[:count]
    path = tmp_path / "four.json"
    path.write_text(json.dumps(entries))
    return path


def test_training_loss_has_the_itm_term_only_with_teacher_scores() -> None:
    torch.manual_seed(0)
    outputs = {
        "pred_obj_logits": torch.randn(1, 3, 81, requires_grad=True),
        "pred_verb_logits": torch.randn(1, 3, 4, requires_grad=True),
        "pred_sub_boxes": torch.rand(1, 3, 4),
        "pred_obj_boxes": torch.rand(1, 3, 4),
        "aux_outputs": [],
    }
    target = {
        "obj_labels": torch.tensor([2]),
        "verb_labels": torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
        "sub_boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]]),
        "obj_boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]]),
        TEACHER_KEY: torch.tensor([[3.0, -1.0, float("nan"), 0.5]]),
    }
    criterion = HOICriterion(num_verbs=4)

    class Enabled:
        enabled = True

    without = TrainingLoss(criterion, DistillSettings())(outputs, [target])
    assert "loss_itm" not in without.terms
    kl = DistillSettings(variant="kl", lambda_itm=2.0)
    with_teacher = TrainingLoss(criterion, kl, Enabled())(outputs, [target])  # type: ignore[arg-type]
    assert with_teacher.terms["itm_terms"] == 1 and with_teacher.terms["loss_itm"] > 0
    assert with_teacher.terms["loss"] == pytest.approx(without.terms["loss"] + 2.0 * with_teacher.terms["loss_itm"])
    with_teacher.total.backward()
    assert outputs["pred_verb_logits"].grad is not None


# -- data order --------------------------------------------------------------------------------


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and len(sampler) == 10
    again = EpochSampler(10, seed=3)
    again.set_epoch(2)
    assert list(again) == first
    sampler.set_epoch(3)
    assert list(sampler) != first
    sampler.set_epoch(2, start=4)
    assert list(sampler) == first[4:] and len(sampler) == 6
    other_seed = EpochSampler(10, seed=4)
    other_seed.set_epoch(2)
    assert list(other_seed) != first


def test_seeded_samples_ignore_and_keep_the_global_rng(data_root: Path) -> None:
    config = load_config(
        DEMO_CONFIG, [*tiny(data_root, data_root / "unused"), "data.crop=true", "data.scales=[48, 64]"]
    )
    samples = SeededSamples(build_train_dataset(config))
    torch.manual_seed(1)
    image_a, target_a = samples[(3, 777)]
    state = torch.get_rng_state()
    torch.manual_seed(2)
    image_b, target_b = samples[(3, 777)]
    assert torch.equal(image_a, image_b) and torch.equal(target_a["sub_boxes"], target_b["sub_boxes"])
    torch.set_rng_state(state)
    after = torch.rand(())
    torch.manual_seed(1)
    samples[(3, 777)]
    assert torch.rand(()) == after  # drawing the sample did not move the global RNG


def test_loader_workers_do_not_change_the_batches(data_root: Path) -> None:
    base = [*tiny(data_root, data_root / "unused"), "data.crop=true", "data.scales=[48, 64]"]
    batches = []
    for workers in (0, 1):
        config = load_config(DEMO_CONFIG, [*base, f"data.num_workers={workers}"])
        loader, sampler = build_train_loader(build_train_dataset(config), config)
        sampler.set_epoch(1)
        batches.append([(images, [t["image_id"] for t in targets]) for images, _, targets in loader])
    for (images0, ids0), (images1, ids1) in zip(*batches, strict=True):
        assert ids0 == ids1 and torch.equal(images0, images1)


def test_cuda_loaders_pin_host_memory(data_root: Path) -> None:
    # Without pinned pages a non_blocking copy to the GPU is a synchronous one.
    from student.distributed import DistributedContext

    config = load_config(DEMO_CONFIG, tiny(data_root, data_root / "unused"))
    dataset = build_train_dataset(config)
    cuda = torch.device("cuda", 0)  # only a name here: nothing is copied
    assert build_train_loader(dataset, config, DistributedContext(device=cuda))[0].pin_memory
    assert not build_train_loader(dataset, config, DistributedContext())[0].pin_memory
    test_set = build_test_dataset(config)
    assert build_test_loader(test_set, config, device=cuda).pin_memory
    assert not build_test_loader(test_set, config).pin_memory


def test_the_box_policy_comes_from_the_config(data_root: Path, tmp_path: Path) -> None:
    # One box of a real-size file 5 px past its image's right edge: clamp (the default) trains on
    # and says so; error stops with the entry named.
    import shutil

    from PIL import Image

    from teacher_server.hoi.errors import DatasetError

    shutil.copytree(data_root / "annotations", tmp_path / "annotations")
    (tmp_path / "images").symlink_to(data_root / "images")
    path = tmp_path / "annotations" / "trainval_hico.json"
    entries = json.loads(path.read_text())
    width = Image.open(data_root / "images" / "train" / entries[0]["file_name"]).width
    entries[0]["annotations"][0]["bbox"][2] = width + 5
    path.write_text(json.dumps(entries))
    config = load_config(DEMO_CONFIG, tiny(tmp_path, tmp_path / "run"))
    assert config.data.box_policy == "clamp"
    with pytest.warns(UserWarning, match="box_policy=clamp: 1 box clamped into its image"):
        dataset = build_train_dataset(config)
    assert dataset.box_fixes.boxes_clamped == 1
    strict = load_config(DEMO_CONFIG, [*tiny(tmp_path, tmp_path / "run"), "data.box_policy=error"])
    with pytest.raises(DatasetError, match=r"entry 0 .*annotations\[0\]\.bbox .* lies outside"):
        build_train_dataset(strict)


def test_run_device_follows_the_teachers_rule_and_names_the_key() -> None:
    from student.builders import resolve_device
    from student.config import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"run\.device: Invalid device string"):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"run\.device: .*CUDA is not available"):
            resolve_device("cuda")


def test_tf32_is_allowed_on_cuda_only() -> None:
    from student.builders import configure_cuda_math

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        configure_cuda_math(torch.device("cpu"), tf32=True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        configure_cuda_math(torch.device("cuda", 0), tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_cuda_math(torch.device("cuda", 0), tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert load_config(None).run.tf32


# -- evaluation --------------------------------------------------------------------------------


class OracleModel(nn.Module):
    """Answers each batch of the test loader with its ground truth: the wiring must give 100 mAP."""

    def __init__(self, loader) -> None:
        super().__init__()
        self.targets = iter([targets for _, _, targets in loader])
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> dict:
        targets = next(self.targets)
        batch, queries = len(targets), 6
        obj_logits = torch.full((batch, queries, 81), -10.0)
        obj_logits[..., 80] = 10.0
        verb_logits = torch.full((batch, queries, 117), -10.0)
        sub_boxes = torch.full((batch, queries, 4), 0.5)
        obj_boxes = torch.full((batch, queries, 4), 0.5)
        for b, target in enumerate(targets):
            pairs = len(target["obj_labels"])
            sub_boxes[b, :pairs], obj_boxes[b, :pairs] = target["sub_boxes"], target["obj_boxes"]
            obj_logits[b, :pairs, 80] = -10.0
            obj_logits[b, torch.arange(pairs), target["obj_labels"]] = 10.0
            verb_logits[b, :pairs] = torch.where(target["verb_labels"] > 0, 10.0, -10.0)
        return {
            "pred_obj_logits": obj_logits,
            "pred_verb_logits": verb_logits,
            "pred_sub_boxes": sub_boxes,
            "pred_obj_boxes": obj_boxes,
            "aux_outputs": [],
        }


def test_evaluation_of_perfect_predictions_is_100(data_root: Path) -> None:
    # A test scale other than the file's size: boxes must be mapped back to original pixels.
    config = load_config(DEMO_CONFIG, [*tiny(data_root, data_root / "unused"), "data.test_scale=96"])
    dataset = build_test_dataset(config)
    model = OracleModel(build_test_loader(dataset, config))
    entries, result = evaluate_model(model, config, torch.device("cpu"), dataset=dataset)  # type: ignore[arg-type]
    assert result.headline == pytest.approx(100.0)
    assert result.summary["known_object"]["full"] == pytest.approx(100.0)
    # And an empty prediction scores 0.
    empty = [{"predictions": [], "hoi_prediction": []} for _ in entries]
    zero = score_predictions(
        empty,
        dataset="hico",
        test_annotations=config.data.path("test_annotations"),
        train_annotations=config.data.path("train_annotations"),
        correspondence=correspondence_of(config),
    )
    assert zero.headline == 0.0


def test_evaluate_command_reads_a_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "preds.json"
    code, out, err = run_cli(
        "evaluate",
        "--checkpoint",
        str(trained_run / "checkpoint.pth"),
        "--output",
        str(output),
        "--json",
        "--no-progress",
    )
    assert code == 0, err
    assert "HICO-DET mAP (%)" in out and f"predictions written to {output}" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.loads((trained_run / "metrics.json").read_text())  # same model, same numbers
    assert len(json.loads(output.read_text())) == 4


def test_evaluate_command_with_a_config_and_bad_inputs(trained_run: Path, data_root: Path, tmp_path: Path) -> None:
    checkpoint = str(trained_run / "checkpoint.pth")
    code, _, err = run_cli(
        "evaluate",
        "--checkpoint",
        checkpoint,
        "--config",
        str(DEMO_CONFIG),
        f"data.root={data_root}",
        "data.test_scale=64",
        "--output",
        str(tmp_path / "p.json"),
        "--no-progress",
    )
    assert code == 0, err
    code, _, err = run_cli("evaluate", "--checkpoint", str(tmp_path / "missing.pth"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli("evaluate", "--checkpoint", checkpoint, "data.root=/nowhere", "--no-progress")
    assert code == 2 and "/nowhere" in err


def test_train_command_reports_bad_config_and_resumes(data_root: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("train", "--config", str(DEMO_CONFIG), "optim.lr=-1")
    assert code == 2 and "optim.lr: got -1, expected > 0" in err
    args = ["train", "--config", str(DEMO_CONFIG), *tiny(data_root, tmp_path, "run.eval_at_end=false")]
    code, _, err = run_cli(*args, "schedule.max_steps=1", "--teacher", "none")
    assert code == 0, err
    assert "stopped at schedule.max_steps" in err
    code, _, err = run_cli(*args, "schedule.max_steps=2", "--teacher", "none", "--resume")
    assert code == 0, err
    assert "resumed from" in err and "batch 1, step 1" in err
    assert [row["global_step"] for row in read_log(tmp_path / "train_log.csv")] == ["1", "2"]  # appended


def test_batchnorm_calibration_normalises_every_layer_of_a_scratch_cnn(data_root: Path) -> None:
    from student.model.backbone import FrozenBatchNorm2d

    config = load_config(DEMO_CONFIG, [*tiny(data_root, data_root / "unused"), "calibrate_bn_images=6"])
    train_set = build_train_dataset(config)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model = build_initial_model(config, torch.device("cpu"), train_set)
    images, masks = calibration_batch(train_set, config)
    assert images.shape[0] == 6
    outputs: list[torch.Tensor] = []
    layers = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    # clone: the ReLU after a batch norm works in place
    handles = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out.clone())) for layer in layers]
    with torch.no_grad():
        model.backbone(images, masks)
    for handle in handles:
        handle.remove()
    assert len(outputs) == len(layers) > 10
    for out in outputs:  # every channel of every layer: zero mean, unit variance on these images
        assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(out.shape[1]), atol=1e-3)
        assert torch.allclose(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(out.shape[1]), atol=1e-2)
    # The same seed gives the same calibrated model, and choosing the images drew nothing from torch's RNG.
    torch.set_rng_state(state)
    again = build_initial_model(config, torch.device("cpu"), train_set)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    plain = load_config(DEMO_CONFIG, [*tiny(data_root, data_root / "unused"), "calibrate_bn_images=0"])
    torch.set_rng_state(state)
    uncalibrated = build_initial_model(plain, torch.device("cpu"), train_set)
    assert torch.equal(
        uncalibrated.backbone.body.bn1.running_var, torch.ones_like(uncalibrated.backbone.body.bn1.running_var)
    )
    assert torch.equal(uncalibrated.backbone.body.conv1.weight, model.backbone.body.conv1.weight)


def test_resume_followed_by_an_override_is_not_taken_for_a_path(data_root: Path, tmp_path: Path) -> None:
    from student.commands.train import config_from_args

    args = argparse.Namespace(
        config=DEMO_CONFIG, overrides=[f"data.root={data_root}"], resume="optim.lr=3e-4", teacher=None
    )
    config = config_from_args(args)
    assert config.optim.lr == 3e-4 and args.resume == "auto"
