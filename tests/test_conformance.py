"""One API, two backends: the same requests against a real edge and a real core give the same
status codes and the same shapes (checked against the OpenAPI schemas both serve)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import fastjsonschema
import pytest

from federation import schemas
from federation.natsd import NatsServer
from tests.helpers import ROOT, AgentProcess, HubProcess, http, joined, wait_until

TASK_CHECK = fastjsonschema.compile(schemas.TASK)
ERROR_CHECK = fastjsonschema.compile(schemas.ERROR)
AGENT_CHECK = fastjsonschema.compile(schemas.AGENT)
OFFER_CHECK = fastjsonschema.compile(schemas.OFFER)
INFO_CHECK = fastjsonschema.compile(schemas.INFO)
HISTORY_CHECK = fastjsonschema.compile(schemas.HISTORY)
ARTIFACT_CHECK = fastjsonschema.compile(schemas.ARTIFACT)


@pytest.fixture(params=["edge", "core"])
def node(request: pytest.FixtureRequest, start_agent: Callable[..., AgentProcess],
         tmp_path: Any) -> Iterator[Any]:
    if request.param == "edge":
        yield start_agent("--cpus", "2", "--mem-mb", "1024")
        return
    nats: NatsServer = request.getfixturevalue("nats_proc")
    hub: HubProcess = request.getfixturevalue("hub_proc")
    joined(start_agent, hub, nats, "--cpus", "2", "--mem-mb", "1024")
    wait_until(lambda: hub.api("GET", "/v1/offers").body["items"], what="an offer at the core")
    yield hub


def test_health_info_and_openapi(node: Any) -> None:
    assert http("GET", node.url + "/v1/health").status == 200
    info = node.api("GET", "/v1/info")
    assert info.status == 200
    INFO_CHECK(info.body)
    doc = http("GET", node.url + "/openapi.json").body
    assert doc["info"]["title"] == "Outpost API"
    assert "/v1/tasks/{id}/logs" in doc["paths"] and "/v1/agents/{id}/drain" in doc["paths"]


def test_task_lifecycle_has_the_same_shapes(node: Any) -> None:
    created = node.api("POST", "/v1/tasks", {"name": "conf", "command": ["sleep", "30"],
                                             "kill_timeout": 1, "labels": {"suite": "c"}})
    assert created.status == 201, created.body
    TASK_CHECK(created.body)
    task_id = created.body["id"]
    running = wait_until(lambda: (t := node.api("GET", f"/v1/tasks/{task_id}").body)["state"]
                         == "running" and t, timeout=15, what="running")
    TASK_CHECK(running)
    page = node.api("GET", "/v1/tasks?label=suite=c&limit=1").body
    assert set(page) == {"items", "next_cursor"} and [t["id"] for t in page["items"]] == [task_id]
    killed = node.api("DELETE", f"/v1/tasks/{task_id}")
    assert killed.status in (200, 202)
    wait_until(lambda: node.api("GET", f"/v1/tasks/{task_id}").body["state"] == "killed",
               timeout=15, what="killed")


def test_task_history_is_the_same_at_both(node: Any) -> None:
    """A task that fails once and is restarted: both nodes list the same changes, in order."""
    created = node.api("POST", "/v1/tasks", {
        "name": "flaky", "command": ["sh", "-c", "sleep 0.3; exit 3"],
        "restart": {"policy": "on-failure", "max": 1, "backoff": 0.2}})
    assert created.status == 201, created.body
    task_id = created.body["id"]

    def settled() -> list[dict[str, Any]]:
        task = node.api("GET", f"/v1/tasks/{task_id}").body
        if task["state"] != "failed" or task["restarts"] != 1:
            return []
        answer = node.api("GET", f"/v1/tasks/{task_id}/history")
        assert answer.status == 200, answer.body
        HISTORY_CHECK(answer.body)
        assert answer.body["task_id"] == task_id
        items = answer.body["items"]
        return items if items and items[-1]["state"] == "failed" else []

    items = wait_until(settled, timeout=20, what="failed after one restart, in the history")
    states = [i["state"] for i in items]
    # Two runs, each ending in exit code 3; the last change is the final failure.
    assert states.count("running") == 2, states
    assert [i["exit_code"] for i in items if i["state"] == "failed"] == [3, 3], items
    assert states.index("running") < states.index("failed"), states
    assert [i["ts"] for i in items] == sorted(i["ts"] for i in items)
    assert items[-1]["restarts"] == 1
    missing = node.api("GET", "/v1/tasks/nope/history")
    assert missing.status == 404
    ERROR_CHECK(missing.body)


def test_tasks_most_recently_changed_first(node: Any) -> None:
    """``order=recent`` pages the whole list last changed first, at both (the dashboard's task
    table); each page's cursor continues without repeats; a bad order or cursor is a 400."""
    ids = []
    for n in range(3):
        created = node.api("POST", "/v1/tasks", {"name": f"recent-{n}", "command": ["true"],
                                                 "labels": {"suite": "recent"}})
        assert created.status == 201, created.body
        ids.append(created.body["id"])
        wait_until(lambda i=created.body["id"]: node.api("GET", f"/v1/tasks/{i}").body["state"]
                   == "finished", timeout=15, what="finished")
    seen, cursor = [], ""
    while True:
        page = node.api("GET", f"/v1/tasks?label=suite=recent&order=recent&limit=1{cursor}")
        assert page.status == 200, page.body
        seen += [t["id"] for t in page.body["items"]]
        if not page.body["next_cursor"]:
            break
        cursor = f"&cursor={page.body['next_cursor']}"
    assert seen == ids[::-1], (seen, ids)
    by_id = node.api("GET", "/v1/tasks?label=suite=recent").body["items"]
    assert sorted(t["id"] for t in by_id) == sorted(ids)
    bad = node.api("GET", "/v1/tasks?order=oldest")
    assert bad.status == 400 and bad.body["error"]["details"]["field"] == "order", bad.body
    # An id-order cursor is not a recent-order one: refused, not misread.
    first = node.api("GET", "/v1/tasks?label=suite=recent&limit=1").body["next_cursor"]
    wrong = node.api("GET", f"/v1/tasks?order=recent&cursor={first}")
    assert wrong.status == 400, wrong.body
    ERROR_CHECK(wrong.body)


def test_agents_and_offers_have_the_same_shapes(node: Any) -> None:
    agents = node.api("GET", "/v1/agents").body["items"]
    assert agents
    for agent in agents:
        AGENT_CHECK(agent)
    assert node.api("GET", f"/v1/agents/{agents[0]['id']}").status == 200
    for offer in node.api("GET", "/v1/offers").body["items"]:
        OFFER_CHECK(offer)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/tasks", {"name": "Bad Name", "command": ["true"]}, 422),
    ("POST", "/v1/tasks", {"name": "x", "command": []}, 422),
    ("POST", "/v1/tasks", {"name": "x", "command": ["true"], "env": {"A": "x" * 300_000}}, 413),
    ("GET", "/v1/tasks?limit=0", None, 400),
    ("GET", "/v1/tasks?state=sleepy", None, 400),
    ("GET", "/v1/tasks?cursor=@@", None, 400),
    ("GET", "/v1/tasks/doesnotexist", None, 404),
    ("DELETE", "/v1/tasks/doesnotexist", None, 404),
    ("GET", "/v1/agents/nobody", None, 404),
    ("GET", "/v1/no-such-route", None, 404),
    ("PUT", "/v1/tasks", None, 405),
])
def test_errors_are_the_same(node: Any, method: str, path: str, body: Any, status: int) -> None:
    resp = node.api(method, path, body)
    assert resp.status == status, resp.body
    ERROR_CHECK(resp.body)


def test_every_route_needs_a_token_at_both(node: Any) -> None:
    for method, path in [("GET", "/v1/tasks"), ("POST", "/v1/tasks"), ("GET", "/v1/agents"),
                         ("GET", "/v1/offers"), ("GET", "/v1/events"), ("GET", "/metrics")]:
        resp = http(method, node.url + path)
        assert resp.status == 401
        ERROR_CHECK(resp.body)


def test_the_cli_works_unchanged(node: Any) -> None:
    run = subprocess.run([sys.executable, "-m", "federation.cli", "--url", node.url, "--token",
                          node.token, "tasks", "run", "viacli", "--", "true"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert run.returncode == 0, run.stderr
    task_id = run.stdout.strip().split()[-1]
    wait_until(lambda: node.api("GET", f"/v1/tasks/{task_id}").body["state"] == "finished",
               timeout=15, what="finished")
    ls = subprocess.run([sys.executable, "-m", "federation.cli", "--url", node.url, "--token",
                         node.token, "tasks", "ls"], capture_output=True, text=True, cwd=ROOT,
                        timeout=30)
    assert ls.returncode == 0 and "viacli" in ls.stdout


def test_artifacts_have_the_same_shapes(node: Any) -> None:
    data = b"#!/bin/sh\necho same api\n"
    pushed = node.api("POST", "/v1/artifacts?name=conf&version=1&label=a=b", raw=data)
    assert pushed.status == 201, pushed.body
    ARTIFACT_CHECK(pushed.body)
    digest = pushed.body["digest"]
    page = node.api("GET", "/v1/artifacts?name=conf&limit=1")
    assert page.status == 200 and [a["digest"] for a in page.body["items"]] == [digest]
    ARTIFACT_CHECK(page.body["items"][0])
    one = node.api("GET", f"/v1/artifacts/{digest}")
    assert one.status == 200
    ARTIFACT_CHECK(one.body)
    assert node.api("GET", f"/v1/artifacts/{digest}/content").raw == data
    for method, path, status in (("GET", "/v1/artifacts/sha256:zz", 400),
                                 ("GET", "/v1/artifacts/sha256:" + "0" * 64, 404),
                                 ("POST", "/v1/artifacts?name=conf", 422),
                                 ("GET", "/v1/artifacts?limit=0", 400)):
        resp = node.api(method, path, raw=b"x" if method == "POST" else None)
        assert resp.status == status, (path, resp.body)
        ERROR_CHECK(resp.body)
    assert node.api("DELETE", f"/v1/artifacts/{digest}").status == 200
    assert node.api("GET", f"/v1/artifacts/{digest}").status == 404
