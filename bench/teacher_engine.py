"""Stock BLIP ITM forward vs the image-factored engine, side by side, on the same weights.

    python bench/teacher_engine.py --size base     # the real BLIP-base architecture, random weights
    python bench/teacher_engine.py --size tiny     # seconds, for a smoke run

For K = 1, 8, 32 sentences about one image it times the stock
``BlipForImageTextRetrieval(..., use_itm_head=True)`` on a batch of K pairs, then the engine on
the same K sentences with a cold vision cache, and prints a table. The last line is one JSON
object with ``speedup_k32`` (engine sentences/s over stock sentences/s at K=32) and
``max_abs_diff`` (largest |probability difference| over all runs).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
from teacher_server.hoi.digest import image_digest

SENTENCE_POOL = [
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


def make_model(size: str, directory: Path) -> None:
    """Tiny: the test model. Base: BLIP-base shapes (ViT-B/16 at 384 px, 12-layer BERT-base text)."""
    from teacher_server.tiny_model import make_model_of_size

    make_model_of_size(size, directory)


def sentences_for(k: int) -> list[str]:
    return [
        f"{SENTENCE_POOL[i % len(SENTENCE_POOL)]} number {i}" if i >= len(SENTENCE_POOL) else SENTENCE_POOL[i]
        for i in range(k)
    ]


def time_stock(model, processor, image: Image.Image, sentences: list[str]) -> tuple[float, np.ndarray]:
    inputs = processor(images=[image] * len(sentences), text=sentences, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
            use_itm_head=True,
        ).itm_score
    return time.perf_counter() - start, logits.float().softmax(-1)[:, 1].numpy()


def time_engine(engine: ItmEngine, data: bytes, sentences: list[str]) -> tuple[float, np.ndarray]:
    engine.vision_cache = type(engine.vision_cache)(engine.settings.vision_cache_mb)  # cold
    start = time.perf_counter()
    prepared = engine.prepare_image(data)
    (scores,) = engine.score([ImageSentences(image_digest(data), prepared, sentences)])
    return time.perf_counter() - start, np.array([s.match_prob for s in scores])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["base", "tiny"], default="tiny")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--ks", default="1,8,32", help="sentence counts to time (default 1,8,32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]

    from transformers import BlipForImageTextRetrieval, BlipProcessor

    with tempfile.TemporaryDirectory() as tmp:
        print(f"building a random {args.size} BLIP ITM model ...", flush=True)
        make_model(args.size, Path(tmp))
        stock = BlipForImageTextRetrieval.from_pretrained(tmp).eval()
        processor = BlipProcessor.from_pretrained(tmp)
        engine = ItmEngine.from_pretrained(tmp, EngineSettings(device="cpu", dtype="fp32"))

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    image = Image.open(io.BytesIO(data)).convert("RGB")

    time_engine(engine, data, sentences_for(2))  # warm-up (allocators, tokenizer)
    rows, max_diff = [], 0.0
    header = ("K", "stock s", "engine s", "stock sent/s", "engine sent/s", "speedup", "max|dp|")
    print("\n{:>3}  {:>9}  {:>9}  {:>12}  {:>13}  {:>7}  {:>8}".format(*header))
    for k in ks:
        sentences = sentences_for(k)
        stock_s, stock_p = time_stock(stock, processor, image, sentences)
        engine_s, engine_p = time_engine(engine, data, sentences)
        diff = float(np.abs(stock_p - engine_p).max())
        max_diff = max(max_diff, diff)
        speedup = stock_s / engine_s
        rows.append({"k": k, "stock_s": stock_s, "engine_s": engine_s, "speedup": speedup})
        print(
            f"{k:>3}  {stock_s:>9.3f}  {engine_s:>9.3f}  {k / stock_s:>12.2f}  {k / engine_s:>13.2f}  "
            f"{speedup:>7.2f}  {diff:>8.1e}",
            flush=True,
        )
    by_k = {row["k"]: row for row in rows}
    result = {
        "size": args.size,
        "threads": args.threads,
        "speedup_k32": round(by_k[32]["speedup"], 3) if 32 in by_k else None,
        "max_abs_diff": max_diff,
        "rows": rows,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
