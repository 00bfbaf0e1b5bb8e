"""Core-to-edge commands: signed by the hub, kept in JetStream until the edge takes them.

Each command goes to ``outpost.v1.cmd.<agent>`` on stream ``OUTPOST_COMMANDS``, where the
agent's durable consumer holds it for as long as the edge is away. The envelope names the target
agent (so it cannot be replayed to another) and carries an id (the edge applies each id once)
and an expiry (an edge that comes back too late reports it expired and does nothing).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from core_hub.store import HubStore
from federation import messages, subjects, wire
from federation.errors import NotFound

DEFAULT_TTL_S = 24 * 3600.0


class Commander:
    """Sends commands to agents; ``seq`` is the hub's own counter, kept in its store."""

    def __init__(self, js: Any, store: HubStore, signer: wire.Signer) -> None:
        self.js = js
        self.store = store
        self.signer = signer
        self.sent = 0

    async def send(self, agent_id: str, kind: str, body: dict[str, Any],
                   ttl_s: float = DEFAULT_TTL_S, command_id: str | None = None) -> str:
        """Publish one command; returns its id once JetStream has stored it. A caller that
        recorded the id first (write-ahead) passes it, so a resend is the same command."""
        if self.store.agent_key(agent_id) is None:
            raise NotFound(f"agent {agent_id!r} not found", details={"agent": agent_id})
        command_id = command_id or uuid.uuid4().hex
        seq = int(self.store.get_meta("command_seq") or 0) + 1
        self.store.set_meta("command_seq", str(seq))
        # Built through the type the edge decodes it with: an ill-typed command is refused
        # here (MessageInvalid), not sent to an edge that could only reject it.
        command = messages.command_from_wire(kind, {**body, "id": command_id,
                                                    "expires_at": time.time() + ttl_s})
        data = wire.sign_envelope(kind, agent_id, seq, messages.command_to_wire(command),
                                  self.signer)
        await self.js.publish(subjects.commands(agent_id), data,
                              headers={"Nats-Msg-Id": command_id})
        self.sent += 1
        return command_id
