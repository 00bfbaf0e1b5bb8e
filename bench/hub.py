"""Hub benchmark: core placement, and the core's task list under load, next to raw limits.

1. Placements/s with ``PLACE_AGENTS`` agents' offers in the view: ``bench_placements`` (pure,
   in memory, reservations included), run before any process starts so nothing competes. For
   context, the end-to-end rate of a real hub: ``python -m core_hub run --embedded-nats`` with a
   real ``python -m edge_agent`` joined, ``E2E_N`` ``POST /v1/tasks`` from ``E2E_CLIENTS``
   clients (each POST places, writes ahead and publishes the launch before it answers).
2. ``GET /v1/tasks`` (default page of 100) with ``VIEW_TASKS`` tasks in the view, from
   ``CLIENTS`` concurrent keep-alive clients for ``MEASURE_S`` s after ``WARMUP_S`` s, beside a
   trivial aiohttp handler (a small JSON) in its own process, measured by the same client. The
   tasks go straight into the stopped hub's SQLite ``tasks`` table (copies of a real task's
   body with fresh ids), then the hub starts again. The client is this process, the servers
   are others; on a small box they share the cores, so the CPU of each is reported too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.common import (
    ROOT,
    AgentProc,
    Api,
    Row,
    format_table,
    percentile,
    progress,
    wait_for,
)
from bench.federation import HubProc

PLACE_AGENTS = 1000
PLACE_TASKS = 5000
PLACE_GOAL = 1000.0
E2E_N = 200
E2E_CLIENTS = 8
E2E_SPEC = {"name": "bench", "command": ["true"], "resources": {"cpus": 0.01, "mem_mb": 1}}
VIEW_TASKS = 10_000
CLIENTS = 32
WARMUP_S = 1.0
MEASURE_S = 6.0
SHARE_GOAL = 0.30
P99_GOAL_MS = 50.0
AGENT_CAPACITY = ["--cpus", "64", "--mem-mb", "65536", "--heartbeat", "0.5"]

HubRow = functools.partial(Row, area="hub")

# The raw floor for an aiohttp JSON endpoint: one handler, no middleware, no access log (the
# hub runs without one too). It prints its port and exits when its stdin closes. Given a file,
# it serves those bytes (a page the same size as the hub's) instead of a tiny JSON.
_TRIVIAL_SERVER = """
import asyncio, os, sys
from aiohttp import web

PAGE = open(sys.argv[1], "rb").read() if len(sys.argv) > 1 else None

async def handler(request):
    if PAGE is not None:
        return web.Response(body=PAGE, content_type="application/json")
    return web.json_response({"items": [], "next_cursor": None})

async def main():
    app = web.Application()
    app.router.add_get("/v1/tasks", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    eof = loop.create_future()
    loop.add_reader(0, lambda: os.read(0, 1) or eof.done() or eof.set_result(None))
    await eof
    await runner.cleanup()

asyncio.run(main())
"""


# ---------------------------------------------------------------- the hub, with its own NATS


class EmbeddedHub(HubProc):
    """``HubProc`` running its own nats-server (``--embedded-nats --nats-port 0``); the NATS
    URL is read from ``nats.url`` once the hub serves."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, nats_url="")

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "core_hub", "run", "--data-dir", str(self.data_dir),
                 "--embedded-nats", "--nats-port", "0", "--listen", "127.0.0.1:0",
                 # One token drives every request here: a limit that never bites, so the
                 # figures include the rate check but not 429s.
                 "--rate-limit", "1000000", "--rate-burst", "1000000"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    async def start(self) -> EmbeddedHub:
        (self.data_dir / "nats.url").unlink(missing_ok=True)
        await super().start()
        for _ in range(500):  # written just after hub.url
            path = self.data_dir / "nats.url"
            if path.exists() and path.read_text().strip():
                self.nats_url = path.read_text().strip()
                return self
            await asyncio.sleep(0.01)
        self.stop()
        raise RuntimeError(f"hub wrote no nats.url; its log:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """As ``HubProc.stop``; then its nats-server, should a killed hub have left it."""
        children: list[psutil.Process] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                children = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        super().stop(timeout)
        for child in children:
            try:
                child.kill()
                child.wait(5)
            except psutil.NoSuchProcess:
                pass


# ---------------------------------------------------------------- 1. placement


def bench_placement() -> list[Row]:
    from core_hub.placement import bench_placements

    progress(f"placement in memory ({PLACE_AGENTS} agents' offers, {PLACE_TASKS} tasks)")
    bench_placements(n_agents=50, n_tasks=200)  # warm-up: imports, first allocations
    rate = bench_placements(n_agents=PLACE_AGENTS, n_tasks=PLACE_TASKS)
    return [HubRow(f"placements/s, {PLACE_AGENTS} agents' offers in view (in memory)", rate,
                   "/s", None, f"core_hub.placement.bench_placements, {PLACE_TASKS} tasks",
                   f">= {PLACE_GOAL:.0f}/s", rate >= PLACE_GOAL, digits=0)]


@dataclass
class EndToEnd:
    rate: float = 0.0
    p50_ms: float = 0.0
    placed: int = 0  # POSTs answered with an agent chosen
    finished: int = 0  # of the E2E_N, finished in the hub's view when we looked
    body: dict[str, Any] | None = None  # a real task as GET /v1/tasks/{id} returns it


async def bench_end_to_end(hub: EmbeddedHub, base: Path) -> EndToEnd:
    """One real agent joins; ``E2E_N`` POSTs at the hub; then a finished task's body."""
    agent = AgentProc(base / "edge", ["--nats", hub.nats_url, "--join-token", hub.join_token(),
                                      *AGENT_CAPACITY])
    progress("starting an agent joined to the hub")
    await agent.start()
    out = EndToEnd()
    try:
        async with Api(hub.url, hub.token, limit=E2E_CLIENTS) as api:
            async def offered() -> bool:
                _, page = await api.call("GET", "/v1/offers")
                return any(o.get("cpus", 0) > 1 for o in page.get("items", []))

            await wait_for("the agent's offer at the hub", offered)
            await api.submit({**E2E_SPEC, "name": "warm"})  # first POST: validators, caches

            progress(f"end-to-end: {E2E_N} POST /v1/tasks at the hub, {E2E_CLIENTS} clients")
            latencies: list[float] = []
            ids: list[str] = []
            counter = iter(range(E2E_N))

            async def worker() -> None:
                for _ in counter:
                    t0 = time.perf_counter()
                    task = await api.submit(E2E_SPEC)
                    latencies.append(time.perf_counter() - t0)
                    ids.append(task["id"])
                    out.placed += bool(task.get("agent_id"))

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(E2E_CLIENTS)))
            out.rate = E2E_N / (time.perf_counter() - t0)
            out.p50_ms = percentile(latencies, 50) * 1000

            wanted = set(ids)

            async def all_ended() -> bool:
                done = [t for t in await api.tasks("name=bench")
                        if t["id"] in wanted and t["state"] in ("finished", "failed")]
                out.finished = sum(t["state"] == "finished" for t in done)
                return len(done) == len(wanted)

            try:
                await wait_for("the tasks to end in the hub's view", all_ended, within=20)
            except RuntimeError as exc:
                progress(str(exc))
            for task_id in ids:
                task = await api.task(task_id)
                if task["state"] == "finished" or out.body is None:
                    out.body = task
                if task["state"] == "finished":
                    break
    finally:
        agent.stop()
    return out


# ---------------------------------------------------------------- 2. the task list


def fill_view(db_path: Path, body: dict[str, Any], n: int) -> int:
    """Insert ``n`` copies of ``body`` with fresh ids into the stopped hub's ``tasks``."""
    now = time.time()

    def rows() -> Any:
        for i in range(n):
            task_id = f"{i + 1:032x}"
            copy = {**body, "id": task_id, "name": f"view{i % 100}", "updated_at": now}
            yield (task_id, copy["agent_id"], copy["name"], copy["state"],
                   copy.get("generation", 1), json.dumps(copy, separators=(",", ":")), now)

    db = sqlite3.connect(db_path)
    try:
        with db:
            db.executemany("INSERT INTO tasks(id, agent_id, name, state, generation, body,"
                           " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)", rows())
        return int(db.execute("SELECT count(*) FROM tasks").fetchone()[0])
    finally:
        db.close()


@dataclass
class Load:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    page_bytes: int
    server_cpu: float  # % of one core, the server process, during the window
    client_cpu: float  # % of one core, this process
    box_cpu: float  # % of one core, every process on the box (others' load shows here)


async def measure(url: str, token: str, server_pid: int) -> Load:
    """``CLIENTS`` workers GET ``url`` back to back: ``WARMUP_S`` s, then ``MEASURE_S`` s."""
    session = aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {token}"},
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=CLIENTS),
        timeout=aiohttp.ClientTimeout(total=30))
    latencies: list[float] = []
    errors = 0
    size = 0
    recording = False
    stop_at = 0.0

    async def worker() -> None:
        nonlocal errors, size
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            async with session.get(url) as resp:
                data = await resp.read()
                ok = resp.status == 200
            if recording:
                latencies.append(time.perf_counter() - t0)
                errors += not ok
                size = len(data)

    server, me = psutil.Process(server_pid), psutil.Process()
    try:
        stop_at = time.perf_counter() + WARMUP_S
        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
        recording = True
        cpu0 = sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2]), _busy_s()
        t0 = time.perf_counter()
        stop_at = t0 + MEASURE_S
        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - t0
        cpu1 = sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2]), _busy_s()
    finally:
        await session.close()
    return Load(len(latencies) / elapsed, percentile(latencies, 50) * 1000,
                percentile(latencies, 99) * 1000, errors, size,
                *(100 * (b - a) / elapsed for a, b in zip(cpu0, cpu1, strict=True)))


def _busy_s() -> float:
    """CPU seconds the whole box has been busy (all cores, all processes)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def same_page(db_path: Path, out: Path) -> Path:
    """A page like the hub's default ``GET /v1/tasks``: 100 task bodies from its view, as
    JSON, written to ``out`` for the trivial server to serve as they are."""
    db = sqlite3.connect(db_path)
    try:
        bodies = [json.loads(b) for (b,) in db.execute("SELECT body FROM tasks LIMIT 100")]
    finally:
        db.close()
    out.write_bytes(json.dumps({"items": bodies, "next_cursor": "x" * 40},
                               separators=(",", ":")).encode())
    return out


@contextlib.asynccontextmanager
async def trivial_server(page: Path | None = None) -> AsyncIterator[tuple[str, int]]:
    """``_TRIVIAL_SERVER`` in its own process (serving ``page``, or an empty list), as its
    ``http://127.0.0.1:<port>`` and pid; ended by closing its stdin."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _TRIVIAL_SERVER, *([str(page)] if page is not None else []),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def measure_trivial(page: Path) -> Load:
    progress(f"trivial aiohttp handler: {CLIENTS} clients, {MEASURE_S:.0f} s")
    async with trivial_server(page) as (url, pid):
        return await measure(f"{url}/v1/tasks", "x" * 32, pid)


def list_rows(hub: Load, raw: Load, in_view: int) -> list[Row]:
    raw_what = (f"trivial aiohttp handler sending a {raw.page_bytes // 1000} KB page of 100 "
                f"tasks from memory, own process, same {CLIENTS} clients")
    share = hub.rate / raw.rate if raw.rate else 0.0
    cores = os.cpu_count()
    return [
        HubRow(f"GET /v1/tasks ({in_view} tasks in view, page 100, {CLIENTS} clients)",
               hub.rate, "req/s", raw.rate, raw_what, f">= {SHARE_GOAL:.2f}x raw",
               share >= SHARE_GOAL, digits=0),
        HubRow("  GET /v1/tasks p99", hub.p99_ms, "ms", raw.p99_ms, "trivial handler p99",
               f"< {P99_GOAL_MS:.0f} ms", hub.p99_ms < P99_GOAL_MS, digits=1),
        HubRow("  GET /v1/tasks p50", hub.p50_ms, "ms", raw.p50_ms, "trivial handler p50",
               digits=1),
        HubRow("  CPU during the window, % of one core",
               f"hub {hub.server_cpu:.0f}%, client {hub.client_cpu:.0f}%, "
               f"box {hub.box_cpu:.0f}%",
               raw_what=f"trivial server {raw.server_cpu:.0f}%, client {raw.client_cpu:.0f}%, "
                        f"box {raw.box_cpu:.0f}% of {cores * 100}%"),
        HubRow("  checks", f"page {hub.page_bytes} B vs {raw.page_bytes} B; non-200 "
                          f"{hub.errors} and {raw.errors}; {MEASURE_S:.0f} s after "
                          f"{WARMUP_S:.0f} s warm-up"),
    ]


# ---------------------------------------------------------------- all


async def _guarded(name: str, job: Awaitable[list[Row]]) -> list[Row]:
    """A failing figure becomes a row saying so; the other figures still run."""
    try:
        return await job
    except Exception as exc:  # a bench reports, it does not stop
        progress(f"{name} failed: {exc!r}")
        return [HubRow(f"{name}: FAILED", f"{type(exc).__name__}: {exc}"[:100])]


async def bench_list(hub: EmbeddedHub, body: dict[str, Any]) -> list[Row]:
    """Fill the stopped hub's view, measure the trivial handler, then the hub's list."""
    progress(f"writing {VIEW_TASKS} tasks into the stopped hub's view")
    in_view = fill_view(hub.data_dir / "hub.db", body, VIEW_TASKS)
    page = same_page(hub.data_dir / "hub.db", hub.data_dir.parent / "page.json")
    raw = await measure_trivial(page)  # while the hub is down: the box to itself
    await hub.start()
    progress(f"GET /v1/tasks at the hub: {CLIENTS} clients, {MEASURE_S:.0f} s")
    load = await measure(hub.url + "/v1/tasks", hub.token, hub.pid)
    return list_rows(load, raw, in_view)


async def bench_hub(base: Path) -> list[Row]:
    hub = EmbeddedHub(base / "hub")
    try:
        progress("starting a hub with embedded NATS")
        await hub.start()
        e2e = await bench_end_to_end(hub, base)
        rows = [
            HubRow(f"  end to end: POST /v1/tasks at a real hub ({E2E_N}, {E2E_CLIENTS} "
                   "clients)", e2e.rate, "/s", None,
                   "1 real agent; place + write-ahead + launch published", digits=0),
            HubRow("    POST p50", e2e.p50_ms, "ms", digits=1),
            HubRow("    checks", f"placed at once {e2e.placed}/{E2E_N}, finished in the hub's "
                                 f"view {e2e.finished}/{E2E_N}"),
        ]
        hub.stop()
        if e2e.body is None:
            return [*rows, HubRow("task list: FAILED", "no real task body to copy")]
        return rows + await _guarded("task list", bench_list(hub, e2e.body))
    finally:
        hub.stop()


async def run_async() -> list[Row]:
    rows: list[Row] = []
    try:
        rows += bench_placement()  # first, alone: nothing else runs on the cores yet
    except Exception as exc:
        progress(f"placement failed: {exc!r}")
        rows.append(HubRow("placement: FAILED", f"{type(exc).__name__}: {exc}"[:100]))
    with tempfile.TemporaryDirectory(prefix="outpost-bench-hub-") as tmp:
        rows += await _guarded("hub", bench_hub(Path(tmp)))
    return rows


def run() -> list[Row]:
    """Every hub figure, each beside this machine's raw limit (under a minute)."""
    return asyncio.run(run_async())


if __name__ == "__main__":
    print(format_table(run()))
