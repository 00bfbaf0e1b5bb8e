"""Enrollment over real NATS request/reply into a real hub store: who gets in, who does not, why.

Join tokens are created, used up, expired (by an injected clock) and revoked; requests carry a
real Ed25519 proof of key possession; the hub store is reopened to show the registry persists.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from core_hub.enroll import Enroller, JoinTokens, load_hub_signer, token_digest
from core_hub.store import HubStore
from federation import subjects, wire
from federation.errors import Invalid, NotFound, Unauthorized
from federation.identity import id_from_public_key
from federation.natscreds import ENROLL_INBOX_PREFIX
from federation.natsd import NatsServer
from federation.wire import Signer
from tests.nats_fixtures import connect

EDGE = Signer(bytes(range(32)))
OTHER = Signer(bytes(range(1, 33)))


class Clock:
    """Unix time the test moves by hand, so expiry needs no waiting."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def hub(url: str, data: Path, clock: Clock) -> AsyncIterator[
        tuple[Callable[[bytes], Any], HubStore, JoinTokens, Signer]]:
    """A store, tokens and an Enroller answering on NATS; yields an ``ask(request)``."""
    store = HubStore(data / "hub.db")
    tokens = JoinTokens(store, clock=clock)
    hub_key = load_hub_signer(data)
    try:
        # The edge asks from the enroll user's inbox space: the hub answers nowhere else.
        async with connect(url) as nc, connect(url, inbox_prefix=ENROLL_INBOX_PREFIX) as edge:
            enroller = Enroller(nc, store, tokens, hub_key.public, clock=clock)
            await enroller.start()
            try:
                await nc.flush()

                async def ask(request: bytes) -> dict[str, Any]:
                    reply = await edge.request(subjects.ENROLL, request, timeout=2)
                    answer: dict[str, Any] = msgpack.unpackb(reply.data)
                    return answer

                yield ask, store, tokens, hub_key
            finally:
                await enroller.stop()
    finally:
        store.close()


def request(token: str, signer: Signer = EDGE, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {"name": "edge-1", "site": "plant-a", "labels": {"zone": "north"},
                              "resources": {"cpus": 2, "mem_mb": 1024}, "version": "0.1.0"}
    fields.update(overrides)
    return wire.enroll_request(signer, token, **fields)


def refused(reply: dict[str, Any], code: str, words: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["code"] == code and words in reply["error"], reply


async def test_enroll_round_trip(nats_server: NatsServer, tmp_path: Path) -> None:
    async with hub(nats_server.url, tmp_path, Clock()) as (ask, store, tokens, hub_key):
        token = tokens.create_token(ttl_s=600, uses=1)
        reply = await ask(request(token))
        assert reply == {"ok": True, "agent_id": id_from_public_key(EDGE.public),
                         "hub_public_key": hub_key.public}
        agent = store.get_agent(reply["agent_id"])
        assert agent["public_key"] == EDGE.public.hex()
        assert (agent["name"], agent["site"], agent["labels"], agent["resources"],
                agent["version"], agent["applied_seq"], agent["revoked"]) == (
                    "edge-1", "plant-a", {"zone": "north"}, {"cpus": 2, "mem_mb": 1024},
                    "0.1.0", 0, False)
        assert [t["state"] for t in tokens.list_tokens()] == ["used-up"]
    # Only the digest was stored, never the token.
    with sqlite3.connect(tmp_path / "hub.db") as db:
        dump = "\n".join(db.iterdump())
    assert token not in dump and token_digest(token) in dump


async def test_bad_tokens_are_refused_with_reasons(nats_server: NatsServer,
                                                   tmp_path: Path) -> None:
    clock = Clock()
    async with hub(nats_server.url, tmp_path, clock) as (ask, store, tokens, _):
        refused(await ask(request("opj_nobody-made-this")), "unauthorized",
                "unknown join token")

        expiring = tokens.create_token(ttl_s=60, uses=None)
        clock.now += 61
        refused(await ask(request(expiring)), "unauthorized", "expired")

        once = tokens.create_token(ttl_s=60, uses=1)
        assert (await ask(request(once, OTHER, name="edge-2")))["ok"] is True
        refused(await ask(request(once)), "unauthorized", "used up")

        revoked = tokens.create_token(ttl_s=60, uses=5)
        digest = tokens.revoke_token(token_digest(revoked)[:10])  # a digest prefix
        assert digest == token_digest(revoked)
        refused(await ask(request(revoked)), "unauthorized", "revoked")

        states = {t["digest"]: t["state"] for t in tokens.list_tokens()}
        assert states == {token_digest(expiring): "expired", token_digest(once): "used-up",
                          token_digest(revoked): "revoked"}
        assert [a["id"] for a in store.list_agents()] == [id_from_public_key(OTHER.public)]

        with pytest.raises(Unauthorized, match="used up"):
            tokens.consume_token(once)
        with pytest.raises(NotFound):
            tokens.revoke_token("0000000000")
        with pytest.raises(Invalid):
            tokens.create_token(ttl_s=60, uses=0)


async def test_proof_of_key_possession_is_required(nats_server: NatsServer,
                                                   tmp_path: Path) -> None:
    async with hub(nats_server.url, tmp_path, Clock()) as (ask, store, tokens, _):
        token = tokens.create_token(ttl_s=600, uses=None)
        # Someone holding OTHER's private key claims EDGE's public key.
        forged = msgpack.unpackb(request(token, OTHER))
        forged["public_key"] = EDGE.public
        refused(await ask(msgpack.packb(forged)), "unauthorized", "proof of key possession")
        # Any change to a signed field breaks the proof.
        tampered = msgpack.unpackb(request(token))
        tampered["site"] = "plant-b"
        refused(await ask(msgpack.packb(tampered)), "unauthorized", "proof of key possession")
        unsigned = msgpack.unpackb(request(token))
        del unsigned["sig"]
        refused(await ask(msgpack.packb(unsigned)), "invalid", "missing ['sig']")
        refused(await ask(b"\xc1 not msgpack"), "invalid", "not msgpack")
        refused(await ask(request(token, site="Bad Site!")), "invalid", "site")
        assert store.list_agents() == []
        assert tokens.list_tokens()[0]["uses_left"] is None


async def test_reenroll_is_idempotent_and_survives_a_reopen(nats_server: NatsServer,
                                                            tmp_path: Path) -> None:
    clock = Clock()
    async with hub(nats_server.url, tmp_path, clock) as (ask, store, tokens, hub_key):
        token = tokens.create_token(ttl_s=60, uses=1)
        first = await ask(request(token))
        # The reply was "lost": the edge asks again with its spent single-use token.
        again = await ask(request(token, version="0.1.1"))
        assert again == first
        assert len(store.list_agents()) == 1
        assert store.get_agent(first["agent_id"])["version"] == "0.1.1"
        assert tokens.list_tokens()[0]["uses_left"] == 0
        first_hub_key = hub_key.public

    clock.now += 3600  # the token has expired too by now
    async with hub(nats_server.url, tmp_path, clock) as (ask, store, tokens, hub_key):
        assert hub_key.public == first_hub_key  # the hub key persisted as well
        assert [a["id"] for a in store.list_agents()] == [first["agent_id"]]
        assert await ask(request(token)) == first
        refused(await ask(request(token, OTHER)), "unauthorized", "expired")

        store.revoke_agent(first["agent_id"])
        fresh = tokens.create_token(ttl_s=60, uses=1)
        refused(await ask(request(fresh)), "forbidden", "revoked")
        assert tokens.list_tokens()[-1]["uses_left"] == 1


FULL_SCAN = re.compile(r"^SCAN (agents|retired_agent_keys|a)\b")


def scans_of(db_path: Path, statements: list[str]) -> list[tuple[str, str]]:
    """(statement, plan step) for each step of the statements' query plans that reads a
    whole agents table (another connection to the same file asks SQLite)."""
    found = []
    with sqlite3.connect(db_path) as db:
        for sql in statements:
            if not re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", sql, re.I):
                continue  # BEGIN, COMMIT, SAVEPOINT, trigger markers
            for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"):
                if FULL_SCAN.match(row[3]):
                    found.append((sql, row[3]))
    return found


async def test_an_enrollment_reads_no_whole_agents_table(nats_server: NatsServer,
                                                         tmp_path: Path) -> None:
    """The hub's CPU per enrollment grew with the fleet (1.9 ms over the first 1,000 agents,
    11.4 ms over the last 1,000 of 10,000): the key was looked for in every agent's retired
    keys and the name in every agent. Both go through indexes now."""
    async with hub(nats_server.url, tmp_path, Clock()) as (ask, store, tokens, _):
        token = tokens.create_token(ttl_s=600, uses=None)
        for i in range(20):
            assert (await ask(request(token, Signer(bytes([i + 2] * 32)),
                                      name=f"edge-{i}")))["ok"] is True
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        reply = await ask(request(token, name="edge-new"))
        store._db.set_trace_callback(None)
        assert reply["ok"] is True
        assert scans_of(tmp_path / "hub.db", statements) == []
        # A key an agent rotated away from still belongs to it, ever (the triggers keep the
        # table of retired keys; a restore from the registry rewrites it).
        first, rotated_to = Signer(bytes([2] * 32)), Signer(bytes([99] * 32))
        owner = id_from_public_key(first.public)
        store.rotate_agent_key(owner, first.public, rotated_to.public, until=0, now=1.0)
        assert store.agent_with_key(first.public) == owner
        assert store.agent_with_key(rotated_to.public) == owner
        refused(await ask(request(token, rotated_to, name="edge-thief")), "forbidden",
                f"this key belongs to agent {owner}")
        store.restore_agent_keys(owner, rotated_to.public, [])
        assert store.agent_with_key(first.public) is None
        with store.transaction():
            store._db.execute("DELETE FROM agents WHERE id = ?", (owner,))
        assert store.agent_with_key(rotated_to.public) is None


async def test_a_renewal_is_answered_only_for_the_agents_own_current_key(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """``op: renew`` (a fresh NATS user JWT, core_hub/renewal.py) from the public enroll
    login: it proves the agent's current key, or it gets nothing."""
    async with hub(nats_server.url, tmp_path, Clock()) as (ask, store, tokens, hub_key):
        agent_id = (await ask(request(tokens.create_token(ttl_s=60))))["agent_id"]
        assert await ask(wire.renew_request(EDGE, agent_id)) == {
            "ok": True, "agent_id": agent_id, "hub_public_key": hub_key.public}
        # Another key claiming the agent, or the agent's key with another's signature.
        refused(await ask(wire.renew_request(OTHER, agent_id)), "forbidden",
                "not agent")
        forged = wire.unpack(wire.renew_request(OTHER, agent_id))
        forged["public_key"] = EDGE.public
        refused(await ask(wire.pack(forged)), "unauthorized", "renewal proof failed")
        refused(await ask(wire.pack({**forged, "extra": 1})), "invalid", "fields")
        refused(await ask(wire.renew_request(OTHER, id_from_public_key(OTHER.public))),
                "not_found", "not enrolled")
        # Revoked: no JWT any more, whatever it signs.
        store.revoke_agent(agent_id, now=1.0)
        refused(await ask(wire.renew_request(EDGE, agent_id)), "forbidden", "revoked")
