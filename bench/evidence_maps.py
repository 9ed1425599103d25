"""Does the fine-tuned tiny teacher's evidence map for a true sentence look at the object?

    python bench/evidence_maps.py                      # corpus 600, test 100, 10 epochs
    python bench/evidence_maps.py --teacher DIR        # a given teacher, no fine-tuning

1. A synthetic world (``student.data.synthetic.write_synthetic_dataset``): the teacher's corpus
   (``--corpus`` images) and ``--test`` test images, ``--image-size`` px.
2. The tiny teacher fine-tuned on the corpus by ``teacher_server.demo.taught_tiny_teacher`` (the
   recipe of ``make demo``), and the random tiny BLIP it started from as the control.
3. For every test image and every true sentence of it (each annotated verb of each pair, by the
   project's sentence function), the evidence map (``teacher_server.explain``: Grad-CAM of the
   match logit over the cross-attention of text layer ``--layer``, default the explainer's) of
   the whole image. The map is constant over each patch, so its mass inside a box is exact:
   the sum over patches of value x the share of the patch the box covers, over the total.

Reported per teacher, over the (image, true sentence) pairs:

- ``mass_rate``: how often the map's mass inside the object box exceeds the box's share of the
  image (what a map spread evenly would put there); ``mass_inside`` and ``box_share``: their means;
- ``argmax_rate``: how often the map's peak patch has its centre inside the object box, against
  ``argmax_chance``, the mean share of patch centres inside it (a peak at random);
- the same two rates for the human box (``human_mass_rate``, ``human_argmax_rate``, ...), since
  the decision may as well rest on the person's pose.

The last line of standard output is one JSON object: ``{"finetuned": {...}, "random": {...},
"pairs", "layer", "world", "seconds"}``. Work goes to ``--work-dir`` (default
``runs/evidence-maps``); the world and a finished teacher with the same settings are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work-dir", type=Path, default=Path("runs/evidence-maps"), help="(default runs/evidence-maps)"
    )
    parser.add_argument("--corpus", type=int, default=600, help="teacher-corpus images (default 600)")
    parser.add_argument("--test", type=int, default=100, help="test images (default 100)")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic image size in px (default 64)")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    parser.add_argument("--teacher", type=Path, default=None, help="evaluate this model directory instead")
    parser.add_argument("--layer", type=int, default=None, help="text layer (default: the explainer's)")
    parser.add_argument("--seed", type=int, default=0, help="world and teacher seed (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--quiet", action="store_true", help="only the JSON line")
    return parser.parse_args(argv)


def prepare_world(root: Path, *, corpus: int, test: int, seed: int, image_size: int) -> Path:
    """Write the synthetic world (reused when its ``synthetic.json`` has the same arguments)."""
    from student.data.synthetic import SUMMARY_FILE, write_synthetic_dataset

    wanted = {"corpus": corpus, "test": test, "seed": seed, "image_size": image_size}
    summary = root / SUMMARY_FILE
    if summary.is_file():
        arguments = json.loads(summary.read_text()).get("arguments", {})
        if all(arguments.get(key) == value for key, value in wanted.items()):
            return root
    write_synthetic_dataset(root, 0, test, corpus=corpus, seed=seed, image_size=image_size, progress=False)
    return root


def box_coverage(box: Sequence[float], rows: int, cols: int, width: int, height: int) -> np.ndarray:
    """(rows, cols): the share of each patch's area that ``box`` (xyxy pixels) covers."""
    x1, y1, x2, y2 = box
    xs, ys = np.linspace(0, width, cols + 1), np.linspace(0, height, rows + 1)
    overlap_x = np.clip(np.minimum(xs[1:], x2) - np.maximum(xs[:-1], x1), 0, None) / np.diff(xs)
    overlap_y = np.clip(np.minimum(ys[1:], y2) - np.maximum(ys[:-1], y1), 0, None) / np.diff(ys)
    return np.outer(overlap_y, overlap_x)


def centres_inside(box: Sequence[float], rows: int, cols: int, width: int, height: int) -> np.ndarray:
    """(rows, cols) bool: whether each patch's centre lies inside ``box``."""
    x1, y1, x2, y2 = box
    cx = (np.arange(cols) + 0.5) * width / cols
    cy = (np.arange(rows) + 0.5) * height / rows
    return np.outer((cy >= y1) & (cy < y2), (cx >= x1) & (cx < x2))


def box_measures(grid: np.ndarray, box: Sequence[float], width: int, height: int) -> dict[str, float]:
    """Mass of ``grid`` inside ``box``, the box's share of the image, and the peak against chance."""
    rows, cols = grid.shape
    total = float(grid.sum())
    mass = float((grid * box_coverage(box, rows, cols, width, height)).sum() / total) if total > 0 else 0.0
    x1, y1, x2, y2 = box
    inside = centres_inside(box, rows, cols, width, height)
    peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return {
        "mass_inside": mass,
        "box_share": (x2 - x1) * (y2 - y1) / (width * height),
        "argmax_inside": float(inside[peak]) if total > 0 else 0.0,
        "argmax_chance": float(inside.mean()),
    }


def measure(model: Path, world: Path, layer: int | None) -> dict[str, Any]:
    """The rates of one teacher over the test images' (image, true sentence) pairs."""
    from teacher_server.engine import EngineSettings, ItmEngine
    from teacher_server.explain import Explainer
    from teacher_server.hoi.annotations import load_annotations
    from teacher_server.hoi.classes import HICO_VERBS
    from teacher_server.hoi.prompts import OBJECT_NAMES, triplet_sentence

    engine = ItmEngine.from_pretrained(model, EngineSettings(device="cpu", dtype="fp32"))
    explainer = Explainer(engine, layer=layer, max_sentences=10_000)
    rows: list[dict[str, float]] = []
    for entry in load_annotations(world / "annotations" / "test_hico.json"):
        data = (world / "images" / "test" / entry.file_name).read_bytes()
        asked: list[tuple[str, np.ndarray, np.ndarray]] = []
        for pair in entry.pairs():
            name = OBJECT_NAMES[entry.object_class(pair.object)]
            for verb in pair.verbs:
                sentence = triplet_sentence(HICO_VERBS[verb], name)
                if sentence is not None:
                    asked.append((sentence, entry.boxes[pair.object], entry.boxes[pair.subject]))
        if not asked:
            continue
        explanation = explainer.explain(data, [sentence for sentence, _, _ in asked])
        width, height = explanation.image.size
        for (_, object_box, human_box), evidence in zip(asked, explanation.maps, strict=True):
            grid = evidence.grid.numpy().astype(np.float64)
            on_object = box_measures(grid, object_box, width, height)
            on_human = box_measures(grid, human_box, width, height)
            rows.append({**on_object, **{f"human_{key}": value for key, value in on_human.items()}})
    return summarise(rows, explainer.layer if layer is None else layer % explainer.num_layers)


def summarise(rows: list[dict[str, float]], layer: int) -> dict[str, Any]:
    """Rates and means over the measured pairs."""
    if not rows:
        return {"pairs": 0, "layer": layer}

    def mean(key: str) -> float:
        return round(float(np.mean([row[key] for row in rows])), 4)

    def rate(inside: str, share: str) -> float:
        return round(float(np.mean([row[inside] > row[share] for row in rows])), 4)

    return {
        "pairs": len(rows),
        "layer": layer,
        "mass_rate": rate("mass_inside", "box_share"),
        "mass_inside": mean("mass_inside"),
        "box_share": mean("box_share"),
        "argmax_rate": mean("argmax_inside"),
        "argmax_chance": mean("argmax_chance"),
        "human_mass_rate": rate("human_mass_inside", "human_box_share"),
        "human_mass_inside": mean("human_mass_inside"),
        "human_box_share": mean("human_box_share"),
        "human_argmax_rate": mean("human_argmax_inside"),
        "human_argmax_chance": mean("human_argmax_chance"),
    }


def format_table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'teacher':<10} {'pairs':>6} {'mass>share':>10} {'mass in':>8} {'share':>6} {'peak in':>8} {'chance':>7}"
    lines = ["object box", head]
    for prefix, title in (("", "object box"), ("human_", "human box")):
        if prefix:
            lines += [title, head]
        for name, r in results.items():
            if not r.get("pairs"):
                lines.append(f"{name:<10} {0:>6}")
                continue
            lines.append(
                f"{name:<10} {r['pairs']:>6} {r[prefix + 'mass_rate']:>10.3f} {r[prefix + 'mass_inside']:>8.3f} "
                f"{r[prefix + 'box_share']:>6.3f} {r[prefix + 'argmax_rate']:>8.3f} {r[prefix + 'argmax_chance']:>7.3f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from teacher_server.cli import quiet_library_chatter

    args = parse_arguments(argv)
    quiet_library_chatter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    started = time.perf_counter()
    world = prepare_world(
        args.work_dir / "world", corpus=args.corpus, test=args.test, seed=args.seed, image_size=args.image_size
    )
    if args.teacher is not None:
        teachers = {"given": args.teacher}
    else:
        from teacher_server.demo import taught_tiny_teacher

        taught = taught_tiny_teacher(
            args.work_dir,
            world / "annotations" / "corpus_hico.json",
            world / "images" / "corpus",
            seed=args.seed,
            epochs=args.teacher_epochs,
            num_threads=args.threads,
            say=lambda _: None,
        )
        took = "reused" if taught.reused else f"{taught.seconds:.0f} s"
        say(f"teacher fine-tuned on {args.corpus} corpus images: {took}")
        teachers = {"finetuned": taught.path, "random": taught.random}
    results = {name: measure(path, world, args.layer) for name, path in teachers.items()}
    say(format_table(results))
    first = next(iter(results.values()))
    output = {
        **results,
        "pairs": first["pairs"],
        "layer": first["layer"],
        "world": {"corpus": args.corpus, "test": args.test, "image_size": args.image_size, "seed": args.seed},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
