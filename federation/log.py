"""Logging set-up for the commands (only ``__main__`` modules call this): text or JSON lines;
``redact_url`` for addresses that may carry a password (nothing secret goes to a log); and
``Throttled``, for lines a hostile peer could otherwise make us write at its own rate.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per line, with the record's ``extra`` fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _STD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class Text(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.converter = time.gmtime


def configure(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else Text())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def redact_url(url: str) -> str:
    """``url`` without secrets in its user part: ``nats://u:pw@h`` -> ``nats://u:***@h``, and
    ``nats://TOKEN@h`` (NATS token auth) -> ``nats://***@h``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***" if parts.password is not None else "***"
    return parts._replace(netloc=f"{user}@{host}").geturl()


class Throttled:
    """At most one line per ``key`` every ``every_s``: the first at once, the ones in between
    counted and named in the next (a peer that can make us log cannot fill the disk)."""

    MAX_KEYS = 1000  # keys are error codes and the like; a flood of new keys resets the map

    def __init__(self, logger: logging.Logger, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (logged at, held back since)

    def warning(self, key: str, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        now = self.clock()
        at, held = self._seen.get(key, (-self.every_s, 0))
        if now - at < self.every_s:
            self._seen[key] = (at, held + 1)
            return
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            msg += f" (and {held} more like it in the last {self.every_s:g} s)"
        self.logger.warning(msg, *args, extra={**(extra or {}), "held_back": held})
