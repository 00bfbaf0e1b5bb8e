"""A task's state history, as edge and core both answer ``GET /v1/tasks/{id}/history``.

Each node keeps the task states it was told about (the edge: its event log; the core: what
ingest applied). Both reduce them the same way here: one entry per change of state (a repeat
of the same state, such as a health or pid update, is not a change), the newest
``HISTORY_LIMIT`` kept, oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from federation.schemas import HISTORY_LIMIT

Entry = dict[str, Any]


def entry(ts: float, task: dict[str, Any]) -> Entry:
    """The history entry for a task record (as the API returns tasks) seen at ``ts``."""
    return {"ts": ts, "state": task.get("state"), "exit_code": task.get("exit_code"),
            "reason": task.get("reason"), "generation": task.get("generation"),
            "restarts": task.get("restarts")}


def collapse(entries: Iterable[Entry], limit: int = HISTORY_LIMIT) -> list[Entry]:
    """Entries oldest first, one per change of state (or of generation or restart count)."""
    out: list[Entry] = []
    for e in entries:
        if out and _same(out[-1], e):
            continue
        out.append(e)
    return out[-limit:]


def _same(a: Entry, b: Entry) -> bool:
    return (a["state"], a.get("generation"), a.get("restarts")) == (
        b["state"], b.get("generation"), b.get("restarts"))
