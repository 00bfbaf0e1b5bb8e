"""Edge to core over a real nats-server: a real agent process enrolls, its events reach the
hub's view exactly once, and a NATS outage loses nothing (DESIGN guarantees 1 and 2)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from core_hub.enroll import Enroller, JoinTokens, load_hub_signer
from core_hub.ingest import Ingest
from core_hub.store import HubStore
from federation.natsd import NatsServer
from federation.streams import ensure_streams
from tests.helpers import AgentProcess


class Hub:
    """The hub's ingest side, in this test's event loop."""

    def __init__(self, nc: Any, store: HubStore, enroller: Enroller, ingest: Ingest,
                 token: str) -> None:
        self.nc, self.store, self.enroller, self.ingest, self.token = (nc, store, enroller,
                                                                        ingest, token)


@pytest.fixture
async def hub(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Hub]:
    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    js = nc.jetstream()
    await ensure_streams(js)
    store = HubStore(tmp_path / "hub.db")
    tokens = JoinTokens(store)
    signer = load_hub_signer(tmp_path / "hub")
    enroller = Enroller(nc, store, tokens, signer.public)
    await enroller.start()
    ingest = Ingest(js, store, fetch_timeout_s=0.5)
    await ingest.start()
    try:
        yield Hub(nc, store, enroller, ingest, tokens.create_token(600, 5))
    finally:
        await ingest.stop()
        await enroller.stop()
        await nc.close()
        store.close()


async def edge_view(agent: AgentProcess) -> dict[str, str]:
    page = await asyncio.to_thread(agent.api, "GET", "/v1/tasks?limit=1000")
    return {t["id"]: t["state"] for t in page.body["items"]}


def hub_view(hub: Hub, agent_id: str) -> dict[str, str]:
    return {t["id"]: t["state"] for t in hub.store.list_tasks(agent_id=agent_id)}


async def until(cond: Callable[[], Any], within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


async def test_events_reach_the_hub_once_across_a_nats_outage(
        hub: Hub, nats_server: NatsServer, start_agent: Callable[..., AgentProcess]) -> None:
    agent = await asyncio.to_thread(start_agent, "--nats", nats_server.url, "--join-token",
                                    hub.token, "--cpus", "4", "--mem-mb", "2048")
    info = (await asyncio.to_thread(agent.api, "GET", "/v1/info")).body
    agent_id = info["agent_id"]
    for i in range(5):
        await asyncio.to_thread(agent.submit, f"before{i}", ["sh", "-c", f"exit {i % 2}"])

    async def same() -> bool:
        edge = await edge_view(agent)
        return bool(edge) and hub_view(hub, agent_id) == edge and all(
            s in ("finished", "failed") for s in edge.values())

    await until(same)
    assert hub.store.get_agent(agent_id)["name"] == "agent"

    # The link goes down: the edge keeps accepting and running tasks on its own.
    await nats_server.stop()
    ids = []
    for i in range(5):
        task = await asyncio.to_thread(agent.submit, f"during{i}", ["true"])
        ids.append(task["id"])
    for task_id in ids:
        await asyncio.to_thread(agent.wait_state, task_id, "finished")
    link = (await asyncio.to_thread(agent.api, "GET", "/v1/info")).body["link"]
    assert link["outbox_depth"] > 0, "events wait in the outbox while NATS is down"

    await nats_server.start()
    await until(same, within=30)
    edge_last = (await asyncio.to_thread(agent.api, "GET", "/v1/info")).body["link"]
    await until(lambda: _true((asyncio.to_thread(agent.api, "GET", "/v1/info")),
                              lambda r: r.body["link"]["outbox_depth"] == 0))
    applied = hub.store.agent_key(agent_id).applied_seq
    assert applied >= edge_last["acked_seq"]
    assert hub.ingest.stats.rejected == {} or sum(hub.ingest.stats.rejected.values()) == 0


async def _true(fut: Any, pred: Callable[[Any], bool]) -> bool:
    return pred(await fut)
