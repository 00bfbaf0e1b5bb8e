"""How the CLI prints: JSON, aligned tables, key/value blocks, ages and times."""

from __future__ import annotations

import json
import time
from typing import Any


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def fields(pairs: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"{key.ljust(width)}  {value}".rstrip())


def age(ts: float | None, now: float) -> str:
    return "-" if not ts else duration(now - ts)


def duration(seconds: float) -> str:
    secs = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def when(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({age(ts, now)} ago)"


def pairs(mapping: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (mapping or {}).items()) or "-"


def dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)
