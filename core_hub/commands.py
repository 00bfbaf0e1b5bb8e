"""Core-to-edge commands: signed by the hub, kept in JetStream until the edge takes them.

Each command is the agent's next number on stream ``OUTPOST_COMMANDS``
(``outpost.v1.cmd.<agent>.<n>``, ``federation/commandlog.py``), kept there for as long as the edge
is away; the edge reads its own numbers. The envelope names the target
agent (so it cannot be replayed to another) and carries an id (the edge applies each id once)
and an expiry (an edge that comes back too late reports it expired and does nothing).

The API never waits on NATS for a command: ``send`` signs it and queues it in the hub's own
SQLite outbox (intent before effect), and a sender loop publishes the queue in order, deleting a
row only once JetStream has stored it. A hung or dead NATS therefore costs a 202 that is kept
(the command goes out when NATS answers; a resend after a lost ack is the same ``Nats-Msg-Id``,
which JetStream drops, and the same command id, which the edge applies once), never a 500 for
a command that was in fact sent, nor an API call held for NATS' timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from core_hub.store import HubStore
from federation import messages, wire
from federation.commandlog import CommandLog
from federation.errors import NotFound
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 24 * 3600.0
RETRY_S = 0.5  # after a failed publish; NATS' own request timeout bounds each try
SENDING_AGENTS = 32  # agents whose queued commands are published at the same time


class Commander:
    """Queues and sends commands to agents; ``seq`` is the hub's own counter, in its store.
    ``start()`` runs the sender; ``stop()`` ends it after one last try at the queue."""

    def __init__(self, js: Any, store: HubStore, signer: wire.Signer,
                 fence: Callable[[], Awaitable[int]] | None = None,
                 before_send: Callable[[], Awaitable[object]] | None = None) -> None:
        self.js = js
        self.fence = fence  # the placement lease's claim (core_hub/lease.py): raises if lost
        # The hub state mirror's flush: what explains a command (its service, its launch
        # record) is in JetStream KV before the command is, so a replica taking over, or a
        # fresh view, knows of everything an edge may be running.
        self.before_send = before_send
        self.store = store
        self.signer = signer
        self.sent = 0
        self.failures = 0
        self.log = CommandLog(js)
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    async def send(self, agent_id: str, kind: str, body: dict[str, Any],
                   ttl_s: float = DEFAULT_TTL_S, command_id: str | None = None) -> str:
        """Queue one command; returns its id once it is in the hub's store (JetStream gets it
        from the sender). A caller that recorded the id first (write-ahead) passes it, so a
        resend is the same command."""
        if self.store.agent_key(agent_id) is None:
            raise NotFound(f"agent {agent_id!r} not found", details={"agent": agent_id})
        command_id = command_id or uuid.uuid4().hex
        now = time.time()
        with self.store.transaction():
            seq = int(self.store.get_meta("command_seq") or 0) + 1
            self.store.set_meta("command_seq", str(seq))
            # Built through the type the edge decodes it with: an ill-typed command is refused
            # here (MessageInvalid), not queued for an edge that could only reject it.
            command = messages.command_from_wire(kind, {**body, "id": command_id,
                                                        "expires_at": now + ttl_s})
            data = wire.sign_envelope(kind, agent_id, seq, messages.command_to_wire(command),
                                      self.signer)
            self.store.queue_command(command_id, agent_id, data, now)
        self._wake.set()
        return command_id

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="command-sender")

    async def stop(self) -> None:
        await stop_loops(self._loop)
        await self.publish_queued()  # the hub bounds how long; what is left goes at next start

    async def publish_queued(self) -> int:
        """Publish the queue, each agent's commands in their order, each row deleted once
        JetStream stored it; returns how many went out. Different agents' commands go out
        side by side (SENDING_AGENTS at once): one at a time, a drain to 10,000 agents was
        two NATS round trips per agent end to end (58 s on a loaded 2-core box). An agent
        whose command NATS does not take sends nothing more of this pass (its order holds);
        the others' sent rows are kept sent, and the first error is raised afterwards."""
        sent_before = self.sent
        while rows := self.store.queued_commands():
            if self.before_send is not None:
                await self.before_send()
            if self.fence is not None:  # a replica that lost the lease sends nothing more
                await self.fence()
            by_agent: dict[str, list[tuple[int, str, bytes]]] = {}
            for row_id, command_id, agent_id, data in rows:
                by_agent.setdefault(agent_id, []).append((row_id, command_id, data))
            slots = asyncio.Semaphore(SENDING_AGENTS)
            results = await asyncio.gather(
                *(self._send_in_order(agent, queued, slots) for agent, queued in by_agent.items()),
                return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return self.sent - sent_before

    async def _send_in_order(self, agent_id: str, queued: list[tuple[int, str, bytes]],
                             slots: asyncio.Semaphore) -> None:
        """One agent's queued commands, one after another, each row dropped once stored."""
        async with slots:
            for row_id, command_id, data in queued:
                await self.log.append(agent_id, data, command_id)
                self.store.drop_command(row_id)
                self.sent += 1

    async def _run(self) -> None:
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            try:
                await self.publish_queued()
                if failing:
                    log.info("commands: sending again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away or hung: the queue waits; retry soon
                self.failures += 1
                if not failing:
                    log.warning("commands: %d queued, not sent yet: %r",
                                self.store.command_queue_depth(), exc)
                failing = True
                await asyncio.sleep(RETRY_S)
