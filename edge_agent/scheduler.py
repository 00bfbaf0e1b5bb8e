"""Local admission: which pending tasks may start now, given the agent's capacity.

Tasks are considered in submission order; a task that does not fit keeps waiting with a reason
a person can read, and a smaller task behind it may still start (no head-of-line blocking).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Capacity:
    """Resources: ``cpus`` (float) and ``mem_mb``, ``disk_mb`` (int)."""

    cpus: float
    mem_mb: int
    disk_mb: int = 0

    def fits(self, need: dict[str, Any]) -> bool:
        return (need.get("cpus", 0) <= self.cpus + 1e-9 and need.get("mem_mb", 0) <= self.mem_mb
                and need.get("disk_mb", 0) <= self.disk_mb)

    def take(self, need: dict[str, Any]) -> None:
        self.cpus -= need.get("cpus", 0)
        self.mem_mb -= need.get("mem_mb", 0)
        self.disk_mb -= need.get("disk_mb", 0)


@dataclass(slots=True)
class Admission:
    """Result of one pass: ``start`` ids in order, ``waiting`` id -> reason."""

    start: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)


def free_capacity(total: Capacity, reserved: list[dict[str, Any]]) -> Capacity:
    free = Capacity(total.cpus, total.mem_mb, total.disk_mb)
    for need in reserved:
        free.take(need)
    return free


def shortfall(free: Capacity, need: dict[str, Any]) -> str:
    parts = []
    if need.get("cpus", 0) > free.cpus + 1e-9:
        parts.append(f"{need['cpus']:g} cpus wanted, {max(free.cpus, 0):g} free")
    if need.get("mem_mb", 0) > free.mem_mb:
        parts.append(f"{need['mem_mb']} MB memory wanted, {max(free.mem_mb, 0)} MB free")
    if need.get("disk_mb", 0) > free.disk_mb:
        parts.append(f"{need['disk_mb']} MB disk wanted, {max(free.disk_mb, 0)} MB free")
    return "waiting for capacity: " + "; ".join(parts)


def admit(pending: list[tuple[str, dict[str, Any]]], free: Capacity) -> Admission:
    """Pick which of ``pending`` (id, resources), in submission order, start now."""
    out = Admission()
    for task_id, need in pending:
        if free.fits(need):
            free.take(need)
            out.start.append(task_id)
        else:
            out.waiting[task_id] = shortfall(free, need)
    return out
