"""The HTTP request and response bodies (also the CLI's `--json` output); OpenAPI is generated from them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from carlos_ray.behavior.api import TagModel


class ErrorResponse(BaseModel):
    error: str = Field(..., description="Short machine-readable code, e.g. `invalid_k`, `unknown_lora`, `encoder_unavailable`.")
    detail: str = Field(..., description="What is wrong and what would be valid.")


class HitModel(BaseModel):
    rank: int = Field(..., description="1-based position in the result list.")
    lora_id: str
    score: float = Field(..., description="Cosine similarity of the query (or LoRA) direction and this LoRA's direction.")
    strength: float | None = Field(None, description="Mean norm of the LoRA's image-embedding diffs (null if not finite).")
    consistency: float | None = Field(None, description="Mean pairwise cosine of the diffs (null if not finite).")
    name: str | None = None
    description: str | None = None
    trigger_words: list[str] = Field(default_factory=list)


class Filters(BaseModel):
    k: int = Field(..., description="Number of results asked for.")
    max_strength: float | None = Field(None, description="Effective strength filter (null: none).")
    min_consistency: float | None = Field(None, description="Effective consistency filter (null: none).")
    index_version: int = Field(..., description="Manifest version of the index that answered.")


class SearchResponse(Filters):
    query: str
    tag: str | None = Field(None, description="Tag filter: only LoRAs carrying this tag (null: none).")
    hits: list[HitModel]


class QueryResult(BaseModel):
    query: str
    hits: list[HitModel]


class BatchSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[str] = Field(..., description="Text queries (1 to max_batch_queries, see GET /index), each non-empty and "
                               "at most query.max_query_chars characters.")
    k: int = Field(10, description="Results per query, 1 to max_k (see GET /index).")
    max_strength: float | None = Field(None, description="Keep LoRAs with strength <= this (>= 0; default: the index's).")
    min_consistency: float | None = Field(None, description="Keep LoRAs with consistency >= this (0 to 1; default: the index's).")


class BatchSearchResponse(Filters):
    results: list[QueryResult]


class SimilarResponse(Filters):
    lora_id: str
    hits: list[HitModel]


class LoraResponse(BaseModel):
    lora_id: str
    index_version: int
    dim: int = Field(..., description="Width of the direction vector (not included; it is the index's raw data).")
    signature: dict[str, Any] = Field(..., description="The LoRA's row of the signatures table, without `direction`.")
    intervals: dict[str, Any] | None = Field(
        None, description="95% intervals from the signature's standard errors: 'strength 4.12 ± 0.20', samples used, rounds."
    )
    tags: list[TagModel] | None = Field(None, description="Behavioural tags, best first (null: the index has no tags yet).")
    exact_copies: list[str] = Field(default_factory=list, description="Other paths of this very file (same SHA-256), indexed once.")


class IndexResponse(BaseModel):
    version: int
    created_at: str | None = None
    updated_at: str | None = None
    config_name: str | None = None
    config_hash: str | None = None
    source: str | None = None
    encoder: dict[str, Any]
    query: dict[str, Any]
    thresholds: dict[str, Any]
    counts: dict[str, Any]
    loras: int = Field(..., description="LoRAs the ranker holds.")
    dim: int = Field(..., description="Width of the signature directions.")
    max_k: int
    max_batch_queries: int
    max_body_bytes: int = Field(..., description="Largest request body accepted (413 beyond).")
    max_url_chars: int = Field(..., description="Longest path plus query string accepted (414 beyond).")
    search_available: bool
    search_unavailable_reason: str | None = None
    encoder_stats: dict[str, Any] | None = Field(None, description="Encoder replica counters (batches, queries, largest batch).")
    last_reload_error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"] = Field(..., description="`degraded`: /search is unavailable, the rest works.")
    index_version: int
    search_available: bool


class ReloadResponse(BaseModel):
    version: int
    reloaded: bool
