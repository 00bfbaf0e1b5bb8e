"""Reconnect storm (part of ``make bench-scale``): a fleet that was offline comes back at once.

``BENCH_STORM_AGENTS`` simulated agents (default 1,000; the real ``edge_agent.sync.Sync`` of
``bench.fleet.SimAgent``, each its own store, key and NATS connection) enroll at a real hub with
embedded NATS and least privilege, then go offline. While away each records
``BENCH_STORM_EVENTS`` task events (default 100) in its outbox, as a shop whose uplink was down
would. Then every agent starts again at the same moment; each reconnects with its own jittered
backoff and drains its outbox. Reported:

- the time from the restart until the hub's view has applied every agent's events (goal:
  30 s), beside the raw limit measured in the same run on the same messages: a fresh JetStream
  consumer fetching and acking everything the storm put in ``OUTPOST_EVENTS``;
- the peak RSS of the hub and of its nats-server while the storm lasts, sampled every 0.2 s;
- what the hub's API answers in while it lasts: ``GET /v1/agents?limit=100`` and
  ``GET /v1/tasks`` timed from a process of their own (``bench.apiprobe``; this one runs the
  fleet), beside the same probe's GETs of an aiohttp server that serves a page like the hub's
  ``/v1/tasks`` (``bench.hub.same_page``: 100 task bodies from its view), timed in turn with
  them on the same loaded box: the raw limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import nats
import psutil

from bench.common import ROOT, Row, format_table, percentile, progress
from bench.fleet import SimAgent, _natsd_pid, _token
from bench.hub import EmbeddedHub, same_page, trivial_server
from core_hub.natsauth import hub_login
from edge_agent.store import Store
from federation import subjects

StormRow = functools.partial(Row, area="storm")
GOAL_S = 30.0
ENROLL_AT_ONCE = 20
SAMPLE_S = 0.2


def _applied(db_path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT id, applied_seq FROM agents").fetchall())
    finally:
        db.close()


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / (1 << 20)


def _record_offline_events(agent: SimAgent, events: int) -> int:
    """``events`` task events in the agent's outbox while it is stopped; its last seq."""
    store = Store(agent.data_dir / "agent.db")
    try:
        now = time.time()
        for n in range(events):
            task_id = f"{agent.index:06d}{n:026d}"
            store.append_event("task", {
                "id": task_id, "name": f"offline-{n}", "command": ["true"],
                "state": "finished", "exit_code": 0, "origin": "edge", "generation": 1,
                "restarts": 0, "created_at": now, "updated_at": now, "finished_at": now,
                "resources": {"cpus": 0.1, "mem_mb": 32, "disk_mb": 0}}, task_id=task_id)
        return store.last_event_seq()
    finally:
        store.close()


async def _raw_fetch_ack_s(hub: EmbeddedHub, first_seq: int, count: int) -> float:
    """Seconds for one fresh pull consumer to fetch and ack ``count`` messages of the events
    stream from ``first_seq`` on, as the hub's own user (what ingest does, minus the apply)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await nats.connect(hub.nats_url, **hub_login(hub.data_dir).connect_options())
    try:
        js = nc.jetstream(timeout=10)
        durable = "bench-storm-raw"
        await js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig(
            durable_name=durable, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first_seq, ack_policy=AckPolicy.EXPLICIT,
            filter_subject=subjects.EVENTS_ALL, max_ack_pending=50_000))
        sub = await js.pull_subscribe_bind(durable=durable, stream=subjects.EVENTS_STREAM)
        got, t0 = 0, time.perf_counter()
        while got < count:
            msgs = await sub.fetch(256, timeout=5)
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        elapsed = time.perf_counter() - t0
        await js.delete_consumer(subjects.EVENTS_STREAM, durable)
        return elapsed
    finally:
        await nc.close()


async def _stream_last_seq(hub: EmbeddedHub) -> int:
    nc = await nats.connect(hub.nats_url, **hub_login(hub.data_dir).connect_options())
    try:
        info = await nc.jetstream(timeout=10).stream_info(subjects.EVENTS_STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()


AGENTS_PAGE, TASKS_PAGE = "/v1/agents?limit=100", "/v1/tasks"


class ApiProbe:
    """``bench.apiprobe`` timing the hub's API and, in turn with it, an aiohttp server that
    serves a page like the hub's ``/v1/tasks`` from its view before the storm (the raw
    limit)."""

    def __init__(self, hub: EmbeddedHub, base: Path) -> None:
        self.hub, self.base = hub, base
        self.trivial = contextlib.AsyncExitStack()
        self.probe: asyncio.subprocess.Process | None = None
        self.trivial_url = ""

    async def start(self) -> None:
        page = same_page(self.hub.data_dir / "hub.db", self.base / "tasks-page.json")
        url, _pid = await self.trivial.enter_async_context(trivial_server(page))
        self.trivial_url = url + TASKS_PAGE
        self.probe = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.apiprobe", self.hub.token,
            self.hub.url + AGENTS_PAGE, self.hub.url + TASKS_PAGE, self.trivial_url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT)

    async def stop(self) -> dict[str, dict[str, object]]:
        """End both processes; the probe's figures by path (``trivial`` for the raw one)."""
        found: dict[str, dict[str, object]] = {}
        if self.probe is not None and self.probe.stdin is not None:
            self.probe.stdin.close()
            out, _ = await asyncio.wait_for(self.probe.communicate(), 90)
            by_url = json.loads(out) if out.strip() else {}
            found = {"trivial" if url == self.trivial_url else url[len(self.hub.url):]: got
                     for url, got in by_url.items()}
        await self.trivial.aclose()
        return found

    async def close(self) -> None:
        """End whatever still runs (a storm that failed before ``stop``)."""
        if self.probe is not None and self.probe.returncode is None:
            self.probe.kill()
            await self.probe.wait()
        await self.trivial.aclose()


def api_rows(found: dict[str, dict[str, object]]) -> list[StormRow]:
    """p99 of each hub path beside the trivial server's, from the same probe rounds."""
    def ms(path: str, q: float) -> float | None:
        seconds = found.get(path, {}).get("seconds") or []
        return 1000 * percentile(seconds, q) if seconds else None  # type: ignore[arg-type]

    raw = ms("trivial", 99)
    rows = []
    for path in (AGENTS_PAGE, TASKS_PAGE):
        got = found.get(path, {})
        seconds = got.get("seconds") or []
        p99 = ms(path, 99)
        rows.append(StormRow(
            f"  API p99 during the storm, GET {path}", p99 if p99 is not None else "no answer",
            "ms", raw, "the same probe's GETs, in turn with these, of an aiohttp server "
                       "with a /v1/tasks page from the hub's view", digits=1))
        rows.append(StormRow(
            f"    its p50 and max ({len(seconds)} GETs, errors {got.get('errors') or 0})",
            f"{ms(path, 50) or 0:.1f} ms / {ms(path, 100) or 0:.1f} ms"))
    return rows


async def run_storm(n: int, events: int, base: Path) -> list[Row]:
    hub = await EmbeddedHub(base / "hub").start()
    agents: list[SimAgent] = []
    probe = ApiProbe(hub, base)
    try:
        natsd = _natsd_pid(hub)
        token = _token(hub, n)
        for start in range(0, n, ENROLL_AT_ONCE):
            batch = [SimAgent(i, base / "agents" / f"a{i}", hub.nats_url, token)
                     for i in range(start, min(n, start + ENROLL_AT_ONCE))]
            await asyncio.gather(*(a.start() for a in batch))
            while not all(a.enrolled for a in batch):  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.01)
            agents += batch
            if len(agents) % 250 == 0:
                progress(f"storm: {len(agents)}/{n} enrolled")
        await asyncio.sleep(5.0)  # snapshots and offers land
        progress(f"storm: {n} agents offline, {events} events each")
        for start in range(0, n, 100):
            await asyncio.gather(*(a.stop() for a in agents[start:start + 100]))
        targets = {a.store.agent_id: _record_offline_events(a, events)  # type: ignore[union-attr]
                   for a in agents}
        await asyncio.sleep(1.0)
        first_seq = await _stream_last_seq(hub) + 1
        db_path = hub.data_dir / "hub.db"
        hub_p, nats_p = psutil.Process(hub.pid), psutil.Process(natsd)
        peak_hub, peak_nats = _rss_mb(hub.pid), _rss_mb(natsd)
        await probe.start()
        progress("storm: every agent back at once")
        t0 = time.perf_counter()
        starting = asyncio.gather(*(a.start() for a in agents))
        done_s = None
        while time.perf_counter() - t0 < GOAL_S * 4:
            await asyncio.sleep(SAMPLE_S)
            peak_hub = max(peak_hub, float(hub_p.memory_info().rss) / (1 << 20))
            peak_nats = max(peak_nats, float(nats_p.memory_info().rss) / (1 << 20))
            applied = _applied(db_path)
            if all(applied.get(agent, 0) >= seq for agent, seq in targets.items()):
                done_s = time.perf_counter() - t0
                break
        await starting
        found = await probe.stop()
        applied = _applied(db_path)
        behind = sum(applied.get(agent, 0) < seq for agent, seq in targets.items())
        total = n * events
        count = await _stream_last_seq(hub) - first_seq + 1
        raw_s = await _raw_fetch_ack_s(hub, first_seq, count)
        shown = done_s if done_s is not None else time.perf_counter() - t0
        rows = [
            StormRow(f"reconnect storm: {n} agents x {events} events all applied", shown, "s",
                     raw_s, f"raw fetch+ack of the same {count} msgs, fresh consumer",
                     f"<= {GOAL_S:.0f} s", done_s is not None and done_s <= GOAL_S,
                     digits=1),
            StormRow("  agents not caught up at the end", float(behind), "agents", None,
                     f"of {n}", "0", behind == 0, digits=0),
            StormRow("  events per second through the storm", total / shown, "events/s",
                     None, "", digits=0),
            StormRow("  peak hub RSS during the storm", peak_hub, "MB", None, "", digits=0),
            StormRow("  peak nats-server RSS during the storm", peak_nats, "MB", None, "",
                     digits=0),
            *api_rows(found),
        ]
        print(format_table(rows), flush=True)
        return rows
    finally:
        await probe.close()
        progress("storm: stopping the fleet")
        for start in range(0, len(agents), 100):
            await asyncio.gather(*(asyncio.wait_for(a.stop(), 10)
                                   for a in agents[start:start + 100]), return_exceptions=True)
        hub.stop(timeout=60)


def main() -> int:
    n = int(os.environ.get("BENCH_STORM_AGENTS", "1000"))
    events = int(os.environ.get("BENCH_STORM_EVENTS", "100"))
    with tempfile.TemporaryDirectory(prefix="outpost-storm-") as tmp:
        asyncio.run(run_storm(n, events, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
