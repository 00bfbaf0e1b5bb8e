"""The edge's implementation of the API ``Backend``: answers from the local store and tasks."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from edge_agent.scheduler import Capacity
from edge_agent.store import Store
from edge_agent.supervisor import Supervisor
from federation import __version__, history
from federation.backend import Metric, Page, StreamEvent, TaskQuery
from federation.errors import Conflict, NotFound
from federation.loopwatch import LoopWatch
from federation.outside import mapped
from federation.pagination import decode_cursor
from federation.schemas import TASK_STATES, TERMINAL_STATES

FOLLOW_POLL = 0.2
# Loops shown in outpost_loop_errors_total even before their first error.
EDGE_LOOPS = ("supervisor-tick", "sync-outbox-bound", "sync-heartbeat")
OFFER_TTL = 30.0


def tail_bytes(path: Path, lines: int, block: int = 8192) -> tuple[bytes, int]:
    """The last ``lines`` lines of ``path`` and the file size they end at."""
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            if lines == 0:
                return b"", end
            pos, data = end, b""
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(block, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
            if not data:
                return b"", end
            parts = data.split(b"\n")
            if parts and parts[-1] == b"":
                parts.pop()
                return b"\n".join(parts[-lines:]) + b"\n", end
            return b"\n".join(parts[-lines:]), end
    except FileNotFoundError:
        return b"", 0


@mapped  # SQLite failures (a full disk: 507) mapped into the error tree at one seam
class EdgeBackend:
    """One agent answering the fleet API about itself."""

    role = "edge"

    def __init__(self, *, agent_id: str, name: str, site: str, labels: dict[str, str],
                 isolation: str, store: Store, supervisor: Supervisor,
                 loop_watch: LoopWatch | None = None) -> None:
        self.agent_id = agent_id
        self.name = name
        self.site = site
        self.labels = labels
        self.isolation = isolation
        self.store = store
        self.supervisor = supervisor
        self.loop_watch = loop_watch
        self.started = time.time()
        self.link_status: Callable[[], dict[str, Any]] = lambda: {"enabled": False}
        self.extra_metrics: Callable[[], list[Metric]] | None = None  # the artifact cache's
        self.held_artifacts: Callable[[], list[str]] | None = None
        self.stage_artifact: Callable[[str], Any] | None = None  # a stage command's effect

    @property
    def draining(self) -> bool:
        return self.store.get_meta("draining") == "1"

    def drivers(self) -> list[dict[str, str]]:
        """The task drivers this agent runs: processes always, containers when runc is here."""
        found = [{"name": "process", "version": __version__}]
        if self.supervisor.oci is not None:
            found.append(self.supervisor.oci.describe())
        return found

    async def info(self) -> dict[str, Any]:
        return {"role": "edge", "version": __version__, "agent_id": self.agent_id,
                "name": self.name, "site": self.site, "isolation": self.isolation,
                "drivers": self.drivers(),
                "labels": self.labels, "started_at": self.started, "link": self.link_status()}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "role": "edge"}

    async def list_tasks(self, query: TaskQuery) -> Page:
        return self.store.list_tasks(query)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return self.store.to_api(self.store.find(task_id))

    async def task_history(self, task_id: str) -> dict[str, Any]:
        row = self.store.find(task_id)
        changes = history.collapse(history.entry(ts, task)
                                   for ts, task in self.store.task_history(row["id"]))
        return {"task_id": row["id"], "items": changes}

    async def create_task(self, spec: dict[str, Any]) -> dict[str, Any]:
        if self.draining:
            raise Conflict("agent is draining: it accepts no new tasks",
                           details={"agent": self.agent_id})
        wanted = spec["constraints"]
        if wanted.get("site") not in (None, self.site):
            raise Conflict(f"constraint site={wanted['site']} does not match this agent's "
                           f"site {self.site!r}", details={"field": "constraints.site"})
        if wanted.get("agent") not in (None, self.agent_id, self.name):
            raise Conflict(f"constraint agent={wanted['agent']} is not this agent",
                           details={"field": "constraints.agent"})
        return self.supervisor.submit(spec)

    async def kill_task(self, task_id: str) -> tuple[bool, dict[str, Any]]:
        return await self.supervisor.kill(task_id)

    async def open_logs(self, task_id: str, *, stream: str, tail: int,
                        follow: bool) -> AsyncIterator[bytes]:
        row = self.store.find(task_id)
        path = self.supervisor.executor.log_path(row["id"], stream)
        return self._log_stream(row["id"], path, tail, follow)

    async def _log_stream(self, task_id: str, path: Path, tail: int,
                          follow: bool) -> AsyncIterator[bytes]:
        data, pos = tail_bytes(path, tail)
        if data:
            yield data
        while follow:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < pos:  # rotated (copy-and-truncate): start over at the top
                pos = 0
            if size > pos:
                with open(path, "rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read(size - pos)
                pos += len(chunk)
                yield chunk
                continue
            if self.store.row(task_id)["state"] in TERMINAL_STATES:
                return
            await asyncio.sleep(FOLLOW_POLL)

    def _in_use(self, free: Capacity) -> dict[str, Any]:
        """What tasks hold of this agent's capacity, given what is ``free`` (for its record
        and its offers)."""
        cap = self.supervisor.capacity
        return {"cpus": round(cap.cpus - free.cpus, 6), "mem_mb": cap.mem_mb - free.mem_mb,
                "disk_mb": cap.disk_mb - free.disk_mb}

    def agent_record(self) -> dict[str, Any]:
        cap = self.supervisor.capacity
        return {
            "id": self.agent_id, "name": self.name, "site": self.site, "labels": self.labels,
            "resources": {"cpus": cap.cpus, "mem_mb": cap.mem_mb, "disk_mb": cap.disk_mb},
            "used": self._in_use(self.supervisor.free()),
            "status": "draining" if self.draining else "online",
            "version": __version__, "isolation": self.isolation, "last_seen": time.time(),
            "drivers": self.drivers(),
        }

    async def list_agents(self, limit: int, cursor: str | None) -> Page:
        # The core's cursor form (one API): after an id, this edge is listed only if it sorts
        # later; a cursor the core would not take is a 400 here too.
        after = (decode_cursor(cursor, id=str) or {}).get("id", "")
        return Page([self.agent_record()] if self.agent_id > after else [], None)

    async def get_agent(self, agent_id: str) -> dict[str, Any]:
        if agent_id not in (self.agent_id, self.name):
            raise NotFound(f"agent {agent_id!r} not found (this edge is {self.agent_id})",
                           details={"agent": agent_id})
        return self.agent_record()

    async def drain_agent(self, agent_id: str, migrate: bool) -> dict[str, Any]:
        await self.get_agent(agent_id)
        self.store.set_meta("draining", "1")
        self.store.append_event("agent", self.agent_record())
        return self.agent_record()

    async def revoke_agent(self, agent_id: str) -> dict[str, Any]:
        raise Conflict("agents are revoked at the core, which holds their keys: "
                       "`outpost-hub agents revoke ID` or POST this to the hub",
                       details={"role": "edge", "agent": agent_id})

    async def change_enrollment(self, agent_id: str, change: dict[str, Any]) -> dict[str, Any]:
        raise Conflict("an agent's enrollment is changed at the core: "
                       "`outpost-hub agents move ID` or POST this to the hub",
                       details={"role": "edge", "agent": agent_id})

    def current_offer(self) -> dict[str, Any] | None:
        """What this agent offers now (None while draining): its free resources and labels."""
        if self.draining:
            return None
        free = self.supervisor.free()
        used = self._in_use(free)
        if self.supervisor.at_task_cap():
            # At max_tasks nothing more fits, whatever the resources say: offer nothing free,
            # so the core's placer treats this agent as full instead of sending launches that
            # would only be declined.
            free = Capacity(0.0, 0, 0)
        return {"id": f"{self.agent_id}:{self.store.last_event_seq()}", "agent_id": self.agent_id,
                "site": self.site, "labels": self.labels, "cpus": round(max(free.cpus, 0), 6),
                "mem_mb": max(free.mem_mb, 0), "disk_mb": max(free.disk_mb, 0),
                # What is in use rides along: the core's agent view stays current with it.
                "used": used, "drivers": [d["name"] for d in self.drivers()],
                # Which artifacts it holds: the core shows where each one is cached.
                **({"artifacts": self.held_artifacts()} if self.held_artifacts else {}),
                "created_at": time.time(), "expires_at": time.time() + OFFER_TTL}

    async def list_offers(self) -> Page:
        offer = self.current_offer()
        return Page([] if offer is None else [offer], None)

    async def open_events(self, after: int | None) -> AsyncIterator[StreamEvent]:
        return self._event_stream(self.store.last_event_seq() if after is None else after)

    async def _event_stream(self, cursor: int) -> AsyncIterator[StreamEvent]:
        first = self.store.first_event_seq()
        if first and cursor < first - 1:
            yield StreamEvent(first - 1, "gap", {"missed_after": cursor, "resumes_at": first,
                                                 "reason": "older events were pruned"})
            cursor = first - 1
        while True:
            rows = self.store.events_after(cursor)
            if not rows:
                await self.store.wait_for_change()
                continue
            for row in rows:
                cursor = row["seq"]
                yield StreamEvent(cursor, row["kind"], json.loads(row["body"]))

    # Services are kept by the core across the fleet; an edge only runs their instances.

    async def list_services(self) -> Page:
        return Page([], None)

    async def get_service(self, name: str) -> dict[str, Any]:
        raise NotFound(f"service {name!r} not found: services are kept by the core",
                       details={"service": name})

    async def create_service(self, service: dict[str, Any]) -> dict[str, Any]:
        raise Conflict("services are kept by the core; submit this to the hub (an edge runs "
                       "tasks: POST /v1/tasks)", details={"role": "edge"})

    async def replace_service(self, name: str, service: dict[str, Any]) -> dict[str, Any]:
        return await self.create_service(service)

    async def delete_service(self, name: str) -> dict[str, Any]:
        return await self.get_service(name)

    def metrics(self) -> list[Metric]:
        counts = self.store.count_by_state()
        cap, free = self.supervisor.capacity, self.supervisor.free()
        return [
            Metric("outpost_tasks", "gauge", "Tasks on this agent by state",
                   [({"state": s}, float(counts.get(s, 0))) for s in TASK_STATES]),
            Metric("outpost_task_restarts_total", "counter", "Task restarts since agent start",
                   [({}, float(self.supervisor.restarts_total))]),
            Metric("outpost_task_spawns_total", "counter", "Task processes started",
                   [({}, float(self.supervisor.executor.spawned))]),
            Metric("outpost_capacity", "gauge", "Resources tasks may use in all",
                   [({"resource": "cpus"}, cap.cpus), ({"resource": "mem_mb"}, cap.mem_mb)]),
            Metric("outpost_free", "gauge", "Resources not reserved by tasks",
                   [({"resource": "cpus"}, free.cpus), ({"resource": "mem_mb"}, free.mem_mb)]),
            Metric("outpost_events_last_seq", "gauge", "Sequence number of the newest event",
                   [({}, float(self.store.last_event_seq()))]),
            *self._outbox_metrics(),
            self.supervisor.loops.metric(EDGE_LOOPS),
            *(self.loop_watch.metrics() if self.loop_watch is not None else []),
            *(self.extra_metrics() if self.extra_metrics is not None else []),
        ]

    def _outbox_metrics(self) -> list[Metric]:
        link = self.link_status()
        if not link.get("enabled"):
            return []
        return [
            Metric("outpost_outbox_depth", "gauge", "Events not yet acked by the core",
                   [({}, float(link["outbox_depth"]))]),
            Metric("outpost_outbox_oldest_age_seconds", "gauge",
                   "Age of the oldest event not yet acked by the core",
                   [({}, float(link["outbox_oldest_age_s"] or 0.0))]),
            Metric("outpost_link_connected", "gauge", "1 while connected to the core's NATS",
                   [({}, 1.0 if link["connected"] else 0.0)]),
            *([Metric("outpost_link_credentials_expiry_timestamp_seconds", "gauge",
                      "When the agent's NATS user JWT expires (it renews it at half its life)",
                      [({}, float(link["credentials_expire_at"]))])]
              if link.get("credentials_expire_at") else []),
            Metric("outpost_outbox_published_events_total", "counter",
                   "Events the core's JetStream acked", [({}, float(link["published_events"]))]),
            Metric("outpost_link_rebuilds_total", "counter",
                   "Links to the core rebuilt because nothing went through while connected",
                   [({}, float(link["link_rebuilds"]))]),
            Metric("outpost_outbox_coalesced_events_total", "counter",
                   "Superseded events dropped to keep the outbox bounded",
                   [({}, float(link["coalesced_events"]))]),
        ]
