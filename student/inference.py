"""A model run over the test split of a config: preds.json entries and their metrics.

``evaluate_model`` is what the ``evaluate`` command, the end of a training run and the demo share:
the test dataset and loader of the config (``student.builders``), the prediction loop
(``student.engine.predict``), the gathering of the ranks' shards under DDP, and the scoring with
the evaluation package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Subset

from student.builders import build_amp, build_test_dataset, build_test_loader, correspondence_of
from student.config import TrainConfig
from student.distributed import DistributedContext, gather_entries, shard_positions
from student.engine import EvalResult, EvalSettings, fill_missing_entries, predict, score_predictions
from student.model import HOIDetector


def evaluate_model(
    model: HOIDetector,
    config: TrainConfig,
    device: torch.device,
    *,
    dataset: Any | None = None,
    progress: bool | None = False,
    context: DistributedContext | None = None,
) -> tuple[list[dict[str, Any]], EvalResult | None]:
    """Run ``model`` over the test split; returns the preds.json entries and the metrics.

    Under DDP (``context`` distributed) every rank must call it: each predicts its shard of the
    images (positions rank, rank + W, ...), rank 0 gathers the entries and scores them. The
    other ranks get ``([], None)``. ``progress``: a tqdm bar; None = when stderr is a terminal.
    """
    dataset = dataset if dataset is not None else build_test_dataset(config)
    distributed = context is not None and context.is_distributed
    is_hico = config.data.dataset == "hico"
    correspondence = correspondence_of(config) if is_hico else None
    settings = EvalSettings(
        dataset=config.data.dataset,
        correspondence=correspondence,
        top_k=config.eval.top_k,
        nms_threshold=config.eval.nms_threshold,
        nms_order=config.eval.nms_order,
        vcoco_no_object_role=config.eval.vcoco_no_object_role,
    )
    amp, _ = build_amp(config, device)
    images = Subset(dataset, shard_positions(len(dataset), context)) if distributed else dataset
    predicted = predict(
        model,
        build_test_loader(images, config, device),
        device=device,
        settings=settings,
        num_images=len(dataset.annotations),
        amp=amp,
        progress=progress,
    )
    if distributed:
        assert context is not None
        predicted = gather_entries(predicted, context)
        if not context.is_main:
            return [], None
    entries = fill_missing_entries(predicted)
    result = score_predictions(
        entries,
        dataset=config.data.dataset,
        test_annotations=config.data.path("test_annotations"),
        train_annotations=config.data.path("train_annotations") if is_hico else None,
        correspondence=correspondence,
    )
    return entries, result
