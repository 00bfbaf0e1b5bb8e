"""Bad input on every route gets a clear JSON 4xx, never a 500 or a traceback."""

from __future__ import annotations

import pytest

from tests.helpers import AgentProcess, http

BAD_SPECS = [
    ({"command": ["true"]}, "name"),
    ({"name": "x", "command": []}, "command"),
    ({"name": "x", "command": "true"}, "command"),
    ({"name": "x", "command": [1, 2]}, "command.0"),
    ({"name": "x", "command": [""]}, "command.0"),
    ({"name": "Bad Name", "command": ["true"]}, "name"),
    ({"name": "x" * 64, "command": ["true"]}, "name"),
    ({"name": "x", "command": ["true"], "env": {"1BAD": "v"}}, "env"),
    ({"name": "x", "command": ["true"], "env": {"K": 3}}, "env.K"),
    ({"name": "x", "command": ["true"], "resources": {"cpus": 0}}, "resources.cpus"),
    ({"name": "x", "command": ["true"], "resources": {"cpus": -1}}, "resources.cpus"),
    ({"name": "x", "command": ["true"], "resources": {"mem_mb": 1.5}}, "resources.mem_mb"),
    ({"name": "x", "command": ["true"], "resources": {"gpus": 1}}, "resources"),
    ({"name": "x", "command": ["true"], "restart": {"policy": "sometimes"}}, "restart.policy"),
    ({"name": "x", "command": ["true"], "restart": {"max": -1}}, "restart.max"),
    ({"name": "x", "command": ["true"], "health": {"interval": 1}}, "health.command"),
    ({"name": "x", "command": ["true"], "health": {"command": ["true"], "retries": 0}},
     "health.retries"),
    ({"name": "x", "command": ["true"], "kill_timeout": 1e9}, "kill_timeout"),
    ({"name": "x", "command": ["true"], "labels": {"k": 1}}, "labels.k"),
    ({"name": "x", "command": ["true"], "constraints": {"unique": "rack"}}, "constraints.unique"),
    ({"name": "x", "command": ["true"], "surprise": True}, "(body)"),
    ([1, 2, 3], "(body)"),
]


@pytest.mark.parametrize(("spec", "field"), BAD_SPECS, ids=[f for _, f in BAD_SPECS])
def test_invalid_task_specs_are_422_naming_the_field(agent: AgentProcess, spec: object,
                                                     field: str) -> None:
    resp = agent.api("POST", "/v1/tasks", spec)
    assert resp.status == 422, resp.body
    err = resp.body["error"]
    assert err["code"] == "invalid" and err["details"]["field"] == field
    assert err["message"].startswith(field)


def test_not_json_and_empty_bodies_are_400(agent: AgentProcess) -> None:
    for raw in (b"{not json", b"", b"\xff\xfe"):
        resp = agent.api("POST", "/v1/tasks", raw=raw)
        assert resp.status == 400 and resp.body["error"]["code"] == "bad_request"


def test_oversized_body_is_413(agent: AgentProcess) -> None:
    big = {"name": "x", "command": ["true"], "env": {"A": "x" * 300_000}}
    resp = agent.api("POST", "/v1/tasks", big)
    assert resp.status == 413 and resp.body["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=100000", "state=sleeping",
                                   "label=bad%00key=1",
                                   "label=novalue", "cursor=@@@", "cursor=bm90LWEtY3Vyc29y"])
def test_bad_list_queries_are_400(agent: AgentProcess, query: str) -> None:
    resp = agent.api("GET", f"/v1/tasks?{query}")
    assert resp.status == 400, (query, resp.body)
    assert resp.body["error"]["details"]["field"] in query


def test_unknown_things_are_json_404(agent: AgentProcess) -> None:
    for method, path in [("GET", "/v1/tasks/doesnotexist"), ("DELETE", "/v1/tasks/nope"),
                         ("GET", "/v1/tasks/nope/logs"), ("GET", "/v1/agents/nope"),
                         ("GET", "/v1/nothing-here"), ("GET", "/favicon.ico")]:
        resp = agent.api(method, path)
        assert resp.status == 404, (method, path)
        assert resp.body["error"]["code"] == "not_found"


def test_wrong_method_is_json_405(agent: AgentProcess) -> None:
    resp = agent.api("PUT", "/v1/tasks")
    assert resp.status == 405 and resp.body["error"]["code"] == "method_not_allowed"


def test_bad_log_and_event_parameters(agent: AgentProcess) -> None:
    task = agent.submit("t", ["true"])
    for q in ("stream=both", "tail=-1", "tail=x", "follow=maybe"):
        resp = agent.api("GET", f"/v1/tasks/{task['id']}/logs?{q}")
        assert resp.status == 400, q
    resp = agent.api("GET", "/v1/events", headers={"Last-Event-ID": "yesterday"})
    assert resp.status == 400


def test_every_route_but_health_needs_a_token(agent: AgentProcess) -> None:
    assert http("GET", agent.url + "/v1/health").status == 200
    for method, path in [("GET", "/v1/info"), ("GET", "/v1/tasks"), ("POST", "/v1/tasks"),
                         ("GET", "/v1/tasks/x"), ("DELETE", "/v1/tasks/x"),
                         ("GET", "/v1/agents"), ("GET", "/v1/offers"), ("GET", "/v1/events"),
                         ("GET", "/metrics"), ("POST", "/v1/agents/x/drain")]:
        resp = http(method, agent.url + path)
        assert resp.status == 401, (method, path)
        assert resp.body["error"]["code"] == "unauthorized"
        assert http(method, agent.url + path, token="wrong-token-123456").status == 401


def test_openapi_document_describes_every_route(agent: AgentProcess) -> None:
    doc = http("GET", agent.url + "/openapi.json").body
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {"/v1/health", "/v1/info", "/v1/tasks", "/v1/tasks/{id}",
                                 "/v1/tasks/{id}/logs", "/v1/agents", "/v1/agents/{id}",
                                 "/v1/agents/{id}/drain", "/v1/offers", "/v1/events",
                                 "/metrics"}
    body = doc["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["name"]["pattern"]


def test_info_agents_offers_metrics_and_drain(agent: AgentProcess) -> None:
    info = agent.api("GET", "/v1/info").body
    assert info["role"] == "edge" and info["agent_id"] and info["isolation"]
    agents = agent.api("GET", "/v1/agents").body["items"]
    assert [a["id"] for a in agents] == [info["agent_id"]]
    offer = agent.api("GET", "/v1/offers").body["items"][0]
    assert offer["cpus"] == 2 and offer["mem_mb"] == 1024
    running = agent.submit("busy", ["sleep", "30"], resources={"cpus": 0.5, "mem_mb": 100},
                           kill_timeout=1)
    agent.wait_state(running["id"], "running")
    offer = agent.api("GET", "/v1/offers").body["items"][0]
    assert offer["cpus"] == 1.5 and offer["mem_mb"] == 924
    metrics = agent.api("GET", "/metrics").raw.decode()
    assert 'outpost_tasks{state="running"} 1.0' in metrics
    drained = agent.api("POST", f"/v1/agents/{info['agent_id']}/drain")
    assert drained.status == 200 and drained.body["status"] == "draining"
    refused = agent.api("POST", "/v1/tasks", {"name": "late", "command": ["true"]})
    assert refused.status == 409
    assert agent.api("GET", "/v1/offers").body["items"] == []


def test_site_constraint_mismatch_is_409(agent: AgentProcess) -> None:
    resp = agent.api("POST", "/v1/tasks", {"name": "x", "command": ["true"],
                                           "constraints": {"site": "elsewhere"}})
    assert resp.status == 409 and "site" in resp.body["error"]["message"]


def test_edge_status_page_is_served_without_a_token(agent: AgentProcess) -> None:
    page = http("GET", agent.url + "/")
    assert page.status == 200 and b"Outpost edge agent" in page.raw
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    assert agent_id.encode() not in page.raw, "the page itself holds no data; it asks the API"
