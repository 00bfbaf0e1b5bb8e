"""The seam between the one API app and the two places it runs.

``build_app(backend)`` serves the same routes at an edge and at the core; each side supplies an
object that satisfies ``Backend``. Anything role-specific lives behind this protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """Filters and paging for ``GET /v1/tasks``.

    Fields: ``states`` (any of), ``label`` (key, value) pair, ``name`` (exact), ``limit``,
    ``cursor`` (opaque, from the previous page), ``order``: ``id`` (stable: a page never
    repeats or skips a task) or ``recent`` (last changed first, what a person looks for; a
    task that changes while one pages may show again on a later page, or be passed over).
    """

    states: tuple[str, ...] = ()
    label: tuple[str, str] | None = None
    name: str | None = None
    agent_id: str | None = None
    site: str | None = None
    limit: int = 100
    cursor: str | None = None
    order: str = "id"


TASK_ORDERS = ("id", "recent")


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list; ``next_cursor`` is None on the last page."""

    items: list[dict[str, Any]]
    next_cursor: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "next_cursor": self.next_cursor}


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family for ``/metrics``: ``kind`` is ``gauge`` or ``counter``; ``samples``
    pairs a label dict with a value."""

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One entry of the event feed: ``id`` orders and resumes it (SSE ``Last-Event-ID``)."""

    id: int
    kind: str
    data: dict[str, Any]


class Backend(Protocol):
    """What the API needs from a node. Methods raise ``federation.errors`` types on bad input."""

    role: str

    async def info(self) -> dict[str, Any]: ...

    async def health(self) -> dict[str, Any]: ...

    async def list_tasks(self, query: TaskQuery) -> Page: ...

    async def get_task(self, task_id: str) -> dict[str, Any]: ...

    async def task_history(self, task_id: str) -> dict[str, Any]:
        """``{"task_id", "items"}``: the task's recent state changes, oldest first."""
        ...

    async def create_task(self, spec: dict[str, Any]) -> dict[str, Any]: ...

    async def kill_task(self, task_id: str) -> tuple[bool, dict[str, Any]]:
        """Returns (accepted_for_later, body): True means 202 (the kill is under way)."""
        ...

    async def open_logs(
        self, task_id: str, *, stream: str, tail: int, follow: bool
    ) -> AsyncIterator[bytes]:
        """Checks the task exists (raising before any byte is sent), then yields log bytes."""
        ...

    async def list_agents(self, limit: int, cursor: str | None) -> Page: ...

    async def get_agent(self, agent_id: str) -> dict[str, Any]: ...

    async def drain_agent(self, agent_id: str, migrate: bool) -> dict[str, Any]: ...

    async def revoke_agent(self, agent_id: str) -> dict[str, Any]:
        """Distrust an agent for good (the core only; an edge answers 409)."""
        ...

    async def change_enrollment(self, agent_id: str, change: dict[str, Any]) -> dict[str, Any]:
        """An admin changes an agent's enrolled ``site``, ``name`` or ``resources`` (the core
        only; an edge answers 409)."""
        ...

    async def list_offers(self) -> Page: ...

    async def open_events(self, after: int | None) -> AsyncIterator[StreamEvent]: ...

    async def list_services(self) -> Page: ...

    async def get_service(self, name: str) -> dict[str, Any]: ...

    async def create_service(self, service: dict[str, Any]) -> dict[str, Any]: ...

    async def replace_service(self, name: str, service: dict[str, Any]) -> dict[str, Any]: ...

    async def delete_service(self, name: str) -> dict[str, Any]: ...

    def metrics(self) -> list[Metric]: ...
