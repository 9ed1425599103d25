"""The student at test sizes: tiny model overrides of ``demo.yaml``, synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# demo.yaml's model and images shrunk to a seconds-long run (the demo command takes these too).
TINY_SIZES = [
    "data.scales=[64]",
    "data.max_size=96",
    "data.test_scale=64",
    "model.backbone.base_width=8",
    "model.transformer.d_model=32",
    "model.transformer.dim_feedforward=64",
    "model.transformer.num_encoder_layers=1",
    "model.decoder.num_queries=4",
    "run.num_threads=1",
]


def tiny_overrides(root: Path, output: Path, *extra: str) -> list[str]:
    """``demo.yaml`` overrides for a seconds-long run on ``root`` writing to ``output``: the tiny
    sizes, no random crop, data loaded in the process; ``extra`` last (it wins)."""
    return [
        f"data.root={root}",
        f"run.output_dir={output}",
        *TINY_SIZES,
        "data.crop=false",
        "data.num_workers=0",
        *extra,
    ]


def write_synthetic(root: Path, train: int, test: int, *, seed: int, **options: Any) -> Path:
    """A synthetic dataset of 64 px images in ``root`` (``options``: ``write_synthetic_dataset``'s)."""
    from student.data.synthetic import write_synthetic_dataset

    options.setdefault("image_size", 64)
    write_synthetic_dataset(root, train, test, seed=seed, progress=False, **options)
    return root
