"""Artifacts pushed at the core (a hub with its own NATS and least privilege on) reach an
edge: a task placed there runs the artifact's binary; the core shows which agents hold it
and refuses a delete while a task uses it; an agent may read the artifact bucket, never
write, delete or purge it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from federation import manifest, objstore
from tests.helpers import AgentProcess, HubProcess, joined, wait_until
from tests.test_nats_auth import client, creds_of, enrolled

SCRIPT = b"#!/bin/sh\necho \"from the core: $1\"\n"


@pytest.fixture
def secure_hub(tmp_path: Path) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path / "hub", "", embedded=True).start()
    try:
        yield hub
    finally:
        hub.stop()


def _push(node: HubProcess | AgentProcess, data: bytes, name: str, version: str) -> dict:
    resp = node.api("POST", f"/v1/artifacts?name={name}&version={version}&label=tier=web",
                    raw=data, headers={"Content-Type": "application/octet-stream"},
                    timeout=60)
    assert resp.status == 201, resp.body
    return resp.body


def test_push_at_core_task_at_edge_runs_it(secure_hub: HubProcess,
                                           start_agent: Callable[..., AgentProcess]) -> None:
    hub = secure_hub
    agent, agent_id = enrolled(start_agent, hub, "edge1")
    art = _push(hub, SCRIPT, "greeter", "2.0")
    assert art["digest"] == "sha256:" + hashlib.sha256(SCRIPT).hexdigest() and art["signed"]
    again = _push(hub, SCRIPT, "greeter", "2.0")  # the same bytes again: the same artifact
    assert again["digest"] == art["digest"]
    other = hub.api("POST", "/v1/artifacts?name=greeter&version=2.0", raw=b"other bytes")
    assert other.status == 409  # a version is immutable
    listed = hub.api("GET", "/v1/artifacts?name=greeter").body["items"]
    assert [a["digest"] for a in listed] == [art["digest"]]
    assert hub.api("GET", f"/v1/artifacts/{art['digest']}/content").raw == SCRIPT

    resp = hub.api("POST", "/v1/tasks", {
        "name": "greet", "command": ["./bin/greet", "hello"],
        "artifacts": [{"name": "greeter", "version": "2.0", "dest": "bin/greet",
                       "mode": "0755"}]})
    assert resp.status == 201, resp.body
    task_id = resp.body["id"]
    def ended() -> dict | None:
        task = agent.api("GET", f"/v1/tasks/{task_id}").body or {}
        return task if task.get("state") in ("finished", "failed") else None

    done = wait_until(ended, 30, what="the task at the edge to end")
    assert done["state"] == "finished", done
    logs = agent.api("GET", f"/v1/tasks/{task_id}/logs").raw.decode()
    assert "from the core: hello" in logs
    held = agent.api("GET", f"/v1/artifacts/{art['digest']}").body
    assert held["origin"] == "core" and held["signed"]
    wait_until(lambda: hub.api("GET", f"/v1/artifacts/{art['digest']}").body["agents"]
               == [{"id": agent_id, "site": "default"}], 15,
               what="the core to list the agent as holding the artifact")

    busy = hub.api("POST", "/v1/tasks", {
        "name": "busy", "command": ["sh", "-c", "sleep 60"],
        "artifacts": [{"digest": art["digest"], "dest": "greet"}]})
    wait_until(lambda: agent.api("GET", f"/v1/tasks/{busy.body['id']}").body.get("state")
               == "running", 30, what="the busy task to run")
    assert hub.api("DELETE", f"/v1/artifacts/{art['digest']}").status == 409
    hub.api("DELETE", f"/v1/tasks/{busy.body['id']}")
    wait_until(lambda: hub.api("GET", f"/v1/tasks/{busy.body['id']}").body["state"]
               == "killed", 30, what="the kill to reach the core")
    gone = hub.api("DELETE", f"/v1/artifacts/{art['digest']}")
    assert gone.status == 200, gone.body
    assert hub.api("GET", f"/v1/artifacts/{art['digest']}").status == 404


async def test_agent_may_read_artifacts_but_never_write_or_delete(
        secure_hub: HubProcess, start_agent: Callable[..., AgentProcess]) -> None:
    hub = secure_hub
    agent, agent_id = enrolled(start_agent, hub, "thief")
    art = _push(hub, SCRIPT, "target", "1")
    sha = art["sha256"]
    async with client(hub.nats_url, creds_of(agent, agent_id)) as me:
        nc = me.nc
        meta = await objstore.read_meta(nc, sha)  # reading is allowed
        assert meta is not None and meta.sha256 == sha
        fetched = objstore.Fetcher(nc)
        await fetched.fetch(sha, Path(str(agent.data_dir)) / "stolen.part")
        # Writing a chunk or a meta message of the bucket, or a manifest:
        for subject in (objstore.chunk_subject(meta.nuid), objstore.meta_subject(sha),
                        f"$KV.{manifest.BUCKET}.{manifest.digest_key(sha)}"):
            await nc.publish(subject, b"evil")
            await me.violation("publish", subject)
        for api in (f"STREAM.PURGE.{objstore.STREAM}", f"STREAM.DELETE.{objstore.STREAM}",
                    f"STREAM.MSG.DELETE.{objstore.STREAM}",
                    f"CONSUMER.CREATE.{objstore.STREAM}",
                    f"STREAM.UPDATE.{objstore.STREAM}"):
            await nc.publish(f"$JS.API.{api}", json.dumps({}).encode())
            await me.violation("publish", f"$JS.API.{api}")
        js = nc.jetstream(timeout=3)
        obs = await _bound(js)
        with pytest.raises(Exception):  # noqa: B017 (a timeout or a permission error)
            await obs.put("evil", io.BytesIO(b"x" * 10))
    assert hub.api("GET", f"/v1/artifacts/{art['digest']}/content").raw == SCRIPT


async def _bound(js):  # type: ignore[no-untyped-def]
    from nats.js.object_store import ObjectStore

    return ObjectStore(name=objstore.BUCKET, stream=objstore.STREAM, js=js)


def _metric(agent: AgentProcess, name: str) -> float:
    text = agent.api("GET", "/metrics").raw.decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_nats_killed_mid_fetch_resumes_and_runs(hub_proc: HubProcess, nats_proc: Any,
                                                start_agent: Callable[..., AgentProcess],
                                                tmp_path: Path) -> None:
    """A 3 MB artifact fetched at 1 MB/s: SIGKILL nats-server while the task is staging,
    start it again; the fetch resumes (fewer than two chunks come twice), the task runs."""
    agent = joined(start_agent, hub_proc, nats_proc, "--artifact-rate-kbps", "1024",
                   name="slow")
    payload = b"#!/bin/sh\necho resumed fine\nexit 0\n" + b"#" * (3 << 20)
    art = _push(hub_proc, payload, "bigscript", "1")
    resp = hub_proc.api("POST", "/v1/tasks", {
        "name": "big", "command": ["./big"],
        "artifacts": [{"digest": art["digest"], "dest": "big", "mode": "0755"}]})
    task_id = resp.body["id"]

    def fetching() -> bool:
        task = agent.api("GET", f"/v1/tasks/{task_id}").body or {}
        return task.get("state") == "staging" and "fetching artifact" in (task.get("reason")
                                                                          or "")

    wait_until(fetching, 20, what="the fetch to be under way (progress in reason)")
    wait_until(lambda: 0.2 < _progress(agent) < 0.8, 10, what="the fetch a fifth of the way")
    nats_proc.kill()
    time.sleep(1.0)
    assert agent.api("GET", f"/v1/tasks/{task_id}").body["state"] == "staging"
    asyncio.run(nats_proc.start())
    done = agent.wait_state(task_id, "finished", "failed", timeout=60)
    assert done["state"] == "finished", done
    assert "resumed fine" in agent.api("GET", f"/v1/tasks/{task_id}/logs").raw.decode()
    again = _metric(agent, "outpost_artifact_fetched_bytes_total") - len(payload)
    assert 0 <= again < 2 * objstore.CHUNK_SIZE, f"{again} bytes fetched twice"


def _progress(agent: AgentProcess) -> float:
    text = agent.api("GET", "/metrics").raw.decode()
    for line in text.splitlines():
        if line.startswith("outpost_artifact_fetch_progress{"):
            return float(line.split()[-1])
    return 0.0


def test_stage_ahead_on_a_site(hub_proc: HubProcess, nats_proc: Any,
                               start_agent: Callable[..., AgentProcess]) -> None:
    oslo = joined(start_agent, hub_proc, nats_proc, "--site", "oslo", name="oslo1")
    bergen = joined(start_agent, hub_proc, nats_proc, "--site", "bergen", name="bergen1")
    art = _push(hub_proc, b"stage me", "early", "1")
    staged = hub_proc.api("POST", f"/v1/artifacts/{art['digest']}/stage", {"site": "oslo"})
    assert staged.status == 202, staged.body
    oslo_id = oslo.api("GET", "/v1/info").body["agent_id"]
    assert staged.body["agents"] == [oslo_id]
    wait_until(lambda: oslo.api("GET", f"/v1/artifacts/{art['digest']}").status == 200, 15,
               what="the oslo agent to hold the artifact")
    assert bergen.api("GET", f"/v1/artifacts/{art['digest']}").status == 404
    bad = hub_proc.api("POST", f"/v1/artifacts/{art['digest']}/stage", {"site": "Not OK"})
    assert bad.status == 422


APP = "#!/bin/sh\n# version {v}\nexec sleep 600\n"


def test_a_stage_first_rollout_starts_new_instances_only_where_the_artifact_is(
        hub_proc: HubProcess, nats_proc: Any,
        start_agent: Callable[..., AgentProcess]) -> None:
    """``update.stage_first``: the agents running a service hold the new revision's artifact
    before its first new instance is created; an artifact that never comes fails the rollout
    at its timeout (rolled back), and nothing new starts meanwhile."""
    from tests.test_services import editable, service

    edges = [joined(start_agent, hub_proc, nats_proc, "--site", site, name=f"{site}1")
             for site in ("alpha", "beta")]
    wait_until(lambda: len(hub_proc.api("GET", "/v1/offers").body["items"]) == 2, 20,
               what="offers from both")
    v1 = _push(hub_proc, APP.format(v=1).encode(), "shopapp", "1")
    use = {"name": "shopapp", "version": "1", "dest": "bin/app", "mode": "0755"}
    assert hub_proc.api("POST", "/v1/services", {
        "name": "shop", "instances": 2, "constraints": {"unique": "site"},
        "update": {"batch": 1, "min_ready": 0.5, "timeout": 120, "stage_first": True},
        "task": {"command": ["./bin/app"], "kill_timeout": 1, "artifacts": [use]}},
    ).status == 201

    def tasks(revision: str) -> list[dict[str, Any]]:
        items = hub_proc.api("GET", "/v1/tasks?name=shop&limit=100").body["items"]
        return [t for t in items if t["labels"].get("outpost.revision") == revision]

    wait_until(lambda: sum(t["state"] == "running" for t in tasks("1")) == 2, 40,
               what="revision 1 on both sites")
    assert v1["digest"]

    # Revision 2 names an artifact the core does not have yet: the rollout waits for it.
    body = editable(service(hub_proc, "shop"))
    body["task"]["artifacts"] = [{**use, "version": "2"}]
    assert hub_proc.api("PUT", "/v1/services/shop", body).status == 200
    waiting = wait_until(lambda: (r := service(hub_proc, "shop")["rollout"])["reason"]
                         and r, 20, what="the rollout to say what it waits for")
    assert waiting["status"] == "rolling"
    assert "shopapp:2 is not at the core yet" in waiting["reason"], waiting
    assert tasks("2") == []

    v2 = _push(hub_proc, APP.format(v=2).encode(), "shopapp", "2")
    done = wait_until(lambda: (s := service(hub_proc, "shop"))["rollout"]["status"] == "done"
                      and s, 90, what="the rollout of revision 2")
    assert done["rollout"]["stage"]["done"] is True
    new = tasks("2")
    assert sum(t["state"] == "running" for t in new) == 2, new
    first_created = min(t["created_at"] for t in new)
    for edge in edges:
        held = edge.api("GET", f"/v1/artifacts/{v2['digest']}")
        assert held.status == 200, held.body
        # Renamed into the cache (its ctime) before the hub created any new instance; the
        # agents and the hub share this box's clock.
        arrived = (edge.data_dir / "artifacts" / "blobs" / v2["sha256"]).stat().st_ctime
        assert arrived <= first_created, (arrived, first_created)

    # Revision 3's artifact never comes: the staging counts against the timeout.
    body = editable(service(hub_proc, "shop"))
    body["task"]["artifacts"] = [{**use, "version": "3"}]
    body["update"]["timeout"] = 3
    assert hub_proc.api("PUT", "/v1/services/shop", body).status == 200
    back = wait_until(lambda: (s := service(hub_proc, "shop"))["rollout"]["status"]
                      == "rolled_back" and s, 40, what="the rollback")
    assert "artifacts not staged after 3s" in back["rollout"]["reason"], back["rollout"]
    assert back["revision"] == 2 and tasks("3") == []
