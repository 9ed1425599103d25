"""Triton Python-backend model ``blip_itm``: BLIP image-text matching through ``teacher_server.engine``.

Tensors (config.pbtxt): a request of N (image, sentence) pairs sends IMAGE [N, 1] (encoded image
files) and TEXT [N, 1] (UTF-8 sentences), both BYTES, and gets MATCH_PROB and MATCH_LOGIT [N, 1]
FP32 back, pair i being (IMAGE[i], TEXT[i]). The optional REGION [N, 8] FP32 scores pair i on a
human-object pair of its image (human box then object box, x1, y1, x2, y2 in pixels of the
original image; a row of eight zeros = the whole image), as the teacher's own KServe endpoint.

Triton's dynamic batcher hands ``execute`` several requests at once. Each is validated on its own
(a bad one fails alone, with a TritonError INVALID_ARG naming the tensor element and the limit,
e.g. ``TEXT[3]: sentence is 70 tokens ..., over the limit of 64 tokens``); the valid ones are then
scored in ONE engine call. So an image view repeated within a request or across the merged
requests is decoded and encoded once (pairs are grouped by view: the SHA-256 digest of the image
bytes and the region), a repeated (view, sentence) pair is scored once, and a view still in the
engine's vision LRU is not even decoded again.

Settings come from the config's ``parameters``; a ``HOIDISTILL_<KEY>`` environment variable of
the server process overrides each (``HOIDISTILL_MODEL=/models/blip``). The device follows the
instance group: ``cpu`` for KIND_CPU, ``cuda:<device id>`` for KIND_GPU. Counters of the engine
and the model's fingerprint are exported as custom metrics on Triton's metrics port.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine, PreparedImage
    from teacher_server.errors import InvalidInputError
    from teacher_server.hoi.digest import image_digest
    from teacher_server.hoi.region import REGION_POLICIES, Region, view_id
except ImportError as error:  # the message Triton shows when the model fails to load
    raise ImportError(
        f"blip_itm needs the hoi-distill teacher (teacher_server, torch, transformers) in the Python "
        f"the backend stub runs ({error}); see docs/triton.md"
    ) from error

IMAGE, TEXT, REGION = "IMAGE", "TEXT", "REGION"
MATCH_PROB, MATCH_LOGIT = "MATCH_PROB", "MATCH_LOGIT"
ENV_PREFIX = "HOIDISTILL_"
METRIC_PREFIX = "hoidistill_teacher"
Outputs = tuple[np.ndarray, np.ndarray]  # (MATCH_PROB, MATCH_LOGIT) of one request, each (N, 1) float32


# ------------------------------------------------------------------------------------- settings
def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def _optional_text(value: str) -> str | None:
    return value or None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError("expected an integer >= 1")
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:  # also refuses NaN
        raise ValueError("expected a number >= 0")
    return number


def _region_policy(value: str) -> str:
    if value not in REGION_POLICIES:
        raise ValueError(f"expected one of {', '.join(REGION_POLICIES)}")
    return value


def _aspect(value: str) -> float:
    number = _non_negative_float(value)
    if number < 1:
        raise ValueError("expected a ratio of the longer to the shorter side, at least 1")
    return number


def _fraction(value: str) -> float:
    number = _non_negative_float(value)
    if number > 1:
        raise ValueError("expected a number from 0 to 1")
    return number


# Parameter key -> parser. The keys are the field names of the teacher's ServerSettings.
PARAMETERS: dict[str, Callable[[str], Any]] = {
    "model": _text,
    "model_revision": _optional_text,
    "dtype": _text,
    "itm_start_token": _text,
    "vision_cache_mb": _non_negative_float,
    "text_batch_size": _positive_int,
    "max_image_bytes": _positive_int,
    "max_image_pixels": _positive_int,
    "max_image_side": _positive_int,
    "max_image_aspect": _aspect,
    "max_sentence_tokens": _positive_int,
    "region_policy": _region_policy,
    "region_margin": _non_negative_float,
    "region_dim": _fraction,
}


def read_parameters(parameters: Mapping[str, Mapping[str, str]], env: Mapping[str, str]) -> dict[str, Any]:
    """Config ``parameters`` (``{key: {"string_value": ...}}``), each overridden by ``HOIDISTILL_<KEY>``.

    An empty environment variable counts as unset. Upper-case keys belong to the Python backend
    (``EXECUTION_ENV_PATH``...) and are left to it. Raises ``ValueError`` naming the parameter or
    variable, its value and what would be right.
    """
    unknown = sorted(key for key in set(parameters) - set(PARAMETERS) if not key.isupper())
    if unknown:
        raise ValueError(f"config.pbtxt parameter {unknown[0]!r} is unknown; known: {', '.join(PARAMETERS)}")
    values: dict[str, Any] = {}
    for key, parse in PARAMETERS.items():
        variable = ENV_PREFIX + key.upper()
        if env.get(variable):
            raw, source = env[variable], f"environment variable {variable}"
        elif key in parameters:
            raw, source = parameters[key].get("string_value", ""), f"config.pbtxt parameter {key!r}"
        else:
            continue
        try:
            values[key] = parse(raw)
        except ValueError as error:
            raise ValueError(f"{source} = {raw!r}: {error}") from None
    return values


def engine_settings(values: Mapping[str, Any], device: str) -> tuple[str, EngineSettings]:
    """(model id or directory, EngineSettings) from parsed parameters, on ``device``."""
    fields = {key: value for key, value in values.items() if key not in ("model", "model_revision")}
    settings = EngineSettings(device=device, revision=values.get("model_revision"), **fields)
    return values.get("model", "Salesforce/blip-itm-base-coco"), settings


def instance_device(kind: str, device_id: str) -> str:
    """Triton's instance kind (``CPU``/``GPU``) and device id -> a torch device name."""
    return f"cuda:{device_id}" if kind == "GPU" else "cpu"


# ------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class PairRequest:
    """The validated pairs of one inference request: pair i is (view ``views[i]``, ``sentences[i]``),
    a view being the image ``digests[i]`` seen whole or on the pair ``regions[i]``."""

    digests: list[str]
    sentences: list[str]
    regions: list[Region | None]

    @property
    def views(self) -> list[str]:
        return [view_id(digest, region) for digest, region in zip(self.digests, self.regions, strict=True)]


@dataclass(frozen=True)
class _Failure:
    """Why an image or a view was refused, and the tail of the field it named (``[6]`` of ``REGION[0][6]``)."""

    error: InvalidInputError
    detail: str


class BatchImages:
    """The distinct image views of one ``execute`` call, each checked and preprocessed once.

    A view the engine still holds (vision LRU, by view id) is not decoded: it was checked when
    it came first, and the same bytes give the same digest. It is still held when ``score``
    runs: an instance runs one ``execute`` at a time, and nothing enters the LRU in between.
    """

    def __init__(self, engine: ItmEngine) -> None:
        self.engine = engine
        self.prepared: dict[str, PreparedImage | None] = {}  # by view id
        self._failures: dict[str, _Failure] = {}  # by digest (the image) or view id (the region)

    def add(self, data: bytes, field: str, region: Region | None = None, region_field: str = REGION) -> str:
        """Digest of ``data``; raises ``InvalidInputError`` naming ``field`` when the image is refused,
        or ``region_field`` when the region reaches outside it."""
        digest = image_digest(data)
        view = view_id(digest, region)
        for key, name in ((digest, field), (view, region_field)):
            failure = self._failures.get(key)
            if failure is not None:  # named as this pair's element, with the value at fault (``[6]``)
                raise InvalidInputError(name + failure.detail, failure.error.reason, too_large=failure.error.too_large)
        if view not in self.prepared:
            if self.engine.has_image(digest, region):
                self.prepared[view] = None
            else:
                try:
                    self.prepared[view] = self.engine.prepare_image(
                        data, digest=digest, field=field, region=region, region_field=region_field
                    )
                except InvalidInputError as error:
                    if error.field.startswith(region_field):  # the region reaches outside the image
                        self._failures[view] = _Failure(error, error.field[len(region_field) :])
                    else:
                        self._failures[digest] = _Failure(error, error.field[len(field) :])
                    raise
        return digest


def _elements(request: Any, name: str) -> list[bytes]:
    """The BYTES elements of input ``name`` ([N, 1]) in pair order.

    Triton has already checked names, types, shapes, and that IMAGE and TEXT have the same N.
    """
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return [bytes(element) for element in tensor.as_numpy().reshape(-1)]


def decode_texts(texts: Sequence[bytes]) -> list[str]:
    """UTF-8 sentences; an undecodable element is refused by its index."""
    sentences = []
    for index, data in enumerate(texts):
        try:
            sentences.append(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidInputError(
                f"{TEXT}[{index}]",
                f"not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})",
            ) from None
    return sentences


def decode_regions(rows: np.ndarray | None, count: int) -> list[Region | None]:
    """REGION ([N, 8] FP32, or None when not sent) -> one region per pair; a row of zeros = the
    whole image. Triton checked its type and shape; the values are refused naming ``REGION[i]``."""
    if rows is None:
        return [None] * count
    return [
        None if not row.any() else Region.from_values(row.tolist(), field=f"{REGION}[{pair}]")
        for pair, row in enumerate(rows.reshape(count, -1).astype(np.float64))
    ]


def read_request(request: Any, images: BatchImages) -> PairRequest:
    """Check one request's sentences (empty, UTF-8, token limit), regions (8 finite values, boxes
    not inverted, inside the image) and images (size, pixels, format)."""
    image_data, texts = _elements(request, IMAGE), _elements(request, TEXT)
    sentences = decode_texts(texts)
    images.engine.check_sentences(sentences, field=TEXT)
    region_tensor = pb_utils.get_input_tensor_by_name(request, REGION)  # None: not sent (optional)
    regions = decode_regions(None if region_tensor is None else region_tensor.as_numpy(), len(image_data))
    digests = [
        images.add(data, f"{IMAGE}[{index}]", region, f"{REGION}[{index}]")
        for index, (data, region) in enumerate(zip(image_data, regions, strict=True))
    ]
    return PairRequest(digests, sentences, regions)


def score_requests(images: BatchImages, requests: Sequence[PairRequest]) -> list[Outputs]:
    """(MATCH_PROB, MATCH_LOGIT), each (N, 1) float32, per request, from ONE engine call."""
    sentences_of: dict[str, dict[str, None]] = {}  # view -> its distinct sentences, in order
    view_of: dict[str, tuple[str, Region | None]] = {}  # view -> (digest, region)
    for request in requests:
        for digest, region, view, sentence in zip(
            request.digests, request.regions, request.views, request.sentences, strict=True
        ):
            sentences_of.setdefault(view, {})[sentence] = None
            view_of.setdefault(view, (digest, region))

    batch = [
        ImageSentences(view_of[v][0], images.prepared[v], list(s), region=view_of[v][1])
        for v, s in sentences_of.items()
    ]
    results = images.engine.score(batch)
    scores = {
        (view, sentence): score
        for view, item, item_scores in zip(sentences_of, batch, results, strict=True)
        for sentence, score in zip(item.sentences, item_scores, strict=True)
    }
    outputs = []
    for request in requests:
        pairs = [scores[key] for key in zip(request.views, request.sentences, strict=True)]
        probs = np.array([pair.match_prob for pair in pairs], dtype=np.float32).reshape(-1, 1)
        logits = np.array([pair.match_logit for pair in pairs], dtype=np.float32).reshape(-1, 1)
        outputs.append((probs, logits))
    return outputs


# -------------------------------------------------------------------------------------- metrics
class EngineMetrics:
    """Triton custom metrics: the engine's counters and a ``model_info`` gauge carrying the fingerprint.

    Metrics must never stop the model from serving: if Triton refuses them, they are left out.
    """

    # Counters of the engine's stats (EngineStats fields) and of the requests.
    COUNTERS: ClassVar[dict[str, str]] = {
        "images_encoded": "images run through the vision encoder (vision-LRU misses)",
        "vision_cache_hits": "distinct images of a batch found in the vision LRU",
        "sentences_scored": "distinct (image, sentence) pairs of a batch run through the text tower",
        "pairs_requested": "(image, sentence) pairs of valid requests, duplicates included",
    }

    def __init__(self, engine: ItmEngine, model: str, instance: str) -> None:
        self._families: list[Any] = []  # Triton drops a family whose object is collected
        self._counters: dict[str, Any] = {}
        self._seen = dict.fromkeys(self.COUNTERS, 0)
        labels = {"model": model, "instance": instance}
        try:
            for name, description in self.COUNTERS.items():
                family = pb_utils.MetricFamily(
                    name=f"{METRIC_PREFIX}_{name}_total",
                    description=description,
                    kind=pb_utils.MetricFamily.COUNTER,
                )
                self._families.append(family)
                self._counters[name] = family.Metric(labels=labels)
            info = pb_utils.MetricFamily(
                name=f"{METRIC_PREFIX}_model_info",
                description="1 per model instance; the labels say which weights answer (fingerprint) and its limits",
                kind=pb_utils.MetricFamily.GAUGE,
            )
            self._families.append(info)
            described = engine.describe()
            keys = ("model_id", "fingerprint", "dtype", "itm_start_token", "region_policy", "device")
            info_labels = {key: str(described[key]) for key in keys}
            info_labels.update({key: str(value) for key, value in described["limits"].items()})
            self._info = info.Metric(labels={**labels, **info_labels})
            self._info.set(1)
        except Exception as error:  # see the class docstring
            pb_utils.Logger.log_warn(f"blip_itm: custom metrics disabled ({type(error).__name__}: {error})")
            self._counters = {}

    def update(self, stats: Any, pairs_requested: int) -> None:
        """Add what happened since the last call: ``stats`` are the engine's running totals."""
        totals = {
            "images_encoded": stats.images_encoded,
            "vision_cache_hits": stats.vision_cache_hits,
            "sentences_scored": stats.sentences_scored,
            "pairs_requested": self._seen["pairs_requested"] + pairs_requested,
        }
        for name, counter in self._counters.items():
            if totals[name] > self._seen[name]:
                counter.increment(totals[name] - self._seen[name])
                self._seen[name] = totals[name]


# ---------------------------------------------------------------------------------------- model
def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    """The Python backend's entry point: ``initialize`` loads the engine, ``execute`` scores batches."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        device = instance_device(args["model_instance_kind"], args["model_instance_device_id"])
        values = read_parameters(config.get("parameters", {}), os.environ)
        model, settings = engine_settings(values, device)
        self.engine = ItmEngine.from_pretrained(model, settings)
        self.metrics = EngineMetrics(self.engine, args["model_name"], args["model_instance_name"])
        described = self.engine.describe()
        pb_utils.Logger.log_info(
            f"blip_itm ready on {described['device']} ({described['dtype']}): model {described['model_id']}, "
            f"fingerprint {described['fingerprint']}, limits {json.dumps(described['limits'])}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        images = BatchImages(self.engine)
        valid: list[tuple[int, PairRequest]] = []
        for index, request in enumerate(requests):
            try:
                valid.append((index, read_request(request, images)))
            except InvalidInputError as error:
                responses[index] = _error(str(error), pb_utils.TritonError.INVALID_ARG)
            except Exception as error:  # one broken request must not fail the batch
                responses[index] = _error(
                    f"reading the request failed: {type(error).__name__}: {error}",
                    pb_utils.TritonError.INTERNAL,
                )
        if valid:
            try:
                outputs = score_requests(images, [pairs for _, pairs in valid])
            except Exception as error:  # answer every request; the instance lives on
                pb_utils.Logger.log_error(f"blip_itm: scoring failed: {type(error).__name__}: {error}")
                for index, _ in valid:
                    responses[index] = _error(
                        f"scoring failed: {type(error).__name__}: {error}", pb_utils.TritonError.INTERNAL
                    )
            else:
                for (index, _), (probs, logits) in zip(valid, outputs, strict=True):
                    responses[index] = pb_utils.InferenceResponse(
                        [pb_utils.Tensor(MATCH_PROB, probs), pb_utils.Tensor(MATCH_LOGIT, logits)]
                    )
        self.metrics.update(self.engine.stats, sum(len(pairs.digests) for _, pairs in valid))
        return responses

    def finalize(self) -> None:
        pb_utils.Logger.log_info("blip_itm: unloading")
        self.engine = None
