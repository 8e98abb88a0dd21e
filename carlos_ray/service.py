"""Online retrieval: load a ranker and the index's own query encoder, validate requests, watch the index.

The Ray Serve app (``serve/app.py``) and the ``query`` / ``similar`` / ``serve`` CLI commands are thin
layers over this module:

- :func:`load_ranker` builds a :class:`~carlos_ray.ranker.Ranker` from one consistent snapshot of
  an index, with the manifest's thresholds as default filters;
- :func:`load_query_encoder` builds the index's own CLIP text encoder and context prompt set P'.
  Weights that are not on this machine fail fast with :class:`EncoderUnavailable` (nothing is
  downloaded unless asked), so a service can still answer ``similar`` and ``/loras`` requests;
- :class:`IndexWatcher` polls the manifest (one ``stat`` per period) and, when its ``version``
  changes, builds the new ranker completely before swapping one reference: a request that already
  holds the old state finishes on it, the next one sees the new index;
- ``check_*`` validate user input and raise :class:`ServiceError` (HTTP status, error code, detail);
- the pydantic models are the HTTP request and response bodies (and the CLI's ``--json`` output).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from carlos_ray.config import EncoderSpec, QuerySpec, SamplingSpec, StrictModel
from carlos_ray.ranker import Hit, Ranker, UnknownLora
from carlos_ray.store import MANIFEST, Index, IndexError_

if TYPE_CHECKING:  # pragma: no cover
    from carlos_ray.query import QueryEncoder

logger = logging.getLogger(__name__)

DEFAULT_MAX_K = 100
DEFAULT_MAX_BATCH_QUERIES = 32
ADMIN_TOKEN_ENV = "CARLOS_RAY_ADMIN_TOKEN"


# ---- errors ------------------------------------------------------------------------------------------
class ServiceError(Exception):
    """A request the service answers with an error: HTTP ``status``, a short ``error`` code and a ``detail``."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(status, error, detail)
        self.status, self.error, self.detail = int(status), str(error), str(detail)

    def __str__(self) -> str:
        return f"{self.error}: {self.detail}"

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


class EncoderUnavailable(RuntimeError):
    """The index's query encoder cannot be built on this machine (the message says why)."""


# ---- typed serve config ----------------------------------------------------------------------------
class ServeArgs(StrictModel):
    """Arguments of ``serve.app:build_app`` (the ``args:`` of serve/config.yaml) and of ``carlos-ray serve``."""

    index: str = Field(..., description="Index directory or URI to serve.")
    host: str = Field("127.0.0.1", description="Interface `carlos-ray serve` binds (with `serve run`, the YAML's http_options rule).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of `carlos-ray serve` (with `serve run`, the YAML's http_options rule).")
    max_k: int = Field(DEFAULT_MAX_K, ge=10, le=10_000, description="Largest `k` a request may ask for (the default k is 10).")
    max_batch_queries: int = Field(DEFAULT_MAX_BATCH_QUERIES, ge=1, le=1024, description="Most queries in one POST /search body.")
    poll_seconds: float = Field(2.0, gt=0, le=3600, description="How often the ranker checks the index manifest for a new version.")
    admin_token_env: str = Field(
        ADMIN_TOKEN_ENV, description="Environment variable holding the bearer token of POST /admin/reload (unset: endpoint disabled)."
    )
    device: str | None = Field(None, description="Torch device of the query encoder; None = the index's encoder device.")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch.set_num_threads in the encoder replica; None = torch default.")
    allow_download: bool = Field(False, description="Let the encoder download missing pretrained weights (off: fail fast, serve without /search).")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most queries the encoder replica encodes in one batch (`@serve.batch`).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="How long a batch waits to fill up before it runs.")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="Per-request time limit inside the app; beyond it the answer is 503.")
    max_body_bytes: int = Field(65536, ge=1024, le=64 << 20, description="Largest request body; a longer one is refused with 413.")
    max_url_chars: int = Field(4096, ge=256, le=1 << 20, description="Longest path plus query string; a longer one is refused with 414.")
    encoder_replicas: int = Field(1, ge=1, le=1024, description="Replicas of the query-encoder deployment.")
    ranker_replicas: int = Field(1, ge=1, le=1024, description="Replicas of the ranker deployment.")
    encoder_num_cpus: float = Field(1.0, ge=0, le=256, description="CPUs reserved per encoder replica.")
    encoder_num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs per encoder replica.")
    ranker_num_cpus: float = Field(0.5, ge=0, le=256, description="CPUs reserved per ranker replica.")
    ingress_num_cpus: float = Field(0.25, ge=0, le=256, description="CPUs reserved per ingress replica.")


# ---- request / response models -------------------------------------------------------------------
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


# ---- validation ------------------------------------------------------------------------------------
def check_query(q: Any, max_chars: int, where: str = "q") -> str:
    """The stripped query, or ServiceError 422 for a non-string, empty/whitespace or over-long query."""
    if not isinstance(q, str):
        raise ServiceError(422, "invalid_query", f"{where} must be a string, got {type(q).__name__}")
    if len(q) > max_chars:
        raise ServiceError(422, "query_too_long", f"{where} has {len(q)} characters; the limit is {max_chars} "
                           "(the index's query.max_query_chars)")
    text = q.strip()
    if not text:
        raise ServiceError(422, "empty_query", f"{where} is empty or only whitespace; give a text query such as 'watercolor'")
    return text


def check_k(k: Any, max_k: int) -> int:
    """``k`` as an int in [1, max_k], or ServiceError 422."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ServiceError(422, "invalid_k", f"k must be an integer from 1 to {max_k}, got {k!r}")
    if not 1 <= int(k) <= max_k:
        raise ServiceError(422, "invalid_k", f"k must be from 1 to {max_k}, got {k}")
    return int(k)


def check_thresholds(max_strength: Any, min_consistency: Any) -> tuple[float | None, float | None]:
    """Validated filter overrides: ``max_strength`` >= 0 (``inf`` switches it off), ``min_consistency`` in [0, 1]."""
    out = []
    for name, value, low, high in (("max_strength", max_strength, 0.0, math.inf), ("min_consistency", min_consistency, 0.0, 1.0)):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ServiceError(422, "invalid_threshold", f"{name} must be a number, got {value!r}")
        v = float(value)
        if math.isnan(v) or not low <= v <= high:
            valid = "a number >= 0 (inf: no strength filter)" if high == math.inf else "a number from 0 to 1"
            raise ServiceError(422, "invalid_threshold", f"{name} must be {valid}, got {value!r}")
        out.append(v)
    return out[0], out[1]


def check_queries(queries: Sequence[Any], max_chars: int, max_queries: int) -> list[str]:
    """Validate a batch of queries; errors name the offending position."""
    if not isinstance(queries, (list, tuple)) or not queries:
        raise ServiceError(422, "invalid_query", f"queries must be a non-empty list of 1 to {max_queries} strings")
    if len(queries) > max_queries:
        raise ServiceError(422, "too_many_queries", f"queries has {len(queries)} items; at most {max_queries} per request")
    return [check_query(q, max_chars, where=f"queries[{i}]") for i, q in enumerate(queries)]


# ---- loading -----------------------------------------------------------------------------------------
def resolve_index_uri(uri: str) -> str:
    """A local index path made absolute (so remote replicas and other working directories agree); URIs unchanged."""
    return str(uri) if "://" in str(uri) else os.path.abspath(os.path.expanduser(str(uri)))


def _ranker_from_snapshot(snapshot: Any, where: str) -> Ranker:
    table = snapshot.signatures()
    if table is None or table.num_rows == 0:
        raise IndexError_(f"index {where} holds no signatures (version {snapshot.manifest.get('version')}); index some LoRAs first")
    th = snapshot.manifest.get("thresholds") or {}
    return Ranker.from_table(table, max_strength=th.get("max_strength"), min_consistency=th.get("min_consistency"))


def load_ranker(index_uri: str) -> tuple[Ranker, dict]:
    """A Ranker over one consistent snapshot of the index (manifest thresholds as default filters) and its manifest."""
    snap = Index(index_uri).snapshot()
    return _ranker_from_snapshot(snap, index_uri), snap.manifest


def encoder_spec_from_manifest(manifest: dict, device: str | None = None) -> EncoderSpec:
    """The EncoderSpec the index was built with (``device`` overrides where it runs)."""
    raw = dict(manifest.get("encoder") or {})
    if device is not None:
        raw["device"] = device
    try:
        return EncoderSpec.model_validate(raw)
    except ValueError as e:
        raise EncoderUnavailable(f"the index manifest's encoder {raw!r} is not a valid encoder spec: {e}") from None


def query_spec_from_manifest(manifest: dict) -> QuerySpec:
    return QuerySpec.model_validate(manifest.get("query") or {})


def context_texts_from_manifest(manifest: dict) -> list[str]:
    """The context prompt set P' named by the manifest (paths relative to the repo resolve there)."""
    from carlos_ray.prompts import load_prompt_set

    raw = manifest.get("sampling") or {}
    defaults = SamplingSpec()
    path = raw.get("context_prompts") or defaults.context_prompts
    subset = raw.get("context_subset", defaults.context_subset)
    return list(load_prompt_set(path, subset).texts)


def encoder_unavailable_reason(spec: EncoderSpec, allow_download: bool = False) -> str | None:
    """Why the encoder's weights cannot be loaded here without a download, or None if they can.

    Checks local files and the Hugging Face cache only; never touches the network."""
    if spec.arch == "tiny" or spec.pretrained is None:
        return None
    local = Path(spec.pretrained).expanduser()
    if local.exists():
        return None if local.suffix == ".safetensors" else f"encoder checkpoint {local.name} is not a .safetensors file"
    import open_clip

    if spec.arch not in open_clip.list_models():
        return f"unknown open_clip architecture {spec.arch!r}"
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        return f"encoder.pretrained {spec.pretrained!r} is neither a local file nor an open_clip tag of {spec.arch} (tags: {tags})"
    hub = cfg.get("hf_hub", "")
    if not hub:
        return (f"encoder weights {spec.arch}/{spec.pretrained} are only published as a pickle checkpoint, which carlos-ray "
                "does not load; point encoder.pretrained to a local .safetensors file")
    if allow_download:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = os.path.split(hub)  # 'org/name/file', or 'org/name/' for the default file name
    filename = filename or "open_clip_pytorch_model.bin"
    safe = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else filename.rsplit(".", 1)[0] + ".safetensors"
    if isinstance(try_to_load_from_cache(repo_id, safe), str):
        return None
    return (f"encoder weights {spec.arch}/{spec.pretrained} are not on this machine ({repo_id}/{safe} is not in the Hugging "
            f"Face cache) and downloads are off; fetch them first (huggingface-cli download {repo_id} {safe}) or "
            "allow downloads (`--allow-download`, or serve arg allow_download: true)")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub refuse network access (it reads the flag at import time, so set both)."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc

        old_const = hc.HF_HUB_OFFLINE
        hc.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        hc = None
    try:
        yield
    finally:
        if hc is not None:
            hc.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def load_query_encoder(manifest: dict, device: str | None = None, allow_download: bool = False) -> "QueryEncoder":
    """The index's own query encoder: its CLIP text tower, its context prompts P' and its joiner.

    Raises :class:`EncoderUnavailable` at once (no network wait) when the weights are not on this
    machine and ``allow_download`` is off, or when the encoder cannot be built for another reason."""
    from carlos_ray.query import QueryEncoder

    spec = encoder_spec_from_manifest(manifest, device)
    reason = encoder_unavailable_reason(spec, allow_download)
    if reason is not None:
        raise EncoderUnavailable(reason)
    query = query_spec_from_manifest(manifest)
    try:
        texts = context_texts_from_manifest(manifest)
    except (OSError, ValueError) as e:
        raise EncoderUnavailable(f"cannot load the index's context prompt set: {e}") from None
    from carlos_ray.models import create_encoder

    try:
        with contextlib.nullcontext() if allow_download else _hub_offline():
            enc = create_encoder(spec)
    except Exception as e:  # any failure to build the model means: no /search on this machine
        raise EncoderUnavailable(f"cannot build the index's encoder {spec.arch}/{spec.pretrained}: {type(e).__name__}: {e}") from None
    return QueryEncoder(enc.model, enc.tokenizer, texts, joiner=query.joiner, cache_size=query.cache_size, device=spec.device)


# ---- results ---------------------------------------------------------------------------------------
def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def hit_models(hits: Sequence[Hit]) -> list[HitModel]:
    return [
        HitModel(rank=i + 1, lora_id=h.lora_id, score=float(h.score), strength=_finite(h.strength),
                 consistency=_finite(h.consistency), name=h.name, description=h.description,
                 trigger_words=list(h.trigger_words or []))
        for i, h in enumerate(hits)
    ]


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN), containers recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return None
    return value


def effective_thresholds(ranker: Ranker, max_strength: float | None, min_consistency: float | None) -> tuple[float | None, float | None]:
    ms = ranker.max_strength if max_strength is None else max_strength
    mc = ranker.min_consistency if min_consistency is None else min_consistency
    return (None if ms is None or math.isinf(ms) else ms), mc


# ---- the ranker side: a watched index ----------------------------------------------------------------
@dataclass(frozen=True)
class IndexState:
    """One loaded index version: swapped as a whole, never mutated."""

    ranker: Ranker
    manifest: dict
    loaded_at: float

    @property
    def version(self) -> int:
        return int(self.manifest.get("version", 0))


class IndexWatcher:
    """Holds the current :class:`IndexState` of an index and swaps in newer versions.

    ``refresh()`` stats the manifest (one metadata call); only when it changed is the manifest read,
    and only when its ``version`` differs is a new Ranker built, completely, before the reference
    swap. Readers take ``watcher.state`` once per request and keep using it."""

    def __init__(self, index_uri: str, poll_seconds: float = 2.0):
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds!r}")
        self.index = Index(index_uri)
        self.poll_seconds = float(poll_seconds)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.reloads = 0
        stamp = self._stamp()
        snap = self.index.snapshot()
        self._state = IndexState(_ranker_from_snapshot(snap, index_uri), snap.manifest, time.time())
        self._seen = stamp

    @property
    def state(self) -> IndexState:
        return self._state

    def _stamp(self) -> tuple | None:
        import pyarrow.fs as pafs

        info = self.index.fs.get_file_info(f"{self.index.root}/{MANIFEST}")
        if info.type != pafs.FileType.File or info.mtime_ns is None:
            return None  # unknown: read the manifest every time
        return (info.mtime_ns, info.size)

    def refresh(self, force: bool = False) -> bool:
        """Load a newer index version if there is one (``force``: rebuild even at the same version). True if swapped."""
        with self._lock:
            stamp = self._stamp()
            if not force and stamp is not None and stamp == self._seen:
                return False
            snap = self.index.snapshot()
            if not force and snap.manifest.get("version") == self._state.manifest.get("version"):
                self._seen = stamp
                return False
            t0 = time.perf_counter()
            ranker = _ranker_from_snapshot(snap, self.index.uri)
            self._state = IndexState(ranker, snap.manifest, time.time())  # the swap: one reference assignment
            self._seen = stamp
            self.reloads += 1
            self.last_error = None
            logger.info("index %s: now serving version %s (%d LoRAs, built in %.2f s)", self.index.uri,
                        snap.manifest.get("version"), len(ranker), time.perf_counter() - t0)
            return True

    def start(self) -> None:
        """Poll in a daemon thread every ``poll_seconds``; failures keep the current version and are retried."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.refresh()
                except Exception as e:  # keep serving the version we have
                    msg = f"{type(e).__name__}: {e}"
                    if msg != self.last_error:
                        logger.warning("index %s: reload failed, still serving version %s: %s", self.index.uri,
                                       self._state.version, msg)
                    self.last_error = msg

        self._thread = threading.Thread(target=loop, name="carlos-ray-index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class FixedIndex:
    """One loaded index version that never changes (the CLI answers a single request from it)."""

    def __init__(self, ranker: Ranker, manifest: dict):
        self.state = IndexState(ranker, manifest, time.time())
        self.last_error: str | None = None

    def refresh(self, force: bool = False) -> bool:
        return False


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

    def search(self, vectors: np.ndarray, k: int, max_strength: float | None, min_consistency: float | None) -> dict:
        """Top-k hits for each row of ``vectors`` (B, d) on the current index version."""
        state = self.watcher.state
        q = np.asarray(vectors, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != state.ranker.dim:
            raise ServiceError(503, "index_encoder_mismatch", f"query vectors have width {q.shape[-1]} but the index "
                               f"directions have width {state.ranker.dim}; the index was re-built with another encoder, restart the service")
        norms = np.linalg.norm(q, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if bad.size:
            raise ServiceError(422, "query_has_no_effect", f"query {int(bad[0])} leaves every context prompt's text features "
                               "unchanged (e.g. it has no tokens the tokenizer keeps); try other words")
        hits = state.ranker.search(q, k=k, max_strength=max_strength, min_consistency=min_consistency)
        ms, mc = effective_thresholds(state.ranker, max_strength, min_consistency)
        return {"k": k, "max_strength": ms, "min_consistency": mc, "index_version": state.version,
                "hits": [[h.model_dump() for h in hit_models(row)] for row in hits]}

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

        return {"lora_id": lora_id, "index_version": state.version, "dim": state.ranker.dim, "signature": _json_safe(row),
                "intervals": _json_safe(stated_intervals(row))}

    def summary(self) -> dict:
        """Manifest summary and counts of the version being served (no local paths)."""
        state = self.watcher.state
        m = state.manifest
        enc = m.get("encoder") or {}
        return {
            "version": state.version, "created_at": m.get("created_at"), "updated_at": m.get("updated_at"),
            "config_name": m.get("config_name"), "config_hash": m.get("config_hash"), "source": m.get("source"),
            "encoder": {k: enc.get(k) for k in ("kind", "arch", "pretrained", "dtype")},
            "query": query_spec_from_manifest(m).model_dump(), "thresholds": _json_safe(m.get("thresholds") or {}),
            "counts": _json_safe(m.get("counts") or {}), "loras": len(state.ranker), "dim": state.ranker.dim,
            "last_reload_error": self.watcher.last_error,
        }

    def version(self) -> int:
        return self.watcher.state.version

    def reload(self) -> dict:
        try:
            swapped = self.watcher.refresh(force=True)
        except Exception as e:
            raise ServiceError(409, "reload_failed", f"the index could not be loaded, still serving version "
                               f"{self.watcher.state.version}: {type(e).__name__}: {_strip_paths(str(e))}") from None
        return {"version": self.watcher.state.version, "reloaded": swapped}


def _strip_paths(text: str) -> str:
    """Replace absolute filesystem paths in a message by their last component (do not leak server paths)."""
    import re

    return re.sub(r"(?<![\w.:/-])(?:[A-Za-z][\w+.-]*:/)?/[^\s'\"]*/([^\s'\"/]+)", r"\1", text)


# ---- the encoder side ------------------------------------------------------------------------------
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
            self.reason = _strip_paths(str(e))
            logger.warning("query encoder unavailable, /search will answer 503: %s", e)
        else:
            logger.info("query encoder ready in %.2f s (fast path: %s)", time.perf_counter() - t0, self.encoder.fast_path)
        self.batches = 0
        self.queries = 0
        self.max_batch = 0

    def check_available(self) -> None:
        if self.encoder is None:
            raise ServiceError(503, "encoder_unavailable", f"text search is unavailable on this server: {self.reason}; "
                               "/loras and /loras/{id}/similar still work")

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


def token_digest(token: str) -> str:
    """SHA-256 hex of an admin token (the app keeps only this)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_bearer(authorization: str | None, expected_digest: str | None, env_name: str) -> None:
    """401 without a bearer token, 403 with a wrong one or when no token is configured."""
    import hmac

    if expected_digest is None:
        raise ServiceError(403, "admin_disabled", f"admin endpoints are disabled: set the environment variable {env_name} "
                           "to a token before starting the service")
    if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise ServiceError(401, "unauthorized", "this endpoint needs an 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(token_digest(authorization[7:].strip()), expected_digest):
        raise ServiceError(403, "forbidden", "the bearer token is not valid for this service")
