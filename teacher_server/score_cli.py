"""``python -m teacher_server score``: ad-hoc scoring of sentences against one image."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from teacher_server.errors import TeacherError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from teacher_server.engine import DEFAULT_MODEL

    parser.add_argument("sentences", nargs="+", metavar="SENTENCE", help="sentences to score against the image")
    parser.add_argument("--image", type=Path, required=True, help="image file (JPEG, PNG, ...)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"hub id or local save_pretrained directory (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument(
        "--itm-start-token",
        default="cls",
        choices=["cls", "enc"],
        help="token that starts the ITM text: cls (transformers) or enc (original BLIP)",
    )
    parser.add_argument(
        "--region",
        type=float,
        nargs=8,
        metavar=("HX1", "HY1", "HX2", "HY2", "OX1", "OY1", "OX2", "OY2"),
        help="score on one human-object pair: the human box, then the object box, in pixels of the image",
    )
    parser.add_argument(
        "--region-policy",
        default="crop",
        choices=["crop", "mask"],
        help="how --region is shown to the model: crop (the union box) or mask (the rest dimmed)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list, in the order given")


def format_table(sentences: Sequence[str], probs: Sequence[float], logits: Sequence[float]) -> str:
    """A ranked plain-text table, best match first."""
    order = sorted(range(len(sentences)), key=lambda i: probs[i], reverse=True)
    width = max(8, *(len(s) for s in sentences))
    lines = [f"{'rank':>4}  {'match_prob':>10}  {'match_logit':>11}  {'sentence':<{width}}"]
    lines.append("-" * len(lines[0]))
    for rank, index in enumerate(order, start=1):
        lines.append(f"{rank:>4}  {probs[index]:>10.4f}  {logits[index]:>+11.4f}  {sentences[index]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
    from teacher_server.hoi.region import Region

    try:
        data = args.image.read_bytes()
    except OSError as error:
        print(f"error: cannot read --image {args.image}: {error.strerror or error}", file=sys.stderr)
        return 2
    try:
        region = None if args.region is None else Region.from_values(args.region, field="--region")
        engine = ItmEngine.from_pretrained(
            args.model,
            EngineSettings(
                device=args.device,
                dtype=args.dtype,
                itm_start_token=args.itm_start_token,
                region_policy=args.region_policy,
            ),
        )
        engine.check_sentences(args.sentences, field="SENTENCE")
        image = engine.prepare_image(data, field=f"--image {args.image}", region=region, region_field="--region")
        (scores,) = engine.score([ImageSentences(image.digest, image, args.sentences, region)])
    except TeacherError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                [
                    {"sentence": s, "match_prob": r.match_prob, "match_logit": r.match_logit}
                    for s, r in zip(args.sentences, scores, strict=True)
                ]
            )
        )
    else:
        print(
            f"model {engine.model_id} (fingerprint {engine.fingerprint}, {engine.device}, "
            f"{engine.describe()['dtype']}) · image {args.image}"
            + ("" if region is None else f" · pair {region.canonical()} ({engine.settings.region_description()})")
        )
        print(format_table(args.sentences, [r.match_prob for r in scores], [r.match_logit for r in scores]))
    return 0
