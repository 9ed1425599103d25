"""The routes of the HTTP API and the app that holds them (``create_app``).

- ``POST /v1/score``: an image (base64 in JSON, or a multipart file) and sentences -> scores; an
  optional ``region`` (human box, object box) scores them on that pair instead of the whole image.
- ``POST /v1/score/triplets``: an image and (verb, object) triplets, made into sentences by the
  student's own prompt function (``bodies.triplet_sentences``).
- ``POST /v1/explain``: an image, sentences and optionally a region -> evidence maps (the Grad-CAM
  of the ITM match logit over a text layer's cross-attention, ``teacher_server.explain``) as the
  patch grid in JSON or, for one sentence, a PNG of the map over the image; computed in the thread
  pool, outside the scoring batcher, at most ``explain_concurrency`` at once (else 429).
- ``GET /v1/model`` (model id, fingerprint, limits, readiness), ``GET /metrics`` (Prometheus text
  of the service's registry).
- Open to everyone even with a token set: ``GET /healthz`` (liveness: 200 while the loop runs),
  ``GET /readyz`` (503 while starting or draining), ``GET /docs`` + ``/openapi.json``, and the
  web page at ``/`` (``teacher_server/static``: plain HTML/JS, nothing fetched from elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from teacher_server.explain import TARGET, Explainer, Explanation, overlay, png_bytes
from teacher_server.grpc_api import Drain, ServiceUnavailableError, unavailable_reason
from teacher_server.hoi.digest import image_digest
from teacher_server.http_api.bodies import parse_body, request_region, triplet_sentences
from teacher_server.http_api.errors import http_error, install_error_handlers, invalid, region_field, renamer
from teacher_server.http_api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware, SecurityHeadersMiddleware
from teacher_server.http_api.schemas import (
    ERROR_RESPONSES,
    MODELS,
    SORT_QUERY,
    TIMEOUT_QUERY,
    ExplainFields,
    ExplainForm,
    ExplainRequest,
    ExplainResponse,
    ImageSummary,
    ModelSummary,
    ScoreForm,
    ScoreRequest,
    ScoreResponse,
    SentenceMap,
    SentenceScore,
    SentencesFields,
    SortOrder,
    TripletScore,
    TripletsFields,
    TripletsForm,
    TripletsRequest,
    TripletsResponse,
    request_body,
)
from teacher_server.http_api.security import API_HEADERS, docs_headers, require_bearer_token, set_token
from teacher_server.service import ScoreItem

if TYPE_CHECKING:
    from teacher_server.hoi.region import Region
    from teacher_server.service import ScoringService
    from teacher_server.settings import ServerSettings

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
SCORE_PATH = "/v1/score"
TRIPLETS_PATH = "/v1/score/triplets"
EXPLAIN_PATH = "/v1/explain"
MODEL_PATH = "/v1/model"
# Requests counted in the service's request/error metrics (as gRPC counts its methods).
COUNTED_PATHS = frozenset({SCORE_PATH, TRIPLETS_PATH, EXPLAIN_PATH, MODEL_PATH})
PNG_RESPONSE = {
    "description": "the evidence map of one sentence drawn over the image (format=png or Accept: image/png); "
    "headers X-Match-Prob, X-Match-Logit and X-Layer carry the numbers",
    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
}
# The page loads nothing from elsewhere; a sentence that is markup must stay text even if a bug
# ever put it into innerHTML: no inline script may run.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DESCRIPTION = (
    'Ad-hoc scoring with the hoi-distill teacher. Errors: `{"error": {status, code, field, message, retry_after_ms}}`.'
)

try:  # Swagger UI from a package, so /docs works offline; else FastAPI's default (a CDN).
    from swagger_ui_bundle import swagger_ui_path as _swagger_ui_path
except ImportError:  # pragma: no cover - depends on the installed extras
    _swagger_ui_path = None


def create_app(service: ScoringService, settings: ServerSettings, *, drain: Drain | None = None) -> FastAPI:
    """The HTTP API of ``service`` (routes in the module docstring).

    ``drain`` is the gRPC server's shutdown state (``TeacherServer.drain``): once it begins, this
    API answers 503 and ``/readyz`` turns unready, in step with gRPC health. With
    ``settings.auth_token`` set, the scoring, model and metrics routes need the bearer token.
    """
    drain = drain if drain is not None else Drain()
    app = FastAPI(
        title="hoi-distill teacher",
        version="1",
        summary="BLIP image-text matching scores for (image, sentence) pairs and HOI triplets.",
        description=DESCRIPTION,
        docs_url=None if _swagger_ui_path is not None else "/docs",
        redoc_url=None,
    )
    guarded = []
    if settings.auth_token:
        set_token(app, settings.auth_token)
        guarded.append(Depends(require_bearer_token))
    api = APIRouter(dependencies=guarded)
    # Evidence maps on the first replica's model, in the thread pool: never in the batcher's queue.
    explainer = Explainer(
        service.engines[0],
        layer=settings.explain_layer,
        max_sentences=settings.explain_max_sentences,
        concurrency=settings.explain_concurrency,
    )

    async def score_one(
        image: bytes,
        sentences: list[str],
        region: Region | None,
        method: str,
        rename: Callable[[str], str],
        timeout_ms: int | None,
    ) -> tuple[ImageSummary, list[tuple[float, float, bool]]]:
        digest = await run_in_threadpool(image_digest, image)
        try:
            reason = unavailable_reason(drain, service)
            if reason is not None:
                raise ServiceUnavailableError(reason)
            (result,) = await service.score(
                [ScoreItem(digest, image, tuple(sentences), region)],
                timeout_s=timeout_ms / 1000 if timeout_ms else None,
            )
            if result.image_required:  # bytes were sent: the service cannot ask for them
                raise RuntimeError(f"service answered 'image required' for image {digest} sent with its bytes")
        except Exception as exc:
            raise http_error(exc, method, rename) from None
        rows = list(zip(result.match_prob, result.match_logit, result.cached, strict=True))
        return ImageSummary(digest=digest, size_bytes=len(image)), rows

    @api.post(
        SCORE_PATH,
        response_model=ScoreResponse,
        responses=ERROR_RESPONSES,
        summary="Score sentences",
        openapi_extra=request_body(ScoreRequest, ScoreForm),
    )
    async def score(
        request: Request, sort: SortOrder = SORT_QUERY, timeout_ms: int | None = TIMEOUT_QUERY
    ) -> ScoreResponse:
        """Match probability and logit margin of every sentence against the image.

        Send JSON `{"image": <base64>, "sentences": [...]}`, or a multipart form with the file in
        `image` and one `sentences` field per sentence. With `region` (`{"human_box": [x1, y1, x2,
        y2], "object_box": [...]}`, pixels of the original image; in a form, that JSON as the text
        of a `region` field) the sentences are scored on that human-object pair. Scores keep the
        request order unless `sort=desc`; `index` is each sentence's position in the request.
        """
        body = await parse_body(request, ScoreRequest, SentencesFields, settings, frozenset({"sentences"}))
        fields: SentencesFields = body.fields  # type: ignore[assignment]
        region = request_region(fields.region)
        image, rows = await score_one(
            body.image, fields.sentences, region, f"POST {SCORE_PATH}", renamer("sentences"), timeout_ms
        )
        scores = [
            SentenceScore(index=i, sentence=sentence, match_prob=prob, match_logit=logit, cached=cached)
            for i, (sentence, (prob, logit, cached)) in enumerate(zip(fields.sentences, rows, strict=True))
        ]
        return ScoreResponse(
            model=_model_summary(service), image=image, region=fields.region, scores=_ranked(scores, sort)
        )

    @api.post(
        TRIPLETS_PATH,
        response_model=TripletsResponse,
        responses=ERROR_RESPONSES,
        summary="Score HOI triplets",
        openapi_extra=request_body(TripletsRequest, TripletsForm),
    )
    async def score_triplets(
        request: Request, sort: SortOrder = SORT_QUERY, timeout_ms: int | None = TIMEOUT_QUERY
    ) -> TripletsResponse:
        """Scores of (person, verb, object) triplets, as sentences made by the student's prompt
        template (`a person ride a horse`); `variant` as the prompt ablation (full, verb, object);
        `region` as in `POST /v1/score`."""
        body = await parse_body(request, TripletsRequest, TripletsFields, settings, frozenset({"triplets"}))
        fields: TripletsFields = body.fields  # type: ignore[assignment]
        made = triplet_sentences(fields.triplets, fields.variant)
        region = request_region(fields.region)
        image, rows = await score_one(
            body.image,
            [m.sentence for m in made],
            region,
            f"POST {TRIPLETS_PATH}",
            renamer("triplets"),
            timeout_ms,
        )
        scores = [
            TripletScore(
                index=i,
                sentence=m.sentence,
                verb=m.verb,
                obj=m.obj,
                match_prob=prob,
                match_logit=logit,
                cached=cached,
            )
            for i, (m, (prob, logit, cached)) in enumerate(zip(made, rows, strict=True))
        ]
        return TripletsResponse(
            model=_model_summary(service),
            image=image,
            region=fields.region,
            variant=fields.variant,
            scores=_ranked(scores, sort),
        )

    @api.post(
        EXPLAIN_PATH,
        response_model=ExplainResponse,
        responses={200: PNG_RESPONSE, **ERROR_RESPONSES},
        summary="Evidence maps of sentences",
        openapi_extra=request_body(ExplainRequest, ExplainForm),
    )
    async def explain(request: Request) -> Any:
        """Where the teacher's match decision looks: per sentence, the Grad-CAM of the ITM match logit
        over the cross-attention of the image patches in one text layer (`layer`, default the server's
        `explain_layer`), averaged over heads and the sentence's word tokens, on the patch grid,
        divided by its maximum (docs/pictures.md, "Teacher evidence maps").

        Body as `POST /v1/score` (JSON with a base64 `image`, or a multipart form), 1 to
        `explain_max_sentences` sentences and an optional `region`. Answers JSON (`maps[i].grid`,
        rows x cols, row 0 at the top, covering `view_box` of the original image), or with
        `format=png` / `Accept: image/png` and one sentence, a PNG of the original image with the map
        over the pixels the model saw (the rest dimmed). Runs outside the scoring batcher, at most
        `explain_concurrency` at once: 429 when busy.
        """
        body = await parse_body(request, ExplainRequest, ExplainFields, settings, frozenset({"sentences"}))
        fields: ExplainFields = body.fields  # type: ignore[assignment]
        region = request_region(fields.region)
        wants_png = fields.format == "png" or (fields.format is None and _accepts_png(request))
        if wants_png and len(fields.sentences) > 1:
            raise invalid(
                "sentences",
                f"a PNG shows one sentence's map, got {len(fields.sentences)} sentences: send one, "
                f"or ask for JSON (format=json) for up to {settings.explain_max_sentences}",
            )
        try:
            reason = unavailable_reason(drain, service)
            if reason is not None:
                raise ServiceUnavailableError(reason)
            digest = await run_in_threadpool(image_digest, body.image)
            explanation = await run_in_threadpool(
                explainer.explain, body.image, fields.sentences, region=region, layer=fields.layer
            )
        except Exception as exc:
            raise http_error(exc, f"POST {EXPLAIN_PATH}", region_field) from None
        if wants_png:
            return await run_in_threadpool(_png_answer, explanation)
        return ExplainResponse(
            model=_model_summary(service),
            image=ImageSummary(digest=digest, size_bytes=len(body.image)),
            region=fields.region,
            layer=explanation.layer,
            target=TARGET,
            rows=explanation.rows,
            cols=explanation.cols,
            view_box=list(explanation.view_box),
            maps=[
                SentenceMap(
                    index=i,
                    sentence=m.sentence,
                    match_prob=m.match_prob,
                    match_logit=m.match_logit,
                    grid=[[round(float(v), 6) for v in row] for row in m.grid.tolist()],
                )
                for i, m in enumerate(explanation.maps)
            ],
        )

    @api.get(MODEL_PATH, responses={401: ERROR_RESPONSES[401]}, summary="Model, fingerprint and limits")
    async def model_info() -> dict[str, Any]:
        """`model_id`, `fingerprint`, `itm_start_token`, `dtype`, `region_policy` (how a `region` is shown
        to the model, e.g. `crop:margin=0.1`), `limits`, batching, cache, `explain` (the evidence maps'
        default `layer`, `layers`, `max_sentences`, `concurrency`), `ready`."""
        return {
            **service.model_info(),
            "explain": explainer.describe(),
            "ready": unavailable_reason(drain, service) is None,
        }

    @api.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 401: ERROR_RESPONSES[401]},
    )
    async def metrics() -> Response:
        """The service's `hoidistill_teacher_*` metrics in the Prometheus text format."""
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        """200 while the server's event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness", responses={503: ERROR_RESPONSES[503]})
    async def readyz() -> dict[str, bool]:
        """200 when new work is accepted; 503 while the service starts or drains."""
        reason = unavailable_reason(drain, service)
        if reason is not None:
            raise http_error(ServiceUnavailableError(reason), "GET /readyz")
        return {"ready": True}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if _swagger_ui_path is not None:
        _serve_docs_offline(app, _swagger_ui_path)
    install_error_handlers(app)
    _document_request_bodies(app)
    # Added last = outermost: the metrics see the 413s that the body limit answers.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_message_bytes)
    app.add_middleware(SecurityHeadersMiddleware, headers=API_HEADERS)
    app.add_middleware(RequestMetricsMiddleware, observe=service.metrics.observe_request, paths=COUNTED_PATHS)
    return app


def _serve_docs_offline(app: FastAPI, assets: str | Path) -> None:
    """FastAPI's recipe for self-hosted docs: Swagger UI's files from the installed package."""
    app.mount("/docs/assets", StaticFiles(directory=str(assets)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
        )
        page.headers.update(docs_headers(bytes(page.body)))
        return page


def _document_request_bodies(app: FastAPI) -> None:
    """FastAPI's schema plus the request-body models that ``openapi_extra`` refers to by name.

    FastAPI only collects models it sees as parameters; the scoring routes parse their bodies
    themselves (JSON or a form), so their JSON models are added to the components here, once.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # FastAPI's own; it caches it in app.openapi_schema
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in MODELS:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
        assert app.openapi_schema is not None  # generate() stored it
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _accepts_png(request: Request) -> bool:
    """Whether the Accept header asks for a PNG rather than JSON."""
    accept = request.headers.get("accept", "").lower()
    return "image/png" in accept and "application/json" not in accept


def _png_answer(explanation: Explanation) -> Response:
    (only,) = explanation.maps
    picture = overlay(explanation.image, only.grid, explanation.view_box)
    headers = {
        "X-Match-Prob": f"{only.match_prob:.6f}",
        "X-Match-Logit": f"{only.match_logit:.6f}",
        "X-Layer": str(explanation.layer),
        "Cache-Control": "no-store",
    }
    return Response(png_bytes(picture), media_type="image/png", headers=headers)


def _model_summary(service: ScoringService) -> ModelSummary:
    info = service.model_info()
    return ModelSummary(
        model_id=str(info["model_id"]),
        fingerprint=str(info["fingerprint"]),
        itm_start_token=str(info["itm_start_token"]),
        dtype=str(info["dtype"]),
        region_policy=str(info["region_policy"]),
    )


def _ranked(rows: list[Any], sort: SortOrder) -> list[Any]:
    if sort == "desc":
        return sorted(rows, key=lambda row: (-row.match_prob, row.index))
    return rows
