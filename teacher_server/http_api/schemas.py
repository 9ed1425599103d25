"""The HTTP API's request and response models, and what its OpenAPI says about bodies and errors.

The routes read their bodies themselves (JSON with a base64 image, or a multipart form with the
file), so FastAPI cannot infer the request bodies from a parameter: ``request_body`` hands them to
each route's ``openapi_extra``, the JSON one by reference to its model, the form one inline from a
form model. ``MODELS`` lists the models only such references name; ``routes`` adds them to the
schema's components.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

MAX_TIMEOUT_MS = 3_600_000


class ErrorDetail(BaseModel):
    """What went wrong, where, and the limit or what would be right."""

    status: int = Field(description="HTTP status code", examples=[422])
    code: str = Field(
        description="status name, as the gRPC API's code (INVALID_ARGUMENT, ...)",
        examples=["INVALID_ARGUMENT"],
    )
    field: str | None = Field(None, description="request field at fault", examples=["sentences[1]"])
    message: str = Field(description="what was wrong, where, and the limit or what would be right")
    retry_after_ms: int | None = Field(None, description="when to retry (429, 503)")


class ErrorResponse(BaseModel):
    """Body of every answer other than 200."""

    error: ErrorDetail


_BOX_DESCRIPTION = "[x1, y1, x2, y2] in pixels of the original image (x1 < x2, y1 < y2, inside the image)"


class RegionBody(BaseModel):
    """A human-object pair of the image: its sentences are scored on this pair, not the whole image.

    How the teacher shows the pair to BLIP (``crop`` of the union box, or ``mask``: the rest
    dimmed) is the server's ``region_policy`` (``GET /v1/model``).
    """

    model_config = ConfigDict(extra="forbid")

    human_box: list[float] = Field(
        min_length=4, max_length=4, description="the person: " + _BOX_DESCRIPTION, examples=[[12, 30, 140, 260]]
    )
    object_box: list[float] = Field(
        min_length=4, max_length=4, description="the object: " + _BOX_DESCRIPTION, examples=[[60, 120, 300, 310]]
    )

    def values(self) -> list[float]:
        """The eight numbers, human box first (``Region.from_values`` order)."""
        return [*self.human_box, *self.object_box]


_REGION_FIELD = Field(
    None,
    description="score on this human-object pair (boxes in pixels of the original image); "
    "leave it out (or null) for the whole image",
)


class SentencesFields(BaseModel):
    """The sentences of a score request (validates a multipart form's fields but the image)."""

    model_config = ConfigDict(extra="forbid")

    sentences: list[str] = Field(
        description="sentences to match against the image, 1 to max_sentences_per_image (GET /v1/model)",
        examples=[["a person ride a horse", "a person feed a horse"]],
    )
    region: RegionBody | None = _REGION_FIELD


_IMAGE_FIELD = Field(
    description="the image file (JPEG, PNG, ...) in standard base64; line breaks and a data: URL prefix are accepted",
    examples=["iVBORw0KGgo..."],
)


class ScoreRequest(SentencesFields):
    """JSON body of ``POST /v1/score``."""

    image: str = _IMAGE_FIELD


class Triplet(BaseModel):
    """A (person, verb, object) triplet, e.g. {"verb": "ride", "object": "horse"}."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    verb: str = Field(description="verb name (HICO-DET, V-COCO or any): ride, hop_on, sit_instr", examples=["ride"])
    obj: str | None = Field(
        None,
        alias="object",
        description="object name; null for an action without object (a person walk)",
        examples=["horse"],
    )


class TripletsFields(BaseModel):
    """The triplets and variant of a triplets request (validates a form's fields but the image)."""

    model_config = ConfigDict(extra="forbid")

    triplets: list[Triplet | str] = Field(
        description='triplets as objects or as text "verb object" (first word = verb, e.g. "ride horse", '
        '"hop_on airplane", "walk") or "verb, object" (e.g. "hop on, sports ball")',
        examples=[[{"verb": "ride", "object": "horse"}, "feed horse"]],
    )
    variant: Literal["full", "verb", "object"] = Field(
        "full", description="prompt variant of teacher_server.hoi.prompts.triplet_sentence"
    )
    region: RegionBody | None = _REGION_FIELD


class TripletsRequest(TripletsFields):
    """JSON body of ``POST /v1/score/triplets``."""

    image: str = _IMAGE_FIELD


class ModelSummary(BaseModel):
    """The model that answered (scores compare only within one fingerprint)."""

    model_id: str
    fingerprint: str = Field(description="prefixes every cache key: scores are only comparable within one")
    itm_start_token: str
    dtype: str
    region_policy: str = Field(description="how a region is shown to the model (crop:margin=0.1, mask:dim=0.8)")


class ImageSummary(BaseModel):
    """How the teacher addressed the image."""

    digest: str = Field(description="SHA-256 hex of the image file bytes (how the teacher addresses images)")
    size_bytes: int


class SentenceScore(BaseModel):
    """The score of one sentence."""

    index: int = Field(description="position of the sentence in the request")
    sentence: str
    match_prob: float = Field(description="softmax of the ITM logits, match class")
    match_logit: float = Field(description="ITM logit margin z = l_match - l_nomatch")
    cached: bool = Field(description="answered from the score cache")


class TripletScore(SentenceScore):
    """The score of one triplet, with the sentence made of it."""

    model_config = ConfigDict(populate_by_name=True)

    verb: str
    obj: str | None = Field(alias="object")


_SCORED_REGION = Field(description="the human-object pair the scores are for; null: the whole image")


class ScoreResponse(BaseModel):
    """Scores of the sentences against the image (or the pair of ``region``)."""

    model: ModelSummary
    image: ImageSummary
    region: RegionBody | None = _SCORED_REGION
    scores: list[SentenceScore]


class TripletsResponse(BaseModel):
    """Scores of the triplets against the image, with the sentence made of each."""

    model: ModelSummary
    image: ImageSummary
    region: RegionBody | None = _SCORED_REGION
    variant: str
    scores: list[TripletScore]


_FORM_REGION = Field(
    None,
    description="optional human-object pair as JSON text, as in the JSON body: "
    '{"human_box": [x1, y1, x2, y2], "object_box": [x1, y1, x2, y2]} (pixels of the original image)',
    examples=['{"human_box": [12, 30, 140, 260], "object_box": [60, 120, 300, 310]}'],
)


class ScoreForm(BaseModel):
    """Multipart form: the image file, the sentences and optionally a region."""

    image: bytes = Field(description="the image file")
    sentences: list[str] = Field(description="one sentence per field (repeat the field)")
    region: str | None = _FORM_REGION


class TripletsForm(BaseModel):
    """Multipart form: the image file, the triplets and the prompt variant."""

    image: bytes = Field(description="the image file")
    triplets: list[str] = Field(description='one "verb object" per field (repeat the field)')
    variant: Literal["full", "verb", "object"] = "full"
    region: str | None = _FORM_REGION


ExplainFormat = Literal["json", "png"]


class ExplainFields(BaseModel):
    """The fields of an evidence-map request but the image (validates a form's fields too)."""

    model_config = ConfigDict(extra="forbid")

    sentences: list[str] = Field(
        description="sentences whose evidence to map, 1 to explain_max_sentences (default 8); a PNG answer "
        "shows one sentence",
        examples=[["a person ride a horse"]],
    )
    region: RegionBody | None = Field(
        None,
        description="map the evidence of this human-object pair, as the teacher scores it (boxes in pixels of the "
        "original image); leave it out (or null) for the whole image",
    )
    layer: int | None = Field(
        None,
        description="text layer whose cross-attention is read (0 = first, -1 = last); null: the server's "
        "explain_layer (GET /v1/model)",
        examples=[None],
    )
    format: ExplainFormat | None = Field(
        None,
        description="json: the patch grid; png: the map drawn over the image. Null: png when the Accept header "
        "asks for image/png, else json",
    )


class ExplainRequest(ExplainFields):
    """JSON body of ``POST /v1/explain``."""

    image: str = _IMAGE_FIELD


class SentenceMap(BaseModel):
    """The evidence map of one sentence."""

    index: int = Field(description="position of the sentence in the request")
    sentence: str
    match_prob: float = Field(description="softmax of the ITM logits, match class (as POST /v1/score)")
    match_logit: float = Field(description="ITM logit margin z = l_match - l_nomatch")
    grid: list[list[float]] = Field(
        description="rows x cols values in [0, 1] over the image patches, row 0 at the top: the Grad-CAM of the "
        "match logit, divided by its maximum"
    )


class ExplainResponse(BaseModel):
    """Evidence maps of the sentences over the patch grid of the view the model saw."""

    model: ModelSummary
    image: ImageSummary
    region: RegionBody | None = Field(description="the human-object pair the maps are for; null: the whole image")
    layer: int = Field(description="the text layer read (0-based)")
    target: str = Field(description="what the Grad-CAM differentiates: match_logit (l_match)")
    rows: int = Field(description="patch rows (image_size / patch_size)")
    cols: int
    view_box: list[int] = Field(
        description="[x1, y1, x2, y2] of the original image that the model saw and the grid covers: the whole "
        "image, or the region's crop under the crop policy",
        examples=[[0, 0, 640, 480]],
    )
    maps: list[SentenceMap]


class ExplainForm(BaseModel):
    """Multipart form: the image file, the sentences, optionally a region, layer and format."""

    image: bytes = Field(description="the image file")
    sentences: list[str] = Field(description="one sentence per field (repeat the field)")
    region: str | None = _FORM_REGION
    layer: int | None = None
    format: ExplainFormat | None = None


# Models that only ``request_body`` references name, for the schema's components.
MODELS: tuple[type[BaseModel], ...] = (ScoreRequest, TripletsRequest, ExplainRequest)

SortOrder = Literal["given", "desc"]
SORT_QUERY = Query("given", description="given: in request order; desc: ranked by match_prob, highest first")
TIMEOUT_QUERY = Query(None, ge=1, le=MAX_TIMEOUT_MS, description="deadline for scoring (milliseconds); 504 past it")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (401, "missing or wrong bearer token"),
        (413, "over a size limit (image bytes or pixels, sentences per image, request body)"),
        (415, "request body is neither application/json nor multipart/form-data"),
        (422, "invalid request field (named in error.field)"),
        (429, "queue full; retry after Retry-After seconds"),
        (503, "starting or draining; retry after Retry-After seconds"),
        (504, "deadline (timeout_ms) passed before scoring finished"),
    )
}


def request_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that takes ``json_model`` as JSON or ``form_model`` as a form."""
    form = form_model.model_json_schema()
    form.pop("title", None)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
                "multipart/form-data": {"schema": form},
            },
        }
    }
