"""The core's side of two-level scheduling: place submitted tasks on edge offers, send the
launch, follow the edge's answer (accept or decline), place again on a decline.

Never on two agents (DESIGN guarantee 5): the choice of agent and the command id are written to
the view *before* the launch is published, and only a ``declined``/``rejected``/``expired``
result from that agent lets the task move elsewhere, or that agent being revoked (it has left
the fleet: whatever it may run is no longer the fleet's, and it will never answer). A hub that
restarts mid-placement resends the same launch (same command id, same task id) to the same
agent, which applies it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from core_hub.commands import Commander
from core_hub.placement import NoPlacement, Offer, Placer
from core_hub.store import HubStore
from federation import __version__
from federation.loopguard import stop_loops
from federation.messages import MessageInvalid
from federation.schemas import REVISION_LABEL

log = logging.getLogger(__name__)

TICK_S = 0.5
# Settled launch records of ended tasks are deleted after this long (checked every minute).
LAUNCH_KEEP_S = 3600.0
LAUNCH_PRUNE_EVERY_S = 60.0
PLACE_PER_TICK = 200  # placement tries of pending launches per pass
FAILED_RESULTS = frozenset({"declined", "rejected", "expired"})
DONE_RESULTS = frozenset({"applied", "duplicate"})


class CoreScheduler:
    """Owns the placer and the launches table; ``submit`` is the API's ``POST /v1/tasks``."""

    def __init__(self, store: HubStore, commander: Commander) -> None:
        self.store = store
        self.commander = commander
        self.placer = Placer()
        self._offer_ids: dict[str, tuple[Any, str]] = {}
        self._revoked: set[str] = set()
        self._changes_at: int | None = None  # the last placement change taken in
        self._loop: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.placed = 0
        # Offers change -> version moves; a task that did not fit is tried again only then.
        self._offers_version = 0
        self._tried_at: dict[str, int] = {}
        self._pending_at = 0  # where the next pass's tries of pending launches begin

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._tick_loop(), name="core-scheduler")

    async def stop(self) -> None:
        await stop_loops(self._loop)

    # ------------------------------------------------------------ submit

    async def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        task_id = uuid.uuid4().hex
        now = time.time()
        async with self._lock:
            self._refresh_offers(now)
            with self.store.transaction():
                self.store.save_launch(task_id, spec=spec, agent_id=None, command_id=None,
                                       status="pending", excluded=[], reason="placing", now=now)
            await self._place({"task_id": task_id, "spec": spec, "excluded": [],
                               "created_at": now}, now)
        return self.store.get_task(task_id)

    def cancel(self, task_id: str) -> bool:
        """Never place or re-place this task again (it is being killed). Returns True when no
        agent can have it yet, and records it ``killed`` here; otherwise the caller must send
        the agent a kill (it follows the launch in the agent's command stream)."""
        self.placer.release(task_id)
        self._tried_at.pop(task_id, None)
        for launch in self.store.launches("pending", "placing", "sent", "accepted",
                                          task_id=task_id):
            unplaced = launch["agent_id"] is None
            with self.store.transaction():
                self._save(launch, "cancelled", launch["agent_id"], reason="killed")
                if unplaced:
                    task = self.store.get_task(task_id)
                    self.store.put_core_task({**task, "state": "killed",
                                              "reason": "killed before it was placed"},
                                             time.time())
            return unplaced
        return False

    # ------------------------------------------------------------ the loop

    async def _tick_loop(self) -> None:
        pruned_at = 0.0
        while True:
            try:
                await self.tick()
                if time.monotonic() - pruned_at >= LAUNCH_PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    if gone := self.store.prune_launches(time.time() - LAUNCH_KEEP_S):
                        log.info("pruned %d settled launch records", gone)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad pass must not stop placement for good
                log.exception("core scheduler pass failed")
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        now = time.time()
        async with self._lock:
            self._refresh_offers(now)
            for launch in self.store.launches("placing"):  # written, maybe never published
                await self._publish(launch)
            offers: dict[str, Any] | None = None  # read only if a launch was answered
            for launch in self.store.launches("sent"):
                result = launch["result"]
                if result in DONE_RESULTS:
                    self.placer.confirm(launch["task_id"])
                    # An offer the edge made after it applied the launch already counts the
                    # task: holding the reservation as well would count it twice.
                    if offers is None:
                        offers = {o.get("agent_id"): o for o in self.store.list_offers()}
                    offer = offers.get(launch["agent_id"]) or {}
                    if (offer.get("created_at") or 0) >= (launch["result_ts"] or float("inf")):
                        self.placer.release(launch["task_id"])
                    with self.store.transaction():
                        self._save(launch, "accepted", launch["agent_id"], reason=None)
                elif result in FAILED_RESULTS or launch["agent_id"] in self._revoked:
                    self.placer.release(launch["task_id"])
                    launch["excluded"] = [*launch["excluded"], launch["agent_id"]]
                    log.info("launch of %s %s by %s; placing again", launch["task_id"],
                             result or "unanswered, the agent is revoked", launch["agent_id"],
                             extra={"task": launch["task_id"]})
                    await self._place(launch, now)
            pending = self.store.launches("pending")
            # At most PLACE_PER_TICK tries a pass, going round the queue from where the last
            # pass stopped: with offers changing every pass, a deep queue that does not fit
            # would otherwise be tried whole every 0.5 s.
            start = self._pending_at % len(pending) if pending else 0
            tries = 0
            for at in range(len(pending)):
                launch = pending[(start + at) % len(pending)]
                # Nothing new to place it on since it last did not fit: skip the work.
                if self._tried_at.get(launch["task_id"]) == self._offers_version:
                    continue
                if tries == PLACE_PER_TICK:
                    self._pending_at = start + at
                    break
                tries += 1
                try:
                    await self._place(launch, now)
                except Exception as exc:  # a record no pass can place: not every pass
                    self._set_aside(launch, exc)
            else:
                self._pending_at = 0

    def _set_aside(self, launch: dict[str, Any], exc: Exception) -> None:
        """Stop trying a launch that fails every pass (say a spec stored by an older version
        with a null or NaN amount): it is marked ``set_aside`` and its task ``failed``, with
        the reason the API shows, instead of failing the placement of every other task."""
        reason = f"set aside: the hub cannot place it ({type(exc).__name__}: {exc})"[:500]
        log.error("task %s %s", launch["task_id"], reason, exc_info=True,
                  extra={"task": launch["task_id"]})
        self.placer.release(launch["task_id"])
        now = time.time()
        with self.store.transaction():
            self._save(launch, "set_aside", launch.get("agent_id"), reason=reason)
            with contextlib.suppress(Exception):  # the task record may be as broken
                task = self.store.get_task(launch["task_id"])
                self.store.put_core_task({**task, "state": "failed", "reason": reason,
                                          "finished_at": now, "updated_at": now}, now)

    def _refresh_offers(self, now: float) -> None:
        """Bring the placer's offers up to date with what changed since the last pass: the
        agents the view's ``placement_changes`` names (its triggers see every writer). The
        first pass, and one that finds the changes it needs pruned, reads every agent's
        status and offer id instead (no JSON decoded)."""
        changes = None if self._changes_at is None else self.store.placement_changes(
            self._changes_at)
        if changes is None:
            self._changes_at = self.store.last_placement_change()
            self._refresh_all()
            return
        self._changes_at, agents = changes
        for agent in agents:
            self._refresh_agent(agent)

    def _refresh_all(self) -> None:
        statuses: dict[str, str] = {}
        revoked: set[str] = set()
        for agent_id, status, is_revoked in self.store.agent_statuses():
            if is_revoked:
                revoked.add(agent_id)
            else:
                statuses[agent_id] = status
        self._revoked = revoked
        for agent, offer_id in self.store.offer_ids():
            if agent in statuses:
                self._take_offer(agent, offer_id, statuses[agent])
        for agent in set(self._offer_ids) - set(statuses):
            self._drop(agent)

    def _refresh_agent(self, agent: str) -> None:
        state = self.store.placement_state(agent)
        if state is None or state[1]:  # gone, or revoked: nothing is placed on it again
            if state is None:
                self._revoked.discard(agent)
            else:
                self._revoked.add(agent)
            self._drop(agent)
            return
        status, _, offer_id = state
        self._revoked.discard(agent)
        if offer_id is not None:
            self._take_offer(agent, offer_id, status)

    def _take_offer(self, agent: str, offer_id: Any, status: str) -> None:
        """Give the placer the agent's stored offer, unless it has this one already."""
        key = (offer_id, status)
        if self._offer_ids.get(agent, (None, ""))[0] == key:
            return
        body = self.store.offer_of(agent)
        if body is None:  # gone since the scan
            return
        self._offer_ids[agent] = (key, status)
        self.placer.update_offer(Offer.from_body(body, status=status))
        self._offers_version += 1

    def _drop(self, agent: str) -> None:
        if agent in self._offer_ids:
            self.placer.remove(agent)
            del self._offer_ids[agent]
            self._offers_version += 1

    # ------------------------------------------------------------ placing

    def _existing(self, spec: dict[str, Any]) -> list[tuple[str, str]]:
        """(agent, site) of each placed, active task called like ``spec`` (what spread and
        ``unique`` weigh), read by SQL with no task body decoded: a service's pass submits
        many instances, and decoding every instance per submit made its passes quadratic (a
        10,000-instance service kept the hub from answering for seconds at a time).

        A service instance weighs only instances of its own revision: during a rolling
        update the new revision's copies are unique among themselves, beside the old ones
        they replace (else a ``unique: site`` service, one copy per site, could never
        surge a new copy anywhere and its rollout would only ever time out)."""
        revision = (spec.get("labels") or {}).get(REVISION_LABEL)
        return self.store.active_placements(spec["name"], revision)

    async def _place(self, launch: dict[str, Any], now: float) -> None:
        task_id, spec = launch["task_id"], launch["spec"]
        choice = self.placer.place(spec, now=now, task_id=task_id,
                                   existing=self._existing(spec),
                                   exclude=launch["excluded"])
        if isinstance(choice, NoPlacement):
            self._tried_at[task_id] = self._offers_version
            if launch.get("status") == "pending" and launch.get("reason") == choice.reason:
                return  # still pending for the same reason: nothing to write (nor mirror)
            with self.store.transaction():
                self._save(launch, "pending", None, reason=choice.reason)
            return
        self._tried_at.pop(task_id, None)
        launch = {**launch, "agent_id": choice.agent_id, "offer_id": choice.offer_id,
                  "command_id": uuid.uuid4().hex}
        with self.store.transaction():  # write-ahead: this agent, this command, before sending
            self._save(launch, "placing", choice.agent_id,
                       reason=f"launch sent to {choice.agent_id} ({choice.site})")
        self.placed += 1
        await self._publish(launch)

    async def _publish(self, launch: dict[str, Any]) -> None:
        try:
            await self.commander.send(launch["agent_id"], "launch", {
                "task_id": launch["task_id"], "spec": launch["spec"],
                "offer_id": launch.get("offer_id")}, command_id=launch["command_id"])
        except MessageInvalid as exc:  # not a launch any edge could take: no resend
            self._set_aside(launch, exc)
            return
        except Exception as exc:  # NATS away: stays 'placing', resent on the next pass
            log.warning("launch of %s not sent yet: %r", launch["task_id"], exc)
            return
        with self.store.transaction():
            self._save(launch, "sent", launch["agent_id"], reason=None, keep_reason=True)

    def _save(self, launch: dict[str, Any], status: str, agent_id: str | None, *,
              reason: str | None, keep_reason: bool = False) -> None:
        now = time.time()
        if not keep_reason:
            launch["reason"] = reason
        self.store.save_launch(launch["task_id"], spec=launch["spec"], agent_id=agent_id,
                               command_id=launch.get("command_id"), status=status,
                               excluded=launch["excluded"], reason=launch.get("reason"),
                               now=now)
        if status in ("pending", "placing"):
            spec = launch["spec"]
            self.store.put_core_task({
                **spec, "id": launch["task_id"], "state": "pending" if status == "pending"
                else "staging", "reason": launch.get("reason"), "agent_id": agent_id,
                "site": None, "origin": "core", "generation": 1, "restarts": 0,
                "exit_code": None, "pid": None, "healthy": None,
                "created_at": launch.get("created_at", now), "updated_at": now,
                "started_at": None, "finished_at": None, "version": __version__}, now)
