"""The core's implementation of the API ``Backend``: answers from the hub's fleet view.

Reads come from the SQLite view that ingest keeps; what must happen at a site (kill, drain)
becomes a signed command that waits in JetStream for a disconnected edge, and the answer is 202
with the command id. Tasks on an unreachable agent show ``unknown``: the edge is probably still
running them, and it is the authority on that (DESIGN guarantee 6). So do the unfinished tasks of
a revoked agent: its reports are no longer believed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from core_hub.commands import Commander
from core_hub.enroll import EnrollmentStats
from core_hub.feed import fleet_events, recent_after
from core_hub.forward import forward_logs
from core_hub.liveness import Liveness
from core_hub.natsauth import AccountStats
from core_hub.scheduler import CoreScheduler
from core_hub.services import Services
from core_hub.store import HubStore
from federation import __version__, history
from federation.backend import Metric, Page, StreamEvent, TaskQuery
from federation.errors import Conflict, NotFound, Unavailable
from federation.loopwatch import LoopWatch
from federation.outside import mapped
from federation.pagination import decode_cursor, encode_cursor
from federation.schemas import AGENT_STATUSES, TASK_STATES, TERMINAL_STATES

log = logging.getLogger(__name__)

PUBLIC_AGENT_FIELDS = ("id", "name", "site", "labels", "resources", "used", "status", "version",
                       "isolation", "drivers", "last_seen", "outbox", "enrolled_at", "revoked",
                       "revoked_at")


@mapped  # NATS and SQLite failures are 503s here, at one seam (federation.outside)
class CoreBackend:
    """The whole fleet behind the one API."""

    role = "core"

    def __init__(self, *, store: HubStore, commander: Commander, liveness: Liveness,
                 js: Any, ingest_stats: Any, scheduler: CoreScheduler, nc: Any,
                 services: Services,
                 on_agent_change: Callable[[str], Awaitable[None]] | None = None,
                 replies_dropped: Callable[[], int] = lambda: 0,
                 enrollments: EnrollmentStats | None = None,
                 loop_watch: LoopWatch | None = None,
                 nats_account: Callable[[], AccountStats] | None = None) -> None:
        self.nc = nc
        self.loop_watch = loop_watch
        # The NATS account's revocations, size and pending push, with least privilege.
        self.nats_account = nats_account
        self.enrollments = enrollments or EnrollmentStats()
        self.replies_dropped = replies_dropped  # the responders' count of refused reply subjects
        # The hub's hook after an agent's trust changes (registry, NATS credentials).
        self.on_agent_change = on_agent_change
        self.services = services
        self.store = store
        self.scheduler = scheduler
        self.commander = commander
        self.liveness = liveness
        self.js = js
        self.ingest_stats = ingest_stats
        self.started = time.time()
        # Which part this replica plays (core_hub/replicaapi.py); a lone hub always leads.
        self.replica_mode: Callable[[], str] = lambda: "leader"

    async def info(self) -> dict[str, Any]:
        return {"role": "core", "version": __version__, "agent_id": None, "name": "hub",
                "site": "core", "isolation": "none", "started_at": self.started,
                "stream_seq": self.store.stream_seq,
                "recent_events_after": recent_after(self.store.stream_seq)}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "role": "core", "replica": self.replica_mode()}

    # ------------------------------------------------------------ tasks

    def _unreachable(self) -> dict[str, str]:
        return self.store.unheard_agents()

    def _present(self, task: dict[str, Any], unreachable: dict[str, str]) -> dict[str, Any]:
        status = unreachable.get(task.get("agent_id") or "")
        if status is not None and task.get("state") not in TERMINAL_STATES:
            return {**task, "state": "unknown",
                    "reason": f"agent {status}; last reported {task.get('state')}"}
        return task

    async def list_tasks(self, query: TaskQuery) -> Page:
        agent_ids = None
        if query.site:
            agent_ids = self.store.agent_ids_at(query.site)
        unreachable = self._unreachable()
        wanted = set(query.states)
        if "unknown" in wanted:  # 'unknown' is derived: ask for what the edge last reported
            query = TaskQuery(states=(), label=query.label, name=query.name,
                              agent_id=query.agent_id, limit=query.limit, cursor=query.cursor)
        rows, cursor = self.store.page_tasks(query, agent_ids=agent_ids)
        items: list[Any] = []
        for body, agent_id, state in rows:
            item: Any = orjson.Fragment(body)  # copied into the answer as it is
            shown = state
            if agent_id in unreachable and state not in TERMINAL_STATES:
                item = self._present(orjson.loads(body), unreachable)
                shown = "unknown"
            if not wanted or shown in wanted:
                items.append(item)
        return Page(items, cursor)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        return self._present(self.store.find_task(task_id), self._unreachable())

    async def task_history(self, task_id: str) -> dict[str, Any]:
        """What the task's agent reported, as ingest recorded it (the edge is the authority
        on runtime state; a task not placed yet has none)."""
        task_id = self.store.find_task(task_id)["id"]  # 404 for an unknown task
        return {"task_id": task_id,
                "items": history.collapse(self.store.task_history(task_id))}

    async def create_task(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Placed on an edge's offer (or pending with the reason nothing fits)."""
        return await self.scheduler.submit(spec)

    async def kill_task(self, task_id: str) -> tuple[bool, dict[str, Any]]:
        task = self.store.find_task(task_id)
        task_id = task["id"]
        if task["state"] in TERMINAL_STATES:
            return False, task
        if self.scheduler.cancel(task_id) or not task.get("agent_id"):
            return False, self.store.get_task(task_id)
        command_id = await self.commander.send(task["agent_id"], "kill", {"task_id": task_id})
        return True, {**self._present(task, self._unreachable()), "command_id": command_id}

    async def open_logs(self, task_id: str, *, stream: str, tail: int,
                        follow: bool) -> AsyncIterator[bytes]:
        """Forwarded to the owning edge (503 while it is offline)."""
        task = self.store.find_task(task_id)
        task_id = task["id"]
        if not task.get("agent_id"):
            raise Unavailable(f"task {task_id} is not on an agent yet ({task['state']})",
                              details={"task": task_id})
        return await forward_logs(self.nc, task["agent_id"], task_id, stream=stream,
                                  tail=tail, follow=follow)

    # ------------------------------------------------------------ agents

    @staticmethod
    def _agent(agent: dict[str, Any]) -> dict[str, Any]:
        return {k: agent.get(k) for k in PUBLIC_AGENT_FIELDS}

    async def list_agents(self, limit: int, cursor: str | None) -> Page:
        after = (decode_cursor(cursor, id=str) or {}).get("id", "")
        agents = self.store.page_agents(str(after), limit + 1)  # one more: is there a next?
        page = agents[:limit]
        nxt = encode_cursor({"id": page[-1]["id"]}) if len(agents) > limit else None
        return Page([self._agent(a) for a in page], nxt)

    async def get_agent(self, agent_id: str) -> dict[str, Any]:
        agent = self.store.find_agent(agent_id)
        if agent is not None:
            return self._agent(agent)
        raise NotFound(f"agent {agent_id!r} not found", details={"agent": agent_id})

    async def drain_agent(self, agent_id: str, migrate: bool) -> dict[str, Any]:
        agent = await self.get_agent(agent_id)
        if agent["revoked"]:
            raise Conflict(f"agent {agent['id']} is revoked; it takes no commands",
                           details={"agent": agent["id"], "status": "revoked"})
        command_id = await self.commander.send(agent["id"], "drain", {"migrate": migrate})
        with self.store.transaction():
            self.store.update_agent_record(agent["id"], {"status": "draining"})
            if migrate:  # services move their instances off this agent
                self.store.set_meta(f"migrate:{agent['id']}", "1")
        if migrate and self.on_agent_change is not None:
            try:  # kept in the registry bucket too, so a rebuilt view still migrates
                await self.on_agent_change(agent["id"])
            except Exception as exc:  # the drain itself is queued: say so, do not undo it
                log.warning("agent %s: migrate flag not yet in the registry bucket: %r",
                            agent["id"], exc, extra={"agent_id": agent["id"]})
        return {**agent, "status": "draining", "command_id": command_id}

    async def revoke_agent(self, agent_id: str) -> dict[str, Any]:
        """Distrust an agent at once (by its id, not a name: names need not be unique). Ingest
        reads the flag for every envelope, so nothing it sends is applied after this returns;
        the hook then records it in the registry and withdraws its NATS credentials. Revoking
        again is harmless and retries the hook (503 if that fails: the view already has it)."""
        now = time.time()
        changed = self.store.revoke_agent(agent_id, now)
        if changed:
            log.warning("agent %s revoked", agent_id, extra={"agent_id": agent_id})
        if self.on_agent_change is not None:
            try:
                await self.on_agent_change(agent_id)
            except Exception as exc:
                log.exception("agent %s revoked here, but not recorded beyond this hub",
                              agent_id, extra={"agent_id": agent_id})
                raise Unavailable(
                    f"agent {agent_id} is revoked in this hub's view, but the registry or "
                    f"NATS could not record it ({type(exc).__name__}); revoke again to retry",
                    details={"agent": agent_id}) from None
        return self._agent(self.store.get_agent(agent_id))

    async def change_enrollment(self, agent_id: str, change: dict[str, Any]) -> dict[str, Any]:
        """An admin moves an agent to another site, renames it or changes its resources (by
        its id): what the agent itself may not claim (``enroll.py``). Recorded in the registry
        bucket too; its next offers are judged against the new enrollment."""
        agent = self.store.get_agent(agent_id)
        if agent["revoked"]:
            raise Conflict(f"agent {agent_id} is revoked", details={"agent": agent_id})
        name = change.get("name")
        holder = self.store.agent_named(name) if name is not None else None
        if holder is not None and holder != agent_id:
            raise Conflict(f"agent name {name!r} is taken by agent {holder}",
                           details={"name": name, "agent": holder})
        resources = change.get("resources")
        self.store.set_enrollment(agent_id, name=name, site=change.get("site"),
                                  resources=None if resources is None
                                  else {**agent["resources"], **resources})
        if change.get("site") not in (None, agent["site"]):
            with self.store.transaction():  # its offer names the old site until the next one
                self.store.delete_offer(agent_id)
        log.warning("agent %s enrollment changed by an admin: %s", agent_id, change,
                    extra={"agent_id": agent_id})
        if self.on_agent_change is not None:
            await self.on_agent_change(agent_id)
        return self._agent(self.store.get_agent(agent_id))

    async def list_offers(self) -> Page:
        return Page(self.store.list_offers(now=time.time()), None)

    async def open_events(self, after: int | None) -> AsyncIterator[StreamEvent]:
        return await fleet_events(self.js, self.store.agent_key, after)

    # ------------------------------------------------------------ services

    async def list_services(self) -> Page:
        return Page(self.services.list(), None)

    async def get_service(self, name: str) -> dict[str, Any]:
        return self.services.get(name)

    async def create_service(self, service: dict[str, Any]) -> dict[str, Any]:
        return await self.services.create(service)

    async def replace_service(self, name: str, service: dict[str, Any]) -> dict[str, Any]:
        return await self.services.replace(name, service)

    async def delete_service(self, name: str) -> dict[str, Any]:
        return await self.services.delete(name)

    def metrics(self) -> list[Metric]:
        counts = self.store.count_tasks_by_state()
        agents = self.store.count_agents_by_status()
        stats = self.ingest_stats.as_dict()
        return [
            Metric("outpost_tasks", "gauge", "Tasks in the fleet view by state",
                   [({"state": s}, float(counts.get(s, 0))) for s in TASK_STATES]),
            Metric("outpost_agents", "gauge", "Agents by status",
                   [({"status": s}, float(agents.get(s, 0))) for s in AGENT_STATUSES]),
            Metric("outpost_ingest_events_total", "counter", "Events applied to the view",
                   [({}, float(stats.get("applied_events", 0)))]),
            Metric("outpost_ingest_duplicates_total", "counter", "Duplicate envelopes ignored",
                   [({}, float(stats.get("duplicates", 0)))]),
            Metric("outpost_ingest_rejected_total", "counter", "Envelopes rejected, by reason",
                   [({"reason": r}, float(n)) for r, n in stats.get("rejected", {}).items()]),
            Metric("outpost_ingest_gaps_total", "counter",
                   "Envelope deliveries held back to wait for an earlier one",
                   [({}, float(stats.get("gaps", 0)))]),
            Metric("outpost_ingest_bad_events_total", "counter",
                   "Malformed events in valid envelopes, skipped",
                   [({}, float(stats.get("bad_events", 0)))]),
            Metric("outpost_ingest_foreign_tasks_total", "counter",
                   "Task events naming another agent's task, refused",
                   [({}, float(stats.get("foreign_tasks", 0)))]),
            Metric("outpost_ingest_refused_claims_total", "counter",
                   "Agent records and offers claiming more than the agent's enrollment, by field",
                   [({"field": f}, float(n)) for f, n in stats.get("refused_claims", {}).items()]),
            Metric("outpost_sync_gaps", "gauge",
                   "Agents whose acked events stay ahead of what the hub applied",
                   [({}, float(len(self.liveness.gaps)))]),
            Metric("outpost_sync_gaps_total", "counter", "Sync gaps found since start",
                   [({}, float(self.liveness.gaps_total))]),
            Metric("outpost_replies_dropped_total", "counter",
                   "Requests dropped: reply subject outside the requester's inbox",
                   [({}, float(self.replies_dropped()))]),
            Metric("outpost_stream_seq", "gauge", "OUTPOST_EVENTS sequence the view has reached",
                   [({}, float(self.store.stream_seq))]),
            Metric("outpost_commands_sent_total", "counter", "Commands sent to agents",
                   [({}, float(self.commander.sent))]),
            Metric("outpost_commands_queued", "gauge",
                   "Commands queued at the hub, not yet stored by JetStream",
                   [({}, float(self.store.command_queue_depth()))]),
            Metric("outpost_placements_total", "counter", "Launches placed on an agent's offer",
                   [({}, float(self.scheduler.placed))]),
            Metric("outpost_liveness_errors_total", "counter", "Liveness passes that failed",
                   [({}, float(self.liveness.errors))]),
            Metric("outpost_enrollments_total", "counter",
                   "Enrollment and key rotation requests answered, by result",
                   [({"result": "ok"}, float(self.enrollments.answered)),
                    ({"result": "refused"}, float(self.enrollments.refused))]),
            Metric("outpost_enrollment_requests_shed_total", "counter",
                   "Enrollment requests never read: over enroll_rate_per_s, or queued so long "
                   "their sender gave up", [({}, float(self.enrollments.shed))]),
            Metric("outpost_enrollment_seconds_total", "counter",
                   "Time from an enrollment request to its reply, summed (registry write "
                   "included)", [({}, self.enrollments.wall_s)]),
            Metric("outpost_enrollment_cpu_seconds_total", "counter",
                   "The hub's own CPU time answering enrollments, summed",
                   [({}, self.enrollments.cpu_s)]),
            *(self.loop_watch.metrics() if self.loop_watch is not None else []),
            *self._nats_account_metrics(),
        ]

    def _nats_account_metrics(self) -> list[Metric]:
        if self.nats_account is None:
            return []
        stats = self.nats_account()
        return [
            Metric("outpost_nats_account_revocations", "gauge",
                   "Keys the NATS account refuses (revoked agents, keys rotated away)",
                   [({}, float(stats.revocations))]),
            Metric("outpost_nats_account_jwt_bytes", "gauge",
                   "Size of the NATS account JWT; an update must fit nats-server's max "
                   "payload (1 MB by default)", [({}, float(stats.jwt_bytes))]),
            Metric("outpost_nats_account_push_pending", "gauge",
                   "1 while nats-server lacks the account as last signed (a failed push, "
                   "retried): revoked boxes keep their connections until it lands",
                   [({}, float(stats.push_pending))])]
