"""The core forwards live reads (logs) to the task's edge; an offline edge is a clear 503."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, converged, joined, wait_until


def test_logs_are_forwarded_while_online_and_503_while_offline(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    done = agent.submit("talker", ["sh", "-c", "echo one; echo two; echo oops >&2"])
    ticker = agent.submit("ticker", ["sh", "-c", "for i in 1 2 3; do echo t$i; sleep 0.3; done"])
    agent.wait_state(done["id"], "finished")
    converged(agent, hub_proc)
    resp = hub_proc.api("GET", f"/v1/tasks/{done['id']}/logs")
    assert resp.status == 200 and resp.raw == b"one\ntwo\n"
    assert hub_proc.api("GET", f"/v1/tasks/{done['id']}/logs?tail=1").raw == b"two\n"
    assert hub_proc.api("GET", f"/v1/tasks/{done['id']}/logs?stream=stderr").raw == b"oops\n"
    # Follow streams until the task ends, as at the edge.
    req = urllib.request.Request(f"{hub_proc.url}/v1/tasks/{ticker['id']}/logs?follow=true",
                                 headers={"Authorization": f"Bearer {hub_proc.token}"})
    with urllib.request.urlopen(req, timeout=15) as stream:
        assert stream.read() == b"t1\nt2\nt3\n"
    missing = hub_proc.api("GET", "/v1/tasks/nope/logs")
    assert missing.status == 404
    agent.kill()
    offline = hub_proc.api("GET", f"/v1/tasks/{done['id']}/logs")
    assert offline.status == 503 and "offline" in offline.body["error"]["message"]
    agent.start()
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{done['id']}/logs").status == 200,
               timeout=15, what="logs readable again once the edge is back")
