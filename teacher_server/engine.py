"""BLIP image-text matching, image-factored.

The stock ``BlipForImageTextRetrieval.forward(..., use_itm_head=True)`` runs the vision encoder
for every (image, sentence) pair and projects the image tokens into cross-attention keys and
values again for every sentence. HOI distillation scores many sentences per image, so this
engine splits the work by what it depends on:

- per distinct image *view* (the whole image, or one human-object region of it rendered by the
  region policy, ``teacher_server.hoi.region``): decode, preprocess, run the vision encoder (kept
  in an LRU by view id), and project the image tokens to the cross-attention keys/values of
  every text layer;
- per distinct sentence: tokenize (memoised);
- per (image, sentence): the text layers with those precomputed keys/values, length-bucketed
  into micro-batches; the last layer only for the first token, the only one the ITM head reads.

Results equal the stock forward on the same weights (tests hold it to 1e-4 in fp32).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor

from teacher_server.errors import ImageRequiredError, InvalidInputError, ModelLoadError
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.region import REGION_POLICIES, Region, render_region, view_box, view_id
from teacher_server.precision import (
    DTYPE_NAMES,
    Capability,
    PrecisionError,
    choose_dtype,
    device_capability,
    fp32_linear,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Salesforce/blip-itm-base-coco"
ItmStartToken = Literal["cls", "enc"]
_DTYPES = DTYPE_NAMES

# A truncated file must be an error, not a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


# Image limits beyond the pixel count (see EngineSettings.max_image_side / max_image_aspect).
DEFAULT_MAX_IMAGE_SIDE = 16_384
DEFAULT_MAX_IMAGE_ASPECT = 20.0
# Decoding at reduced size follows Pillow's own ``thumbnail`` convention: a JPEG is drafted (its
# DCT scaled by 1/2, 1/4 or 1/8) to no less than DRAFT_GAP times the size the processor resizes
# to, so that the final resize still averages about two source pixels per output pixel; the
# tests hold the result to the full decode's within 0.25 at the worst value and 0.01 on average
# (normalised units; a grey level is about 0.015).
DRAFT_GAP = 2.0
# A view at least 2 x REDUCING_GAP times the processor's size is resized here with Pillow's
# ``reducing_gap`` (an integer box reduction first; Pillow documents 3.0 as indistinguishable
# from fair resampling). Below that Pillow would not reduce at all, so the view is handed to the
# processor untouched and its pixels stay exactly those of the stock processor.
REDUCING_GAP = 3.0
# The formats a photo arrives in. Pillow opens some forty more (EPS through Ghostscript, FITS,
# DDS, PSD, ...): each another parser for hostile bytes to reach, none of them a photo format.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# EXIF orientations 5 to 8 turn the picture by 90 degrees: its shown width is the stored height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Per orientation, whether the shown x and y axes run against the stored ones (Pillow's
# exif_transpose: 2 mirrors x, 3 turns 180 degrees, 6 turns 90 degrees clockwise, ...).
_FLIPPED_AXES = {
    2: (True, False),
    3: (True, True),
    4: (False, True),
    6: (True, False),
    7: (True, True),
    8: (False, True),
}


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs and what it accepts. Every limit is named in the error it causes."""

    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``..."""
    dtype: str = "auto"
    """``fp32``, ``bf16``, ``fp16``; ``auto`` = fp32 on CPU, bf16 (else fp16) on CUDA."""
    itm_start_token: ItmStartToken = "cls"
    """Token that starts the ITM text: ``cls`` as transformers does, ``enc`` as original BLIP."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when loading a hub id."""
    vision_cache_mb: float = 512.0
    """Capacity of the LRU of vision embeddings (0 disables it)."""
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    """Longest accepted image side (pixels), checked from the header before decoding."""
    max_image_aspect: float = DEFAULT_MAX_IMAGE_ASPECT
    """Largest accepted ratio of the longer side to the shorter, checked from the header."""
    max_sentence_tokens: int = 64
    """Counted with the special tokens ([CLS] ... [SEP])."""
    text_batch_size: int = 128
    """Sentences per text micro-batch."""
    vision_batch_size: int = 16
    """Images per vision-encoder batch."""
    kv_chunk_images: int = 8
    """Images whose cross-attention keys/values are held at once (bounds memory)."""
    region_policy: str = "crop"
    """How an item's human-object region is shown to BLIP: ``crop`` (the union box) or ``mask``."""
    region_margin: float = 0.1
    """``crop``: the union box grows by this fraction of its width and height on each side."""
    region_dim: float = 0.8
    """``mask``: pixels outside both boxes are blended towards grey by this much (0..1)."""

    def image_limits(self) -> dict[str, Any]:
        """The keyword arguments of ``open_image`` / ``decode_image`` that bound one image: every
        caller that decodes for this engine uses the same limits (bytes, pixels, side, aspect)."""
        return {
            "max_bytes": self.max_image_bytes,
            "max_pixels": self.max_image_pixels,
            "max_side": self.max_image_side,
            "max_aspect": self.max_image_aspect,
        }

    def region_description(self) -> str:
        """The region policy and its parameter, as the fingerprint and ``GetModelInfo`` name it."""
        if self.region_policy == "crop":
            return f"crop:margin={self.region_margin:g}"
        return f"mask:dim={self.region_dim:g}"


@dataclass(frozen=True)
class ItmScore:
    """One (image, sentence) result: ``match_logit`` = l_match - l_nomatch, ``match_prob`` = softmax."""

    match_logit: float
    match_prob: float


@dataclass(frozen=True)
class PreparedImage:
    """A decoded, validated, preprocessed view of an image, ready for the vision encoder.

    ``region=None``: the whole image; else the pair as the engine's region policy renders it.
    """

    digest: str
    pixel_values: Tensor  # (1, 3, S, S) float32, on CPU
    region: Region | None = None

    @property
    def view(self) -> str:
        return view_id(self.digest, self.region)


@dataclass(frozen=True)
class ImageSentences:
    """Sentences to score against one image view; ``image=None`` = use the embedding held by view.

    ``region``: score on this human-object pair of the image (``image``, when given, must be the
    view prepared for it); None = the whole image.
    """

    digest: str
    image: PreparedImage | None
    sentences: Sequence[str]
    region: Region | None = None

    @property
    def view(self) -> str:
        return view_id(self.digest, self.region)


@dataclass
class EngineStats:
    """Monotonic counters (read them for metrics; never reset)."""

    images_encoded: int = 0
    vision_cache_hits: int = 0
    sentences_scored: int = 0
    """Distinct (image, sentence) pairs run through the text tower."""
    pairs_scored: int = 0
    """Pairs asked for, duplicates included."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when present, else CPU; anything else as torch reads it.

    A CUDA device always gets its index (``cuda`` -> ``cuda:0`` in a process that never changed
    its current device), so ``cuda`` and ``cuda:0`` are one device, not two.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device, *, capability: Capability | None = None) -> torch.dtype:
    """``auto`` -> fp32 off CUDA; on CUDA bf16 where ``device`` has compute capability >= 8.0, else fp16.

    ``capability``: the device's (major, minor); default: read from ``device`` itself.
    """
    if capability is None:
        capability = device_capability(device)
    try:
        dtype = choose_dtype(name, capability, name="dtype")
    except PrecisionError as error:
        raise ModelLoadError(str(error)) from None
    return torch.float32 if dtype is None else dtype


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


class VisionCache:
    """LRU of vision embeddings by view id (``view_id``: digest, or digest and region), bounded in
    megabytes. Thread-safe."""

    def __init__(self, capacity_mb: float) -> None:
        self.capacity_bytes = int(capacity_mb * 1024 * 1024)
        self._entries: OrderedDict[str, Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> Tensor | None:
        with self._lock:
            embedding = self._entries.get(digest)
            if embedding is not None:
                self._entries.move_to_end(digest)
            return embedding

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def put(self, digest: str, embedding: Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if size > self.capacity_bytes:
            return
        with self._lock:
            if digest in self._entries:
                self._bytes -= self._nbytes(self._entries.pop(digest))
            self._entries[digest] = embedding
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self._nbytes(evicted)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _nbytes(tensor: Tensor) -> int:
        return tensor.numel() * tensor.element_size()


def check_image_size(
    width: int,
    height: int,
    *,
    max_pixels: int,
    max_side: int = DEFAULT_MAX_IMAGE_SIDE,
    max_aspect: float = DEFAULT_MAX_IMAGE_ASPECT,
    field: str = "image",
) -> None:
    """Refuse a ``width`` x ``height`` image over a size limit, naming ``field`` and the setting.

    Each limit bounds a different cost: the pixel count what a decode allocates, the longer side
    and the aspect ratio the pictures that pass the pixel count only by being thin (a 39,000,000 x
    1 PNG has fewer pixels than a 12 Mpx photo and cost seconds of resizing).
    """
    longer, shorter = max(width, height), min(width, height)
    if shorter < 1:
        raise InvalidInputError(field, f"is {width} x {height} pixels: an image needs at least one pixel each way")
    if longer > max_side:
        raise InvalidInputError(
            field,
            f"is {width} x {height} pixels; the longer side must be at most {max_side:,} pixels (max_image_side)",
            too_large=True,
        )
    if longer > max_aspect * shorter:
        raise InvalidInputError(
            field,
            f"is {width} x {height} pixels, an aspect ratio of {longer / shorter:,.1f}:1; at most "
            f"{max_aspect:g}:1 is accepted (max_image_aspect)",
            too_large=True,
        )
    if width * height > max_pixels:
        raise InvalidInputError(
            field,
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} pixels "
            "(max_image_pixels)",
            too_large=True,
        )


def open_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    max_side: int = DEFAULT_MAX_IMAGE_SIDE,
    max_aspect: float = DEFAULT_MAX_IMAGE_ASPECT,
    field: str = "image",
) -> Image.Image:
    """Open image file bytes and check every limit from the file's header alone: nothing is decoded.

    Raises ``InvalidInputError`` naming ``field`` and the limit (``check_image_size``).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInputError(field, f"expected encoded image file bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidInputError(field, "image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidInputError(
            field, f"image is {len(data):,} bytes, over the limit of {max_bytes:,} bytes", too_large=True
        )
    try:
        image = Image.open(io.BytesIO(data), formats=_open_formats())
    except Image.DecompressionBombError as error:
        # Pillow's own guard (twice Image.MAX_IMAGE_PIXELS) fired on the header; say it in our terms.
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        ceiling = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else max_pixels
        raise InvalidInputError(
            field, f"image claims {size}, over the limit of {min(max_pixels, ceiling):,} pixels", too_large=True
        ) from None
    except UnidentifiedImageError:
        raise InvalidInputError(
            field, f"not a decodable image file ({len(data):,} bytes; accepted: {', '.join(_open_formats())})"
        ) from None
    except MemoryError:
        raise
    except Exception as error:  # a hostile header can raise anything Pillow's parsers raise
        raise InvalidInputError(field, f"image data is truncated or corrupt: {_describe(error)}") from None
    check_image_size(*image.size, max_pixels=max_pixels, max_side=max_side, max_aspect=max_aspect, field=field)
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 to 8; 1 = as stored) of an opened image, from its header only."""
    if image.format == "PNG" and "exif" not in image.info:
        # An eXIf chunk after the pixels is found only by decoding them all; ``prepare_views``
        # checks the regions again against the decoded size.
        return 1
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # unreadable EXIF: exif_transpose will not turn the picture either
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """``IMAGE_FORMATS`` this Pillow can open (AVIF needs Pillow >= 11.2 built with libavif)."""
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as shown, i.e. after its EXIF orientation; read from the
    header, nothing decoded. Regions are given in these coordinates."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in _TRANSPOSED_ORIENTATIONS else (width, height)


def load_image(image: Image.Image, *, field: str = "image", scale: float = 1.0) -> tuple[Image.Image, float]:
    """Decode an image from ``open_image`` to RGB, turned by its EXIF orientation, first frame only.

    ``scale`` < 1 allows decoding at reduced size where the format can (JPEG: ``Image.draft``, by
    1/2, 1/4 or 1/8, never below ``scale`` of each side); other formats are decoded whole (PNG,
    WebP and GIF have no cheaper reduced decode; their cost is bounded by the size limits).
    Returns the image and the scale it was decoded at (1.0, 0.5, 0.25 or 0.125).

    Raises ``InvalidInputError`` naming ``field`` for truncated or corrupt data.
    """
    actual = 1.0
    source = image
    try:
        if scale < 1.0:
            width, height = image.size
            wanted = (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
            drafted = image.draft(None, wanted)  # None for formats that cannot draft
            if drafted is not None:
                actual = drafted[1][2] / width  # the original's width in the drafted picture
        image.load()
        image = _to_rgb(ImageOps.exif_transpose(image))
    except MemoryError:
        source.close()
        raise
    except Exception as error:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error...
        problem = _describe(error)
    else:
        return image, actual
    # Raised here, not in the except clause: there it would carry Pillow's error as its context,
    # whose traceback holds the decoder and with it the partly decoded pixels for as long as the
    # error lives (in a reference cycle once a caller re-raises it, until the cyclic GC runs: a
    # truncated 6000 x 6000 PNG held 100 MB per request that way; the fuzzing harness found it).
    source.close()
    raise InvalidInputError(field, f"image data is truncated or corrupt: {problem}")


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    max_side: int = DEFAULT_MAX_IMAGE_SIDE,
    max_aspect: float = DEFAULT_MAX_IMAGE_ASPECT,
    field: str = "image",
) -> Image.Image:
    """Decode image file bytes to RGB at full size, refusing what is empty, too big, a bomb, or corrupt.

    Raises ``InvalidInputError`` naming ``field`` and the limit.
    """
    image = open_image(
        data, max_bytes=max_bytes, max_pixels=max_pixels, max_side=max_side, max_aspect=max_aspect, field=field
    )
    return load_image(image, field=field)[0]


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of any mode: alpha dropped, palettes and CMYK converted, 16-bit greys scaled."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (a 16-bit grey PNG turns white).
        image = image.convert("I").point(lambda value: value * (1 / 257) + 0.5).convert("L")
    elif image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when a palette's transparency goes straight to RGB
    return image if image.mode == "RGB" else image.convert("RGB")


def _describe(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def itm_start_token_id(tokenizer: Any, policy: str) -> int | None:
    """The id that replaces the first token of ITM text, or None to keep the tokenizer's ``[CLS]``.

    ``cls``: keep ``[CLS]`` (as transformers' ``BlipForImageTextRetrieval`` examples do); ``enc``:
    ``[ENC]`` (as the original BLIP). Scoring and fine-tuning both build ITM input ids through this
    one function, so a model is trained on the same inputs it is later scored on.

    Raises:
        ModelLoadError: ``policy`` is neither, or ``enc`` with a tokenizer that has no ``[ENC]``.
    """
    if policy == "cls":
        return None
    if policy != "enc":
        raise ModelLoadError(f"itm_start_token must be 'cls' or 'enc', not {policy!r}")
    token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ModelLoadError("itm_start_token='enc' needs an [ENC] token, and this tokenizer has none")
    return int(token_id)


@dataclass(frozen=True)
class _LoadedModel:
    model: Any  # transformers' BlipForImageTextRetrieval
    processor: Any  # transformers' BlipProcessor
    model_id: str
    weights_identity: str


def _weights_identity(model_dir: Path) -> str:
    """SHA-256 over the weight files of a local model directory (names and contents)."""
    # Only the model's own weight files (model.safetensors, model-00001-of-00002.safetensors,
    # pytorch_model.bin): a training checkpoint left beside them must not change the identity.
    files = sorted(
        p
        for p in model_dir.iterdir()
        if p.suffix in {".safetensors", ".bin"} and p.name.startswith(("model", "pytorch_model"))
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(functools.partial(handle.read, 1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def load_blip_itm(model: str | Path, *, revision: str | None, dtype: torch.dtype) -> _LoadedModel:
    """Load ``BlipForImageTextRetrieval`` and its processor from a hub id or a local directory."""
    from transformers import AutoConfig, BlipForImageTextRetrieval, BlipProcessor

    source = str(model)
    local = Path(source).expanduser()
    looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local:
        if not local.is_dir():
            raise ModelLoadError(f"model directory {source!r} does not exist")
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {source!r} has no config.json: not a save_pretrained() layout "
                "(make one with `python -m teacher_server make-tiny-model DIR`)"
            )
        source = str(local)
    hub_revision = "main" if revision is None else revision  # transformers' own default
    try:
        config = AutoConfig.from_pretrained(source, revision=hub_revision)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_explain_load_failure(source, error)) from None
    if config.model_type != "blip":
        raise ModelLoadError(f"{source!r} holds a {config.model_type!r} model, not a BLIP ITM model")
    try:
        # With output_loading_info the model comes with a dict of missing and unexpected keys.
        loaded: Any = BlipForImageTextRetrieval.from_pretrained(
            source, revision=hub_revision, dtype=dtype, output_loading_info=True
        )
        network, info = loaded
        processor = BlipProcessor.from_pretrained(source, revision=hub_revision)
    except Exception as error:  # safetensors, json and tokenizer errors have no common base
        raise ModelLoadError(_explain_load_failure(source, error)) from None
    # Missing weights would be silently random: refuse them.
    missing = [key for key in info.get("missing_keys", []) if not key.endswith("position_ids")]
    if missing:
        raise ModelLoadError(
            f"{source!r} lacks {len(missing)} weights of BlipForImageTextRetrieval "
            f"(e.g. {', '.join(sorted(missing)[:3])}): is it an ITM checkpoint?"
        )
    commit = getattr(network.config, "_commit_hash", None)
    # A hub model is named by id and commit; a local directory by its weights, wherever it lies.
    identity = f"hub:{model}@{commit}" if commit else _weights_identity(Path(source))
    return _LoadedModel(network.eval(), processor, str(model), identity)


def _explain_load_failure(source: str, error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not Path(source).exists():
        return (
            f"could not load model {source!r}: {text}. If it is a hub id, it is not in the local "
            "Hugging Face cache and the hub is unreachable; pass a local directory instead."
        )
    return f"could not load model directory {source!r} (corrupt or incomplete?): {text}"


class ItmEngine:
    """Scores (image, sentence) pairs with a frozen BLIP ITM model, image-factored.

    Thread-safe for ``prepare_image``, ``check_sentences`` and ``has_image``; ``score`` is meant
    to be called by one worker thread per engine (one engine per device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        model_id: str,
        weights_identity: str,
        settings: EngineSettings | None = None,
    ) -> None:
        self.settings = settings or EngineSettings()
        _check_region_settings(self.settings)
        self.device = resolve_device(self.settings.device)
        self.dtype = resolve_dtype(self.settings.dtype, self.device)
        # Any: BLIP's submodules are walked by name (text_encoder.encoder.layer), which torch's
        # Module typing (attributes are Tensor | Module) cannot follow.
        self.model: Any = cast(Any, model).to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_id = model_id
        self.weights_identity = weights_identity
        self.stats = EngineStats()
        self.vision_cache = VisionCache(self.settings.vision_cache_mb)
        self._tokenizer_lock = threading.Lock()
        self._token_cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._start_token_id = itm_start_token_id(self.tokenizer, self.settings.itm_start_token)
        text_config = self.model.config.text_config
        self._num_heads = text_config.num_attention_heads
        self._head_dim = text_config.hidden_size // text_config.num_attention_heads
        self._pad_id = text_config.pad_token_id or 0
        self._target_size, self._resample = _processor_resize(processor.image_processor)
        self.fingerprint = self._compute_fingerprint()

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model: str | Path = DEFAULT_MODEL, settings: EngineSettings | None = None) -> ItmEngine:
        """Load from a hub id (default ``Salesforce/blip-itm-base-coco``) or a local directory."""
        settings = settings or EngineSettings()
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        loaded = load_blip_itm(model, revision=settings.revision, dtype=dtype)
        return cls(
            loaded.model,
            loaded.processor,
            model_id=loaded.model_id,
            weights_identity=loaded.weights_identity,
            settings=settings,
        )

    def _compute_fingerprint(self) -> str:
        """Short hash of everything that changes a score: weights, preprocessing, policy, dtype."""
        image_processor = self.processor.image_processor
        parts = {
            "weights": self.weights_identity,
            "image_size": dict(image_processor.size) if image_processor.size else None,
            "image_mean": list(image_processor.image_mean),
            "image_std": list(image_processor.image_std),
            "rescale": getattr(image_processor, "rescale_factor", None),
            "itm_start_token": self.settings.itm_start_token,
            "dtype": dtype_name(self.dtype),
            # Changes every region's score (not the whole image's, but one hash is simpler to
            # reason about than a second, per-region fingerprint).
            "region": self.settings.region_description(),
        }
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> dict[str, object]:
        """What a client may want to know: ids, fingerprint, limits."""
        return {
            "model_id": self.model_id,
            "fingerprint": self.fingerprint,
            "weights": self.weights_identity,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "itm_start_token": self.settings.itm_start_token,
            "region_policy": self.settings.region_description(),
            "limits": {k: v for k, v in asdict(self.settings).items() if k.startswith("max_")},
        }

    # ------------------------------------------------------------------------------ validation
    def prepare_image(
        self,
        data: bytes,
        *,
        digest: str | None = None,
        field: str = "image",
        region: Region | None = None,
        region_field: str = "region",
    ) -> PreparedImage:
        """Decode, check limits and preprocess image file bytes (on CPU): the whole image, or the
        view of ``region`` (refused, naming ``region_field``, when it reaches outside the image)."""
        (prepared,) = self.prepare_views(data, [region], digest=digest, field=field, region_fields=[region_field])
        return prepared

    def prepare_views(
        self,
        data: bytes,
        regions: Sequence[Region | None],
        *,
        digest: str | None = None,
        field: str = "image",
        region_fields: Sequence[str] | None = None,
    ) -> list[PreparedImage]:
        """One decode, one prepared view per entry of ``regions`` (None = the whole image).

        Every limit (bytes, pixels, longer side, aspect ratio) and every region is checked from
        the header before anything is decoded; a JPEG is then decoded at the smallest scale that
        still gives each view ``DRAFT_GAP`` times the pixels the processor resizes it to.
        """
        s = self.settings
        image = open_image(bytes(data), **s.image_limits(), field=field)
        width, height = oriented_size(image)
        orientation = exif_orientation(image)
        names = list(region_fields) if region_fields is not None else ["region"] * len(regions)
        self._check_regions(regions, names, width, height)
        needed = max((self._scale_needed(region, width, height) for region in regions), default=1.0)
        image, scale = load_image(image, field=field, scale=needed)
        try:
            if scale == 1.0 and image.size != (width, height):  # turned by an EXIF chunk after the pixels
                self._check_regions(regions, names, *image.size)
            digest = digest or image_digest(bytes(data))
            if scale == 1.0:
                return [
                    PreparedImage(digest, self.preprocess(self.render(image, region)), region) for region in regions
                ]
            return [
                PreparedImage(
                    digest, self._preprocess_drafted(image, region, scale, (width, height), orientation), region
                )
                for region in regions
            ]
        finally:
            image.close()  # the views are tensors now; an error's traceback must not keep the pixels

    def _preprocess_drafted(
        self, image: Image.Image, region: Region | None, scale: float, size: tuple[int, int], orientation: int
    ) -> Tensor:
        """Pixel values of a view of an image decoded at ``scale`` of its shown ``size``.

        The view's box (in the original's pixels) is resized straight to the processor's size
        with Pillow's fractional ``box``: cropping at the reduced size first would round the box
        to whole reduced pixels and shift the view by up to half of one. A side that is not a
        multiple of the scale ends in a partial pixel, which a turned or mirrored image shows
        first: the box starts after it.
        """
        s = self.settings
        width, height = size
        flip_x, flip_y = _FLIPPED_AXES.get(orientation, (False, False))
        offset_x = image.width - width * scale if flip_x else 0.0
        offset_y = image.height - height * scale if flip_y else 0.0
        if region is not None and s.region_policy == "crop":
            shown, box = image, view_box(region, width, height, policy="crop", margin=s.region_margin)
        else:  # the whole image, or the mask policy's dimmed whole image
            shown, box = self.render(image, _scaled(region, scale, offset_x, offset_y)), (0, 0, width, height)
        x1, y1, x2, y2 = box
        exact = (
            max(0.0, x1 * scale + offset_x),
            max(0.0, y1 * scale + offset_y),
            min(float(image.width), x2 * scale + offset_x),
            min(float(image.height), y2 * scale + offset_y),
        )
        assert self._target_size is not None  # a scale < 1 comes only from _scale_needed, which needs it
        resized = shown.resize(self._target_size, self._resample, box=exact, reducing_gap=REDUCING_GAP)
        return self.processor.image_processor(images=resized, return_tensors="pt")["pixel_values"]

    @staticmethod
    def _check_regions(regions: Sequence[Region | None], names: Sequence[str], width: int, height: int) -> None:
        for region, name in zip(regions, names, strict=True):
            if region is not None:
                region.check_inside(width, height, field=name)

    def _scale_needed(self, region: Region | None, width: int, height: int) -> float:
        """The smallest decoding scale (<= 1) that leaves the view of ``region`` of a ``width`` x
        ``height`` image ``DRAFT_GAP`` times the processor's output size on each side."""
        target = self._target_size
        if target is None:
            return 1.0
        s = self.settings
        x1, y1, x2, y2 = view_box(region, width, height, policy=s.region_policy, margin=s.region_margin)
        return min(1.0, DRAFT_GAP * max(target[0] / (x2 - x1), target[1] / (y2 - y1)))

    def render(self, image: Image.Image, region: Region | None) -> Image.Image:
        """What the model is shown of ``region`` of the decoded RGB ``image`` (the image itself for None)."""
        if region is None:
            return image
        s = self.settings
        return render_region(image, region, policy=s.region_policy, margin=s.region_margin, dim=s.region_dim)

    def preprocess(self, image: Image.Image) -> Tensor:
        """BLIP's processor: (1, 3, S, S) float32 pixel values.

        A view at least ``2 * REDUCING_GAP`` times the processor's size on a side is first resized
        to that size here, with Pillow's ``reducing_gap``: the processor would otherwise turn the
        whole picture into float arrays before resizing (seconds and gigabytes for a large one).
        """
        target = self._target_size
        if target is not None and (
            image.width >= 2 * REDUCING_GAP * target[0] or image.height >= 2 * REDUCING_GAP * target[1]
        ):
            image = image.resize(target, self._resample, reducing_gap=REDUCING_GAP)
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]

    def check_sentences(self, sentences: Sequence[str], *, field: str = "sentences") -> None:
        """Refuse non-strings, empty sentences and sentences over the token limit."""
        limit = self.settings.max_sentence_tokens
        for index, sentence in enumerate(sentences):
            name = f"{field}[{index}]"
            if not isinstance(sentence, str):
                raise InvalidInputError(name, f"expected a string, got {type(sentence).__name__}")
            if not sentence.strip():
                raise InvalidInputError(name, "sentence is empty")
            # Cheap bound before tokenizing: no token is shorter than one character.
            if len(sentence) > 32 * limit:
                raise InvalidInputError(
                    name, f"sentence is {len(sentence):,} characters, over the limit of {limit} tokens"
                )
            count = len(self._token_ids(sentence))
            if count > limit:
                raise InvalidInputError(
                    name, f"sentence is {count} tokens (with [CLS] and [SEP]), over the limit of {limit} tokens"
                )

    def has_image(self, digest: str, region: Region | None = None) -> bool:
        """Whether the vision embedding of this view is held (a digest-only request can use it)."""
        return view_id(digest, region) in self.vision_cache

    def _token_ids(self, sentence: str) -> tuple[int, ...]:
        with self._tokenizer_lock:
            ids = self._token_cache.get(sentence)
            if ids is None:
                ids = tuple(self.tokenizer(sentence, add_special_tokens=True)["input_ids"])
                self._token_cache[sentence] = ids
                if len(self._token_cache) > 100_000:
                    self._token_cache.popitem(last=False)
            else:
                self._token_cache.move_to_end(sentence)
            return ids

    # --------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, requests: Sequence[ImageSentences]) -> list[list[ItmScore]]:
        """Score every sentence of every request against its image; one call is one batch."""
        embeddings = self._vision_embeddings(requests)
        # Keyed by view: a region of an image is another "image" to everything below.
        pairs = list(dict.fromkeys((r.view, s) for r in requests for s in r.sentences))
        scores: dict[tuple[str, str], ItmScore] = {}
        views = list(dict.fromkeys(view for view, _ in pairs))
        for start in range(0, len(views), self.settings.kv_chunk_images):
            chunk = views[start : start + self.settings.kv_chunk_images]
            slot = {view: index for index, view in enumerate(chunk)}
            keys_values = self._cross_attention_kv(torch.cat([embeddings[d] for d in chunk]))
            chunk_pairs = [(view, sentence) for view, sentence in pairs if view in slot]
            for batch in self._length_buckets(chunk_pairs):
                batch.sort(key=lambda pair: slot[pair[0]])  # rows of one image adjacent
                logits = self._itm_logits(
                    [self._itm_token_ids(sentence) for _, sentence in batch],
                    [slot[view] for view, _ in batch],
                    keys_values,
                )
                for pair, (logit, prob) in zip(batch, _margin_and_prob(logits), strict=True):
                    scores[pair] = ItmScore(logit, prob)
        self.stats.add(sentences_scored=len(pairs), pairs_scored=sum(len(r.sentences) for r in requests))
        return [[scores[(r.view, s)] for s in r.sentences] for r in requests]

    def _vision_embeddings(self, requests: Sequence[ImageSentences]) -> dict[str, Tensor]:
        """Embedding per distinct view: from the LRU, else encoded (in vision batches)."""
        given: dict[str, PreparedImage] = {}
        for r in requests:
            if r.image is not None:
                if r.image.view != r.view:
                    raise ValueError(f"an item for view {r.view} carries the image prepared for {r.image.view}")
                given[r.view] = r.image
        embeddings: dict[str, Tensor] = {}
        to_encode: list[PreparedImage] = []
        for view in dict.fromkeys(r.view for r in requests):
            held = self.vision_cache.get(view)
            if held is not None:
                embeddings[view] = held  # a reference: later eviction cannot take it from us
            elif view in given:
                to_encode.append(given[view])
            else:
                raise ImageRequiredError(view)
        for start in range(0, len(to_encode), self.settings.vision_batch_size):
            batch = to_encode[start : start + self.settings.vision_batch_size]
            pixels = torch.cat([image.pixel_values for image in batch]).to(self.device, self.dtype)
            hidden = self.model.vision_model(pixel_values=pixels).last_hidden_state  # (B, N, Dv)
            for image, embedding in zip(batch, hidden, strict=True):
                embedding = embedding.unsqueeze(0).clone()
                embeddings[image.view] = embedding
                self.vision_cache.put(image.view, embedding)
        self.stats.add(images_encoded=len(to_encode), vision_cache_hits=len(embeddings) - len(to_encode))
        return embeddings

    def _cross_attention_kv(self, image_embeds: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per text layer, the cross-attention keys and values of the image tokens.

        image_embeds: (I, N, Dv) -> per layer (keys, values), each (I, heads, N, head_dim).
        """
        result = []
        for layer in self.model.text_encoder.encoder.layer:
            attention = layer.crossattention.self
            # Contiguous once here, so that no micro-batch copies them again.
            keys = self._split_heads(attention.key(image_embeds)).contiguous()
            values = self._split_heads(attention.value(image_embeds)).contiguous()
            result.append((keys, values))
        return result

    def _itm_token_ids(self, sentence: str) -> tuple[int, ...]:
        ids = self._token_ids(sentence)
        if self._start_token_id is not None:
            ids = (self._start_token_id, *ids[1:])
        return ids

    def _length_buckets(self, pairs: list[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
        """Micro-batches of pairs with similar token lengths (little padding)."""
        ordered = sorted(pairs, key=lambda pair: len(self._token_ids(pair[1])))
        size = self.settings.text_batch_size
        for start in range(0, len(ordered), size):
            yield ordered[start : start + size]

    def _itm_logits(
        self, token_ids: list[tuple[int, ...]], image_slots: list[int], keys_values: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        """ITM logits (B, 2) of B sentences, sentence b against image ``image_slots[b]``.

        Rows must be grouped by image slot (equal slots adjacent); ``score`` orders them so.
        """
        length = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), length), self._pad_id, dtype=torch.long)
        padding = torch.ones((len(token_ids), length), dtype=torch.bool)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            padding[row, : len(ids)] = False
        input_ids, padding = input_ids.to(self.device), padding.to(self.device)
        text = self.model.text_encoder
        hidden = text.embeddings(input_ids=input_ids)  # (B, L, D)
        # Additive mask on padded keys, as the stock eager attention builds it.
        self_mask = torch.zeros(padding.shape, dtype=hidden.dtype, device=self.device)
        self_mask = self_mask.masked_fill(padding, torch.finfo(hidden.dtype).min)[:, None, None, :]
        groups = _runs(image_slots)
        layers = text.encoder.layer
        for index, layer in enumerate(layers):
            # Only the first token reaches the ITM head: the last layer computes nothing else.
            hidden = self._text_layer(
                layer, hidden, self_mask, keys_values[index], groups, first_token_only=index == len(layers) - 1
            )
        # In fp32 whatever the engine's dtype: the margin l_match - l_nomatch of two close logits
        # would keep few significant digits if each were rounded to bf16 first.
        return fp32_linear(self.model.itm_head, hidden[:, 0])

    def _text_layer(
        self,
        layer: Any,  # transformers' BlipTextLayer
        hidden: Tensor,
        self_mask: Tensor,
        keys_values: tuple[Tensor, Tensor],
        groups: list[tuple[int, int, int]],
        *,
        first_token_only: bool,
    ) -> Tensor:
        """One BLIP text layer: self-attention, cross-attention to the image, feed-forward."""
        self_attention = layer.attention.self
        queries_in = hidden[:, :1] if first_token_only else hidden
        context = self._attend(
            self._split_heads(self_attention.query(queries_in)),
            self._split_heads(self_attention.key(hidden)),
            self._split_heads(self_attention.value(hidden)),
            self_mask,
        )
        attended = layer.attention.output(context, queries_in)
        cross = layer.crossattention
        context = self._cross_attend(cross.self.query(attended), *keys_values, groups)
        attended = cross.output(context, attended)
        return layer.output(layer.intermediate(attended), attended)

    def _cross_attend(
        self, queries: Tensor, keys: Tensor, values: Tensor, groups: list[tuple[int, int, int]]
    ) -> Tensor:
        """Cross-attention of sentences to their image's tokens, without copying the image K/V.

        queries: (B, L, H*d); keys/values: (I, H, N, d); groups: (start, stop, image slot) runs.
        Cross-attention has no mask, so all sentences of one image fold into one query sequence
        of length g*L: one (H, g*L, d) x (H, d, N) product per image instead of broadcasting
        the image's keys and values to every sentence.
        """
        _, length, width = queries.shape
        outputs = []
        for start, stop, slot in groups:
            count = stop - start
            folded = queries[start:stop].reshape(count * length, self._num_heads, self._head_dim).transpose(0, 1)
            context = self._attend(folded, keys[slot], values[slot], None)  # (g*L, H*d)
            outputs.append(context.view(count, length, width))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _split_heads(self, states: Tensor) -> Tensor:
        """(B, L, H*d) -> (B, H, L, d)."""
        batch, length, _ = states.shape
        return states.view(batch, length, self._num_heads, self._head_dim).transpose(1, 2)

    def _attend(self, queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
        """Scaled dot-product attention: (..., H, Lq, d) x (..., H, Lk, d) -> (..., Lq, H*d).

        ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU) computes the
        stock layer's eager ``softmax(q k^T / sqrt(d) + mask) v``, scale and additive mask
        included; the tests hold the two to 1e-5 and the engine to the stock forward to 1e-4.
        """
        context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        return context.transpose(-3, -2).flatten(-2)


def _check_region_settings(settings: EngineSettings) -> None:
    if settings.region_policy not in REGION_POLICIES:
        raise ModelLoadError(
            f"region_policy must be one of {', '.join(REGION_POLICIES)}, got {settings.region_policy!r}"
        )
    if not (math.isfinite(settings.region_margin) and 0.0 <= settings.region_margin <= 2.0):
        raise ModelLoadError(f"region_margin must be within 0..2, got {settings.region_margin}")
    if not (math.isfinite(settings.region_dim) and 0.0 <= settings.region_dim <= 1.0):
        raise ModelLoadError(f"region_dim must be within 0..1, got {settings.region_dim}")


def _runs(values: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal adjacent values as (start, stop, value)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            runs.append((start, index, values[start]))
            start = index
    return runs


def _margin_and_prob(logits: Tensor) -> list[tuple[float, float]]:
    """ITM logits (B, 2) [no-match, match] -> per row (l_match - l_nomatch, P(match))."""
    margins = (logits[:, 1] - logits[:, 0]).tolist()
    probs = logits.softmax(dim=-1)[:, 1].tolist()
    return list(zip(margins, probs, strict=True))


def _processor_resize(image_processor: Any) -> tuple[tuple[int, int] | None, Image.Resampling]:
    """(width, height) and filter of the fixed resize BLIP's image processor does, or None when it
    does not resize to one fixed size (then images reach it as decoded)."""
    size = getattr(image_processor, "size", None)
    width, height = (getattr(size, "width", None), getattr(size, "height", None)) if size is not None else (None, None)
    if isinstance(size, dict):
        width, height = size.get("width"), size.get("height")
    resample = Image.Resampling(int(getattr(image_processor, "resample", Image.Resampling.BICUBIC)))
    if not getattr(image_processor, "do_resize", False) or not width or not height:
        return None, resample
    return (int(width), int(height)), resample


def _scaled(region: Region | None, scale: float, offset_x: float = 0.0, offset_y: float = 0.0) -> Region | None:
    """``region`` in the pixels of an image decoded at ``scale`` of its size, its origin at
    (``offset_x``, ``offset_y``) of those pixels."""
    if region is None:
        return None
    h, o = region.human, region.object
    return Region(
        human=(h[0] * scale + offset_x, h[1] * scale + offset_y, h[2] * scale + offset_x, h[3] * scale + offset_y),
        object=(o[0] * scale + offset_x, o[1] * scale + offset_y, o[2] * scale + offset_x, o[3] * scale + offset_y),
    )
