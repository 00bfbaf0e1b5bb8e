"""Key rotation with real processes: an agent changes its key while tasks run and keeps its id,
its tasks and its history; the hub takes its new signatures and refuses the old key's from the
rotation point on, and still applies what the old key signed before (a view rebuilt from
JetStream converges). A rotation pending while the hub is down survives an agent crash. And the
hub's rules for a rotation request, over real NATS into a real Enroller."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgpack

from core_hub.keyrotation import open_agent_envelope
from federation import subjects, wire
from federation.natsd import NatsServer
from tests.helpers import (
    ROOT,
    AgentProcess,
    HubProcess,
    converged,
    joined,
    publish_raw,
    wait_until,
)
from tests.test_enroll import EDGE, OTHER, Clock, refused, request
from tests.test_enroll import hub as enroll_hub


def rotate_key(edge: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "rotate-key", "--data-dir",
                           str(edge.data_dir), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=90)


def hub_keys(hub: HubProcess, agent_id: str) -> tuple[bytes, list[list[object]]]:
    db = sqlite3.connect(f"file:{hub.data_dir / 'hub.db'}?mode=ro", uri=True)
    try:
        public, retired = db.execute("SELECT public_key, retired_keys FROM agents WHERE id = ?",
                                     (agent_id,)).fetchone()
    finally:
        db.close()
    return bytes(public), json.loads(retired)


def rotation_point(edge: AgentProcess) -> int | None:
    """The last seq the agent's old key signs, once its sync loop has fixed it."""
    db = sqlite3.connect(f"file:{edge.data_dir / 'agent.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'key_rotation_until'").fetchone()
    finally:
        db.close()
    return int(row[0]) if row and row[0] else None


def rejected(hub: HubProcess, reason: str) -> float:
    text = hub.api("GET", "/metrics").raw.decode()
    found = re.search(rf'^outpost_ingest_rejected_total\{{reason="{reason}"\}} (\S+)$', text,
                      re.M)
    return float(found.group(1)) if found else 0.0


def test_rotate_while_tasks_run(start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
                                nats_proc: NatsServer) -> None:
    hub = hub_proc
    edge = joined(start_agent, hub, nats_proc, "--cpus", "2", "--mem-mb", "512")
    agent_id = edge.api("GET", "/v1/info").body["agent_id"]
    old_seed = (edge.data_dir / "agent.key").read_bytes()
    running = edge.submit("long", ["sleep", "120"], kill_timeout=1)
    done = edge.submit("short", ["true"])
    edge.wait_state(running["id"], "running")
    edge.wait_state(done["id"], "finished")
    converged(edge, hub)

    result = rotate_key(edge)
    assert result.returncode == 0, result.stderr
    assert "key rotated" in result.stdout and agent_id in result.stdout
    new_seed = (edge.data_dir / "agent.key").read_bytes()
    assert new_seed != old_seed and not (edge.data_dir / "agent.key.next").exists()
    assert stat.S_IMODE((edge.data_dir / "agent.key").stat().st_mode) == 0o600
    until = json.loads((edge.data_dir / "key-rotation.json").read_text())["until"]

    # Same id, same tasks and history; the hub holds the new key and retired the old one.
    assert edge.api("GET", "/v1/info").body["agent_id"] == agent_id
    public, retired = hub_keys(hub, agent_id)
    assert public == wire.Signer(new_seed).public
    assert [(bytes.fromhex(str(k)), u) for k, u, _ in retired] == [
        (wire.Signer(old_seed).public, until)]
    assert edge.task(running["id"])["state"] == "running"
    after = edge.submit("after", ["true"])
    edge.wait_state(after["id"], "finished")
    converged(edge, hub)  # new-key events applied; the running and finished tasks unchanged
    assert hub.api("GET", f"/v1/tasks/{running['id']}").body["state"] == "running"
    agents = hub.api("GET", "/v1/agents").body["items"]
    assert [a["id"] for a in agents] == [agent_id]

    # The old key signs nothing after the rotation point.
    forged = {"id": "forged", "name": "forged", "state": "running", "generation": 1,
              "command": ["true"]}
    data = wire.sign_envelope("task", agent_id, until + 1, forged, wire.Signer(old_seed))
    asyncio.run(publish_raw(nats_proc.url, subjects.events(agent_id), data))
    wait_until(lambda: rejected(hub, "retired_key") >= 1, timeout=20,
               what="the old key's envelope rejected")
    assert hub.api("GET", "/v1/tasks/forged").status == 404

    # A view rebuilt from JetStream applies both keys' events: the same tasks again.
    hub.stop()
    for path in hub.data_dir.glob("hub.db*"):
        path.unlink()
    hub.start()
    converged(edge, hub)
    assert hub.api("GET", "/v1/tasks/forged").status == 404


def test_a_pending_rotation_survives_a_crash(start_agent: Callable[..., AgentProcess],
                                             hub_proc: HubProcess,
                                             nats_proc: NatsServer) -> None:
    """The hub is down when the rotation starts; the agent keeps working, is SIGKILLed, and
    restarts; when the hub is back the rotation completes and nothing was lost."""
    hub = hub_proc
    edge = joined(start_agent, hub, nats_proc)
    agent_id = edge.api("GET", "/v1/info").body["agent_id"]
    first = edge.submit("first", ["sleep", "120"], kill_timeout=1)
    converged(edge, hub)
    hub.stop()

    pending = rotate_key(edge, "--wait", "2")
    assert pending.returncode == 1 and "not confirmed" in pending.stderr, pending
    next_key = edge.data_dir / "agent.key.next"
    assert next_key.exists() and stat.S_IMODE(next_key.stat().st_mode) == 0o600
    again = rotate_key(edge, "--wait", "0")  # the same pending key, not a second one
    assert again.returncode == 0 and "pending key" in again.stdout
    meanwhile = edge.submit("meanwhile", ["true"])
    edge.wait_state(meanwhile["id"], "finished")
    wait_until(lambda: rotation_point(edge), timeout=10, what="the rotation point fixed")
    edge.kill()
    edge.start()
    assert edge.api("GET", "/v1/info").body["agent_id"] == agent_id
    later = edge.submit("later", ["true"])
    edge.wait_state(later["id"], "finished")

    hub.start()
    # The key is swapped first (one rename), then the status file says so: wait for both.
    wait_until(lambda: not next_key.exists() and json.loads(
        (edge.data_dir / "key-rotation.json").read_text())["state"] == "done",
        timeout=30, what="the rotation to complete")
    assert hub_keys(hub, agent_id)[0] == wire.Signer(
        (edge.data_dir / "agent.key").read_bytes()).public
    converged(edge, hub)
    assert hub.api("GET", f"/v1/tasks/{first['id']}").body["state"] == "running"
    assert rejected(hub, "signature") == rejected(hub, "retired_key") == 0


# ---------------------------------------------------------------- the hub's rules, over NATS

NEW = wire.Signer(bytes(range(2, 34)))


async def test_the_hub_checks_rotation_requests(nats_server: NatsServer,
                                                tmp_path: Path) -> None:
    """Real NATS request/reply into a real Enroller and store: who may rotate, and to what."""
    async with enroll_hub(nats_server.url, tmp_path, Clock()) as (ask, store, tokens, _):
        token = tokens.create_token(ttl_s=600, uses=None)
        agent_id = (await ask(request(token)))["agent_id"]
        other_id = (await ask(request(token, OTHER, name="edge-2")))["agent_id"]
        store.set_applied_seq(agent_id, 4, 0.0)

        # Both keys must sign; the old key must be the agent's current one.
        tampered = msgpack.unpackb(wire.rotate_request(EDGE, NEW, agent_id, 7))
        tampered["until"] = 70
        refused(await ask(msgpack.packb(tampered)), "unauthorized", "both keys")
        half = msgpack.unpackb(wire.rotate_request(EDGE, NEW, agent_id, 7))
        half["new_sig"] = msgpack.unpackb(wire.rotate_request(EDGE, OTHER, agent_id, 7))[
            "new_sig"]
        refused(await ask(msgpack.packb(half)), "unauthorized", "both keys")
        refused(await ask(wire.rotate_request(OTHER, NEW, agent_id, 7)), "forbidden",
                "current key")
        refused(await ask(wire.rotate_request(EDGE, OTHER, agent_id, 7)), "conflict",
                "already belongs")
        refused(await ask(wire.rotate_request(EDGE, NEW, agent_id, 3)), "invalid", "until")
        refused(await ask(wire.rotate_request(EDGE, NEW, "anobody", 7)), "not_found",
                "not enrolled")

        done = await ask(wire.rotate_request(EDGE, NEW, agent_id, 7))
        assert done["ok"] is True and done["agent_id"] == agent_id
        assert await ask(wire.rotate_request(EDGE, NEW, agent_id, 7)) == done  # idempotent
        key = store.agent_key(agent_id)
        assert key is not None and key.public_key == NEW.public
        assert key.retired == ((EDGE.public, 7),)
        # The old key cannot rotate again, nor enroll; the new key cannot enroll as another.
        refused(await ask(wire.rotate_request(EDGE, OTHER, agent_id, 9)), "forbidden",
                "current key")
        refused(await ask(request(token)), "forbidden", "another key")
        refused(await ask(request(token, NEW)), "forbidden", f"belongs to agent {agent_id}")

        # Which envelopes verify now: the old key up to seq 7 only, the new key at any seq.
        def opens(signer: wire.Signer, seq: int) -> str:
            data = wire.sign_envelope("offer", agent_id, seq, {"expires_at": 1.0}, signer)
            try:
                open_agent_envelope(data, store.agent_key(agent_id), agent_id)
            except wire.EnvelopeRejected as err:
                return err.reason
            return "ok"

        assert [opens(EDGE, 7), opens(EDGE, 8), opens(NEW, 5), opens(NEW, 8),
                opens(OTHER, 8)] == ["ok", "retired_key", "ok", "ok", "signature"]
        store.revoke_agent(agent_id)
        assert opens(NEW, 9) == "unknown_agent"  # ingest counts it as revoked
        refused(await ask(wire.rotate_request(NEW, wire.Signer(bytes(range(3, 35))),
                                              agent_id, 9)), "forbidden", "revoked")
        assert store.agent_key(other_id) is not None
