"""Does the teacher's knowledge reach the student? An ablation over seeds, with a control.

    python bench/distill_ablation.py                                    # finetuned,random x none,default, 3 seeds
    python bench/distill_ablation.py --variants none,kl,soft,margin --seeds 5
    python bench/distill_ablation.py --eval-split val --override distill.lambda_itm=2   # tuning: val only
    python bench/distill_ablation.py --teachers finetuned --variants none,kl --regions image,pair \
        --two-person-rate 0.5                                           # pair regions vs whole image

For every seed s in ``--first-seed`` .. ``--first-seed + --seeds - 1`` (the seed of the data, the
teacher and the student alike):

1. the synthetic world of seed s (``student.data.synthetic``): a training split with HICO-DET's
   weaknesses (the long tail; co-occurring labels dropped at ``--drop-cooccurring``, default 1:
   never annotated; verb labels on only ``--verb-label-fraction`` of the pairs), fully labelled
   validation and test splits, ``--two-person-rate`` of every split's images two-person ambiguous
   scenes (two people doing different things with objects of one class), and the teacher's own
   corpus (balanced, fully labelled, seen by the teacher only);
2. the teachers: ``finetuned``, a tiny BLIP fine-tuned on the corpus (``teacher_server
   finetune``, from random weights of seed s); ``random``, the same architecture with random
   weights whose scores spread over (0, 1) (initializer range 0.2): confident and uninformed, the
   control; ``base``, the fine-tuning's own starting point, whose scores all sit near one value
   (an inert control). ``eval-itm`` measures how well each ranks the verbs of the test pairs;
3. the same student recipe (``--config``, default the demo's) trained once per cell: ``none``
   (no teacher; once per seed whatever the teachers), and ``<teacher>/<variant>`` for every
   teacher and distillation variant (``default`` = the config's own ``distill.variant``) and every
   teacher region of ``--regions`` (``image``: sentences scored on the whole image, the cell's name
   as before; ``pair``: on each pair's region, ``teacher.region=pair``, named
   ``<teacher>/<variant>/pair``);
4. every run's final checkpoint evaluated on the test split (``--eval-split val`` for tuning; a
   run is trained once and evaluated on each split asked for, so tuning on val and reporting on
   test share the training): HICO-DET Default mAP Full, Rare, Non-rare, and ``dropped``: the
   mean AP of the triplet classes whose training labels were thinned (``sit_on bicycle``,
   ``straddle horse``, ``hold kite``, ``hold cup``).

A distilled cell's gains are paired: gain_s = metric(cell, s) - metric(none, s) on the same data
and initialisation, reported as the mean over seeds and its standard error (sample standard
deviation / sqrt(seeds)). The random teacher is the control: a gain that also appears with it is
regularisation, not knowledge. The table shows every cell, whatever it says; the last line is one
JSON object ``{"cells": {"none": {...}, "finetuned/default": {...}, ...}, "teachers": {...}, ...}``.

Runs go to ``--work-dir`` (default ``runs/ablation``); data, teachers and finished runs with the
same settings are reused, so an interrupted ablation continues where it stopped. ``--jobs``
student runs go in parallel, one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from student.demo import DEMO_CONFIG  # noqa: E402

TEACHERS = ("finetuned", "random", "base")
REGIONS = ("image", "pair")  # teacher.region: what a teacher scores a sentence on
# The evaluation split's files, as config overrides (make-synthetic's layout).
SPLIT_FILES = {
    "test": ("data.test_images=images/test", "data.test_annotations=annotations/test_hico.json"),
    "val": ("data.test_images=images/val", "data.test_annotations=annotations/val_hico.json"),
}
METRICS = ("full", "rare", "non_rare", "dropped")


@dataclass(frozen=True)
class World:
    """Sizes and label noise of the synthetic world (one per seed)."""

    train: int = 1000
    val: int = 1000
    test: int = 2000
    corpus: int = 1500
    # HICO-DET's systematic omissions, at their extreme: the co-occurring second verbs are never
    # annotated. At 0.7 the thinned labels still rank their triplets as well as full ones do (per
    # class AP is rank-based), so there is nothing for a teacher to give back; docs/distillation.md.
    drop_cooccurring: float = 1.0
    verb_label_fraction: float = 1.0
    two_person_rate: float = 0.0  # two-person ambiguous scenes, in every split (make-synthetic's)


@dataclass(frozen=True)
class Cell:
    """One student configuration: no teacher, or a teacher, a distillation variant and a region."""

    teacher: str | None  # None, "finetuned" or "random"
    variant: str | None  # None (no teacher) or a variant name / "default"
    region: str = "image"  # teacher.region: "image" or "pair" (meaningless without a teacher)

    @property
    def name(self) -> str:
        if self.teacher is None:
            return "none"
        # image keeps the names (and run directories) the ablation had before regions existed.
        return f"{self.teacher}/{self.variant}" + ("" if self.region == "image" else f"/{self.region}")

    @property
    def directory(self) -> str:
        return self.name.replace("/", "-")


@dataclass
class RunResult:
    """The metrics of one (cell, seed) student run, in percent (None where undefined)."""

    cell: str
    seed: int
    metrics: dict[str, float | None]
    seconds: float
    reused: bool = False
    per_triplet: dict[str, float] = field(default_factory=dict)


# -- arguments ---------------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teachers", default="finetuned,random", help="finetuned, random, base (default finetuned,random)"
    )
    parser.add_argument(
        "--variants",
        default="none,default",
        help="none, kl, margin, soft, default (the config's own variant); default: none,default",
    )
    parser.add_argument(
        "--regions",
        default="image",
        help="teacher regions: image (whole image), pair (each pair's region); default: image",
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds S..S+N-1 (default 0)")
    parser.add_argument("--epochs", type=int, default=50, help="student epochs (default 50, lr x0.1 for the last 20%%)")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="teacher fine-tuning epochs (default 10)")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="student recipe (default: demo.yaml)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="student config override")
    parser.add_argument("--train", type=int, default=World.train, help=f"training images (default {World.train})")
    parser.add_argument("--val", type=int, default=World.val, help=f"validation images (default {World.val})")
    parser.add_argument("--test", type=int, default=World.test, help=f"test images (default {World.test})")
    parser.add_argument("--corpus", type=int, default=World.corpus, help=f"teacher corpus (default {World.corpus})")
    parser.add_argument("--drop-cooccurring", type=float, default=World.drop_cooccurring, metavar="RATE")
    parser.add_argument("--verb-label-fraction", type=float, default=World.verb_label_fraction, metavar="F")
    parser.add_argument(
        "--two-person-rate",
        type=float,
        default=World.two_person_rate,
        metavar="RATE",
        help="fraction of two-person ambiguous images in every split (make-synthetic's; default 0)",
    )
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image height (default 128)")
    parser.add_argument("--eval-split", choices=("test", "val"), default="test", help="test (report) or val (tune)")
    parser.add_argument("--jobs", type=int, default=2, help="student runs in parallel, one thread each (default 2)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/ablation"), help="default runs/ablation")
    parser.add_argument("--no-reuse", action="store_true", help="redo runs whose results are already there")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    args.teachers = _split(args.teachers, TEACHERS, "--teachers")
    args.variants = _split(args.variants, ("none", "kl", "margin", "soft", "default"), "--variants")
    args.regions = _split(args.regions, REGIONS, "--regions")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def _split(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise SystemExit(f"{flag}: {unknown or text!r} not in {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def cells_of(teachers: Sequence[str], variants: Sequence[str], regions: Sequence[str] = ("image",)) -> list[Cell]:
    """``none`` once (when asked for), then every teacher x distillation variant x region."""
    cells = [Cell(None, None)] if "none" in variants else []
    cells += [Cell(t, v, r) for t in teachers for v in variants if v != "none" for r in regions]
    return cells


# -- world and teachers ------------------------------------------------------------------------


def prepare_world(root: Path, seed: int, world: World, image_size: int) -> dict[str, Any]:
    """Write the synthetic world of ``seed`` (reused when ``synthetic.json`` has the same arguments)."""
    from student.data.synthetic import SUMMARY_FILE, write_synthetic_dataset

    arguments = {
        "train": world.train,
        "test": world.test,
        "val": world.val,
        "corpus": world.corpus,
        "seed": seed,
        "corpus_seed": None,
        "image_size": image_size,
        "max_people": 1,
        "drop_cooccurring": world.drop_cooccurring,
        "verb_label_fraction": world.verb_label_fraction,
        "two_person_rate": world.two_person_rate,
    }
    summary_file = root / SUMMARY_FILE
    if summary_file.is_file() and json.loads(summary_file.read_text()).get("arguments") == arguments:
        return json.loads(summary_file.read_text())
    write_synthetic_dataset(
        root,
        world.train,
        world.test,
        val=world.val,
        corpus=world.corpus,
        seed=seed,
        image_size=image_size,
        max_people=1,
        drop_cooccurring=world.drop_cooccurring,
        verb_label_fraction=world.verb_label_fraction,
        two_person_rate=world.two_person_rate,
        progress=False,
    )
    return json.loads(summary_file.read_text())


def prepare_teachers(
    seed_dir: Path, data: Path, seed: int, epochs: int, threads: int, say: Any, regions: Sequence[str] = ("image",)
) -> dict[str, Path]:
    """The random tiny BLIP of ``seed`` and its fine-tuning on the corpus (both reused when present).

    With ``pair`` in ``regions`` also ``finetuned/pair``: the same start fine-tuned on each corpus
    pair's ``crop`` region, the policy the local engine scores regions with. A teacher trained on
    whole images ranks a pair's verbs the same whatever view it is shown, and one trained on crops
    is poor on whole images (docs/teacher-quality.md, "Regions"): each region mode gets the
    teacher trained for it, and the comparison is of the two pipelines.
    """
    from teacher_server.demo import taught_tiny_teacher
    from teacher_server.tiny_model import LEARNABLE_TINY_SHAPES, make_tiny_model

    def fine_tuned(work_dir: Path, region: str, what: str) -> Any:
        taught = taught_tiny_teacher(
            work_dir,
            data / "annotations" / "corpus_hico.json",
            data / "images" / "corpus",
            seed=seed,
            epochs=epochs,
            num_threads=threads,
            say=lambda _: None,
            region=region,
        )
        if not taught.reused:
            say(f"seed {seed}: teacher fine-tuned{what} in {taught.seconds:.0f} s")
        return taught

    taught = fine_tuned(seed_dir, "image", "")
    teachers = {"finetuned": taught.path, "base": taught.random}
    if "pair" in regions:
        teachers["finetuned/pair"] = fine_tuned(seed_dir / "teacher-pair", "crop", " on pair crops").path
    spread = seed_dir / "teacher-random-spread"
    if not (spread / "model.safetensors").is_file():
        # Random weights at the tests' initializer range: scores spread over (0, 1) like a
        # teacher's, with no knowledge behind them.
        make_tiny_model(spread, seed=seed + 7919, **{**LEARNABLE_TINY_SHAPES, "initializer_range": 0.2})
    return {**teachers, "random": spread}


def teacher_of(cell: Cell, teachers: dict[str, Path]) -> Path:
    """The model a cell's student asks: the pair-trained one for a ``pair`` cell where there is one."""
    assert cell.teacher is not None
    return teachers.get(f"{cell.teacher}/{cell.region}", teachers[cell.teacher])


def teacher_quality(model: Path, data: Path, split: str, *, pairs: bool = False) -> dict[str, Any]:
    """``eval-itm`` of one teacher on the evaluation split, every candidate verb: on whole images
    (labels per image), or with ``pairs`` on each pair's crop region (labels per pair)."""
    from teacher_server.engine import EngineSettings, ItmEngine
    from teacher_server.itm_eval import evaluate_itm

    engine = ItmEngine.from_pretrained(model, EngineSettings(device="cpu", dtype="fp32", region_policy="crop"))
    names = {"test": "test_hico.json", "val": "val_hico.json"}
    quality = evaluate_itm(
        engine,
        data / "annotations" / names[split],
        data / "images" / split,
        train_annotations=data / "annotations" / "trainval_hico.json",
        progress=False,
        regions=pairs,
    )
    return quality.summary()


# -- student runs ------------------------------------------------------------------------------


def student_overrides(
    cell: Cell, seed: int, data: Path, teachers: dict[str, Path], args: argparse.Namespace
) -> list[str]:
    """The ``student train`` overrides of one run."""
    overrides = [
        f"data.root={data}",
        f"run.seed={seed}",
        f"schedule.epochs={args.epochs}",
        # The learning rate drops for the last fifth: a steadier end point than a constant rate.
        f"schedule.lr_drop=[{max(1, round(0.8 * args.epochs))}]",
        "run.num_threads=1",
        "run.eval_every=0",
        # The bench evaluates the final checkpoint itself, on the split asked for (SPLIT_FILES), so
        # one training serves both tuning on val and reporting on test.
        "run.eval_at_end=false",
        "run.progress=false",
        "data.num_workers=0",
    ]
    if cell.teacher is None:
        overrides.append("teacher.source=none")
    else:
        overrides += ["teacher.source=local", f"teacher.model={teacher_of(cell, teachers)}"]
        overrides += ["teacher.device=cpu", "teacher.dtype=fp32"]
        if cell.variant != "default":
            overrides.append(f"distill.variant={cell.variant}")
        if cell.region != "image":  # image is the default: earlier runs stay reusable
            overrides.append(f"teacher.region={cell.region}")
    # distill.* overrides mean nothing without a teacher: ``none`` runs stay reusable across them.
    extra = [o for o in args.override if cell.teacher is not None or not o.startswith("distill.")]
    return [*overrides, *extra]


def run_student(
    cell: Cell,
    seed: int,
    run_dir: Path,
    overrides: list[str],
    config: Path,
    reuse: bool,
    dropped: list[str],
    split: str,
) -> RunResult:
    """Train (or reuse) one student run, predict the ``split`` images with it, and score them."""
    stamp = run_dir / "ablation.json"
    wanted = {"config": str(config), "overrides": overrides}
    started = time.perf_counter()
    reused = reuse and stamp.is_file() and json.loads(stamp.read_text()).get("run") == wanted
    if not reused:
        run_dir.mkdir(parents=True, exist_ok=True)
        for old in run_dir.glob("preds-*.json"):  # predictions of an earlier training
            old.unlink()
        command = ["train", "--config", str(config), *overrides, "--output-dir", str(run_dir)]
        _student(command, run_dir / "train.log", f"{cell.name} seed {seed}")
        stamp.write_text(json.dumps({"run": wanted, "seconds": time.perf_counter() - started}))
    predictions = run_dir / f"preds-{split}.json"
    if not predictions.is_file():
        command = ["evaluate", "--checkpoint", str(run_dir / "checkpoint.pth"), "--output", str(predictions)]
        command += ["--no-progress", *SPLIT_FILES[split], "run.num_threads=1"]
        _student(command, run_dir / f"evaluate-{split}.log", f"{cell.name} seed {seed} ({split})")
    metrics, per_triplet = score_run(run_dir, split, dropped)
    seconds = json.loads(stamp.read_text())["seconds"]
    return RunResult(cell.name, seed, metrics, seconds, reused, per_triplet)


def _student(arguments: list[str], log_file: Path, what: str) -> None:
    """``python -m student ARGUMENTS`` on one thread, its output in ``log_file``; raises on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log_file.open("w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "student", *arguments], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        tail = log_file.read_text()[-2000:]
        raise RuntimeError(f"{what}: student {arguments[0]} exited {done.returncode}\n{tail}")


def score_run(run_dir: Path, split: str, dropped: Sequence[str]) -> tuple[dict[str, float | None], dict[str, float]]:
    """Full / Rare / Non-rare and the mean AP of the ``dropped`` triplet classes, from the split's predictions."""
    from student.builders import correspondence_of
    from student.config import load_config
    from student.engine import score_predictions
    from student.evaluation import load_json

    config = load_config(run_dir / "config.yaml", list(SPLIT_FILES[split]))
    evaluation = score_predictions(
        load_json(run_dir / f"preds-{split}.json"),
        dataset="hico",
        test_annotations=config.data.path("test_annotations"),
        train_annotations=config.data.path("train_annotations"),
        correspondence=correspondence_of(config),
    )
    per_triplet = evaluation.result.ap_by_triplet()
    default = evaluation.summary["default"]
    chosen = [per_triplet[name] for name in dropped if name in per_triplet]
    metrics = {
        "full": default["full"],
        "rare": default["rare"],
        "non_rare": default["non_rare"],
        "dropped": statistics.fmean(chosen) if chosen else None,
    }
    return metrics, per_triplet


# -- statistics and the table ------------------------------------------------------------------


def mean_and_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample sd / sqrt(n)); the SE is None for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def summarise(results: Sequence[RunResult], cells: Sequence[Cell]) -> dict[str, dict[str, Any]]:
    """Per cell: means and sds of each metric over seeds, per-seed values, paired gains over ``none``."""
    by_cell: dict[str, dict[int, RunResult]] = {}
    for result in results:
        by_cell.setdefault(result.cell, {})[result.seed] = result
    baseline = by_cell.get("none", {})
    summary: dict[str, dict[str, Any]] = {}
    for cell in cells:
        runs = by_cell.get(cell.name, {})
        # The region axis, by name: what the cell's teacher scored its sentences on (None: no teacher).
        entry: dict[str, Any] = {"seeds": sorted(runs), "region": cell.region if cell.teacher is not None else None}
        for metric in METRICS:
            values = [runs[s].metrics[metric] for s in sorted(runs) if runs[s].metrics[metric] is not None]
            entry[f"{metric}_per_seed"] = [_round(v) for v in values]
            entry[metric] = _round(statistics.fmean(values)) if values else None
            entry[f"{metric}_sd"] = _round(statistics.stdev(values)) if len(values) > 1 else None
            if cell.teacher is None:
                continue
            paired = [
                runs[s].metrics[metric] - baseline[s].metrics[metric]  # type: ignore[operator]
                for s in sorted(runs)
                if s in baseline and runs[s].metrics[metric] is not None and baseline[s].metrics[metric] is not None
            ]
            gain, se = mean_and_se(paired) if paired else (None, None)
            entry[f"gain_{metric}"] = _round(gain)
            entry[f"gain_{metric}_se"] = _round(se)
        summary[cell.name] = entry
    return summary


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 2)


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """mean ± sd per metric, and for distilled cells the paired gain ± its standard error."""

    def cell_text(entry: dict[str, Any], metric: str) -> str:
        mean, sd = entry.get(metric), entry.get(f"{metric}_sd")
        if mean is None:
            return "-"
        return f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")

    def gain_text(entry: dict[str, Any], metric: str) -> str:
        gain, se = entry.get(f"gain_{metric}"), entry.get(f"gain_{metric}_se")
        if gain is None:
            return ""
        return f"{gain:+.2f}" + (f" ± {se:.2f}" if se is not None else "")

    header = f"{'cell':22}{'region':>8}" + "".join(f"{m:>16}" for m in METRICS)
    lines = ["HICO-DET Default mAP (%), mean ± sd over seeds; paired gain over none ± SE", header, "-" * len(header)]
    for name, entry in summary.items():
        region = entry.get("region") or "-"
        lines.append(f"{name:22}{region:>8}" + "".join(f"{cell_text(entry, m):>16}" for m in METRICS))
        if "gain_full" in entry:
            lines.append(f"{'  gain vs none':22}{'':8}" + "".join(f"{gain_text(entry, m):>16}" for m in METRICS))
    return "\n".join(lines)


# -- the whole ablation --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from teacher_server.cli import quiet_library_chatter

    args = parse_arguments(argv)
    quiet_library_chatter()
    started = time.perf_counter()
    say = (lambda _: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    world = World(
        args.train,
        args.val,
        args.test,
        args.corpus,
        args.drop_cooccurring,
        args.verb_label_fraction,
        args.two_person_rate,
    )
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    cells = cells_of(args.teachers, args.variants, args.regions)
    needs_teacher = any(cell.teacher is not None for cell in cells)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    worlds = {
        seed: prepare_world(args.work_dir / f"seed{seed}" / "data", seed, world, args.image_size) for seed in seeds
    }
    quality: dict[str, dict[int, Any]] = {}

    in_process = threading.Lock()

    def teach(seed: int) -> dict[str, Path]:
        seed_dir = args.work_dir / f"seed{seed}"
        # Fine-tuning runs in this process and sets torch's global thread count and RNG: one at a
        # time (the student runs are subprocesses and go on beside it).
        with in_process:
            teachers = prepare_teachers(
                seed_dir, seed_dir / "data", seed, args.teacher_epochs, threads, say, args.regions
            )
            names = [*args.teachers, *(f"{t}/pair" for t in args.teachers if f"{t}/pair" in teachers)]
            for name in names:
                measured = teacher_quality(
                    teachers[name], seed_dir / "data", args.eval_split, pairs=name.endswith("/pair")
                )
                quality.setdefault(name, {})[seed] = measured
                completion = measured["completion"]
                say(
                    f"seed {seed}: teacher {name}: eval-itm AUC {measured['auc']:.3f}, top-1 {measured['top1']:.3f}, "
                    f"belief >= {completion['confidence']:g} on {completion['true_rate']:.3f} of true verbs "
                    f"and {completion['false_rate']:.3f} of false ones"
                )
        return teachers

    def work(cell: Cell, seed: int) -> RunResult:
        seed_dir = args.work_dir / f"seed{seed}"
        teachers = taught[seed].result() if cell.teacher is not None else {}
        overrides = student_overrides(cell, seed, (seed_dir / "data").resolve(), teachers, args)
        dropped = list(worlds[seed].get("dropped_triplets", []))
        result = run_student(
            cell, seed, seed_dir / cell.directory, overrides, args.config, not args.no_reuse, dropped, args.eval_split
        )
        shown = ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items() if v is not None)
        say(f"seed {seed} {cell.name}: {shown} ({'reused' if result.reused else f'{result.seconds:.0f} s'})")
        return result

    # One pool for everything, in submission order: each seed's teachers next to its ``none`` run
    # (which needs none), then the distilled runs, each waiting for its own seed's teachers, which
    # were submitted (so started) before it: no idle core while a teacher trains, no deadlock.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        taught: dict[int, Future[dict[str, Path]]] = {}
        runs: list[Future[RunResult]] = []
        for seed in seeds:
            if needs_teacher:
                taught[seed] = pool.submit(teach, seed)
            runs += [pool.submit(work, cell, seed) for cell in cells if cell.teacher is None]
        runs += [pool.submit(work, cell, seed) for cell in cells if cell.teacher is not None for seed in seeds]
        results = [run.result() for run in runs]
    summary = summarise(results, cells)
    print(format_table(summary))
    teachers_summary = {
        name: {
            "auc": _round(100 * statistics.fmean(q[s]["auc"] for s in q)) if q else None,
            "top1": _round(100 * statistics.fmean(q[s]["top1"] for s in q)) if q else None,
            # soft's completions at the default confidence: true verbs the teacher believes, false ones.
            "completed_true": _round(100 * statistics.fmean(q[s]["completion"]["true_rate"] for s in q)) if q else None,
            "completed_false": _round(100 * statistics.fmean(q[s]["completion"]["false_rate"] for s in q))
            if q
            else None,
            "per_seed": {
                str(s): {"auc": q[s]["auc"], "top1": q[s]["top1"], "completion": q[s]["completion"]} for s in sorted(q)
            },
        }
        for name, q in quality.items()
    }
    for name, entry in teachers_summary.items():
        print(
            f"teacher {name}: eval-itm AUC {entry['auc']} %, top-1 {entry['top1']} %, believes "
            f"{entry['completed_true']} % of true verbs, {entry['completed_false']} % of false ones (mean over seeds)"
        )
    print(
        json.dumps(
            {
                "cells": summary,
                "teachers": teachers_summary,
                "seeds": seeds,
                "eval_split": args.eval_split,
                "regions": args.regions,
                "world": asdict(world),
                "epochs": args.epochs,
                "overrides": args.override,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
