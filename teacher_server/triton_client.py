"""Client of the teacher's ``blip_itm`` model on Triton Inference Server, with ``tritonclient.grpc``.

A team that serves the teacher with Triton (``deploy/triton``) points training at it with a
``triton://host:port`` teacher; this client gives it the surface of ``TeacherClient``:
``score(images, sentences) -> [i][j] TeacherScore`` and ``model_info()``. It imports no torch.

The endpoint's shape scheme is read once from the model config, so the client talks to both
KServe v2 servers of the project:

- ``max_batch_size > 0`` (Triton with ``deploy/triton/model_repository/blip_itm``): one batch
  element per pair, IMAGE and TEXT [N, 1], at most ``max_batch_size`` pairs per request;
- ``max_batch_size == 0`` (the teacher's own endpoint, ``teacher_server/kserve.py``): [N].

``score(..., regions=[...])`` scores image i's sentences on the human-object pair ``regions[i]``
(a ``Region``, 8 numbers, or None for the whole image): the requests then carry the optional
``REGION`` input, FP32 [N, 8], one row per pair (eight zeros for a pair on the whole image).

A call sends every distinct (image, region, sentence) pair once, the pairs of one image adjacent (the
model encodes each image of a batch once), in requests of at most ``pairs_per_request`` pairs and
about ``max_request_bytes``, with up to ``concurrency`` requests in flight so that Triton's
dynamic batcher can merge them. UNAVAILABLE and RESOURCE_EXHAUSTED are retried with back-off
within the call's time budget; a failure raises ``TeacherRpcError`` as ``TeacherClient`` does
(INVALID_ARGUMENT carries the server's message naming the tensor element and the limit).
Triton keeps no score cache: every score has ``cached=False``. Example::

    with TritonTeacherClient("triton://localhost:8001") as teacher:
        scores = teacher.score(["cat.jpg"], [["a person pet a cat", "a person ride a cat"]])

Which weights answer: Triton's API only shows the configured parameters of a Python-backend
model (``HOIDISTILL_*`` variables of the server may override them); ``blip_itm`` publishes what it
loaded, fingerprint included, as the ``hoidistill_teacher_model_info`` metric, which
``model_info()`` reads when the client is given ``metrics_url``.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from teacher_server.client import (
    ImageSource,
    RegionSource,
    TeacherRpcError,
    TeacherScore,
    _remaining,  # the same deadline and back-off rules as TeacherClient
    _Retry,
    as_region,
    load_image,
)
from teacher_server.errors import TeacherError
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.region import REGION_VALUES, Region, view_id

T = TypeVar("T")
SCHEME = "triton://"
DEFAULT_GRPC_PORT = 8001  # Triton's default gRPC port
DEFAULT_MODEL = "blip_itm"
IMAGE, TEXT, REGION = "IMAGE", "TEXT", "REGION"
MATCH_PROB, MATCH_LOGIT = "MATCH_PROB", "MATCH_LOGIT"
# Pairs per request for an endpoint without a batch dimension (the teacher's own server allows
# 64 images per request by default, and a request of 64 pairs never holds more).
UNBATCHED_PAIRS_PER_REQUEST = 64
MODEL_INFO_METRIC = "hoidistill_teacher_model_info"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_triton_url(url: str) -> str:
    """``triton://host:port`` or ``host:port`` -> ``host:port`` (port 8001 when left out)."""
    if url.startswith(SCHEME):
        address = url[len(SCHEME) :].rstrip("/")
    elif "://" in url:
        raise ValueError(
            f"Triton url {url!r}: use triton://host:port or host:port "
            "(grpc:// and grpcs:// name the teacher's native API: use TeacherClient)"
        )
    else:
        address = url
    if not address:
        raise ValueError(f"Triton url {url!r} has no host")
    if not re.search(r":\d+$", address):
        address = f"{address}:{DEFAULT_GRPC_PORT}"
    return address


@dataclass(frozen=True)
class TritonModelInfo:
    """What a KServe v2 endpoint says about the teacher model.

    ``model_id``, ``dtype``, ``itm_start_token``, ``region_policy`` and ``limits`` are what the model loaded when
    the server publishes it (config parameters of the teacher's own server, or the
    ``hoidistill_teacher_model_info`` metric of Triton's ``blip_itm``), else the configured
    values. ``fingerprint`` is None when unknown (Triton without ``metrics_url``), and any of
    them is None when the instances disagree (see ``instances``).
    """

    model_name: str
    version: str
    ready: bool
    max_batch_size: int  # 0: the endpoint takes [N] tensors, without a batch dimension
    model_id: str | None
    fingerprint: str | None
    itm_start_token: str | None
    dtype: str | None
    limits: dict[str, int]
    parameters: dict[str, str]  # the model config's parameters as served
    instances: tuple[dict[str, str], ...] = ()  # labels of the model_info metric, one per instance
    region_policy: str | None = None  # how a REGION is shown to the model: crop:margin=0.1, mask:dim=0.8
    regions: bool = False  # the model declares the optional REGION input


@dataclass(frozen=True)
class _Layout:
    """How requests to this endpoint are shaped."""

    batched: bool  # [N, 1] (True) or [N]
    pairs_per_request: int
    max_batch_size: int
    regions: bool  # the model declares the optional REGION input


def _rpc_error(error: InferenceServerException) -> TeacherRpcError:
    """tritonclient's exception -> ``TeacherRpcError`` with the gRPC status code."""
    name = (error.status() or "").rpartition(".")[2]
    code = grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    return TeacherRpcError(code, error.message() or str(error))


def parse_model_info_metric(text: str, model: str) -> tuple[dict[str, str], ...]:
    """Label sets of the ``hoidistill_teacher_model_info`` samples of ``model`` in Prometheus text."""
    instances = []
    for line in text.splitlines():
        if not line.startswith(MODEL_INFO_METRIC + "{"):
            continue
        labels = {key: value.replace('\\"', '"').replace("\\\\", "\\") for key, value in _LABEL.findall(line)}
        if labels.get("model") == model:
            instances.append(labels)
    return tuple(sorted(instances, key=lambda labels: labels.get("instance", "")))


def check_teacher_config(config: dict[str, Any], where: str) -> None:
    """Refuse a model config (``get_model_config(as_json=True)["config"]``) without the teacher's tensors."""
    declared = [*config.get("input", []), *config.get("output", [])]
    tensors = {tensor["name"]: tensor.get("data_type") for tensor in declared}
    wanted = {IMAGE: "TYPE_STRING", TEXT: "TYPE_STRING", MATCH_PROB: "TYPE_FP32", MATCH_LOGIT: "TYPE_FP32"}
    wrong = [f"{name} ({kind})" for name, kind in wanted.items() if tensors.get(name) != kind]
    if wrong:
        has = ", ".join(f"{name} ({kind})" for name, kind in tensors.items()) or "no tensors"
        raise TeacherError(f"{where} is not the teacher: it lacks {', '.join(wrong)}; it has {has}")


def _chunks(sizes: Sequence[int], max_pairs: int, max_bytes: int) -> list[range]:
    """Consecutive index ranges of at most ``max_pairs`` pairs and ``max_bytes`` (one pair may exceed it)."""
    chunks: list[range] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start >= max_pairs or total + size > max_bytes):
            chunks.append(range(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks


class TritonTeacherClient:
    """Blocking client of ``blip_itm`` over KServe v2 gRPC (Triton or the teacher's own server). Thread-safe.

    ``url``: ``triton://host:port`` or ``host:port``. ``token`` is sent as ``authorization:
    Bearer`` (the teacher's own server checks it; put Triton behind a proxy that does).
    ``timeout_s`` bounds each call, retries included. ``pairs_per_request`` defaults to the
    model's ``max_batch_size`` (64 without a batch dimension). ``metrics_url``: Triton's metrics
    endpoint (``http://host:8002/metrics``), read by ``model_info`` for the fingerprint.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str = DEFAULT_MODEL,
        version: str = "",
        token: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.2,
        pairs_per_request: int | None = None,
        max_request_bytes: int = 32 * 1024 * 1024,
        concurrency: int = 4,
        metrics_url: str | None = None,
    ) -> None:
        if pairs_per_request is not None and pairs_per_request < 1:
            raise ValueError(f"pairs_per_request must be >= 1, not {pairs_per_request}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        self.address = parse_triton_url(url)
        self.model = model
        self.version = version
        self.timeout_s = timeout_s
        self.metrics_url = metrics_url
        self._headers = {"authorization": f"Bearer {token}"} if token else None
        self._retry = _Retry(max_retries, backoff_s)
        self._pairs_per_request = pairs_per_request
        self._max_request_bytes = max_request_bytes
        self._client = triton.InferenceServerClient(url=self.address)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="triton-teacher")
        self._layout: _Layout | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> TritonTeacherClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    # ---------------------------------------------------------------------------------- calls
    def _call(self, once: Callable[[float], T], deadline: float) -> T:
        """``once(remaining_s)`` with retries on UNAVAILABLE / RESOURCE_EXHAUSTED until the deadline."""
        attempt = 0
        while True:
            try:
                return once(_remaining(deadline))
            except InferenceServerException as exc:
                error = _rpc_error(exc)
            wait = self._retry.delay(attempt, error, deadline)
            if wait is None:
                raise error
            time.sleep(wait)
            attempt += 1

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    def _config(self, deadline: float) -> dict[str, Any]:
        response = self._call(
            lambda remaining: self._client.get_model_config(
                self.model, self.version, headers=self._headers, as_json=True, client_timeout=remaining
            ),
            deadline,
        )
        return response["config"]

    def _layout_for(self, deadline: float) -> _Layout:
        """The endpoint's shape scheme (asked once); refuses a model without the teacher's tensors."""
        with self._lock:
            if self._layout is None:
                config = self._config(deadline)
                check_teacher_config(config, f"model {self.model!r} at {self.address}")
                max_batch = int(config.get("max_batch_size", 0))
                per_request = self._pairs_per_request or (max_batch or UNBATCHED_PAIRS_PER_REQUEST)
                if max_batch:
                    per_request = min(per_request, max_batch)  # Triton refuses larger requests
                declared = {tensor.get("name"): tensor for tensor in config.get("input", [])}
                has_region = declared.get(REGION, {}).get("data_type") == "TYPE_FP32"
                self._layout = _Layout(max_batch > 0, per_request, max_batch, has_region)
            return self._layout

    # ------------------------------------------------------------------------------ model info
    def model_info(self, *, timeout_s: float | None = None) -> TritonModelInfo:
        """Readiness, shape scheme, configured parameters and (with ``metrics_url``) the fingerprint."""
        deadline = self._deadline(timeout_s)
        ready = self._call(
            lambda remaining: self._client.is_model_ready(
                self.model, self.version, headers=self._headers, client_timeout=remaining
            ),
            deadline,
        )
        metadata = self._call(
            lambda remaining: self._client.get_model_metadata(
                self.model, self.version, headers=self._headers, as_json=True, client_timeout=remaining
            ),
            deadline,
        )
        config = self._config(deadline)
        served = config.get("parameters", {})
        parameters = {key: value.get("string_value", "") for key, value in served.items()}
        instances = self._model_info_metric(deadline) if self.metrics_url else ()

        def agreed(key: str) -> str | None:
            """The instances' value when they all report one, else the configured parameter."""
            values = {instance[key] for instance in instances if key in instance}
            if len(values) == 1:
                return next(iter(values))
            return None if len(values) > 1 else parameters.get(key) or None

        max_batch = int(config.get("max_batch_size", 0))
        limits = {}
        for key in sorted({*parameters, *(key for instance in instances for key in instance)}):
            value = agreed(key) if key.startswith("max_") else None
            if value is not None and value.isdigit():
                limits[key] = int(value)
        if max_batch:
            limits["max_pairs_per_request"] = max_batch
        versions = metadata.get("versions") or [self.version or ""]
        return TritonModelInfo(
            model_name=metadata.get("name", self.model),
            version=self.version or max(versions, key=lambda v: int(v) if v.isdigit() else -1),
            ready=bool(ready),
            max_batch_size=max_batch,
            model_id=agreed("model_id") or parameters.get("model") or None,
            fingerprint=agreed("fingerprint"),
            itm_start_token=agreed("itm_start_token"),
            dtype=agreed("dtype"),
            limits=limits,
            parameters=parameters,
            instances=instances,
            region_policy=agreed("region_policy"),
            regions=any(
                tensor.get("name") == REGION and tensor.get("data_type") == "TYPE_FP32"
                for tensor in config.get("input", [])
            ),
        )

    def _model_info_metric(self, deadline: float) -> tuple[dict[str, str], ...]:
        assert self.metrics_url is not None
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=_remaining(deadline)) as response:
                text = response.read().decode("utf-8", errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            raise TeacherError(f"metrics_url {self.metrics_url}: cannot read the metrics ({exc})") from exc
        return parse_model_info_metric(text, self.model)

    # ----------------------------------------------------------------------------------- score
    def score(
        self,
        images: Sequence[ImageSource],
        sentences: Sequence[Sequence[str]],
        *,
        timeout_s: float | None = None,
        regions: Sequence[RegionSource] | None = None,
    ) -> list[list[TeacherScore]]:
        """Scores of ``sentences[i][j]`` against ``images[i]`` (bytes or a file path), as ``[i][j]``.

        ``regions[i]`` (optional): score image i's sentences on that human-object pair (a
        ``Region`` or 8 numbers, human box then object box, pixels of the original image) instead
        of the whole image (None). Raises ``TeacherError`` when the model has no REGION input.
        """
        if len(images) != len(sentences):
            raise ValueError(f"{len(images)} images but {len(sentences)} sentence lists: one list per image")
        if regions is not None and len(regions) != len(images):
            raise ValueError(f"{len(images)} images but {len(regions)} regions: one region (or None) per image")
        parsed = [
            as_region(region, field=f"regions[{index}]") for index, region in enumerate(regions or [None] * len(images))
        ]
        groups: list[tuple[str, ...]] = []
        for index, group in enumerate(sentences):
            if isinstance(group, str):
                raise ValueError(f"sentences[{index}] is a str; pass a list of sentences per image")
            for position, sentence in enumerate(group):
                if not isinstance(sentence, str):
                    kind = type(sentence).__name__
                    raise ValueError(f"sentences[{index}][{position}] is a {kind}, not a str")
            groups.append(tuple(group))
        if not any(groups):
            return [[] for _ in groups]
        deadline = self._deadline(timeout_s)
        blobs = [load_image(image, index) for index, image in enumerate(images)]
        # Keyed by view (digest and canonical region), as the server and its cache key them.
        views = [view_id(image_digest(blob), region) for blob, region in zip(blobs, parsed, strict=True)]

        # Each distinct (view, sentence) pair once, image-major: an image's pairs stay together.
        slot: dict[tuple[str, str], int] = {}
        pair_images: list[bytes] = []
        pair_texts: list[bytes] = []
        pair_regions: list[Region | None] = []
        for blob, view, region, group in zip(blobs, views, parsed, groups, strict=True):
            for sentence in group:
                if (view, sentence) not in slot:
                    slot[(view, sentence)] = len(pair_images)
                    pair_images.append(blob)
                    pair_texts.append(sentence.encode("utf-8"))
                    pair_regions.append(region)

        layout = self._layout_for(deadline)
        with_regions = any(region is not None for region in parsed)
        if with_regions and not layout.regions:
            raise TeacherError(
                f"model {self.model!r} at {self.address} has no {REGION} input (FP32 [N, {REGION_VALUES}]): "
                "it cannot score regions; update its model repository or score whole images"
            )
        sizes = [len(image) + len(text) + 8 for image, text in zip(pair_images, pair_texts, strict=True)]
        chunks = _chunks(sizes, layout.pairs_per_request, self._max_request_bytes)

        def run(chunk: range) -> tuple[np.ndarray, np.ndarray]:
            return self._infer(
                pair_images[chunk.start : chunk.stop],
                pair_texts[chunk.start : chunk.stop],
                pair_regions[chunk.start : chunk.stop] if with_regions else None,
                layout,
                deadline,
            )

        # One request runs here; several run concurrently, for Triton's dynamic batcher to merge.
        answers = [run(chunks[0])] if len(chunks) == 1 else list(self._pool.map(run, chunks))
        probs = np.concatenate([probs for probs, _ in answers])
        logits = np.concatenate([logits for _, logits in answers])
        return [
            [TeacherScore(float(logits[slot[(view, s)]]), float(probs[slot[(view, s)]]), cached=False) for s in group]
            for view, group in zip(views, groups, strict=True)
        ]

    def _infer(
        self,
        images: list[bytes],
        texts: list[bytes],
        regions: list[Region | None] | None,
        layout: _Layout,
        deadline: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One ModelInfer of len(images) pairs -> (MATCH_PROB, MATCH_LOGIT), each (n,) float32."""
        count = len(images)
        shape = [count, 1] if layout.batched else [count]
        inputs = [triton.InferInput(IMAGE, shape, "BYTES"), triton.InferInput(TEXT, shape, "BYTES")]
        for tensor, values in zip(inputs, (images, texts), strict=True):
            array = np.empty(count, dtype=np.object_)
            array[:] = values  # element-wise: np.array() would turn equal-length bytes into an 'S' array
            tensor.set_data_from_numpy(array.reshape(shape))
        if regions is not None:
            # [N, 8] in both layouts (Triton's batch dimension is the pair list); zeros = whole image.
            rows = np.zeros((count, REGION_VALUES), dtype=np.float32)
            for row, region in zip(rows, regions, strict=True):
                if region is not None:
                    row[:] = region.values()
            region_input = triton.InferInput(REGION, [count, REGION_VALUES], "FP32")
            region_input.set_data_from_numpy(rows)
            inputs.append(region_input)
        outputs = [triton.InferRequestedOutput(MATCH_PROB), triton.InferRequestedOutput(MATCH_LOGIT)]
        result = self._call(
            lambda remaining: self._client.infer(
                self.model,
                inputs,
                model_version=self.version,
                outputs=outputs,
                headers=self._headers,
                client_timeout=remaining,
            ),
            deadline,
        )
        probs, logits = (result.as_numpy(name) for name in (MATCH_PROB, MATCH_LOGIT))
        if probs is None or logits is None or probs.size != count or logits.size != count:
            raise TeacherRpcError(
                grpc.StatusCode.INTERNAL,
                f"{self.model} answered {None if probs is None else probs.size} scores for {count} pairs",
            )
        return probs.reshape(count).astype(np.float32), logits.reshape(count).astype(np.float32)
