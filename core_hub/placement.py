"""Placement: which agent should run a task, or a sentence saying why none can.

This is the hub's half of two-level placement (after Mesos). Edges offer what they have free;
the hub keeps the latest `Offer` per agent and, on top of it, its own *reservations*: resources
promised to tasks it has sent a ``launch`` for. `Placer.place` filters the offers by the task's
constraints, scores what is left, reserves the task's resources on the winner and returns a
`Placement`; when nothing fits it returns a `NoPlacement` whose reason a person can act on.
Everything here is pure and in memory: no I/O, no clock (callers pass ``now``), no logging.

Eligibility. An agent can take a task when its status is ``online`` (``draining``,
``disconnected`` and ``unreachable`` agents are skipped), its offer has not expired
(``expires_at > now``), it matches ``constraints.site``, ``constraints.agent`` (an agent id) and
every label selector, ``unique`` allows it (``existing`` lists the service's other instances),
it is not in ``exclude`` (agents that just declined the task), and its free resources — the
offer minus the hub's reservations — cover the task's ``cpus``, ``mem_mb`` and ``disk_mb``.
Label selectors follow Kubernetes: ``eq``/``in`` need the label with one of ``values``,
``exists`` needs the key, ``not_in`` passes when the key is absent or its value is not listed.

Scores. *Headroom* is how many copies of this task an agent could still take: the smallest of
free/needed over the resources the task asks for. ``spread`` (the default) first picks the
sites with the fewest instances of the service (from ``existing``) and then the fewest
reserved tasks; among the agents of those sites it takes the one with the most headroom.
``binpack`` ignores sites and takes the agent with the least headroom that still fits. Equal
scores go to the smallest agent id, so the same state always gives the same answer.

Offers and reservations. A reservation lives from ``place`` until ``release`` (the edge
declined, or the task ended) or until a newer offer from its agent makes it redundant.
``confirm`` records that the edge accepted, i.e. started the task. An edge computes each offer
from what it is running, so an offer that arrives after a confirmation already accounts for
that task: `Placer.update_offer` drops the agent's confirmed reservations and keeps the
unconfirmed ones (their launch may not have reached the edge yet). This relies on an edge's
result and offer events arriving in the order the edge wrote them, which its outbox stream
guarantees; an offer written before the task started but arriving after its confirmation
would make the hub briefly optimistic, and the edge would decline an over-committed launch.
When an offer shrinks below the unconfirmed reservations the agent simply has no room until
they are released; ``place`` never reserves beyond an offer.

Cost. Offers are indexed by site and by label, and each site keeps an upper bound of its
agents' free resources, so a spread placement scans only the sites that could beat the best
agent found so far; a placement without a site or label constraint still touches every *site*
once, and ``binpack`` scans every candidate agent. Explaining a failure walks the candidates
(slower, but it happens once per unplaceable task). CPUs are counted in integer millionths so
reservations add and subtract exactly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

ONLINE = "online"
DEFAULT_CPUS = 0.1  # the schema defaults, for specs that were not validated with defaults
DEFAULT_MEM_MB = 32
DEFAULT_DISK_MB = 0
LABEL_OPS = frozenset({"eq", "in", "not_in", "exists"})
_MICRO = 1_000_000
PROCESS = "process"
PROCESS_ONLY = frozenset({PROCESS})


def _micro(cpus: float) -> int:
    return round(cpus * _MICRO)


@dataclass(frozen=True, slots=True)
class Offer:
    """An agent's latest offer as the hub sees it.

    ``agent_id``, ``site``, ``labels``: who is offering and how constraints see it.
    ``cpus``, ``mem_mb``, ``disk_mb``: what the edge had free when it made the offer.
    ``expires_at``: epoch seconds after which the offer is not used.
    ``status``: the agent's liveness status; only ``online`` agents get tasks.
    ``offer_id``: the edge's id for the offer, echoed in the ``launch`` command (None if absent).
    ``drivers``: the task drivers the agent runs (an offer without them: processes only).
    """

    agent_id: str
    site: str
    labels: Mapping[str, str]
    cpus: float
    mem_mb: int
    disk_mb: int
    expires_at: float
    status: str = ONLINE
    offer_id: str | None = None
    drivers: frozenset[str] = PROCESS_ONLY

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, status: str = ONLINE) -> Offer:
        """An offer from its wire/view dict (``federation.schemas.OFFER``)."""
        return cls(agent_id=str(body["agent_id"]), site=str(body.get("site", "")),
                   labels=dict(body.get("labels") or {}), cpus=float(body["cpus"]),
                   mem_mb=int(body["mem_mb"]), disk_mb=int(body.get("disk_mb", 0)),
                   expires_at=float(body["expires_at"]), status=status,
                   offer_id=body.get("id"),
                   drivers=frozenset(body.get("drivers") or PROCESS_ONLY))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a task goes: the agent, the offer the launch names, and the agent's site."""

    agent_id: str
    offer_id: str | None
    site: str


@dataclass(frozen=True, slots=True)
class NoPlacement:
    """Nothing can take the task now; ``reason`` is a sentence for the task's ``reason``."""

    reason: str


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of ``cpus``, ``mem_mb`` and ``disk_mb`` (free or reserved on an agent)."""

    cpus: float
    mem_mb: int
    disk_mb: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """Resources the hub has promised ``task_id`` on ``agent_id``; ``confirmed`` once started."""

    task_id: str
    agent_id: str
    cpus: float
    mem_mb: int
    disk_mb: int
    confirmed: bool


class _Res:
    """A reservation, mutable inside the placer (``confirmed`` flips)."""

    __slots__ = ("task_id", "agent_id", "c", "m", "d", "confirmed")

    def __init__(self, task_id: str, agent_id: str, c: int, m: int, d: int) -> None:
        self.task_id, self.agent_id = task_id, agent_id
        self.c, self.m, self.d = c, m, d
        self.confirmed = False


class _Agent:
    """One agent's offer plus what the hub reserved on it; ``free_*`` = offer - reserved."""

    __slots__ = ("agent_id", "site", "labels", "status", "expires_at", "offer", "cap_c", "cap_m",
                 "cap_d", "free_c", "free_m", "free_d", "tasks", "drivers")

    def __init__(self, offer: Offer) -> None:
        self.agent_id = offer.agent_id
        self.tasks: dict[str, _Res] = {}
        self.set_offer(offer)

    def set_offer(self, offer: Offer) -> None:
        self.offer = offer
        self.site = offer.site
        self.labels = offer.labels
        self.status = offer.status
        self.expires_at = offer.expires_at
        self.drivers = offer.drivers
        self.cap_c, self.cap_m, self.cap_d = _micro(offer.cpus), offer.mem_mb, offer.disk_mb
        self.free_c = self.cap_c - sum(r.c for r in self.tasks.values())
        self.free_m = self.cap_m - sum(r.m for r in self.tasks.values())
        self.free_d = self.cap_d - sum(r.d for r in self.tasks.values())


class _Need:
    """A task spec and its context, parsed once per ``place`` call."""

    __slots__ = ("c", "m", "d", "site", "agent", "sels", "not_in", "unique", "binpack",
                 "service", "site_counts", "existing_agents", "exclude", "ex_agents", "ex_sites",
                 "driver")

    def __init__(self, spec: Mapping[str, Any], existing: Iterable[tuple[str, str]],
                 exclude: Collection[str], service: str | None) -> None:
        res = spec.get("resources") or {}
        con = spec.get("constraints") or {}
        self.c = max(1, _micro(res.get("cpus", DEFAULT_CPUS)))
        self.m = int(res.get("mem_mb", DEFAULT_MEM_MB))
        self.d = int(res.get("disk_mb", DEFAULT_DISK_MB))
        # None for processes (every agent runs them); else the driver an agent must offer.
        driver = str(spec.get("driver") or PROCESS)
        self.driver: str | None = None if driver == PROCESS else driver
        self.site: str | None = con.get("site")
        self.agent: str | None = con.get("agent")
        sels = []
        for sel in con.get("labels") or ():
            op = sel["op"]
            if op not in LABEL_OPS:
                raise ValueError(f"unknown label operator {op!r}")
            sels.append((sel["key"], op, tuple(sel.get("values") or ())))
        self.sels: list[tuple[str, str, tuple[str, ...]]] = sels
        self.not_in = [(k, frozenset(v)) for k, op, v in sels if op == "not_in"]
        self.unique: str | None = con.get("unique")
        self.binpack = con.get("strategy", "spread") == "binpack"
        self.service = service or str(spec.get("name", "?"))
        pairs = list(existing)
        self.site_counts: dict[str, int] = {}
        for _, site in pairs:
            self.site_counts[site] = self.site_counts.get(site, 0) + 1
        self.existing_agents = {agent for agent, _ in pairs}
        self.exclude = frozenset(exclude)
        self.ex_agents = (self.exclude | self.existing_agents if self.unique == "agent"
                          else self.exclude)
        self.ex_sites = frozenset(self.site_counts) if self.unique == "site" else frozenset()

    def headroom(self, c: int, m: int, d: int) -> float:
        h = c / self.c
        if self.m > 0 and m / self.m < h:
            h = m / self.m
        if self.d > 0 and d / self.d < h:
            h = d / self.d
        return h


class Placer:
    """The hub's placement state: the latest offer per agent and the reservations on top.

    Not thread-safe; the hub serializes placement (one task, or the placement lease).
    """

    def __init__(self) -> None:
        self._agents: dict[str, _Agent] = {}
        self._sites: dict[str, dict[str, _Agent]] = {}
        self._labels: dict[str, dict[str, set[str]]] = {}  # key -> value -> agent ids
        self._res: dict[str, _Res] = {}
        self._site_reserved: dict[str, int] = {}  # reservations on the site's agents
        self._site_max: dict[str, list[int]] = {}  # per-dimension max free over the site
        self._dirty: set[str] = set()  # sites whose max must be recomputed

    # ------------------------------------------------------------------ offers
    def update_offer(self, offer: Offer) -> None:
        """Take ``offer`` as the agent's latest; drop its confirmed reservations (see module)."""
        agent = self._agents.get(offer.agent_id)
        if agent is None:
            agent = self._agents[offer.agent_id] = _Agent(offer)
        else:
            self._detach(agent)
            for task_id in [t for t, r in agent.tasks.items() if r.confirmed]:
                del agent.tasks[task_id]
                del self._res[task_id]
            agent.set_offer(offer)
        self._attach(agent)

    def set_status(self, agent_id: str, status: str) -> bool:
        """Record a liveness change without a new offer; False if the agent has no offer."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return False
        agent.status = status
        agent.offer = replace(agent.offer, status=status)
        return True

    def remove(self, agent_id: str) -> bool:
        """Forget an agent, its offer and its reservations; False if it was unknown."""
        agent = self._agents.pop(agent_id, None)
        if agent is None:
            return False
        self._detach(agent)
        for task_id in agent.tasks:
            del self._res[task_id]
        agent.tasks.clear()
        return True

    def offers(self) -> list[Offer]:
        """Every agent's latest offer, by agent id (expired ones included)."""
        return [self._agents[a].offer for a in sorted(self._agents)]

    def free(self, agent_id: str) -> Resources | None:
        """The agent's offer minus the hub's reservations (may be negative after a shrink)."""
        a = self._agents.get(agent_id)
        return None if a is None else Resources(a.free_c / _MICRO, a.free_m, a.free_d)

    def reservations(self, agent_id: str | None = None) -> list[Reservation]:
        """Current reservations, all or one agent's, by task id."""
        rs = (self._res.values() if agent_id is None
              else self._agents[agent_id].tasks.values() if agent_id in self._agents else ())
        return [Reservation(r.task_id, r.agent_id, r.c / _MICRO, r.m, r.d, r.confirmed)
                for r in sorted(rs, key=lambda r: r.task_id)]

    def __len__(self) -> int:
        return len(self._agents)

    # ------------------------------------------------------------ reservations
    def release(self, task_id: str) -> bool:
        """Give a task's reservation back (declined, ended, or re-placed); False if none."""
        r = self._res.pop(task_id, None)
        if r is None:
            return False
        agent = self._agents[r.agent_id]
        del agent.tasks[task_id]
        agent.free_c += r.c
        agent.free_m += r.m
        agent.free_d += r.d
        self._site_reserved[agent.site] -= 1
        self._raised(agent)
        return True

    def confirm(self, task_id: str) -> bool:
        """The edge accepted the launch: keep the reservation until the agent's next offer."""
        r = self._res.get(task_id)
        if r is None:
            return False
        r.confirmed = True
        return True

    # ----------------------------------------------------------------- placing
    def place(self, spec: Mapping[str, Any], *, now: float,
              existing: Iterable[tuple[str, str]] = (), task_id: str | None = None,
              exclude: Collection[str] = (), service: str | None = None
              ) -> Placement | NoPlacement:
        """Choose an agent for ``spec`` and reserve its resources there.

        ``existing``: ``(agent_id, site)`` of the service's other instances, including ones
        placed but not yet running; it drives ``unique`` and the spread across sites.
        ``task_id`` keys the reservation (default ``spec["id"]``); a task that already holds
        one is re-placed, its old reservation released first. ``exclude``: agent ids not to
        use (e.g. the one that just declined). ``service`` names the service in reasons
        (default ``spec["name"]``).
        """
        tid = task_id if task_id is not None else spec.get("id")
        if tid is None:
            raise ValueError("place() needs task_id or a spec with an 'id'")
        self.release(tid)
        need = _Need(spec, existing, exclude, service)
        agent = self._find(need, now)
        if agent is None:
            return NoPlacement(self._explain(need, now))
        r = _Res(tid, agent.agent_id, need.c, need.m, need.d)
        self._res[tid] = r
        agent.tasks[tid] = r
        old = (agent.free_c, agent.free_m, agent.free_d)
        agent.free_c -= need.c
        agent.free_m -= need.m
        agent.free_d -= need.d
        self._site_reserved[agent.site] += 1
        self._lowered(agent, old)
        return Placement(agent.agent_id, agent.offer.offer_id, agent.site)

    def _find(self, need: _Need, now: float) -> _Agent | None:
        cand = self._label_candidates(need)
        if need.agent is not None:
            agent = self._agents.get(need.agent)
            if (agent is None or (need.site is not None and agent.site != need.site)
                    or (cand is not None and need.agent not in cand)):
                return None
            return self._scan((agent,), need, now, None)
        if cand is not None:
            agents = [self._agents[a] for a in cand]
            if need.site is not None:
                agents = [a for a in agents if a.site == need.site]
            if need.binpack:
                return self._scan(agents, need, now, None)
            groups: dict[str, list[_Agent]] = {}
            for a in agents:
                groups.setdefault(a.site, []).append(a)
            return self._spread(groups, need, now)
        if need.site is not None:
            return self._scan(self._sites.get(need.site, {}).values(), need, now, None)
        if need.binpack:
            return self._scan(self._agents.values(), need, now, None)
        return self._spread({s: g.values() for s, g in self._sites.items()}, need, now)

    def _label_candidates(self, need: _Need) -> set[str] | None:
        """Agent ids passing the indexable selectors (eq, in, exists); None if there are none."""
        cand: set[str] | None = None
        for key, op, values in need.sels:
            if op == "not_in":
                continue
            by_value = self._labels.get(key, {})
            chosen = by_value.values() if op == "exists" else [
                by_value[v] for v in values if v in by_value]
            ids: set[str] = set().union(*chosen)
            cand = ids if cand is None else cand & ids
            if not cand:
                return cand
        return cand

    def _spread(self, groups: Mapping[str, Iterable[_Agent]], need: _Need,
                now: float) -> _Agent | None:
        """Sites with the fewest instances, then fewest reservations; most headroom inside."""
        tiers: dict[tuple[int, int], list[str]] = {}
        counts, reserved, ex_sites = need.site_counts, self._site_reserved, need.ex_sites
        for site in groups:
            if site not in ex_sites:
                key = (counts.get(site, 0), reserved.get(site, 0))
                tier = tiers.get(key)
                if tier is None:
                    tiers[key] = [site]
                else:
                    tier.append(site)
        for key in sorted(tiers):
            bounded = sorted(((self._bound(s, need), s) for s in tiers[key]), reverse=True)
            best: _Agent | None = None
            best_h = 0.0
            for bound, site in bounded:
                if bound < 1.0 or (best is not None and bound < best_h):
                    break  # sorted: no later site can fit, or beat what we have
                found = self._scan(groups[site], need, now, best)
                if found is not best:
                    best = found
                    assert best is not None
                    best_h = need.headroom(best.free_c, best.free_m, best.free_d)
            if best is not None:
                return best
        return None

    def _scan(self, agents: Iterable[_Agent], need: _Need, now: float,
              best: _Agent | None) -> _Agent | None:
        """The best eligible agent among ``agents`` and ``best`` (the score of the strategy)."""
        c, m, d = need.c, need.m, need.d
        ex_agents, ex_sites, not_in = need.ex_agents, need.ex_sites, need.not_in
        binpack, driver = need.binpack, need.driver
        if best is None:
            best_h, best_id = (float("inf") if binpack else -1.0), ""
        else:
            best_h = need.headroom(best.free_c, best.free_m, best.free_d)
            best_id = best.agent_id
        for a in agents:
            if (a.free_c < c or a.free_m < m or a.free_d < d or a.status != ONLINE
                    or a.expires_at <= now):
                continue
            aid = a.agent_id
            if aid in ex_agents or (ex_sites and a.site in ex_sites):
                continue
            if not_in and any(a.labels.get(k) in vs for k, vs in not_in):
                continue
            if driver is not None and driver not in a.drivers:
                continue
            h = a.free_c / c
            if m > 0 and a.free_m / m < h:
                h = a.free_m / m
            if d > 0 and a.free_d / d < h:
                h = a.free_d / d
            if binpack:
                if h < best_h or (h == best_h and aid < best_id):
                    best, best_h, best_id = a, h, aid
            elif h > best_h or (h == best_h and aid < best_id):
                best, best_h, best_id = a, h, aid
        return best

    # ------------------------------------------------------------ site indexes
    def _attach(self, agent: _Agent) -> None:
        site = agent.site
        self._sites.setdefault(site, {})[agent.agent_id] = agent
        self._site_reserved[site] = self._site_reserved.get(site, 0) + len(agent.tasks)
        for key, value in agent.labels.items():
            self._labels.setdefault(key, {}).setdefault(value, set()).add(agent.agent_id)
        if site not in self._site_max:
            self._site_max[site] = [agent.free_c, agent.free_m, agent.free_d]
        else:
            self._raised(agent)

    def _detach(self, agent: _Agent) -> None:
        site = agent.site
        members = self._sites[site]
        del members[agent.agent_id]
        self._site_reserved[site] -= len(agent.tasks)
        if members:
            self._dirty.add(site)
        else:
            del self._sites[site], self._site_reserved[site], self._site_max[site]
            self._dirty.discard(site)
        for key, value in agent.labels.items():
            by_value = self._labels[key]
            ids = by_value[value]
            ids.discard(agent.agent_id)
            if not ids:
                del by_value[value]
                if not by_value:
                    del self._labels[key]

    def _raised(self, agent: _Agent) -> None:
        mx = self._site_max[agent.site]
        mx[0] = max(mx[0], agent.free_c)
        mx[1] = max(mx[1], agent.free_m)
        mx[2] = max(mx[2], agent.free_d)

    def _lowered(self, agent: _Agent, old: tuple[int, int, int]) -> None:
        mx = self._site_max[agent.site]
        if old[0] == mx[0] or old[1] == mx[1] or old[2] == mx[2]:
            self._dirty.add(agent.site)  # it may have been the maximum

    def _bound(self, site: str, need: _Need) -> float:
        """An upper bound of the headroom of any agent in ``site`` for this task."""
        mx = self._site_max[site]
        if site in self._dirty:
            members = self._sites[site].values()
            mx[0] = max(a.free_c for a in members)
            mx[1] = max(a.free_m for a in members)
            mx[2] = max(a.free_d for a in members)
            self._dirty.discard(site)
        if mx[0] < need.c or mx[1] < need.m or mx[2] < need.d:
            return -1.0
        return need.headroom(mx[0], mx[1], mx[2])

    # -------------------------------------------------------------- explaining
    def _explain(self, need: _Need, now: float) -> str:
        """Why nothing fits: the first filter that leaves no agent, in a sentence."""
        where = f" in site {need.site}" if need.site is not None else ""
        one = need.agent
        if one is not None:
            agent = self._agents.get(one)
            if agent is None:
                return f"agent {one} has made no offer (unknown, or not heard from yet)"
            if need.site is not None and agent.site != need.site:
                return f"agent {one} is in site {agent.site}, not {need.site}"
            pool = [agent]
        elif need.site is not None:
            pool = list(self._sites.get(need.site, {}).values())
            if not pool:
                return f"no agent in site {need.site} has made an offer"
        else:
            pool = list(self._agents.values())
            if not pool:
                return "no agent has made an offer yet"

        left = [a for a in pool if a.agent_id not in need.exclude]
        if not left:
            if one is not None:
                return f"agent {one} declined this task"
            return f"every agent{where} declined this task ({_some(a.agent_id for a in pool)})"
        pool = left

        online = [a for a in pool if a.status == ONLINE]
        if not online:
            if one is not None:
                return f"agent {one} is {pool[0].status}, not online"
            by_status: dict[str, int] = {}
            for a in pool:
                by_status[a.status] = by_status.get(a.status, 0) + 1
            counts = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
            return f"no online agent{where} ({counts})"
        fresh = [a for a in online if a.expires_at > now]
        if not fresh:
            if one is not None:
                return f"agent {one}'s offer expired {now - online[0].expires_at:.0f}s ago"
            newest = max(a.expires_at for a in online)
            return (f"every online agent{where} has an expired offer "
                    f"(the newest expired {now - newest:.0f}s ago)")
        stale = len(pool) - len(fresh)
        pool = fresh

        passed: list[str] = []
        for key, op, values in need.sels:
            matching = [a for a in pool if _matches(a.labels, key, op, values)]
            if not matching:
                return _label_reason(one, pool, where, key, op, values, passed)
            pool = matching
            passed.append(_describe(key, op, values))

        if need.driver is not None:
            able = [a for a in pool if need.driver in a.drivers]
            if not able:
                if one is not None:
                    return (f"agent {one} does not offer the {need.driver} driver (it runs "
                            f"{', '.join(sorted(pool[0].drivers))})")
                which = " matching the labels" if need.sels else ""
                return (f"no online agent{where}{which} offers the {need.driver} driver "
                        f"({len(pool)} run only {', '.join(sorted(_drivers(pool)))})")
            pool = able

        if need.unique == "agent":
            left = [a for a in pool if a.agent_id not in need.existing_agents]
            if not left:
                if one is not None:
                    return (f"agent {one} already runs an instance of service {need.service} "
                            "(unique per agent)")
                which = " matching the labels" if need.sels else ""
                return (f"every online agent{where}{which} already runs an instance of service "
                        f"{need.service} (unique per agent)")
            pool = left
        elif need.unique == "site":
            left = [a for a in pool if a.site not in need.ex_sites]
            if not left:
                if one is not None or need.site is not None:
                    return (f"site {pool[0].site} already runs an instance of service "
                            f"{need.service} (unique per site)")
                sites = _some(sorted({a.site for a in pool}))
                return (f"every site with a matching online agent already runs an instance of "
                        f"service {need.service} (unique per site: {sites})")
            pool = left

        noun = "matching agent" if (need.sels or need.unique) else "agent"
        tail = f"; {stale} more not online or with an expired offer" if stale else ""
        for dim, amount, fmt in (("c", need.c, _cpus), ("m", need.m, _mem), ("d", need.d, _disk)):
            if amount <= 0:
                continue
            best = max(pool, key=lambda a, dim=dim: (_free(a, dim), _neg_id(a.agent_id)))
            have = _free(best, dim)
            if have >= amount:
                continue
            held = sum(getattr(r, dim) for r in best.tasks.values())
            note = f", after {fmt(held)} reserved" if held > 0 else ""
            if one is not None:
                return f"agent {one} has {fmt(have)} free{note}; the task needs {fmt(amount)}"
            return (f"no {noun}{where} has {fmt(amount)} free "
                    f"(best: {fmt(have)} on {best.agent_id}{note}{tail})")
        closest = max(pool, key=lambda a: (need.headroom(a.free_c, a.free_m, a.free_d),
                                           _neg_id(a.agent_id)))
        wanted = _all(need.c, need.m, need.d)
        if one is not None:
            return f"agent {one} does not have {wanted} free at once"
        return (f"no {noun}{where} has {wanted} free at once (closest: {closest.agent_id} with "
                f"{_all(closest.free_c, closest.free_m, closest.free_d)}{tail})")


# ---------------------------------------------------------------------- helpers
def _drivers(pool: Iterable[_Agent]) -> set[str]:
    return set().union(*(a.drivers for a in pool))


def _matches(labels: Mapping[str, str], key: str, op: str, values: tuple[str, ...]) -> bool:
    if op == "exists":
        return key in labels
    value = labels.get(key)
    if op == "not_in":
        return value is None or value not in values
    return value is not None and value in values


def _describe(key: str, op: str, values: tuple[str, ...]) -> str:
    if op == "exists":
        return f"label {key}"
    if op == "eq" and len(values) == 1:
        return f"label {key}={values[0]}"
    listed = ", ".join(values)
    return f"label {key} {'not in' if op == 'not_in' else 'in'} ({listed})"


def _label_reason(one: str | None, pool: list[_Agent], where: str, key: str, op: str,
                  values: tuple[str, ...], passed: list[str]) -> str:
    also = f" together with {' and '.join(passed)}" if passed else ""
    if op == "not_in":
        if one is not None:
            return f"agent {one} has label {key}={pool[0].labels.get(key)}, which the task excludes"
        return f"every online agent{where} has {_describe(key, 'in', values)}{also}"
    if one is not None:
        return f"agent {one} does not have {_describe(key, op, values)}{also}"
    return f"no online agent{where} has {_describe(key, op, values)}{also}"


def _free(agent: _Agent, dim: str) -> int:
    return agent.free_c if dim == "c" else agent.free_m if dim == "m" else agent.free_d


def _neg_id(agent_id: str) -> tuple[int, ...]:
    """Sort key making ``max`` prefer the smallest id on ties."""
    return tuple(-ord(ch) for ch in agent_id) + (1,)


def _some(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _cpus(micro: int) -> str:
    value = micro / _MICRO
    return f"{value:g} cpu{'' if value == 1 else 's'}"


def _mem(mb: int) -> str:
    return f"{mb} MB memory"


def _disk(mb: int) -> str:
    return f"{mb} MB disk"


def _all(c: int, m: int, d: int) -> str:
    return f"{_cpus(c)}, {_mem(m)} and {_disk(d)}"


# ------------------------------------------------------------------- benchmark
def bench_placements(n_agents: int = 1000, n_tasks: int = 5000, *, seed: int = 1) -> float:
    """Placements per second on a synthetic fleet (the benchmark script calls this).

    ``n_agents`` agents in sites of about 20, with zone/arch labels, place ``n_tasks`` tasks:
    services of 3 replicas, a mix of spread and binpack, some site and label constraints and
    some unique ones; a share of launches is confirmed or released and offers are refreshed
    as the run goes, as a live hub would. Only ``place`` and that bookkeeping are timed.
    """
    rng = random.Random(seed)
    now = 1_000_000.0
    n_sites = max(1, n_agents // 20)
    sites = [f"site{i:03d}" for i in range(n_sites)]
    agents = [Offer(f"agent{i:05d}", sites[i % n_sites],
                    {"zone": rng.choice(["store", "plant", "office"]),
                     "arch": rng.choice(["amd64", "arm64"])},
                    float(rng.choice([2, 4, 8, 16])), rng.choice([2048, 4096, 16384]), 100_000,
                    now + 3600, offer_id=f"agent{i:05d}:1")
              for i in range(n_agents)]
    placer = Placer()
    for offer in agents:
        placer.update_offer(offer)
    specs = []
    for i in range(n_tasks):
        constraints: dict[str, Any] = {}
        kind = i % 10
        if kind == 1:
            constraints["site"] = rng.choice(sites)
        elif kind == 2:
            constraints["labels"] = [{"key": "zone", "op": "eq", "values": ["store"]}]
        elif kind == 3:
            constraints["labels"] = [{"key": "arch", "op": "not_in", "values": ["arm64"]}]
        elif kind == 4:
            constraints["strategy"] = "binpack"
        elif kind == 5:
            constraints["unique"] = "agent"
        specs.append({"id": f"t{i}", "name": f"svc{i // 3}", "constraints": constraints,
                      "resources": {"cpus": rng.choice([0.1, 0.25, 0.5]),
                                    "mem_mb": rng.choice([32, 64, 256]), "disk_mb": 0}})
    instances: dict[str, list[tuple[str, str]]] = {}
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        placed = instances.setdefault(spec["name"], [])
        result = placer.place(spec, now=now, existing=placed)
        if isinstance(result, Placement):
            placed.append((result.agent_id, result.site))
            if i % 4 == 0:
                placer.release(spec["id"])
            else:
                placer.confirm(spec["id"])
        if i % 50 == 0:  # offers keep arriving; this one reflects the agent's confirmed tasks
            offer = agents[rng.randrange(n_agents)]
            free = placer.free(offer.agent_id)
            assert free is not None
            placer.update_offer(Offer(offer.agent_id, offer.site, offer.labels, free.cpus,
                                      free.mem_mb, free.disk_mb, now + 3600,
                                      offer_id=f"{offer.agent_id}:{i}"))
    elapsed = time.perf_counter() - start
    return n_tasks / elapsed
