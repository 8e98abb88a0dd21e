"""The Ray Serve application: a FastAPI ingress over a query-encoder deployment and a ranker deployment.

``build_app(args: ServeArgs)`` composes ``Ingress.bind(QueryEncoderDeployment.bind(...),
RankerDeployment.bind(...))``; ``carlos-ray serve`` and ``serve run`` (``import_path:
carlos_ray.serving.app:build_app``) both call it. The logic lives in the sibling modules; this one wires
it to HTTP. Endpoints (OpenAPI at ``/docs``): ``GET/POST /search``, ``GET /loras/{id}``,
``GET /loras/{id}/similar``, ``GET /loras/{id}/duplicates``, ``GET /groups``, ``GET /tags``, ``GET /index``,
``GET /healthz``, ``POST /admin/reload``. Every error
is JSON ``{"error": ..., "detail": ...}``.
"""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from carlos_ray.behavior.api import DuplicatesResponse, GroupsResponse, TagsResponse, check_duplicate_thresholds, check_positive
from carlos_ray.serving.args import ServeArgs
from carlos_ray.serving.errors import ServiceError, encoder_unavailable
from carlos_ray.serving.http_models import (
    BatchSearchRequest,
    BatchSearchResponse,
    ErrorResponse,
    HealthResponse,
    IndexResponse,
    LoraResponse,
    ReloadResponse,
    SearchResponse,
    SimilarResponse,
)
from carlos_ray.serving.loading import resolve_index_uri
from carlos_ray.serving.services import EncoderService, RankerService, search_body
from carlos_ray.serving.validation import check_bearer, check_k, check_queries, check_query, check_thresholds, token_digest
from carlos_ray.serving.web.catalog import LoraListResponse, LoraProfile
from carlos_ray.serving.web.pages import CatalogCache, SecurityHeaders, add_page_routes
from carlos_ray.store import Index

logger = logging.getLogger(__name__)

api = FastAPI(
    title="carlos-ray",
    description="Retrieve diffusion LoRAs by what they do: text queries against CARLoS signatures. "
    "Every error is JSON {\"error\": code, \"detail\": explanation}.",
    version="0.1.0",
    docs_url=None,  # /docs is served from the package (offline Swagger UI), see add_page_routes
    redoc_url=None,
)
ERRORS = {s: {"model": ErrorResponse} for s in (401, 403, 404, 409, 422, 503)}
MAX_K_DOC = "Number of results, 1 to max_k (default 100; see GET /index)."
MAX_S_DOC = "Keep LoRAs with strength <= this; a number >= 0, `inf` for no strength filter. Default: the index's."
MIN_C_DOC = "Keep LoRAs with consistency >= this; a number from 0 to 1. Default: the index's."


class RequestLimits:
    """ASGI middleware: refuse an over-long URL (414) or body (413) before any handler runs.

    The body is read here, up to the limit, and replayed to the app; a client that announces or sends more
    is answered at once, without buffering the rest."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_url, max_body = getattr(api.state, "limits", (4096, 65536))
        url_chars = len(scope.get("path", "")) + len(scope.get("query_string", b""))
        if url_chars > max_url:
            return await _send_error(send, 414, "uri_too_long", f"the path and query string have {url_chars} characters; "
                                     f"the limit is {max_url}; send long input in a POST /search body")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = f"the request body is larger than {max_body} bytes"
        if length is not None:
            try:
                if int(length) > max_body:
                    return await _send_error(send, 413, "body_too_large", too_big)
            except ValueError:
                return await _send_error(send, 400, "bad_request", "Content-Length is not a number")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > max_body:
                return await _send_error(send, 413, "body_too_large", too_big)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_error(send: Any, status: int, error: str, detail: str) -> None:
    response = JSONResponse(status_code=status, content={"error": error, "detail": detail}, headers={"Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


api.add_middleware(RequestLimits)
api.add_middleware(SecurityHeaders)  # outermost: the CSP is on every answer, 413/414 included
add_page_routes(api)  # GET / (search page), /lora, /overview, /docs and their static files


@api.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(status_code=exc.status, content=exc.body(), headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        where = {"query": "query parameter", "path": "path parameter", "body": "body field"}.get(loc[0] if loc else "", "")
        name = ".".join(loc[1:]) or "<body>"
        got = err.get("input")
        got_text = "" if got is None or err.get("type") == "missing" else f" (got {str(got)[:80]!r})"
        parts.append(f"{where} '{name}': {err.get('msg')}{got_text}".strip())
    return JSONResponse(status_code=422, content={"error": "invalid_request", "detail": "; ".join(parts)})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        detail = f"no endpoint {request.method} {request.url.path}; see /docs"
    return JSONResponse(status_code=exc.status_code, content={"error": code, "detail": detail})


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"error": "internal_error", "detail": "internal error; see the server log"})


# ---- deployments -------------------------------------------------------------------------------------
@serve.deployment
class QueryEncoderDeployment:
    """The index's CLIP text tower and context prompts; concurrent queries are encoded together."""

    def __init__(self, index_uri: str, device: str | None, torch_threads: int | None, allow_download: bool,
                 max_batch_size: int, batch_wait_timeout_s: float):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.service = EncoderService(index_uri, device=device, allow_download=allow_download)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")  # keeps the event loop free
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, queries: list[str]) -> list[np.ndarray]:
        out = await asyncio.get_running_loop().run_in_executor(self._pool, self.service.encode, queries)
        return list(out)

    async def encode_many(self, queries: list[str]) -> np.ndarray:
        """Δq for each query (B, d); every query joins the replica's current batch."""
        self.service.check_available()
        return np.stack(await asyncio.gather(*(self._encode_batch(q) for q in queries)))

    def info(self) -> dict:
        return self.service.info()


@serve.deployment
class RankerDeployment:
    """Exact filtered top-k over the index's signatures; picks up new index versions without a restart."""

    def __init__(self, index_uri: str, poll_seconds: float):
        self.service = RankerService.watching(index_uri, poll_seconds=poll_seconds)
        self.catalogs = CatalogCache(index_uri)  # what the pages read, per served version

    def search(self, vectors: np.ndarray, k: int, max_strength: float | None, min_consistency: float | None,
               tag: str | None = None) -> dict:
        return self.service.search(vectors, k, max_strength, min_consistency, tag)

    def tagged(self) -> bool:
        return self.service.tagged()

    def tags(self) -> dict:
        return self.service.tags()

    def groups(self, min_size: int, limit: int) -> dict:
        return self.service.groups(min_size, limit)

    def duplicates(self, lora_id: str, min_cosine: float, min_strength_ratio: float) -> dict:
        return self.service.duplicates(lora_id, min_cosine, min_strength_ratio)

    def similar(self, lora_id: str, k: int, max_strength: float | None, min_consistency: float | None) -> dict:
        return self.service.similar(lora_id, k, max_strength, min_consistency)

    def get(self, lora_id: str) -> dict:
        return self.service.get(lora_id)

    def summary(self) -> dict:
        return self.service.summary()

    def version(self) -> int:
        return self.service.version()

    def reload(self) -> dict:
        return self.service.reload()

    def catalog_points(self, offset: int, limit: int) -> dict:
        return self.catalogs.get(self.service.version()).points(offset, limit)

    def catalog_profile(self, lora_id: str, max_query_chars: int) -> tuple[dict, str]:
        catalog = self.catalogs.get(self.service.version())
        return catalog.profile(lora_id), catalog.metadata_query(lora_id, max_query_chars)

    def catalog_description_rank(self, lora_id: str, vector: np.ndarray) -> dict:
        return self.catalogs.get(self.service.version()).description_rank(lora_id, vector)

    def catalog_thumbnails(self, lora_id: str) -> tuple[bytes, int]:
        catalog = self.catalogs.get(self.service.version())
        return catalog.thumbnails_png(lora_id), catalog.version

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None and hasattr(service.watcher, "stop"):
            service.watcher.stop()


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, ranker: DeploymentHandle, settings: dict):
        self.encoder = encoder
        self.ranker = ranker
        self.max_k = int(settings["max_k"])
        self.max_batch_queries = int(settings["max_batch_queries"])
        self.timeout = float(settings["request_timeout_s"])
        self.admin_digest = settings.get("admin_token_sha256")
        self.admin_env = settings["admin_token_env"]
        api.state.limits = (int(settings["max_url_chars"]), int(settings["max_body_bytes"]))  # read by RequestLimits
        self._encoder_info: dict | None = None

    async def _call(self, response: Any) -> Any:
        """Await a deployment call with a time limit; a ServiceError raised remotely keeps its status."""

        async def wait() -> Any:
            return await response

        try:
            return await asyncio.wait_for(wait(), self.timeout)
        except ServiceError as e:  # Ray re-raises it as a subclass of both RayTaskError and ServiceError
            cause = getattr(e, "cause", e)
            raise ServiceError(cause.status, cause.error, cause.detail) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise ServiceError(503, "timeout", f"the request took longer than {self.timeout:g} s; try again") from None
        except Exception:
            logger.exception("a backend deployment failed")
            raise ServiceError(503, "backend_unavailable", "a backend deployment failed; try again") from None

    async def _encoder(self) -> dict:
        if self._encoder_info is None:
            self._encoder_info = await self._call(self.encoder.info.remote())
        return self._encoder_info

    async def _encode(self, queries: list[str]) -> np.ndarray:
        info = await self._encoder()
        if not info["available"]:
            raise encoder_unavailable(info["reason"])
        return await self._call(self.encoder.encode_many.remote(queries))

    @api.get("/search", response_model=SearchResponse, responses=ERRORS, summary="Top-k LoRAs for one text query")
    async def search(
        self,
        q: str = Query(..., description="Text query (non-empty; at most query.max_query_chars characters, see GET /index)."),
        k: int = Query(10, description=MAX_K_DOC),
        max_strength: float | None = Query(None, description=MAX_S_DOC),
        min_consistency: float | None = Query(None, description=MIN_C_DOC),
        tag: str | None = Query(None, description="Only LoRAs carrying this behavioural tag (see GET /tags)."),
    ) -> dict:
        info = await self._encoder()
        text = check_query(q, info["max_query_chars"])
        k = check_k(k, self.max_k)
        ms, mc = check_thresholds(max_strength, min_consistency)
        vectors = await self._encode([text])
        out = await self._call(self.ranker.search.remote(vectors, k, ms, mc, tag))
        return search_body(out, [text])

    @api.post("/search", response_model=BatchSearchResponse, responses=ERRORS, summary="Top-k LoRAs for several queries")
    async def search_many(self, body: BatchSearchRequest = Body(...)) -> dict:
        info = await self._encoder()
        texts = check_queries(body.queries, info["max_query_chars"], self.max_batch_queries)
        k = check_k(body.k, self.max_k)
        ms, mc = check_thresholds(body.max_strength, body.min_consistency)
        vectors = await self._encode(texts)
        out = await self._call(self.ranker.search.remote(vectors, k, ms, mc))
        return search_body(out, texts, batch=True)

    @api.get("/loras/{lora_id}", response_model=LoraResponse, responses=ERRORS, summary="One LoRA's signature row")
    async def lora(self, lora_id: str) -> dict:
        return await self._call(self.ranker.get.remote(lora_id))

    @api.get("/loras/{lora_id}/similar", response_model=SimilarResponse, responses=ERRORS,
             summary="LoRAs whose behavior directions are closest to this one's")
    async def similar(
        self,
        lora_id: str,
        k: int = Query(10, description=MAX_K_DOC),
        max_strength: float | None = Query(None, description=MAX_S_DOC),
        min_consistency: float | None = Query(None, description=MIN_C_DOC),
    ) -> dict:
        k = check_k(k, self.max_k)
        ms, mc = check_thresholds(max_strength, min_consistency)
        return await self._call(self.ranker.similar.remote(lora_id, k, ms, mc))

    @api.get("/loras/{lora_id}/duplicates", response_model=DuplicatesResponse, responses=ERRORS,
             summary="Exact copies, behavioural duplicates and scale relatives of one LoRA")
    async def duplicates(
        self,
        lora_id: str,
        min_cosine: float | None = Query(None, description="Directions at least this parallel (cosine in (0, 1], default 0.95)."),
        min_strength_ratio: float | None = Query(
            None, description="Duplicates: smaller over larger strength at least this (in (0, 1], default 0.8); "
            "LoRAs below it are scale relatives when their cosine reaches the index profile's family cosine "
            "(behavior.family_min_cosine: 0.95 by default, 0.88 for micro) or min_cosine, whichever is lower."),
    ) -> dict:
        mc, mr = check_duplicate_thresholds(min_cosine, min_strength_ratio)
        return await self._call(self.ranker.duplicates.remote(lora_id, mc, mr))

    @api.get("/groups", response_model=GroupsResponse, responses=ERRORS,
             summary="Content groups: LoRAs whose directions point the same way, labelled with their shared tags")
    async def groups(
        self,
        min_size: int = Query(1, description="Only groups with at least this many members (1 to 100000)."),
        limit: int = Query(100, description="Return at most this many groups, largest first (1 to 10000)."),
    ) -> dict:
        min_size = check_positive("min_size", min_size, 100_000)
        limit = check_positive("limit", limit, 10_000)
        return await self._call(self.ranker.groups.remote(min_size, limit))

    @api.get("/tags", response_model=TagsResponse, responses=ERRORS, summary="The index's behavioural tags in use")
    async def tags(self) -> dict:
        if not await self._call(self.ranker.tagged.remote()):
            info = await self._encoder()
            if not info["available"]:
                raise encoder_unavailable(info["reason"])  # the same 503 as /search
        return await self._call(self.ranker.tags.remote())

    @api.get("/index", response_model=IndexResponse, summary="The served index: manifest summary, counts, limits")
    async def index(self) -> dict:
        summary = await self._call(self.ranker.summary.remote())
        enc = await self._call(self.encoder.info.remote())
        max_url, max_body = api.state.limits
        return {**summary, "max_k": self.max_k, "max_batch_queries": self.max_batch_queries,
                "max_body_bytes": max_body, "max_url_chars": max_url,
                "search_available": enc["available"], "search_unavailable_reason": enc["reason"],
                "encoder_stats": {key: enc[key] for key in ("batches", "queries", "max_batch", "fast_path", "dim")}}

    @api.get("/healthz", response_model=HealthResponse, responses={503: {"model": ErrorResponse}}, summary="Liveness")
    async def healthz(self) -> dict:
        version = await self._call(self.ranker.version.remote())
        available = (await self._encoder())["available"]
        return {"status": "ok" if available else "degraded", "index_version": version, "search_available": available}

    @api.post("/admin/reload", response_model=ReloadResponse, responses=ERRORS,
              summary="Load the newest index version now (bearer token required)")
    async def reload(self, authorization: str | None = Header(None)) -> dict:
        check_bearer(authorization, self.admin_digest, self.admin_env)
        return await self._call(self.ranker.reload.remote())

    # ---- what the search page reads (carlos_ray.serving.web) ----
    @api.get("/loras", response_model=LoraListResponse, responses=ERRORS, summary="Every LoRA's strength, consistency and quadrant")
    async def loras(
        self,
        offset: int = Query(0, ge=0, description="Skip this many LoRAs (name order)."),
        limit: int = Query(1000, ge=1, le=100_000, description="At most this many LoRAs, 1 to 100000."),
    ) -> dict:
        return await self._call(self.ranker.catalog_points.remote(offset, limit))

    @api.get("/loras/{lora_id}/profile", response_model=LoraProfile, responses=ERRORS,
             summary="A LoRA's page data: signature, categories, near-duplicates, metadata vs behaviour")
    async def profile(self, lora_id: str) -> dict:
        info = await self._encoder()
        profile, text = await self._call(self.ranker.catalog_profile.remote(lora_id, info["max_query_chars"]))
        if not info["available"]:
            check = {"status": "unavailable", "detail": f"Not checked: text encoding is unavailable on this server ({info['reason']})."}
        elif not text:
            check = {"status": "no_text", "detail": "The LoRA has no name, trigger words or description to compare with its behaviour."}
        else:
            try:
                vectors = await self._encode([text])
                check = await self._call(self.ranker.catalog_description_rank.remote(lora_id, vectors[0]))
            except ServiceError as e:
                check = {"status": "unavailable", "detail": f"Not checked: {e.detail}"}
            check["query"] = text
        return {**profile, "metadata_check": check}

    @api.get("/loras/{lora_id}/thumbnails", response_class=Response, summary="Base-vs-LoRA thumbnails as one PNG",
             responses={200: {"content": {"image/png": {}}, "description": "Base images above the LoRA's, one column per prompt."},
                        404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def thumbnails(self, lora_id: str) -> Response:
        png, version = await self._call(self.ranker.catalog_thumbnails.remote(lora_id))
        return Response(png, media_type="image/png", headers={"Cache-Control": "public, max-age=3600", "ETag": f'"v{version}"'})


# ---- builder -----------------------------------------------------------------------------------------
def build_app(args: ServeArgs) -> serve.Application:
    """The application for ``serve run`` / ``serve.run``: Ingress over QueryEncoder and Ranker deployments."""
    if isinstance(args, dict):
        args = ServeArgs.model_validate(args)
    index_uri = resolve_index_uri(args.index)
    manifest = Index(index_uri).read_manifest()  # fail here, with the index's name, rather than in a replica
    if not manifest.counts.get("signatures"):
        raise ValueError(f"index {index_uri} (version {manifest.version}) holds no signatures; index some LoRAs first")
    token = os.environ.get(args.admin_token_env)
    settings = {
        "max_k": args.max_k, "max_batch_queries": args.max_batch_queries, "request_timeout_s": args.request_timeout_s,
        "max_body_bytes": args.max_body_bytes, "max_url_chars": args.max_url_chars,
        "admin_token_env": args.admin_token_env, "admin_token_sha256": token_digest(token) if token else None,
    }
    logger.info("serving index %s version %s", index_uri, manifest.version)
    encoder = QueryEncoderDeployment.options(
        num_replicas=args.encoder_replicas,
        max_ongoing_requests=max(64, 4 * args.max_batch_size),
        ray_actor_options={"num_cpus": args.encoder_num_cpus, "num_gpus": args.encoder_num_gpus},
    ).bind(index_uri, args.device, args.torch_threads, args.allow_download, args.max_batch_size, args.batch_wait_timeout_s)
    ranker = RankerDeployment.options(
        num_replicas=args.ranker_replicas, max_ongoing_requests=64, ray_actor_options={"num_cpus": args.ranker_num_cpus},
    ).bind(index_uri, args.poll_seconds)
    return Ingress.options(max_ongoing_requests=256, ray_actor_options={"num_cpus": args.ingress_num_cpus}).bind(
        encoder, ranker, settings
    )
