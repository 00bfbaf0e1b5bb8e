"""One error tree for the whole project, and the one JSON shape every API error has.

    OutpostError                 base; ``status`` is the HTTP status it maps to
    ├── BadRequest (400)         malformed request: not JSON, bad query parameter
    ├── Unauthorized (401)       no token or an unknown token
    ├── Forbidden (403)          a token whose role may not do this
    ├── NotFound (404)           unknown route, task, agent
    ├── Conflict (409)           state or generation conflict, duplicate
    ├── PayloadTooLarge (413)    request body over the limit
    ├── Invalid (422)            well-formed but a field is wrong, or cannot fit the agent
    ├── Unavailable (503)        the thing exists but cannot answer now (edge offline)
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


class PayloadTooLarge(OutpostError):
    status = 413
    code = "payload_too_large"


class Invalid(OutpostError):
    status = 422
    code = "invalid"


class Unavailable(OutpostError):
    status = 503
    code = "unavailable"


class ConfigError(OutpostError):
    """A configuration value is wrong; the message names the setting and the source."""

    status = 400
    code = "config"


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The single JSON shape of every error response."""
    return {"error": {"code": code, "message": message, "details": details or {}}}
