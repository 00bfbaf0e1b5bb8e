"""A real ``nats-server`` with JetStream per test, on a free loopback port in the test's tmp dir.

The fixture is registered in conftest.py;
test modules just name it.
``connect`` opens a nats-py client that is always closed, so no test leaks a socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from federation.natsd import NatsServer
from tests.helpers import free_port


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A real nats-server; its port is outside the ephemeral range, so a restart gets it back
    (``tests.helpers.FIXED_PORTS``)."""
    server = NatsServer(tmp_path / "nats", port=free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def connect(url: str, **options: Any) -> AsyncIterator[Client]:
    """A nats-py client for a test; quick reconnects so restart tests stay fast."""
    options.setdefault("reconnect_time_wait", 0.05)
    options.setdefault("max_reconnect_attempts", -1)
    options.setdefault("connect_timeout", 2)
    nc = await nats.connect(url, **options)
    try:
        yield nc
    finally:
        await nc.close()
