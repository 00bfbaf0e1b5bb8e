"""Agents whose NATS credentials expire while they cannot renew them: offline for longer than
the JWT lives, or with a clock behind the server's (real hub, embedded least-privilege NATS,
real agent processes). Both come back through the public enroll login. Apart from
tests/test_jwt_renewal.py so the two slow halves run on both test workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.helpers import AgentProcess, HubProcess, joined, wait_until
from tests.test_jwt_renewal import TTL_S, _jwt_claims, _online, short_jwt_hub

__all__ = ["short_jwt_hub"]


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

