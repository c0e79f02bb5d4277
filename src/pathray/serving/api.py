"""The HTTP API (FastAPI): analyses, their files, models, health; auth and body-size limits."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pathray.inference.outputs import OUTPUT_FILES
from pathray.serving.analysis import AnalysisStatus
from pathray.serving.config import ServeAppConfig
from pathray.serving.security import UriRejected, check_slide_uri, is_safe_id, token_matches
from pathray.serving.service import AnalysisService
from pathray.serving.store import ModelStore
from pathray.wsi.backends.levels import MAX_PLAUSIBLE_MPP

MEDIA_TYPES = {".png": "image/png", ".geojson": "application/geo+json", ".json": "application/json"}


class AnalysisRequest(BaseModel):
    """``POST /v1/analyses`` body."""

    model_config = ConfigDict(extra="forbid")

    slide: str = Field(..., max_length=2048, description="slide URI under an allowed prefix")
    model: str = Field(..., max_length=128, description="model id (GET /v1/models)")
    outputs: list[str] | None = Field(None, description=f"files to produce; default all of {OUTPUT_FILES}")
    mpp: float | None = Field(
        None,
        gt=0,
        le=MAX_PLAUSIBLE_MPP,
        description="level-0 µm/px of the slide, overriding its metadata (for slides that have none)",
    )


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body: every tissue tile of one slide through a model's backbone."""

    model_config = ConfigDict(extra="forbid")

    slide: str = Field(..., max_length=2048, description="slide URI under an allowed prefix")
    model: str = Field(..., max_length=128, description="model id (GET /v1/models): its tile size and mpp")
    mpp: float | None = Field(
        None,
        gt=0,
        le=MAX_PLAUSIBLE_MPP,
        description="level-0 µm/px of the slide, overriding its metadata (for slides that have none)",
    )
    overlap: float = Field(0.0, ge=0.0, le=0.5, description="grid overlap between neighbouring tiles")


EMBEDDING_FILE = "embeddings.parquet"


class ModelInfo(BaseModel):
    """One model of the store, from its package's config."""

    id: str
    task: str | None
    engine: str | None
    preset: str | None = Field(None, description="the public foundation model's preset, if any")
    classes: list[str] | None
    tile_size: int | None = Field(None, description="px of the tiles the model reads")
    mpp: float | None = Field(None, description="µm/px of the tiles the model reads")


class ModelList(BaseModel):
    models: list[ModelInfo]


class BodyLimit:
    """ASGI middleware: request bodies over ``limit`` bytes get 413 before any handler runs."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(send, self.limit)
            return
        body, more = b"", True
        while more:  # read (at most limit + 1 bytes of) the body here, then replay it
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _too_large(send, self.limit)
                return
        sent = [False]

        async def replay() -> dict[str, Any]:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Any, limit: int) -> None:
    payload = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send(
        {"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": payload})


def build_api(config: ServeAppConfig, service: AnalysisService, token: str | None) -> FastAPI:
    """The FastAPI app of one ingress replica; ``token`` None means no auth."""
    security = config.serve.security
    models = ModelStore(config.serve.models, config.storage)

    def authorised(request: Request) -> None:
        if token is not None and not token_matches(request.headers.get("authorization"), token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    api = FastAPI(title="pathray", version="1", description="Whole-slide analysis on Ray Serve.")
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        ids = await asyncio.to_thread(models.ids)
        return {"models": [await asyncio.to_thread(models.describe, i) for i in ids]}

    def checked_uri(slide: str) -> str:
        try:
            return check_slide_uri(slide, security.allowed_prefixes)
        except UriRejected as exc:
            raise HTTPException(exc.status, exc.reason) from None

    async def known_model(model: str) -> None:
        known = await asyncio.to_thread(models.ids)
        if model not in known:
            raise HTTPException(404, {"message": f"unknown model {model!r}", "known": known})

    def room_for_one_more() -> None:
        if service.pending >= config.serve.ingress.max_pending_analyses:
            raise HTTPException(
                429, "too many analyses queued; try again later", headers={"Retry-After": "30"}
            )

    async def job_of_kind(job_id: str, kind: str) -> dict[str, Any]:
        doc = await service.status(job_id) if is_safe_id(job_id) else None
        if doc is None or doc.get("kind", "analysis") != kind:
            raise HTTPException(404, f"no {kind} {job_id!r}")
        return doc

    @v1.post("/analyses", status_code=202, response_model=AnalysisStatus)
    async def create_analysis(body: AnalysisRequest) -> JSONResponse:
        uri = checked_uri(body.slide)
        outputs = list(OUTPUT_FILES) if body.outputs is None else list(dict.fromkeys(body.outputs))
        unknown = [o for o in outputs if o not in OUTPUT_FILES]
        if unknown:
            raise HTTPException(422, f"unknown outputs {unknown}; known: {list(OUTPUT_FILES)}")
        if "summary.json" not in outputs:
            outputs.append("summary.json")
        await known_model(body.model)
        spec = await asyncio.to_thread(models.spec, body.model)
        if not (spec.has_map or spec.has_points):  # an embedding package (an SSL run's teacher)
            raise HTTPException(
                422,
                f"model {body.model!r} is an {spec.task_name} model: no class map or points to analyse"
                " (POST /v1/embeddings embeds a slide with it)",
            )
        room_for_one_more()
        analysis = service.submit(body.slide, uri, body.model, outputs, mpp=body.mpp)
        doc = analysis.doc()
        return JSONResponse(doc, status_code=202, headers={"Location": doc["links"]["self"]})

    @v1.get("/analyses/{analysis_id}", response_model=AnalysisStatus)
    async def get_analysis(analysis_id: str) -> dict[str, Any]:
        return await job_of_kind(analysis_id, "analysis")

    @v1.post("/embeddings", status_code=202, response_model=AnalysisStatus)
    async def create_embedding(body: EmbeddingRequest) -> JSONResponse:
        """Embed every tissue tile of a slide with a model's backbone (any package: its pooled
        embedding), asynchronously; the result is one Parquet file, as ``pathray embed`` writes."""
        uri = checked_uri(body.slide)
        await known_model(body.model)
        room_for_one_more()
        job = service.submit(
            body.slide,
            uri,
            body.model,
            [EMBEDDING_FILE],
            mpp=body.mpp,
            kind="embedding",
            overlap=body.overlap,
        )
        doc = job.doc()
        return JSONResponse(doc, status_code=202, headers={"Location": doc["links"]["self"]})

    @v1.get("/embeddings/{job_id}", response_model=AnalysisStatus)
    async def get_embedding(job_id: str) -> dict[str, Any]:
        return await job_of_kind(job_id, "embedding")

    @v1.get("/embeddings/{job_id}/{name}")
    async def get_embedding_file(job_id: str, name: str) -> Response:
        if name != EMBEDDING_FILE:
            raise HTTPException(404, f"no file {name!r}; files: [{EMBEDDING_FILE!r}]")
        doc = await job_of_kind(job_id, "embedding")
        if doc["status"] != "done":
            raise HTTPException(409, f"embedding {job_id} is {doc['status']}, not done")
        data = await asyncio.to_thread(service.results.read_bytes, job_id, name)
        if data is None:
            raise HTTPException(404, f"{name} of {job_id} is gone from the results store")
        return Response(data, media_type="application/vnd.apache.parquet")

    @v1.get("/analyses/{analysis_id}/{name}")
    async def get_file(analysis_id: str, name: str) -> Response:
        if name not in OUTPUT_FILES:
            raise HTTPException(404, f"no file {name!r}; files: {list(OUTPUT_FILES)}")
        doc = await job_of_kind(analysis_id, "analysis")
        if doc["status"] != "done":
            raise HTTPException(409, f"analysis {analysis_id} is {doc['status']}, not done")
        if name not in doc["links"]:
            raise HTTPException(404, f"{name} was not asked for in this analysis")
        data = await asyncio.to_thread(service.results.read_bytes, analysis_id, name)
        if data is None:
            raise HTTPException(404, f"{name} of {analysis_id} is gone from the results store")
        return Response(data, media_type=MEDIA_TYPES["." + name.rsplit(".", 1)[-1]])

    api.include_router(v1)
    api.add_middleware(BodyLimit, limit=config.serve.ingress.max_body_bytes)
    return api
