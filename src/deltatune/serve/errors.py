"""Errors the server answers with: an HTTP status, a type and a message, always as JSON."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

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



class ErrorDetail(BaseModel):
    """What went wrong: a machine-readable ``type``, a ``message`` naming the fix, and extra fields
    (``limit``, ``fields``, ``fingerprint``) where they apply."""

    model_config = ConfigDict(extra="allow")

    type: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


#: what each error status means, for the OpenAPI schema
STATUS_MEANINGS = {
    400: "the request cannot be served as asked (empty input, a bad delta name, a limit, the wrong task)",
    401: "no admin bearer token", 403: "a wrong admin bearer token", 404: "no such delta, model or route",
    405: "the route does not take this method (see the Allow header)",
    409: "the delta was made for another base, or does not fit it", 413: "too many or too long inputs",
    422: "the body or a parameter is malformed (the message names the field)",
    503: "the queue is full (see Retry-After)", 504: "no answer within the server's timeout",
}


def error_responses(*statuses: int) -> dict:
    """The OpenAPI ``responses`` of a route that answers with these error statuses."""
    return {status: {"model": ErrorBody, "description": STATUS_MEANINGS[status]} for status in statuses}
