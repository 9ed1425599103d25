"""What only real GPUs (and the real files' conventions) show, in one command: ``make gpu-check``.

    python bench/gpu_check.py                  # every check this host can run
    python bench/gpu_check.py --only engine_dtypes_vs_cpu_fp32,teacher_oom_recovery
    python bench/gpu_check.py --list           # the checks, and which need CUDA
    python bench/gpu_check.py --cpu-only       # the CPU parts only, even on a CUDA host (the test suite)

On a CUDA host it runs every check, in well under 10 minutes on one GPU (the 2-rank NCCL check
needs 2 GPUs and is skipped with fewer); on a host without CUDA it runs the CPU parts and lists the
CUDA ones as skipped. It prints one table row per check as it finishes, then a last line of JSON:
``{"cuda": bool, "device": str, "passed": [...], "failed": [...], "skipped": [...], "details": {...}}``.
Exit status: 0 when no check failed (a CPU host: the CPU parts passed), 1 otherwise.

CPU parts (they also run in the test suite, ``tests/system/test_gpu_check.py``): RNG states restored
from a checkpoint loaded with a non-CPU map_location; the precision rules (bf16 from compute
capability 8.0); frozen batch norm and heads under autocast; the batched matcher cost; the
engine's fused attention and its parity with stock BLIP; the V-COCO box convention; top-k before
triplet NMS; the annotation box policy; a bit-exact resume of a tiny student.

CUDA parts, with the tolerances they hold:

- ``engine_dtypes_vs_cpu_fp32``: BLIP-base shapes (random weights), 2 images x 16 sentences; the
  engine on the GPU in fp32 (TF32 off), fp16 and bf16 (bf16 only from compute capability 8.0)
  against the CPU fp32 engine: max |P(match) difference| <= 1e-4 (fp32), 2e-2 (fp16), 5e-2 (bf16),
  every score finite.
- ``engine_vs_stock_throughput_k32``: sentences/s of the stock ``BlipForImageTextRetrieval`` forward
  and of the engine (cold vision cache) on K = 32 sentences of one image, per dtype; passes when
  the engine is at least as fast as the stock forward in every dtype.
- ``teacher_oom_recovery``: with the GPU filled up, a large batch through the dynamic batcher
  fails with CUDA out-of-memory; once memory is free again the same batcher and engine score a
  request exactly as before, and allocated memory is back to its level before (plus at most the
  vision cache).
- ``matcher_one_host_sync``: one Hungarian matching of a batch synchronises with the GPU once.
- ``student_amp_20_steps_resume``: a tiny student trains 10 steps with AMP (the dtype the device's
  capability picks), writes its checkpoint, and a resumed run continues to step 20 with finite
  losses (resume on CUDA is not bit-exact: ``docs/training.md``).
- ``nccl_2_ranks_equal_1_rank``: with 2+ GPUs, the first step's loss of 2 NCCL ranks (global batch
  split over them) equals the 1-process loss to 1e-4 (relative), and one DDP step runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import math
import os
import random
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_CONFIG = REPO / "student" / "configs" / "demo.yaml"
SENTENCES = [
    "a person ride a horse",
    "a person hold a cup",
    "a person kick a sports ball",
    "a person eat a pizza",
    "a person sit on a bench",
    "a person walk a dog",
    "a person throw a frisbee",
    "a person hop on an airplane",
    "a person carry a surfboard",
    "a person read a book",
    "a person drink with a wine glass",
    "a person wear a tie",
    "a person cut a cake with a knife",
    "a person fly a kite on the beach",
    "a person repair a bicycle",
    "a person watch a tv",
]
# Largest |P(match) difference| to the CPU fp32 engine, per GPU dtype (see the module docstring).
PROB_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class Context:
    """What the checks share: the host, a scratch directory and lazily built inputs."""

    cuda: bool
    work: Path
    threads: int
    teacher_size: str
    cache: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for, the same object afterwards."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


@dataclass(frozen=True)
class Check:
    name: str
    needs_cuda: bool
    run: Callable[[Context], str]  # returns a one-line detail; raises on failure, Skip to skip


# -- shared inputs ---------------------------------------------------------------------------------


def tiny_blip(context: Context) -> Path:
    from teacher_server.tiny_model import make_tiny_model

    return context.once("tiny_blip", lambda: make_tiny_model(context.work / "tiny-blip", seed=0))


def teacher_model(context: Context) -> Path:
    """The teacher the CUDA checks time: BLIP-base shapes (random weights) unless ``--teacher-size tiny``."""
    from teacher_server.tiny_model import make_model_of_size

    directory = context.work / f"blip-{context.teacher_size}"
    return context.once("teacher", lambda: make_model_of_size(context.teacher_size, directory))


def image_bytes(seed: int, height: int = 480, width: int = 640) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def synthetic_data(context: Context, train: int) -> Path:
    """A synthetic HICO-format dataset of ``train`` 64-px training images (written once)."""
    from student.data.synthetic import write_synthetic_dataset

    root = context.work / f"synthetic-{train}"

    def build() -> Path:
        write_synthetic_dataset(root, train, 2, seed=5, image_size=64, progress=False)
        return root

    return context.once(str(root), build)


def tiny_student_overrides(root: Path, output: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        f"run.output_dir={output}",
        "data.scales=[56, 64]",
        "data.max_size=96",
        "data.test_scale=64",
        "data.num_workers=0",
        "model.backbone.base_width=8",
        "model.transformer.d_model=32",
        "model.transformer.dim_feedforward=32",
        "model.transformer.dropout=0.2",  # dropout draws random numbers every step
        "model.transformer.num_encoder_layers=1",
        "model.decoder.num_queries=4",
        "optim.batch_size=2",
        "schedule.epochs=10",
        "schedule.lr_drop=[1]",
        "teacher.source=none",
        "run.eval_at_end=false",
        "run.progress=false",
        "run.seed=7",
        *extra,
    ]


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# -- CPU parts -------------------------------------------------------------------------------------


def check_checkpoint_rng_on_cpu(context: Context) -> str:
    from torch import nn

    from student.checkpoint import TrainingPosition, load_checkpoint, restore_rng_state, save_checkpoint

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1])
    torch.manual_seed(3)
    path = save_checkpoint(
        context.work / "rng.pth",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        position=TrainingPosition(),
        config={},
    )
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.rand(5)
    # Where a GPU run loads its checkpoint (cuda:0); 'meta' stands in for a non-CPU device without one.
    location = "cuda:0" if context.cuda else "meta"
    checkpoint = load_checkpoint(path, map_location=location)
    require(checkpoint["rng"]["torch"].device.type == "cpu", "RNG state left the CPU")
    restore_rng_state(checkpoint["rng"])
    require((random.random(), float(np.random.rand()), float(torch.rand(()))) == expected, "draws differ")
    return f"loaded with map_location={location}; RNG states on the CPU, draws restored"


def check_precision_choice(context: Context) -> str:
    from teacher_server.precision import choose_dtype, device_capability

    table = {(7, 0): torch.float16, (7, 5): torch.float16, (8, 0): torch.bfloat16, (9, 0): torch.bfloat16}
    for capability, dtype in table.items():
        require(choose_dtype("auto", capability, name="x") == dtype, f"auto on {capability}")
    if not context.cuda:
        return "auto: fp16 below compute capability 8.0, bf16 from it"
    capability = device_capability(torch.device("cuda", 0))
    chosen = choose_dtype("auto", capability, name="x")
    return f"cuda:0 has compute capability {capability[0]}.{capability[1]}: auto picks {chosen}"


def check_frozen_bn_keeps_dtype(context: Context) -> str:
    from student.model.backbone import FrozenBatchNorm2d

    cases = [("cpu", torch.bfloat16)] + ([("cuda", torch.float16), ("cuda", torch.bfloat16)] if context.cuda else [])
    for device, dtype in cases:
        norm = FrozenBatchNorm2d(8).to(device)
        conv = torch.nn.Conv2d(3, 8, 3).to(device)
        with torch.autocast(device, dtype=dtype):
            out = norm(conv(torch.randn(2, 3, 16, 16, device=device)))
        require(out.dtype == dtype, f"{device} {dtype}: FrozenBatchNorm2d returned {out.dtype}")
    return "keeps " + ", ".join(f"{device} {str(dtype).split('.')[1]}" for device, dtype in cases)


def check_heads_in_fp32(context: Context) -> str:
    from student.model.decoders import HOIHeads

    devices = ["cpu"] + (["cuda"] if context.cuda else [])
    for device in devices:
        heads = HOIHeads(32, 80, 117).to(device)
        features = torch.randn(2, 4, 32, device=device)
        half = torch.bfloat16 if device == "cpu" else torch.float16
        with torch.autocast(device, dtype=half):
            outputs = heads(features.to(half), features.to(half), features.to(half))
        require(all(v.dtype == torch.float32 for v in outputs.values()), f"{device}: heads not in fp32")
    return f"box, class and verb heads return fp32 under autocast on {', '.join(devices)}"


def check_matcher_batch_cost(context: Context) -> str:
    from student.losses.matcher import OUTPUT_KEYS, HungarianMatcher

    generator = torch.Generator().manual_seed(0)
    batch, queries, verbs = 4, 64, 117
    outputs = {
        "pred_obj_logits": torch.randn(batch, queries, 81, generator=generator),
        "pred_verb_logits": torch.randn(batch, queries, verbs, generator=generator),
        "pred_sub_boxes": 0.25 + 0.5 * torch.rand(batch, queries, 4, generator=generator),
        "pred_obj_boxes": 0.25 + 0.5 * torch.rand(batch, queries, 4, generator=generator),
    }
    targets = []
    for pairs in (3, 0, 9, 5):
        targets.append(
            {
                "obj_labels": torch.randint(0, 80, (pairs,), generator=generator),
                "verb_labels": (torch.rand(pairs, verbs, generator=generator) < 0.05).float(),
                "sub_boxes": 0.25 + 0.5 * torch.rand(pairs, 4, generator=generator),
                "obj_boxes": 0.25 + 0.5 * torch.rand(pairs, 4, generator=generator),
            }
        )
    matcher = HungarianMatcher()
    costs = matcher.batch_costs(outputs, targets)
    for b, target in enumerate(targets):
        alone = matcher.cost_matrix({key: outputs[key][b] for key in OUTPUT_KEYS}, target).numpy()
        require(np.array_equal(costs[b], alone), f"image {b}: the batch cost differs from its own")
    return f"{batch} x {queries} queries: each image's block equals its own cost exactly"


def check_engine_sdpa_vs_eager(context: Context) -> str:
    from teacher_server.engine import EngineSettings, ItmEngine

    engine = ItmEngine.from_pretrained(tiny_blip(context), EngineSettings(device="cpu", dtype="fp32"))
    generator = torch.Generator().manual_seed(0)
    heads, dim = engine._num_heads, engine._head_dim
    q, k, v = (torch.randn(3, heads, n, dim, generator=generator) for n in (5, 9, 9))
    mask = torch.zeros(3, 1, 1, 9)
    mask[1, ..., 6:] = torch.finfo(torch.float32).min
    eager = ((q @ k.transpose(-1, -2) / math.sqrt(dim) + mask).softmax(-1) @ v).transpose(-3, -2).flatten(-2)
    difference = float((engine._attend(q, k, v, mask) - eager).abs().max())
    require(difference <= 1e-5, f"fused attention differs from the eager formula by {difference:.2e}")
    return f"max |difference| {difference:.1e} (limit 1e-5)"


def check_engine_vs_stock_cpu_fp32(context: Context) -> str:
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
    from teacher_server.hoi.digest import image_digest

    directory = tiny_blip(context)
    engine = ItmEngine.from_pretrained(directory, EngineSettings(device="cpu", dtype="fp32"))
    stock = BlipForImageTextRetrieval.from_pretrained(directory).eval()
    processor = BlipProcessor.from_pretrained(directory)
    data = image_bytes(1, 60, 80)
    sentences = SENTENCES[:6]
    (scores,) = engine.score([ImageSentences(image_digest(data), engine.prepare_image(data), sentences)])
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    inputs = processor(images=[image] * len(sentences), text=sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = stock(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
            use_itm_head=True,
        ).itm_score
    expected = (logits[:, 1] - logits[:, 0]).tolist()
    difference = max(abs(s.match_logit - e) for s, e in zip(scores, expected, strict=True))
    require(difference <= 1e-4, f"engine vs stock margin difference {difference:.2e} > 1e-4")
    return f"{len(sentences)} sentences, max |margin difference| {difference:.1e} (limit 1e-4)"


def check_vcoco_official_boxes(context: Context) -> str:
    from student.evaluation.predictions import parse_hoi_entries, parse_predictions
    from student.evaluation.vcoco import evaluate_vcoco
    from teacher_server.hoi.classes import VCOCO_VERBS

    eat = VCOCO_VERBS.index("eat_obj")
    gt = [
        {
            "file_name": "x.jpg",
            "annotations": [{"bbox": [0, 0, 100, 100], "category_id": 1}],
            "hoi_annotation": [{"subject_id": 0, "object_id": -1, "category_id": eat}],
        }
    ]
    preds = [
        {
            "file_name": "x.jpg",
            "predictions": [{"bbox": [0, 0, 99, 49.2], "category_id": 1}],
            "hoi_prediction": [{"subject_id": 0, "object_id": -1, "category_id": eat, "score": 0.9}],
        }
    ]
    truth = parse_hoi_entries(gt, dataset="vcoco", kind="annotations", source="gt")
    parsed = parse_predictions(preds, "vcoco", truth)
    official = evaluate_vcoco(parsed, truth).role_ap_1["eat_obj"]
    as_written = evaluate_vcoco(parsed, truth, ground_truth_boxes="official").role_ap_1["eat_obj"]
    require((official, as_written) == (1.0, 0.0), f"AP {official} / {as_written}, expected 1 / 0")
    return "agent IoU 0.502 with x2 = x + w - 1 (hit), 0.492 with the file's x + w (miss)"


def check_top_k_then_nms(context: Context) -> str:
    from student.evaluation.postprocess import TripletNms, postprocess
    from teacher_server.hoi.classes import HICO_VERBS, OBJECT_NAMES

    obj = torch.zeros(1, 3, len(OBJECT_NAMES) + 1)
    obj[0, :, OBJECT_NAMES.index("horse")] = 8.0
    verbs = torch.full((1, 3, len(HICO_VERBS)), -10.0)
    verbs[0, :, HICO_VERBS.index("ride")] = torch.tensor([3.0, 2.0, 1.0])
    outputs = {
        "pred_obj_logits": obj,
        "pred_verb_logits": verbs,
        "pred_sub_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.51, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]]),
        "pred_obj_boxes": torch.tensor([[[0.6, 0.6, 0.2, 0.2], [0.6, 0.61, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]]]),
    }
    (entry,) = postprocess(outputs, [[200, 200]], top_k=2, nms=TripletNms(threshold=0.7))
    require(len(entry["hoi_prediction"]) == 1, f"kept {len(entry['hoi_prediction'])} triplets, expected 1")
    return "top 2 kept, then NMS removed the overlapping one (NMS first would have kept 2)"


def check_box_policy_clamp(context: Context) -> str:
    from PIL import Image

    from teacher_server.hoi.annotations import read_annotations

    Image.new("RGB", (100, 80)).save(context.work / "box.jpg")
    entry = {
        "file_name": "box.jpg",
        "annotations": [
            {"bbox": [10, 5, 40, 60], "category_id": 1},
            {"bbox": [5, 30, 104, 79], "category_id": 19},  # 4 px past the right edge
            {"bbox": [50, 20, 40, 30], "category_id": 47},  # inverted
        ],
        "hoi_annotation": [
            {"subject_id": 0, "object_id": 1, "category_id": 77},
            {"subject_id": 0, "object_id": 2, "category_id": 37},
        ],
    }
    path = context.work / "boxes.json"
    path.write_text(json.dumps([entry]))
    fixes = read_annotations(path, "hico", image_root=context.work, box_policy="clamp").fixes
    counts = (fixes.boxes_clamped, fixes.boxes_dropped, fixes.hois_dropped)
    require(counts == (1, 1, 1), f"clamped, dropped, HOIs dropped = {counts}, expected (1, 1, 1)")
    return "clamp: 1 box clamped, 1 inverted box dropped with its HOI, counted"


def check_student_resume_cpu_exact(context: Context) -> str:
    from student.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from student.config import load_config
    from student.training import train

    root = synthetic_data(context, 6)
    extra = ("run.device=cpu", f"run.num_threads={context.threads}")

    def config(name: str, steps: int):
        overrides = tiny_student_overrides(root, context.work / name, f"schedule.max_steps={steps}", *extra)
        return load_config(DEMO_CONFIG, overrides)

    straight = train(config("cpu-straight", 4))
    train(config("cpu-split", 2))
    stopped = load_checkpoint(context.work / "cpu-split" / CHECKPOINT_NAME)["model"]
    resumed = train(config("cpu-split", 4), resume="auto")
    require(resumed.position == straight.position, f"positions {resumed.position} != {straight.position}")
    require(straight.position.global_step == 4, f"the straight run stopped at {straight.position}")
    first = load_checkpoint(context.work / "cpu-straight" / CHECKPOINT_NAME)["model"]
    second = load_checkpoint(context.work / "cpu-split" / CHECKPOINT_NAME)["model"]
    require(any(not torch.equal(first[name], stopped[name]) for name in first), "steps 3-4 changed no weight")
    different = [name for name in first if not torch.equal(first[name], second[name])]
    require(not different, f"{len(different)} tensors differ after the resume, e.g. {different[:2]}")
    return "4 steps straight == 2 + resume + 2 (dropout on), every weight bit-exact"


# -- CUDA parts ------------------------------------------------------------------------------------


def check_engine_dtypes_vs_cpu_fp32(context: Context) -> str:
    from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
    from teacher_server.hoi.digest import image_digest
    from teacher_server.precision import device_capability

    directory = teacher_model(context)
    images = [image_bytes(seed) for seed in (1, 2)]

    def probabilities(engine: ItmEngine) -> np.ndarray:
        requests = [ImageSentences(image_digest(data), engine.prepare_image(data), SENTENCES) for data in images]
        return np.array([[score.match_prob for score in row] for row in engine.score(requests)])

    reference = probabilities(ItmEngine.from_pretrained(directory, EngineSettings(device="cpu", dtype="fp32")))
    dtypes = ["fp32", "fp16"]
    if device_capability(torch.device("cuda", 0)) >= (8, 0):
        dtypes.append("bf16")
    results, failures = [], []
    for dtype in dtypes:
        with tf32(False):
            engine = ItmEngine.from_pretrained(directory, EngineSettings(device="cuda:0", dtype=dtype))
            got = probabilities(engine)
        del engine
        torch.cuda.empty_cache()
        difference = float(np.abs(got - reference).max()) if np.isfinite(got).all() else math.inf
        results.append(f"{dtype} {difference:.1e} (limit {PROB_TOLERANCE[dtype]:g})")
        if difference > PROB_TOLERANCE[dtype]:
            failures.append(dtype)
    spread = float(reference.max() - reference.min())
    detail = f"max |dP| vs CPU fp32 over {reference.size} pairs (P spread {spread:.2f}): " + ", ".join(results)
    require(not failures, detail)
    return detail + ("" if "bf16" in dtypes else "; bf16 not run: compute capability < 8.0")


def check_engine_vs_stock_throughput_k32(context: Context) -> str:
    from PIL import Image
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine, VisionCache
    from teacher_server.hoi.digest import image_digest
    from teacher_server.precision import DTYPE_NAMES, device_capability

    directory = teacher_model(context)
    processor = BlipProcessor.from_pretrained(directory)
    data = image_bytes(3)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    sentences = [SENTENCES[i % len(SENTENCES)] + (f" number {i}" if i >= len(SENTENCES) else "") for i in range(32)]
    inputs = processor(images=[image] * 32, text=sentences, return_tensors="pt", padding=True)
    dtypes = ["fp32", "fp16"] + (["bf16"] if device_capability(torch.device("cuda", 0)) >= (8, 0) else [])
    rows, slower = [], []
    for name in dtypes:
        dtype = DTYPE_NAMES[name]
        stock = BlipForImageTextRetrieval.from_pretrained(directory, dtype=dtype).to("cuda:0").eval()
        engine = ItmEngine.from_pretrained(directory, EngineSettings(device="cuda:0", dtype=name))
        batch = {key: value.to("cuda:0") for key, value in inputs.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)

        def run_stock(model=stock, batch=batch) -> None:
            with torch.inference_mode():
                model(**batch, use_itm_head=True)

        # Decoding and resizing happen outside the timed part on both sides (the processor above).
        request = [ImageSentences(image_digest(data), engine.prepare_image(data), sentences)]

        def run_engine(engine=engine, request=request) -> None:
            engine.vision_cache = VisionCache(engine.settings.vision_cache_mb)  # cold: the image is new
            engine.score(request)

        stock_s, engine_s = best_of(run_stock), best_of(run_engine)
        ratio = stock_s / engine_s
        rows.append(f"{name}: stock {32 / stock_s:.0f}/s, engine {32 / engine_s:.0f}/s ({ratio:.2f}x)")
        if ratio < 1.0:
            slower.append(name)
        del stock, engine
        torch.cuda.empty_cache()
    detail = "K=32 sentences/s: " + "; ".join(rows)
    require(not slower, detail + f" (engine slower in {slower})")
    return detail


def best_of(action: Callable[[], None], repeats: int = 5) -> float:
    """Fastest of ``repeats`` timed runs after one warm-up, GPU work included."""
    action()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def check_teacher_oom_recovery(context: Context) -> str:
    from teacher_server.batcher import BatchItem, DynamicBatcher
    from teacher_server.engine import EngineSettings, ItmEngine, VisionCache
    from teacher_server.hoi.digest import image_digest

    settings = EngineSettings(device="cuda:0", dtype="fp16", vision_batch_size=64, text_batch_size=4096)
    engine = ItmEngine.from_pretrained(teacher_model(context), settings)
    small_data = image_bytes(10)
    small = BatchItem(image_digest(small_data), engine.prepare_image(small_data), tuple(SENTENCES[:4]))
    # 64 new images in one vision batch (BLIP-base, fp16: about 0.7 GB of attention scores alone)
    # and 1,024 (image, sentence) pairs: far beyond the ~100 MB left free below.
    big = [
        BatchItem(image_digest(data), engine.prepare_image(data), tuple(SENTENCES))
        for data in (image_bytes(100 + i, 96, 128) for i in range(64))
    ]

    async def scenario() -> tuple[list[float], BaseException | None, list[float], int, int]:
        # The batcher logs the failed batch with its traceback: expected here, not worth a page.
        logging.getLogger("teacher_server.batcher").setLevel(logging.CRITICAL)
        batcher = DynamicBatcher([engine], max_batch_sentences=100_000, max_delay_ms=0)
        await batcher.start()
        try:
            (before,) = batcher.submit([small])
            expected = [score.match_logit for score in await before]
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
            ballast = fill_gpu_memory(leave_bytes=96 << 20)
            error: BaseException | None = None
            try:
                await asyncio.gather(*batcher.submit(big))
            except BaseException as caught:  # whatever the engine raised is the result
                error = caught
            finally:
                del ballast
                torch.cuda.empty_cache()
            engine.vision_cache = VisionCache(settings.vision_cache_mb)  # the vision tower runs again too
            (after,) = batcher.submit([small])
            again = [score.match_logit for score in await after]
            torch.cuda.synchronize()
            return expected, error, again, baseline, torch.cuda.memory_allocated()
        finally:
            await batcher.stop()

    expected, error, again, baseline, allocated = asyncio.run(scenario())
    require(error is not None, "the large batch did not fail: out-of-memory could not be provoked")
    is_oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower() or "ALLOC" in str(error)
    require(is_oom, f"the large batch failed with {type(error).__name__}: {str(error)[:120]}, not out-of-memory")
    difference = max(abs(a - b) for a, b in zip(expected, again, strict=True))
    require(difference <= 1e-3, f"scores after the OOM differ by {difference:.2e}")
    growth = (allocated - baseline) / 2**20
    require(growth <= settings.vision_cache_mb + 64, f"allocated memory grew by {growth:.0f} MiB and stayed")
    name = type(error).__name__
    return f"{name} failed that batch; then the same scores (|d| {difference:.1e}), memory +{growth:.0f} MiB"


def fill_gpu_memory(leave_bytes: int) -> list[torch.Tensor]:
    """Allocate GPU memory in shrinking blocks until about ``leave_bytes`` are free.

    The allocator's cache is emptied first: memory it holds but does not use would otherwise
    stay available to the engine without showing in ``mem_get_info``.
    """
    torch.cuda.empty_cache()
    ballast = []
    block = 1 << 30
    while block >= 1 << 20:
        free, _ = torch.cuda.mem_get_info()
        if free - block < leave_bytes:
            block //= 2
            continue
        try:
            ballast.append(torch.empty(block, dtype=torch.uint8, device="cuda:0"))
        except torch.OutOfMemoryError:  # fragmentation: try smaller blocks
            block //= 2
    return ballast


def check_matcher_one_host_sync(context: Context) -> str:
    from student.losses.matcher import HungarianMatcher

    device = torch.device("cuda", 0)
    generator = torch.Generator().manual_seed(0)
    batch, queries, verbs = 8, 64, 117
    outputs = {
        "pred_obj_logits": torch.randn(batch, queries, 81, generator=generator).to(device),
        "pred_verb_logits": torch.randn(batch, queries, verbs, generator=generator).to(device),
        "pred_sub_boxes": (0.25 + 0.5 * torch.rand(batch, queries, 4, generator=generator)).to(device),
        "pred_obj_boxes": (0.25 + 0.5 * torch.rand(batch, queries, 4, generator=generator)).to(device),
    }
    targets = [
        {
            "obj_labels": torch.randint(0, 80, (4,), generator=generator).to(device),
            "verb_labels": (torch.rand(4, verbs, generator=generator) < 0.05).float().to(device),
            "sub_boxes": (0.25 + 0.5 * torch.rand(4, 4, generator=generator)).to(device),
            "obj_boxes": (0.25 + 0.5 * torch.rand(4, 4, generator=generator)).to(device),
        }
        for _ in range(batch)
    ]
    matcher = HungarianMatcher()
    matcher(outputs, targets)  # warm-up: first-call allocations are not the point
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            matcher(outputs, targets)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    messages = [str(w.message)[:80] for w in syncs]
    require(len(syncs) == 1, f"{len(syncs)} synchronising operations, expected 1: {messages}")
    return f"batch of {batch}: 1 host synchronisation per matching (per image it was {2 * batch})"


def check_student_amp_20_steps_resume(context: Context) -> str:
    from student.builders import amp_settings
    from student.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from student.config import load_config
    from student.engine import StepInfo
    from student.training import train

    root = synthetic_data(context, 16)
    losses: dict[int, float] = {}

    def record(info: StepInfo) -> None:
        losses[info.global_step] = info.terms["loss"]

    def config(steps: int):
        extra = ("run.device=cuda:0", "optim.amp=true", "optim.batch_size=4", f"schedule.max_steps={steps}")
        return load_config(DEMO_CONFIG, tiny_student_overrides(root, context.work / "cuda-run", *extra))

    amp = amp_settings(config(10), torch.device("cuda", 0))
    require(amp.enabled, "AMP is off on CUDA")
    first = train(config(10), hooks=[record])
    require(first.position.global_step == 10, f"stopped at step {first.position.global_step}, expected 10")
    checkpoint = load_checkpoint(context.work / "cuda-run" / CHECKPOINT_NAME)
    require((checkpoint["scaler"] is not None) == amp.grad_scaler, "the grad scaler state is missing or extra")
    resumed = train(config(20), resume="auto", hooks=[record])
    require(resumed.position.global_step == 20, f"resumed run ended at step {resumed.position.global_step}")
    require(sorted(losses) == list(range(1, 21)), f"steps logged: {sorted(losses)}")
    require(all(math.isfinite(value) for value in losses.values()), f"non-finite losses: {losses}")
    dtype = str(amp.dtype).split(".")[1]
    return f"AMP {dtype}{' + grad scaler' if amp.grad_scaler else ''}: 10 steps, resumed to 20, loss {losses[20]:.3f}"


def _nccl_rank(rank: int, world: int, port: int, root: str, output: str) -> None:
    """One of 2 NCCL ranks: its share of the first step's batch, the loss averaged over the ranks."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from student.distributed import init_distributed, reduce_means, shutdown, wrap_model

    context = init_distributed("cuda", timeout_s=120)
    try:
        loss, model = _first_step_loss(Path(root), context.device, rank, world)
        ddp = wrap_model(model, context)
        mean = reduce_means({"loss": float(loss.detach())}, context)["loss"]
        # One real DDP step: the gradient all-reduce over NCCL.
        loss_again, _ = _first_step_loss(Path(root), context.device, rank, world, model=ddp)
        loss_again.backward()
        if rank == 0:
            Path(output).write_text(json.dumps({"loss": mean}))
    finally:
        shutdown(context)


def _first_step_loss(root: Path, device: torch.device, rank: int, world: int, model: Any = None) -> tuple[Any, Any]:
    """The HOI loss of 4 training images of one size (rank r of ``world`` takes images r, r + world, ...).

    One size: each rank pads its batch to its own widest image, and padding moves the CNN's border
    features; with equal sizes 2 ranks compute exactly the 1-process loss (up to rounding).
    """
    from student.builders import build_loss, build_model, build_train_dataset, seed_everything
    from student.config import load_config
    from student.data.collate import collate_fn
    from student.engine import SeededSamples, outputs_to_float, to_device

    overrides = tiny_student_overrides(root, root / "unused", "data.scales=[64]", "data.max_size=64")
    overrides += ["model.transformer.dropout=0.0", "optim.amp=false"]
    config = load_config(DEMO_CONFIG, overrides)
    if model is None:
        seed_everything(config.run.seed)
        model = build_model(config, device)
    dataset = build_train_dataset(config)
    sizes = [dataset.annotations[index].image_size for index in dataset.indices]
    common = max(set(sizes), key=sizes.count)
    chosen = [position for position, size in enumerate(sizes) if size == common][:4]
    if len(chosen) < 4:
        raise Skip(f"the synthetic set has {len(chosen)} training images of one size, 4 needed")
    samples = SeededSamples(dataset)
    images, masks, targets = collate_fn([samples[(chosen[i], 1000 + i)] for i in range(rank, 4, world)])
    images, masks, targets = to_device(images, masks, targets, device)
    with tf32(False):
        outputs = model(images, masks)
        loss = build_loss(config, None)(outputs_to_float(outputs), targets).total
    return loss, model


def check_nccl_2_ranks_equal_1_rank(context: Context) -> str:
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        raise Skip(f"needs 2 GPUs, this host has {torch.cuda.device_count()}")
    root = synthetic_data(context, 16)
    single, _ = _first_step_loss(root, torch.device("cuda", 0), 0, 1)
    output = context.work / "nccl.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_nccl_rank, args=(2, port, str(root), str(output)), nprocs=2, join=True)
    ranks = json.loads(output.read_text())["loss"]
    relative = abs(ranks - float(single)) / abs(float(single))
    require(relative <= 1e-4, f"2 ranks {ranks:.6f} vs 1 rank {float(single):.6f}: relative {relative:.1e} > 1e-4")
    return f"first-step loss 2 ranks {ranks:.6f} = 1 rank {float(single):.6f} (relative {relative:.1e}); DDP step ran"


CHECKS = [
    Check("checkpoint_rng_on_cpu", False, check_checkpoint_rng_on_cpu),
    Check("precision_choice", False, check_precision_choice),
    Check("frozen_bn_keeps_dtype", False, check_frozen_bn_keeps_dtype),
    Check("heads_in_fp32", False, check_heads_in_fp32),
    Check("matcher_batch_cost", False, check_matcher_batch_cost),
    Check("engine_sdpa_vs_eager", False, check_engine_sdpa_vs_eager),
    Check("engine_vs_stock_cpu_fp32", False, check_engine_vs_stock_cpu_fp32),
    Check("vcoco_official_boxes", False, check_vcoco_official_boxes),
    Check("top_k_then_nms", False, check_top_k_then_nms),
    Check("box_policy_clamp", False, check_box_policy_clamp),
    Check("student_resume_cpu_exact", False, check_student_resume_cpu_exact),
    Check("engine_dtypes_vs_cpu_fp32", True, check_engine_dtypes_vs_cpu_fp32),
    Check("engine_vs_stock_throughput_k32", True, check_engine_vs_stock_throughput_k32),
    Check("teacher_oom_recovery", True, check_teacher_oom_recovery),
    Check("matcher_one_host_sync", True, check_matcher_one_host_sync),
    Check("student_amp_20_steps_resume", True, check_student_amp_20_steps_resume),
    Check("nccl_2_ranks_equal_1_rank", True, check_nccl_2_ranks_equal_1_rank),
]


def run_checks(checks: list[Check], context: Context, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``checks`` in order; print a row per check; the summary the JSON line holds."""
    summary: dict[str, Any] = {"passed": [], "failed": [], "skipped": [], "details": {}}
    say(f"{'check':32} {'result':8} {'seconds':>8}  detail")
    for check in checks:
        started = time.perf_counter()
        if check.needs_cuda and not context.cuda:
            status, detail = "skipped", "needs CUDA"
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the checks' own warnings are not results
                    status, detail = "passed", check.run(context)
            except Skip as reason:
                status, detail = "skipped", str(reason)
            except Exception as error:  # a failed check is reported, the others still run
                status, detail = "failed", f"{type(error).__name__}: {error}".splitlines()[0][:300]
                if os.environ.get("GPU_CHECK_TRACEBACK"):
                    traceback.print_exc()
        seconds = time.perf_counter() - started
        summary[status].append(check.name)
        summary["details"][check.name] = detail
        say(f"{check.name:32} {status:8} {seconds:8.1f}  {detail}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated check names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--cpu-only", action="store_true", help="run the CPU parts only; list the CUDA ones as skipped")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument(
        "--teacher-size",
        choices=("base", "tiny"),
        default="base",
        help="BLIP of the CUDA teacher checks: BLIP-base shapes (default) or the tiny test model",
    )
    args = parser.parse_args(argv)
    if args.list:
        for check in CHECKS:
            print(f"{check.name:32} {'CUDA' if check.needs_cuda else 'CPU'}")
        return 0
    checks = CHECKS
    if args.only:
        names = [name.strip() for name in args.only.split(",")]
        unknown = sorted(set(names) - {check.name for check in CHECKS})
        if unknown:
            parser.error(f"--only: unknown check(s) {unknown}; --list shows them")
        checks = [check for check in CHECKS if check.name in names]
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu_only
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"gpu-check on {device} (torch {torch.__version__}, {torch.cuda.device_count()} CUDA devices)", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        context = Context(cuda=cuda, work=Path(work), threads=args.threads, teacher_size=args.teacher_size)
        summary = run_checks(checks, context, say=lambda line: print(line, flush=True))
    print(json.dumps({"cuda": cuda, "device": device, **summary}))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
