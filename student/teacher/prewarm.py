"""Prewarm: score every candidate sentence of every training image once (``python -m student prewarm``).

    python -m student prewarm --config student/configs/hico.yaml --teacher grpc://teacher:50051 \\
        data.root=/data/hico_20160224_det

For ``kl`` distillation the sentences a training image needs depend on its ground truth only
("a person {verb} a {object}" for every verb valid with each annotated object), so all of them
can be scored before training. The teacher service writes every score to its cache (Redis), and
the training run then reads the cache instead of waiting for the teacher.

Parallel: ``--workers`` requests of ``--images-per-request`` images are in flight at once, spread
round robin over the endpoints (``grpc://a:50051,grpc://b:50051`` or ``triton://...``).
Resumable: finished images are appended to a progress file (``--progress-file``, default
``<run.output_dir>/prewarm_done.txt``, tied to the teacher's model fingerprint), and with
``--redis URL`` images whose every sentence the cache already holds are skipped too. An image
whose request failed is reported and not recorded, so a re-run retries it; the exit code is 1
when any failed.

With ``teacher.region=pair`` (the training config's switch) an item is one view: an image and one
pair region of it (``Region(human box, object box)`` in the original file's pixels, from the
same annotation training reads), with the candidate sentences of the pairs on those boxes, so a
full prewarm leaves a ``pair`` training run with nothing to ask the teacher either. The image
headers are read then (training clips the boxes to the image, and so must the regions here).
Progress and the cache are kept per view (a view id is the digest for a whole image).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from student.teacher.pool import EndpointPool
from teacher_server.errors import TeacherError
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.region import Region, view_id
from teacher_server.logs import show_progress

log = logging.getLogger(__name__)
PROGRESS_HEADER = "# hoi-distill prewarm, teacher fingerprint "
LOOKUP_BATCH = 256  # images per cache lookup round trip


# Seconds per prewarm request: ``workers`` requests of ``images_per_request`` images queue in the
# teacher's batcher together, so the last one waits for all of them (about 45 s for 4 x 8 images
# on a CPU BLIP-base); a training step's short deadline would fail them.
PREWARM_TIMEOUT_S = 120.0


class PrewarmError(TeacherError):
    """Prewarm cannot run (no teacher endpoint, unreadable image, ...); the message says which."""


@dataclass(frozen=True)
class PrewarmItem:
    """One training image (or one pair region of it) and the sentences its ground truth needs scored."""

    digest: str  # SHA-256 hex of the image file
    path: Path
    sentences: tuple[str, ...]
    region: Region | None = None  # teacher.region=pair: the pair, in original pixels; None = whole image

    @property
    def view(self) -> str:
        """The item's key in the progress file and the cache (the digest for a whole image)."""
        return view_id(self.digest, self.region)


@dataclass
class PrewarmResult:
    """What a prewarm run did (``describe`` is its summary line)."""

    images: int = 0  # items: training images (teacher.region=pair: views) with at least one sentence
    skipped_done: int = 0  # in the progress file already
    skipped_cached: int = 0  # every sentence already in the cache
    scored_images: int = 0
    sentences: int = 0  # (image, sentence) pairs sent
    served_from_cache: int = 0  # of those, answered from the teacher's cache
    failed_images: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        return (
            f"prewarm: {self.images} images; {self.skipped_done} done before, {self.skipped_cached} already cached; "
            f"scored {self.scored_images} images / {self.sentences} sentences "
            f"({self.served_from_cache} from the teacher's cache); {self.failed_images} failed; {self.seconds:.1f} s"
        )

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def file_digest(path: Path) -> str:
    """SHA-256 hex of the file's bytes (the teacher's image key)."""
    try:
        return image_digest(path.read_bytes())
    except OSError as error:
        raise PrewarmError(f"cannot read training image {path}: {error.strerror or error}") from None


def plan_items(config: Any) -> list[PrewarmItem]:
    """Every training image (``teacher.region=pair``: every view) with candidate sentences, in annotation order.

    The sentences are the ones ``TeacherScores.plan`` asks for during training (the same code
    builds them and, for ``pair``, the regions), over all the image's pairs (a superset when
    ``data.max_pairs`` truncates).
    """
    from student.teacher.scores import TeacherScores, pair_region
    from teacher_server.hoi.annotations import dataset_spec, load_annotations, load_correspondence

    data = config.data
    image_root = data.path("train_images")
    pairs_mode = getattr(config.teacher, "region", "image") == "pair"
    sentences_of = TeacherScores(
        None,
        verbs=dataset_spec(data.dataset).verbs,
        correspondence=load_correspondence(data.path("correspondence"), data.dataset),
        image_root=image_root,
        prompt_variant=config.distill.prompt_variant,
    ).sentences_of_object
    items = []
    # image: the images are not opened here, so boxes outside them are not seen: under clamp /
    # drop training may drop a few more pairs, and prewarm then scores a few sentences more, never
    # fewer. pair: the headers are read (as the training set does), so the clipped boxes, and with
    # them the regions, are the ones training names.
    annotations = load_annotations(
        data.path("train_annotations"),
        data.dataset,
        image_root=image_root if pairs_mode else None,
        box_policy=data.box_policy,
    )
    for annotation in annotations:
        by_view: dict[Region | None, list[str]] = {}
        # float32, as the training target holds them: the canonical rounding then agrees exactly.
        boxes = np.asarray(annotation.boxes, dtype=np.float32).tolist()
        for pair in annotation.pairs():
            if pair.object < 0:
                continue
            region = None
            if pairs_mode:
                values = [*boxes[pair.subject], *boxes[pair.object]]
                region = pair_region(values, annotation.image_size)
            by_view.setdefault(region, []).extend(sentences_of(int(annotation.labels[pair.object])).values())
        path = image_root / annotation.file_name
        digest = None
        for region, sentences in by_view.items():
            unique = tuple(dict.fromkeys(sentences))
            if unique:
                digest = digest or file_digest(path)
                items.append(PrewarmItem(digest, path, unique, region))
    return items


class ProgressFile:
    """View ids of finished items (an image's digest, or digest/region), one per line, under a header
    naming the teacher's fingerprint.

    A file written for another fingerprint (another model) is started afresh. Appends are
    flushed per chunk, so a killed run loses at most the chunks in flight.
    """

    def __init__(self, path: Path | None, fingerprint: str | None) -> None:
        self.path = path
        self.fingerprint = fingerprint or "unknown"
        self.done: set[str] = set()
        self._lock = threading.Lock()
        if path is None:
            return
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines and lines[0] == PROGRESS_HEADER + self.fingerprint:
                self.done = {line.strip() for line in lines[1:] if line.strip()}
            else:
                log.warning("%s: written for another teacher model, starting afresh", path)
                path.unlink()
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(PROGRESS_HEADER + self.fingerprint + "\n")

    def record(self, digests: Iterable[str]) -> None:
        if self.path is None:
            return
        with self._lock, self.path.open("a") as handle:
            handle.write("".join(f"{d}\n" for d in digests))


def fully_cached(items: Sequence[PrewarmItem], cache: Any, fingerprint: str) -> set[str]:
    """Views of the items whose every sentence the cache holds (one lookup per ``LOOKUP_BATCH``)."""
    found: set[str] = set()
    for start in range(0, len(items), LOOKUP_BATCH):
        chunk = items[start : start + LOOKUP_BATCH]
        hits = cache.lookup(fingerprint, [(item.view, list(item.sentences)) for item in chunk])
        found.update(item.view for item, row in zip(chunk, hits, strict=True) if all(h is not None for h in row))
    return found


def prewarm(
    items: Sequence[PrewarmItem],
    pool: EndpointPool,
    *,
    workers: int = 4,
    images_per_request: int = 8,
    progress_file: Path | None = None,
    cache: Any | None = None,
    progress: bool | None = None,
) -> PrewarmResult:
    """Score every item's sentences through ``pool``, skipping what is already done or cached.

    ``progress``: a tqdm bar; None = when stderr is a terminal (``show_progress``).
    """
    if workers < 1 or images_per_request < 1:
        raise PrewarmError(f"workers ({workers}) and images_per_request ({images_per_request}) must be >= 1")
    started = time.perf_counter()
    result = PrewarmResult(images=len(items))
    try:
        fingerprint = pool.fingerprint()
    except TeacherError as error:
        raise PrewarmError(f"the teacher does not answer ({error})") from None
    record = ProgressFile(progress_file, fingerprint)
    todo = [item for item in items if item.view not in record.done]
    result.skipped_done = len(items) - len(todo)
    if cache is not None and fingerprint is not None and todo:
        cached = fully_cached(todo, cache, fingerprint)
        result.skipped_cached = len(cached)
        record.record(item.view for item in todo if item.view in cached)
        todo = [item for item in todo if item.view not in cached]
    log.info(
        "prewarm: %d of %d images to score with %s (%d in parallel)", len(todo), len(items), pool.description, workers
    )
    chunks = [todo[start : start + images_per_request] for start in range(0, len(todo), images_per_request)]
    lock = threading.Lock()
    bar = tqdm(total=len(todo), desc="prewarm", unit="img", disable=not show_progress(progress), dynamic_ncols=True)

    def score(chunk: list[PrewarmItem]) -> None:
        try:
            answers = pool.score(
                [item.path for item in chunk], [list(item.sentences) for item in chunk], [item.region for item in chunk]
            )
        except TeacherError as error:
            log.warning("prewarm: %d images failed (%s); a re-run retries them", len(chunk), error)
            with lock:
                result.failed_images += len(chunk)
        else:
            record.record(item.view for item in chunk)
            with lock:
                result.scored_images += len(chunk)
                result.sentences += sum(len(row) for row in answers)
                result.served_from_cache += sum(bool(getattr(s, "cached", False)) for row in answers for s in row)
        bar.update(len(chunk))

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prewarm") as executor:
            for future in as_completed([executor.submit(score, chunk) for chunk in chunks]):
                future.result()
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    return result
