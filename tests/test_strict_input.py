"""Input the schemas used to let through (issue 10 section 4), sent over HTTP to a real edge
and a real core: NaN/Infinity, NUL in what reaches a process, lone surrogates, deep nesting,
forged cursors, integral floats. Each gets a JSON 4xx and leaves nothing behind."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, joined, wait_until

TASK = b'{"name":"x","command":["true"]'
BAD_BODIES = {
    "nan_cpus": b'{"name":"x","command":["true"],"resources":{"cpus":NaN}}',
    "infinity_timeout": b'{"name":"x","command":["true"],"kill_timeout":Infinity}',
    "minus_infinity": b'{"name":"x","command":["true"],"restart":{"backoff":-Infinity}}',
    "huge_float": b'{"name":"x","command":["true"],"kill_timeout":1e400}',
    "nul_in_command": json.dumps({"name": "x", "command": ["tr\u0000ue"]}).encode(),
    "nul_in_env": json.dumps({"name": "x", "command": ["true"],
                              "env": {"A": "a\u0000b"}}).encode(),
    "nul_in_health": json.dumps({"name": "x", "command": ["true"],
                                 "health": {"command": ["sh", "-c", "\u0000"]}}).encode(),
    "lone_surrogate": b'{"name":"x","command":["\\ud800"]}',
    "lone_surrogate_env": b'{"name":"x","command":["true"],"env":{"A":"\\udc00"}}',
    "deep_50000": b"[" * 50_000 + b"]" * 50_000,
    "deep_in_env": b'{"name":"x","command":["true"],"env":{"A":' + b"[" * 2000
                   + b"]" * 2000 + b"}}",
    "deep_1000_in_labels": b'{"name":"x","command":["true"],"labels":{"a":' + b"[" * 1000
                           + b"]" * 1000 + b"}}",
}


def _cursor(position: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


BAD_CURSORS = [_cursor({"n": 10**30}), _cursor({"id": 10**30}), _cursor({"n": -1}),
               _cursor({"id": ["x"]}), _cursor({"n": 1, "id": "a"}), _cursor([1]),
               base64.urlsafe_b64encode(b'{"id":"\\ud800"}').decode(),
               base64.urlsafe_b64encode(b'{"n":NaN}').decode()]


@pytest.fixture(params=["edge", "core"])
def node(request: pytest.FixtureRequest,
         start_agent: Callable[..., AgentProcess]) -> Iterator[Any]:
    if request.param == "edge":
        yield start_agent("--cpus", "2", "--mem-mb", "512")
        return
    nats: NatsServer = request.getfixturevalue("nats_proc")
    hub: HubProcess = request.getfixturevalue("hub_proc")
    joined(start_agent, hub, nats, "--cpus", "2", "--mem-mb", "512")
    yield hub


def test_bodies_python_would_take_are_422_and_nothing_is_stored(node: Any) -> None:
    for name, raw in BAD_BODIES.items():
        for path in ("/v1/tasks", "/v1/services"):
            body = raw if path == "/v1/tasks" else (
                b'{"name":"svc","instances":1,"task":' + raw + b"}")
            resp = node.api("POST", path, raw=body)
            if path == "/v1/services" and resp.status == 409:
                continue  # an edge has no services
            assert resp.status == 422, (name, path, resp.status, resp.raw[:300])
            assert resp.body["error"]["code"] == "invalid", (name, resp.body)
    assert node.api("GET", "/v1/tasks").body["items"] == []
    assert "Traceback" not in node.log()


def test_plain_garbage_is_still_400(node: Any) -> None:
    for raw in (b"{not json", b"\xff\xfe", b'{"a":1'):
        resp = node.api("POST", "/v1/tasks", raw=raw)
        assert resp.status == 400 and resp.body["error"]["code"] == "bad_request", raw


def test_forged_cursors_are_400(node: Any) -> None:
    for cursor in BAD_CURSORS:
        for path in ("/v1/tasks", "/v1/agents"):
            resp = node.api("GET", f"{path}?cursor={cursor}")
            assert resp.status == 400, (path, cursor, resp.status, resp.raw[:300])
            assert resp.body["error"]["details"]["field"] == "cursor"
    assert "Traceback" not in node.log()


def test_integral_floats_become_ints(node: Any) -> None:
    resp = node.api("POST", "/v1/tasks", raw=TASK + b',"resources":{"mem_mb":32.0},'
                    b'"restart":{"max":2.0}}')
    assert resp.status == 201, resp.body
    assert type(resp.body["resources"]["mem_mb"]) is int
    assert type(resp.body["restart"]["max"]) is int


def test_a_service_of_float_instances_runs_them(start_agent: Callable[..., AgentProcess],
                                                hub_proc: HubProcess,
                                                nats_proc: NatsServer) -> None:
    """Before: ``instances: 2.0`` was stored as a float and ``range(2.0)`` failed the service
    loop on every pass, for every service."""
    joined(start_agent, hub_proc, nats_proc, "--cpus", "2", "--mem-mb", "512")
    resp = hub_proc.api("POST", "/v1/services", raw=b'{"name":"web","instances":2.0,'
                        b'"task":{"command":["sleep","60"],"kill_timeout":1}}')
    assert resp.status == 201, resp.body
    assert type(resp.body["instances"]) is int
    wait_until(lambda: hub_proc.api("GET", "/v1/services/web").body["running"] == 2,
               timeout=20, what="both instances running")
    assert "service reconcile failed" not in hub_proc.log()
