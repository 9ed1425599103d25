"""Teacher evidence maps: where the ITM decision looks, as a Grad-CAM over cross-attention.

For an image (or the view of one human-object region of it) and a sentence, the text tower of
BLIP attends from every text token to every image token in each layer's cross-attention. With
``A`` the attention probabilities of the chosen text layer, shape (heads, tokens, 1 + patches),
and ``s`` the ITM match logit ``l_match`` (BLIP's own Grad-CAM demo differentiates the same
logit), the map is

    cam[t, p] = mean over heads h of  A[h, t, p] * relu(ds/dA[h, t, p])
    map[p]    = mean over the sentence's word tokens t of cam[t, p]   ([CLS]/[ENC], [SEP], padding left out)

over the image patches ``p`` (the image's own [CLS] key is dropped), laid out on the patch
grid (``image_size / patch_size`` per side) and divided by its maximum, so that it lies in
[0, 1] (all zeros when no patch has a positive gradient).

In the last text layer only the first token reaches the ITM head (nothing attends after it), so
every word token's gradient there is zero: a map of the last layer reads the first token's row
instead of the words'. The default layer is two thirds up the tower and below the last (8 of 12
in BLIP-base, as BLIP's demo; 0 of the tiny models' 2).

This runs on its own code path: the stock ``text_encoder`` forward with ``output_attentions``
(BLIP's text attention is always the eager matmul-softmax, which returns its probabilities;
transformers records them per call through a context variable, so nothing of the scoring
engine's SDPA path or its caches is touched), with autograd on, in the HTTP API's thread pool,
never in the scoring batcher. ``Explainer`` bounds it: sentences per request, image limits as
for scoring, and how many maps are computed at once (beyond that: ``OverloadedError``, 429).
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from teacher_server.engine import decode_image
from teacher_server.errors import InvalidInputError, ModelLoadError, OverloadedError
from teacher_server.hoi.region import Region, view_box
from teacher_server.itm_tokens import ItmTextTokens

if TYPE_CHECKING:
    from teacher_server.engine import ItmEngine

# BLIP's demo reads layer 8 of the 12 text layers: two thirds up the tower.
DEFAULT_LAYER_FRACTION = 2 / 3
TARGET = "match_logit"
# When busy, retry after about one map's time on a CPU (a hint, not a promise).
BUSY_RETRY_S = 1.0
# Heat colours (the "jet" ramp of Grad-CAM pictures): dark blue (no evidence) -> cyan -> yellow
# -> red -> dark red (the most evidence), as RGB at evenly spread stops of [0, 1].
_HEAT_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_HEAT_RGB = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float64
)
OVERLAY_ALPHA = 0.55
"""Weight of the heat colour in the PNG overlay (the image keeps the rest)."""
OUTSIDE_DIM = 0.6
"""Pixels the model did not see (outside a region's crop) are blended towards grey by this much."""


def resolve_layer(layer: int | None, num_layers: int, *, field: str = "layer") -> int:
    """The index (0-based) of the text layer to read: ``None`` = two thirds up the tower but
    below the last (8 of 12, BLIP's demo; 0 of 2), negative = counted from the end (-1 = the last).

    Raises ``InvalidInputError`` naming ``field`` for a layer the tower does not have.
    """
    if layer is None:
        return max(0, min(num_layers - 2, round(num_layers * DEFAULT_LAYER_FRACTION)))
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise InvalidInputError(field, f"expected a layer index (integer), got {layer!r}")
    if not -num_layers <= layer < num_layers:
        raise InvalidInputError(
            field,
            f"layer {layer} is not one of the text tower's {num_layers} layers "
            f"(0..{num_layers - 1}, or -{num_layers}..-1 from the end)",
        )
    return layer % num_layers


@dataclass(frozen=True)
class EvidenceMap:
    """The evidence map of one sentence: ``grid`` (rows, cols) float32 in [0, 1] over the patch grid."""

    sentence: str
    grid: Tensor
    match_logit: float
    """l_match - l_nomatch, as ``/v1/score`` reports it."""
    match_prob: float


@dataclass(frozen=True)
class Explanation:
    """Evidence maps of sentences against one view of an image.

    ``image`` is the decoded original (RGB); ``view_box`` the pixels of it that the model was
    shown (the whole image, or a region's crop), which the grid covers.
    """

    image: Image.Image
    view_box: tuple[int, int, int, int]
    layer: int
    maps: list[EvidenceMap]

    @property
    def rows(self) -> int:
        return int(self.maps[0].grid.shape[0])

    @property
    def cols(self) -> int:
        return int(self.maps[0].grid.shape[1])


def grad_cam(
    model: Any,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    layer: int,
    special_ids: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """Grad-CAM of the ITM match logit over one text layer's cross-attention (module docstring).

    model: transformers' ``BlipForImageTextRetrieval``; pixel_values: (1, 3, S, S), one image
    view; input_ids, attention_mask: (B, L), B sentences (ITM start token in place), padded.
    Returns the maps (B, rows, cols) float32, not normalised, and the ITM logits (B, 2) float32.
    """
    vision = model.config.vision_config
    rows = cols = vision.image_size // vision.patch_size
    batch = input_ids.shape[0]
    with torch.no_grad():  # nothing below the chosen layer needs a gradient
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (1, 1+N, Dv)
    with torch.enable_grad():
        # The one input that requires a gradient: it makes autograd record the text layers that
        # attend to it; the gradient asked for stops at the attention probabilities.
        embeds = image_embeds.detach().requires_grad_(True)
        encoder_states = embeds.expand(batch, -1, -1)
        output = model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_states,
            encoder_attention_mask=torch.ones(encoder_states.shape[:2], dtype=torch.long, device=embeds.device),
            output_attentions=True,
            return_dict=True,
        )
        logits = model.itm_head(output.last_hidden_state[:, 0]).float()  # (B, 2): [no-match, match]
        if not output.cross_attentions:
            raise ModelLoadError("the text encoder returned no cross-attention maps: not a BLIP ITM model?")
        attention = output.cross_attentions[layer]  # (B, H, L, 1+N)
        # Row b's logit depends only on row b: one backward of the sum gives every row's gradient.
        (gradient,) = torch.autograd.grad(logits[:, 1].sum(), attention)
    cam = (attention.detach().float() * gradient.float().clamp(min=0)).mean(dim=1)[..., 1:]  # (B, L, N)
    if layer % len(output.cross_attentions) == len(output.cross_attentions) - 1:
        words = torch.zeros_like(attention_mask, dtype=torch.bool)
        words[:, 0] = True  # the last layer: only the first token feeds the ITM head
    else:
        special = torch.tensor(list(special_ids), device=input_ids.device)
        words = attention_mask.bool() & ~torch.isin(input_ids, special)  # (B, L)
    weights = words.float() / words.sum(dim=1, keepdim=True).clamp(min=1)
    maps = torch.einsum("bl,bln->bn", weights, cam)
    if maps.shape[1] != rows * cols:
        raise ModelLoadError(f"{maps.shape[1]} image patches do not fill a {rows}x{cols} patch grid")
    return maps.view(batch, rows, cols).cpu(), logits.detach().cpu()


def normalise(grid: Tensor) -> Tensor:
    """``grid`` divided by its maximum: [0, 1]; all zeros when nothing is positive."""
    top = float(grid.max())
    return grid / top if top > 0 and math.isfinite(top) else torch.zeros_like(grid)


class Explainer:
    """Evidence maps on an engine's model, off the scoring path, with their own limits.

    ``max_sentences`` per request; images as the engine's scoring limits; at most ``concurrency``
    requests at once (``explain`` raises ``OverloadedError`` rather than queue). Thread-safe.
    """

    def __init__(
        self, engine: ItmEngine, *, layer: int | None = None, max_sentences: int = 8, concurrency: int = 1
    ) -> None:
        self.engine = engine
        self.num_layers = len(engine.model.text_encoder.encoder.layer)
        try:
            self.layer = resolve_layer(layer, self.num_layers, field="explain_layer")
        except InvalidInputError as error:
            raise ModelLoadError(str(error)) from None
        self.max_sentences = max_sentences
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._tokens = ItmTextTokens(engine.tokenizer, engine.settings.itm_start_token)
        start = self._tokens.start_id
        self._special_ids = sorted({*engine.tokenizer.all_special_ids, *([start] if start is not None else [])})

    def describe(self) -> dict[str, int]:
        """The default layer, the tower's layer count and the limits (for ``GET /v1/model``)."""
        return {
            "layer": self.layer,
            "layers": self.num_layers,
            "max_sentences": self.max_sentences,
            "concurrency": self.concurrency,
        }

    def check_sentences(self, sentences: Sequence[str], *, field: str = "sentences") -> None:
        """Count (1 to ``max_sentences``) and each sentence as the engine checks them for scoring."""
        if isinstance(sentences, str | bytes):
            raise InvalidInputError(field, "expected a list of sentences, got one string")
        if not sentences:
            raise InvalidInputError(field, f"no sentences; give 1 to {self.max_sentences}")
        if len(sentences) > self.max_sentences:
            raise InvalidInputError(
                field,
                f"{len(sentences)} sentences, over the limit of {self.max_sentences} per evidence-map request "
                "(explain_max_sentences)",
                too_large=True,
            )
        self.engine.check_sentences(sentences, field=field)

    def explain(
        self,
        data: bytes,
        sentences: Sequence[str],
        *,
        region: Region | None = None,
        layer: int | None = None,
        image_field: str = "image",
        region_field: str = "region",
        layer_field: str = "layer",
    ) -> Explanation:
        """Evidence maps of ``sentences`` against the image file ``data`` (or its ``region``).

        Raises ``InvalidInputError`` naming the field, ``OverloadedError`` when ``concurrency``
        maps are already being computed.
        """
        self.check_sentences(sentences)
        index = self.layer if layer is None else resolve_layer(layer, self.num_layers, field=layer_field)
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(
                f"{self.concurrency} evidence map request(s) already running, the limit (explain_concurrency)",
                retry_after_s=BUSY_RETRY_S,
            )
        try:
            engine = self.engine
            s = engine.settings
            image = decode_image(bytes(data), **s.image_limits(), field=image_field)
            if region is not None:
                region.check_inside(*image.size, field=region_field)
            pixels = engine.preprocess(engine.render(image, region)).to(engine.device, engine.dtype)
            input_ids, attention_mask = self._tokens.batch(sentences)
            maps, logits = grad_cam(
                engine.model,
                pixels,
                input_ids.to(engine.device),
                attention_mask.to(engine.device),
                layer=index,
                special_ids=self._special_ids,
            )
        finally:
            self._slots.release()
        margins = (logits[:, 1] - logits[:, 0]).tolist()
        probs = logits.softmax(dim=-1)[:, 1].tolist()
        box = view_box(region, *image.size, policy=s.region_policy, margin=s.region_margin)
        return Explanation(
            image=image,
            view_box=box,
            layer=index,
            maps=[
                EvidenceMap(sentence, normalise(grid), margin, prob)
                for sentence, grid, margin, prob in zip(sentences, maps, margins, probs, strict=True)
            ],
        )


# ------------------------------------------------------------------------------------- pictures
def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape -> RGB uint8 of shape (*values.shape, 3) on the heat ramp."""
    clipped = np.clip(values, 0.0, 1.0)
    channels = [np.interp(clipped, _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay(image: Image.Image, grid: Tensor, box: tuple[int, int, int, int]) -> Image.Image:
    """The map drawn over the original ``image`` (RGB, its own size): the grid stretched
    (bilinear) over ``box``, the pixels the model saw, its heat colour blended in with weight
    ``OVERLAY_ALPHA``; pixels outside ``box`` are dimmed (the model did not see them)."""
    x1, y1, x2, y2 = box
    picture = image.convert("RGB")
    if (x1, y1, x2, y2) != (0, 0, *picture.size):
        picture = Image.blend(picture, Image.new("RGB", picture.size, (128, 128, 128)), OUTSIDE_DIM)
    values = Image.fromarray(grid.numpy().astype(np.float32), mode="F").resize(
        (x2 - x1, y2 - y1), Image.Resampling.BILINEAR
    )
    heat = Image.fromarray(heat_colours(np.asarray(values)), mode="RGB")
    seen = image.convert("RGB").crop(box)
    picture.paste(Image.blend(seen, heat, OVERLAY_ALPHA), (x1, y1))
    return picture


def png_bytes(picture: Image.Image) -> bytes:
    """``picture`` encoded as PNG."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
