"""Artifacts pushed at the core (a hub with its own NATS and least privilege on) reach an
edge: a task placed there runs the artifact's binary; the core shows which agents hold it
and refuses a delete while a task uses it; an agent may read the artifact bucket, never
write, delete or purge it."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from federation import manifest, objstore
from tests.helpers import AgentProcess, HubProcess, wait_until
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
