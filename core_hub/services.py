"""Services (after Marathon): the core keeps ``instances`` copies of a task running across the
fleet, replaces copies lost with an agent, and settles duplicates when the agent comes back.

Each instance is an ordinary core-placed task named after the service and labelled
``outpost.service=<name>``. A pass every second compares what runs with what is wanted:
- too few: place more (the scheduler does placement, spread across sites by default);
- an instance on an agent unreachable for longer than ``disconnect.lost_after`` no longer
  counts when ``disconnect.replace`` is on, so a replacement is placed (the edge is probably
  still running the original; edge autonomy);
- too many (a scale-down, or an agent came back with its originals): kill the extras, chosen by
  ``disconnect.keep``. The service remembers which instances it replaced, so when they come
  back ``keep_original`` stops replacements (the newest first) and ``keep_replacement`` stops
  the returned originals (then the oldest); ``longest_running`` stops the most recently
  started. Only the surplus is killed, never every copy.
- a changed task rolls out revision by revision (``core_hub.rollout``): new instances first,
  old ones stopped as new ones become ready, rolled back (or paused) on failure; with
  ``update.stage_first`` the agents running the service first fetch the new task's artifacts
  (stage commands), and the first new instance starts once each of them holds them, so a
  slow uplink delays the rollout instead of leaving a replaced instance staging;
- an agent drained with ``migrate``: its instances stop counting, replacements are placed on
  other agents, and the drained copies are stopped once the replacements run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Collection
from typing import Any, Protocol

from core_hub.commands import Commander
from core_hub.rollout import plan
from core_hub.scheduler import CoreScheduler
from core_hub.store import HubStore
from federation.artifactrefs import task_artifact_refs
from federation.errors import Conflict, NotFound
from federation.loopguard import stop_loops
from federation.schemas import REVISION_LABEL

log = logging.getLogger(__name__)

TICK_S = 1.0
MAX_STARTS_PER_PASS = 50
ACTIVE_STATES = ("pending", "staging", "starting", "running")


class ArtifactStager(Protocol):
    """What ``update.stage_first`` needs of the core's artifacts (``CoreArtifacts``)."""

    async def resolve(self, ref: dict[str, str]) -> str | None: ...
    def holders(self, sha: str) -> list[dict[str, str]]: ...
    async def stage_on(self, agent_id: str, sha: str) -> None: ...


class Services:
    """Owns the services table and the reconcile loop."""

    def __init__(self, store: HubStore, scheduler: CoreScheduler,
                 commander: Commander) -> None:
        self.store = store
        self.scheduler = scheduler
        self.commander = commander
        self.killing: set[str] = set()
        self.artifacts: ArtifactStager | None = None  # set by the hub: stage_first rollouts
        self._loop: asyncio.Task[None] | None = None
        # One pass at a time: a pass awaits placements, and a second pass started meanwhile
        # (the tick and a create, say) would count the instances still being placed as
        # missing and place them again.
        self._pass = asyncio.Lock()

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._tick_loop(), name="services")

    async def stop(self) -> None:
        await stop_loops(self._loop)

    # ------------------------------------------------------------ API

    def get(self, name: str) -> dict[str, Any]:
        svc = self.store.service(name)
        if svc is not None:
            return self._status(svc, time.time())
        raise NotFound(f"service {name!r} not found", details={"service": name})

    def list(self) -> list[dict[str, Any]]:
        now = time.time()
        return [self._status(svc, now) for svc in self.store.services()]

    async def create(self, svc: dict[str, Any]) -> dict[str, Any]:
        if any(s["name"] == svc["name"] for s in self.store.services()):
            raise Conflict(f"service {svc['name']!r} exists; PUT to change it",
                           details={"service": svc["name"]})
        svc = _at_revision(svc, 1)
        svc["rollout"] = None
        self.store.put_service(svc["name"], svc, time.time())
        await self.reconcile(svc, time.time())
        return self.get(svc["name"])

    async def replace(self, name: str, svc: dict[str, Any]) -> dict[str, Any]:
        """Change a service. A changed task rolls out (see ``core_hub.rollout``)."""
        current = self.get(name)
        if svc["name"] != name:
            raise Conflict("a service's name cannot change", details={"service": name})
        rollout = current.get("rollout")
        revision = current.get("revision", 1)
        if _task_key(svc["task"]) != _task_key(current["task"]):
            if rollout and rollout["status"] in ("rolling", "rolling_back"):
                raise Conflict(f"service {name!r} is already rolling out revision "
                               f"{revision}; wait, or change it again once it is done",
                               details={"service": name, "rollout": rollout})
            rollout = {"status": "rolling", "started_at": time.time(), "reason": None,
                       "from_task": current["task"], "from_revision": revision}
            revision += 1
        svc = _at_revision(svc, revision)
        svc["rollout"] = rollout
        self.store.put_service(name, svc, time.time())
        await self.reconcile(svc, time.time())
        return self.get(name)

    async def delete(self, name: str) -> dict[str, Any]:
        async with self._pass:
            status = self.get(name)
            self.store.delete_service(name)
            for task in self._instances(name):
                await self._kill(task)
        return {**status, "instances": 0}

    # ------------------------------------------------------------ reconcile

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                now = time.time()
                for svc in self.store.services():
                    if svc.get("problem"):  # set aside until a PUT replaces it
                        continue
                    try:
                        await self.reconcile(svc, now)
                    except Exception as exc:  # one bad service must not stop the others
                        self._set_aside(svc, exc)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad pass must not stop the next
                log.exception("service reconcile failed")

    def _set_aside(self, svc: dict[str, Any], exc: Exception) -> None:
        """A service whose pass fails (say one stored by an older version with a float or
        null ``instances``) is not retried every second: its ``problem`` says why, the API
        shows it, and a PUT (which stores the service anew) clears it."""
        problem = f"set aside: the hub cannot reconcile it ({type(exc).__name__}: {exc})"
        log.error("service %s %s", svc["name"], problem, exc_info=True,
                  extra={"service": svc["name"]})
        self.store.put_service(svc["name"], {**svc, "problem": problem[:500]}, time.time())

    def _instances(self, name: str) -> list[dict[str, Any]]:
        return [t for t in self.store.list_tasks(name=name, active=True)
                if t.get("labels", {}).get("outpost.service") == name
                and t["id"] not in self.killing]

    def _split(self, svc: dict[str, Any], now: float) -> tuple[
            list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """(instances that count, instances lost with an unreachable agent, instances on an
        agent drained with ``migrate``: they run until their replacements do)."""
        instances = self._instances(svc["name"])
        agents = self.store.agents_by_id({t.get("agent_id") or "" for t in instances})
        rule = svc["disconnect"]
        counted, lost, leaving = [], [], []
        for task in instances:
            agent = agents.get(task.get("agent_id") or "")
            away = (agent is not None and agent["status"] == "unreachable"
                    and now - (agent.get("last_seen") or 0) > rule["lost_after"])
            # A revoked agent's reports are no longer believed: its instances are replaced.
            if (away and rule["replace"]) or (agent is not None and agent["revoked"]):
                lost.append(task)
            elif agent is not None and self.store.get_meta(f"migrate:{agent['id']}"):
                leaving.append(task)
            else:
                counted.append(task)
        return counted, lost, leaving

    async def reconcile(self, svc: dict[str, Any], now: float) -> None:
        """One pass over ``svc``, as the store has it once no other pass runs (it may have
        changed, or gone, while this one waited)."""
        async with self._pass:
            current = self.store.service(svc["name"])
            if current is not None:
                await self._reconcile(current, now)

    async def _reconcile(self, svc: dict[str, Any], now: float) -> None:
        rollout = svc.get("rollout")
        if rollout and rollout["status"] in ("rolling", "rolling_back"):
            await self._roll(svc, rollout, now)
            return
        counted, lost, leaving = self._split(svc, now)
        replaced = self._track_replaced(svc["name"], counted, lost, leaving)
        if leaving and sum(t["state"] == "running" for t in counted) >= svc["instances"]:
            for task in leaving:  # their replacements run: now the drained copies may go
                await self._kill(task)
        missing = svc["instances"] - len(counted)
        # A big service fills up over a few passes, so one service cannot stall the hub.
        for _ in range(min(missing, MAX_STARTS_PER_PASS)):
            await self.scheduler.submit(dict(svc["task"]))
        if missing < 0:
            for task in self._surplus(counted, -missing, svc["disconnect"]["keep"], replaced):
                log.info("service %s: %d over, stopping %s", svc["name"], -missing, task["id"],
                         extra={"service": svc["name"], "task": task["id"]})
                await self._kill(task)

    async def _roll(self, svc: dict[str, Any], rollout: dict[str, Any], now: float) -> None:
        counted, _, _ = self._split(svc, now)
        if (rollout["status"] == "rolling" and svc["update"].get("stage_first")
                and not (rollout.get("stage") or {}).get("done")):
            waiting = await self._stage_first(svc, rollout, counted, now)
            if waiting is None:
                return  # staged: the next pass starts the first batch
            if now - rollout["started_at"] > svc["update"]["timeout"]:
                self._fail(svc, rollout, f"artifacts not staged after "
                           f"{svc['update']['timeout']:g}s: {waiting}", now)
            return
        ended = [t for t in self.store.list_tasks(name=svc["name"])
                 if t["state"] in ("finished", "failed", "killed", "lost")]
        step = plan(instances=svc["instances"], revision=str(svc["revision"]), counted=counted,
                    ended=ended, started_at=rollout["started_at"], rules=svc["update"], now=now)
        if step.failed:
            self._fail(svc, rollout, step.failed, now)
            return
        if step.done:
            status = "rolled_back" if rollout["status"] == "rolling_back" else "done"
            self.store.put_service(svc["name"], {**svc, "rollout": {**rollout,
                                                                    "status": status}}, now)
            log.info("service %s at revision %d (%s)", svc["name"], svc["revision"], status,
                     extra={"service": svc["name"]})
            return
        for _ in range(min(step.start, MAX_STARTS_PER_PASS)):
            await self.scheduler.submit(dict(svc["task"]))
        by_id = {t["id"]: t for t in counted}
        for task_id in step.stop:
            await self._kill(by_id[task_id])

    def _fail(self, svc: dict[str, Any], rollout: dict[str, Any], why: str,
              now: float) -> None:
        """A rollout failed: roll back to the revision it came from, or pause, as the service
        says."""
        log.warning("service %s: revision %d failed: %s", svc["name"], svc["revision"], why,
                    extra={"service": svc["name"]})
        if rollout["status"] == "rolling" and svc["update"]["on_failure"] == "rollback":
            failed_revision = svc["revision"]
            svc = _at_revision({**svc, "task": rollout["from_task"]}, rollout["from_revision"])
            svc["rollout"] = {**rollout, "status": "rolling_back", "started_at": now,
                              "reason": f"revision {failed_revision}: {why}"}
        else:
            svc["rollout"] = {**rollout, "status": "paused", "reason": why}
        self.store.put_service(svc["name"], svc, now)

    async def _stage_first(self, svc: dict[str, Any], rollout: dict[str, Any],
                           counted: list[dict[str, Any]], now: float) -> str | None:
        """``update.stage_first``: send each agent running an old instance a stage command
        for every artifact the new task names (once per agent and artifact, remembered in
        the rollout), then wait until their offers list them. None once they all hold them
        (recorded: later passes do not look again); else what the rollout waits for, which
        is also its ``reason``. An unreachable agent is not waited for: its new instance
        fetches when it starts, as without ``stage_first``."""
        stage = dict(rollout.get("stage") or {"sent": []})
        waiting = await self._staging_gap(svc, stage, counted)
        if waiting is None:
            stage["done"] = True
            log.info("service %s: revision %d's artifacts staged", svc["name"],
                     svc["revision"], extra={"service": svc["name"]})
        changed = {**rollout, "stage": stage, "reason": waiting}
        if changed != rollout:
            self.store.put_service(svc["name"], {**svc, "rollout": changed}, now)
        return waiting

    async def _staging_gap(self, svc: dict[str, Any], stage: dict[str, Any],
                           counted: list[dict[str, Any]]) -> str | None:
        refs = task_artifact_refs(svc["task"])
        if not refs:
            return None
        if self.artifacts is None:
            return "this hub has no artifact store to stage from"
        digests = []
        for ref in refs:
            sha = await self.artifacts.resolve(ref)
            if sha is None:
                named = ref.get("digest") or f"{ref['name']}:{ref['version']}"
                return f"artifact {named} is not at the core yet"
            digests.append(sha)
        revision = str(svc["revision"])
        on = {t["agent_id"] for t in counted
              if t.get("agent_id") and t.get("labels", {}).get(REVISION_LABEL) != revision}
        agents = [a for a in self.store.agents_by_id(on).values()
                  if a["status"] != "unreachable" and not a["revoked"]]
        sent, held, missing = set(stage["sent"]), 0, 0
        for sha in digests:
            holding = {h["id"] for h in self.artifacts.holders(sha)}
            for agent in agents:
                if agent["id"] in holding:
                    held += 1
                    continue
                missing += 1
                if f"{agent['id']}:{sha}" not in sent:
                    await self.artifacts.stage_on(agent["id"], sha)
                    sent.add(f"{agent['id']}:{sha}")
        stage["sent"] = sorted(sent)
        if not missing:
            return None
        return (f"staging {len(digests)} artifact(s) on {len(agents)} agent(s): "
                f"{held} of {held + missing} held")

    def _track_replaced(self, name: str, counted: list[dict[str, Any]],
                        lost: list[dict[str, Any]], leaving: list[dict[str, Any]]) -> set[str]:
        """The instances this service has replaced (lost with their agent) that are still
        active somewhere: when their agent returns they are the originals the keep rule
        weighs against the replacements. Kept in the view's meta table."""
        key = f"replaced:{name}"
        before = set(json.loads(self.store.get_meta(key) or "[]"))
        active = {t["id"] for t in (*counted, *lost, *leaving)}
        now = (before | {t["id"] for t in lost}) & active
        if now != before:
            self.store.set_meta(key, json.dumps(sorted(now)))
        return now

    @staticmethod
    def _surplus(tasks: list[dict[str, Any]], n: int, keep: str,
                 replaced: Collection[str] = ()) -> list[dict[str, Any]]:
        """Which ``n`` of ``tasks`` to stop: unplaced ones first, then by the ``keep`` rule
        (``replaced``: returned originals, see ``_track_replaced``)."""
        def order(task: dict[str, Any]) -> tuple[int, int, float]:
            placed = 0 if task["state"] in ("pending", "staging") else 1
            original = task["id"] in replaced
            if keep == "keep_replacement":  # returned originals first, then the oldest
                return placed, 0 if original else 1, task.get("created_at") or 0.0
            if keep == "longest_running":  # the most recently started first
                return placed, 0, -(task.get("started_at") or float("inf"))
            # keep_original: never a returned original while another can go; newest first
            return placed, 1 if original else 0, -(task.get("created_at") or 0.0)
        return sorted(tasks, key=order)[:n]

    async def _kill(self, task: dict[str, Any]) -> None:
        self.killing.add(task["id"])
        if self.scheduler.cancel(task["id"]) or not task.get("agent_id"):
            return
        await self.commander.send(task["agent_id"], "kill", {"task_id": task["id"]})

    def _status(self, svc: dict[str, Any], now: float) -> dict[str, Any]:
        counted, lost, leaving = self._split(svc, now)
        return {**svc, "running": sum(t["state"] == "running" for t in counted),
                "tasks": [t["id"] for t in counted], "lost": [t["id"] for t in lost],
                "migrating": [t["id"] for t in leaving]}


def _task_key(task: dict[str, Any]) -> dict[str, Any]:
    """A task spec without the revision label, to tell a real change from a re-submit."""
    labels = {k: v for k, v in task.get("labels", {}).items() if k != REVISION_LABEL}
    return {**task, "labels": labels}


def _at_revision(svc: dict[str, Any], revision: int) -> dict[str, Any]:
    task = _task_key(svc["task"])
    task["labels"] = {**task["labels"], REVISION_LABEL: str(revision)}
    return {**svc, "task": task, "revision": revision}
