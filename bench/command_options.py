"""How to deliver commands to N agents: one durable consumer each, or none (direct gets).

Measured on a real nats-server (the venv's), no hub: what the server costs with N durable pull
consumers on one stream (RSS, creation time, SIGTERM to exit) against the same N agents'
commands read with per-subject direct gets (no server state per agent), and the latency of one
fetch from a durable consumer against one direct get of the same message. The figures behind
the choice in ``federation/commandlog.py``; ``python -m bench.command_options 1000 5000``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from bench.common import percentile, progress, rss_mb
from federation.natsd import NatsServer

STREAM = "OPT_COMMANDS"


async def _setup(n: int, durable: bool, tmp: Path) -> dict[str, float]:
    server = NatsServer(tmp / ("durable" if durable else "direct"), stop_timeout_s=60)
    await server.start()
    out: dict[str, float] = {"n": n}
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream(timeout=30)
        await js.add_stream(StreamConfig(name=STREAM, subjects=["opt.cmd.*.*"], allow_direct=True,
                                         max_consumers=n + 10 if durable else -1))
        assert server.pid is not None
        base = rss_mb(server.pid)
        t0 = time.perf_counter()
        for i in range(n):  # one command each, as after a placement pass
            await js.publish(f"opt.cmd.a{i}.1", b"x" * 300)
        if durable:
            for start in range(0, n, 64):
                await asyncio.gather(*(js.add_consumer(STREAM, ConsumerConfig(
                    durable_name=f"cmd-a{i}", ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL, ack_wait=30,
                    filter_subject=f"opt.cmd.a{i}.*")) for i in range(start, min(n, start + 64))))
        out["setup_s"] = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        out["rss_mb"] = rss_mb(server.pid)
        out["rss_per_agent_kb"] = (out["rss_mb"] - base) * 1024 / n
        lat: list[float] = []
        for i in range(0, n, max(1, n // 200)):
            t1 = time.perf_counter()
            if durable:
                sub = await js.pull_subscribe_bind(f"cmd-a{i}", stream=STREAM)
                msgs = await sub.fetch(1, timeout=5)
                await msgs[0].ack()
                lat.append(time.perf_counter() - t1)
                await sub.unsubscribe()
            else:
                reply = await nc.request(f"$JS.API.DIRECT.GET.{STREAM}.opt.cmd.a{i}.1", b"",
                                         timeout=5)
                assert reply.data
                lat.append(time.perf_counter() - t1)
        out["get_p50_ms"] = percentile(lat, 50) * 1000
        out["get_p99_ms"] = percentile(lat, 99) * 1000
        await nc.close()
    finally:
        t2 = time.perf_counter()
        await server.stop()
        out["sigterm_exit_s"] = time.perf_counter() - t2
    return out


async def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for durable in (True, False):
                progress(f"{n} agents, {'durable consumers' if durable else 'direct gets'}")
                r = await _setup(n, durable, Path(tmp) / str(n))
                print(f"{'durable' if durable else 'direct ':8} n={n:6d} "
                      f"setup {r['setup_s']:6.1f}s  rss {r['rss_mb']:7.1f} MB "
                      f"({r['rss_per_agent_kb']:6.1f} KB/agent)  one get p50 "
                      f"{r['get_p50_ms']:5.2f} ms p99 {r['get_p99_ms']:5.2f} ms  "
                      f"SIGTERM->exit {r['sigterm_exit_s']:5.2f}s", flush=True)


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [1000, 5000]))
