"""Past one box: two hub replicas and two edges on a real 3-node nats-server cluster with R3
streams and buckets. A NATS node dies, then the leading hub does; nothing is lost or doubled
and the edges keep syncing through the nodes that are left."""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, free_ports, joined, wait_until

HUB_ARGS = ["--disconnected-after", "2.5", "--unreachable-after", "4", "--log-level", "debug"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three nats-servers routed into one JetStream cluster (each its own store)."""
    routes = free_ports(3)
    nodes = []
    for i, port in enumerate(routes):
        others = ", ".join(f'"nats://127.0.0.1:{p}"' for p in routes if p != port)
        nodes.append(NatsServer(tmp_path / f"nats-{i}", config_extra=(
            f'server_name: "n{i}"\n'
            f'cluster {{ name: "outpost", listen: "127.0.0.1:{port}", routes: [{others}] }}')))

    async def start_all() -> None:
        await asyncio.gather(*(node.start() for node in nodes))  # a meta leader needs 2 of 3

    asyncio.run(start_all())
    try:
        yield nodes
    finally:
        for node in nodes:
            if node.running:
                node.kill()


def _stream_replicas(url: str, stream: str) -> tuple[int, int]:
    """(configured replicas, current peers) of ``stream`` as the cluster reports it."""
    async def info() -> tuple[int, int]:
        nc = await nats.connect(url)
        try:
            si = await nc.jetstream().stream_info(stream)
            peers = 1 + len([r for r in (si.cluster.replicas or []) if r.current])
            return si.config.num_replicas or 1, peers
        finally:
            await nc.close()
    return asyncio.run(info())


def _edge_tasks(agents: list[AgentProcess], name: str, *states: str) -> list[str]:
    ids: list[str] = []
    for agent in agents:
        items = agent.api("GET", f"/v1/tasks?name={name}&limit=100").body["items"]
        ids += [t["id"] for t in items if t["state"] in states]
    return ids


def test_hubs_and_edges_ride_out_a_nats_node_and_the_leader_dying(
        tmp_path: Path, cluster: list[NatsServer],
        start_agent: Callable[..., AgentProcess]) -> None:
    conf = tmp_path / "hub.toml"
    conf.write_text("[hub]\nstream_replicas = 3\n")
    a = HubProcess(tmp_path / "hub-a", cluster[0].url, ["--config", str(conf), *HUB_ARGS])
    a.start(timeout=40)
    (tmp_path / "hub-b").mkdir()
    shutil.copy2(a.data_dir / "hub.key", tmp_path / "hub-b" / "hub.key")
    b = HubProcess(tmp_path / "hub-b", cluster[1].url, ["--config", str(conf), *HUB_ARGS])
    b.start(wait=False)
    try:
        wait_until(lambda: "standby: the placement lease is held by" in b.log(), 30,
                   what="hub-b waiting as a standby")
        for stream in ("OUTPOST_EVENTS", "OUTPOST_COMMANDS", "KV_OUTPOST_AGENTS",
                       "KV_OUTPOST_LEASE"):
            wait_until(lambda s=stream: _stream_replicas(cluster[2].url, s) == (3, 3), 20,
                       what=f"{stream} on three nodes")
        # alpha's NATS node is the one that will die: its agent must go on through the
        # servers the cluster told it of.
        edges = [joined(start_agent, a, cluster[node], "--site", site, name=site)
                 for node, site in ((0, "alpha"), (2, "beta"))]
        wait_until(lambda: len(a.api("GET", "/v1/offers").body["items"]) == 2, 20,
                   what="offers from both edges")
        resp = a.api("POST", "/v1/services", {
            "name": "web", "instances": 2, "constraints": {"unique": "site"},
            "task": {"command": ["sleep", "300"], "kill_timeout": 1,
                     "resources": {"cpus": 0.1, "mem_mb": 16}}})
        assert resp.status == 201, resp.body
        wait_until(lambda: len(_edge_tasks(edges, "web", "running")) == 2, 30,
                   what="two instances at the edges")
        web = sorted(_edge_tasks(edges, "web", "running"))

        # The node hub-a and alpha are connected to dies: both go on through another node (or,
        # if hub-a's lease ran out meanwhile, hub-b leads); either way the fleet keeps working.
        cluster[0].kill()
        jobs = []
        for i in range(4):
            leader = a if a.proc is not None and a.proc.poll() is None else b
            got = wait_until(lambda n=i, h=leader: (r := h.api("POST", "/v1/tasks", {
                "name": f"job{n}", "command": ["true"],
                "constraints": {"site": ("alpha", "beta")[n % 2]},
                "resources": {"cpus": 0.1, "mem_mb": 16}})).status == 201 and r, 30,
                what=f"job{i} accepted with a NATS node down")
            jobs.append(got.body["id"])
        wait_until(lambda: len(_edge_tasks(edges, "job0", "finished")
                               + _edge_tasks(edges, "job1", "finished")
                               + _edge_tasks(edges, "job2", "finished")
                               + _edge_tasks(edges, "job3", "finished")) == 4, 40,
                   what="four jobs run at the edges with a NATS node down")

        # Then the leading hub dies; the standby takes the lease over and rebuilds its view
        # from the R3 streams of the two nodes left.
        if a.proc is not None and a.proc.poll() is None:
            a.stop(signal.SIGKILL)
        b.leading(timeout=40)

        def b_sees_all() -> bool:
            tasks = b.api("GET", "/v1/tasks?limit=100").body["items"]
            states = {t["id"]: t["state"] for t in tasks}
            return (all(states.get(j) == "finished" for j in jobs)
                    and all(states.get(w) == "running" for w in web))
        wait_until(b_sees_all, 40, what="the new leader's view: four jobs done, web running")
        # Nothing doubled: each job ran once, the service still has its two instances.
        for i in range(4):
            assert len(_edge_tasks(edges, f"job{i}", "finished")) == 1
        assert sorted(_edge_tasks(edges, "web", "running")) == web
        # The edges keep syncing with the new leader.
        late = b.api("POST", "/v1/tasks", {"name": "late", "command": ["true"],
                                          "resources": {"cpus": 0.1, "mem_mb": 16}})
        assert late.status == 201, late.body
        wait_until(lambda: b.api("GET", f"/v1/tasks/{late.body['id']}").body["state"]
                   == "finished", 30, what="a task placed by the new leader reported back")
        assert len(b.api("GET", "/v1/tasks?name=web&state=running").body["items"]) == 2
    finally:
        a.stop()
        b.stop()
