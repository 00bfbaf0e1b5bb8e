"""Revoking an agent at the core, with real processes: a running hub and real agents over NATS.

The hub applies a revocation at once (the agent's new events are rejected and counted, it shows
``revoked``, placement skips it, its key cannot enroll again), the CLI works whether the hub
runs or not, and a hub that rebuilds its view from JetStream keeps the agent revoked.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation import subjects, wire
from federation.natsd import NatsServer
from tests.helpers import ROOT, AgentProcess, HubProcess, http, joined, wait_until


def hub_cli(hub: HubProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "core_hub", *args, "--data-dir",
                           str(hub.data_dir)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def outpost(hub: HubProcess, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation.cli", "--url", hub.url, "--token",
                           token, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def agent_at_hub(hub: HubProcess, agent_id: str) -> dict[str, Any]:
    return next(a for a in hub.api("GET", "/v1/agents").body["items"] if a["id"] == agent_id)


def rejected_revoked(hub: HubProcess) -> float:
    text = hub.api("GET", "/metrics").raw.decode()
    found = re.search(r'^outpost_ingest_rejected_total\{reason="revoked"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def enroll_again(nats_url: str, key_file: Path, token: str) -> dict[str, Any]:
    """The agent's own key asks to enroll with a fresh token (straight over NATS)."""
    import nats

    async def ask() -> dict[str, Any]:
        nc = await nats.connect(nats_url, inbox_prefix="_INBOX_ENROLL")  # as an edge asks
        try:
            signer = wire.Signer(key_file.read_bytes())
            reply = await nc.request(subjects.ENROLL, wire.enroll_request(
                signer, token, name="again", site="default"), timeout=5)
            answer: dict[str, Any] = wire.unpack(reply.data)
            return answer
        finally:
            await nc.close()

    return asyncio.run(ask())


def test_revoke_a_running_agent(start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
                                nats_proc: NatsServer) -> None:
    hub = hub_proc
    edge = joined(start_agent, hub, nats_proc, "--cpus", "2", "--mem-mb", "512", name="bad")
    agent_id = edge.api("GET", "/v1/info").body["agent_id"]
    before = edge.submit("before", ["sleep", "60"], kill_timeout=1)
    wait_until(lambda: hub.api("GET", f"/v1/tasks/{before['id']}").status == 200,
               timeout=20, what="the task at the hub")

    # Only an admin may revoke.
    for role in ("viewer", "operator"):
        token = hub_cli(hub, "apitoken", "create", "--role", role).stdout.strip()
        refused = http("POST", f"{hub.url}/v1/agents/{agent_id}/revoke", token=token)
        assert refused.status == 403 and refused.body["error"]["code"] == "forbidden", refused
        client = outpost(hub, token, "agents", "revoke", agent_id)
        assert client.returncode == 1 and "needs 'admin'" in client.stderr, client
    assert agent_at_hub(hub, agent_id)["status"] == "online"

    # An edge does not revoke: a clear JSON 409, like other core-only routes.
    at_edge = edge.api("POST", f"/v1/agents/{agent_id}/revoke")
    assert at_edge.status == 409 and "core" in at_edge.body["error"]["message"]

    # Unknown ids: a clear message and a non-zero exit, through the running hub.
    unknown = hub_cli(hub, "agents", "revoke", "anobody")
    assert unknown.returncode == 1 and "not found" in unknown.stderr, unknown
    assert "agents ls" in unknown.stderr

    done = hub_cli(hub, "agents", "revoke", agent_id)
    assert done.returncode == 0, done.stderr
    assert f"revoked {agent_id}" in done.stdout and "running hub" in done.stdout
    shown = agent_at_hub(hub, agent_id)
    assert shown["status"] == "revoked" and shown["revoked"] is True and shown["revoked_at"]
    listing = hub_cli(hub, "agents", "ls")
    assert listing.returncode == 0
    assert re.search(rf"^{agent_id} .* revoked ", listing.stdout, re.M), listing.stdout

    # Its new events are not applied, and are counted; heartbeats do not bring it back.
    after = edge.submit("after", ["true"])
    edge.wait_state(after["id"], "finished", timeout=15)
    wait_until(lambda: rejected_revoked(hub) >= 1, timeout=20, what="revoked events counted")
    assert hub.api("GET", f"/v1/tasks/{after['id']}").status == 404
    shown = hub.api("GET", f"/v1/tasks/{before['id']}").body
    assert shown["state"] == "unknown" and shown["reason"] == "agent revoked; last reported running"
    assert agent_at_hub(hub, agent_id)["status"] == "revoked"
    metrics = hub.api("GET", "/metrics").raw.decode()
    assert 'outpost_agents{status="revoked"} 1.0' in metrics, metrics
    assert 'outpost_agents{status="online"} 0.0' in metrics, metrics
    # The enrollment was answered and timed at the hub (bench.fleet reads these per share).
    enrolled = re.search(r'^outpost_enrollments_total\{result="ok"\} (\S+)$', metrics, re.M)
    assert enrolled and float(enrolled.group(1)) >= 1, metrics
    for name in ("outpost_enrollment_seconds_total", "outpost_enrollment_cpu_seconds_total"):
        spent = re.search(rf"^{name} (\S+)$", metrics, re.M)
        assert spent and float(spent.group(1)) > 0, metrics
    # The hub watches its own event loop (federation/loopwatch.py).
    for name in ("outpost_event_loop_stalls_total", "outpost_event_loop_stall_seconds_max"):
        assert re.search(rf"^{name} \S+$", metrics, re.M), metrics

    # No placements, no drain; revoking again is harmless.
    placed = hub.api("POST", "/v1/tasks", {"name": "nowhere", "command": ["true"]})
    assert placed.status == 201 and placed.body["state"] == "pending", placed.body
    assert hub.api("GET", "/v1/offers").body["items"] == []
    drain = hub.api("POST", f"/v1/agents/{agent_id}/drain")
    assert drain.status == 409 and "revoked" in drain.body["error"]["message"]
    assert hub.api("POST", f"/v1/agents/{agent_id}/revoke").status == 200

    # Its key cannot enroll again, even with a fresh token.
    answer = enroll_again(nats_proc.url, edge.data_dir / "agent.key", hub.join_token())
    assert answer["ok"] is False and answer["code"] == "forbidden", answer
    assert "revoked" in answer["error"]


def test_revocation_outlives_the_hub(start_agent: Callable[..., AgentProcess],
                                     hub_proc: HubProcess, nats_proc: NatsServer) -> None:
    """Revoked while the hub runs, and while it is down (the CLI writes the view); then the
    hub's view is deleted and rebuilt from JetStream and the registry bucket: both stay
    revoked, the third agent stays trusted."""
    hub = hub_proc
    ids = {}
    for name in ("one", "two", "good"):
        edge = joined(start_agent, hub, nats_proc, name=name)
        ids[name] = edge.api("GET", "/v1/info").body["agent_id"]
    client = outpost(hub, hub.token, "agents", "revoke", ids["one"])
    assert client.returncode == 0 and f"{ids['one']}  revoked" in client.stdout, client
    hub.stop()
    offline = hub_cli(hub, "agents", "revoke", ids["two"])
    assert offline.returncode == 0, offline.stderr
    assert "no hub is running" in offline.stdout
    unknown = hub_cli(hub, "agents", "revoke", "anobody")
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    hub.start()  # copies the offline revocation to the registry bucket
    assert agent_at_hub(hub, ids["two"])["status"] == "revoked"
    hub.stop()
    for path in hub.data_dir.glob("hub.db*"):
        path.unlink()
    hub.start()
    statuses = {a["id"]: a["status"] for a in hub.api("GET", "/v1/agents").body["items"]}
    assert statuses[ids["one"]] == statuses[ids["two"]] == "revoked"
    wait_until(lambda: agent_at_hub(hub, ids["good"])["status"] == "online", timeout=20,
               what="the trusted agent back online in the rebuilt view")


def test_revoke_cli_against_a_hub_serving_https(tmp_path: Path, nats_proc: NatsServer) -> None:
    """The CLI reaches a hub whose API is HTTPS with a private CA's certificate (``--ca``),
    and says what to do when it does not trust it."""
    from tests.certs import make_ca

    ca = make_ca(tmp_path / "ca")
    hub = HubProcess(tmp_path / "tlshub", nats_proc.url,
                     ["--tls-cert", str(ca.cert), "--tls-key", str(ca.key)]).start()
    try:
        assert hub.url.startswith("https://")
        untrusted = hub_cli(hub, "agents", "revoke", "anobody")
        assert untrusted.returncode == 1 and "--ca" in untrusted.stderr, untrusted
        trusted = hub_cli(hub, "agents", "revoke", "anobody", "--ca", str(ca.ca))
        assert trusted.returncode == 1 and "not found" in trusted.stderr, trusted
    finally:
        hub.stop()


def test_a_launch_the_revoked_agent_never_answered_is_placed_again(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """A launch sent to an agent that is then revoked (here: frozen before it could answer) is
    not left waiting for an answer that will never count: it goes to another agent."""
    hub = hub_proc
    frozen = joined(start_agent, hub, nats_proc, name="frozen")
    frozen_id = frozen.api("GET", "/v1/info").body["agent_id"]
    wait_until(lambda: hub.api("GET", "/v1/offers").body["items"], what="an offer")
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        task = hub.api("POST", "/v1/tasks", {"name": "moved", "command": ["sleep", "60"],
                                              "kill_timeout": 1}).body
        assert task["agent_id"] == frozen_id, task
        spare = joined(start_agent, hub, nats_proc, name="spare")
        spare_id = spare.api("GET", "/v1/info").body["agent_id"]
        assert hub.api("GET", f"/v1/tasks/{task['id']}").body["agent_id"] == frozen_id
        assert hub.api("POST", f"/v1/agents/{frozen_id}/revoke").status == 200
        moved = wait_until(lambda: (t := hub.api("GET", f"/v1/tasks/{task['id']}").body)
                           ["agent_id"] == spare_id and t["state"] == "running" and t,
                           timeout=30, what="the task placed again and running on the spare")
        assert spare.task(moved["id"])["state"] == "running"
    finally:
        frozen.kill()  # SIGKILL ends a stopped process too


def test_a_rebuilt_view_keeps_what_a_revoked_agent_reported_before_and_nothing_after(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """A view rebuilt from the stream (a deleted view; a standby taking over) must show what
    the view that revoked the agent showed: its reports up to the revocation, none after."""
    hub = hub_proc
    edge = joined(start_agent, hub, nats_proc, name="gone")
    agent_id = edge.api("GET", "/v1/info").body["agent_id"]
    before = edge.submit("before", ["sleep", "60"], kill_timeout=1)
    wait_until(lambda: hub.api("GET", f"/v1/tasks/{before['id']}").body.get("state")
               == "running", timeout=20, what="the task running at the hub")
    assert hub.api("POST", f"/v1/agents/{agent_id}/revoke").status == 200
    after = edge.submit("after", ["true"])  # this NATS has no auth: the edge still publishes
    edge.wait_state(after["id"], "finished", timeout=15)
    wait_until(lambda: rejected_revoked(hub) >= 1, timeout=20, what="revoked events counted")
    hub.stop()
    for path in hub.data_dir.glob("hub.db*"):
        path.unlink()
    hub.start()
    wait_until(lambda: hub.api("GET", f"/v1/tasks/{before['id']}").status == 200, timeout=20,
               what="the revoked agent's earlier task in the rebuilt view")
    shown = hub.api("GET", f"/v1/tasks/{before['id']}").body
    assert shown["state"] == "unknown", shown
    assert shown["reason"] == "agent revoked; last reported running", shown
    wait_until(lambda: rejected_revoked(hub) >= 1, timeout=20,
               what="the rebuilt view refusing the reports sent after the revocation")
    assert hub.api("GET", f"/v1/tasks/{after['id']}").status == 404
    assert agent_at_hub(hub, agent_id)["status"] == "revoked"
