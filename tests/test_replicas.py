"""Hub replicas: the placement lease (core_hub/lease.py) against a real nats-server.

Exactly one holder at a time; a holder that was frozen (SIGSTOP: the classic stale leader) and
wakes up has every claim refused by JetStream, never a second leader's decision next to ours.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js.api import KeyValueConfig

from core_hub.lease import Lease, LeaseLost, LeaseRecord
from federation import subjects
from federation.natsd import NatsServer
from tests.nats_fixtures import connect

TTL = 1.5

HOLDER = """
import asyncio, sys, nats
from core_hub.lease import Lease, LeaseLost

async def main():
    nc = await nats.connect(sys.argv[1])
    lease = Lease(nc.jetstream(), "stale", ttl_s=float(sys.argv[2]))
    await lease.start()
    print("held" if lease.held else "not-held", flush=True)
    while True:
        try:
            print("claimed", await lease.claim(), flush=True)
        except LeaseLost as exc:
            print("refused", exc, flush=True)
        await asyncio.sleep(0.1)

asyncio.run(main())
"""


async def until(cond: Callable[[], bool], seconds: float) -> bool:
    """Poll ``cond`` (a state in another process or in JetStream) until true or timeout."""
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:  # noqa: ASYNC110 - nothing to await on
        await asyncio.sleep(0.05)
    return cond()


async def _bucket(js: object, ttl: float = TTL) -> None:
    await js.create_key_value(KeyValueConfig(bucket=subjects.LEASE_BUCKET,  # type: ignore[attr-defined]
                                             history=1, ttl=ttl))


async def test_one_holder_at_a_time_and_a_clean_stop_hands_over(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await _bucket(js)
        a, b = Lease(js, "a", ttl_s=TTL), Lease(js, "b", ttl_s=TTL)
        await a.start()
        await b.start()
        try:
            assert a.held and not b.held
            assert await b.try_acquire() is False
            with pytest.raises(LeaseLost):
                await b.claim()
            first = await a.claim()
            assert await a.claim() > first  # every claim is a new fencing token
            await a.stop()  # releases
            assert await until(lambda: b.held, TTL), "a released lease was not taken over"
            holder = await b.holder_now()
            assert holder is not None and holder.holder == "b"
            with pytest.raises(LeaseLost):
                await a.claim()
        finally:
            await a.stop()
            await b.stop()


async def test_a_corrupt_lease_record_is_not_trusted() -> None:
    assert LeaseRecord.decode(b"{") is None
    assert LeaseRecord.decode(b'{"holder": "x", "epoch": true}') is None
    assert LeaseRecord.decode(b'{"holder": "", "epoch": 3}') is None
    assert LeaseRecord.decode(b'{"holder": "x", "epoch": 3}') == LeaseRecord("x", 3)


async def test_a_frozen_holder_loses_the_lease_and_its_claims_are_refused(
        nats_server: NatsServer, tmp_path: Path) -> None:
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await _bucket(js)
        out = tmp_path / "holder.out"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        with out.open("w") as sink:
            child = subprocess.Popen(  # noqa: ASYNC220 - a child we SIGSTOP by hand
                [sys.executable, "-c", HOLDER, nats_server.url, str(TTL)],
                stdout=sink, stderr=subprocess.STDOUT, env=env)
        ours = Lease(js, "ours", ttl_s=TTL)
        try:
            assert await until(lambda: "claimed" in out.read_text(), 20), out.read_text()
            await ours.start()
            assert not ours.held, "two holders at once"

            child.send_signal(signal.SIGSTOP)  # the stale leader: frozen, still believing
            assert await until(lambda: ours.held, 4 * TTL), "a frozen holder's lease stayed"
            taken_at = len(out.read_text().splitlines())

            child.send_signal(signal.SIGCONT)

            def answers() -> list[str]:
                return [line for line in out.read_text().splitlines()[taken_at:]
                        if line.startswith(("claimed", "refused"))]
            assert await until(lambda: len(answers()) >= 5, 10), out.read_text()
            assert all(line.startswith("refused") for line in answers()), answers()
            await ours.claim()  # ours still stands
        finally:
            child.kill()
            child.wait()
            await ours.stop()
