"""API errors in OpenAI's shape, and the mapping from engine and Ray errors to HTTP statuses.

Every error the server returns is ``{"error": {"message", "type", "param", "code"}}`` with a fitting status, so the
official ``openai`` client raises its usual exception classes (``BadRequestError``, ``NotFoundError``,
``RateLimitError`` ...). A model replica returns its ``APIError`` as a value rather than raising it across Ray
(backend.py), so it reaches the client unchanged. This module imports no torch: the gateway process stays small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# HTTP status -> OpenAI error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


@dataclass
class APIError(Exception):
    """An error answer: HTTP status, a message for people, the offending field (``param``) and a stable code."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None  # seconds; sent as the Retry-After header (429/503)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def __reduce__(self):  # pickles by its fields (Exception's own pickling would pass the message alone)
        return type(self), (self.status, self.message, self.param, self.code, self.retry_after)


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    """A 400 naming the field; ``message`` should state the allowed range."""
    return APIError(400, message, param=param, code=code)

