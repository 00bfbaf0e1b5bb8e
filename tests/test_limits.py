"""Per-token limits and the per-agent task cap: over a limit is a clear 429 or 409, and nothing
already accepted is lost. Real agents (the real aiohttp app on loopback, or real processes)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from federation.errors import ConfigError, TooManyRequests
from federation.limits import FAILED_LOGINS_BURST, FAILED_LOGINS_PER_S, TokenBuckets
from federation.natsd import NatsServer
from tests.helpers import ROOT, AgentProcess, HubProcess, joined, wait_until


async def _agent(tmp_path: Path, **settings: Any) -> Agent:
    agent = Agent(AgentConfig(data_dir=tmp_path / "a", listen="127.0.0.1:0", cpus=2,
                              mem_mb=512, stop_tasks_on_exit=True, **settings),
                  env={"PATH": "/usr/bin:/bin"})
    await agent.start()
    return agent


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def _auth(agent: Agent) -> dict[str, str]:
    return {"Authorization": f"Bearer {agent.admin_token}"}


async def test_rate_limit_is_429_with_retry_after_and_recovers(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    agent = await _agent(tmp_path, rate_limit_per_s=2, rate_limit_burst=5)
    try:
        for _ in range(5):  # the burst
            async with session.get(agent.url + "/v1/info", headers=_auth(agent)) as resp:
                assert resp.status == 200
        async with session.get(agent.url + "/v1/tasks", headers=_auth(agent)) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            err = (await resp.json())["error"]
        assert err["code"] == "too_many_requests" and "2 requests per second" in err["message"]
        assert err["details"]["limit"] == "rate" and err["details"]["burst"] == 5
        for _ in range(20):  # /v1/health carries no token and is never limited
            async with session.get(agent.url + "/v1/health") as resp:
                assert resp.status == 200
        await asyncio.sleep(1.0)  # Retry-After
        async with session.get(agent.url + "/v1/info", headers=_auth(agent)) as resp:
            assert resp.status == 200
        async with session.get(agent.url + "/metrics", headers=_auth(agent)) as resp:
            text = await resp.text()
        assert "outpost_http_rate_limited_total 1.0" in text
    finally:
        await agent.stop()


def test_buckets_are_per_token_and_refill_at_the_rate() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate_per_s=10, burst=3, clock=lambda: now[0])
    for _ in range(3):
        buckets.take("a")
    with pytest.raises(TooManyRequests) as exc:
        buckets.take("a")
    assert exc.value.headers() == {"Retry-After": "1"}
    assert exc.value.details["retry_after_s"] == pytest.approx(0.1)
    buckets.take("b")  # another token has its own bucket
    now[0] += 0.1  # one request's worth of refill
    buckets.take("a")
    with pytest.raises(TooManyRequests):
        buckets.take("a")
    TokenBuckets(rate_per_s=0, burst=1).take("a")  # 0: no limit
    TokenBuckets(rate_per_s=0, burst=1).take("a")


async def _open_events(session: aiohttp.ClientSession, agent: Agent) -> aiohttp.ClientResponse:
    resp = await session.get(agent.url + "/v1/events", headers=_auth(agent))
    if resp.status == 200:
        assert await asyncio.wait_for(resp.content.readline(), 5) == b"retry: 2000\n"
    return resp


async def test_streams_per_token_are_capped_and_a_closed_one_frees_its_slot(
        tmp_path: Path, session: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    agent = await _agent(tmp_path, max_streams_per_token=2)
    streams: list[aiohttp.ClientResponse] = []
    try:
        for _ in range(2):
            resp = await _open_events(session, agent)
            assert resp.status == 200
            streams.append(resp)
        refused = await _open_events(session, agent)
        assert refused.status == 429 and "Retry-After" not in refused.headers
        err = (await refused.json())["error"]
        assert err["code"] == "too_many_requests"
        assert "already holds 2 open streams" in err["message"]
        assert err["details"] == {"limit": "streams", "max_streams_per_token": 2, "open": 2}
        # A log follow takes a slot from the same pool; a plain log read does not.
        async with session.post(agent.url + "/v1/tasks", headers=_auth(agent), json={
                "name": "talker", "command": ["sleep", "30"], "kill_timeout": 1}) as resp:
            task_id = (await resp.json())["id"]
        logs = f"{agent.url}/v1/tasks/{task_id}/logs"
        async with session.get(logs + "?follow=true", headers=_auth(agent)) as resp:
            assert resp.status == 429
        async with session.get(logs, headers=_auth(agent)) as resp:
            assert resp.status == 200
        # Closing a stream frees its slot once the server sees the connection go.
        streams.pop().close()
        deadline = time.monotonic() + 10
        while True:
            again = await _open_events(session, agent)
            if again.status == 200:
                streams.append(again)
                break
            again.release()
            assert time.monotonic() < deadline, "the closed stream's slot was never freed"
            await asyncio.sleep(0.1)
    finally:
        for resp in streams:
            resp.close()
        await agent.stop()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], \
        [r.getMessage() for r in caplog.records]


def test_a_throttled_line_is_logged_once_per_window_and_names_what_it_held_back(
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from federation.log import Throttled

    now = [100.0]
    throttled = Throttled(logging.getLogger("outpost.test.throttled"), every_s=10.0,
                          clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="outpost.test.throttled"):
        for i in range(500):
            throttled.warning("refused", "refused #%d", i)
        throttled.warning("other", "another kind")  # its own key: logged at once
        now[0] += 10.0
        throttled.warning("refused", "refused again")
    assert [r.getMessage() for r in caplog.records] == [
        "refused #0", "another kind",
        "refused again (and 499 more like it in the last 10 s)"]
    assert caplog.records[-1].held_back == 499


def test_task_cap_is_409_and_loses_nothing(start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent("--cpus", "2", "--mem-mb", "512", "--max-tasks", "3")
    ids = [agent.submit(f"s{i}", ["sleep", "30"], kill_timeout=1)["id"] for i in range(3)]
    over = agent.api("POST", "/v1/tasks", {"name": "s3", "command": ["sleep", "30"]})
    assert over.status == 409, over.body
    err = over.body["error"]
    assert err["code"] == "conflict" and "max_tasks 3" in err["message"]
    assert err["details"] == {"limit": "max_tasks", "max_tasks": 3, "active": 3}
    for task_id in ids:
        agent.wait_state(task_id, "running")
    listed = agent.api("GET", "/v1/tasks").body["items"]
    assert sorted(t["id"] for t in listed) == sorted(ids)  # the refused one was never stored
    offer = agent.api("GET", "/v1/offers").body["items"][0]
    assert (offer["cpus"], offer["mem_mb"]) == (0, 0)  # full: the core places nothing here
    # An ended task frees its place; the new task is taken and the old ones are all kept.
    assert agent.api("DELETE", f"/v1/tasks/{ids[0]}").status in (200, 202)
    agent.wait_state(ids[0], "killed")
    fourth = agent.submit("s3", ["sleep", "30"], kill_timeout=1)
    assert {t["id"] for t in agent.api("GET", "/v1/tasks").body["items"]} == {*ids, fourth["id"]}
    assert agent.api("GET", "/v1/offers").body["items"][0]["cpus"] == 0


def test_core_does_not_place_on_an_agent_at_its_task_cap(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    full = joined(start_agent, hub_proc, nats_proc, "--cpus", "2", "--mem-mb", "512",
                  "--max-tasks", "1", "--site", "a", name="full")
    full.submit("local", ["sleep", "30"], kill_timeout=1)
    full_id = full.api("GET", "/v1/info").body["agent_id"]

    def offered_nothing() -> bool:
        offers = hub_proc.api("GET", "/v1/offers").body["items"]
        return any(o["agent_id"] == full_id and o["cpus"] == 0 for o in offers)

    wait_until(offered_nothing, timeout=15, what="the full agent's empty offer at the hub")
    resp = hub_proc.api("POST", "/v1/tasks", {"name": "placed", "command": ["sleep", "30"],
                                              "kill_timeout": 1})
    assert resp.status == 201, resp.body
    task_id = resp.body["id"]
    time.sleep(2)  # placement runs on offers; give it several chances to get this wrong
    task = hub_proc.api("GET", f"/v1/tasks/{task_id}").body
    assert task["state"] == "pending" and task["agent_id"] in (None, ""), task
    # A second agent with room gets it.
    joined(start_agent, hub_proc, nats_proc, "--cpus", "2", "--mem-mb", "512", "--site", "b",
           name="roomy")
    wait_until(lambda: hub_proc.api("GET", f"/v1/tasks/{task_id}").body["state"] == "running",
               timeout=20, what="the task placed on the agent with room")


@pytest.mark.parametrize(("settings", "setting"), [
    ({"rate_limit_per_s": -1}, "rate_limit_per_s"),
    ({"rate_limit_burst": 0}, "rate_limit_burst"),
    ({"max_streams_per_token": 0}, "max_streams_per_token"),
    ({"max_tasks": 0}, "max_tasks"),
])
def test_bad_limit_settings_are_config_errors(tmp_path: Path, settings: dict[str, Any],
                                              setting: str) -> None:
    with pytest.raises(ConfigError) as exc:
        AgentConfig(data_dir=tmp_path, **settings)
    assert exc.value.details["setting"] == setting


async def test_a_closed_log_follow_frees_its_slot_quietly(
        tmp_path: Path, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    agent = await _agent(tmp_path, max_streams_per_token=1)
    try:
        async with session.post(agent.url + "/v1/tasks", headers=_auth(agent), json={
                "name": "quiet", "command": ["sleep", "30"], "kill_timeout": 1}) as resp:
            task_id = (await resp.json())["id"]
        follow = f"{agent.url}/v1/tasks/{task_id}/logs?follow=true"
        first = await session.get(follow, headers=_auth(agent))
        assert first.status == 200
        async with session.get(agent.url + "/v1/events", headers=_auth(agent)) as refused:
            assert refused.status == 429  # the follow holds the token's one slot
        first.close()
        deadline = time.monotonic() + 10
        while True:
            again = await _open_events(session, agent)
            if again.status == 200:
                again.close()
                break
            again.release()
            assert time.monotonic() < deadline, "the closed follow's slot was never freed"
            await asyncio.sleep(0.1)
    finally:
        await agent.stop()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], \
        [r.getMessage() for r in caplog.records]


def test_at_the_core_each_token_has_its_own_rate(tmp_path: Path, nats_proc: NatsServer) -> None:
    hub = HubProcess(tmp_path / "hub", nats_proc.url,
                     ["--rate-limit", "0.5", "--rate-burst", "3"]).start()
    try:
        viewer = subprocess.run(
            [sys.executable, "-m", "core_hub", "apitoken", "create", "--data-dir",
             str(hub.data_dir), "--role", "viewer"], capture_output=True, text=True, cwd=ROOT,
            check=True).stdout.strip()
        for _ in range(3):
            assert hub.api("GET", "/v1/agents", token=viewer).status == 200
        over = hub.api("GET", "/v1/agents", token=viewer)
        assert over.status == 429 and int(over.headers["Retry-After"]) == 2
        assert hub.api("GET", "/v1/agents").status == 200  # the admin token is not affected
        assert hub.api("GET", "/v1/health", token=viewer).status == 200
    finally:
        hub.stop()


async def test_guessing_tokens_is_cut_off_per_address(
        tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """An address that sent FAILED_LOGINS_BURST unknown tokens gets 429 for any token,
    the right one too, until its bucket refills; a request with no token is not a guess."""
    agent = await _agent(tmp_path)
    try:
        for i in range(FAILED_LOGINS_BURST):
            async with session.get(agent.url + "/v1/tasks",
                                   headers={"Authorization": f"Bearer guess-{i}"}) as resp:
                assert resp.status == 401
        for headers in ({"Authorization": "Bearer one-more"}, _auth(agent)):
            async with session.get(agent.url + "/v1/info", headers=headers) as resp:
                assert resp.status == 429
                assert int(resp.headers["Retry-After"]) >= 1
                err = (await resp.json())["error"]
            assert err["details"]["limit"] == "failed_logins"
            assert "unknown tokens from this address" in err["message"]
        async with session.get(agent.url + "/v1/info") as resp:  # no token: not a guess
            assert resp.status == 401
        await asyncio.sleep(1 / FAILED_LOGINS_PER_S + 0.2)  # one guess's worth refilled
        async with session.get(agent.url + "/metrics", headers=_auth(agent)) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert f"outpost_http_unknown_tokens_total {FAILED_LOGINS_BURST}.0" in text
        assert "outpost_http_guesses_refused_total 2.0" in text
    finally:
        await agent.stop()
