"""`ServeArgs`: the typed arguments of the Serve app builder and of `carlos-ray serve`."""

from __future__ import annotations

from pydantic import Field

from carlos_ray.config import StrictModel

DEFAULT_MAX_K = 100
DEFAULT_MAX_BATCH_QUERIES = 32
ADMIN_TOKEN_ENV = "CARLOS_RAY_ADMIN_TOKEN"

class ServeArgs(StrictModel):
    """Arguments of ``carlos_ray.serving.app:build_app`` (the ``args:`` of serve/config.yaml) and of ``carlos-ray serve``."""

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
