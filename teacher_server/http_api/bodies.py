"""Request bodies of the HTTP API: JSON (image in base64) or a multipart form (image as a file).

``parse_body`` reads either into the image bytes and the validated other fields, answering 415,
413 or 422 (``HttpError``) that name the field; ``request_region`` checks the optional ``region``
(a JSON object in both bodies: in a form, the text of one field); ``triplet_sentences`` turns the triplets of
``POST /v1/score/triplets`` into sentences with ``teacher_server.hoi.prompts.triplet_sentence``,
the student's own prompt function, so people score exactly the text distillation asks about.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from teacher_server.errors import InvalidInputError
from teacher_server.hoi.prompts import triplet_sentence
from teacher_server.hoi.region import Region
from teacher_server.http_api.errors import HttpError, invalid, region_field, validation_error
from teacher_server.http_api.schemas import RegionBody, Triplet

if TYPE_CHECKING:
    from teacher_server.settings import ServerSettings


@dataclass(frozen=True)
class ParsedBody:
    """A validated request: the decoded image file bytes and the other fields."""

    image: bytes
    fields: BaseModel


def decode_base64_image(text: str, max_bytes: int, field: str = "image") -> bytes:
    """Base64 text (wrapped lines and a ``data:...;base64,`` prefix accepted) -> image file bytes."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise invalid(field, "a data: URL must be base64-encoded (data:image/png;base64,...)")
    compact = "".join(text.split())  # `base64` wraps at 76 columns unless told -w0
    size = len(compact) * 3 // 4 - compact[-2:].count("=")
    if size > max_bytes:  # before decoding it
        raise invalid(field, f"image is {size:,} bytes, over the limit of {max_bytes:,} bytes", too_large=True)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(
            field, f"not valid base64 ({exc}); send the file in standard base64, e.g. `base64 -w0 image.jpg`"
        ) from None
    if not data:
        raise invalid(field, "image is empty (0 bytes)")
    return data


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def parse_body(
    request: Request,
    json_model: type[BaseModel],
    form_model: type[BaseModel],
    settings: ServerSettings,
    list_fields: frozenset[str],
) -> ParsedBody:
    """Read a JSON body (``json_model``, image in base64) or a multipart form (``form_model`` +
    an ``image`` file); raise ``HttpError`` 415 / 413 / 422 naming the field."""
    media = _media_type(request)
    if media == "application/json" or media.endswith("+json"):
        try:
            body = json_model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        image = await run_in_threadpool(decode_base64_image, body.image, settings.max_image_bytes)
        return ParsedBody(image, body)
    if media == "multipart/form-data":
        return await _parse_form(request, form_model, settings, list_fields)
    shown = media or "none"
    raise HttpError(
        415,
        f"Content-Type: expected application/json or multipart/form-data, got {shown!r}",
        field="Content-Type",
    )


async def _parse_form(
    request: Request, model: type[BaseModel], settings: ServerSettings, list_fields: frozenset[str]
) -> ParsedBody:
    # A few fields and files more than allowed, so that the service and ``_form_image`` name the
    # limit that was crossed (Starlette's own refusal does not say which field).
    max_fields = settings.max_sentences_per_image + 8
    try:
        form = await request.form(max_files=4, max_fields=max_fields, max_part_size=1024 * 1024)
    except StarletteHTTPException as exc:  # Starlette's multipart parser refused the body
        detail = str(exc.detail)
        raise invalid("body", f"malformed multipart form: {detail}", too_large=detail.startswith("Too many")) from None
    try:
        image = await _form_image(form, settings)
        values: dict[str, Any] = {}
        for key in form:
            if key == "image" or key in values:
                continue
            found = form.getlist(key)
            if any(isinstance(value, UploadFile) for value in found):
                raise invalid(key, "expected text, got a file; only 'image' is a file")
            if key in list_fields:
                values[key] = list(found)
            elif len(found) > 1:
                raise invalid(key, f"given {len(found)} times; give it once")
            elif key == REGION_FORM_FIELD:
                values[key] = _form_region(str(found[0]))
            else:
                values[key] = found[0]
        for key in list_fields:
            values.setdefault(key, [])  # an absent list field = an empty one; the service names the limit
        try:
            fields = model.model_validate(values)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        return ParsedBody(image, fields)
    finally:
        await form.close()


REGION_FORM_FIELD = "region"


def _form_region(text: str) -> Any:
    """A form's ``region`` field: the JSON object of the JSON body, as text (empty = none)."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(
            REGION_FORM_FIELD,
            f'not valid JSON ({exc.msg} at character {exc.pos}); expected {{"human_box": [x1, y1, x2, y2], '
            '"object_box": [x1, y1, x2, y2]}',
        ) from None


def request_region(body: RegionBody | None) -> Region | None:
    """The request's ``region`` as a ``Region`` (None = the whole image); 422 naming the box at fault.

    Whether it lies inside the image is known once the image is decoded (the service checks it).
    """
    if body is None:
        return None
    try:
        return Region.from_values(body.values(), field=REGION_FORM_FIELD)
    except InvalidInputError as exc:
        raise invalid(region_field(exc.field), exc.reason) from None


async def _form_image(form: FormData, settings: ServerSettings) -> bytes:
    images = form.getlist("image")
    if not images:
        raise invalid("image", "missing: send the image file as the form field 'image'")
    if len(images) > 1:
        raise invalid("image", f"{len(images)} images sent; this API scores one image per request", too_large=True)
    (image,) = images
    if isinstance(image, str):  # a text field: base64, as in the JSON body
        return await run_in_threadpool(decode_base64_image, image, settings.max_image_bytes)
    data = await image.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise invalid("image", f"image is over the limit of {settings.max_image_bytes:,} bytes", too_large=True)
    if not data:
        raise invalid("image", "image is empty (0 bytes)")
    return data


# ------------------------------------------------------------------------------------- triplets
def parse_triplet_text(text: str) -> tuple[str, str | None]:
    """``"ride horse"`` -> ("ride", "horse"); ``"hop on, airplane"`` -> ("hop on", "airplane");
    ``"ride sports ball"`` -> ("ride", "sports ball"); ``"walk"`` -> ("walk", None).

    Without a comma the first word is the verb (multi-word verbs keep their underscore:
    ``hop_on``); with one, the comma separates verb and object.
    """
    if "," in text:
        verb, _, obj = text.partition(",")
    else:
        verb, _, obj = text.strip().partition(" ")
    return verb.strip(), obj.strip() or None


@dataclass(frozen=True)
class TripletSentence:
    """A triplet as read from the request and the sentence made of it."""

    verb: str
    obj: str | None
    sentence: str


def triplet_sentences(triplets: Sequence[Triplet | str], variant: str) -> list[TripletSentence]:
    """Sentences of the triplets by ``teacher_server.hoi.prompts.triplet_sentence``; 422 naming ``triplets[i]``."""
    made = []
    for index, triplet in enumerate(triplets):
        name = f"triplets[{index}]"
        if isinstance(triplet, str):
            if not triplet.strip():
                raise invalid(name, 'empty triplet; write "verb object", e.g. "ride horse"')
            verb, obj = parse_triplet_text(triplet)
        else:
            verb, obj = triplet.verb.strip(), triplet.obj
            if not verb:
                raise invalid(f"{name}.verb", "verb is empty")
            if obj is not None:
                obj = obj.strip()
                if not obj:
                    raise invalid(
                        f"{name}.object",
                        "object is empty; leave it out (or null) for an action without object",
                    )
        try:
            sentence = triplet_sentence(verb, obj, variant)  # type: ignore[arg-type]
        except ValueError as exc:
            raise invalid(name, str(exc)) from None
        if sentence is None:
            why = (
                "'no_interaction' makes no sentence"
                if obj is not None or variant != "object"
                else "the 'object' variant needs an object"
            )
            raise invalid(name, f"{why}; leave this triplet out")
        made.append(TripletSentence(verb, obj, sentence))
    return made
