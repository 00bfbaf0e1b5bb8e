"""Hub replicas: the placement lease (core_hub/lease.py) against a real nats-server.

Exactly one holder at a time; a holder that was frozen (SIGSTOP: the classic stale leader) and
wakes up has every claim refused by JetStream, never a second leader's decision next to ours.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js.api import KeyValueConfig

from core_hub.lease import Lease, LeaseLost, LeaseRecord
from federation import subjects
from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, joined, wait_until
from tests.nats_fixtures import connect

TTL = 1.5

HOLDER = """
import asyncio, sys, nats
from core_hub.lease import Lease, LeaseLost

async def main():
    nc = await nats.connect(sys.argv[1])
    lease = Lease(nc.jetstream(), "stale", ttl_s=float(sys.argv[2]))
    await lease.start()
    print("held" if lease.held else "not-held", flush=True)
    while True:
        try:
            print("claimed", await lease.claim(), flush=True)
        except LeaseLost as exc:
            print("refused", exc, flush=True)
        await asyncio.sleep(0.1)

asyncio.run(main())
"""


async def until(cond: Callable[[], bool], seconds: float) -> bool:
    """Poll ``cond`` (a state in another process or in JetStream) until true or timeout."""
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:  # noqa: ASYNC110 - nothing to await on
        await asyncio.sleep(0.05)
    return cond()


async def _bucket(js: object) -> None:
    await js.create_key_value(KeyValueConfig(bucket=subjects.LEASE_BUCKET,  # type: ignore[attr-defined]
                                             history=1))


async def test_one_holder_at_a_time_and_a_clean_stop_hands_over(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await _bucket(js)
        a, b = Lease(js, "a", ttl_s=TTL), Lease(js, "b", ttl_s=TTL)
        await a.start()
        await b.start()
        try:
            assert a.held and not b.held
            assert await b.try_acquire() is False
            with pytest.raises(LeaseLost):
                await b.claim()
            first = await a.claim()
            assert await a.claim() > first  # every claim is a new fencing token
            await a.stop()  # releases
            assert await until(lambda: b.held, TTL), "a released lease was not taken over"
            holder = await b.holder_now()
            assert holder is not None and holder.holder == "b"
            assert b.previous == "a"
            with pytest.raises(LeaseLost):
                await a.claim()
        finally:
            await a.stop()
            await b.stop()


async def test_a_corrupt_lease_record_is_not_trusted() -> None:
    assert LeaseRecord.decode(b"{") is None
    assert LeaseRecord.decode(b'{"holder": "x", "epoch": true, "expires": 1}') is None
    assert LeaseRecord.decode(b'{"holder": "", "epoch": 3, "expires": 1}') is None
    assert LeaseRecord.decode(b'{"holder": "x", "epoch": 3, "expires": "soon"}') is None
    assert LeaseRecord.decode(b'{"holder": "x", "epoch": 3, "expires": 2.5}') == LeaseRecord(
        "x", 3, 2.5)


async def test_a_frozen_holder_loses_the_lease_and_its_claims_are_refused(
        nats_server: NatsServer, tmp_path: Path) -> None:
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await _bucket(js)
        out = tmp_path / "holder.out"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        with out.open("w") as sink:
            child = subprocess.Popen(  # noqa: ASYNC220 - a child we SIGSTOP by hand
                [sys.executable, "-c", HOLDER, nats_server.url, str(TTL)],
                stdout=sink, stderr=subprocess.STDOUT, env=env)
        ours = Lease(js, "ours", ttl_s=TTL)
        try:
            assert await until(lambda: "claimed" in out.read_text(), 20), out.read_text()
            await ours.start()
            assert not ours.held, "two holders at once"

            child.send_signal(signal.SIGSTOP)  # the stale leader: frozen, still believing
            assert await until(lambda: ours.held, 4 * TTL), "a frozen holder's lease stayed"
            taken_at = len(out.read_text().splitlines())

            child.send_signal(signal.SIGCONT)

            def answers() -> list[str]:
                return [line for line in out.read_text().splitlines()[taken_at:]
                        if line.startswith(("claimed", "refused"))]
            assert await until(lambda: len(answers()) >= 5, 10), out.read_text()
            assert all(line.startswith("refused") for line in answers()), answers()
            await ours.claim()  # ours still stands
            assert ours.previous == "stale"
        finally:
            child.kill()
            child.wait()
            await ours.stop()


async def test_a_restarted_replica_takes_its_own_lease_back_at_once(
        nats_server: NatsServer) -> None:
    """Its data dir lock proves the crashed process is gone: no wait for the TTL."""
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await _bucket(js)
        crashed = Lease(js, "hub-1", ttl_s=60.0)
        await crashed.open()
        assert await crashed.try_acquire()
        # (crashed: no release, no renew). Another replica must wait for the 60 s TTL ...
        other = Lease(js, "hub-2", ttl_s=60.0)
        await other.open()
        assert await other.try_acquire() is False
        # ... but the same replica, restarted, takes it back now and knows nobody led between.
        again = Lease(js, "hub-1", ttl_s=60.0)
        await again.open()
        assert await again.try_acquire()
        assert again.previous == "hub-1"
        with pytest.raises(LeaseLost):
            await crashed.claim()  # the crashed process's token is stale


# ---------------------------------------------------------------- two hub processes


def _replica(tmp_path: Path, name: str, nats: NatsServer, leader: HubProcess | None = None,
             ) -> HubProcess:
    """A hub process on the shared NATS; a second replica gets the first one's hub key (the
    one identity agents trust) and admin token (the leader checks a forwarded write's)."""
    data = tmp_path / name
    data.mkdir()
    if leader is not None:
        for secret in ("hub.key", "admin.token"):
            shutil.copy2(leader.data_dir / secret, data / secret)
    return HubProcess(data, nats.url, ["--disconnected-after", "2.5", "--unreachable-after",
                                       "4"])


def _edge_instances(agents: list[AgentProcess], name: str) -> list[str]:
    """Task ids of ``name``'s live instances as the edges themselves report them (the truth
    about what runs, whatever any hub believes)."""
    ids: list[str] = []
    for agent in agents:
        items = agent.api("GET", f"/v1/tasks?name={name}").body["items"]
        ids += [t["id"] for t in items if t["state"] in ("starting", "running")]
    return ids


def _standby(hub: HubProcess) -> bool:
    return "standby: the placement lease is held by" in hub.log()


def test_the_standby_takes_over_when_the_leader_is_killed_mid_placement(
        tmp_path: Path, nats_proc: NatsServer,
        start_agent: Callable[..., AgentProcess]) -> None:
    a = _replica(tmp_path, "hub-a", nats_proc).start()
    b = _replica(tmp_path, "hub-b", nats_proc, leader=a).start(wait=False)
    try:
        wait_until(lambda: _standby(b), 20, what="hub-b waiting as a standby")
        edges = [joined(start_agent, a, nats_proc, "--site", site, name=site)
                 for site in ("alpha", "beta")]
        wait_until(lambda: len(a.api("GET", "/v1/offers").body["items"]) == 2,
                   what="offers from both")
        resp = a.api("POST", "/v1/services", {
            "name": "web", "instances": 4,
            "task": {"command": ["sleep", "300"], "kill_timeout": 1,
                     "resources": {"cpus": 0.1, "mem_mb": 16}}})
        assert resp.status == 201, resp.body
        time.sleep(0.4)  # the service reaches KV (0.2 s flushes); placement is under way
        a.stop(signal.SIGKILL)

        b.leading(timeout=30)  # took the lease over (the leader's lease ran out)
        assert "took the lease over from" in b.log(), b.log()[-2000:]
        wait_until(lambda: len(_edge_instances(edges, "web")) >= 4, 40,
                   what="the new leader keeps 4 instances of web")
        time.sleep(3)  # a double placement, if any, would show now
        ids = _edge_instances(edges, "web")
        assert len(ids) == 4 and len(set(ids)) == 4, ids
        running = b.api("GET", "/v1/tasks?name=web&state=running").body["items"]
        wait_until(lambda: len(b.api("GET", "/v1/tasks?name=web&state=running")
                               .body["items"]) == 4, 20, what="the new leader's view")
        assert len(running) <= 4
    finally:
        a.stop()
        b.stop()


def test_a_frozen_leader_steps_down_and_sends_nothing_after_the_takeover(
        tmp_path: Path, nats_proc: NatsServer,
        start_agent: Callable[..., AgentProcess]) -> None:
    a = _replica(tmp_path, "hub-a", nats_proc).start()
    b = _replica(tmp_path, "hub-b", nats_proc, leader=a).start(wait=False)
    try:
        wait_until(lambda: _standby(b), 20, what="hub-b waiting as a standby")
        edge = joined(start_agent, a, nats_proc, name="edge")
        resp = a.api("POST", "/v1/services", {
            "name": "web", "instances": 2,
            "task": {"command": ["sleep", "300"], "kill_timeout": 1,
                     "resources": {"cpus": 0.1, "mem_mb": 16}}})
        assert resp.status == 201, resp.body
        wait_until(lambda: len(_edge_instances([edge], "web")) == 2, 20, what="2 instances")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGSTOP)  # the stale leader
        b.leading(timeout=30)
        wait_until(lambda: b.api("GET", "/v1/services/web").status == 200, 10,
                   what="the service in the new leader's view")
        # Scale down at the new leader, then wake the old one: it must not act on its term.
        body = b.api("GET", "/v1/services/web").body
        assert body["instances"] == 2
        a.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: a.proc is not None and a.proc.poll() is not None, 20,
                   what="the woken leader to step down")
        assert a.proc.returncode == 3, a.log()[-2000:]
        assert "lost the placement lease" in a.log()
        time.sleep(2)
        ids = _edge_instances([edge], "web")
        assert len(ids) == 2, ids
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.send_signal(signal.SIGCONT)
        a.stop()
        b.stop()


def _soon(read: Callable[[], bool], what: str, within: float = 2.0) -> float:
    """Seconds until ``read()`` holds at a replica after a write made through another; fails
    past ``within`` (the goal is 1 s; the margin is for a loaded 2-core CI box)."""
    started = time.monotonic()
    wait_until(read, within, what=what)
    return time.monotonic() - started


def test_a_standby_serves_the_whole_api_from_a_live_view_and_forwards_writes(
        tmp_path: Path, nats_proc: NatsServer,
        start_agent: Callable[..., AgentProcess]) -> None:
    a = _replica(tmp_path, "hub-a", nats_proc).start()
    b = _replica(tmp_path, "hub-b", nats_proc, leader=a).start(wait=False).serving()
    try:
        assert b.api("GET", "/v1/health").body["replica"] == "standby"
        assert a.api("GET", "/v1/health").body["replica"] == "leader"
        # An enrollment at the leader shows at the standby, live (it was a standby before).
        edge = joined(start_agent, a, nats_proc, name="edge")
        agent_id = edge.api("GET", "/v1/info").body["agent_id"]
        lags = [_soon(lambda: any(x["id"] == agent_id and x["status"] == "online"
                                  for x in b.api("GET", "/v1/agents").body["items"]),
                      "the enrolled agent online at the standby", within=10)]

        # A write through the standby goes to the leader, and the standby answers for it.
        resp = b.api("POST", "/v1/tasks", {"name": "via-b", "command": ["sleep", "60"],
                                           "kill_timeout": 1,
                                           "resources": {"cpus": 0.1, "mem_mb": 16}})
        assert resp.status == 201, resp.body
        task_id = resp.body["id"]
        assert a.api("GET", f"/v1/tasks/{task_id}").status == 200  # the leader took it
        lags.append(_soon(lambda: b.api("GET", f"/v1/tasks/{task_id}").status == 200,
                          "the forwarded write readable at the standby"))
        wait_until(lambda: b.api("GET", f"/v1/tasks/{task_id}").body["state"] == "running",
                   20, what="the edge's report of it at the standby (events, live)")
        # A write through the leader is readable at the standby within the goal.
        svc = a.api("POST", "/v1/services", {
            "name": "web", "instances": 1,
            "task": {"command": ["sleep", "60"], "kill_timeout": 1,
                     "resources": {"cpus": 0.1, "mem_mb": 16}}})
        assert svc.status == 201, svc.body
        lags.append(_soon(lambda: b.api("GET", "/v1/services/web").status == 200,
                          "the service at the standby"))
        # An artifact upload streams through the standby to the leader.
        blob = os.urandom(300_000)
        up = b.api("POST", "/v1/artifacts?name=blob&version=1", raw=blob,
                   headers={"Content-Type": "application/octet-stream"})
        assert up.status == 201, up.body
        got = b.api("GET", f"/v1/artifacts/{up.body['digest']}/content")
        assert got.status == 200 and got.raw == blob

        # The offline CLI refuses a running standby's data dir (its view is not the leader's).
        cli = subprocess.run([sys.executable, "-m", "core_hub", "token", "create", "--data-dir",
                              str(b.data_dir)], capture_output=True, text=True)
        assert cli.returncode != 0 and "standby" in cli.stderr, cli

        # The standby checks credentials itself: a bad token never reaches the leader.
        bad = b.api("POST", "/v1/tasks", {"name": "x", "command": ["true"]}, token="nope")
        assert bad.status == 401, bad.body
        # A revocation at the leader reaches the standby's view live.
        assert a.api("POST", f"/v1/agents/{agent_id}/revoke").status == 200
        lags.append(_soon(lambda: b.api("GET", f"/v1/agents/{agent_id}").body["revoked"],
                          "the revocation at the standby"))
        print("write-to-read lag at the standby (s):", [round(x, 3) for x in lags])

        # The leader dies: writes through the standby get a clear 503 until it leads, then
        # it takes them itself on the same URL.
        url = b.url
        a.stop(signal.SIGKILL)
        refused = b.api("POST", "/v1/tasks", {"name": "y", "command": ["true"],
                                              "resources": {"cpus": 0.1, "mem_mb": 16}})
        assert refused.status == 503 and "error" in refused.body, refused.body
        assert refused.headers.get("Retry-After") == "1"
        b.leading(timeout=30)
        assert b.url == url
        late = b.api("POST", "/v1/tasks", {"name": "late", "command": ["true"],
                                           "resources": {"cpus": 0.1, "mem_mb": 16}})
        assert late.status == 201, late.body
        assert b.api("GET", f"/v1/tasks/{task_id}").status == 200
    finally:
        a.stop()
        b.stop()
