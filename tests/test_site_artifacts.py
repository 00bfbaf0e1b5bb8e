"""Once per site (edge_agent/sitepeers.py): agents behind one site leaf node get an artifact
over the uplink once, and what a site peer sends is trusted no more than the core's bytes.

Real parts throughout: a nats-server from configs/nats/hub.conf with least privilege, the
hub, site bundles, a leaf node from the bundle's template linking to the hub through a TCP
relay that counts the bytes crossing it (the uplink), and agent processes at the site."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats

from bench.relay import Uplink
from core_hub import bundle
from federation import subjects
from tests.deploy_support import secure_hub_with_leafnodes, site_leaf
from tests.helpers import AgentProcess, HubProcess, hub_nats_creds, joined, wait_until

SITE = "berlin"


def _metric(agent: AgentProcess, name: str, labels: str = "") -> float:
    for line in agent.api("GET", "/metrics").raw.decode().splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[1])
    return 0.0


def _site_agents(tmp_path: Path, hub: HubProcess, leaf_port: int, count: int,
                 start_agent: Callable[..., AgentProcess],
                 *args: str) -> tuple[Uplink, Any, list[AgentProcess]]:
    """``count`` agents of one site behind one leaf node whose uplink is a counting relay.
    Each has a bundle's key (the leaf may carry only the agents its bundles made); the last
    bundle's leaf login covers them all."""
    bundles = []
    for i in range(count):
        out = tmp_path / f"bundle{i}"
        bundles.append(bundle.write_bundle(hub.data_dir, SITE, out,
                                           hub_url=f"nats-leaf://127.0.0.1:{leaf_port}"))
    uplink = Uplink(leaf_port)
    leaf = site_leaf(tmp_path, "leaf", SITE, uplink.port, bundles[-1].path / bundle.LEAF_CREDS)
    wait_until(lambda: leaf.leafs() == 1, 15, what="the site's leaf linked to the hub")
    agents = []
    for i, made in enumerate(bundles):
        name = f"shop{i}"
        (tmp_path / name).mkdir()
        shutil.copyfile(made.path / "agent.key", tmp_path / name / "agent.key")
        agents.append(joined(start_agent, hub, SimpleNamespace(url=leaf.url), "--site", SITE,
                             "--artifact-site-peers", *args, name=name))
    return uplink, leaf, agents


class SiteSubjectsAtTheHub:
    """Counts messages on ``outpost.v1.site.>`` seen at the hub's own NATS (should be none)."""

    def __init__(self, url: str, creds: Any) -> None:
        self.seen = 0
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(url, creds)),
                                        daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _run(self, url: str, creds: Any) -> None:
        nc = await nats.connect(url, **creds.connect_options())

        async def count(_msg: Any) -> None:
            self.seen += 1

        await nc.subscribe(subjects.SITES_ALL, cb=count)
        await nc.flush()
        self._ready.set()
        await asyncio.to_thread(self._stop.wait)
        await nc.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_three_agents_behind_one_leaf_get_an_artifact_over_the_uplink_once(
        tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    """Pushed at the core, used by a task at each of three agents of one site at once: about
    one artifact's bytes cross the uplink (not three), every task runs it, and none of the
    site's peer traffic reaches the hub."""
    with secure_hub_with_leafnodes(tmp_path, "--disconnected-after", "2.5",
                                   "--unreachable-after", "4") as secure:
        hub = secure.hub
        uplink, leaf, agents = _site_agents(tmp_path, hub, secure.leaf_port, 3, start_agent)
        watcher = SiteSubjectsAtTheHub(secure.nats.url, hub_nats_creds(hub.data_dir))
        try:
            payload = os.urandom(6 << 20)  # incompressible: the link cannot shrink it
            up = hub.api("POST", "/v1/artifacts?name=bigapp&version=1", raw=payload)
            assert up.status == 201, up.body
            digest = up.body["digest"]
            before = uplink.carried
            tasks = [(a, a.submit("use-it", ["sh", "-c", "wc -c < blob"], artifacts=[
                {"digest": digest, "dest": "blob"}])) for a in agents]
            for agent, task in tasks:
                done = agent.wait_state(task["id"], "finished", "failed", timeout=60)
                assert done["state"] == "finished" and done["exit_code"] == 0, done
                log = agent.api("GET", f"/v1/tasks/{task['id']}/logs").raw
                assert log.strip() == str(len(payload)).encode(), log
            crossed = uplink.carried - before
            # One artifact's chunks, the manifests and the three agents' ordinary traffic.
            assert crossed < 1.5 * len(payload), f"{crossed / len(payload):.2f}x crossed"
            from_peers = sum(_metric(a, "outpost_artifact_peer_fetches_total",
                                     '{source="peer"}') for a in agents)
            went_up = sum(_metric(a, "outpost_artifact_peer_fetches_total",
                                  '{source="uplink"}') for a in agents)
            assert (from_peers, went_up) == (2, 1)
            served = sum(_metric(a, "outpost_artifact_peer_served_bytes_total") for a in agents)
            assert served >= 2 * len(payload)
            # The hub shows all three holding it (their offers say so).
            wait_until(lambda: len(hub.api("GET", f"/v1/artifacts/{digest}").body
                                   .get("agents", [])) == 3, 30,
                       what="the hub to see the three holders")
            assert watcher.seen == 0, "site peer traffic reached the hub's NATS"
        finally:
            watcher.close()
            uplink.close()
            leaf.kill()


def test_a_hostile_site_peer_can_neither_feed_bad_bytes_nor_redirect_answers(
        tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    """A rogue client on the site's leaf (a stolen box there) claims to hold every artifact and
    serves garbage: the agent refuses the bytes, fetches over the uplink and runs the real
    ones. It also asks with a reply subject that is not a site peer's (the hub's JetStream
    API): the agent drops it and answers nothing there."""
    with secure_hub_with_leafnodes(tmp_path, "--disconnected-after", "2.5",
                                   "--unreachable-after", "4") as secure:
        hub = secure.hub
        uplink, leaf, (agent,) = _site_agents(tmp_path, hub, secure.leaf_port, 1, start_agent)
        prefix = subjects.site_peers(SITE)
        rogue_id = "a" + "z" * 25
        stop = threading.Event()
        ready = threading.Event()
        leaked: list[str] = []

        async def rogue() -> None:
            nc = await nats.connect(leaf.url)

            async def on_who(msg: Any) -> None:
                if json.loads(msg.data)["agent"] == rogue_id:
                    return  # its own question
                sha = msg.subject.rsplit(".", 1)[-1]
                await nc.publish(msg.reply, json.dumps({
                    "agent": rogue_id, "state": "has", "have": 1 << 20,
                    "size": int(sizes.get(sha, 1 << 20))}).encode())

            async def on_get(msg: Any) -> None:
                ask = json.loads(msg.data)
                await nc.publish(msg.reply, b"\0" * ask["length"],
                                 headers={"Outpost-Have": str(ask["offset"] + ask["length"])})

            async def on_leak(msg: Any) -> None:
                if "PURGE" in msg.subject:  # ($JS.API is mapped to the hub's domain here)
                    leaked.append(msg.subject)

            await nc.subscribe(f"{prefix}.who.*", cb=on_who)
            await nc.subscribe(f"{prefix}.get.{rogue_id}", cb=on_get)
            await nc.subscribe("$JS.>", cb=on_leak)
            await nc.flush()
            ready.set()
            await asyncio.to_thread(stop.wait)
            # Ask the real agent with a reply subject outside the site's peer space.
            await nc.publish(f"{prefix}.who.{'0' * 64}", json.dumps({"agent": rogue_id})
                             .encode(), reply="$JS.API.STREAM.PURGE.OUTPOST_EVENTS")
            await nc.flush()
            await asyncio.sleep(0.5)
            await nc.close()

        payload = os.urandom(1 << 20)
        sizes: dict[str, int] = {}
        thread = threading.Thread(target=lambda: asyncio.run(rogue()), daemon=True)
        thread.start()
        try:
            assert ready.wait(10)
            up = hub.api("POST", "/v1/artifacts?name=app&version=1", raw=payload)
            assert up.status == 201, up.body
            sizes[up.body["sha256"]] = len(payload)
            task = agent.submit("real", ["sh", "-c", "wc -c < blob"],
                                artifacts=[{"digest": up.body["digest"], "dest": "blob"}])
            done = agent.wait_state(task["id"], "finished", "failed", timeout=60)
            assert done["state"] == "finished", done
            assert _metric(agent, "outpost_artifact_peer_given_up_total") >= 1
            assert _metric(agent, "outpost_artifact_peer_fetches_total",
                           '{source="uplink"}') == 1
            cached = agent.api("GET", f"/v1/artifacts/{up.body['digest']}/content").raw
            assert cached == payload  # the real bytes, not the rogue's zeros
            dropped = _metric(agent, "outpost_artifact_peer_dropped_total")
            stop.set()
            thread.join(15)
            wait_until(lambda: _metric(agent, "outpost_artifact_peer_dropped_total") > dropped,
                       10, what="the agent to drop an answer to a foreign reply subject")
            assert leaked == []
        finally:
            stop.set()
            uplink.close()
            leaf.kill()


def test_the_site_fetch_survives_the_agent_that_went_up_dying_mid_fetch(
        tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    """Three agents stage one artifact at once; the one that went up for it (its fetch slowed
    by artifact_rate_kbps) is SIGKILLed half-way. The two that followed it give up on it, one
    of them goes up, the other follows that one: both end with the verified artifact, and the
    uplink carried well under three fetches' bytes."""
    with secure_hub_with_leafnodes(tmp_path, "--disconnected-after", "2.5",
                                   "--unreachable-after", "4") as secure:
        hub = secure.hub
        uplink, leaf, agents = _site_agents(tmp_path, hub, secure.leaf_port, 3, start_agent,
                                            "--artifact-rate-kbps", "1024")
        try:
            payload = os.urandom(4 << 20)
            up = hub.api("POST", "/v1/artifacts?name=slowapp&version=1", raw=payload)
            assert up.status == 201, up.body
            digest = up.body["digest"]
            before = uplink.carried
            for agent in agents:
                assert agent.api("POST", f"/v1/artifacts/{digest}/stage", {}).status == 202

            def went_up() -> list[AgentProcess]:
                return [a for a in agents if _metric(
                    a, "outpost_artifact_peer_fetches_total", '{source="uplink"}') >= 1]

            wait_until(lambda: len(went_up()) == 1, 15, what="one agent to go up for it")
            (first,) = went_up()
            wait_until(lambda: _metric(first, "outpost_artifact_fetch_progress",
                                       f'{{digest="{digest}"}}') >= 0.3, 15,
                       what="the first fetch to be under way")
            first.kill()
            rest = [a for a in agents if a is not first]
            for agent in rest:
                wait_until(lambda agent=agent: agent.api(  # type: ignore[misc]
                    "GET", f"/v1/artifacts/{digest}").status == 200, 60,
                    what="a follower to hold the artifact after its source died")
                assert agent.api("GET", f"/v1/artifacts/{digest}/content").raw == payload
            crossed = uplink.carried - before
            assert crossed < 2.5 * len(payload), f"{crossed / len(payload):.2f}x crossed"
            assert sum(_metric(a, "outpost_artifact_peer_fetches_total", '{source="uplink"}')
                       for a in rest) == 1
        finally:
            uplink.close()
            leaf.kill()
