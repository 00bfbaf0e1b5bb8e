"""Records the hub cannot place or reconcile are set aside with a reason (issue 10 section 4).

The records are the ones a hub before strict input stored for a NaN ``cpus`` (orjson wrote it
as null) or a float ``instances``: written into a real hub's view here, as an upgraded hub finds
them. Before, each failed the whole scheduler or service pass, every 0.5-1 s, so no other task
was placed and no lost instance replaced; now the broken record is set aside (its reason in the
API) and everything else goes on."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, joined, wait_until


def _edit(hub: HubProcess, sql: str, *args: object) -> None:
    db = sqlite3.connect(hub.data_dir / "hub.db", timeout=10)
    try:
        with db:
            assert db.execute(sql, args).rowcount == 1
    finally:
        db.close()


def test_an_unplaceable_task_is_set_aside_and_others_are_placed(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    # Both submitted before any agent: they wait as pending launches for the scheduler pass.
    bad = hub_proc.api("POST", "/v1/tasks", {"name": "bad", "command": ["sleep", "30"]}).body
    good = hub_proc.api("POST", "/v1/tasks", {"name": "good", "command": ["sleep", "30"],
                                              "kill_timeout": 1}).body
    spec = {k: v for k, v in bad.items() if k in ("name", "command", "env", "restart",
                                                 "health", "constraints", "labels",
                                                 "kill_timeout")}
    spec["resources"] = {"cpus": None, "mem_mb": 32, "disk_mb": 0}
    _edit(hub_proc, "UPDATE launches SET spec = ? WHERE task_id = ?", json.dumps(spec),
          bad["id"])
    joined(start_agent, hub_proc, nats_proc, "--cpus", "2", "--mem-mb", "512")
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{good['id']}").body["state"]
               == "running", timeout=20, what="the good task placed and running")
    shown = wait_until(lambda: (t := hub_proc.api("GET", f"/v1/tasks/{bad['id']}").body)[
        "state"] == "failed" and t, timeout=10, what="the bad task set aside")
    assert shown["reason"].startswith("set aside: the hub cannot place it"), shown
    # Set aside once, not retried (and logged) on every pass.
    more = hub_proc.api("POST", "/v1/tasks", {"name": "later", "command": ["true"]}).body
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{more['id']}").body["state"]
               == "finished", timeout=20, what="a later task placed too")
    log = hub_proc.log()
    assert log.count(f"task {bad['id']} set aside") == 1, log[-3000:]
    assert "core scheduler pass failed" not in log


def test_a_service_that_cannot_be_reconciled_does_not_stop_the_others(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    joined(start_agent, hub_proc, nats_proc, "--cpus", "2", "--mem-mb", "512")
    task = {"command": ["sleep", "60"], "kill_timeout": 1}
    for name in ("aaa-bad", "web"):
        resp = hub_proc.api("POST", "/v1/services", {"name": name, "instances": 1,
                                                     "task": task})
        assert resp.status == 201, resp.body
    wait_until(lambda: hub_proc.api("GET", "/v1/services/web").body["running"] == 1,
               timeout=20, what="web running")
    row = sqlite3.connect(hub_proc.data_dir / "hub.db").execute(
        "SELECT spec FROM services WHERE name = 'aaa-bad'").fetchone()
    spec = {**json.loads(row[0]), "instances": 1.5}
    _edit(hub_proc, "UPDATE services SET spec = ? WHERE name = 'aaa-bad'", json.dumps(spec))
    # An instance of web is lost: only the service pass (after aaa-bad's) replaces it.
    first = hub_proc.api("GET", "/v1/services/web").body["tasks"][0]
    assert hub_proc.api("DELETE", f"/v1/tasks/{first}").status in (200, 202)
    wait_until(lambda: (s := hub_proc.api("GET", "/v1/services/web").body)["running"] == 1
               and s["tasks"] != [first], timeout=20, what="web's instance replaced")
    bad = wait_until(lambda: (s := hub_proc.api("GET", "/v1/services/aaa-bad").body).get(
        "problem") and s, timeout=10, what="aaa-bad set aside")
    assert bad["problem"].startswith("set aside: the hub cannot reconcile it"), bad
    # A PUT stores it anew: the problem is gone and it is reconciled again.
    fixed = hub_proc.api("PUT", "/v1/services/aaa-bad", {"name": "aaa-bad", "instances": 1,
                                                         "task": task})
    assert fixed.status == 200 and "problem" not in fixed.body, fixed.body
    log = hub_proc.log()
    assert log.count("service aaa-bad set aside") == 1, log[-3000:]
    assert "service reconcile failed" not in log
