"""Restart decisions: pure functions over a task's restart spec and its last exit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A run that lasted this long counts as healthy: the backoff starts over.
BACKOFF_RESET_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class RestartDecision:
    """``restart``: run again; ``delay``: seconds to wait first; ``why``: for the task reason."""

    restart: bool
    delay: float
    why: str


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code > 128:
        return f"exit {code} (signal {code - 128})"
    return f"exit {code}"


def decide_restart(restart: dict[str, Any], *, failed: bool, restarts: int,
                   failures: int) -> RestartDecision:
    """Whether to run a task again after it ended.

    ``failures`` is the number of consecutive failed runs (including this one), which drives
    the exponential backoff; ``restarts`` counts every restart so far, checked against ``max``.
    """
    policy = restart["policy"]
    if policy == "never" or (policy == "on-failure" and not failed):
        return RestartDecision(False, 0.0, f"restart policy {policy}")
    cap = restart.get("max")
    if cap is not None and restarts >= cap:
        return RestartDecision(False, 0.0, f"gave up after {restarts} restarts (max {cap})")
    base = float(restart["backoff"])
    ceiling = max(float(restart["max_backoff"]), base)
    delay = min(base * (2 ** max(failures - 1, 0)), ceiling) if failed else base
    return RestartDecision(True, delay, f"restart {restarts + 1} in {delay:g}s")
