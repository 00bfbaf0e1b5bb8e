"""A response that has started can only be ended: an error mid-stream closes the connection
(the client sees a cut body, never a clean end and never a second HTTP response in the body).

The fault is real: the edge that owns a task is gone and a peer on its rpc subject answers a
forwarded log read badly (the hub must not trust what comes back over the bus).
"""

from __future__ import annotations

import asyncio
import http.client
import urllib.parse
from collections.abc import Callable
from typing import Any

import nats

from federation import subjects, wire
from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, joined, wait_until


def read_logs(hub: HubProcess, task_id: str) -> tuple[int, bytes, bool]:
    """(status, body read, whether the body ended cleanly) of one logs read at the hub."""
    url = urllib.parse.urlsplit(hub.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
    try:
        conn.request("GET", f"/v1/tasks/{task_id}/logs?tail=10",
                     headers={"Authorization": f"Bearer {hub.token}"})
        resp = conn.getresponse()
        try:
            return resp.status, resp.read(), True
        except http.client.IncompleteRead as cut:
            return resp.status, cut.partial, False
    finally:
        conn.close()


async def test_a_bad_answer_mid_log_cuts_the_stream(start_agent: Callable[..., AgentProcess],
                                                    hub_proc: HubProcess,
                                                    nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    task = agent.submit("talker", ["sh", "-c", "echo hi; sleep 300"], kill_timeout=1)
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{task['id']}").status == 200,
               timeout=20, what="the task at the core")
    agent.kill()  # its responder is gone; a peer on the bus answers in its place
    bad_answers: list[Any] = [wire.pack({"data": "text, not bytes"}), b"\xc1 not msgpack"]

    async def answer(msg: Any) -> None:
        await nc.publish(msg.reply, wire.pack({"data": b"line one\n"}))
        await nc.publish(msg.reply, bad_answers.pop(0))

    nc = await nats.connect(nats_proc.url)
    try:
        await nc.subscribe(subjects.rpc(agent_id, "logs"), cb=answer)
        await nc.flush()
        for _ in range(2):
            status, body, clean = await asyncio.to_thread(read_logs, hub_proc, task["id"])
            assert status == 200
            assert body == b"line one\n", body  # what came before the fault, then nothing
            assert not clean, "a cut stream must not look complete"
    finally:
        await nc.close()


def test_an_event_feed_that_cannot_open_answers_before_it_starts(hub_proc: HubProcess) -> None:
    """An ``after`` JetStream refuses (past any stream sequence) fails while the consumer is
    made, before the stream's headers: one JSON error, not an error inside a 200 stream."""
    resp = hub_proc.api("GET", "/v1/events?after=" + "9" * 30, timeout=15)
    assert 400 <= resp.status < 600 and resp.status != 500, resp.raw
    assert resp.body["error"]["code"], resp.raw
