"""Fixtures: real agent processes on free loopback ports, with temp data dirs.

Every agent started by a test is stopped (and its tasks killed) when the test ends.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, free_port, kill_group
from tests.nats_fixtures import nats_server

__all__ = ["nats_server"]


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(*args: str, name: str = "agent",
              env: dict[str, str] | None = None) -> AgentProcess:
        data = tmp_path / name
        data.mkdir(exist_ok=True)
        agent = AgentProcess(data, ["--stop-tasks-on-exit", "--name", name, *args],
                             env=env or {}).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop(signal.SIGTERM)
        _kill_leftover_tasks(agent.data_dir)


def _kill_leftover_tasks(data_dir: Path) -> None:
    """Tests that SIGKILL an agent leave its tasks running on purpose; end them here (and
    containers, which live outside the wrapper's process group)."""
    for pid_file in (data_dir / "tasks").glob("*/run.pid"):
        try:
            kill_group(int(pid_file.read_text()))
        except ValueError:
            pass
    runc_root = data_dir / "runc"
    if runc_root.is_dir() and shutil.which("runc"):
        for container in runc_root.iterdir():
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force",
                            container.name], capture_output=True, check=False, timeout=30)


@pytest.fixture
def agent(start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return start_agent("--cpus", "2", "--mem-mb", "1024")


@pytest.fixture
def nats_proc(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server for tests that drive processes synchronously: ``kill()``, ``pause()``
    and ``resume()`` directly, ``asyncio.run(nats_proc.start())`` to bring it back. Its port is
    outside the ephemeral range: a restart reuses it, and in that range an outgoing connection
    (an agent's reconnect) may hold it as its local port meanwhile."""
    server = NatsServer(tmp_path / "nats", port=free_port())
    asyncio.run(server.start())
    try:
        yield server
    finally:
        if server.running:
            server.resume()  # a SIGSTOPped server only dies once continued
        server.kill()


@pytest.fixture
def hub_proc(tmp_path: Path, nats_proc: NatsServer) -> Iterator[HubProcess]:
    hub = HubProcess(tmp_path / "hub", nats_proc.url,
                     ["--disconnected-after", "2.5", "--unreachable-after", "4"]).start()
    try:
        yield hub
    finally:
        hub.stop()
