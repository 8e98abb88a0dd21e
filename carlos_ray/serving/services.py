"""The two halves of the service, plain Python objects the Serve deployments (and the CLI) wrap.

- :class:`RankerService`: search, similar, one LoRA's row and the index summary over a watched or fixed index;
  results are JSON-ready dicts shaped like the HTTP bodies (:func:`search_body` makes the `/search` body);
- :class:`EncoderService`: the index's query encoder, or the reason it is unavailable, with batch counters.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from carlos_ray.behavior import api as behavior_api
from carlos_ray.ranker import Hit, Ranker, UnknownLora
from carlos_ray.serving.errors import EncoderUnavailable, ServiceError, encoder_unavailable
from carlos_ray.serving.http_models import HitModel
from carlos_ray.serving.loading import load_query_encoder, query_spec_from_manifest
from carlos_ray.serving.watcher import FixedIndex, IndexWatcher
from carlos_ray.store import Index

if TYPE_CHECKING:  # pragma: no cover
    from carlos_ray.query import QueryEncoder

logger = logging.getLogger(__name__)

FILTER_KEYS = ("k", "max_strength", "min_consistency", "index_version")


def finite_or_none(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def hit_models(hits: Sequence[Hit]) -> list[HitModel]:
    return [
        HitModel(rank=i + 1, lora_id=h.lora_id, score=float(h.score), strength=finite_or_none(h.strength),
                 consistency=finite_or_none(h.consistency), name=h.name, description=h.description,
                 trigger_words=list(h.trigger_words or []))
        for i, h in enumerate(hits)
    ]


def json_safe(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN), containers recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        return None
    return value


def effective_thresholds(ranker: Ranker, max_strength: float | None, min_consistency: float | None) -> tuple[float | None, float | None]:
    """The filters a response reports: the request's, else the index's (an infinite strength limit shows as None)."""
    from carlos_ray.thresholds import resolve_thresholds

    return resolve_thresholds(max_strength, min_consistency, stored={
        "max_strength": ranker.max_strength, "min_consistency": ranker.min_consistency}).for_display()


def search_body(out: dict, texts: Sequence[str], batch: bool = False) -> dict:
    """The `/search` response body from :meth:`RankerService.search`'s result: one query, or a batch."""
    head = {key: out[key] for key in FILTER_KEYS}
    if batch:
        return {**head, "results": [{"query": t, "hits": h} for t, h in zip(texts, out["hits"])]}
    return {**head, "query": texts[0], "tag": out.get("tag"), "hits": out["hits"][0]}


class RankerService:
    """The ranker operations of the service over an index (watched or fixed); results are JSON-ready dicts."""

    def __init__(self, watcher: IndexWatcher | FixedIndex):
        self.watcher = watcher

    @classmethod
    def watching(cls, index_uri: str, poll_seconds: float = 2.0) -> "RankerService":
        """Serve ``index_uri`` and follow its new versions (a polling thread is started)."""
        watcher = IndexWatcher(index_uri, poll_seconds)
        watcher.start()
        return cls(watcher)

    def search(self, vectors: np.ndarray, k: int, max_strength: float | None, min_consistency: float | None,
               tag: str | None = None) -> dict:
        """Top-k hits for each row of ``vectors`` (B, d) on the current index version (``tag``: only LoRAs carrying it)."""
        state = self.watcher.state
        if tag is not None:
            tag = behavior_api.check_tag(state.behavior, tag)
        only = None if tag is None else state.behavior.with_tag(tag)
        q = np.asarray(vectors, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != state.ranker.dim:
            raise ServiceError(503, "index_encoder_mismatch", f"query vectors have width {q.shape[-1]} but the index "
                               f"directions have width {state.ranker.dim}; the index was re-built with another encoder, restart the service")
        norms = np.linalg.norm(q, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if bad.size:
            raise ServiceError(422, "query_has_no_effect", f"query {int(bad[0])} leaves every context prompt's text features "
                               "unchanged (e.g. it has no tokens the tokenizer keeps); try other words")
        hits = state.ranker.search(q, k=k, max_strength=max_strength, min_consistency=min_consistency, only=only)
        ms, mc = effective_thresholds(state.ranker, max_strength, min_consistency)
        return {"k": k, "max_strength": ms, "min_consistency": mc, "index_version": state.version, "tag": tag,
                "hits": [[h.model_dump() for h in hit_models(row)] for row in hits]}

    def check_tag(self, tag: str) -> str:
        """The tag as the index spells it, or ServiceError 409 (index untagged) / 422 (unknown tag)."""
        return behavior_api.check_tag(self.watcher.state.behavior, tag)

    def tags(self) -> dict:
        """The index's tags in use (ServiceError 409 when it has no tags yet)."""
        state = self.watcher.state
        return behavior_api.tags_response(state.behavior, state.version)

    def tagged(self) -> bool:
        return self.watcher.state.behavior.tagged

    def groups(self, min_size: int = 1, limit: int = 100) -> dict:
        """Content groups of the LoRAs inside the thresholds (computed once per index version)."""
        state = self.watcher.state
        return behavior_api.groups_response(state.behavior, state.version, min_size, limit)

    def duplicates(self, lora_id: str, min_cosine: float, min_strength_ratio: float) -> dict:
        """Exact copies, behavioural duplicates and scale relatives of one LoRA."""
        state = self.watcher.state
        return behavior_api.duplicates_response(state.behavior, state.version, lora_id, min_cosine, min_strength_ratio)

    def similar(self, lora_id: str, k: int, max_strength: float | None, min_consistency: float | None) -> dict:
        state = self.watcher.state
        try:
            hits = state.ranker.similar(lora_id, k=k, max_strength=max_strength, min_consistency=min_consistency)
        except UnknownLora as e:
            raise ServiceError(404, "unknown_lora", str(e)) from None
        except ValueError as e:  # a zero direction
            raise ServiceError(422, "undefined_similarity", str(e)) from None
        ms, mc = effective_thresholds(state.ranker, max_strength, min_consistency)
        return {"lora_id": lora_id, "k": k, "max_strength": ms, "min_consistency": mc, "index_version": state.version,
                "hits": [h.model_dump() for h in hit_models(hits)]}

    def get(self, lora_id: str) -> dict:
        state = self.watcher.state
        try:
            row = state.ranker.get(lora_id)
        except UnknownLora as e:
            raise ServiceError(404, "unknown_lora", str(e)) from None
        row.pop("direction", None)
        from carlos_ray.uncertainty import stated_intervals

        return {"lora_id": lora_id, "index_version": state.version, "dim": state.ranker.dim, "signature": json_safe(row),
                "intervals": json_safe(stated_intervals(row)),
                "tags": behavior_api.tag_models(state.behavior, lora_id),
                "exact_copies": state.behavior.aliases.get(lora_id, [])}

    def summary(self) -> dict:
        """Manifest summary and counts of the version being served (no local paths)."""
        state = self.watcher.state
        m = state.manifest
        return {
            "version": state.version, "created_at": m.created_at, "updated_at": m.updated_at,
            "config_name": m.config_name, "config_hash": m.config_hash, "source": m.source,
            "encoder": {k: m.encoder.get(k) for k in ("kind", "arch", "pretrained", "dtype")},
            "query": query_spec_from_manifest(m).model_dump(), "thresholds": json_safe(dict(m.thresholds)),
            "counts": json_safe(dict(m.counts)), "loras": len(state.ranker), "dim": state.ranker.dim,
            "last_reload_error": self.watcher.last_error,
        }

    def version(self) -> int:
        return self.watcher.state.version

    def reload(self) -> dict:
        try:
            swapped = self.watcher.refresh(force=True)
        except Exception as e:
            raise ServiceError(409, "reload_failed", f"the index could not be loaded, still serving version "
                               f"{self.watcher.state.version}: {type(e).__name__}: {strip_paths(str(e))}") from None
        return {"version": self.watcher.state.version, "reloaded": swapped}


def strip_paths(text: str) -> str:
    """Replace absolute filesystem paths in a message by their last component (do not leak server paths)."""
    return re.sub(r"(?<![\w.:/-])(?:[A-Za-z][\w+.-]*:/)?/[^\s'\"]*/([^\s'\"/]+)", r"\1", text)


class EncoderService:
    """The index's query encoder, or the reason it is unavailable; counts batches for /index."""

    def __init__(self, index_uri: str, device: str | None = None, allow_download: bool = False):
        manifest = Index(index_uri).read_manifest()
        self.query_spec = query_spec_from_manifest(manifest)
        self.encoder: QueryEncoder | None = None
        self.reason: str | None = None
        t0 = time.perf_counter()
        try:
            self.encoder = load_query_encoder(manifest, device=device, allow_download=allow_download)
        except EncoderUnavailable as e:
            self.reason = strip_paths(str(e))
            logger.warning("query encoder unavailable, /search will answer 503: %s", e)
        else:
            logger.info("query encoder ready in %.2f s (fast path: %s)", time.perf_counter() - t0, self.encoder.fast_path)
        self.batches = 0
        self.queries = 0
        self.max_batch = 0

    def check_available(self) -> None:
        if self.encoder is None:
            raise encoder_unavailable(self.reason)

    def encode(self, queries: list[str]) -> np.ndarray:
        """Δq for a batch of validated queries, (B, d) float32."""
        self.check_available()
        out = self.encoder.encode(list(queries))
        self.batches += 1
        self.queries += len(queries)
        self.max_batch = max(self.max_batch, len(queries))
        return out

    def info(self) -> dict:
        return {"available": self.encoder is not None, "reason": self.reason,
                "max_query_chars": self.query_spec.max_query_chars,
                "dim": None if self.encoder is None else self.encoder.dim,
                "fast_path": None if self.encoder is None else self.encoder.fast_path,
                "batches": self.batches, "queries": self.queries, "max_batch": self.max_batch}
