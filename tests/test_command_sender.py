"""The hub's command sender publishes different agents' commands side by side: each agent's
still go out in the order they were queued, numbered 1, 2, 3, none lost or doubled.

Real nats-server, real JetStream streams, the hub's real SQLite store.
"""

from __future__ import annotations

import time
from pathlib import Path

from core_hub.commands import SENDING_AGENTS, Commander
from core_hub.store import HubStore
from federation import wire
from federation.commandlog import get, newest
from federation.identity import id_from_public_key
from federation.natsd import NatsServer
from federation.streams import ensure_streams
from tests.nats_fixtures import connect

HUB = wire.Signer(bytes(range(32)))


def agents(store: HubStore, n: int) -> list[str]:
    ids = []
    with store.transaction():
        for i in range(n):
            public = wire.Signer(bytes([i + 1] * 32)).public
            agent_id = id_from_public_key(public)
            store.enroll_agent(agent_id, public, name=f"edge-{i}", site="s", labels={},
                               resources={"cpus": 1}, version="", now=time.time())
            ids.append(agent_id)
    return ids


async def test_each_agents_commands_stay_in_order_while_agents_go_side_by_side(
        nats_server: NatsServer, tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.db")
    try:
        async with connect(nats_server.url) as nc:
            js = nc.jetstream(timeout=5)
            await ensure_streams(nc.jsm())
            ids = agents(store, 2 * SENDING_AGENTS + 3)
            commander = Commander(js, store, HUB)
            sent: dict[str, list[str]] = {agent: [] for agent in ids}
            for round_ in range(3):  # interleaved: agent a, b, c, ..., then a, b, c again
                for agent in ids:
                    sent[agent].append(await commander.send(agent, "drain",
                                                            {"migrate": round_ == 2}))
            assert await commander.publish_queued() == 3 * len(ids)
            assert store.command_queue_depth() == 0
            for agent in ids:
                assert (await newest(js, agent))[0] == 3
                stored = []
                for number in (1, 2, 3):
                    data = await get(js, agent, number)
                    assert data is not None
                    env = wire.open_envelope(data, lambda _a: HUB.public, expected_agent=agent,
                                             kinds=wire.COMMAND_KINDS)
                    stored.append(env.body["id"])
                assert stored == sent[agent], agent
    finally:
        store.close()
