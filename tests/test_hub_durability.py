"""The core through its own failures, against real processes: a deleted view, a hung NATS, a
hub started without NATS, another process holding the view's write lock.

DESIGN: the hub never holds state JetStream cannot rebuild. Its view file is a cache: delete it
(hub stopped) and every service, API token, join token and not-yet-placed task comes back and
works. The API never blocks on NATS nor answers a lie: a kill accepted while NATS hangs is
queued in the hub (202) and applied once NATS answers.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.natsd import NatsServer
from tests.helpers import (
    ROOT,
    AgentProcess,
    HubProcess,
    http,
    joined,
    pid_alive,
    task_states,
    wait_until,
)


def hub_cli(hub: HubProcess, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "core_hub", *args, "--data-dir",
                          str(hub.data_dir)], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    return out.stdout.strip()


def delete_view(hub: HubProcess) -> None:
    hub.stop()
    for path in hub.data_dir.glob("hub.db*"):
        path.unlink()


def test_a_deleted_view_keeps_services_tokens_and_pending_tasks(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc, "--site", "alpha", name="a")
    resp = hub_proc.api("POST", "/v1/services", {
        "name": "web", "instances": 1,
        "task": {"command": ["sleep", "300"], "kill_timeout": 1,
                 "resources": {"cpus": 0.1, "mem_mb": 16}}})
    assert resp.status == 201, resp.body
    instance = wait_until(lambda: (t := hub_proc.api(
        "GET", "/v1/tasks?name=web&state=running").body["items"]) and t[0], timeout=20,
        what="the service's instance running")
    pid = agent.task(instance["id"])["pid"]
    viewer = hub_cli(hub_proc, "apitoken", "create", "--role", "viewer", "--name", "ci")
    join = hub_proc.join_token(uses=2)
    pending = hub_proc.api("POST", "/v1/tasks", {
        "name": "later", "command": ["sleep", "300"], "kill_timeout": 1,
        "resources": {"cpus": 0.1, "mem_mb": 16}, "constraints": {"site": "beta"}})
    assert pending.status == 201 and pending.body["state"] == "pending", pending.body
    assert http("GET", hub_proc.url + "/v1/tasks", token=viewer).status == 200

    delete_view(hub_proc)
    hub_proc.start()

    assert http("GET", hub_proc.url + "/v1/tasks", token=viewer).status == 200
    svc = wait_until(lambda: (r := hub_proc.api("GET", "/v1/services/web")).status == 200
                     and r.body["running"] == 1 and r.body, timeout=20,
                     what="the service back, its instance counted")
    assert svc["tasks"] == [instance["id"]], "it manages its original instance, no new copy"
    assert hub_proc.api("GET", f"/v1/tasks/{pending.body['id']}").body["state"] == "pending"
    # The join token with a use left still enrolls; the pending task then finds its site.
    b = start_agent("--nats", nats_proc.url, "--join-token", join, "--heartbeat", "0.5",
                    "--site", "beta", name="b")
    b_id = b.api("GET", "/v1/info").body["agent_id"]
    try:
        placed = wait_until(lambda: (t := hub_proc.api(
            "GET", f"/v1/tasks/{pending.body['id']}").body)["state"] == "running" and t,
            timeout=30, what="the restored pending task placed and running")
    except AssertionError as err:  # once seen in a full run, never alone: say what was where
        core = hub_proc.api("GET", f"/v1/tasks/{pending.body['id']}").body
        b_row = hub_proc.api("GET", f"/v1/agents/{b_id}").body
        raise AssertionError(
            f"{err}\nthe task at the core: {core}\nb at the core: {b_row}\n"
            f"launches: {_launches(hub_proc.data_dir)}\non b: {task_states(b)}"
            f"\nhub log tail:\n{hub_proc.log()[-6000:]}") from None
    assert placed["agent_id"] == b_id
    # Still managed: deleting the service stops the instance it started before the rebuild.
    assert hub_proc.api("DELETE", "/v1/services/web").status == 202
    wait_until(lambda: not pid_alive(pid), timeout=20, what="the instance stopped")
    assert hub_proc.api("GET", "/v1/services/web").status == 404


def test_a_hung_nats_never_blocks_the_api(start_agent: Callable[..., AgentProcess],
                                          hub_proc: HubProcess,
                                          nats_proc: NatsServer) -> None:
    """With NATS stopped (SIGSTOP), a kill is queued in the hub (202) and a submit is accepted
    (201): both answer at once, while NATS still hangs (the client gives up at 4 s; NATS'
    own request timeout is 5 s). Once NATS answers, the kill is applied once and the new task
    placed. The event feed cannot open: 503 before any byte of a stream."""
    agent = joined(start_agent, hub_proc, nats_proc)
    victim = hub_proc.api("POST", "/v1/tasks", {
        "name": "victim", "command": ["sleep", "300"], "kill_timeout": 1,
        "resources": {"cpus": 0.1, "mem_mb": 16}}).body
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{victim['id']}").body["state"]
               == "running", timeout=20, what="the victim running")
    pid = agent.task(victim["id"])["pid"]
    nats_proc.pause()
    try:
        killed = hub_proc.api("DELETE", f"/v1/tasks/{victim['id']}", timeout=4)
        assert killed.status == 202 and killed.body["command_id"], killed.body
        made = hub_proc.api("POST", "/v1/tasks", {
            "name": "after", "command": ["sleep", "300"], "kill_timeout": 1,
            "resources": {"cpus": 0.1, "mem_mb": 16}}, timeout=4)
        assert made.status == 201, made.body
        feed = hub_proc.api("GET", "/v1/events?after=0", timeout=15)
        assert feed.status == 503 and feed.body["error"]["code"] == "unavailable", feed.raw
        assert pid_alive(pid), "nothing is applied while NATS hangs"
    finally:
        nats_proc.resume()
    agent.wait_state(victim["id"], "killed", timeout=20)
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{made.body['id']}").body["state"]
               == "running", timeout=20, what="the task submitted meanwhile running")
    results = wait_until(lambda: [r for r in _results(hub_proc.data_dir)
                                  if r[0] == killed.body["command_id"]],
                         timeout=10, what="the kill's result")
    assert results == [(killed.body["command_id"], "applied")]


def _launches(hub_dir: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{hub_dir / 'hub.db'}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT task_id, agent_id, status, reason FROM launches"))
    finally:
        db.close()


def _results(hub_dir: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{hub_dir / 'hub.db'}?mode=ro", uri=True)
    try:
        return [(r[0], r[1]) for r in db.execute("SELECT command_id, status FROM results")]
    finally:
        db.close()


def test_a_hub_waiting_for_nats_stops_on_a_signal_and_logs_its_retries(
        tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on: NATS never answers
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for sig in (signal.SIGTERM, signal.SIGINT):
        data = tmp_path / f"hub-{sig.name}"
        log_path = tmp_path / f"hub-{sig.name}.log"
        with open(log_path, "wb") as log:
            env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
            proc = subprocess.Popen(
                [sys.executable, "-m", "core_hub", "run", "--data-dir", str(data), "--nats",
                 f"nats://127.0.0.1:{port}", "--listen", "127.0.0.1:0"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            wait_until(lambda p=log_path: p.read_text().count("retrying every") >= 3, timeout=20,
                       what="the hub logging its tries to reach NATS")
            proc.send_signal(sig)
            assert proc.wait(timeout=20) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert not (data / "hub.url").exists()


def test_another_process_holding_the_view_does_not_freeze_the_hub(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """A process that takes the view's write lock and keeps it (a CLI frozen mid-write)
    must not stall the hub's event loop for SQLite's busy timeout at each write: reads go on
    answering (each within the client's 2 s; the old busy timeout was 5 s), an API write is a
    503, and once the lock is gone nothing the edge reported meanwhile is missing."""
    agent = joined(start_agent, hub_proc, nats_proc)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         f"db = sqlite3.connect({str(hub_proc.data_dir / 'hub.db')!r}, isolation_level=None)\n"
         "db.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        during = agent.submit("during", ["true"])  # the edge reports; ingest must wait
        for _ in range(10):
            assert hub_proc.api("GET", "/v1/health", timeout=2).status == 200
            assert hub_proc.api("GET", "/v1/agents", timeout=2).status == 200
        made = hub_proc.api("POST", "/v1/tasks", {"name": "x", "command": ["true"]},
                            timeout=5)
        assert made.status == 503 and made.body["error"]["code"] == "unavailable", made.body
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{during['id']}").status == 200,
               timeout=20, what="what the edge reported during the lock, at the core")


def test_a_deleted_view_keeps_a_drain_with_migrate(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    """An agent drained with ``migrate`` while no other agent can take its service instance;
    the view is deleted; when a second agent joins, the instance still moves there. It failed
    before: the migrate flag lived only in the view, so the rebuilt hub counted the original
    and stopped the pending replacement as surplus."""
    a = joined(start_agent, hub_proc, nats_proc, "--site", "alpha", name="a")
    a_id = a.api("GET", "/v1/info").body["agent_id"]
    resp = hub_proc.api("POST", "/v1/services", {
        "name": "shop", "instances": 1,
        "task": {"command": ["sleep", "300"], "kill_timeout": 1,
                 "resources": {"cpus": 0.1, "mem_mb": 16}}})
    assert resp.status == 201, resp.body
    original = wait_until(lambda: (t := hub_proc.api(
        "GET", "/v1/tasks?name=shop&state=running").body["items"]) and t[0], timeout=20,
        what="the service's instance running")
    pid = a.task(original["id"])["pid"]
    join = hub_proc.join_token()
    drained = hub_proc.api("POST", f"/v1/agents/{a_id}/drain?migrate=true")
    assert drained.status in (200, 202), drained.body
    wait_until(lambda: hub_proc.api("GET", "/v1/tasks?name=shop&state=pending").body["items"],
               timeout=20, what="a replacement waiting for room")

    delete_view(hub_proc)
    hub_proc.start()
    b = start_agent("--nats", nats_proc.url, "--join-token", join, "--heartbeat", "0.5",
                    "--site", "beta", name="b")
    b_id = b.api("GET", "/v1/info").body["agent_id"]
    try:
        moved = wait_until(lambda: (t := hub_proc.api(
            "GET", "/v1/tasks?name=shop&state=running").body["items"]) and all(
            x["agent_id"] == b_id for x in t) and t, timeout=40,
            what="the instance moved to b, the original stopped")
    except AssertionError as err:  # once seen in a full run, never alone: say what was where
        shop = [(x["id"], (x.get("agent_id") or "-")[:8], x["state"]) for x in hub_proc.api(
            "GET", "/v1/tasks?name=shop").body["items"]]
        raise AssertionError(f"{err}\nshop's tasks at the core: {shop} (a {a_id[:8]}, "
                             f"b {b_id[:8]}); on a: {task_states(a)}; on b: {task_states(b)}"
                             f"\nhub log tail:\n{hub_proc.log()[-4000:]}") from None
    assert len(moved) == 1 and moved[0]["id"] != original["id"]
    wait_until(lambda: not pid_alive(pid), timeout=20, what="the original's process gone")
