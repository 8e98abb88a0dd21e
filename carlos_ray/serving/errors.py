"""Errors of the retrieval service: an HTTP status, a short code and a detail that says what would be valid."""

from __future__ import annotations

SEARCH_STILL_WORKS = "/loras and /loras/{id}/similar still work"


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


def encoder_unavailable(reason: str | None) -> ServiceError:
    """The 503 of a text search on a server whose query encoder could not be built (the reason says why)."""
    return ServiceError(503, "encoder_unavailable", f"text search is unavailable on this server: {reason}; {SEARCH_STILL_WORKS}")
