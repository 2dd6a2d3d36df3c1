"""The service's error types. Each carries a stable ``code``, a human message, optional ``details`` and the HTTP
status the API answers with (the engine itself knows nothing of HTTP; the status is data for the API layer).

The API renders every error as ``{"error": {"code": ..., "message": ..., "details": ...}}``.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(ServiceError):
    """The request is well-formed JSON but asks for something invalid (422)."""

    status = 422
    code = "invalid_request"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class Conflict(ServiceError):
    """The request conflicts with the current state (409): a registered id with other attributes, a bundle
    without the component the operation needs, a reload already running."""

    status = 409
    code = "conflict"


class Overloaded(ServiceError):
    status = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after: float, details: Any = None) -> None:
        super().__init__(message, details)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, int(-(-self.retry_after // 1))))}  # whole seconds, rounded up


class NotReady(ServiceError):
    status = 503
    code = "not_ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class RequestTimeout(ServiceError):
    status = 504
    code = "timeout"
