"""Liveness thresholds and the cap on how many agents a pass may declare unreachable; then,
against a real hub, NATS and agents: a fresh agent's grace, no flap after a heal, a pass that
fails does not end liveness."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import nats
from nacl.signing import SigningKey

from core_hub.liveness import Liveness, LivenessSettings
from core_hub.store import HubStore
from federation import subjects, wire
from federation.identity import id_from_public_key
from federation.natscreds import ENROLL_CREDENTIALS
from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, wait_until
from tests.tcp_proxy import TcpProxy


def fleet(tmp_path: Path, n: int) -> HubStore:
    store = HubStore(tmp_path / "hub.db")
    for i in range(n):
        store.enroll_agent(f"a{i:03d}", bytes([i % 256]) * 32, name=f"n{i}", site="s",
                           labels={}, resources={}, version="", now=time.time())
    return store


def statuses(store: HubStore) -> list[str]:
    return [a["status"] for a in store.list_agents()]


def test_thresholds(tmp_path: Path) -> None:
    store = fleet(tmp_path, 1)
    live = Liveness(None, store, LivenessSettings(5.0, 10.0, 20))
    now = 1000.0
    live.beats["a000"] = {"agent": "a000", "received": now}
    live.sweep(now + 1)
    assert statuses(store) == ["online"]
    live.sweep(now + 6)
    assert statuses(store) == ["disconnected"]
    live.sweep(now + 11)
    assert statuses(store) == ["unreachable"]
    live.beats["a000"] = {"agent": "a000", "received": now + 12}
    live.sweep(now + 12)
    assert statuses(store) == ["online"]
    store.close()


def test_a_core_side_blip_does_not_condemn_the_whole_fleet_at_once(tmp_path: Path) -> None:
    store = fleet(tmp_path, 50)
    live = Liveness(None, store, LivenessSettings(5.0, 10.0, max_unreachable_per_s=20))
    now = 1000.0
    for a in store.list_agents():
        live.beats[a["id"]] = {"agent": a["id"], "received": now}
    live.sweep(now)
    assert set(statuses(store)) == {"online"}
    live.sweep(now + 30)  # every heartbeat missed at once
    assert statuses(store).count("unreachable") == 20
    assert statuses(store).count("disconnected") == 30
    live.sweep(now + 31)
    assert statuses(store).count("unreachable") == 40
    live.sweep(now + 32)
    assert statuses(store).count("unreachable") == 50
    store.close()


# ---------------------------------------------------------------- against real processes


def agent_status(hub: HubProcess, agent_id: str) -> str:
    return str(hub.api("GET", f"/v1/agents/{agent_id}").body.get("status"))


def test_a_fresh_agent_is_not_unreachable_before_its_first_heartbeat(
        tmp_path: Path, nats_proc: NatsServer) -> None:
    """Enrolled, not yet heard from (NULL last_seen): it gets the same grace as an agent that
    just went quiet. It failed before: the first pass marked it unreachable at once."""
    hub = HubProcess(tmp_path / "hub", nats_proc.url,
                     ["--disconnected-after", "1", "--unreachable-after", "3"]).start()
    try:
        seed = SigningKey.generate()
        public = bytes(seed.verify_key)
        agent_id = id_from_public_key(public)

        async def enroll_then_beat() -> None:
            nc = await nats.connect(nats_proc.url, **ENROLL_CREDENTIALS.connect_options())
            try:
                request = wire.enroll_request(wire.Signer(bytes(seed)), hub.join_token(),
                                              name="late", site="s")
                assert wire.unpack((await nc.request(subjects.ENROLL, request,
                                                     timeout=10)).data)["ok"]
                await asyncio.sleep(1.5)  # an edge takes a moment to come back as itself
                for _ in range(3):
                    await nc.publish(subjects.heartbeat(agent_id), wire.pack(
                        {"agent": agent_id, "ts": time.time(), "seq": 0, "outbox": 0,
                         "outbox_age": None}))
                    await asyncio.sleep(0.5)
            finally:
                await nc.close()

        asyncio.run(enroll_then_beat())
        wait_until(lambda: agent_status(hub, agent_id) == "online", 10, what="online")
        assert f"agent {agent_id} unreachable" not in hub.log()
    finally:
        hub.stop()


def test_no_flap_after_a_heal(tmp_path: Path, nats_proc: NatsServer,
                              start_agent: Callable[..., AgentProcess]) -> None:
    """After a cut and a heal the agent's fresh events count as a sign of life: it goes back
    online and stays there. It failed before: the pass preferred the stale in-memory heartbeat
    over ingest's fresher last_seen, so online -> unreachable -> online (issue 11)."""
    hub = HubProcess(tmp_path / "hub", nats_proc.url,
                     ["--disconnected-after", "3", "--unreachable-after", "5"]).start()
    proxy = TcpProxy("127.0.0.1", nats_proc.port).start()
    try:
        agent = start_agent("--nats", proxy.url, "--join-token", hub.join_token(),
                            "--heartbeat", "2", name="edge")
        agent_id = agent.api("GET", "/v1/info").body["agent_id"]
        wait_until(lambda: agent_status(hub, agent_id) == "online", 15, what="online")
        proxy.cut()
        wait_until(lambda: agent_status(hub, agent_id) == "unreachable", 20,
                   what="unreachable while cut")
        proxy.restore()
        seen: list[str] = []
        wait_until(lambda: seen.append(agent_status(hub, agent_id)) or seen[-1] == "online",
                   20, interval=0.05, what="online after the heal")
        # Two heartbeat periods and three liveness passes: the window the flap showed in.
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            seen.append(agent_status(hub, agent_id))
            time.sleep(0.05)
        after = seen[seen.index("online"):]
        assert set(after) == {"online"}, after
    finally:
        proxy.close()
        hub.stop()


def test_the_pass_survives_an_error_and_goes_on(tmp_path: Path, nats_proc: NatsServer,
                                                start_agent: Callable[..., AgentProcess]) -> None:
    """A pass that fails (the view locked by another process past busy_timeout) is logged with
    its traceback and counted, and liveness goes on. It failed before: the loop task died
    silently and a killed agent stayed online for good."""
    hub = HubProcess(tmp_path / "hub", nats_proc.url,
                     ["--disconnected-after", "1", "--unreachable-after", "2"]).start()
    try:
        agent = start_agent("--nats", nats_proc.url, "--join-token", hub.join_token(),
                            "--heartbeat", "0.5", name="edge")
        agent_id = agent.api("GET", "/v1/info").body["agent_id"]
        wait_until(lambda: agent_status(hub, agent_id) == "online", 15, what="online")
        locker = sqlite3.connect(hub.data_dir / "hub.db", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            wait_until(lambda: "liveness pass failed" in hub.log(), 30,
                       what="a failed pass logged")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert "Traceback" in hub.log().split("liveness pass failed", 1)[1]
        agent.kill()
        wait_until(lambda: agent_status(hub, agent_id) == "unreachable", 20,
                   what="the killed agent unreachable: liveness goes on")
        metrics = hub.api("GET", "/metrics").raw.decode()
        errors = re.search(r"^outpost_liveness_errors_total (\S+)$", metrics, re.M)
        assert errors is not None and float(errors.group(1)) >= 1, metrics
    finally:
        hub.stop()
