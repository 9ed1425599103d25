"""The training run: ``finetune`` loads the base model, trains image-factored, checkpoints, resumes
exactly and saves a model the engine loads (``serve --model OUT``).

Training is image-factored like the engine: the vision encoder runs once per image of a batch and
its tokens are indexed for every sentence of that image. A run resumed from
``OUT/finetune_checkpoint.pt`` ends with the same weights, bit for bit, as a run that never stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from teacher_server.engine import EngineSettings, ItmEngine, load_blip_itm, resolve_device
from teacher_server.errors import FinetuneError, TeacherError
from teacher_server.finetune.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    EpochLog,
    Position,
    load_checkpoint,
    write_atomically,
)
from teacher_server.finetune.examples import FinetuneExamples, TrainingPair, epoch_order, sample_pairs
from teacher_server.finetune.objective import ImageStore, ItmTokens, balanced_itm_loss, itm_logits
from teacher_server.finetune.settings import FinetuneSettings
from teacher_server.logs import show_progress
from teacher_server.precision import PrecisionError, choose_dtype, device_capability
from teacher_server.rng_state import capture_rng_state, restore_rng_state

SUMMARY_NAME = "finetune.json"


@dataclass
class FinetuneResult:
    """What a fine-tuning call did. ``fingerprint`` is None while the run is not complete."""

    out: Path
    fingerprint: str | None
    steps: int
    epoch_losses: list[float]
    seconds: float
    complete: bool = True
    total_steps: int = 0


@dataclass
class _Run:
    """Everything one training run holds while it runs."""

    model: Any  # transformers' BlipForImageTextRetrieval
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokens: ItmTokens
    images: ImageStore
    base_model: str
    base_weights: str
    steps_per_epoch: int
    position: Position = field(default_factory=Position)
    epochs: list[EpochLog] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * len(self.epochs)


def finetune(
    model: str | Path,
    out: str | Path,
    examples: FinetuneExamples,
    settings: FinetuneSettings,
    *,
    resume: bool = False,
    progress: bool | None = None,
    say: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune the BLIP ITM model ``model`` (hub id or directory) on ``examples`` into ``out``.

    ``out`` receives ``save_pretrained`` of the model and the base's processor (loadable by
    ``ItmEngine.from_pretrained`` and ``serve --model``), ``finetune.json``, and while the run
    is unfinished ``finetune_checkpoint.pt``. ``resume``: continue the run held in ``out`` (or
    start when it holds none). ``progress``: tqdm bars; None = when stderr is a terminal.

    Raises:
        FinetuneError: bad settings or data, an ``out`` holding something else, a checkpoint of a
            different run. ModelLoadError (a TeacherError): the base model cannot be loaded.
    """
    started = time.perf_counter()
    out = Path(out)
    show = show_progress(progress)
    if examples.prompt_variant is not None and examples.prompt_variant != settings.prompt_variant:
        raise FinetuneError(
            f"prompt_variant = {settings.prompt_variant!r} but the examples were built with {examples.prompt_variant!r}"
        )
    if examples.regions != (settings.region != "image"):
        raise FinetuneError(
            f"region = {settings.region!r} but the examples are "
            f"{'pair regions' if examples.regions else 'whole images'}: build them with regions="
            f"{settings.region != 'image'} (examples_from_annotations)"
        )
    checkpoint = _claim_output(out, resume=resume)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if checkpoint is None and resume and (out / SUMMARY_NAME).is_file():
        return _finished_run(out, examples, settings, started, say)
    run = _start_run(model, examples, settings)
    if checkpoint is None:
        _seed_everything(settings.seed)
        say(
            f"fine-tuning {run.base_model} on {len(examples.images)} images of {examples.source} "
            f"({examples.skipped_images} skipped): {run.total_steps} steps on {run.device}"
        )
    else:
        _restore(run, checkpoint, examples, settings)
        say(f"resuming {out / CHECKPOINT_NAME} at step {run.position.step} of {run.total_steps}")
    run.images.preload(show)
    complete = _train(run, examples, settings, out, show, say)
    if not complete:
        _write_summary(out, run, examples, settings, complete=False, fingerprint=None)
        say(f"stopped at step {run.position.step} of {run.total_steps} (max_steps); resume to continue")
        return _result(out, None, run, started, complete=False)
    fingerprint = _save_output(out, run, examples, settings)
    served = f"--itm-start-token {settings.itm_start_token}"
    if settings.region != "image":
        margin_or_dim = "margin" if settings.region == "crop" else "dim"
        value = settings.region_margin if settings.region == "crop" else settings.region_dim
        served += f" --region-policy {settings.region} --region-{margin_or_dim} {value:g}"
    say(f"wrote {out} (fingerprint {fingerprint}; serve it with {served})")
    return _result(out, fingerprint, run, started, complete=True)


def _result(out: Path, fingerprint: str | None, run: _Run, started: float, *, complete: bool) -> FinetuneResult:
    losses = [log.mean_loss for log in run.epochs[: run.position.epoch]]
    return FinetuneResult(
        out, fingerprint, run.position.step, losses, time.perf_counter() - started, complete, run.total_steps
    )


def _claim_output(out: Path, *, resume: bool) -> dict[str, Any] | None:
    """Check that ``out`` may receive this run; returns the checkpoint to resume from, if any."""
    checkpoint_path = out / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file, expected a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return None
    is_run = checkpoint_path.is_file() or (out / SUMMARY_NAME).is_file()
    if not is_run:
        raise FinetuneError(
            f"--out {out} is not empty and holds no fine-tuning run ({', '.join(held[:4])}"
            f"{', ...' if len(held) > 4 else ''}): choose a new or empty directory"
        )
    if not resume:
        raise FinetuneError(
            f"--out {out} already holds a fine-tuning run ({SUMMARY_NAME} / {CHECKPOINT_NAME}): pass --resume to "
            "continue it, or choose another --out"
        )
    return load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast_dtype(settings: FinetuneSettings, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32)."""
    if device.type != "cuda":
        if settings.precision in ("bf16", "fp16"):
            raise FinetuneError(f"precision = {settings.precision!r} needs a CUDA device; this run is on {device}")
        return None
    try:
        # bf16 only where this device has bf16 tensor cores (compute capability >= 8.0).
        return choose_dtype(settings.precision, device_capability(device), name="precision")
    except PrecisionError as error:
        raise FinetuneError(str(error)) from None


def _start_run(model: str | Path, examples: FinetuneExamples, settings: FinetuneSettings) -> _Run:
    """Load the base model and build the optimiser, schedule and data plumbing."""
    try:
        device = resolve_device(settings.device)
    except TeacherError as error:
        raise FinetuneError(f"device: {error}") from None
    autocast_dtype = _autocast_dtype(settings, device)
    loaded = load_blip_itm(model, revision=None, dtype=torch.float32)
    network = loaded.model.to(device).train()
    network.requires_grad_(True)
    tokens = ItmTokens(loaded.processor.tokenizer, settings.itm_start_token, EngineSettings().max_sentence_tokens)
    tokens.check(examples)
    steps_per_epoch = math.ceil(len(examples.images) / settings.batch_images)
    optimizer = torch.optim.AdamW(_parameter_groups(network, settings.weight_decay), lr=settings.lr)
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, total))
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    return _Run(
        model=network,
        processor=loaded.processor,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        device=device,
        autocast_dtype=autocast_dtype,
        tokens=tokens,
        images=ImageStore(
            examples, loaded.processor.image_processor, settings.image_cache_mb, settings.engine_region()
        ),
        base_model=loaded.model_id,
        base_weights=loaded.weights_identity,
        steps_per_epoch=steps_per_epoch,
        epochs=[EpochLog() for _ in range(settings.epochs)],
    )


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings (decay would shrink them to 0)."""
    decay: list[torch.nn.Parameter] = []
    keep: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "embedding" in name or "norm" in name.lower()
        (keep if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _schedule(settings: FinetuneSettings, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up, then cosine to 0 at ``total_steps`` (or constant)."""
    warmup = settings.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if settings.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _restore(run: _Run, checkpoint: Mapping[str, Any], examples: FinetuneExamples, settings: FinetuneSettings) -> None:
    """Load a checkpoint into ``run`` after checking that it is this run (settings, data, base model)."""
    problems = settings.differences(checkpoint["settings"])
    if checkpoint["data_digest"] != examples.digest():
        held = checkpoint["data"].get("images")
        problems.append(
            f"training data: {len(examples.images)} images from {examples.source} here vs {held} images from "
            f"{checkpoint['data'].get('source')} in the checkpoint (different annotations, JSONL, correspondence "
            "or prompt variant)"
        )
    if checkpoint["base_weights"] != run.base_weights:
        problems.append(f"base model: {run.base_model} here vs {checkpoint['base_model']} in the checkpoint")
    if problems:
        raise FinetuneError("cannot resume: the run in --out differs:\n  " + "\n  ".join(problems))
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    if run.scaler is not None and checkpoint.get("scaler") is not None:
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.position = Position(**checkpoint["position"])
    run.epochs = [EpochLog(**log) for log in checkpoint["epochs"]]
    try:
        restore_rng_state(checkpoint["rng"])
    except ValueError as error:
        raise FinetuneError(f"cannot resume: {error}") from None


def _save_checkpoint(out: Path, run: _Run, examples: FinetuneExamples, settings: FinetuneSettings) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": {name: tensor.detach().cpu() for name, tensor in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "position": asdict(run.position),
        "epochs": [asdict(log) for log in run.epochs],
        "rng": capture_rng_state(),
        "settings": settings.to_dict(),
        "data_digest": examples.digest(),
        "data": examples.summary(),
        "base_model": run.base_model,
        "base_weights": run.base_weights,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / CHECKPOINT_NAME, lambda handle: torch.save(payload, handle))


def _batches(num_images: int, settings: FinetuneSettings, epoch: int, skip: int) -> Iterator[list[int]]:
    """Image-index batches of an epoch, from batch ``skip`` on."""
    order = epoch_order(num_images, settings.seed, epoch)
    size = settings.batch_images
    for start in range(skip * size, num_images, size):
        yield order[start : start + size]


def _train(
    run: _Run, examples: FinetuneExamples, settings: FinetuneSettings, out: Path, show: bool, say: Callable[[str], None]
) -> bool:
    """Run the remaining steps; True when every epoch is done, False when stopped by ``max_steps``."""
    from tqdm import tqdm

    while run.position.epoch < settings.epochs:
        epoch, log = run.position.epoch, run.epochs[run.position.epoch]
        bar = tqdm(
            total=run.steps_per_epoch,
            initial=run.position.batches_done,
            desc=f"epoch {epoch + 1}/{settings.epochs}",
            unit="step",
            disable=not show,
        )
        with bar:
            for batch in _batches(len(examples.images), settings, epoch, run.position.batches_done):
                if settings.max_steps is not None and run.position.step >= settings.max_steps:
                    _save_checkpoint(out, run, examples, settings)
                    return False
                tick = time.perf_counter()
                loss, pairs = _step(run, examples, batch, epoch, settings)
                log.loss_sum += loss
                log.steps += 1
                log.pairs += len(pairs)
                log.positives += sum(pair.label for pair in pairs)
                log.seconds += time.perf_counter() - tick
                run.position.batches_done += 1
                run.position.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if settings.checkpoint_every and run.position.step % settings.checkpoint_every == 0:
                    _save_checkpoint(out, run, examples, settings)
        run.position = Position(epoch + 1, 0, run.position.step)
        say(log.line(epoch, settings.epochs))
        _save_checkpoint(out, run, examples, settings)
    return True


def _step(
    run: _Run, examples: FinetuneExamples, batch: Sequence[int], epoch: int, settings: FinetuneSettings
) -> tuple[float, list[TrainingPair]]:
    """One optimiser step on the images ``batch``; returns (loss, the pairs it trained on)."""
    pairs = sample_pairs(examples, batch, epoch=epoch, settings=settings)
    pixels = run.images.pixels(batch).to(run.device, non_blocking=True)
    input_ids, mask = run.tokens.batch([pair.sentence for pair in pairs])
    image_index = torch.tensor([pair.image for pair in pairs], dtype=torch.long, device=run.device)
    labels = torch.tensor([pair.label for pair in pairs], dtype=torch.long, device=run.device)
    autocast = (
        torch.autocast(device_type=run.device.type, dtype=run.autocast_dtype)
        if run.autocast_dtype is not None
        else nullcontext()
    )
    with autocast:
        logits = itm_logits(run.model, pixels, image_index, input_ids.to(run.device), mask.to(run.device))
    loss = balanced_itm_loss(logits, labels)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if settings.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    return float(loss.detach()), pairs


# ========================================================================================= output
def _write_summary(
    out: Path,
    run: _Run,
    examples: FinetuneExamples,
    settings: FinetuneSettings,
    *,
    complete: bool,
    fingerprint: str | None,
) -> None:
    summary = {
        "base_model": run.base_model,
        "base_weights": run.base_weights,
        "complete": complete,
        "fingerprint": fingerprint,
        "itm_start_token": settings.itm_start_token,
        "steps": run.position.step,
        "total_steps": run.total_steps,
        "settings": settings.to_dict(),
        "data": examples.summary(),
        "data_digest": examples.digest(),
        "epochs": [
            {"epoch": index + 1, "loss": log.mean_loss, **asdict(log)}
            for index, log in enumerate(run.epochs[: run.position.epoch])
        ],
    }
    text = json.dumps(summary, indent=2) + "\n"
    write_atomically(out / SUMMARY_NAME, lambda handle: handle.write(text.encode()))


def _save_output(out: Path, run: _Run, examples: FinetuneExamples, settings: FinetuneSettings) -> str:
    """Save model + processor, then drop the checkpoint; returns the engine fingerprint of ``out``."""
    run.model.eval().to("cpu").save_pretrained(out)
    run.processor.save_pretrained(out)
    _write_summary(out, run, examples, settings, complete=True, fingerprint=None)
    # The engine hashes every *.pt beside the weights: the checkpoint must go before it looks.
    (out / CHECKPOINT_NAME).unlink(missing_ok=True)
    run.optimizer.state.clear()  # free memory before the engine loads its copy
    fingerprint = output_fingerprint(out, settings)
    _write_summary(out, run, examples, settings, complete=True, fingerprint=fingerprint)
    return fingerprint


def output_fingerprint(out: str | Path, settings: FinetuneSettings) -> str:
    """The fingerprint ``serve --model OUT`` computes on this device, with the run's start token
    (and, for a run on regions, its region policy: ``serve --region-policy ...``)."""
    engine = ItmEngine.from_pretrained(
        out,
        EngineSettings(device=settings.device, itm_start_token=settings.itm_start_token, **settings.engine_region()),
    )
    return engine.fingerprint


def _finished_run(
    out: Path, examples: FinetuneExamples, settings: FinetuneSettings, started: float, say: Callable[[str], None]
) -> FinetuneResult:
    """``resume`` on a run that already completed: nothing to train if it is the same run."""
    summary = json.loads((out / SUMMARY_NAME).read_text())
    problems = settings.differences(summary.get("settings", {}), where=SUMMARY_NAME)
    if summary.get("data_digest") != examples.digest():
        problems.append("training data: differs from the finished run's")
    if problems:
        raise FinetuneError("cannot resume: the finished run in --out differs:\n  " + "\n  ".join(problems))
    if not summary.get("complete"):
        raise FinetuneError(f"--out {out}: {SUMMARY_NAME} says the run is unfinished but {CHECKPOINT_NAME} is missing")
    fingerprint = output_fingerprint(out, settings)
    say(f"{out} already holds this run, complete (fingerprint {fingerprint})")
    losses = [epoch["loss"] for epoch in summary["epochs"]]
    return FinetuneResult(
        out, fingerprint, summary["steps"], losses, time.perf_counter() - started, True, summary["total_steps"]
    )
