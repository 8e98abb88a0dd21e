"""Validation of user input (query text, k, filters, admin token): a bad value is a ServiceError 4xx naming it."""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any, Sequence

import numpy as np

from carlos_ray.serving.errors import ServiceError


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


def token_digest(token: str) -> str:
    """SHA-256 hex of an admin token (the app keeps only this)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_bearer(authorization: str | None, expected_digest: str | None, env_name: str) -> None:
    """401 without a bearer token, 403 with a wrong one or when no token is configured."""
    if expected_digest is None:
        raise ServiceError(403, "admin_disabled", f"admin endpoints are disabled: set the environment variable {env_name} "
                           "to a token before starting the service")
    if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise ServiceError(401, "unauthorized", "this endpoint needs an 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(token_digest(authorization[7:].strip()), expected_digest):
        raise ServiceError(403, "forbidden", "the bearer token is not valid for this service")
