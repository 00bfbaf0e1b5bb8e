"""Strict JSON for what clients send: request bodies and the cursors they hand back.

Python's ``json`` takes ``NaN`` and ``Infinity`` (which then pass every number check, since
every comparison with NaN is false), lone surrogates such as ``"\\ud800"`` (which SQLite and
UTF-8 encoders then refuse) and nesting until the interpreter's recursion limit. orjson takes
none of these: it parses RFC 8259 JSON of valid UTF-8, at most 1024 levels deep. When it
refuses a body, the stdlib parser tells the two cases apart: text no JSON parser takes is a
400 (malformed request), JSON text whose values we refuse is a 422 (the error tree's rule).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from federation.errors import BadRequest, Invalid

MAX_DEPTH = 1024  # orjson's own limit; the deepest valid body is under ten levels


class _Constant(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _Constant(name)


def loads(raw: bytes, what: str = "body") -> Any:
    """The JSON value of ``raw``: ``BadRequest`` if it is not JSON at all, ``Invalid`` if it is
    JSON with NaN/Infinity, a lone surrogate, a number out of float range or nesting deeper
    than ``MAX_DEPTH``."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        strict_error = str(exc)
    # The slow path runs only for bodies we refuse anyway: say why as precisely as we can.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what}: not valid UTF-8", details={"field": what}) from None
    try:
        json.loads(text, parse_constant=_refuse_constant)
    except _Constant as exc:
        raise Invalid(f"{what}: {exc} is not a JSON number",
                      details={"field": what, "rule": "number"}) from None
    except RecursionError:
        raise Invalid(f"{what}: nested deeper than {MAX_DEPTH} levels",
                      details={"field": what, "rule": "depth"}) from None
    except ValueError:
        raise BadRequest(f"{what}: not valid JSON ({strict_error})",
                         details={"field": what}) from None
    # Python took it, orjson did not: a lone surrogate, a depth over the limit, 1e400.
    raise Invalid(f"{what}: not strict JSON ({strict_error})",
                  details={"field": what, "rule": "strict"})
