"""``make bench-scale``: a simulated fleet against a real hub, embedded NATS, least privilege.

Each simulated agent is the real ``edge_agent.sync.Sync`` on its own SQLite store and its own
NATS connection with its own nkey (``bench.fleetworker.SimAgent``): real enrollment (one at a
time, as a fleet joining), signed event batches, heartbeats every ``BENCH_HEARTBEAT_S`` (2 s),
command reads, offers every 15 s and a snapshot of 5 tasks per agent. Only the task runtime is
left out (tasks are rows, not processes). One Python process saturates a core at about 3,000
such agents, so the fleet runs in ``BENCH_WORKERS`` worker processes (``python -m
bench.fleetworker``, default one per 1,000 agents), each driven over its stdin/stdout; the hub
and its nats-server are their own processes. Worker 0 enrolls its share one agent after
another, then worker 1, and so on, while the agents already enrolled keep running.

Reported, each next to the raw limit measured in the same run (like with like):
- enrollment cost at the 10th and at the last enrollment (raw: one core-NATS request/reply to
  a trivial responder on a bare server of the same binary);
- hub CPU in steady state (raw: one core), nats-server RSS (raw: the same server binary with
  the same number of plain connections and no auth, measured in this run);
- the simulator's own CPU (all workers) and the whole box's, against the box's cores: when they
  are near the box's cores, the figures measure the simulator, not the hub;
- API p99 of ``GET /v1/agents?limit=100`` and ``GET /v1/tasks`` (raw: a trivial aiohttp JSON
  handler in its own process, same clients);
- agents wrongly unreachable (raw: 0), and a command (drain) to every agent: how many applied.

``BENCH_AGENTS`` (default 1000) sets the fleet size; ``BENCH_STEADY_S`` the steady window;
``BENCH_WORKERS`` the simulator's processes; ``BENCH_HEARTBEAT_S`` the agents' heartbeat period.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import psutil

from bench.common import ROOT, Row, format_table, hub_metrics, percentile, progress
from bench.fleetworker import TASKS_PER_AGENT, SimAgent, raise_nofile
from bench.hub import EmbeddedHub
from edge_agent.sync import command_poll
from federation.natsd import NatsServer, _http_get

__all__ = ["SimAgent", "run_fleet"]  # SimAgent: bench.storm takes it from here

FleetRow = functools.partial(Row, area="fleet")
API_SAMPLES = 200
AGENTS_PER_WORKER = 1000
RAW_CONNS_PER_PROC = 2500  # the raw helper's plain connections per process
DRAIN_WAIT_S = 60.0  # after the last drain is sent, plus one command tick of the agents
DRAINS_IN_FLIGHT = 16  # drain requests the bench keeps open at once, as an operator script would
DEFAULT_HEARTBEAT_S = 2.0  # the issue's figure, and SyncSettings' default


class FleetHub(EmbeddedHub):
    """``EmbeddedHub`` whose liveness thresholds follow the agents' heartbeat: the hub's
    defaults (disconnected after 5 s, unreachable after 10 s) are 2.5 and 5 heartbeats of the
    default 2 s; with a slower heartbeat the same multiples are passed, as an operator running
    such a fleet would, or every agent would show not online between two heartbeats."""

    def __init__(self, data_dir: Path, heartbeat_s: float) -> None:
        super().__init__(data_dir)
        scale = heartbeat_s / DEFAULT_HEARTBEAT_S
        self.disconnected_after_s = 5.0 * scale
        self.unreachable_after_s = 10.0 * scale
        self.extra = [] if scale == 1 else [
            "--disconnected-after", f"{self.disconnected_after_s:g}",
            "--unreachable-after", f"{self.unreachable_after_s:g}"]

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(  # EmbeddedHub's command line, plus self.extra
                [sys.executable, "-m", "core_hub", "run", "--data-dir", str(self.data_dir),
                 "--embedded-nats", "--nats-port", "0", "--listen", "127.0.0.1:0",
                 "--rate-limit", "1000000", "--rate-burst", "1000000", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


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


# Holds argv[2] plain nats.py connections (no credentials) to argv[1]; says how many once all
# are up, closes them when its stdin closes.
_RAW_HOLDER = """
import asyncio, os, resource, sys
import nats

async def hold():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    url, n = sys.argv[1], int(sys.argv[2])
    conns = []
    for start in range(0, n, 100):
        conns += await asyncio.gather(*(nats.connect(url, max_reconnect_attempts=0)
                                        for _ in range(start, min(n, start + 100))))
    print(len(conns), flush=True)
    loop = asyncio.get_running_loop()
    eof = loop.create_future()
    loop.add_reader(0, lambda: os.read(0, 1) or eof.done() or eof.set_result(None))
    await eof
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

asyncio.run(hold())
"""


async def _varz(port: int) -> dict[str, Any]:
    try:
        body = json.loads(await _http_get("127.0.0.1", port, "/varz"))
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _hub_nats_monitor_port(hub: EmbeddedHub, natsd: int) -> int:
    """The monitoring port of the hub's own nats-server, from its ports file (0 if none)."""
    for ports_file in (hub.data_dir / "nats" / "ports").glob(f"*_{natsd}.ports"):
        try:
            return int(json.loads(ports_file.read_text())["monitoring"][0].rsplit(":", 1)[1])
        except (ValueError, KeyError, IndexError):
            return 0
    return 0


async def raw_nats_rss_mb(n: int, base: Path) -> tuple[float, int]:
    """RSS of a bare nats-server (no auth) holding ``n`` plain client connections, and how many
    connections that server counted (``/varz``). The connections are held by helper processes
    of ``RAW_CONNS_PER_PROC`` each, so no client process runs short of descriptors or CPU."""
    server = NatsServer(base / "raw-nats")
    await server.start()
    holders: list[asyncio.subprocess.Process] = []
    try:
        for start in range(0, n, RAW_CONNS_PER_PROC):
            holders.append(await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RAW_HOLDER, server.url,
                str(min(RAW_CONNS_PER_PROC, n - start)), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, cwd=ROOT))
        held = 0
        for holder in holders:
            assert holder.stdout is not None
            line = await asyncio.wait_for(holder.stdout.readline(), 300)
            if not line:
                raise RuntimeError("a raw connection holder exited before connecting")
            held += int(line)
        await asyncio.sleep(1.0)
        assert server.pid is not None
        counted = int((await _varz(server.monitor_port)).get("connections", -1))
        if held != n or counted != n:
            progress(f"raw nats: {held} connections held, server counts {counted}, wanted {n}")
        return float(psutil.Process(server.pid).memory_info().rss) / (1 << 20), counted
    finally:
        for holder in holders:
            if holder.stdin is not None:
                holder.stdin.close()
        for holder in holders:
            try:
                await asyncio.wait_for(holder.wait(), 30)
            except TimeoutError:
                holder.kill()
                await holder.wait()
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
    from bench.hub import trivial_server

    async with trivial_server() as (url, _pid):
        return await api_p99_ms(url, "x" * 32, "/v1/tasks")


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


async def enroll_counters(url: str, token: str) -> tuple[float, float, float]:
    """The hub's (enrollments answered, seconds from request to reply, CPU seconds) so far."""
    samples = await hub_metrics(url, token)
    return (samples.get('outpost_enrollments_total{result="ok"}', 0.0),
            samples.get("outpost_enrollment_seconds_total", 0.0),
            samples.get("outpost_enrollment_cpu_seconds_total", 0.0))


def hub_enroll_rows(shares: list[tuple[float, float, float]],
                    fleet: list[FleetWorker]) -> list[Row]:
    """The hub's time per enrollment in the first and the last worker's share: the hub's own
    cost beside the wall-clock rows, which also count the box's load and the simulator."""
    def per(share: tuple[float, float, float]) -> tuple[float, float]:
        count = max(share[0], 1.0)
        return 1000 * share[1] / count, 1000 * share[2] / count

    if not shares:
        return []
    (w0, c0), (w1, c1) = per(shares[0]), per(shares[-1])
    last = fleet[-1]
    return [
        FleetRow(f"hub: request to reply per enrollment, agents {last.first}.."
                 f"{last.first + last.count - 1}", w1, "ms", w0,
                 f"the same, agents 0..{fleet[0].count - 1}", digits=2),
        FleetRow(f"hub: its own CPU per enrollment, agents {last.first}.."
                 f"{last.first + last.count - 1}", c1, "ms", c0,
                 f"the same, agents 0..{fleet[0].count - 1}",
                 "about the first share's", c1 <= 1.5 * c0 + 0.2, digits=2),
    ]


class FleetWorker:
    """One ``python -m bench.fleetworker`` and its share ``first .. first + count - 1``."""

    def __init__(self, index: int, first: int, count: int) -> None:
        self.index, self.first, self.count = index, first, count
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self, nats_url: str, token: str, base: Path, heartbeat_s: float) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fleetworker", "--nats", nats_url, "--token", token,
            "--base", str(base), "--heartbeat-s", str(heartbeat_s),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
            limit=1 << 24)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def call(self, op: str, within: float = 60.0, **fields: Any) -> dict[str, Any]:
        """One request, its one reply; RuntimeError on an error reply or a dead worker."""
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"worker {self.index} exited (op {op})")
        reply = json.loads(line)
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            raise RuntimeError(f"worker {self.index}, op {op}: {reply}")
        return reply

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        # Not through call(): a request cut off mid-flight (Ctrl-C during enroll) may still
        # have its reply coming; the worker cuts that enroll short, answers it, then stops.
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(b'{"op": "stop"}\n')
            await self.proc.stdin.drain()
            async with asyncio.timeout(120):
                while line := await self.proc.stdout.readline():
                    if b'"stopped"' in line:
                        break
        except (TimeoutError, OSError, ValueError) as exc:
            progress(f"worker {self.index} stop: {exc!r}")
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            progress(f"worker {self.index} did not exit; killing it")
            self.proc.kill()
            await self.proc.wait()


def _shares(n: int, workers: int) -> list[tuple[int, int]]:
    """(first, count) of each worker: contiguous, as even as can be."""
    out, first = [], 0
    for w in range(workers):
        count = n // workers + (1 if w < n % workers else 0)
        out.append((first, count))
        first += count
    return out


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _count_in(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0


def _busy_s() -> float:
    """CPU seconds the whole box has been busy (all cores, all processes)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0)
                 + getattr(t, "softirq", 0.0))


async def _sum_state(workers: list[FleetWorker]) -> dict[str, float]:
    """Counts summed over the workers; the event-loop lag of the worst worker."""
    states = await asyncio.gather(*(w.call("state") for w in workers))
    keys = ("agents", "enrolled", "connected", "link_rebuilds", "reconnects")
    out = {k: float(sum(st[k] for st in states)) for k in keys}
    for k in ("loop_lag_p99_ms", "loop_lag_max_ms"):
        out[k] = float(max(st[k] for st in states))
    return out


async def run_fleet(n: int, steady_s: float, base: Path, *, workers: int | None = None,
                    heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> list[Row]:
    soft, hard = raise_nofile()
    progress(f"RLIMIT_NOFILE {soft}/{hard} here (the hub and its nats-server inherit it)")
    n_workers = max(1, min(n, workers or math.ceil(n / AGENTS_PER_WORKER)))
    cores = os.cpu_count() or 1
    fleet_hub = FleetHub(base / "hub", heartbeat_s)
    hub = await fleet_hub.start()
    fleet: list[FleetWorker] = []
    rows: list[Row] = []
    nats_log = hub.data_dir / "nats" / "nats-server.log"
    try:
        natsd = _natsd_pid(hub)
        nats_nofile = psutil.Process(natsd).rlimit(psutil.RLIMIT_NOFILE)
        progress(f"hub's nats-server RLIMIT_NOFILE {nats_nofile[0]}/{nats_nofile[1]}")
        if nats_nofile[0] < n + 1000:
            progress(f"WARNING: nats-server may run out of descriptors for {n} agents")
        token = _token(hub, n)
        raw_rtt = await _raw_rtt(base)
        fleet = [FleetWorker(w, first, count)
                 for w, (first, count) in enumerate(_shares(n, n_workers))]
        await asyncio.gather(*(w.start(hub.nats_url, token, base / "agents", heartbeat_s)
                               for w in fleet))
        progress(f"{n_workers} simulator workers, heartbeat {heartbeat_s} s")
        enroll_ms: list[float] = []
        failed: list[int] = []
        t_all = time.perf_counter()
        # The hub's own time per enrollment, per worker's share: (count, wall s, CPU s).
        hub_shares: list[tuple[float, float, float]] = []
        for w in fleet:  # a fleet joining: one enrollment after another, worker after worker
            (n0, wall0, cpu0) = await enroll_counters(hub.url, hub.token)
            reply = await w.call("enroll", within=w.count * 130 + 60, count=w.count,
                                 **{"from": w.first})
            (n1, wall1, cpu1) = await enroll_counters(hub.url, hub.token)
            hub_shares.append((n1 - n0, wall1 - wall0, cpu1 - cpu0))
            enroll_ms += reply["enroll_ms"]
            failed += reply["failed"]
            progress(f"worker {w.index}: agents {w.first}..{w.first + w.count - 1} enrolled "
                     f"({len(enroll_ms)}/{n}), last {enroll_ms[-1]:.0f} ms")
        enroll_total = time.perf_counter() - t_all
        progress(f"steady state for {steady_s:.0f} s")
        await asyncio.sleep(5.0)  # the last joiners' snapshots and offers land
        before = await _sum_state(fleet)
        hub_p = psutil.Process(hub.pid)
        sim_pids = [w.pid for w in fleet]
        cpu0, nats0, sim0, box0, t0 = (sum(hub_p.cpu_times()[:2]), _cpu_s([natsd]),
                                       _cpu_s(sim_pids), _busy_s(), time.perf_counter())
        await asyncio.sleep(steady_s)
        elapsed = time.perf_counter() - t0
        hub_cpu = 100 * (sum(hub_p.cpu_times()[:2]) - cpu0) / elapsed
        nats_cpu = 100 * (_cpu_s([natsd]) - nats0) / elapsed
        sim_cpu = 100 * (_cpu_s(sim_pids) - sim0) / elapsed
        box_cpu = 100 * (_busy_s() - box0) / elapsed
        after = await _sum_state(fleet)
        nats_rss = float(psutil.Process(natsd).memory_info().rss) / (1 << 20)
        hub_pss = _pss_mb(hub.pid) + _pss_mb(natsd)
        monitor = _hub_nats_monitor_port(hub, natsd)
        nats_conns = int((await _varz(monitor)).get("connections", -1)) if monitor else -1
        agents_p99 = await api_p99_ms(hub.url, hub.token, "/v1/agents?limit=100")
        tasks_p99 = await api_p99_ms(hub.url, hub.token, "/v1/tasks")
        seen = await statuses(hub.url, hub.token)
        wrong = sum(1 for s in seen.values() if s != "online")
        # A wake-up lost on the way is made up by the agent's command tick: wait that too.
        drain_wait = DRAIN_WAIT_S + command_poll(heartbeat_s)
        progress("a drain command to every agent")
        ids = [i for w in fleet for i in (await w.call("ids"))["ids"] if i is not None]
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {hub.token}"}) as session:
            t_cmd = time.perf_counter()
            in_flight = asyncio.Semaphore(DRAINS_IN_FLIGHT)

            answers: dict[int, int] = {}

            async def drain(agent_id: str) -> None:
                async with in_flight, session.post(f"{hub.url}/v1/agents/{agent_id}/drain",
                                                   json={}) as resp:
                    body = await resp.read()
                answers[resp.status] = answers.get(resp.status, 0) + 1
                if resp.status // 100 != 2 and answers[resp.status] <= 3:
                    progress(f"drain of {agent_id}: {resp.status} {body[:300]!r}")

            await asyncio.gather(*(drain(agent_id) for agent_id in ids))
        progress(f"drain answers by HTTP status: {answers}")
        progress(f"{len(ids)} drains sent ({DRAINS_IN_FLIGHT} at a time) in "
                 f"{time.perf_counter() - t_cmd:.1f} s; waiting up to {drain_wait:.0f} s for "
                 "them to be applied")
        deadline = time.monotonic() + drain_wait
        while True:
            counts = await asyncio.gather(*(w.call("commands") for w in fleet))
            if sum(c["with_commands"] for c in counts) >= n or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        cmd_s = time.perf_counter() - t_cmd
        applied = sum(c["drained_once"] for c in counts)
        for c in counts:
            for agent in c.get("without", []):
                progress(f"no command applied: {json.dumps(agent, default=str)[:600]}")
        progress(f"{sum(c['with_commands'] for c in counts)} agents applied a command, "
                 f"{applied} exactly one drain; "
                 f"{(await hub_metrics(hub.url, hub.token)).get('outpost_commands_queued', -1):.0f}"
                 " commands still queued at the hub")
        raw_rss, raw_counted = await raw_nats_rss_mb(n, base)
        raw_api = await trivial_p99_ms()
        k10 = min(9, n - 1)
        first100 = percentile(enroll_ms[:100], 50)
        last100 = percentile(enroll_ms[-100:], 50)
        rebuilds = after["link_rebuilds"] - before["link_rebuilds"]
        reconnects = after["reconnects"] - before["reconnects"]
        rows = [
            FleetRow("simulator", f"{n} agents in {n_workers} worker processes, heartbeat "
                     f"every {heartbeat_s:g} s", raw_what=f"box: {cores} CPU cores"),
            FleetRow("hub liveness thresholds", f"disconnected after "
                     f"{fleet_hub.disconnected_after_s:g} s, unreachable after "
                     f"{fleet_hub.unreachable_after_s:g} s",
                     raw_what="hub defaults x heartbeat / 2 s"),
            FleetRow(f"agents enrolled (of {n})", float(n - len(failed)), "agents", float(n),
                     "every agent", f"{n}", not failed, digits=0),
            FleetRow(f"enrollment #{k10 + 1} (connect, enroll, reconnect as itself)",
                     enroll_ms[k10], "ms", raw_rtt, "one core-NATS request/reply, bare server",
                     digits=1),
            FleetRow(f"enrollment #{n} (the last)", enroll_ms[-1], "ms", raw_rtt,
                     "one core-NATS request/reply, bare server",
                     f"about #{k10 + 1}'s", enroll_ms[-1] <= 2 * enroll_ms[k10] + 5, digits=1),
            FleetRow("enrollment p50 of the last 100", last100, "ms", raw_rtt,
                     "one core-NATS request/reply, bare server",
                     f"about the first 100's ({first100:.1f} ms)", last100 <= 2 * first100 + 5,
                     digits=1),
            FleetRow(f"enrolling all {n}, one after another", enroll_total, "s", None,
                     "", digits=1),
            *hub_enroll_rows(hub_shares, fleet),
            FleetRow(f"hub CPU, steady state ({steady_s:.0f} s, {n} agents)", hub_cpu,
                     "% core", 100.0, "one core", "< 1 core", hub_cpu < 100, digits=0),
            FleetRow("nats-server CPU, same window", nats_cpu, "% core", 100.0, "one core",
                     digits=0),
            FleetRow(f"simulator CPU, same window ({n_workers} workers)", sim_cpu, "% core",
                     100.0 * cores, f"the box's {cores} cores", digits=0),
            FleetRow("box CPU, same window (every process)", box_cpu, "% core",
                     100.0 * cores, f"the box's {cores} cores", digits=0),
            FleetRow("simulator link rebuilds / reconnects, same window",
                     f"{rebuilds:.0f} / {reconnects:.0f}",
                     raw_what=f"since start {after['link_rebuilds']:.0f} / "
                              f"{after['reconnects']:.0f}; at the window's end "
                              f"{after['enrolled']:.0f} enrolled, {after['connected']:.0f} "
                              "connected", goal="0 / 0",
                     met=rebuilds == 0 and reconnects == 0),
            FleetRow("simulator event-loop lag, same window (worst worker)",
                     f"p99 {after['loop_lag_p99_ms']:.0f} ms, max "
                     f"{after['loop_lag_max_ms']:.0f} ms",
                     raw_what="how late a 0.1 s sleep wakes in a worker"),
            FleetRow(f"nats-server RSS, {n} agents, least privilege", nats_rss, "MB", raw_rss,
                     f"same nats-server, {raw_counted} plain connections, no auth",
                     "< 2048 MB", nats_rss < 2048, digits=0),
            FleetRow("nats-server client connections (/varz)", float(nats_conns), "conns",
                     float(n), "one per agent", digits=0),
            FleetRow("hub + nats-server PSS", hub_pss, "MB", None, "", digits=0),
            FleetRow("GET /v1/agents?limit=100 p99", agents_p99, "ms",
                     raw_api, "trivial aiohttp JSON handler, own process", "< 100 ms",
                     agents_p99 < 100, digits=1),
            FleetRow(f"GET /v1/tasks p99 ({n * TASKS_PER_AGENT} tasks)", tasks_p99, "ms",
                     raw_api, "trivial aiohttp JSON handler, own process", "< 100 ms",
                     tasks_p99 < 100, digits=1),
            FleetRow(f"agents wrongly not online (of {len(seen)} listed)", float(wrong),
                     "agents", None, "0", "0", wrong == 0 and len(seen) == n, digits=0),
            FleetRow(f"drain to every agent: applied once (of {n})", float(applied),
                     "agents", float(n), "every agent", f"{n}", applied == n, digits=0),
            FleetRow(f"drain to every agent: sent ({DRAINS_IN_FLIGHT} at a time) and applied",
                     cmd_s, "s", None, "", digits=1),
        ]
        rows.append(FleetRow("hub's nats-server log: warnings / slow consumers",
                             f"{_count_in(nats_log, '[WRN]')} / "
                             f"{_count_in(nats_log, 'Slow Consumer')}"))
        print(format_table(rows), flush=True)  # before the fleet stops: a slow stop loses none
    finally:
        progress("stopping the fleet")
        await asyncio.gather(*(w.stop() for w in fleet), return_exceptions=True)
        t_stop = time.perf_counter()
        hub.stop(timeout=60)
        stop_s = time.perf_counter() - t_stop
        log = hub.log_path.read_text() if hub.log_path.exists() else ""
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
    workers = int(os.environ.get("BENCH_WORKERS", "0")) or None
    heartbeat = float(os.environ.get("BENCH_HEARTBEAT_S", str(DEFAULT_HEARTBEAT_S)))
    with tempfile.TemporaryDirectory(prefix="outpost-fleet-") as tmp:
        rows = asyncio.run(run_fleet(n, steady, Path(tmp), workers=workers,
                                     heartbeat_s=heartbeat))
    print(format_table(rows[-1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
