"""Rolling updates of a service's task: what to start and stop next, as a pure decision.

New instances start ``batch`` at a time (a surge above ``instances``, so capacity is never
below the wanted count of ready copies); an old one stops only when a new one is *ready*
(running, not unhealthy, for ``min_ready`` seconds). A new instance that fails, or a rollout
past its ``timeout``, is a failure: the caller rolls back (the same mechanism, towards the old
revision) or pauses, as the service says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from federation.schemas import REVISION_LABEL


@dataclass(frozen=True, slots=True)
class Step:
    """``start``: new instances to place; ``stop``: old instance ids to kill; ``done``: the
    rollout has finished; ``failed``: why it failed (None if it did not)."""

    start: int = 0
    stop: list[str] = field(default_factory=list)
    done: bool = False
    failed: str | None = None


def revision_of(task: dict[str, Any]) -> str | None:
    return task.get("labels", {}).get(REVISION_LABEL)


def plan(*, instances: int, revision: str, counted: list[dict[str, Any]],
         ended: list[dict[str, Any]], started_at: float, rules: dict[str, Any],
         now: float) -> Step:
    """The next step towards every counted instance being at ``revision``.

    ``counted``: the service's live instances; ``ended``: its instances that ended (any
    revision), to notice new ones that failed since ``started_at``.
    """
    failures = [t for t in ended if revision_of(t) == revision and t["state"] in ("failed",
                "lost") and (t.get("created_at") or 0) >= started_at]
    if failures:
        t = failures[0]
        return Step(failed=f"new instance {t['id']} {t['state']}: {t.get('reason')}")
    if now - started_at > rules["timeout"]:
        return Step(failed=f"not done after {rules['timeout']:g}s")
    new = [t for t in counted if revision_of(t) == revision]
    old = [t for t in counted if revision_of(t) != revision]
    ready = [t for t in new if t["state"] == "running" and t.get("healthy") is not False
             and now - (t.get("started_at") or now) >= rules["min_ready"]]
    if not old and len(ready) >= instances:
        return Step(done=True)
    # Stop old copies only while enough ready ones (old or new) remain.
    stoppable = max(0, len(ready) + len(old) - instances)
    oldest_first = sorted(old, key=lambda t: t.get("created_at") or 0.0)
    stop = [t["id"] for t in oldest_first[:min(rules["batch"], stoppable)]]
    in_flight = len(new) - len(ready)
    start = max(0, min(rules["batch"] - in_flight, instances - len(new)))
    return Step(start=start, stop=stop)
