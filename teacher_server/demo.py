"""``python -m teacher_server demo``: score the bundled example image against HOI sentences.

Uses the real ``Salesforce/blip-itm-base-coco`` when it is in the local Hugging Face cache and
otherwise a tiny random BLIP made on the spot, and says which: with random weights the ranking
is meaningless, but every step of the pipeline is the real one.

``taught_tiny_teacher`` makes the offline stand-in for a teacher that knows: a tiny BLIP
fine-tuned on a corpus of HOI annotations (the synthetic world's teacher corpus); the student's
demo and the distillation ablation use it, with its random starting point as their control.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "person_riding_horse.jpg"
EXAMPLE_SENTENCES = (
    "a person ride a horse",
    "a person feed a horse",
    "a person walk a horse",
    "a person hold a cup",
    "a person kick a sports ball",
    "a person sit on a bench",
    "a person ride a bicycle",
    "a person eat a pizza",
)


@dataclass(frozen=True)
class DemoModel:
    path: str
    is_real: bool
    note: str


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hoi-distill"


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a hub model, without any network access; None if absent."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def resolve_demo_model(preferred: str | None = None) -> DemoModel:
    """The real teacher when it loads offline, else a tiny random BLIP (built once, cached)."""
    from teacher_server.engine import DEFAULT_MODEL, load_blip_itm
    from teacher_server.errors import ModelLoadError
    from teacher_server.tiny_model import make_tiny_model

    if preferred:
        return DemoModel(preferred, True, f"teacher: {preferred}")
    snapshot = cached_hub_snapshot(DEFAULT_MODEL)
    if snapshot is not None:
        try:
            import torch

            load_blip_itm(snapshot, revision=None, dtype=torch.float32)
            return DemoModel(str(snapshot), True, f"teacher: {DEFAULT_MODEL} (from the local cache)")
        except ModelLoadError:
            pass  # an incomplete download: fall back to the tiny model below
    tiny = default_cache_dir() / "tiny-blip"
    if not (tiny / "model.safetensors").is_file():
        make_tiny_model(tiny, seed=0)
    return DemoModel(
        str(tiny),
        False,
        f"teacher: tiny random BLIP at {tiny}, because {DEFAULT_MODEL} is not in the local Hugging Face "
        "cache and the hub is unreachable. Its scores come from random weights and mean nothing; the "
        "pipeline that computes them is the real one.",
    )


@dataclass(frozen=True)
class TaughtTeacher:
    """A tiny BLIP fine-tuned on a corpus, and the random model it started from (the control)."""

    path: Path
    random: Path
    seconds: float
    reused: bool


# The tiny model's fine-tuning recipe (docs/teacher-quality.md): small batches, lr 3e-4.
TINY_FINETUNE = {"batch_images": 8, "lr": 3e-4, "warmup_steps": 50, "device": "cpu"}


def taught_tiny_teacher(
    work_dir: str | Path,
    annotations: str | Path,
    images: str | Path,
    *,
    seed: int = 0,
    epochs: int = 10,
    num_threads: int = 0,
    progress: bool | None = False,
    say: Callable[[str], None] = print,
    region: str = "image",
) -> TaughtTeacher:
    """Fine-tune a random tiny BLIP (``LEARNABLE_TINY_SHAPES``, ``seed``) on HOI ``annotations``.

    ``region``: learn on whole images, or on each pair's ``crop`` / ``mask`` region
    (``FinetuneSettings.region``, default margin and dim: the engine's defaults).

    Writes ``WORK_DIR/teacher-random`` and ``WORK_DIR/teacher-finetuned``; a finished fine-tuning
    run with the same settings and data is reused (an unfinished one continues, a different one
    is replaced), so reruns cost nothing.
    """
    import shutil

    from teacher_server.errors import FinetuneError
    from teacher_server.finetune.examples import examples_from_annotations
    from teacher_server.finetune.settings import FinetuneSettings
    from teacher_server.finetune.training import finetune
    from teacher_server.tiny_model import LEARNABLE_TINY_SHAPES, make_tiny_model

    work_dir = Path(work_dir)
    random_dir, tuned_dir = work_dir / "teacher-random", work_dir / "teacher-finetuned"
    if not (random_dir / "model.safetensors").is_file():
        make_tiny_model(random_dir, seed=seed, **LEARNABLE_TINY_SHAPES)
    examples = examples_from_annotations(annotations, images, regions=region != "image")
    settings = FinetuneSettings(epochs=epochs, seed=seed, num_threads=num_threads, region=region, **TINY_FINETUNE)
    summary = tuned_dir / "finetune.json"
    finished = summary.is_file() and bool(json.loads(summary.read_text()).get("complete"))
    try:
        result = finetune(random_dir, tuned_dir, examples, settings, resume=True, progress=progress, say=say)
    except FinetuneError as error:  # an earlier run with other settings or data: start afresh
        say(f"replacing the teacher in {tuned_dir} ({str(error).splitlines()[0]})")
        shutil.rmtree(tuned_dir)
        finished = False
        result = finetune(random_dir, tuned_dir, examples, settings, progress=progress, say=say)
    return TaughtTeacher(tuned_dir, random_dir, result.seconds, reused=finished)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or directory (default: the real teacher if cached)")
    parser.add_argument("--image", type=Path, default=EXAMPLE_IMAGE, help="image to score (default: bundled)")


def run(args: argparse.Namespace) -> int:
    from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
    from teacher_server.score_cli import format_table

    model = resolve_demo_model(args.model)
    print(model.note)
    engine = ItmEngine.from_pretrained(model.path, EngineSettings())
    image = engine.prepare_image(args.image.read_bytes())
    (scores,) = engine.score([ImageSentences(image.digest, image, list(EXAMPLE_SENTENCES))])
    print(f"image {args.image} (sha256 {image.digest[:12]}…), fingerprint {engine.fingerprint}")
    print(format_table(EXAMPLE_SENTENCES, [s.match_prob for s in scores], [s.match_logit for s in scores]))
    return 0
