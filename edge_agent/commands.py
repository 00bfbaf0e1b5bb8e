"""What the edge does with each kind of core-to-edge command (already verified, decoded into
its typed form by ``federation.messages``, not expired).

Each handler runs inside the store transaction that records the command id and queues its
result event, so a command's effect, its "seen" mark and its report commit together.
"""

from __future__ import annotations

from typing import Any

from edge_agent.backend import EdgeBackend
from federation import messages
from federation.errors import NotFound, OutpostError

Outcome = tuple[str, str | None, dict[str, Any]]


class CommandApplier:
    """Maps ``launch``, ``kill``, ``update``, ``drain`` onto the local supervisor and backend."""

    def __init__(self, backend: EdgeBackend) -> None:
        self.backend = backend
        self.supervisor = backend.supervisor

    def __call__(self, command: messages.Command) -> Outcome:
        if isinstance(command, messages.Launch):
            return self._launch(command)
        if isinstance(command, messages.Kill):
            return self._kill(command)
        if isinstance(command, messages.Update):
            return self._update(command)
        if isinstance(command, messages.Stage):
            return self._stage(command)
        return self._drain(command)

    def _stage(self, command: messages.Stage) -> Outcome:
        if self.backend.stage_artifact is None:
            return "rejected", "this agent has no artifact cache", {}
        self.backend.stage_artifact(command.digest)
        return "applied", f"fetching sha256:{command.digest}", {}

    def _launch(self, command: messages.Launch) -> Outcome:
        try:
            self.backend.store.row(command.task_id)
            return "duplicate", "task already exists here", {}
        except NotFound:
            pass
        spec = command.spec
        if self.backend.draining:
            return "declined", "agent is draining", {}
        free = self.supervisor.free()
        if not free.fits(spec["resources"]):
            return "declined", "no longer fits: " + _free_text(free), {}
        try:
            task = self.supervisor.submit(spec, origin="core", task_id=command.task_id)
        except OutpostError as exc:
            return "declined", exc.message, {}
        return "applied", f"task {task['state']}", {"offer_id": command.offer_id}

    def _kill(self, command: messages.Kill) -> Outcome:
        try:
            _, task = self.supervisor.request_kill(command.task_id)
        except NotFound:
            return "rejected", f"no task {command.task_id} on this agent", {}
        return "applied", f"task {task['state']}", {}

    def _update(self, command: messages.Update) -> Outcome:
        try:
            task = self.supervisor.update(command.task_id, command.spec, command.generation)
        except NotFound:
            return "rejected", f"no task {command.task_id} on this agent", {}
        except OutpostError as exc:  # Conflict (old generation, ended task) or Invalid
            return "rejected", exc.message, {}
        return "applied", f"generation {task['generation']}", {"generation": task["generation"]}

    def _drain(self, command: messages.Drain) -> Outcome:
        self.backend.store.set_meta("draining", "1")
        self.backend.store.append_event("agent", self.backend.agent_record())
        return "applied", "draining", {}


def _free_text(free: Any) -> str:
    return f"{max(free.cpus, 0):g} cpus and {max(free.mem_mb, 0)} MB free"
