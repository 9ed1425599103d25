"""The demo's steps (``python -m student demo``): the main job end to end on a CPU, as the real topology.

1. write the synthetic HOI world (HICO-DET format) into ``WORK_DIR/data`` (kept for reruns): the
   student's training split, with HICO-DET's missing co-occurring labels (``--drop-cooccurring``),
   the test split, and the teacher's own corpus (balanced, fully labelled);
2. resolve the teacher: the real ``Salesforce/blip-itm-base-coco`` when it is in the local
   Hugging Face cache (used as it is), else a tiny BLIP fine-tuned on the teacher corpus
   (``teacher_server finetune``, about a minute; reused from ``WORK_DIR`` on reruns), and print
   ``eval-itm`` of the teacher next to its random starting point;
3. start the parts as separate processes on loopback: ``redis-server`` when one is installed
   (else the teacher's in-process cache, said in the output) and ``teacher_server serve`` over
   gRPC (``--teacher serve``, the default; ``grpc://host:port`` uses a running service instead);
4. prewarm: score every candidate sentence of every training image once (``student prewarm``);
5. evaluate the untrained student (the same initialisation training starts from);
6. train the small student of ``student/configs/demo.yaml`` with ``kl`` distillation on
   ``--ranks`` ``torchrun`` processes (default 2, gloo on CPU, the global batch of demo.yaml split
   over them), reading its scores from the prewarmed cache; rank 0 checkpoints, and the final
   evaluation is sharded over the ranks and gathered on rank 0;
7. evaluate it and print a table;
8. draw the pictures (``draw_pictures``): the training curves (``student.curves``) and the
   predictions on the first three test images, and name their files; the last line is one JSON
   object: ``{"map_trained", "map_untrained", "seconds", "teacher", "teacher_auc", "pictures"}``
   (HICO-DET Default Full mAP in percent; the teacher's eval-itm ROC-AUC on the test split, a
   fraction, or null; the pictures' paths).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
# One person (so one HOI pair) per image: a CPU-sized DETR learns it in minutes (see docs/training.md).
DEMO_MAX_PEOPLE = 1
# HICO-DET's annotators often forget a co-occurring verb ("fly kite" without "hold kite"); the
# demo's annotators never mark them (sit_on beside ride, hold beside fly...), and the teacher,
# which learned from its own corpus, knows better: those triplets are learned from it alone.
DEMO_DROP_COOCCURRING = 1.0
# Two DDP processes (gloo on CPU): the topology a cluster runs, at the scale of a laptop.
DEMO_RANKS = 2
# Test images whose predictions the demo draws.
DEMO_PICTURED_IMAGES = 3


def prepare_data(
    root: Path,
    *,
    train: int,
    test: int,
    image_size: int,
    seed: int,
    max_people: int = 1,
    corpus: int = 0,
    drop_cooccurring: float = 0.0,
    verb_label_fraction: float = 1.0,
    progress: bool = False,
) -> str:
    """Write the synthetic world unless an identical one (same arguments) is already there."""
    from student.data.synthetic import SUMMARY_FILE, write_synthetic_dataset

    options = {"corpus": corpus, "drop_cooccurring": drop_cooccurring, "verb_label_fraction": verb_label_fraction}
    stamp = root / SUMMARY_FILE
    if stamp.is_file():
        written = json.loads(stamp.read_text()).get("arguments", {})
        wanted = {"train": train, "test": test, "image_size": image_size, "seed": seed, "max_people": max_people}
        if all(written.get(key) == value for key, value in {**wanted, **options}.items()):
            return f"synthetic data: reusing {root} ({train} train / {test} test / {corpus} teacher-corpus images)"
    summary = write_synthetic_dataset(
        root, train, test, seed=seed, image_size=image_size, max_people=max_people, progress=progress, **options
    )
    return summary.describe()


def prepare_teacher(args: argparse.Namespace, data_root: Path, progress: bool) -> tuple[str, str, float | None]:
    """(model path, name for the summary, its eval-itm AUC on the test split or None).

    An explicit ``--teacher-model`` or the real BLIP in the local cache is used as it is; else a
    tiny BLIP is fine-tuned on the teacher corpus, and both it and its random starting point are
    measured with ``eval-itm`` (printed as a table).
    """
    from teacher_server.demo import resolve_demo_model, taught_tiny_teacher

    if args.teacher_model:
        return args.teacher_model, args.teacher_model, None
    resolved = resolve_demo_model()
    if resolved.is_real:
        log.info("%s; used as it is (fine-tuning BLIP-base on a CPU would take hours)", resolved.note)
        return resolved.path, resolved.path, None
    if args.corpus < 1:
        from student.config import ConfigError

        raise ConfigError(f"--corpus {args.corpus}: must be >= 1, the tiny teacher learns from the teacher corpus")
    log.info(
        f"teacher: a tiny BLIP fine-tuned on the {args.corpus} teacher-corpus images (no real BLIP weights "
        f"offline; `teacher_server finetune`, {args.teacher_epochs} epochs) ..."
    )
    taught = taught_tiny_teacher(
        args.work_dir,
        data_root / "annotations" / "corpus_hico.json",
        data_root / "images" / "corpus",
        seed=args.seed,
        epochs=args.teacher_epochs,
        num_threads=os.cpu_count() or 1,
        progress=progress,
        say=lambda _: None,
    )
    log.info(
        f"teacher: reusing the fine-tuned teacher in {taught.path}"
        if taught.reused
        else f"teacher: fine-tuned in {taught.seconds:.0f} s, written to {taught.path}"
    )
    rows = [("random (its starting point)", teacher_quality(taught.random, data_root))]
    rows.append(("fine-tuned on the corpus", teacher_quality(taught.path, data_root)))
    print(quality_table(rows))
    return str(taught.path), "tiny BLIP fine-tuned on the synthetic teacher corpus", rows[1][1]["auc"]


def teacher_quality(model: Path, data_root: Path) -> dict[str, Any]:
    """``eval-itm`` summary of ``model`` on the synthetic test split."""
    from teacher_server.engine import EngineSettings, ItmEngine
    from teacher_server.itm_eval import evaluate_itm

    engine = ItmEngine.from_pretrained(model, EngineSettings(device="cpu", dtype="fp32"))
    annotations = data_root / "annotations"
    quality = evaluate_itm(
        engine,
        annotations / "test_hico.json",
        data_root / "images" / "test",
        train_annotations=annotations / "trainval_hico.json",
        progress=False,
    )
    return quality.summary()


def quality_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """eval-itm of the teachers: how well each ranks the verbs of the test pairs."""

    def cell(value: float | None) -> str:
        return f"{value:8.3f}" if value is not None else f"{'-':>8}"

    # true / false >= c: the shares of true and of false verbs the teacher believes at the soft
    # distillation's confidence, i.e. what it would add to the student's labels, right and wrong.
    header = f"{'teacher (eval-itm, test split)':34}{'AUC':>8}{'verb mAP':>10}{'top-1':>8}{'true>=c':>9}{'false>=c':>9}"
    lines = [header, "-" * len(header)]
    for name, summary in rows:
        completion = summary.get("completion") or {}
        lines.append(
            f"{name:34}{cell(summary['auc'])}  {cell(summary['verb_map'])}{cell(summary['top1'])} "
            f"{cell(completion.get('true_rate'))} {cell(completion.get('false_rate'))}"
        )
    return "\n".join(lines)


def result_table(rows: list[tuple[str, Any]]) -> str:
    """HICO-DET table of (name, EvalResult) rows."""
    header = f"{'student':34}{'Full':>8}{'Rare':>8}{'Non-rare':>10}{'KO Full':>9}"
    lines = ["HICO-DET mAP (%) on the synthetic test split", header, "-" * len(header)]

    def cell(value: float | None, width: int) -> str:
        return f"{value:{width}.2f}" if value is not None else " " * (width - 1) + "-"

    for name, evaluation in rows:
        default, known = evaluation.summary["default"], evaluation.summary["known_object"]
        lines.append(
            f"{name:34}{cell(default['full'], 8)}{cell(default['rare'], 8)}{cell(default['non_rare'], 10)}"
            f"{cell(known['full'], 9)}"
        )
    return "\n".join(lines)


def dropped_table(dropped: list[str], rows: list[tuple[str, Any]]) -> str:
    """AP (%) of the triplets whose training labels were dropped, per (name, EvalResult) row."""
    lines = ["triplets the training labels leave out (their AP, %): learned from the teacher, if at all"]
    aps = [(name, evaluation.result.ap_by_triplet()) for name, evaluation in rows]
    width = max(12, *(len(name) + 2 for name, _ in aps))  # whole names: "trained (soft distillation)"
    header = f"{'triplet':34}" + "".join(f"{name:>{width}}" for name, _ in aps)
    lines += [header, "-" * len(header)]
    for triplet in dropped:
        cells = "".join(f"{ap[triplet]:{width}.2f}" if triplet in ap else f"{'-':>{width}}" for _, ap in aps)
        lines.append(f"{triplet:34}{cells}")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    """The environment of the demo's processes: one thread each (2 cores are shared), no hub access."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOIDISTILL_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return env


@contextmanager
def redis_process(work_dir: Path) -> Iterator[str | None]:
    """A ``redis-server`` on a free loopback port (its URL), or None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


class TeacherService:
    """``python -m teacher_server serve`` as a child process on loopback."""

    def __init__(self, model: str, redis_url: str | None) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        args = ["--model", model, "--device", "cpu", "--host", "127.0.0.1", "--grpc-port", str(self.grpc_port)]
        args += ["--http-port", str(self.http_port), "--max-delay-ms", "2"]
        if redis_url:
            args += ["--redis-url", redis_url]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "teacher_server", "serve", *args],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            seen.append(line)
            if line.startswith("teacher ready"):
                break
        else:
            raise RuntimeError("the teacher service exited before it was ready:\n" + "".join(seen[-20:]))
        # Keep reading its output (so that it never blocks on a full pipe).
        import threading

        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0

    def counters(self) -> dict[str, float]:
        """The service's work so far: pairs scored by the engine, and score-cache hits."""
        return {
            "sentences_scored": self.metric("hoidistill_teacher_sentences_scored_total"),
            "cache_hits": self.metric("hoidistill_teacher_cache_hits_total"),
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: drain and exit
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def run_student_ranks(ranks: int, config_path: Path, overrides: list[str], progress: bool) -> None:
    """``torchrun --nproc_per_node=RANKS -m student train`` on loopback; raises on failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += ["-m", "student", "train", "--config", str(config_path), *overrides]
    if not progress:
        command.append("--no-progress")
    result = subprocess.run(command, env=child_env(), check=False)
    if result.returncode != 0:
        from student.engine import TrainingError

        raise TrainingError(f"torchrun with {ranks} ranks exited with code {result.returncode}")


def run_topology(
    args: argparse.Namespace,
    config: Any,
    overrides: list[str],
    teacher_model: str | None,
    service: bool,
    progress: bool,
) -> tuple[str, Any]:
    """Redis + teacher service + prewarm + ``torchrun`` student; (teacher summary, evaluation)."""
    from student.teacher.pool import EndpointPool
    from student.teacher.prewarm import PREWARM_TIMEOUT_S, plan_items, prewarm

    ranks = args.ranks
    # The same global batch as one process, and the CPU threads shared out (2 cores here: more
    # threads than cores makes every rank slower than one process alone).
    threads = max(1, (config.run.num_threads or os.cpu_count() or 1) // ranks)
    per_rank = [f"optim.batch_size={config.optim.batch_size // ranks}", f"run.num_threads={threads}"]
    with redis_process(args.work_dir) as redis_url:
        teacher = None
        try:
            if service:
                log.info(
                    f"score cache: Redis at {redis_url}"
                    if redis_url
                    else "score cache: no redis-server here, the teacher's in-process cache"
                )
                teacher = TeacherService(str(teacher_model), redis_url)
                log.info("teacher service: %s (its own process)", teacher.endpoint)
                per_rank.append(f"teacher.source={teacher.endpoint}")
                if redis_url:  # the ranks read the prewarmed cache before any RPC
                    per_rank.append(f"teacher.redis_url={redis_url}")
                endpoint = teacher.endpoint
            else:
                endpoint = config.teacher.source
            if not service and config.teacher.source == "local":
                # Each rank loads its own in-process engine: nothing to prewarm.
                per_rank.append(f"teacher.model={teacher_model}")
                scored = "each rank scored with its own in-process teacher"
            elif config.teacher.enabled:
                pool = EndpointPool(endpoint, timeout_s=PREWARM_TIMEOUT_S)
                try:
                    warmed = prewarm(plan_items(config), pool, progress=progress)
                finally:
                    pool.close()
                log.info(warmed.describe())
                scored = f"prewarm scored {warmed.sentences} (image, sentence) pairs"
            else:
                scored = "no teacher"
            before = teacher.counters() if teacher is not None else {}
            run_student_ranks(ranks, args.config, [*overrides, *per_rank], progress)
            if teacher is not None:
                during = {name: value - before[name] for name, value in teacher.counters().items()}
                scored += (
                    f"; during training the teacher service ran {during['sentences_scored']:.0f} pairs through "
                    f"BLIP and answered {during['cache_hits']:.0f} from its cache"
                    + (" (the ranks read the prewarmed scores from Redis themselves)" if redis_url else "")
                )
        finally:
            if teacher is not None:
                teacher.stop()
    # Rank 0 evaluated the trained student at the end of training: its preds.json, scored here
    # again for the per-triplet numbers (metrics.json holds the summary only).
    from student.builders import correspondence_of
    from student.engine import score_predictions
    from student.evaluation import load_json

    data = config.data
    evaluation = score_predictions(
        load_json(Path(config.run.output_dir) / "preds.json"),
        dataset=data.dataset,
        test_annotations=data.path("test_annotations"),
        train_annotations=data.path("train_annotations") if data.dataset == "hico" else None,
        correspondence=correspondence_of(config) if data.dataset == "hico" else None,
    )
    return scored, evaluation


def draw_pictures(config: Any) -> list[Path]:
    """The pictures the demo ends with, written into the run directory; returns their paths.

    ``curves.png``: the loss terms and the test mAP per epoch (``student.curves``); then the
    trained student's predictions on the first ``DEMO_PICTURED_IMAGES`` test images.
    """
    from student.checkpoint import CHECKPOINT_NAME
    from student.curves import plot_training_curves

    run_dir = Path(config.run.output_dir)
    pictures = [plot_training_curves(run_dir)]
    annotations = json.loads(config.data.path("test_annotations").read_text())
    images = [config.data.path("test_images") / entry["file_name"] for entry in annotations[:DEMO_PICTURED_IMAGES]]
    pictures += _draw_predictions(run_dir / CHECKPOINT_NAME, images, run_dir / "predictions")
    return pictures


def _draw_predictions(checkpoint: Path, images: list[Path], out_dir: Path) -> list[Path]:
    """The student of ``checkpoint`` run on ``images``, each drawn with its kept triplets into a PNG
    of ``out_dir``; returns the PNGs' paths. The one place the demo draws predictions.
    """
    from student.predict import Predictor, predict_files

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    return [result.picture for result in predict_files(predictor, images, out_dir)]
