"""Agent NATS credentials that expire and are renewed, against a real hub with its embedded,
least-privilege nats-server and real agent processes.

Agent user JWTs expire (``--agent-jwt-ttl``) so that revoked keys can leave the account's
revocation list (tests/test_natsjwt.py). An agent renews its JWT at half its life and
reconnects with it; one offline for longer than its JWT lived comes back through the public
enroll login, with no join token; a revoked agent gets no new JWT.
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
    assert len(agent_nkeys(hub, agent_id)) == 1, "one connection, the renewed one"
    # Work placed from the core still reaches it, and its report comes back.
    placed = hub.api("POST", "/v1/tasks", {"name": "late", "command": ["true"],
                                           "constraints": {"agent": agent_id}})
    assert placed.status == 201, placed.body
    wait_until(lambda: hub.api("GET", f"/v1/tasks/{placed.body['id']}").body["state"]
               == "finished", timeout=20, what="a task placed after the renewals, done")
    assert "NATS credentials renewed" in agent.log()


def test_an_agent_offline_past_its_jwt_comes_back_through_the_enroll_login(
        start_agent: Callable[..., AgentProcess], short_jwt_hub: HubProcess) -> None:
    hub = short_jwt_hub
    agent = joined(start_agent, hub, type("N", (), {"url": hub.nats_url}), name="a")
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    agent.stop()
    old = _jwt_claims(agent, agent_id)
    wait_until(lambda: time.time() > float(old["exp"]) + 1, timeout=2 * TTL_S,  # type: ignore[arg-type]
               interval=0.2, what="its JWT expired while it was down")
    # Restarted without a join token: nothing but its key and its expired JWT.
    back = start_agent("--nats", hub.nats_url, "--heartbeat", "0.5", name="a")
    job = back.submit("after-the-break", ["true"])
    wait_until(lambda: hub.api("GET", f"/v1/tasks/{job['id']}").status == 200
               and hub.api("GET", f"/v1/tasks/{job['id']}").body["state"] == "finished",
               timeout=30, what="its work reported at the core")
    new = _jwt_claims(back, agent_id)
    assert float(new["exp"]) > time.time()  # type: ignore[arg-type]
    assert new["jti"] != old["jti"]
    assert "renewing them through the enroll login" in back.log()
    assert "NATS credentials renewed" in back.log()


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


def test_an_agent_whose_clock_is_behind_renews_when_the_server_refuses_its_jwt(
        start_agent: Callable[..., AgentProcess], short_jwt_hub: HubProcess) -> None:
    """A box with no RTC runs behind until NTP: by its clock the JWT is valid, by the
    server's it has expired. nats-py would retry the refused JWT for ever; the agent renews
    through the enroll login instead, live and after a restart."""
    hub = short_jwt_hub
    behind = {"OUTPOST_FAULT_CLOCK_BEHIND_S": str(3 * TTL_S)}
    agent = joined(start_agent, hub, type("N", (), {"url": hub.nats_url}), name="a",
                   env=behind)
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    first = _jwt_claims(agent, agent_id)
    # Live: the server closes the link when the JWT expires, and refuses it after; the
    # agent renews then, long before its own clock would say the JWT has expired.
    wait_until(lambda: _jwt_claims(agent, agent_id)["jti"] != first["jti"]
               and _online(hub, agent_id), timeout=4 * TTL_S, interval=0.2,
               what="a new JWT through the enroll login, and the agent online again")
    second = _jwt_claims(agent, agent_id)
    by_its_clock = float(first["exp"]) + 3 * TTL_S  # type: ignore[arg-type]
    assert float(second["iat"]) < by_its_clock - TTL_S, (first, second)  # type: ignore[arg-type]
    assert "NATS refused this agent's login" in agent.log()
    # Restarted while its JWT is expired by the server's clock only.
    agent.stop()
    held = _jwt_claims(agent, agent_id)
    wait_until(lambda: time.time() > float(held["exp"]) + 1, timeout=2 * TTL_S,  # type: ignore[arg-type]
               interval=0.2, what="the JWT expired by the server's clock")
    back = start_agent("--nats", hub.nats_url, "--heartbeat", "0.5", name="a", env=behind)
    job = back.submit("behind", ["true"])
    wait_until(lambda: hub.api("GET", f"/v1/tasks/{job['id']}").status == 200
               and hub.api("GET", f"/v1/tasks/{job['id']}").body["state"] == "finished",
               timeout=30, what="its work reported at the core")
