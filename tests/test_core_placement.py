"""Placement from the core on real agents' offers: constraints, spread, binpack, declines,
readable pending reasons, and never two agents for one task (also across a hub restart)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, joined, wait_until


@pytest.fixture
def fleet(start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
          nats_proc: NatsServer) -> dict[str, AgentProcess]:
    """Three agents: two in berlin (zone=store, zone=plant), one in oslo."""
    specs = {"b1": ("berlin", "zone=store", "2"), "b2": ("berlin", "zone=plant", "1"),
             "o1": ("oslo", "zone=store", "2")}
    agents = {name: joined(start_agent, hub_proc, nats_proc, "--site", site, "--label", label,
                           "--cpus", cpus, "--mem-mb", "512", name=name)
              for name, (site, label, cpus) in specs.items()}
    ids = {a.api("GET", "/v1/info").body["agent_id"] for a in agents.values()}
    wait_until(lambda: {o["agent_id"] for o in hub_proc.api("GET", "/v1/offers").body["items"]}
               == ids, timeout=15, what="offers from all three agents")
    return agents


def submit(hub: HubProcess, name: str, **spec: Any) -> dict[str, Any]:
    resp = hub.api("POST", "/v1/tasks", {"name": name, "command": ["sleep", "60"],
                                          "kill_timeout": 1, **spec})
    assert resp.status == 201, resp.body
    return resp.body


def running_on(hub: HubProcess, task_id: str, timeout: float = 15.0) -> dict[str, Any]:
    return wait_until(lambda: (t := hub.api("GET", f"/v1/tasks/{task_id}").body)["state"]
                      == "running" and t, timeout=timeout, what=f"{task_id} running")


def agent_of(fleet: dict[str, AgentProcess], agent_id: str) -> str:
    return next(n for n, a in fleet.items() if a.api("GET", "/v1/info").body["agent_id"]
                == agent_id)


def test_constraints_and_spread(fleet: dict[str, AgentProcess], hub_proc: HubProcess) -> None:
    oslo = submit(hub_proc, "only-oslo", constraints={"site": "oslo"})
    assert agent_of(fleet, running_on(hub_proc, oslo["id"])["agent_id"]) == "o1"
    plant = submit(hub_proc, "plant", constraints={
        "labels": [{"key": "zone", "op": "eq", "values": ["plant"]}]})
    task = running_on(hub_proc, plant["id"])
    assert agent_of(fleet, task["agent_id"]) == "b2"
    # The edge runs it and agrees: origin core, same id.
    edge = fleet["b2"].task(plant["id"])
    assert edge["origin"] == "core" and edge["state"] == "running"
    # Spread: two copies of a service land in two sites.
    sites = set()
    for _ in range(2):
        t = running_on(hub_proc, submit(hub_proc, "web", resources={"cpus": 0.1})["id"])
        sites.add(hub_proc.api("GET", f"/v1/agents/{t['agent_id']}").body["site"])
    assert sites == {"berlin", "oslo"}


def test_the_core_shows_what_each_agent_uses_now(fleet: dict[str, AgentProcess],
                                                hub_proc: HubProcess) -> None:
    """An agent's ``used`` at the core follows its offers (not only the record it sent when
    it connected): a task starting and ending there shows within an offer's round trip."""
    task = running_on(hub_proc, submit(hub_proc, "user", constraints={"site": "oslo"},
                                       resources={"cpus": 0.5, "mem_mb": 64})["id"])
    agent = f"/v1/agents/{task['agent_id']}"
    wait_until(lambda: hub_proc.api("GET", agent).body["used"] == {
        "cpus": 0.5, "mem_mb": 64, "disk_mb": 0}, timeout=10, what="oslo using 0.5 cpu")
    hub_proc.api("DELETE", f"/v1/tasks/{task['id']}")
    wait_until(lambda: hub_proc.api("GET", agent).body["used"]["cpus"] == 0, timeout=15,
               what="oslo's cpu free again")


def test_nothing_fits_stays_pending_with_a_reason(fleet: dict[str, AgentProcess],
                                                  hub_proc: HubProcess) -> None:
    big = submit(hub_proc, "big", resources={"cpus": 4})
    assert big["state"] == "pending"
    assert "cpus" in big["reason"] and "4" in big["reason"], big["reason"]
    nowhere = submit(hub_proc, "mars", constraints={"site": "mars"})
    assert nowhere["state"] == "pending" and "mars" in nowhere["reason"]


def test_binpack_fills_one_agent_first(fleet: dict[str, AgentProcess],
                                       hub_proc: HubProcess) -> None:
    # Placement only uses online agents: on a busy machine a late heartbeat can briefly make
    # one 'disconnected', so start from a fleet that is all online.
    wait_until(lambda: all(a["status"] == "online" for a in
                           hub_proc.api("GET", "/v1/agents").body["items"]), what="all online")
    # Submitted back to back: the second sees the first's reservation (not yet an edge's
    # offer) and still packs onto the same, fullest agent that fits.
    ids = [submit(hub_proc, f"pack{i}", resources={"cpus": 0.5},
                  constraints={"strategy": "binpack"})["id"] for i in range(2)]
    placed = [running_on(hub_proc, task_id) for task_id in ids]
    assert len({t["agent_id"] for t in placed}) == 1


def test_a_declined_launch_is_placed_elsewhere(fleet: dict[str, AgentProcess],
                                               hub_proc: HubProcess) -> None:
    # b2 (1 cpu, the only zone=plant... not needed here) fills up behind the hub's back:
    # a local task takes its cpu before the hub hears of it, so the hub's offer is stale.
    fleet["b2"].submit("local-hog", ["sleep", "60"], resources={"cpus": 1}, kill_timeout=1)
    task = submit(hub_proc, "needs-berlin", resources={"cpus": 1},
                  constraints={"site": "berlin", "strategy": "binpack"})
    done = running_on(hub_proc, task["id"], timeout=20)
    assert agent_of(fleet, done["agent_id"]) == "b1"
    # Only b1 ever ran it.
    for name, agent in fleet.items():
        resp = agent.api("GET", f"/v1/tasks/{task['id']}")
        assert (resp.status == 200) == (name == "b1"), name


def test_no_double_placement_across_a_hub_restart(fleet: dict[str, AgentProcess],
                                                  hub_proc: HubProcess) -> None:
    ids = [submit(hub_proc, f"many{i}", resources={"cpus": 0.05})["id"] for i in range(10)]
    hub_proc.stop(signal.SIGKILL)  # mid-placement: some launches may be unsent or unanswered
    hub_proc.start()
    for task_id in ids:
        running_on(hub_proc, task_id, timeout=30)
    time.sleep(1.0)
    for task_id in ids:
        holders = [n for n, a in fleet.items()
                   if a.api("GET", f"/v1/tasks/{task_id}").status == 200]
        assert len(holders) == 1, (task_id, holders)


def test_an_agent_with_slow_heartbeats_keeps_a_live_offer_between_them(
        tmp_path: Path, start_agent: Callable[..., AgentProcess],
        nats_proc: NatsServer) -> None:
    """An agent looks at its offer once per heartbeat: with 45 s heartbeats, an offer that
    lived a fixed 30 s left the core without one from 30 s to 45 s of every cycle, and work
    submitted then waited for the next heartbeat."""
    hub = HubProcess(tmp_path / "slowhub", nats_proc.url,
                     ["--disconnected-after", "120", "--unreachable-after", "240"]).start()
    try:
        agent = joined(start_agent, hub, nats_proc, "--heartbeat", "45")
        agent_id = agent.api("GET", "/v1/info").body["agent_id"]

        def offered() -> dict[str, Any] | None:
            return next((o for o in hub.api("GET", "/v1/offers").body["items"]
                         if o["agent_id"] == agent_id), None)

        first = wait_until(offered, timeout=15, what="the agent's first offer")
        time.sleep(max(0.0, first["created_at"] + 33 - time.time()))  # before heartbeat 2
        assert offered() is not None, "the agent's offer expired between two heartbeats"
        task = submit(hub, "between-heartbeats")
        assert running_on(hub, task["id"], timeout=8)["agent_id"] == agent_id
    finally:
        hub.stop()
