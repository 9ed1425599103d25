"""Does scoring a sentence on one human-object pair beat scoring it on the whole image?

    python bench/region_eval.py                                   # teachers on image, crop, mask
    python bench/region_eval.py --train-on image                  # one teacher, on whole images
    python bench/region_eval.py --teacher runs/some-teacher       # a given teacher, no fine-tuning

1. Two synthetic worlds (``student.data.synthetic.write_synthetic_dataset``): the teacher's
   corpus, ``--corpus`` images of which ``--corpus-two-person-rate`` show two people doing
   different things with two objects of one class, and a test world of ``--test`` images that
   all do (``two_person_rate=1``): one rides a horse, the other holds another horse.
2. The tiny teacher fine-tuned on the corpus by ``teacher_server.demo.taught_tiny_teacher`` (the
   recipe of ``make demo`` and the distillation ablation), once per ``--train-on`` mode: on whole
   images (``image``), or on each pair's region (``crop``, ``mask``: ``finetune --region``).
   ``--teacher DIR`` evaluates that model instead.
3. ``eval-itm`` (``teacher_server.itm_eval.evaluate_itm``) of every teacher under every
   ``--policies`` entry on the two-person test images (``--only-two-person``), with per-pair
   labels (``--labels pair``: the other person's verb is a negative of this pair) for all of
   them, so the policies answer the same question: per-pair verb mAP, top-1 and ROC-AUC.

Whole-image scoring gives both pairs of an image the same score for every sentence, so it
cannot rank "ride" first for the rider and "hold" first for the holder: its per-pair top-1 is
about one half at best on these images. A region can.

The table shows every (teacher, policy) cell. The last line is one JSON object: for each policy
P, ``{"verb_map", "top1", "auc", "pairs", "teacher"}`` of P scored by the teacher fine-tuned on P
when there is one (the configuration one would deploy), else by the whole-image teacher (or the
given one); ``"cells"`` holds every teacher x policy, ``"world"`` and ``"seconds"`` the setup.

Work goes to ``--work-dir`` (default ``runs/region-eval``); worlds and finished teachers with the
same settings are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = ("image", "crop", "mask")
METRICS = ("verb_map", "top1", "auc")


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/region-eval"), help="(default runs/region-eval)")
    parser.add_argument("--corpus", type=int, default=600, help="teacher-corpus images (default 600)")
    parser.add_argument(
        "--corpus-two-person-rate",
        type=float,
        default=0.5,
        help="share of two-person images in the corpus (default 0.5)",
    )
    parser.add_argument("--test", type=int, default=150, help="two-person test images (default 150)")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image height (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the worlds and the teachers (default 0)")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    parser.add_argument(
        "--train-on",
        default="image,crop,mask",
        help="teachers to fine-tune: on whole images and/or on crop / mask regions (default image,crop,mask)",
    )
    parser.add_argument("--teacher", type=Path, help="evaluate this model directory instead of fine-tuning")
    parser.add_argument("--policies", default="image,crop,mask", help="how pairs are scored (default all three)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.train_on = _split(args.train_on, "--train-on")
    args.policies = _split(args.policies, "--policies")
    for name in ("corpus", "test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.corpus_two_person_rate <= 1.0:
        parser.error(f"--corpus-two-person-rate must be within 0..1, got {args.corpus_two_person_rate}")
    return args


def _split(text: str, flag: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODES]
    if unknown or not names:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {', '.join(MODES)}, got {text!r}")
    return list(dict.fromkeys(names))


def prepare_world(root: Path, *, corpus: int, test: int, rate: float, seed: int, image_size: int) -> Path:
    """Write a synthetic world (reused when its ``synthetic.json`` has the same arguments)."""
    from student.data.synthetic import SUMMARY_FILE, write_synthetic_dataset

    wanted = {"corpus": corpus, "test": test, "seed": seed, "image_size": image_size, "two_person_rate": rate}
    summary = root / SUMMARY_FILE
    if summary.is_file():
        arguments = json.loads(summary.read_text()).get("arguments", {})
        if all(arguments.get(key) == value for key, value in wanted.items()):
            return root
    write_synthetic_dataset(
        root, 0, test, corpus=corpus, seed=seed, image_size=image_size, two_person_rate=rate, progress=False
    )
    return root


def prepare_teachers(args: argparse.Namespace, corpus_world: Path, say: Any) -> dict[str, Path]:
    """Teacher name -> model directory: ``--teacher``, or one fine-tuning per ``--train-on`` mode."""
    if args.teacher is not None:
        return {"given": args.teacher}
    from teacher_server.demo import taught_tiny_teacher

    teachers = {}
    for mode in args.train_on:
        taught = taught_tiny_teacher(
            args.work_dir / f"teacher-{mode}",
            corpus_world / "annotations" / "corpus_hico.json",
            corpus_world / "images" / "corpus",
            seed=args.seed,
            epochs=args.teacher_epochs,
            num_threads=args.threads,
            say=lambda _: None,
            region=mode,
        )
        say(f"teacher fine-tuned on {mode}: {'reused' if taught.reused else f'{taught.seconds:.0f} s'}")
        teachers[mode] = taught.path
    return teachers


def evaluate(model: Path, policy: str, test_world: Path, train_annotations: Path | None) -> dict[str, Any]:
    """``eval-itm --region POLICY --labels pair --only-two-person`` of one teacher: its summary."""
    from teacher_server.engine import EngineSettings, ItmEngine
    from teacher_server.itm_eval import evaluate_itm, two_person_images

    annotations = test_world / "annotations" / "test_hico.json"
    region = {} if policy == "image" else {"region_policy": policy}
    engine = ItmEngine.from_pretrained(model, EngineSettings(device="cpu", dtype="fp32", **region))
    quality = evaluate_itm(
        engine,
        annotations,
        test_world / "images" / "test",
        train_annotations=train_annotations,
        progress=False,
        regions=policy != "image",
        labels="pair",
        only_images=two_person_images(annotations),
    )
    return quality.summary()


def headline(cells: dict[str, dict[str, dict[str, Any]]], policies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per policy: the cell of the teacher trained on it, else of the whole-image (or given) teacher."""
    result = {}
    for policy in policies:
        teacher = policy if policy in cells else ("image" if "image" in cells else next(iter(cells)))
        cell = cells[teacher][policy]
        result[policy] = {**{key: cell[key] for key in METRICS}, "pairs": cell["pairs"], "teacher": teacher}
    return result


def format_table(cells: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [f"{'teacher trained on':<19} {'scored on':<10} {'pairs':>6} {'verb mAP':>9} {'top-1':>7} {'AUC':>7}"]
    for teacher, row in cells.items():
        for policy, cell in row.items():
            numbers = " ".join(
                f"{'n/a' if cell[key] is None else format(cell[key], '.3f'):>{width}}"
                for key, width in (("verb_map", 9), ("top1", 7), ("auc", 7))
            )
            lines.append(f"{teacher:<19} {policy:<10} {cell['pairs']:>6} {numbers}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from teacher_server.cli import quiet_library_chatter

    args = parse_arguments(argv)
    quiet_library_chatter()
    started = time.perf_counter()
    say = (lambda _: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    size = {"seed": args.seed, "image_size": args.image_size}
    corpus_world = prepare_world(
        args.work_dir / "corpus-world", corpus=args.corpus, test=0, rate=args.corpus_two_person_rate, **size
    )
    test_world = prepare_world(args.work_dir / "test-world", corpus=0, test=args.test, rate=1.0, **size)
    say(f"worlds ready in {time.perf_counter() - started:.0f} s")
    teachers = prepare_teachers(args, corpus_world, say)
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for name, model in teachers.items():
        for policy in args.policies:
            # Rare = fewer than 10 corpus instances: the teacher's training data is the corpus.
            summary = evaluate(model, policy, test_world, corpus_world / "annotations" / "corpus_hico.json")
            cells.setdefault(name, {})[policy] = summary
            say(f"teacher {name}, scored on {policy}: verb mAP {summary['verb_map']:.3f}, top-1 {summary['top1']:.3f}")
    print(format_table(cells))
    result: dict[str, Any] = headline(cells, args.policies)
    result["cells"] = {
        teacher: {policy: {key: cell[key] for key in (*METRICS, "pairs", "region")} for policy, cell in row.items()}
        for teacher, row in cells.items()
    }
    result["world"] = {
        "corpus": args.corpus,
        "corpus_two_person_rate": args.corpus_two_person_rate,
        "test": args.test,
        "image_size": args.image_size,
        "seed": args.seed,
        "teacher_epochs": args.teacher_epochs,
        "labels": "pair",
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
