"""The core past 1,000 agents: enrollment 1,001 works, every agent gets its commands, a failed
enrollment leaves no ghost agent, and the embedded nats-server still stops cleanly.

A real hub with its embedded NATS and least privilege. The first 1,000 agents are written into
the hub's view before it starts (the rows enrollment writes; enrolling them one by one through
the hub would add about 25 s to the suite, docs/scaling.md); the agents past 1,000 enroll
through the real responder. Each agent then reads its own commands as a raw
nats-py client with its own credentials, through the agent's real reader
(``federation.commandlog.CommandReader``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nacl.signing import SigningKey

from core_hub.enroll import load_hub_signer
from core_hub.store import HubStore
from federation import subjects, wire
from federation.commandlog import CommandReader
from federation.identity import id_from_public_key
from federation.natscreds import enroll_credentials, token_account
from federation.natsd import NatsServer
from tests.helpers import HubProcess, hub_nats_creds, issued_agent_creds, wait_until

PRE_ENROLLED = 1000
ENROLLED_LIVE = 5


def new_key() -> tuple[bytes, bytes, str]:
    key = SigningKey.generate()
    public = bytes(key.verify_key)
    return bytes(key), public, id_from_public_key(public)


async def enroll(url: str, token: str, seed: bytes, name: str) -> dict[str, object]:
    """One enrollment request, as edge_agent/sync.py sends it."""
    nc = await nats.connect(url, allow_reconnect=False,
                            **enroll_credentials(token_account(token)).connect_options())
    try:
        request = wire.enroll_request(wire.Signer(seed), token, name=name, site="bulk",
                                      resources={"cpus": 1, "mem_mb": 256})
        reply = await nc.request(subjects.ENROLL, request, timeout=30)
        answer: dict[str, object] = wire.unpack(reply.data)
        return answer
    finally:
        await nc.close()


async def read_commands(url: str, seed: bytes, agent_id: str, hub_key: bytes,
                        hub_data_dir: Path) -> list[str]:
    """The kinds of the agent's commands, read with its own credentials by its real reader."""
    got: list[str] = []

    async def apply(_number: int, data: bytes) -> None:
        env = wire.open_envelope(data, lambda a: hub_key if a == agent_id else None,
                                 expected_agent=agent_id, kinds=wire.COMMAND_KINDS)
        got.append(env.kind)

    nc = await nats.connect(url, allow_reconnect=False,
                            **issued_agent_creds(hub_data_dir, seed, agent_id)
                            .connect_options())
    try:
        await CommandReader(nc, nc.jetstream(timeout=10), agent_id, 0, apply,
                            lambda _d: False).catch_up()
    finally:
        await nc.close()
    return got


@pytest.fixture
def big_hub(tmp_path: Path) -> Iterator[tuple[HubProcess, dict[str, bytes]]]:
    data_dir = tmp_path / "hub"
    data_dir.mkdir()
    seeds: dict[str, bytes] = {}
    store = HubStore(data_dir / "hub.db")
    try:
        with store.transaction():
            for i in range(PRE_ENROLLED):
                seed, public, agent_id = new_key()
                seeds[agent_id] = seed
                store.enroll_agent(agent_id, public, name=f"bulk-{i}", site="bulk",
                                   labels={}, resources={"cpus": 1, "mem_mb": 256},
                                   version="", now=time.time())
    finally:
        store.close()
    hub = HubProcess(data_dir, "", embedded=True).start(timeout=60)
    try:
        yield hub, seeds
    finally:
        hub.stop()


def test_more_than_1000_agents_enroll_and_each_gets_its_commands(
        big_hub: tuple[HubProcess, dict[str, bytes]]) -> None:
    hub, seeds = big_hub
    token = hub.join_token(uses=ENROLLED_LIVE)
    for i in range(ENROLLED_LIVE):  # enrollments 1,001 and on, through the hub's responder
        seed, _public, agent_id = new_key()
        answer = asyncio.run(enroll(hub.nats_url, token, seed, f"live-{i}"))
        assert answer.get("ok") is True, answer
        seeds[agent_id] = seed
    listed, cursor = [], ""
    while cursor is not None:
        page = hub.api("GET", f"/v1/agents?limit=1000&cursor={cursor}").body
        listed += page["items"]
        cursor = page["next_cursor"]
    assert sorted(a["id"] for a in listed) == sorted(seeds)
    # The hub sends every agent a command (drain), through its real Commander.
    for agent_id in seeds:
        assert hub.api("POST", f"/v1/agents/{agent_id}/drain").status in (200, 202)
    hub_key = load_hub_signer(hub.data_dir).public

    async def everyone() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        ids = list(seeds)
        for start in range(0, len(ids), 50):
            batch = ids[start:start + 50]
            kinds = await asyncio.gather(*(read_commands(hub.nats_url, seeds[a], a, hub_key,
                                                         hub.data_dir)
                                           for a in batch))
            out.update(zip(batch, kinds, strict=True))
        return out

    got = asyncio.run(everyone())
    assert {a: k for a, k in got.items() if k != ["drain"]} == {}
    # No durable consumer per agent was made: the server keeps nothing per agent.

    async def consumers() -> int:
        nc = await nats.connect(hub.nats_url,
                                **hub_nats_creds(hub.data_dir).connect_options())
        try:
            return len(await nc.jetstream().consumers_info(subjects.COMMANDS_STREAM))
        finally:
            await nc.close()

    assert asyncio.run(consumers()) == 0
    # The embedded server stops on SIGTERM, cleanly (JetStream flushed), not SIGKILLed.
    hub.stop()
    nats_log = (hub.data_dir / "nats" / "nats-server.log").read_text()
    assert nats_log.rstrip().endswith("Server Exiting.."), nats_log[-2000:]
    assert "ignored SIGTERM" not in hub.log()


def test_an_enrollment_whose_nats_setup_fails_leaves_nothing_behind(
        tmp_path: Path, nats_proc: NatsServer) -> None:
    # A NATS without least privilege, so the test may delete the registry's bucket (under
    # least privilege nobody at run time can: test_trust_boundary).
    hub = HubProcess(tmp_path / "hub", nats_proc.url).start()
    try:
        async def registry_bucket(delete: bool) -> None:
            nc = await nats.connect(hub.nats_url)
            try:
                js = nc.jetstream(timeout=5)
                if delete:
                    await js.delete_key_value("OUTPOST_AGENTS")
                else:
                    from nats.js.api import KeyValueConfig

                    await js.create_key_value(KeyValueConfig(bucket="OUTPOST_AGENTS",
                                                             history=1))
            finally:
                await nc.close()

        token = hub.join_token(uses=1)
        seed, _public, agent_id = new_key()
        asyncio.run(registry_bucket(delete=True))  # the hub cannot record an enrollment now
        answer = asyncio.run(enroll(hub.nats_url, token, seed, "ghost"))
        assert answer.get("ok") is False and answer.get("code") == "unavailable", answer
        assert hub.api("GET", "/v1/agents").body["items"] == []
        assert hub.api("GET", f"/v1/agents/{agent_id}").status == 404
        # The token kept its one use: once the hub can record it, the same edge enrolls.
        asyncio.run(registry_bucket(delete=False))
        answer = wait_until(lambda: (a := asyncio.run(enroll(hub.nats_url, token, seed,
                                                              "ghost"))).get("ok") and a,
                            timeout=20, what="enrollment after the bucket is back")
        assert answer["agent_id"] == agent_id
        assert [a["id"] for a in hub.api("GET", "/v1/agents").body["items"]] == [agent_id]
    finally:
        hub.stop()
