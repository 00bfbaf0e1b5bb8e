"""What the edge does with each kind of core-to-edge command (already verified, not expired).

Each handler runs inside the store transaction that records the command id and queues its
result event, so a command's effect, its "seen" mark and its report commit together.
"""

from __future__ import annotations

from typing import Any

from edge_agent.backend import EdgeBackend
from federation import wire
from federation.errors import Invalid, NotFound, OutpostError
from federation.schemas import validate_task_spec

Outcome = tuple[str, str | None, dict[str, Any]]


class CommandApplier:
    """Maps ``launch``, ``kill``, ``update``, ``drain`` onto the local supervisor and backend."""

    def __init__(self, backend: EdgeBackend) -> None:
        self.backend = backend
        self.supervisor = backend.supervisor

    def __call__(self, env: wire.Envelope) -> Outcome:
        body: dict[str, Any] = env.body if isinstance(env.body, dict) else {}
        handler = getattr(self, f"_{env.kind}", None)
        if handler is None:
            return "rejected", f"{env.kind} is not supported by this agent version", {}
        return handler(body)

    def _launch(self, body: dict[str, Any]) -> Outcome:
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or not task_id.isalnum() or len(task_id) > 64:
            return "rejected", "launch needs a task_id", {}
        try:
            self.backend.store.row(task_id)
            return "duplicate", "task already exists here", {}
        except NotFound:
            pass
        try:
            spec = validate_task_spec(body.get("spec"))
        except Invalid as exc:
            return "rejected", exc.message, {}
        if self.backend.draining:
            return "declined", "agent is draining", {}
        free = self.supervisor.free()
        if not free.fits(spec["resources"]):
            return "declined", "no longer fits: " + _free_text(free), {}
        try:
            task = self.supervisor.submit(spec, origin="core", task_id=task_id)
        except OutpostError as exc:
            return "declined", exc.message, {}
        return "applied", f"task {task['state']}", {"offer_id": body.get("offer_id")}

    def _kill(self, body: dict[str, Any]) -> Outcome:
        task_id = body.get("task_id")
        if not isinstance(task_id, str):
            return "rejected", "kill needs a task_id", {}
        try:
            _, task = self.supervisor.request_kill(task_id)
        except NotFound:
            return "rejected", f"no task {task_id} on this agent", {}
        return "applied", f"task {task['state']}", {}

    def _update(self, body: dict[str, Any]) -> Outcome:
        task_id, generation = body.get("task_id"), body.get("generation")
        if not isinstance(task_id, str) or type(generation) is not int:
            return "rejected", "update needs a task_id and the generation it is based on", {}
        try:
            spec = validate_task_spec(body.get("spec"))
            task = self.supervisor.update(task_id, spec, generation)
        except NotFound:
            return "rejected", f"no task {task_id} on this agent", {}
        except OutpostError as exc:  # Conflict (old generation, ended task) or Invalid
            return "rejected", exc.message, {}
        return "applied", f"generation {task['generation']}", {"generation": task["generation"]}

    def _drain(self, body: dict[str, Any]) -> Outcome:
        self.backend.store.set_meta("draining", "1")
        self.backend.store.append_event("agent", self.backend.agent_record())
        return "applied", "draining", {}


def _free_text(free: Any) -> str:
    return f"{max(free.cpus, 0):g} cpus and {max(free.mem_mb, 0)} MB free"
