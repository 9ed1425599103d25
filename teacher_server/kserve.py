"""KServe v2 / Triton gRPC protocol (``inference.GRPCInferenceService``) for the teacher.

One model, ``blip_itm``: inputs ``IMAGE`` (BYTES, [N], encoded image files) and ``TEXT`` (BYTES,
[N], UTF-8 sentences); outputs ``MATCH_PROB`` and ``MATCH_LOGIT`` (FP32, [N]); pair i is
(IMAGE[i], TEXT[i]). The optional input ``REGION`` (FP32, [N, 8]) scores pair i on a human-object
pair of its image: row i is the human box then the object box, ``x1, y1, x2, y2`` in pixels of
the original image; a row of eight zeros is the whole image (so one request can mix both).
Pairs are grouped by view (image digest and region) before they reach the service, so a
repeated image is decoded once, each view encoded once, and repeated pairs scored once.
The servicer subclasses the one ``tritonclient`` ships, so ``tritonclient.grpc`` and
``perf_analyzer`` talk to it unchanged. Methods it does not implement answer UNIMPLEMENTED.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kv2
from tritonclient.grpc import service_pb2_grpc as kv2_grpc

from teacher_server.errors import InvalidInputError
from teacher_server.grpc_api import (
    DEFAULT_STREAM_INFLIGHT,
    Drain,
    RpcFailure,
    ServiceUnavailableError,
    Undecodable,
    abort,
    add_lenient_service,
    answer_stream,
    deadline_s,
    rpc_failure,
    unavailable_reason,
    undecodable_failure,
)
from teacher_server.hoi.digest import image_digest
from teacher_server.hoi.region import REGION_VALUES, Region, view_id
from teacher_server.service import ScoreItem

if TYPE_CHECKING:
    from teacher_server.service import ItemResult, ScoringService

SERVICE = kv2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name  # inference.GRPCInferenceService
MODEL_NAME = "blip_itm"
MODEL_VERSION = "1"
SERVER_NAME = "hoidistill-teacher"
PLATFORM = "hoidistill_blip_itm"
IMAGE, TEXT, REGION = "IMAGE", "TEXT", "REGION"
MATCH_PROB, MATCH_LOGIT = "MATCH_PROB", "MATCH_LOGIT"
INPUTS = (IMAGE, TEXT)  # required, BYTES [N]
OPTIONAL_INPUTS = (REGION,)  # FP32 [N, 8]
OUTPUTS = (MATCH_PROB, MATCH_LOGIT)
_LENGTH_PREFIX = struct.Struct("<I")
_TAKES = f"model {MODEL_NAME} takes {IMAGE} and {TEXT}, and optionally {REGION}"
# Named in the error for a request that does not parse (they must be UTF-8).
_STRING_FIELDS = "model_name, model_version, id, inputs[].name, inputs[].datatype and outputs[].name"


def _invalid(field_name: str, message: str, *, too_large: bool = False) -> InvalidInputError:
    return InvalidInputError(field_name, message, too_large=too_large)


def decode_bytes_tensor(raw: bytes, count: int, name: str) -> list[bytes]:
    """Split a raw BYTES tensor: each element is a 4-byte little-endian length, then that many bytes."""
    elements: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if len(elements) == count:  # stop here: zero-length prefixes would make millions of elements
            plural = "element" if count == 1 else "elements"
            raise _invalid(name, f"raw contents hold more than the {count} {plural} the shape says")
        if offset + 4 > len(raw):
            raise _invalid(name, f"raw BYTES contents end inside the length prefix of element {len(elements)}")
        (length,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _invalid(
                name,
                f"raw BYTES element {len(elements)} claims {length:,} bytes but only {len(raw) - offset:,} remain",
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise _invalid(name, f"raw contents hold {len(elements)} elements but the shape says {count}")
    return elements


def read_inputs(request: kv2.ModelInferRequest, max_pairs: int | None = None) -> dict[str, list[bytes]]:
    """The IMAGE and TEXT tensors of a request as lists of byte strings (checked: names, types, shapes).

    ``max_pairs``: the most elements a tensor may claim, checked on its shape before its contents
    are split (None: no limit). REGION, when given, is only checked for being given once here;
    ``read_regions`` reads it.
    """
    names = [tensor.name for tensor in request.inputs]
    unknown = [name for name in names if name not in INPUTS + OPTIONAL_INPUTS]
    if unknown:
        raise _invalid(unknown[0], f"unknown input; {_TAKES}")
    for name in INPUTS + OPTIONAL_INPUTS:
        if names.count(name) > 1 or (name in INPUTS and name not in names):
            problem = "missing" if name not in names else "given more than once"
            raise _invalid(name, f"input {problem}; {_TAKES}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise _invalid(
            "raw_input_contents",
            f"{len(raw)} raw buffers for {len(request.inputs)} inputs; send one per input or none",
        )
    tensors: dict[str, list[bytes]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in OPTIONAL_INPUTS:
            continue
        if tensor.datatype != "BYTES":
            raise _invalid(
                tensor.name,
                f"datatype {tensor.datatype or '(unset)'} is not accepted; expected BYTES, shape [N]",
            )
        if len(tensor.shape) != 1 or tensor.shape[0] < 0:
            raise _invalid(tensor.name, f"shape {list(tensor.shape)} is not accepted; expected [N] (one dimension)")
        count = int(tensor.shape[0])
        if max_pairs is not None and count > max_pairs:
            raise _invalid(
                tensor.name,
                f"shape [{count}] is over the limit of {max_pairs:,} pairs per request "
                "(max_images_per_request x max_sentences_per_image)",
                too_large=True,
            )
        if raw:
            tensors[tensor.name] = decode_bytes_tensor(raw[index], count, tensor.name)
        else:
            contents = tensor.contents.bytes_contents
            if len(contents) != count:
                raise _invalid(tensor.name, f"contents hold {len(contents)} elements but the shape says [{count}]")
            tensors[tensor.name] = list(contents)
    images, texts = tensors[IMAGE], tensors[TEXT]
    if len(images) != len(texts):
        raise _invalid(
            f"{IMAGE}, {TEXT}",
            f"{IMAGE} has {len(images)} elements and {TEXT} has {len(texts)}; pair i is "
            f"({IMAGE}[i], {TEXT}[i]), so both need the same length",
        )
    return tensors


def read_regions(request: kv2.ModelInferRequest, count: int) -> list[Region | None] | None:
    """The REGION input as one region per pair (None: a row of zeros, the whole image), or None
    when the request has no REGION. ``count`` is the number of pairs (IMAGE's length).

    Raises ``InvalidInputError`` naming ``REGION`` (datatype, shape, contents) or the row and value
    (``REGION[5][2]``, ``REGION[5][0:4]`` for the human box).
    """
    found = [(index, tensor) for index, tensor in enumerate(request.inputs) if tensor.name == REGION]
    if not found:
        return None
    ((index, tensor),) = found  # read_inputs refused a repeated input
    expected = f"expected FP32, shape [N, {REGION_VALUES}] with N = {count} (the length of {IMAGE} and {TEXT})"
    if tensor.datatype != "FP32":
        raise _invalid(REGION, f"datatype {tensor.datatype or '(unset)'} is not accepted; {expected}")
    if list(tensor.shape) != [count, REGION_VALUES]:
        raise _invalid(REGION, f"shape {list(tensor.shape)} is not accepted; {expected}")
    raw = request.raw_input_contents
    if raw:
        data = raw[index]
        if len(data) != count * REGION_VALUES * 4:
            raise _invalid(
                REGION,
                f"raw contents hold {len(data):,} bytes; shape [{count}, {REGION_VALUES}] FP32 needs "
                f"{count * REGION_VALUES * 4:,}",
            )
        values = np.frombuffer(data, dtype="<f4")
    else:
        given = len(tensor.contents.fp32_contents)  # counted before converting: 64 MB took 0.75 s
        if given != count * REGION_VALUES:
            raise _invalid(
                REGION,
                f"contents hold {given} values but the shape [{count}, {REGION_VALUES}] says {count * REGION_VALUES}",
            )
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
    rows = values.reshape(count, REGION_VALUES).astype(np.float64)
    return [
        None if not row.any() else Region.from_values(row.tolist(), field=f"{REGION}[{pair}]")
        for pair, row in enumerate(rows)
    ]


def decode_texts(texts: Sequence[bytes]) -> list[str]:
    """UTF-8 sentences of the TEXT tensor; empty or undecodable elements are refused by index."""
    sentences = []
    for index, data in enumerate(texts):
        try:
            sentence = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _invalid(
                f"{TEXT}[{index}]", f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
            ) from None
        if not sentence.strip():
            raise _invalid(f"{TEXT}[{index}]", "sentence is empty; every TEXT element needs at least one word")
        sentences.append(sentence)
    return sentences


@dataclass
class PairPlan:
    """Pairs grouped by view: one service item per distinct (image, region), distinct sentences each."""

    items: list[ScoreItem] = field(default_factory=list)
    # For pair i: (item index, sentence index within the item).
    slots: list[tuple[int, int]] = field(default_factory=list)
    # For item k: the first pair index using it, and per sentence index the first pair index.
    first_pair_of_item: list[int] = field(default_factory=list)
    first_pair_of_sentence: list[list[int]] = field(default_factory=list)


def plan_pairs(
    images: Sequence[bytes], sentences: Sequence[str], regions: Sequence[Region | None] | None = None
) -> PairPlan:
    """Group (IMAGE[i], TEXT[i]) pairs by view: the image digest and ``regions[i]`` (None = the
    whole image), so two regions of one image are two items; duplicated pairs share one slot."""
    plan = PairPlan()
    pair_regions = list(regions) if regions is not None else [None] * len(images)
    item_of_view: dict[str, int] = {}
    digests: list[str] = []
    images_of_item: list[bytes] = []
    regions_of_item: list[Region | None] = []
    sentence_slots: list[dict[str, int]] = []
    for pair, (image, sentence, region) in enumerate(zip(images, sentences, pair_regions, strict=True)):
        if not image:
            raise _invalid(f"{IMAGE}[{pair}]", "image is empty (0 bytes); send the encoded image file")
        digest = image_digest(image)
        view = view_id(digest, region)
        item = item_of_view.get(view)
        if item is None:
            item = item_of_view[view] = len(digests)
            digests.append(digest)
            images_of_item.append(image)
            regions_of_item.append(region)
            sentence_slots.append({})
            plan.first_pair_of_item.append(pair)
            plan.first_pair_of_sentence.append([])
        slot = sentence_slots[item].get(sentence)
        if slot is None:
            slot = sentence_slots[item][sentence] = len(sentence_slots[item])
            plan.first_pair_of_sentence[item].append(pair)
        plan.slots.append((item, slot))
    plan.items = [
        ScoreItem(digest=digest, image=image, sentences=tuple(slots), region=region)
        for digest, image, slots, region in zip(digests, images_of_item, sentence_slots, regions_of_item, strict=True)
    ]
    return plan


_ITEM_FIELD = re.compile(r"^items\[(\d+)\]\.(\w+)(?:\[(\d+)\])?")


def tensor_field(exc: InvalidInputError, plan: PairPlan) -> InvalidInputError:
    """Rename the service's field (``items[1].sentences[0]``) to the tensor element (``TEXT[5]``;
    ``items[1].region[2]`` -> ``REGION[5][2]``)."""
    match = _ITEM_FIELD.match(exc.field)
    if exc.field == "items":
        name = f"{IMAGE} (distinct images)"
    elif match is None or int(match.group(1)) >= len(plan.items):
        return exc
    else:
        item, part, index = int(match.group(1)), match.group(2), match.group(3)
        if part == "sentences" and index is not None and int(index) < len(plan.first_pair_of_sentence[item]):
            name = f"{TEXT}[{plan.first_pair_of_sentence[item][int(index)]}]"
        elif part == "sentences":
            name = f"{TEXT} (sentences of {IMAGE}[{plan.first_pair_of_item[item]}])"
        elif part == "region":
            name = f"{REGION}[{plan.first_pair_of_item[item]}]" + exc.field[match.end(2) :]
        else:
            name = f"{IMAGE}[{plan.first_pair_of_item[item]}]"
    return InvalidInputError(name, exc.reason, too_large=exc.too_large)


def build_response(
    request: kv2.ModelInferRequest, plan: PairPlan, results: Sequence[ItemResult]
) -> kv2.ModelInferResponse:
    """MATCH_PROB / MATCH_LOGIT per pair (the requested ones, else both) as raw little-endian FP32."""
    if any(result.image_required for result in results):  # bytes were sent: the service must score
        raise RuntimeError("service answered image_required for an item sent with its bytes")
    logits = np.array([results[item].match_logit[slot] for item, slot in plan.slots], dtype="<f4")
    probs = np.array([results[item].match_prob[slot] for item, slot in plan.slots], dtype="<f4")
    values = {MATCH_PROB: probs, MATCH_LOGIT: logits}
    wanted = [output.name for output in request.outputs] or list(OUTPUTS)
    response = kv2.ModelInferResponse(model_name=MODEL_NAME, model_version=MODEL_VERSION, id=request.id)
    for name in wanted:
        response.outputs.add(name=name, datatype="FP32", shape=[len(plan.slots)])
        response.raw_output_contents.append(values[name].tobytes())
    return response


def check_outputs(request: kv2.ModelInferRequest) -> None:
    for index, output in enumerate(request.outputs):
        if output.name not in OUTPUTS:
            raise _invalid(
                f"outputs[{index}]", f"unknown output {output.name!r}; {MODEL_NAME} has {', '.join(OUTPUTS)}"
            )


@dataclass
class _Statistics:
    """What ModelStatistics reports: counts and summed durations of ModelInfer calls."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    pairs: int = 0
    last_ms: int = 0

    def record(self, ok: bool, elapsed_ns: int, pairs: int) -> None:
        if ok:
            self.success_count += 1
            self.success_ns += elapsed_ns
            self.pairs += pairs
        else:
            self.fail_count += 1
            self.fail_ns += elapsed_ns
        self.last_ms = int(time.time() * 1000)


class KServeServicer(kv2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 endpoints over ``ScoringService``; register with ``add_kserve_servicer``."""

    def __init__(
        self,
        service: ScoringService,
        *,
        drain: Drain | None = None,
        server_version: str = "0",
        stream_inflight: int = DEFAULT_STREAM_INFLIGHT,
    ) -> None:
        self._service = service
        self.drain = drain or Drain()
        self._server_version = server_version
        self._stream_inflight = stream_inflight
        self._stats = _Statistics()
        # No request can hold more distinct pairs; more pairs are duplicates, refused before the
        # tensors are split and every image hashed.
        limits = service.settings
        self._max_pairs = limits.max_images_per_request * limits.max_sentences_per_image

    # ------------------------------------------------------------------------------ server
    async def ServerLive(self, request: kv2.ServerLiveRequest, context: Any) -> kv2.ServerLiveResponse:
        return kv2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kv2.ServerReadyRequest, context: Any) -> kv2.ServerReadyResponse:
        return kv2.ServerReadyResponse(ready=unavailable_reason(self.drain, self._service) is None)

    async def ServerMetadata(self, request: kv2.ServerMetadataRequest, context: Any) -> kv2.ServerMetadataResponse:
        return kv2.ServerMetadataResponse(name=SERVER_NAME, version=self._server_version, extensions=[])

    # ------------------------------------------------------------------------------- model
    async def _check_model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        if name != MODEL_NAME:
            await abort(
                context,
                RpcFailure(
                    grpc.StatusCode.NOT_FOUND,
                    f"model_name: unknown model {name!r}; this server serves only {MODEL_NAME!r}",
                    field="model_name",
                ),
            )
        if version not in ("", MODEL_VERSION):
            await abort(
                context,
                RpcFailure(
                    grpc.StatusCode.NOT_FOUND,
                    f"model_version: {MODEL_NAME} has no version {version!r}; available: {MODEL_VERSION!r} "
                    "(or empty for the latest)",
                    field="model_version",
                ),
            )

    async def ModelReady(self, request: kv2.ModelReadyRequest, context: Any) -> kv2.ModelReadyResponse:
        # As Triton: an unknown model is simply not ready (probes must not error).
        known = request.name == MODEL_NAME and request.version in ("", MODEL_VERSION)
        return kv2.ModelReadyResponse(ready=known and unavailable_reason(self.drain, self._service) is None)

    async def ModelMetadata(self, request: kv2.ModelMetadataRequest, context: Any) -> kv2.ModelMetadataResponse:
        await self._check_model(request.name, request.version, context)
        tensor = kv2.ModelMetadataResponse.TensorMetadata
        return kv2.ModelMetadataResponse(
            name=MODEL_NAME,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[
                *(tensor(name=name, datatype="BYTES", shape=[-1]) for name in INPUTS),
                tensor(name=REGION, datatype="FP32", shape=[-1, REGION_VALUES]),  # optional: see ModelConfig
            ],
            outputs=[tensor(name=name, datatype="FP32", shape=[-1]) for name in OUTPUTS],
        )

    async def ModelConfig(self, request: kv2.ModelConfigRequest, context: Any) -> kv2.ModelConfigResponse:
        await self._check_model(request.name, request.version, context)
        info = self._service.model_info()
        parameters = {
            key: mc.ModelParameter(string_value=str(info[key]))
            for key in ("model_id", "fingerprint", "itm_start_token", "dtype", "region_policy")
            if key in info
        }
        config = mc.ModelConfig(
            name=MODEL_NAME,
            platform=PLATFORM,
            max_batch_size=0,  # the [N] dimension is the pair list itself, not a batch dimension
            input=[
                *(mc.ModelInput(name=name, data_type=mc.TYPE_STRING, dims=[-1]) for name in INPUTS),
                mc.ModelInput(name=REGION, data_type=mc.TYPE_FP32, dims=[-1, REGION_VALUES], optional=True),
            ],
            output=[mc.ModelOutput(name=name, data_type=mc.TYPE_FP32, dims=[-1]) for name in OUTPUTS],
            parameters=parameters,
        )
        return kv2.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: kv2.ModelStatisticsRequest, context: Any) -> kv2.ModelStatisticsResponse:
        if request.name:
            await self._check_model(request.name, request.version, context)
        stats = self._stats
        duration = kv2.StatisticDuration
        model = kv2.ModelStatistics(
            name=MODEL_NAME,
            version=MODEL_VERSION,
            last_inference=stats.last_ms,
            inference_count=stats.pairs,
            execution_count=stats.success_count,
            inference_stats=kv2.InferStatistics(
                success=duration(count=stats.success_count, ns=stats.success_ns),
                fail=duration(count=stats.fail_count, ns=stats.fail_ns),
            ),
        )
        return kv2.ModelStatisticsResponse(model_stats=[model])

    # ------------------------------------------------------------------------------- infer
    async def _infer(self, request: kv2.ModelInferRequest, context: grpc.aio.ServicerContext) -> kv2.ModelInferResponse:
        """Score one ModelInfer request; raises teacher errors (mapped by the callers)."""
        reason = unavailable_reason(self.drain, self._service)
        if reason is not None:
            raise ServiceUnavailableError(reason)
        tensors = read_inputs(request, self._max_pairs)
        regions = read_regions(request, len(tensors[IMAGE]))
        check_outputs(request)
        plan = plan_pairs(tensors[IMAGE], decode_texts(tensors[TEXT]), regions)
        if not plan.slots:
            return build_response(request, plan, [])
        try:
            results = await self._service.score(plan.items, timeout_s=deadline_s(0, context))
        except InvalidInputError as exc:
            raise tensor_field(exc, plan) from None
        return build_response(request, plan, results)

    async def ModelInfer(
        self, request: kv2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> kv2.ModelInferResponse:
        await self._check_model(request.model_name, request.model_version, context)
        started = time.perf_counter_ns()
        try:
            response = await self._infer(request, context)
        except Exception as exc:
            self._stats.record(False, time.perf_counter_ns() - started, 0)
            await abort(context, rpc_failure(exc, f"{SERVICE_NAME}/ModelInfer"))
        self._stats.record(
            True, time.perf_counter_ns() - started, response.outputs[0].shape[0] if response.outputs else 0
        )
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[kv2.ModelInferRequest | Undecodable], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv2.ModelStreamInferResponse]:
        async def answer(request: kv2.ModelInferRequest | Undecodable) -> kv2.ModelStreamInferResponse:
            if isinstance(request, Undecodable):  # answered in the stream, which stays open
                failure = undecodable_failure(request)
                return kv2.ModelStreamInferResponse(error_message=f"{failure.code.name}: {failure.message}")
            if request.model_name != MODEL_NAME or request.model_version not in ("", MODEL_VERSION):
                return kv2.ModelStreamInferResponse(
                    error_message=f"model_name: unknown model {request.model_name!r} version "
                    f"{request.model_version!r}; this server serves only {MODEL_NAME!r} "
                    f"version {MODEL_VERSION!r}",
                    infer_response=kv2.ModelInferResponse(id=request.id),
                )
            try:
                return kv2.ModelStreamInferResponse(infer_response=await self._infer(request, context))
            except Exception as exc:
                failure = rpc_failure(exc, f"{SERVICE_NAME}/ModelStreamInfer")
                return kv2.ModelStreamInferResponse(
                    error_message=f"{failure.code.name}: {failure.message}",
                    infer_response=kv2.ModelInferResponse(model_name=MODEL_NAME, id=request.id),
                )

        responses = answer_stream(
            request_iterator,
            answer,
            context,
            drain=self.drain,
            limit=self._stream_inflight,
            method=f"{SERVICE_NAME}/ModelStreamInfer",
        )
        async for response in responses:
            yield response


def _unimplemented(name: str) -> Any:
    async def method(self: KServeServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(
            context,
            RpcFailure(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{SERVICE_NAME}/{name} is not implemented by the hoi-distill teacher (one fixed model, "
                "no repository, no shared memory)",
            ),
        )

    method.__name__ = name
    return method


# The base class's defaults are synchronous; grpc.aio needs coroutines, so override them.
for _name in (
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
):
    setattr(KServeServicer, _name, _unimplemented(_name))


def add_kserve_servicer(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` under tritonclient's service and method names, with the native API's
    lenient parsing: bytes that are not a valid request are INVALID_ARGUMENT, never UNKNOWN, and
    one bad message does not end a ``ModelStreamInfer`` stream."""
    add_lenient_service(server, SERVICE, servicer, string_fields=_STRING_FIELDS)
