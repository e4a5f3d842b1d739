"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The openai SDK turns the status into its own exception class (400 BadRequestError, 403
PermissionDeniedError, 404 NotFoundError, 413/4xx APIStatusError, 429 RateLimitError, 5xx
InternalServerError), so the status is part of the contract, and `code` says which rule fired.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

INVALID_REQUEST = "invalid_request_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
UPSTREAM = "upstream_error"
SERVER = "server_error"


class ApiError(Exception):
    """A request the gateway answers itself, with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


def bad_request(message: str, code: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, INVALID_REQUEST, code, param=param)


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, rounded up, at least one."""
    return str(max(1, math.ceil(seconds)))
