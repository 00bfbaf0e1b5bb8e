"""``make bench-scale``: a simulated fleet against a real hub, embedded NATS, least privilege.

Each simulated agent is the real ``edge_agent.sync.Sync`` on its own SQLite store and its own
NATS connection with its own nkey: real enrollment (one at a time, as a fleet joining), signed
event batches, heartbeats every 2 s, command reads, offers every 15 s and a snapshot of 5 tasks
per agent. Only the task runtime is left out (tasks are rows, not processes). All agents run in
this process's event loop; the hub and its nats-server are their own processes.

Reported, each next to the raw limit measured in the same run (like with like):
- enrollment cost at the 10th and at the last enrollment (raw: one core-NATS request/reply to
  a trivial responder on the same server);
- hub CPU in steady state (raw: one core), nats-server RSS (raw: the same server binary with
  the same number of plain connections and no auth, measured in this run);
- API p99 of ``GET /v1/agents?limit=100`` and ``GET /v1/tasks`` (raw: a trivial aiohttp JSON
  handler in its own process, same clients);
- agents wrongly unreachable (raw: 0), and a command (drain) to every agent: how many applied.

``BENCH_AGENTS`` (default 1000) sets the fleet size; ``BENCH_STEADY_S`` the steady window.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import psutil

from bench.common import ROOT, Row, format_table, percentile, progress
from bench.hub import EmbeddedHub
from edge_agent.store import Store
from edge_agent.sync import Sync, SyncSettings
from federation import wire
from federation.identity import id_from_public_key, load_or_create_key
from federation.messages import Command
from federation.natsd import NatsServer

FleetRow = functools.partial(Row, area="fleet")
TASKS_PER_AGENT = 5
API_SAMPLES = 200


@dataclass
class SimAgent:
    """One simulated edge: the real Sync on a real store; commands are recorded, not run."""

    index: int
    data_dir: Path
    nats_url: str
    token: str
    commands: list[str] = field(default_factory=list)
    sync: Sync | None = None
    store: Store | None = None

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        seed, public = load_or_create_key(self.data_dir / "agent.key")
        self.store = store = Store(self.data_dir / "agent.db")
        store.agent_id = id_from_public_key(public)
        store.site = f"site-{self.index % 40:02d}"
        now = time.time()
        tasks = [{"id": f"{store.agent_id}{t:06d}", "name": f"svc-{t}",
                  "command": ["sleep", "600"], "state": "running", "origin": "edge",
                  "generation": 1, "restarts": 0, "created_at": now, "updated_at": now,
                  "resources": {"cpus": 0.1, "mem_mb": 32, "disk_mb": 0}}
                 for t in range(TASKS_PER_AGENT)]
        record = {"id": store.agent_id, "name": f"sim-{self.index}", "site": store.site,
                  "labels": {"zone": "sim"},
                  "resources": {"cpus": 4, "mem_mb": 4096, "disk_mb": 0},
                  "used": {"cpus": 0.5, "mem_mb": 160, "disk_mb": 0}, "status": "online",
                  "version": "sim", "isolation": "none", "last_seen": now}

        def offer() -> dict[str, Any]:
            t = time.time()
            return {"id": f"{store.agent_id}:{store.last_event_seq()}",
                    "agent_id": store.agent_id, "site": store.site, "labels": {"zone": "sim"},
                    "cpus": 3.5, "mem_mb": 3936, "disk_mb": 0, "used": record["used"],
                    "created_at": t, "expires_at": t + 30}

        def on_command(command: Command) -> tuple[str, str | None, dict[str, Any]]:
            self.commands.append(command.KIND)  # a typed command (federation/messages.py)
            return "applied", None, {}

        self.sync = Sync(SyncSettings(self.nats_url, self.token, heartbeat_s=2.0,
                                      version="sim"),
                         store, wire.Signer(seed), lambda: {**record, "last_seen": time.time()},
                         lambda: {"tasks": tasks}, on_command, offer=offer, nats_key=seed)
        await self.sync.start()

    @property
    def enrolled(self) -> bool:
        return self.sync is not None and self.sync.hub_key is not None and self.sync.connected

    async def stop(self) -> None:
        if self.sync is not None:
            await self.sync.stop()
        if self.store is not None:
            self.store.close()


def _token(hub: EmbeddedHub, uses: int) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "core_hub", "token", "create", "--data-dir", str(hub.data_dir),
         "--ttl", "7200", "--uses", str(uses)], check=True, capture_output=True, cwd=ROOT,
        text=True)
    return out.stdout.strip()


def _natsd_pid(hub: EmbeddedHub) -> int:
    assert hub.proc is not None
    for child in psutil.Process(hub.proc.pid).children(recursive=True):
        if "nats-server" in child.name():
            return child.pid
    raise RuntimeError("the hub runs no nats-server")


def _pss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_full_info().pss) / (1 << 20)


async def raw_nats_rss_mb(n: int, base: Path) -> float:
    """RSS of a bare nats-server (no auth) holding ``n`` plain client connections."""
    server = NatsServer(base / "raw-nats")
    await server.start()
    conns = []
    try:
        for start in range(0, n, 100):
            conns += await asyncio.gather(*(nats.connect(server.url) for _ in
                                            range(start, min(n, start + 100))))
        await asyncio.sleep(1.0)
        assert server.pid is not None
        return float(psutil.Process(server.pid).memory_info().rss) / (1 << 20)
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        await server.stop()


async def api_p99_ms(url: str, token: str, path: str) -> float:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        times = []
        for _ in range(API_SAMPLES):
            t0 = time.perf_counter()
            async with session.get(url + path) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"GET {path}: {resp.status}")
            times.append(time.perf_counter() - t0)
        return percentile(times, 99) * 1000


async def trivial_p99_ms() -> float:
    from bench.hub import _TRIVIAL_SERVER

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _TRIVIAL_SERVER, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        return await api_p99_ms(f"http://127.0.0.1:{port}", "x" * 32, "/v1/tasks")
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        await proc.wait()


async def statuses(url: str, token: str) -> dict[str, str]:
    out: dict[str, str] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        cursor = ""
        while cursor is not None:
            async with session.get(f"{url}/v1/agents?limit=1000&cursor={cursor}") as resp:
                body = await resp.json()
            out.update({a["id"]: a["status"] for a in body["items"]})
            cursor = body["next_cursor"]
    return out


async def run_fleet(n: int, steady_s: float, base: Path) -> list[Row]:
    hub = await EmbeddedHub(base / "hub").start()
    agents: list[SimAgent] = []
    rows: list[Row] = []
    try:
        natsd = _natsd_pid(hub)
        token = _token(hub, n)
        raw_rtt = await _raw_rtt(base)
        enroll_ms: list[float] = []
        t_all = time.perf_counter()
        for i in range(n):  # a fleet joining: one enrollment after another
            agent = SimAgent(i, base / "agents" / f"a{i}", hub.nats_url, token)
            t0 = time.perf_counter()
            await agent.start()
            while not agent.enrolled:  # noqa: ASYNC110 (another process answers)
                await asyncio.sleep(0.002)
            enroll_ms.append((time.perf_counter() - t0) * 1000)
            agents.append(agent)
            if (i + 1) % 250 == 0:
                progress(f"{i + 1}/{n} enrolled, last {enroll_ms[-1]:.0f} ms")
        enroll_total = time.perf_counter() - t_all
        progress(f"steady state for {steady_s:.0f} s")
        await asyncio.sleep(5.0)  # the last joiners' snapshots and offers land
        hub_p = psutil.Process(hub.pid)
        cpu0, t0 = sum(hub_p.cpu_times()[:2]), time.perf_counter()
        await asyncio.sleep(steady_s)
        hub_cpu = 100 * (sum(hub_p.cpu_times()[:2]) - cpu0) / (time.perf_counter() - t0)
        nats_rss = float(psutil.Process(natsd).memory_info().rss) / (1 << 20)
        hub_pss = _pss_mb(hub.pid) + _pss_mb(natsd)
        agents_p99 = await api_p99_ms(hub.url, hub.token, "/v1/agents?limit=100")
        tasks_p99 = await api_p99_ms(hub.url, hub.token, "/v1/tasks")
        seen = await statuses(hub.url, hub.token)
        wrong = sum(1 for s in seen.values() if s != "online")
        progress("a drain command to every agent")
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {hub.token}"}) as session:
            t_cmd = time.perf_counter()
            for agent in agents:
                assert agent.store is not None
                async with session.post(f"{hub.url}/v1/agents/{agent.store.agent_id}/drain",
                                        json={}) as resp:
                    await resp.read()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(  # noqa: ASYNC110 (a poll)
                bool(a.commands) for a in agents) < n:
            await asyncio.sleep(0.1)
        cmd_s = time.perf_counter() - t_cmd
        applied = sum(a.commands.count("drain") == 1 for a in agents)
        raw_rss = await raw_nats_rss_mb(n, base)
        raw_api = await trivial_p99_ms()
        k10 = min(9, n - 1)
        rows = [
            FleetRow(f"enrollment #{k10 + 1} (connect, enroll, reconnect as itself)",
                     enroll_ms[k10], "ms", raw_rtt, "one core-NATS request/reply, bare server",
                     digits=1),
            FleetRow(f"enrollment #{n} (the last)", enroll_ms[-1], "ms", raw_rtt,
                     "one core-NATS request/reply, bare server",
                     f"about #{k10 + 1}'s", enroll_ms[-1] <= 2 * enroll_ms[k10] + 5, digits=1),
            FleetRow(f"enrolling all {n}, one after another", enroll_total, "s", None,
                     "", digits=1),
            FleetRow(f"hub CPU, steady state ({steady_s:.0f} s, {n} agents)", hub_cpu,
                     "% core", 100.0, "one core", "< 1 core", hub_cpu < 100, digits=0),
            FleetRow(f"nats-server RSS, {n} agents, least privilege", nats_rss, "MB", raw_rss,
                     f"same nats-server, {n} plain connections, no auth", "< 2048 MB",
                     nats_rss < 2048, digits=0),
            FleetRow("hub + nats-server PSS", hub_pss, "MB", None, "", digits=0),
            FleetRow("GET /v1/agents?limit=100 p99", agents_p99, "ms",
                     raw_api, "trivial aiohttp JSON handler, own process", "< 100 ms",
                     agents_p99 < 100, digits=1),
            FleetRow(f"GET /v1/tasks p99 ({n * TASKS_PER_AGENT} tasks)", tasks_p99, "ms",
                     raw_api, "trivial aiohttp JSON handler, own process", "< 100 ms",
                     tasks_p99 < 100, digits=1),
            FleetRow("agents wrongly not online", float(wrong), "agents", None, "0",
                     "0", wrong == 0, digits=0),
            FleetRow(f"drain to every agent: applied once (of {n})", float(applied),
                     "agents", float(n), "every agent", f"{n}", applied == n, digits=0),
            FleetRow("drain to every agent: sent and applied", cmd_s, "s", None, "", digits=1),
        ]
        print(format_table(rows), flush=True)  # before the fleet stops: a slow stop loses none
    finally:
        progress("stopping the fleet")
        for start in range(0, len(agents), 100):
            await asyncio.gather(*(asyncio.wait_for(a.stop(), 10)
                                   for a in agents[start:start + 100]), return_exceptions=True)
        t_stop = time.perf_counter()
        hub.stop(timeout=60)
        stop_s = time.perf_counter() - t_stop
        log = hub.log_path.read_text() if hub.log_path.exists() else ""
        nats_log = (hub.data_dir / "nats" / "nats-server.log")
        clean = nats_log.exists() and nats_log.read_text().rstrip().endswith("Server Exiting..")
        rows.append(FleetRow("hub stop (SIGTERM) to exit, nats-server included", stop_s, "s",
                             None, "", "clean JetStream shutdown",
                             clean and "ignored SIGTERM" not in log, digits=1))
    return rows


async def _raw_rtt(base: Path) -> float:
    """p50 of a core-NATS request/reply (200 bytes) on a bare nats-server of the same binary
    (the hub's own users may not subscribe to a test subject: least privilege)."""
    server = NatsServer(base / "raw-rtt")
    await server.start()
    nc = await nats.connect(server.url)
    try:
        async def echo(msg: Any) -> None:
            await msg.respond(b"ok")

        await nc.subscribe("bench.raw.echo", cb=echo)
        await nc.flush()
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            await nc.request("bench.raw.echo", b"x" * 200, timeout=5)
            times.append(time.perf_counter() - t0)
        return percentile(times, 50) * 1000
    finally:
        await nc.close()
        await server.stop()


def main() -> int:
    n = int(os.environ.get("BENCH_AGENTS", "1000"))
    steady = float(os.environ.get("BENCH_STEADY_S", "30"))
    with tempfile.TemporaryDirectory(prefix="outpost-fleet-") as tmp:
        rows = asyncio.run(run_fleet(n, steady, Path(tmp)))
    print(format_table(rows[-1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
