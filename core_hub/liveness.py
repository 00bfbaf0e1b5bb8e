"""Which agents are alive: heartbeats in, ``online`` -> ``disconnected`` -> ``unreachable``.

Heartbeats ride core NATS (not stored): losing some is fine, only their absence means anything.
Beats are collected in memory and written once a second in one transaction, for the agents
that beat since the last pass only (their ``last_seen``, and their outbox depth when it
changed), so a large fleet's heartbeats do not become a write per beat.

Statuses then move by SQL that touches only the agents crossing a threshold (an index on
``(status, last_seen)``): a pass costs what changed, not the size of the fleet. ``last_seen``
is the newest sign of life from any source, a heartbeat or an event applied by ingest, so a
healed link's fresh events count at once and a stale in-memory beat can never pull an agent
back to unreachable (the flap of issue 11). An agent never seen since it enrolled counts from
its enrollment, so it has the same grace as one that just went quiet. An agent silent for
``disconnected_after_s`` is ``disconnected``; after ``unreachable_after_s`` it is
``unreachable``. At most ``max_unreachable_per_s`` agents are declared unreachable per pass, so
a blip on the core's own network does not condemn the whole fleet at once. ``draining`` and
``revoked`` are left alone.

A pass that fails (a locked or full database, a bug) is logged with its traceback, counted in
``errors`` (the ``outpost_liveness_errors_total`` metric) and the loop goes on.

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
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)

# Statuses liveness moves; draining and revoked belong to others.
_LIVE = ("online", "disconnected", "unreachable")


@dataclass(frozen=True, slots=True)
class LivenessSettings:
    """Thresholds in seconds since an agent's last sign of life."""

    disconnected_after_s: float = 5.0
    unreachable_after_s: float = 10.0
    max_unreachable_per_s: int = 20
    gap_after_s: float = 30.0


class Liveness:
    """Tracks heartbeats and moves agent statuses in the hub's view.

    ``beats`` holds the beats received since the last pass (agent id -> beat with its
    ``received`` time); ``errors`` counts failed passes."""

    def __init__(self, nc: Any, store: HubStore, settings: LivenessSettings) -> None:
        self.nc = nc
        self.store = store
        self.settings = settings
        self.beats: dict[str, dict[str, Any]] = {}
        self.errors = 0
        self._outbox: dict[str, tuple[Any, Any]] = {}  # last outbox figures written per agent
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
        await stop_loops(self._loop)
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
            try:
                self.sweep(time.time())
            except Exception:  # one bad pass must not end liveness for good
                self.errors += 1
                log.exception("liveness pass failed; next pass in 1 s")

    def sweep(self, now: float) -> None:
        """Write the beats received since the last pass, then move the statuses they (and
        ingest's ``last_seen``) imply."""
        beats, self.beats = self.beats, {}
        try:
            with self.store.transaction() as db:
                self._write_beats(db, beats)
                self._move(db, now)
        except BaseException:
            for agent, beat in beats.items():  # not written: the next pass tries again
                self.beats.setdefault(agent, beat)
            raise

    def _write_beats(self, db: Any, beats: dict[str, dict[str, Any]]) -> None:
        db.executemany("UPDATE agents SET last_seen = MAX(COALESCE(last_seen, 0), ?)"
                       " WHERE id = ? AND revoked = 0",
                       [(beat["received"], agent) for agent, beat in beats.items()])
        applied = self._applied_seqs(db, list(beats))
        for agent, beat in beats.items():
            if agent not in applied:  # unknown or revoked: its beats change nothing
                continue
            gap = self._gap(agent, applied[agent], beat, beat["received"])
            outbox = (beat.get("outbox"), beat.get("outbox_age"), gap)
            if self._outbox.get(agent) != outbox:
                self._outbox[agent] = outbox
                self.store.update_agent_record(agent, {"outbox": {
                    "depth": outbox[0], "oldest_age_s": outbox[1], "gap": gap}})

    @staticmethod
    def _applied_seqs(db: Any, agents: list[str]) -> dict[str, int]:
        """The applied seq of each of ``agents`` that is known and not revoked."""
        found: dict[str, int] = {}
        for at in range(0, len(agents), 500):
            part = agents[at:at + 500]
            found.update(db.execute(
                "SELECT id, COALESCE(applied_seq, 0) FROM agents WHERE revoked = 0 AND id IN"
                f" ({','.join('?' * len(part))})", part).fetchall())
        return found

    def _move(self, db: Any, now: float) -> None:
        cfg = self.settings
        fresh = now - cfg.disconnected_after_s
        db.execute("UPDATE agents SET status = 'online' WHERE status IN"
                   " ('disconnected', 'unreachable') AND revoked = 0 AND last_seen >= ?",
                   (fresh,))
        db.execute("UPDATE agents SET status = 'disconnected' WHERE status = 'online'"
                   " AND revoked = 0 AND (last_seen < ? OR (last_seen IS NULL AND"
                   " enrolled_at < ?))", (fresh, fresh))
        gone = now - cfg.unreachable_after_s
        rows = db.execute(
            "SELECT id FROM agents WHERE status IN ('online', 'disconnected') AND revoked = 0"
            " AND (last_seen < ? OR (last_seen IS NULL AND enrolled_at < ?))"
            " ORDER BY last_seen LIMIT ?", (gone, gone, cfg.max_unreachable_per_s)).fetchall()
        for (agent,) in rows:
            log.warning("agent %s unreachable", agent, extra={"agent": agent})
        db.executemany("UPDATE agents SET status = 'unreachable' WHERE id = ?", rows)

    def _gap(self, agent_id: str, applied: int, beat: dict[str, Any], now: float
             ) -> dict[str, Any] | None:
        """The agent's gap (acked by JetStream, not applied, not moving), or None."""
        acked = beat.get("acked")
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
