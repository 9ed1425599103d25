"""The pieces of one training step: ITM logits with the vision encoder run once per image, the
balanced loss, the token ids (built as the engine builds them) and the preprocessed images."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from teacher_server.engine import EngineSettings, decode_image
from teacher_server.errors import FinetuneError, InvalidInputError
from teacher_server.finetune.examples import FinetuneExamples
from teacher_server.hoi.region import render_region
from teacher_server.itm_tokens import ItmTextTokens
from teacher_server.precision import fp32_linear


def itm_logits(
    model: Any, pixel_values: Tensor, image_index: Tensor, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """ITM logits (P, 2) [no-match, match] of P (image, sentence) pairs, vision run once per image.

    pixel_values: (I, 3, S, S); image_index: (P,) long, the image of each pair, in 0..I-1;
    input_ids, attention_mask: (P, L). The same computation as
    ``BlipForImageTextRetrieval.forward(..., use_itm_head=True)`` on ``pixel_values[image_index]``,
    without running the vision encoder again for every sentence of an image.
    """
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (I, N, Dv)
    pair_embeds = image_embeds[image_index]  # (P, N, Dv); gradients add up per image
    image_mask = torch.ones(pair_embeds.shape[:-1], dtype=torch.long, device=pair_embeds.device)
    hidden = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=pair_embeds,
        encoder_attention_mask=image_mask,
    ).last_hidden_state  # (P, L, D)
    # The head in fp32 even under autocast: the loss and P(match) read the difference of two logits.
    return fp32_linear(model.itm_head, hidden[:, 0])


def balanced_itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over positives and mean over negatives, averaged.

    logits: (P, 2); labels: (P,) long 0/1. Averaging the two means keeps the sampled
    positive/negative ratio from biasing the calibration of P(match).
    """
    losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    parts = [losses[labels == label].mean() for label in (1, 0) if bool((labels == label).any())]
    return torch.stack(parts).mean()


class ItmTokens(ItmTextTokens):
    """ITM token ids of the training sentences (memoised: every epoch repeats them), and the
    engine's token limit checked before training starts."""

    def __init__(self, tokenizer: Any, policy: str, max_tokens: int) -> None:
        super().__init__(tokenizer, policy)
        self.max_tokens = max_tokens
        self._ids: dict[str, tuple[int, ...]] = {}

    def ids(self, sentence: str) -> tuple[int, ...]:
        if sentence not in self._ids:
            self._ids[sentence] = super().ids(sentence)
        return self._ids[sentence]

    def check(self, examples: FinetuneExamples) -> None:
        """Refuse sentences the engine would refuse (over its token limit), naming where they are from."""
        for image in examples.images:
            for sentence in (*image.positives, *image.given_negatives):
                count = len(self.ids(sentence))
                if count > self.max_tokens:
                    where = examples.sentence_origins.get(sentence, image.where)
                    raise FinetuneError(
                        f"{where}: sentence {sentence[:60]!r} is {count} tokens (with [CLS] and [SEP]), "
                        f"over the engine's limit of {self.max_tokens}"
                    )


class ImageStore:
    """Preprocessed pixels (3, S, S) of the training examples, decoded once while they fit in memory.

    A pair's example is its region rendered by ``render_region`` with the run's policy, margin and
    dim, then processed: the pixels ``ItmEngine.prepare_image(data, region=...)`` gives an engine
    with the same ``region_policy`` / ``region_margin`` / ``region_dim``.
    """

    def __init__(
        self,
        examples: FinetuneExamples,
        image_processor: Any,
        capacity_mb: float,
        region: Mapping[str, Any] | None = None,
    ) -> None:
        """``region``: ``FinetuneSettings.engine_region()`` (needed when examples have regions)."""
        self.examples = examples
        self.image_processor = image_processor
        size = image_processor.size
        side_h, side_w = size["height"] or 384, size["width"] or 384
        self.bytes_per_image = 3 * side_h * side_w * 4
        fits = len(examples.images) * self.bytes_per_image <= capacity_mb * 1024 * 1024
        self._held: dict[int, Tensor] | None = {} if fits else None
        self._limits = EngineSettings(**(region or {}))
        if examples.regions and not region:
            raise FinetuneError("the examples are pair regions: give the region policy that renders them")

    def preload(self, progress: bool) -> None:
        """Decode every image now (when they fit), so a bad file fails before the first step."""
        if self._held is None:
            return
        from tqdm import tqdm

        count = len(self.examples.images)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = tqdm(pool.map(self._decode, range(count)), total=count, desc="images", disable=not progress)
            for index, pixels in enumerate(decoded):
                self._held[index] = pixels

    def pixels(self, indices: Sequence[int]) -> Tensor:
        """(B, 3, S, S) float32 pixels of images ``indices``."""
        if self._held is not None:
            missing = [i for i in indices if i not in self._held]
            for index in missing:
                self._held[index] = self._decode(index)
            return torch.stack([self._held[i] for i in indices])
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return torch.stack(list(pool.map(self._decode, indices)))

    def _decode(self, index: int) -> Tensor:
        image = self.examples.images[index]
        try:
            data = image.path.read_bytes()
        except OSError as error:
            raise FinetuneError(f"{image.where}: cannot read image {image.path}: {error.strerror or error}") from None
        try:
            decoded = decode_image(data, **self._limits.image_limits())
            if image.region is not None:
                # As the engine: refuse a box outside the image, render the view, then process it.
                image.region.check_inside(*decoded.size, field="region")
                limits = self._limits
                decoded = render_region(
                    decoded,
                    image.region,
                    policy=limits.region_policy,
                    margin=limits.region_margin,
                    dim=limits.region_dim,
                )
        except InvalidInputError as error:
            what = error.reason if error.field == "image" else f"{error.field}: {error.reason}"
            raise FinetuneError(f"{image.where}: {image.path}: {what}") from None
        return self.image_processor(images=decoded, return_tensors="pt")["pixel_values"][0]
