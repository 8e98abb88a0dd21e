"""Online retrieval over an index: HTTP models, input validation, loading, the index watcher, the two services.

The Serve application itself is :func:`carlos_ray.serving.app.build_app` (kept out of this package's import so
that the CLI's in-process ``query`` / ``similar`` do not import Ray Serve and FastAPI). Rooms:

- ``args``: :class:`ServeArgs`, the typed builder arguments;
- ``errors``: :class:`ServiceError` (HTTP status, code, detail) and :class:`EncoderUnavailable`;
- ``http_models``: the request and response bodies (also the CLI's ``--json`` output);
- ``validation``: ``check_*`` of user input, the admin bearer token;
- ``loading``: :func:`load_ranker`, :func:`load_query_encoder` (fails fast when weights are not here);
- ``watcher``: :class:`IndexWatcher` (follows new index versions) and :class:`FixedIndex`;
- ``services``: :class:`RankerService`, :class:`EncoderService`, :func:`search_body`;
- ``app``: the FastAPI ingress, the deployments and ``build_app``.
"""

from carlos_ray.serving.args import ADMIN_TOKEN_ENV, DEFAULT_MAX_BATCH_QUERIES, DEFAULT_MAX_K, ServeArgs
from carlos_ray.serving.errors import EncoderUnavailable, ServiceError
from carlos_ray.serving.http_models import SearchResponse, SimilarResponse
from carlos_ray.serving.loading import (
    encoder_spec_from_manifest,
    load_query_encoder,
    load_ranker,
    query_spec_from_manifest,
    resolve_index_uri,
)
from carlos_ray.serving.services import EncoderService, RankerService, search_body
from carlos_ray.serving.validation import check_k, check_queries, check_query, check_thresholds
from carlos_ray.serving.watcher import FixedIndex, IndexWatcher, load_fixed_index

__all__ = [
    "load_fixed_index",
    "ADMIN_TOKEN_ENV", "DEFAULT_MAX_BATCH_QUERIES", "DEFAULT_MAX_K", "EncoderService", "EncoderUnavailable", "FixedIndex",
    "IndexWatcher", "RankerService", "SearchResponse", "ServeArgs", "ServiceError", "SimilarResponse", "check_k",
    "check_queries", "check_query", "check_thresholds", "encoder_spec_from_manifest",
    "load_query_encoder", "load_ranker", "query_spec_from_manifest", "resolve_index_uri", "search_body",
]
