"""Errors the server answers with: an HTTP status, a type and a message, always as JSON."""

from __future__ import annotations

from ..errors import DeltaError, DeltaFileError, DeltaStateError, FingerprintError, NotApplicableError


class ApiError(DeltaError):
    """A request the server refuses: ``{"error": {"type", "message", **extra}}`` with ``status``.

    Args:
        status: the HTTP status code.
        kind: a short machine-readable type (``"unknown_delta"``, ``"queue_full"``, ...).
        message: what is wrong and how to fix it.
        headers: extra response headers (``Retry-After``).
        extra: more fields for the error object (``"limit"``, ``"fingerprint"``).
    """

    def __init__(self, status: int, kind: str, message: str, *, headers: dict[str, str] | None = None,
                 **extra: object) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict:
        return {"error": {"type": self.kind, "message": self.message, **self.extra}}


def as_api_error(error: BaseException) -> ApiError:
    """The :class:`ApiError` for an error raised while serving a request (500 for a bug)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, FingerprintError):
        return ApiError(409, "other_base", str(error))
    if isinstance(error, DeltaFileError):
        return ApiError(409, "delta_does_not_fit", str(error))
    if isinstance(error, (DeltaStateError, NotApplicableError)):
        return ApiError(400, "delta_state", str(error))
    if isinstance(error, DeltaError):
        return ApiError(400, "bad_request", str(error))
    return ApiError(500, "internal", f"{type(error).__name__}: {error}")

