"""Opaque cursors for list endpoints: a client passes back what it was given, nothing more."""

from __future__ import annotations

import base64
import json
from typing import Any

from federation.errors import BadRequest


def encode_cursor(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> dict[str, Any] | None:
    """The position a cursor stands for, or ``BadRequest`` if it was not made by us."""
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("cursor: not a cursor this server issued",
                         details={"field": "cursor"}) from None
    if not isinstance(value, dict):
        raise BadRequest("cursor: not a cursor this server issued", details={"field": "cursor"})
    return value
