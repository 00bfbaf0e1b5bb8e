"""Agent NATS credentials that expire and are renewed, against a real hub with its embedded,
least-privilege nats-server and real agent processes.

Agent user JWTs expire (``--agent-jwt-ttl``) so that revoked keys can leave the account's
revocation list (tests/test_natsjwt.py). An agent renews its JWT at half its life and
reconnects with it; a revoked agent gets no new JWT. An agent that could not renew in time
(offline, or a clock behind) is in tests/test_jwt_outage.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from federation import natsjwt
from tests.helpers import AgentProcess, HubProcess, agent_nats_creds, joined, wait_until
from tests.test_nats_auth import agent_nkeys

TTL_S = 10


@pytest.fixture
def short_jwt_hub(tmp_path: Path) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path / "hub", "", ["--disconnected-after", "2.5",
                                            "--unreachable-after", "4",
                                            "--agent-jwt-ttl", str(TTL_S)],
                     embedded=True).start()
    try:
        yield hub
    finally:
        hub.stop()


def _jwt_claims(agent: AgentProcess, agent_id: str) -> dict[str, object]:
    jwt = agent_nats_creds(agent.data_dir, agent_id).jwt
    assert jwt, "the agent keeps the JWT the hub issued"
    return natsjwt.decode(jwt, kind=natsjwt.USER)


def _online(hub: HubProcess, agent_id: str) -> bool:
    return hub.api("GET", f"/v1/agents/{agent_id}").body.get("status") == "online"


def test_a_running_agent_renews_its_jwt_and_keeps_working_past_its_first_one(
        start_agent: Callable[..., AgentProcess], short_jwt_hub: HubProcess) -> None:
    hub = short_jwt_hub
    agent = joined(start_agent, hub, type("N", (), {"url": hub.nats_url}), name="a")
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    first = _jwt_claims(agent, agent_id)
    assert first["exp"] == first["iat"] + TTL_S  # type: ignore[operator]
    seen = {first["jti"]}

    def renewed_past_the_first() -> bool:
        seen.add(_jwt_claims(agent, agent_id)["jti"])
        return len(seen) >= 3 and time.time() > float(first["exp"]) + 2  # type: ignore[arg-type]

    wait_until(renewed_past_the_first, timeout=4 * TTL_S, interval=0.2,
               what="two renewals, and the first JWT expired")
    wait_until(lambda: _online(hub, agent_id), timeout=10, what="the agent online")
    link = agent.api("GET", "/v1/info").body["link"]
    assert link["credentials_expire_at"] > time.time()
    metrics = agent.api("GET", "/metrics").raw.decode()
    assert "outpost_link_credentials_expiry_timestamp_seconds" in metrics
    hub_metrics = hub.api("GET", "/metrics").raw.decode()
    assert "outpost_nats_account_revocations 0" in hub_metrics, hub_metrics[-2000:]
    assert "outpost_nats_account_jwt_bytes" in hub_metrics
    assert len(agent_nkeys(hub, agent_id)) == 1, "one connection, the renewed one"
    # Work placed from the core still reaches it, and its report comes back.
    placed = hub.api("POST", "/v1/tasks", {"name": "late", "command": ["true"],
                                           "constraints": {"agent": agent_id}})
    assert placed.status == 201, placed.body
    wait_until(lambda: hub.api("GET", f"/v1/tasks/{placed.body['id']}").body["state"]
               == "finished", timeout=20, what="a task placed after the renewals, done")
    assert "NATS credentials renewed" in agent.log()


def test_a_revoked_agent_gets_no_new_jwt(start_agent: Callable[..., AgentProcess],
                                         short_jwt_hub: HubProcess) -> None:
    hub = short_jwt_hub
    agent = joined(start_agent, hub, type("N", (), {"url": hub.nats_url}), name="a")
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    assert hub.api("POST", f"/v1/agents/{agent_id}/revoke").status == 200
    wait_until(lambda: "renewal refused by the core" in agent.log(), timeout=3 * TTL_S,
               interval=0.2, what="the agent's renewal refused")
    assert "is revoked" in agent.log()
    assert agent_nkeys(hub, agent_id) == []
    claims = _jwt_claims(agent, agent_id)
    assert float(claims["exp"]) < time.time() + 1, "it still holds only the old one"  # type: ignore[arg-type]


def test_a_jwt_without_an_expiry_or_that_does_not_decode_is_never_renewed() -> None:
    from edge_agent.jwtrenewal import JwtLifetime, jwt_account

    account, user = natsjwt.new_seed("account"), natsjwt.new_seed("user")
    forever = natsjwt.user_jwt(account, natsjwt.public_of(user), "a", None, now=1000)
    assert JwtLifetime.of(forever) is None and JwtLifetime.of("not.a.jwt") is None
    assert JwtLifetime.of(None) is None and jwt_account("garbage") is None
    dated = natsjwt.user_jwt(account, natsjwt.public_of(user), "a", None, now=1000,
                             expires=1000 + 7 * 86400)
    life = JwtLifetime.of(dated)
    assert life is not None and life.renew_at == 1000 + 3.5 * 86400
    assert not life.expired(1000 + 7 * 86400 - 61) and life.expired(1000 + 7 * 86400 - 60)
    short = JwtLifetime.of(natsjwt.user_jwt(account, natsjwt.public_of(user), "a", None,
                                            now=1000, expires=1010))
    assert short is not None and short.expired(1009.5) and not short.expired(1009.4)
    assert jwt_account(dated) == natsjwt.public_of(account)


def test_an_enrolled_agent_renews_while_the_public_enroll_subject_is_flooded(
        tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    """The public enroll login may flood the enrollment subject, and the hub then sheds it
    and stops listening there (tests/test_trust_boundary.py). An enrolled agent renews its
    JWT, and rotates its key, on a subject of its own that only it may publish to, so a
    flood that outlasts its JWT does not cut it off."""
    import asyncio
    import os
    import threading

    from federation import subjects, wire
    from federation.identity import id_from_public_key
    from tests.helpers import enroll_nats_creds
    from tests.test_nats_auth import client

    hub = HubProcess(tmp_path / "hub", "", ["--disconnected-after", "2.5",
                                            "--unreachable-after", "4",
                                            "--agent-jwt-ttl", str(TTL_S),
                                            "--enroll-rate", "5", "--enroll-burst", "5"],
                     embedded=True).start()
    stop = threading.Event()
    try:
        agent = joined(start_agent, hub, type("N", (), {"url": hub.nats_url}), name="a")
        agent_id = agent.api("GET", "/v1/info").body["agent_id"]
        first = _jwt_claims(agent, agent_id)
        account = hub.join_token().split(".", 1)[1]
        signer = wire.Signer(os.urandom(32))
        bogus = wire.enroll_request(signer, f"opj_{'x' * 43}.{account}", name="n", site="s")
        reply = f"_INBOX.{id_from_public_key(signer.public)}.x"

        async def flood() -> None:
            async with client(hub.nats_url, enroll_nats_creds(hub.data_dir)) as me:
                while not stop.is_set():
                    for _ in range(200):
                        await me.nc.publish(subjects.ENROLL, bogus, reply=reply)
                    await me.nc.flush()
                    await asyncio.sleep(0.01)

        flooder = threading.Thread(target=lambda: asyncio.run(flood()), daemon=True)
        flooder.start()
        wait_until(lambda: "enrollment requests paused" in hub.log(), 15,
                   what="the hub pausing the flooded subject")
        wait_until(lambda: time.time() > float(first["exp"]) + 3  # type: ignore[arg-type]
                   and _jwt_claims(agent, agent_id)["jti"] != first["jti"],
                   timeout=3 * TTL_S, interval=0.2,
                   what="a renewed JWT, past the first one's expiry, during the flood")
        wait_until(lambda: _online(hub, agent_id), timeout=10, what="the agent online")
        assert "enrollment requests paused" in hub.log()
        task = agent.submit("during-the-flood", ["true"])
        agent.wait_state(task["id"], "finished")
        wait_until(lambda: hub.api("GET", f"/v1/tasks/{task['id']}").body.get("state")
                   == "finished", timeout=20, what="its report at the hub")
    finally:
        stop.set()
        hub.stop()
