"""One error tree for the whole project, and the one JSON shape every API error has.

    OutpostError                 base; ``status`` is the HTTP status it maps to
    ├── BadRequest (400)         malformed request: not JSON, bad query parameter
    ├── Unauthorized (401)       no token or an unknown token
    ├── Forbidden (403)          a token whose role may not do this
    ├── NotFound (404)           unknown route, task, agent
    ├── Conflict (409)           state or generation conflict, duplicate
    ├── RequestTimeout (408)     the request body came too slowly
    ├── PayloadTooLarge (413)    request body over the limit
    ├── Invalid (422)            well-formed but a field is wrong, or cannot fit the agent
    ├── TooManyRequests (429)    a per-token limit (request rate, open streams); Retry-After
    ├── Unavailable (503)        the thing exists but cannot answer now (edge offline)
    ├── InsufficientStorage (507) the node's disk is full: the write was not stored
    └── ConfigError              bad configuration file, env or flag (CLI exit, no HTTP)
"""

from __future__ import annotations

from typing import Any


class OutpostError(Exception):
    """Base of every error Outpost raises on purpose."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)

    def headers(self) -> dict[str, str]:
        """HTTP headers the error response carries besides its body (none by default)."""
        return {}


class BadRequest(OutpostError):
    status = 400
    code = "bad_request"


class Unauthorized(OutpostError):
    status = 401
    code = "unauthorized"


class Forbidden(OutpostError):
    status = 403
    code = "forbidden"


class NotFound(OutpostError):
    status = 404
    code = "not_found"


class Conflict(OutpostError):
    status = 409
    code = "conflict"


class RequestTimeout(OutpostError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(OutpostError):
    status = 413
    code = "payload_too_large"


class Invalid(OutpostError):
    status = 422
    code = "invalid"


class TooManyRequests(OutpostError):
    """A per-token limit was hit; ``retry_after`` (seconds, None: when a stream closes) says
    when trying again can work, sent as the ``Retry-After`` header too."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class Unavailable(OutpostError):
    """Not now: NATS, the store or (at a hub standby) the leader cannot be had; with
    ``retry_after`` (seconds) sent as the ``Retry-After`` header too."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class InsufficientStorage(OutpostError):
    """The node's disk is full: nothing of the request was stored (retry once space returns)."""

    status = 507
    code = "insufficient_storage"


class ConfigError(OutpostError):
    """A configuration value is wrong; the message names the setting and the source."""

    status = 400
    code = "config"


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The single JSON shape of every error response."""
    return {"error": {"code": code, "message": message, "details": details or {}}}
