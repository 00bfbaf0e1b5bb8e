"""Core-to-edge commands as the hub signs them: launch, update (generations), drain, forgery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from core_hub.enroll import load_hub_signer
from federation import wire
from federation.natsd import NatsServer
from federation.schemas import validate_task_spec
from tests.helpers import (
    AgentProcess,
    HubProcess,
    command_results,
    converged,
    joined,
    publish_command,
    wait_until,
)

_seq = iter(range(1, 1_000_000))


def send(hub: HubProcess, nats: NatsServer, agent_id: str, kind: str, body: dict[str, Any],
         signer: Any = None) -> str:
    command_id = f"cmd{next(_seq)}x{int(time.time() * 1000)}"
    data = wire.sign_envelope(kind, agent_id, next(_seq), {
        **body, "id": command_id, "expires_at": time.time() + 600},
        signer or load_hub_signer(hub.data_dir))
    asyncio.run(publish_command(nats.url, agent_id, data))
    return command_id


def result_of(hub: HubProcess, command_id: str) -> str:
    return wait_until(lambda: dict(command_results(hub.data_dir)).get(command_id), timeout=15,
                      what=f"result of {command_id}")


def test_launch_update_and_drain(start_agent: Callable[..., AgentProcess],
                                 hub_proc: HubProcess, nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    spec = validate_task_spec({"name": "svc", "command": ["sleep", "60"], "kill_timeout": 1})
    task_id = "c0ffee" + "0" * 26
    launch = send(hub_proc, nats_proc, agent_id, "launch", {"task_id": task_id, "spec": spec})
    assert result_of(hub_proc, launch) == "applied"
    first = agent.wait_state(task_id, "running")
    assert first["origin"] == "core" and first["generation"] == 1
    again = send(hub_proc, nats_proc, agent_id, "launch", {"task_id": task_id, "spec": spec})
    assert result_of(hub_proc, again) == "duplicate"

    # Update: the process restarts with the new spec, generation 2; not a failure restart.
    new = {**spec, "command": ["sleep", "61"], "labels": {"v": "2"}}
    update = send(hub_proc, nats_proc, agent_id, "update",
                  {"task_id": task_id, "generation": 1, "spec": new})
    assert result_of(hub_proc, update) == "applied"
    second = wait_until(lambda: (t := agent.task(task_id))["generation"] == 2 and
                        t["state"] == "running" and t["pid"] != first["pid"] and t, timeout=10,
                        what="restart with generation 2")
    assert second["command"] == ["sleep", "61"] and second["restarts"] == 0
    assert [t["id"] for t in agent.api("GET", "/v1/tasks?label=v=2").body["items"]] == [task_id]
    stale = send(hub_proc, nats_proc, agent_id, "update",
                 {"task_id": task_id, "generation": 1, "spec": spec})
    assert result_of(hub_proc, stale) == "rejected"
    assert agent.task(task_id)["generation"] == 2

    # A launch that cannot fit is declined (the hub would place it elsewhere).
    huge = validate_task_spec({"name": "huge", "command": ["true"],
                               "resources": {"cpus": 2, "mem_mb": 1}})
    hog = validate_task_spec({"name": "hog", "command": ["sleep", "60"], "kill_timeout": 1,
                              "resources": {"cpus": 1.5, "mem_mb": 1}})
    agent.submit("hog", hog["command"], resources=hog["resources"], kill_timeout=1)
    declined = send(hub_proc, nats_proc, agent_id, "launch",
                    {"task_id": "d" * 32, "spec": huge})
    assert result_of(hub_proc, declined) == "declined"

    drain = send(hub_proc, nats_proc, agent_id, "drain", {})
    assert result_of(hub_proc, drain) == "applied"
    assert agent.api("GET", "/v1/agents").body["items"][0]["status"] == "draining"
    converged(agent, hub_proc)


def test_forged_and_misdirected_commands_are_not_applied(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer, tmp_path: Any) -> None:
    agent = joined(start_agent, hub_proc, nats_proc)
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    task = agent.submit("target", ["sleep", "60"], kill_timeout=1)
    agent.wait_state(task["id"], "running")
    from federation.identity import load_or_create_key

    impostor = wire.Signer(load_or_create_key(tmp_path / "impostor.key")[0])
    send(hub_proc, nats_proc, agent_id, "kill", {"task_id": task["id"]}, signer=impostor)
    # Signed by the hub but for another agent, published on this agent's subject.
    other = "a" + "b" * 25
    data = wire.sign_envelope("kill", other, 99, {"id": "misdirected", "task_id": task["id"],
                                                  "expires_at": time.time() + 60},
                              load_hub_signer(hub_proc.data_dir))
    asyncio.run(publish_command(nats_proc.url, agent_id, data))
    wait_until(lambda: agent.api("GET", "/v1/info").body["link"]["commands_rejected"] >= 2,
               timeout=10, what="both rejected at the edge")
    assert agent.task(task["id"])["state"] == "running"
    assert command_results(hub_proc.data_dir) == []
