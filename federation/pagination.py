"""Opaque cursors for list endpoints: a client passes back what it was given, nothing more.

A cursor is client input like any other: decoding checks that it has exactly the fields the
list issued, each of the issued type and within what SQLite can compare (a 64-bit integer, a
short string of valid text), so a forged one is a 400, never an overflow or a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import orjson

from federation.errors import BadRequest

MAX_INT = 2**63 - 1  # SQLite's INTEGER
MAX_STR = 256


def encode_cursor(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, **fields: type) -> dict[str, Any] | None:
    """The position a cursor stands for (None without one), or ``BadRequest`` if it was not
    made by us. ``fields`` name the keys it must have and their types (``int``, ``float``: a
    finite non-negative number, or ``str``)."""
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = orjson.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error):  # orjson.JSONDecodeError is a ValueError
        raise _foreign() from None
    if not isinstance(value, dict) or (fields and value.keys() != fields.keys()):
        raise _foreign()
    for key, kind in fields.items():
        item = value[key]
        if kind is int and not (type(item) is int and 0 <= item <= MAX_INT):
            raise _foreign()
        if kind is float and not (type(item) in (int, float) and math.isfinite(item)
                                  and 0 <= item <= MAX_INT):
            raise _foreign()
        if kind is str and not (isinstance(item, str) and len(item) <= MAX_STR
                                and "\x00" not in item):
            raise _foreign()
    return value


def _foreign() -> BadRequest:
    return BadRequest("cursor: not a cursor this server issued", details={"field": "cursor"})
