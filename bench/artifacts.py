"""Artifact benchmark (issue 14): push and fetch rates beside raw nats-py object store, the
agent's memory while it fetches a big artifact, and what a cached artifact adds to a start.

One nats-server, one hub on it, one agent joined; a file of ``BENCH_ARTIFACT_MB`` (200) MB.

1. Push: ``POST /v1/artifacts`` at the hub (published as chunks while it arrives and is hashed,
   then the object meta and the signed manifest) beside nats-py ``ObjectStore.put`` of the same file
   from this process.
2. Edge fetch: ``POST /v1/artifacts/{digest}/stage`` at the edge until it holds the artifact
   (manifest, batched direct gets to a file, digest checked, moved into the cache) beside
   nats-py ``ObjectStore.get(writeinto=file)`` of the same object from this process.
3. Agent RSS during that fetch (sampled every 20 ms) above its idle RSS just before.
4. Submit -> running at the edge (``sleep``; ``BENCH_ARTIFACT_STARTS`` runs, median), with a
   cached 64 kB artifact placed in the sandbox, beside the same task without artifacts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.common import AgentProc, Api, Row, format_table, progress, wait_for
from bench.federation import HubProc
from federation import objstore
from federation.natsd import NatsServer

SIZE_MB = int(os.environ.get("BENCH_ARTIFACT_MB", "200"))
STARTS = int(os.environ.get("BENCH_ARTIFACT_STARTS", "15"))
MB = 1 << 20


def _make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(MB)
    with path.open("wb") as fh:
        for i in range(size // MB):
            piece = block[:8] + i.to_bytes(8, "big") + block[16:]  # no two blocks alike
            digest.update(piece)
            fh.write(piece)
    return digest.hexdigest()


async def _push(hub: HubProc, path: Path, name: str) -> tuple[float, dict[str, Any]]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {hub.token}"},
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        start = time.perf_counter()
        with path.open("rb") as fh:
            async with s.post(f"{hub.url}/v1/artifacts?name={name}&version=1",
                              data=fh) as resp:
                body = await resp.json()
                if resp.status != 201:
                    raise RuntimeError(f"push: {resp.status} {body}")
        return time.perf_counter() - start, body


async def _raw_put_and_get(nats_url: str, path: Path, out: Path) -> tuple[float, float]:
    import nats

    nc = await nats.connect(nats_url)
    try:
        obs = await nc.jetstream(timeout=30).object_store(objstore.BUCKET)
        start = time.perf_counter()
        with path.open("rb") as fh:
            await obs.put("bench-raw", fh)
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        with out.open("wb") as fh:
            await obs.get("bench-raw", writeinto=fh)  # type: ignore[arg-type]
        get_s = time.perf_counter() - start
        await obs.delete("bench-raw")
        return put_s, get_s
    finally:
        await nc.close()


async def _edge_fetch(agent: AgentProc, digest: str) -> tuple[float, float, float]:
    """(seconds, idle RSS MB, peak RSS MB) of an edge's stage of ``digest``."""
    proc = psutil.Process(agent.pid)
    await asyncio.sleep(1.0)
    idle = proc.memory_info().rss / MB
    peak = idle
    async with Api(agent.url, agent.token) as api:
        start = time.perf_counter()
        status, body = await api.call("POST", f"/v1/artifacts/{digest}/stage", {})
        if status != 202:
            raise RuntimeError(f"stage: {status} {body}")
        while True:
            peak = max(peak, proc.memory_info().rss / MB)
            status, _ = await api.call("GET", f"/v1/artifacts/{digest}")
            if status == 200:
                break
            if time.perf_counter() - start > 600:
                raise RuntimeError("the edge did not fetch the artifact within 600 s")
            await asyncio.sleep(0.02)
        return time.perf_counter() - start, idle, peak


async def _starts(agent: AgentProc, digest: str | None) -> float:
    """Median ms from POST /v1/tasks to a running state seen by polling."""
    times: list[float] = []
    async with Api(agent.url, agent.token) as api:
        for i in range(STARTS):
            spec: dict[str, Any] = {"name": f"start{i}", "command": ["sleep", "30"],
                                    "resources": {"cpus": 0.01, "mem_mb": 4}}
            if digest:
                spec["artifacts"] = [{"digest": digest, "dest": "data.bin"}]
            start = time.perf_counter()
            task = await api.submit(spec)
            await api.wait_state(task["id"], ("running",), within=30)
            times.append((time.perf_counter() - start) * 1000)
            await api.call("DELETE", f"/v1/tasks/{task['id']}")
    return statistics.median(times)


async def _main(base: Path) -> list[Row]:
    nats = NatsServer(base / "nats")
    await nats.start()
    hub = await HubProc(base / "hub", nats.url).start()
    agent = await AgentProc(base / "edge", ["--nats", nats.url, "--join-token",
                                            hub.join_token()]).start()
    try:
        async with Api(agent.url, agent.token) as api:
            async def enrolled() -> bool:
                _, info = await api.call("GET", "/v1/info")
                return bool(info.get("link", {}).get("enrolled"))

            await wait_for("the agent to enroll", enrolled)
        progress(f"artifacts: making a {SIZE_MB} MB file")
        big = base / "big.bin"
        _make_file(big, SIZE_MB * MB)
        size_mb = big.stat().st_size / MB
        progress("artifacts: push at the hub, then raw put/get")
        push_s, art = await _push(hub, big, "big")
        raw_put_s, raw_get_s = await _raw_put_and_get(nats.url, big, base / "raw.out")
        progress("artifacts: edge fetch")
        fetch_s, idle, peak = await _edge_fetch(agent, art["digest"])
        small = base / "small.bin"
        small.write_bytes(os.urandom(64 * 1024))
        _, small_art = await _push(hub, small, "small")
        async with Api(agent.url, agent.token) as api:
            await api.call("POST", f"/v1/artifacts/{small_art['digest']}/stage", {})

            async def cached() -> bool:
                status, _ = await api.call("GET", f"/v1/artifacts/{small_art['digest']}")
                return status == 200

            await wait_for("the small artifact in the cache", cached)
        progress("artifacts: submit -> running")
        plain_ms = await _starts(agent, None)
        cached_ms = await _starts(agent, small_art["digest"])
    finally:
        agent.stop()
        hub.stop()
        await nats.stop()
    push_rate, raw_put_rate = size_mb / push_s, size_mb / raw_put_s
    fetch_rate, raw_get_rate = size_mb / fetch_s, size_mb / raw_get_s
    return [
        Row(f"push {size_mb:.0f} MB at the hub (HTTP streamed to chunks, sign)", push_rate,
            "MB/s", raw_put_rate, "nats-py ObjectStore.put of the same file",
            ">= 0.8x raw", push_rate >= 0.8 * raw_put_rate, 1, "artifacts"),
        Row(f"edge fetch of {size_mb:.0f} MB (stage: verify, to file, into cache)",
            fetch_rate, "MB/s", raw_get_rate, "nats-py ObjectStore.get(writeinto=file)",
            ">= 0.8x raw", fetch_rate >= 0.8 * raw_get_rate, 1, "artifacts"),
        Row(f"agent RSS above idle while fetching {size_mb:.0f} MB", peak - idle, "MB",
            idle, "the agent's idle RSS", "<= 10 MB", peak - idle <= 10, 1, "artifacts"),
        Row("submit -> running with a cached 64 kB artifact (median)", cached_ms, "ms",
            plain_ms, "the same task without artifacts", "< 5 ms more",
            cached_ms - plain_ms < 5, 1, "artifacts"),
    ]


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="outpost-bench-artifacts-") as tmp:
        return asyncio.run(_main(Path(tmp)))


if __name__ == "__main__":
    print(format_table(run()))
