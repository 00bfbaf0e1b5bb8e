"""The event stream stays open through quiet periods (keepalives) and still delivers after."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from federation import app as api


async def test_events_flow_after_several_keepalives(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "SSE_KEEPALIVE", 0.1)
    agent = Agent(AgentConfig(data_dir=tmp_path / "a", listen="127.0.0.1:0", cpus=1, mem_mb=256,
                              stop_tasks_on_exit=True), env={"PATH": "/usr/bin:/bin"})
    await agent.start()
    headers = {"Authorization": f"Bearer {agent.admin_token}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(agent.url + "/v1/events") as stream:
                keepalives = 0
                while keepalives < 5:  # at least half a second of silence
                    line = await asyncio.wait_for(stream.content.readline(), 5)
                    assert line, "the stream ended during a quiet period"
                    keepalives += line.startswith(b": keepalive")
                async with http.post(agent.url + "/v1/tasks",
                                     json={"name": "late", "command": ["true"]}) as resp:
                    assert resp.status == 201
                    task_id = (await resp.json())["id"]
                while True:
                    line = await asyncio.wait_for(stream.content.readline(), 5)
                    assert line, "the stream ended before the task's event"
                    if line.startswith(b"data: "):
                        body = json.loads(line[6:])
                        assert body["id"] == task_id
                        break
    finally:
        await agent.stop()
