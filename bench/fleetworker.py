"""A share of the simulated fleet in its own process: ``python -m bench.fleetworker``.

One Python process saturates a core at about 3,000 simulated agents, so ``bench.fleet`` runs
its fleet in several of these. Each runs ``SimAgent``\\ s (the real ``edge_agent.sync.Sync`` on a
real SQLite store, its own NATS connection and nkey) in its own event loop and is driven by the
parent over stdin/stdout, one JSON object a line, one reply per request, in order:

- ``{"op": "enroll", "from": i, "count": k}``: enroll agents i..i+k-1 one after another (a
  fleet joining: each is connected, enrolled and reconnected as itself before the next starts);
  reply ``{"ok": true, "enroll_ms": [...], "failed": [indexes], "cut_short": false}``
  (``cut_short``: a ``stop`` came in meanwhile and the rest were not started);
- ``{"op": "state"}``: ``agents``, ``enrolled``, ``connected``, ``link_rebuilds``,
  ``reconnects`` (summed over this worker's agents' ``Sync.stats``), ``loop_lag_p99_ms`` and
  ``loop_lag_max_ms`` (how late a 0.1 s sleep woke, since the previous ``state``), ``cpu_s``
  (this process, user + system) and ``cpu_pct`` (% of one core since the previous ``state``,
  or since start);
- ``{"op": "ids"}``: ``ids``, the agent ids in index order;
- ``{"op": "commands"}``: ``drained_once`` (agents that applied exactly one drain) and
  ``with_commands`` (agents that applied any command);
- ``{"op": "stop"}``: stop every agent (``stop_late``: not stopped within 10 s, left to the
  exit), reply, exit.

A line that is not such a request (bad JSON, unknown op, a missing, extra or mistyped field)
gets ``{"ok": false, "error": "..."}`` and the worker carries on. Progress goes to stderr; stdout
carries replies only (anything else printing to fd 1 is sent to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from edge_agent.store import Store
from edge_agent.sync import Sync, SyncSettings
from federation import wire
from federation.identity import id_from_public_key, load_or_create_key
from federation.messages import Command

TASKS_PER_AGENT = 5
ENROLL_TIMEOUT_S = 120.0  # one enrollment that takes longer than this is reported as failed
STOP_BATCH = 100
STOP_WAIT_S = 10.0
LAG_TICK_S = 0.1


def progress(message: str) -> None:
    print(f"bench worker {os.getpid()}: {message}", file=sys.stderr, flush=True)


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (a NATS connection and a SQLite store per
    agent); returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    got = resource.getrlimit(resource.RLIMIT_NOFILE)
    return got[0], got[1]


@dataclass
class SimAgent:
    """One simulated edge: the real Sync on a real store; commands are recorded, not run."""

    index: int
    data_dir: Path
    nats_url: str
    token: str
    heartbeat_s: float = 2.0
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

        self.sync = Sync(SyncSettings(self.nats_url, self.token, heartbeat_s=self.heartbeat_s,
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


# ---------------------------------------------------------------- requests


class BadRequest(ValueError):
    pass


_FIELDS: dict[str, dict[str, type]] = {
    "enroll": {"from": int, "count": int},
    "state": {},
    "ids": {},
    "commands": {},
    "stop": {},
}


def decode(line: bytes) -> dict[str, Any]:
    """One request: a JSON object with a known ``op`` and exactly that op's fields, each of
    its type (ints are ints, not bools or floats), else BadRequest."""
    try:
        req = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise BadRequest("a request is a JSON object")
    op = req.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise BadRequest(f"unknown op {op!r}; one of {sorted(_FIELDS)}")
    fields = _FIELDS[op]
    extra = set(req) - {"op"} - set(fields)
    if extra:
        raise BadRequest(f"{op}: unexpected fields {sorted(extra)}")
    for name, kind in fields.items():
        value = req.get(name)
        if type(value) is not kind:
            raise BadRequest(f"{op}: {name!r} must be {kind.__name__}, got {value!r}")
    if op == "enroll" and (req["from"] < 0 or req["count"] < 0):
        raise BadRequest("enroll: 'from' and 'count' must be >= 0")
    return req


class Worker:
    def __init__(self, base: Path, nats_url: str, token: str, heartbeat_s: float) -> None:
        self.base = base
        self.nats_url = nats_url
        self.token = token
        self.heartbeat_s = heartbeat_s
        self.agents: list[SimAgent] = []
        self.stopping = asyncio.Event()  # a stop request (or EOF) is waiting: cut enroll short
        self.lags: list[float] = []  # event-loop lag samples (s) since the previous state
        self.me = psutil.Process()
        self._cpu_mark = (self._cpu_s(), time.perf_counter())

    async def watch_lag(self) -> None:
        """How late a 0.1 s sleep wakes: this process's event loop falling behind its agents
        (then their pings, publishes and heartbeats are late too, whatever the hub does)."""
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            self.lags.append(max(0.0, time.perf_counter() - t0 - LAG_TICK_S))

    def _cpu_s(self) -> float:
        t = self.me.cpu_times()
        return float(t.user + t.system)

    async def enroll(self, first: int, count: int) -> dict[str, Any]:
        times: list[float] = []
        failed: list[int] = []
        t_start = time.monotonic()
        for i in range(first, first + count):
            if self.stopping.is_set():
                progress(f"stop requested: enrollment cut short at {i}")
                break
            agent = SimAgent(i, self.base / f"a{i}", self.nats_url, self.token,
                             heartbeat_s=self.heartbeat_s)
            t0 = time.perf_counter()
            await agent.start()
            self.agents.append(agent)
            deadline = time.monotonic() + ENROLL_TIMEOUT_S
            while (not agent.enrolled and time.monotonic() < deadline  # noqa: ASYNC110
                   and not self.stopping.is_set()):
                await asyncio.sleep(0.002)  # the hub, another process, answers
            if not agent.enrolled and self.stopping.is_set():
                progress(f"stop requested: enrollment cut short at {i}")
                break
            times.append((time.perf_counter() - t0) * 1000)
            if not agent.enrolled:
                failed.append(i)
                progress(f"agent {i} not enrolled after {ENROLL_TIMEOUT_S:.0f} s")
            done = i - first + 1
            if done % 250 == 0 or done == count:
                recent = sorted(times[-250:])
                progress(f"{done}/{count} enrolled (agents {first}..{i}), last "
                         f"{times[-1]:.0f} ms, p50 of the last {len(recent)} "
                         f"{recent[len(recent) // 2]:.0f} ms, {time.monotonic() - t_start:.0f} s"
                         " into this share")
        return {"enroll_ms": times, "failed": failed, "cut_short": self.stopping.is_set()}

    def state(self) -> dict[str, Any]:
        cpu, now = self._cpu_s(), time.perf_counter()
        cpu0, t0 = self._cpu_mark
        self._cpu_mark = (cpu, now)
        syncs = [a.sync for a in self.agents if a.sync is not None]
        lags, self.lags = sorted(self.lags), []
        return {"agents": len(self.agents),
                "enrolled": sum(a.enrolled for a in self.agents),
                "connected": sum(s.connected for s in syncs),
                "link_rebuilds": sum(int(s.stats.get("link_rebuilds", 0)) for s in syncs),
                "reconnects": sum(int(s.stats.get("reconnects", 0)) for s in syncs),
                "loop_lag_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))] if lags else 0.0,
                "loop_lag_max_ms": 1000 * lags[-1] if lags else 0.0,
                "cpu_s": cpu,
                "cpu_pct": 100 * (cpu - cpu0) / (now - t0) if now > t0 else 0.0}

    def ids(self) -> dict[str, Any]:
        return {"ids": [a.store.agent_id if a.store is not None else None
                        for a in self.agents]}

    def commands(self) -> dict[str, Any]:
        missing = [a.sync for a in self.agents if not a.commands and a.sync is not None][:5]
        return {"drained_once": sum(a.commands.count("drain") == 1 for a in self.agents),
                "with_commands": sum(bool(a.commands) for a in self.agents),
                # A few agents that applied none, and what their link says (why not).
                "without": [{"agent": sync.agent_id, "connected": sync.connected,
                             "command_number": sync.store.get_meta("command_number"),
                             "stats": dict(sync.stats), "status": sync.status()}
                            for sync in missing]}

    async def stop(self) -> dict[str, Any]:
        """Stop the agents, ``STOP_BATCH`` at a time, each batch given ``STOP_WAIT_S``; an
        agent not stopped in time is left to the process's exit, not cancelled halfway."""
        errors = late = 0
        for start in range(0, len(self.agents), STOP_BATCH):
            tasks = [asyncio.ensure_future(a.stop())
                     for a in self.agents[start:start + STOP_BATCH]]
            done, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            late += len(pending)
            errors += sum(t.exception() is not None for t in done if not t.cancelled())
        return {"stopped": len(self.agents), "stop_errors": errors, "stop_late": late}

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "enroll":
            return await self.enroll(req["from"], req["count"])
        if op == "state":
            return self.state()
        if op == "ids":
            return self.ids()
        if op == "commands":
            return self.commands()
        return await self.stop()


_EOF = b""
_TOO_LONG = b"\x00too long"


async def _read_lines(reader: asyncio.StreamReader, queue: asyncio.Queue[bytes],
                      worker: Worker) -> None:
    """Requests into ``queue`` as they come, so a ``stop`` (or the parent going away) is seen
    while an ``enroll`` is still running: that enroll ends early and answers first."""
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # longer than the limit: its rest is lost; say so and go on
            await queue.put(_TOO_LONG)
            continue
        if not line:
            worker.stopping.set()
            await queue.put(_EOF)
            return
        try:
            if decode(line)["op"] == "stop":
                worker.stopping.set()
        except BadRequest:
            pass  # answered in order, by serve
        await queue.put(line)


async def serve(worker: Worker, out: IO[str]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    lines = asyncio.create_task(_read_lines(reader, queue, worker))
    lag = asyncio.create_task(worker.watch_lag())

    def reply(body: dict[str, Any]) -> None:
        out.write(json.dumps(body, separators=(",", ":")) + "\n")
        out.flush()

    stopped = False
    while not stopped:
        line = await queue.get()
        if line is _TOO_LONG:
            reply({"ok": False, "error": "request line too long"})
            continue
        if not line:  # the parent went away: stop the agents all the same
            progress("stdin closed; stopping")
            await worker.stop()
            break
        if not line.strip():
            continue
        try:
            req = decode(line)
        except BadRequest as exc:
            reply({"ok": False, "error": str(exc)})
            continue
        try:
            body = await worker.handle(req)
        except Exception as exc:  # a failing op is an answer, not the end of the worker
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            continue
        reply({"ok": True, **body})
        stopped = req["op"] == "stop"
    lines.cancel()
    lag.cancel()
    out.flush()
    sys.stderr.flush()
    # Agents stopped late still hold tasks; asyncio.run would wait on them at exit.
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleetworker")
    parser.add_argument("--nats", required=True, help="the hub's NATS URL")
    parser.add_argument("--token", required=True, help="a join token with uses to spare")
    parser.add_argument("--base", required=True, type=Path, help="agents' data dirs go here")
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    # stdout is the reply channel: keep a private handle on it, send fd 1 to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    soft, hard = raise_nofile()
    progress(f"up; RLIMIT_NOFILE {soft}/{hard}; heartbeat {args.heartbeat_s} s")
    worker = Worker(args.base, args.nats, args.token, args.heartbeat_s)
    asyncio.run(serve(worker, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
