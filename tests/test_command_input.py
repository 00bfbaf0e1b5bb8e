"""Commands an edge cannot apply (issue 10 section 4), signed with the real hub's key and sent
through real NATS to a real agent: each is answered with a failed result and acknowledged; the
link stays up and the agent's read position moves past each one (commands are the agent's
numbered log, ``federation/commandlog.py``), so none is read again. Before, a NUL or NaN launch
failed the command loop, dropped the agent's link and was redelivered every 30 s for ever."""

from __future__ import annotations

import asyncio
import math
import sqlite3
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
    joined,
    publish_command,
    wait_until,
)

_seq = iter(range(1, 1_000_000))
GOOD = validate_task_spec({"name": "ok", "command": ["sleep", "30"], "kill_timeout": 1})


def _send(hub: HubProcess, nats: NatsServer, agent_id: str, kind: str,
          body: dict[str, Any]) -> int:
    """Sign ``body`` with the hub's real key and append it to the agent's command log; returns
    its number."""
    data = wire.sign_envelope(kind, agent_id, next(_seq), body, load_hub_signer(hub.data_dir))
    return asyncio.run(publish_command(nats.url, agent_id, data))


def _read_position(agent: AgentProcess) -> int:
    """The last command number the agent recorded as taken (its own store, read-only)."""
    db = sqlite3.connect(f"file:{agent.data_dir / 'agent.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'command_number'").fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


def test_commands_the_edge_cannot_apply_are_answered_and_acked(
        start_agent: Callable[..., AgentProcess], hub_proc: HubProcess,
        nats_proc: NatsServer) -> None:
    agent = joined(start_agent, hub_proc, nats_proc, "--cpus", "2", "--mem-mb", "512")
    agent_id = agent.api("GET", "/v1/info").body["agent_id"]
    later = time.time() + 600
    bad: dict[str, tuple[str, dict[str, Any]]] = {
        "nul": ("launch", {"task_id": "a" * 32, "spec": {**GOOD, "command": ["sl\x00eep", "1"]}}),
        "nan_cpus": ("launch", {"task_id": "b" * 32, "spec": {
            **GOOD, "resources": {**GOOD["resources"], "cpus": math.nan}}}),
        "nan_timeout": ("launch", {"task_id": "c" * 32,
                                   "spec": {**GOOD, "kill_timeout": math.inf}}),
        "spec_list": ("launch", {"task_id": "d" * 32, "spec": [1, 2]}),
        "task_id_map": ("kill", {"task_id": {"x": 1}}),
        "unknown_field": ("drain", {"surprise": True}),
        "generation_float": ("update", {"task_id": "e" * 32, "generation": 1.5,
                                        "spec": GOOD}),
        "expiry_nan": ("kill", {"task_id": "f" * 32}),
    }
    ids = {}
    for name, (kind, body) in bad.items():
        command_id = f"bad{name.replace('_', '')}{next(_seq)}"
        ids[name] = command_id
        expires = math.nan if name == "expiry_nan" else later
        _send(hub_proc, nats_proc, agent_id, kind, {**body, "id": command_id,
                                                    "expires_at": expires})
    # No readable id: nothing to answer, but still acknowledged.
    _send(hub_proc, nats_proc, agent_id, "kill", {"id": ["x"], "task_id": "a" * 32,
                                                  "expires_at": later})
    good_id = f"good{next(_seq)}"
    last = _send(hub_proc, nats_proc, agent_id, "launch", {"task_id": "9" * 32, "spec": GOOD,
                                                           "id": good_id, "expires_at": later})

    def results() -> dict[str, str]:
        return dict(command_results(hub_proc.data_dir))

    wait_until(lambda: set(ids.values()) | {good_id} <= set(results()), timeout=20,
               what="a result for every command")
    got = results()
    assert {name: got[i] for name, i in ids.items()} == dict.fromkeys(ids, "rejected")
    assert got[good_id] == "applied"
    agent.wait_state("9" * 32, "running")
    wait_until(lambda: _read_position(agent) == last, timeout=10,
               what="the agent's read position past every command")
    link = agent.api("GET", "/v1/info").body["link"]
    assert link["connected"] and link["reconnects"] == 0, link
    assert "link to core down" not in agent.log()
    for name in ("nul", "nan_cpus", "nan_timeout", "spec_list"):
        assert agent.api("GET", f"/v1/tasks/{bad[name][1]['task_id']}").status == 404, name
