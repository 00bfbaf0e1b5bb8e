"""Artifacts at one edge with no core: upload, a task runs the artifact's binary from its
sandbox, delete is refused while a live task uses it, unsafe archives are refused and never
run, a full cache answers 409, and a rebooted agent brings an artifact service back from
the cache."""

from __future__ import annotations

import hashlib
import io
import sqlite3
import tarfile
from collections.abc import Callable

from tests.helpers import AgentProcess, kill_group, wait_until

SCRIPT = b"#!/bin/sh\necho \"hello from the artifact $1\"\n"


def _push(agent: AgentProcess, data: bytes, name: str = "hello",
          version: str = "1.0", **query: str) -> dict:
    qs = "&".join(f"{k}={v}" for k, v in {"name": name, "version": version, **query}.items())
    resp = agent.api("POST", f"/v1/artifacts?{qs}", raw=data,
                     headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 201, resp.body
    return resp.body


def _logs(agent: AgentProcess, task_id: str) -> str:
    return agent.api("GET", f"/v1/tasks/{task_id}/logs").raw.decode()


def test_local_upload_then_a_task_runs_it(agent: AgentProcess) -> None:
    art = _push(agent, SCRIPT, label="team=ops")
    assert art["digest"] == "sha256:" + hashlib.sha256(SCRIPT).hexdigest()
    assert art["origin"] == "edge" and art["labels"] == {"team": "ops"}
    listed = agent.api("GET", "/v1/artifacts?name=hello").body["items"]
    assert [a["digest"] for a in listed] == [art["digest"]]
    got = agent.api("GET", f"/v1/artifacts/{art['digest']}/content")
    assert got.status == 200 and got.raw == SCRIPT
    task = agent.submit("runs-it", ["./bin/hello", "world"], artifacts=[
        {"name": "hello", "version": "1.0", "dest": "bin/hello", "mode": "0755"}])
    done = agent.wait_state(task["id"], "finished", "failed", timeout=15)
    assert done["state"] == "finished", done
    assert "hello from the artifact world" in _logs(agent, task["id"])


def test_delete_refused_while_a_live_task_uses_it(agent: AgentProcess) -> None:
    art = _push(agent, SCRIPT)
    task = agent.submit("sleeper", ["sh", "-c", "sleep 30"], artifacts=[
        {"digest": art["digest"], "dest": "hello"}])
    agent.wait_state(task["id"], "running", timeout=15)
    refused = agent.api("DELETE", f"/v1/artifacts/{art['digest']}")
    assert refused.status == 409 and task["id"] in refused.body["error"]["details"]["tasks"]
    agent.api("DELETE", f"/v1/tasks/{task['id']}")
    agent.wait_state(task["id"], "killed", timeout=15)
    assert agent.api("DELETE", f"/v1/artifacts/{art['digest']}").status == 200
    assert agent.api("GET", f"/v1/artifacts/{art['digest']}").status == 404


def test_unsafe_archive_is_refused_and_never_run(agent: AgentProcess) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("run.sh", b"#!/bin/sh\ntouch ran\n"), ("../escape", b"x")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    art = _push(agent, buf.getvalue(), name="bad", version="1")
    task = agent.submit("bad", ["./app/run.sh"], artifacts=[
        {"digest": art["digest"], "dest": "app", "extract": True}])
    done = agent.wait_state(task["id"], "failed", timeout=15)
    assert "artifact refused" in done["reason"] and "'..'" in done["reason"], done
    assert not list(agent.data_dir.glob("tasks/*/sandbox/app/ran"))
    assert not list(agent.data_dir.glob("tasks/*/escape"))


def test_bad_specs_and_uploads_get_4xx(agent: AgentProcess) -> None:
    for bad in ({"digest": "sha256:nothex", "dest": "x"}, {"name": "a", "dest": "x"},
                {"name": "a", "version": "1", "dest": "../x"},
                {"name": "a", "version": "1", "dest": "x", "mode": "rwx"}):
        resp = agent.api("POST", "/v1/tasks", {"name": "t", "command": ["true"],
                                              "artifacts": [bad]})
        assert resp.status == 422, (bad, resp.body)
    assert agent.api("POST", "/v1/artifacts?name=x", raw=b"data").status == 422
    assert agent.api("POST", "/v1/artifacts?name=x&version=1", raw=b"").status == 400
    assert agent.api("GET", "/v1/artifacts/sha256:xyz").status == 400
    assert agent.api("GET", "/v1/artifacts/sha256:" + "0" * 64).status == 404


def test_full_cache_answers_409(start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent("--artifact-cache-mb", "1", name="small")
    first = _push(agent, b"a" * 700_000, name="a")
    task = agent.submit("holds", ["sh", "-c", "sleep 30"], artifacts=[
        {"digest": first["digest"], "dest": "a"}])
    agent.wait_state(task["id"], "running", timeout=15)
    full = agent.api("POST", "/v1/artifacts?name=b&version=1", raw=b"b" * 700_000)
    assert full.status == 409, full.body
    assert full.body["error"]["details"]["limit"] == "artifact_cache_mb"
    agent.api("DELETE", f"/v1/tasks/{task['id']}")
    agent.wait_state(task["id"], "killed", timeout=15)
    _push(agent, b"b" * 700_000, name="b")  # a is not in use any more: evicted
    assert agent.api("GET", f"/v1/artifacts/{first['digest']}").status == 404


def test_agent_crash_and_reboot_bring_the_service_back_from_cache(
        start_agent: Callable[..., AgentProcess]) -> None:
    """SIGKILL the agent, then start it as after a reboot (a new boot id): the task that ran
    the artifact's binary is started again from the cache, with no core."""
    agent = start_agent(name="rebooted")
    art = _push(agent, b"#!/bin/sh\necho up; exec sleep 300\n", name="svc")
    task = agent.submit("svc", ["./svc"], restart={"policy": "always", "backoff": 0.1},
                        artifacts=[{"digest": art["digest"], "dest": "svc", "mode": "0755"}])
    agent.wait_state(task["id"], "running", timeout=15)
    agent.kill()
    # What a reboot does to a task: its process is gone and the boot id changed.
    pid = int(next(agent.data_dir.glob("tasks/*/run.pid")).read_text())
    kill_group(pid)
    db = sqlite3.connect(agent.data_dir / "agent.db")
    db.execute("UPDATE tasks SET boot_id = 'an-earlier-boot'")
    db.commit()
    db.close()
    agent.start()
    back = wait_until(lambda: (t := agent.task(task["id"]))["state"] == "running"
                      and t["restarts"] >= 1 and t, 20, what="service back after reboot")
    assert back["restarts"] >= 1
    assert agent.api("GET", f"/v1/artifacts/{art['digest']}").body["in_use_by"] == [task["id"]]


def test_cli_push_ls_get_rm(agent: AgentProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_cli import outpost

    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 8192)  # 2 MB: the progress bar is drawn
    pushed = outpost("artifacts", "push", str(big), "--name", "big", "--version", "1",
                     "--label", "k=v", agent=agent)
    assert pushed.returncode == 0, pushed.stderr
    digest = pushed.stdout.strip()
    assert digest == "sha256:" + hashlib.sha256(big.read_bytes()).hexdigest()
    assert "100%" in pushed.stderr
    listed = outpost("artifacts", "ls", agent=agent)
    assert "big" in listed.stdout and digest[:19] in listed.stdout
    out = tmp_path / "copy.bin"
    got = outpost("artifacts", "get", digest, "-o", str(out), agent=agent)
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == big.read_bytes()
    missing = outpost("artifacts", "push", str(tmp_path / "nope"), "--name", "x", "--version",
                      "1", agent=agent)
    assert missing.returncode != 0 and "cannot read" in missing.stderr
    bad = outpost("artifacts", "rm", "sha256:abc", agent=agent)
    assert bad.returncode == 2 and "not a digest" in bad.stderr
    assert outpost("artifacts", "rm", digest, agent=agent).returncode == 0
    gone = outpost("artifacts", "get", digest, agent=agent)
    assert gone.returncode == 1 and "no artifact" in gone.stderr
