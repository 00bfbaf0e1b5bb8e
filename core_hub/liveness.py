"""Which agents are alive: heartbeats in, ``online`` -> ``disconnected`` -> ``unreachable``.

Heartbeats ride core NATS (not stored): losing some is fine, only their absence means anything.
Arrival times are kept in memory and written to the view once a second in one transaction, so a
large fleet's heartbeats do not become a write per beat. An agent silent for
``disconnected_after_s`` is ``disconnected``; after ``unreachable_after_s`` it is
``unreachable``. At most ``max_unreachable_per_s`` agents are declared unreachable per second,
so a blip on the core's own network does not condemn the whole fleet at once.

Heartbeats also carry ``acked``, the last seq the agent's outbox had acknowledged by JetStream.
If that runs ahead of the seq the hub applied, and what the hub applied stays where it is for
``gap_after_s``, events the edge believes delivered are not coming (dropped by the stream: a
poisoned dedupe, a limit that discarded them before ingest): the agent's ``outbox.gap`` says so
(``{"acked_seq", "applied_seq", "since"}``, shown on the dashboard), a warning is logged and
``outpost_sync_gaps`` / ``outpost_sync_gaps_total`` count it. Ingest lag is no gap: the applied
seq moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from core_hub.store import HubStore
from federation import subjects, wire

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LivenessSettings:
    """Thresholds in seconds since an agent's last heartbeat."""

    disconnected_after_s: float = 5.0
    unreachable_after_s: float = 10.0
    max_unreachable_per_s: int = 20
    gap_after_s: float = 30.0


class Liveness:
    """Tracks heartbeats and moves agent statuses in the hub's view."""

    def __init__(self, nc: Any, store: HubStore, settings: LivenessSettings) -> None:
        self.nc = nc
        self.store = store
        self.settings = settings
        self.beats: dict[str, dict[str, Any]] = {}
        self._sub: Any = None
        self._loop: asyncio.Task[None] | None = None
        # agent -> (applied seq while behind its acked seq, since when it has not moved)
        self._behind: dict[str, tuple[int, float]] = {}
        self.gaps: set[str] = set()  # agents with a gap that does not fill
        self.gaps_total = 0

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(subjects.HEARTBEATS_ALL, cb=self._on_beat)
        self._loop = asyncio.create_task(self._sweep_loop(), name="liveness")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_beat(self, msg: Any) -> None:
        agent = msg.subject.rsplit(".", 1)[-1]
        try:
            beat = wire.unpack(msg.data)
        except ValueError:
            return
        if isinstance(beat, dict) and beat.get("agent") == agent:
            self.beats[agent] = {**beat, "received": time.time()}

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sweep(time.time())

    def sweep(self, now: float) -> None:
        """Write heartbeat times and the statuses they imply (draining and revoked are left
        alone)."""
        budget = self.settings.max_unreachable_per_s
        with self.store.transaction():
            for agent in self.store.list_agents():
                if agent["revoked"]:  # final: its heartbeats (if any) change nothing
                    continue
                beat = self.beats.get(agent["id"])
                last = beat["received"] if beat else agent.get("last_seen")
                status = agent.get("status")
                if status == "draining":
                    wanted = status
                elif last is None or now - last >= self.settings.unreachable_after_s:
                    wanted = "unreachable"
                elif now - last >= self.settings.disconnected_after_s:
                    wanted = "disconnected"
                else:
                    wanted = "online"
                if wanted == "unreachable" and status != "unreachable":
                    if budget <= 0:  # over this second's cap: only disconnected for now
                        wanted = "disconnected"
                    else:
                        budget -= 1
                        log.warning("agent %s unreachable", agent["id"],
                                    extra={"agent": agent["id"]})
                fields: dict[str, Any] = {}
                if wanted != status:
                    fields["status"] = wanted
                if beat is not None:
                    fields["outbox"] = {"depth": beat.get("outbox"),
                                        "oldest_age_s": beat.get("outbox_age"),
                                        "gap": self._gap(agent, beat, now)}
                if fields:
                    self.store.update_agent_record(agent["id"], fields)
                if beat is not None:
                    self.store.set_last_seen(agent["id"], beat["received"])

    def _gap(self, agent: dict[str, Any], beat: dict[str, Any], now: float
             ) -> dict[str, Any] | None:
        """The agent's gap (acked by JetStream, not applied, not moving), or None."""
        agent_id, acked = agent["id"], beat.get("acked")
        applied = int(agent.get("applied_seq") or 0)
        if type(acked) is not int or acked <= applied:
            self._behind.pop(agent_id, None)
            if agent_id in self.gaps:
                self.gaps.discard(agent_id)
                log.info("agent %s: sync gap closed at seq %d", agent_id, applied,
                         extra={"agent": agent_id, "applied_seq": applied})
            return None
        seen, since = self._behind.get(agent_id, (None, now))
        if seen != applied:
            since = now
        self._behind[agent_id] = (applied, since)
        if now - since < self.settings.gap_after_s:
            return None
        if agent_id not in self.gaps:
            self.gaps.add(agent_id)
            self.gaps_total += 1
            log.warning("agent %s: JetStream acked its events up to seq %d but the hub has "
                        "applied only up to %d for %.0fs: events were lost on the way",
                        agent_id, acked, applied, now - since,
                        extra={"agent": agent_id, "acked_seq": acked, "applied_seq": applied})
        return {"acked_seq": acked, "applied_seq": applied, "since": since}
