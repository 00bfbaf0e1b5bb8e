"""Shared pieces of the benchmarks: a real agent process, an HTTP client, raw baselines, a table.

A figure alone says little on an unknown box, so every bench prints each figure next to the raw
limit of the same machine, measured in the same run (spawning ``true``, a bare interpreter's
memory, ...), and the ratio between the two. Benchmarks report; they never assert.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = str(ROOT / "edge_agent" / "wrapper.sh")
MB = 1024 * 1024
START_TIMEOUT = 20.0


def progress(message: str) -> None:
    """One line on stderr so a long run shows where it is; stdout carries only the table."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- numbers


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


def pss_mb(*pids: int) -> float:
    """Proportional set size of these processes together (``/proc/<pid>/smaps_rollup``): each
    shared page split among the processes mapping it, so a sum over processes counts every
    page once (RSS would count a shared library once per process)."""
    return sum(psutil.Process(pid).memory_full_info().pss for pid in pids) / MB


def uss_mb(pid: int) -> float:
    """Memory only this process maps (unaffected by what else runs, unlike PSS)."""
    return psutil.Process(pid).memory_full_info().uss / MB


def wrapper_pids(data_dir: Path) -> list[int]:
    """The live task wrappers (``edge_agent/wrapper.sh``) of the agent at ``data_dir``: the
    agent's helper processes, one per running task (the task's own command is not counted)."""
    out = []
    for pid_file in (data_dir / "tasks").glob("*/run.pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, FileNotFoundError, ProcessLookupError):
            continue
        if WRAPPER.encode() in cmdline and str(pid_file.parent).encode() in cmdline:
            out.append(pid)
    return out


async def raw_spawn_latencies(n: int, argv: Sequence[str] = ("true",)) -> list[float]:
    """Seconds ``asyncio.create_subprocess_exec`` takes to return (fork + exec done), n times."""
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*argv)
        out.append(time.perf_counter() - t0)
        await proc.wait()
    return out


async def raw_spawn_rate(n: int, concurrency: int, argv: Sequence[str] = ("true",)) -> float:
    """Processes per second that ``concurrency`` workers start and see exit, ``n`` in all."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            proc = await asyncio.create_subprocess_exec(*argv)
            await proc.wait()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def interpreter_start_s(runs: int = 3) -> float:
    """Median wall time of ``python -c pass``: the floor under any Python process's start."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await proc.wait()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- the agent process


@dataclass
class AgentProc:
    """A real ``python -m edge_agent`` with its own data dir on a free loopback port.

    ``args`` are extra flags; ``started_at`` is the ``time.perf_counter()`` just before the
    process was spawned, so callers can time recovery from the very start of the process.
    """

    data_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    token: str = ""
    started_at: float = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            return subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "--data-dir", str(self.data_dir),
                 "--listen", "127.0.0.1:0", "--stop-tasks-on-exit", *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    async def start(self) -> AgentProc:
        """Start the agent and return once it has written its URL (it is serving then)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url_file = self.data_dir / "agent.url"
        url_file.unlink(missing_ok=True)
        self.proc = self._spawn()
        self.url = await url_once_serving(url_file, self.proc, 0.005)
        if not self.url:
            self.stop()
            raise RuntimeError(f"agent did not start; its log:\n{self.log_tail()}")
        self.token = (self.data_dir / "admin.token").read_text().strip()
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the agent alone: its tasks live on, as after an agent crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (tasks stop with it), SIGKILL if it hangs, then end any task left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.kill_leftover_tasks()

    def kill_leftover_tasks(self) -> None:
        """Kill task process groups this agent left, checking each pid is still our wrapper."""
        for pid in wrapper_pids(self.data_dir):
            kill_group(pid)


async def url_once_serving(url_file: Path, proc: subprocess.Popen[bytes],
                           poll_s: float) -> str:
    """The URL a started agent or hub writes once it serves ("" if it exits or takes longer
    than START_TIMEOUT): a file, not an event, since it is another process; created before
    it is written, so an empty file is not an answer yet."""
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while not _read(url_file) and proc.poll() is None:  # noqa: ASYNC110 (a file)
                await asyncio.sleep(poll_s)
    except TimeoutError:
        pass
    return _read(url_file)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    """True for a live process; False when gone or a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def wait_for(what: str, check: Callable[[], Awaitable[bool]],
                   within: float = 20.0) -> None:
    """Await ``check()`` every 50 ms until it is true; RuntimeError after ``within`` s."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- HTTP


class Api:
    """The node's REST API over one keep-alive aiohttp session (``limit`` connections)."""

    def __init__(self, url: str, token: str, limit: int = 16) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"},
            connector=aiohttp.TCPConnector(limit=limit),
            timeout=aiohttp.ClientTimeout(total=30))

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    async def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        status, body = await self.call("POST", "/v1/tasks", spec)
        if status != 201:
            raise RuntimeError(f"POST /v1/tasks: {status} {body}")
        return dict(body)

    async def task(self, task_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/tasks/{task_id}")
        if status != 200:
            raise RuntimeError(f"GET /v1/tasks/{task_id}: {status} {body}")
        return dict(body)

    async def tasks(self, query: str) -> list[dict[str, Any]]:
        """Every task matching ``query`` (e.g. ``state=running&name=x``), following cursors."""
        items: list[dict[str, Any]] = []
        cursor = ""
        while True:
            status, body = await self.call("GET", f"/v1/tasks?{query}&limit=1000{cursor}")
            if status != 200:
                raise RuntimeError(f"GET /v1/tasks?{query}: {status} {body}")
            items.extend(body["items"])
            if not body.get("next_cursor"):
                return items
            cursor = f"&cursor={body['next_cursor']}"

    async def wait_state(self, task_id: str, states: Sequence[str], within: float = 10.0,
                         interval: float = 0.002) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            task = await self.task(task_id)
            if task["state"] in states:
                return task
            if time.monotonic() > deadline:
                raise RuntimeError(f"task {task_id} still {task['state']} after {within}s")
            await asyncio.sleep(interval)

    async def events(self, ready: asyncio.Event) -> AsyncIterator[tuple[int, str, Any]]:
        """``/v1/events`` from now on as (id, kind, data); sets ``ready`` once subscribed."""
        async with self.session.get(self.url + "/v1/events",
                                    timeout=aiohttp.ClientTimeout(total=None)) as resp:
            ident, kind = 0, ""
            ready.set()
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    ident = int(line[4:])
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    yield ident, kind, json.loads(line[6:])


# ---------------------------------------------------------------- the hub's metrics


async def hub_metrics(url: str, token: str) -> dict[str, float]:
    """The hub's ``/metrics`` samples by name, labels included (``name{k="v"}``)."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session, \
            session.get(f"{url}/metrics") as resp:
        resp.raise_for_status()
        text = await resp.text()
    samples = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            samples[name] = float(value)
    return samples


def rejected_envelopes(samples: dict[str, float]) -> str:
    """The hub's ``outpost_ingest_rejected_total`` samples as one cell ("0" if none): a bench
    whose traffic the hub refused is not measuring ingest."""
    rejected = [f"{name} {value:g}" for name, value in sorted(samples.items())
                if name.startswith("outpost_ingest_rejected_total")]
    return ", ".join(rejected) if rejected else "0"


# ---------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the report.

    ``value`` is the figure (a number in ``unit``, or text for checks); ``raw`` is the same
    machine's raw limit in the same unit, described by ``raw_what`` (which alone fills the
    column when ``raw`` is None); ``goal`` is the target in words, ``met`` whether it was met
    (None: no goal); ``area`` groups rows (``edge``, ``federation``, ``hub``).
    """

    figure: str
    value: float | str
    unit: str = ""
    raw: float | None = None
    raw_what: str = ""
    goal: str = ""
    met: bool | None = None
    digits: int = 2
    area: str = ""


def _num(value: float, unit: str, digits: int) -> str:
    return f"{value:.{digits}f} {unit}".rstrip()


def _cells(row: Row) -> list[str]:
    value = row.value if isinstance(row.value, str) else _num(row.value, row.unit, row.digits)
    if row.raw is not None:
        raw = _num(row.raw, row.unit, row.digits) + (f" ({row.raw_what})" if row.raw_what else "")
    else:
        raw = row.raw_what
    ratio = ""
    if row.raw and not isinstance(row.value, str):
        ratio = f"{row.value / row.raw:.2f}x"
    met = {True: "yes", False: "NO", None: ""}[row.met]
    return [row.figure, value, raw, ratio, row.goal, met]


HEADER = ["figure", "value", "raw limit on this machine", "ratio", "goal", "met?"]


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table; a separator line opens each area."""
    cells = [_cells(r) for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(HEADER)]

    def line(parts: Sequence[str]) -> str:
        return " | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    out = [line(HEADER), rule]
    area = None
    for row, c in zip(rows, cells, strict=True):
        if row.area != area:
            area = row.area
            if area:
                out.append(f"[{area}]")
        out.append(line(c))
    return "\n".join(out)
