"""Federation benchmark: how fast an edge's outbox reaches the hub, next to raw JetStream
moving the very same messages.

Everything is a real process: an embedded ``nats-server`` (JetStream), ``python -m core_hub
run`` and ``python -m edge_agent`` joined to it.

1. Outbox drain edge -> hub: the agent is stopped, ``DRAIN_N`` ``task`` events (copies of a real
   task's body, distinct ids, state ``finished``) go straight into its SQLite event log (its
   outbox), the agent starts again, and the clock runs from its spawn until the hub's
   ``agents.applied_seq`` equals the edge's last event seq.
2. Hub ingest on its own: from the same run, the rate at which the hub's ``applied_seq`` rose,
   between the first and the last poll (every ``POLL_S``) that saw it move.
3. The raw limits, like with like: the JetStream messages the drain really put on the stream
   (the agent batches ~600 events into each ~400 KB message) are read back, and on a fresh
   ``nats-server`` with no hub, ``bench.rawjs`` publishes those same bytes (same subjects,
   ``Nats-Msg-Id`` headers, sizes) and consumes them: fetch+ack, and fetch + Ed25519 check +
   decode of every event. Rates are events/s, the raw ones converted with the same messages'
   own events per message. The drain is set against raw publish (the agent's half), ingest
   against raw fetch+ack and fetch+verify+decode (the hub's half).

The raw floors run after the drain, when the hub and the agent have stopped, so nothing
competes with them for the two cores.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil

from bench.common import (
    ROOT,
    AgentProc,
    Api,
    Row,
    format_table,
    hub_metrics,
    progress,
    rejected_envelopes,
    url_once_serving,
    wait_for,
)
from bench.rawjs import PIPELINE, Floors, Message, count_events, floors
from federation import subjects
from federation.natsd import NatsServer
from federation.streams import ensure_streams

RAW_REPEATS = 2  # the best of these: the box's limit, not its noise
DRAIN_N = 100_000
DRAIN_GOAL_S = 5.0
DRAIN_TIMEOUT_S = 60.0
HUB_GOAL = 50_000  # DESIGN.md, wire contract: "batching is how the hub passes 50k events/s"
POLL_S = 0.05

FedRow = functools.partial(Row, area="federation")


# ---------------------------------------------------------------- the hub process


@dataclass
class HubProc:
    """A real ``python -m core_hub run`` on an external NATS, on a free loopback port."""

    data_dir: Path
    nats_url: str
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    token: str = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    async def start(self) -> HubProc:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url_file = self.data_dir / "hub.url"
        url_file.unlink(missing_ok=True)
        self.proc = self._spawn()
        self.url = await url_once_serving(url_file, self.proc, 0.01)
        if not self.url:
            self.stop()
            raise RuntimeError(f"hub did not start; its log:\n{self.log_tail()}")
        self.token = (self.data_dir / "admin.token").read_text().strip()
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "core_hub", "run", "--data-dir", str(self.data_dir),
                 "--nats", self.nats_url, "--listen", "127.0.0.1:0"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def join_token(self, uses: int = 10) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "core_hub", "token", "create", "--data-dir",
             str(self.data_dir), "--ttl", "3600", "--uses", str(uses)],
            check=True, capture_output=True, cwd=ROOT, text=True)
        return out.stdout.strip()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ro(path: Path) -> sqlite3.Connection:
    """A read-only connection (WAL: it reads beside the writer process without blocking it)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def _scalar(db: sqlite3.Connection, sql: str, *args: Any) -> Any:
    row = db.execute(sql, args).fetchone()
    return None if row is None else row[0]


def _cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return float("nan")
    return t.user + t.system


# ---------------------------------------------------------------- 2 and 3. the drain


@dataclass
class Drain:
    """What one outbox drain run saw. Times are ``perf_counter`` seconds after the agent's
    spawn; ``None`` when never seen."""

    n: int
    base_applied: int = 0
    last_seq: int = 0  # the edge's last event seq when the hub caught up
    applied: int = 0  # the hub's applied_seq then
    served: float | None = None  # the agent wrote its URL
    stream_first: float | None = None  # first poll seeing the stream grow
    stream_last: float | None = None  # first poll seeing the stream at its final length
    hub_first: float | None = None  # first poll seeing applied_seq move
    hub_first_applied: int = 0
    done: float | None = None  # applied_seq == the edge's last seq (>= the backlog's end)
    messages: int = 0  # JetStream messages the drain added to the stream
    cpu: dict[str, float] = field(default_factory=dict)
    hub_tasks: int = 0
    rejected: str = ""
    sent: list[Message] = field(default_factory=list)  # the drain's JetStream messages
    agent_id: str = ""
    agent_key: bytes = b""


def _fill_outbox(db_path: Path, body: dict[str, Any], n: int) -> int:
    """Append ``n`` finished-task events, copies of ``body`` with fresh ids; the last seq."""
    now = time.time()

    def rows() -> Any:
        for i in range(n):
            task_id = f"{i + 1:032x}"
            copy = {**body, "id": task_id, "name": f"backlog{i}", "state": "finished",
                    "updated_at": now}
            yield now, "task", task_id, json.dumps(copy, separators=(",", ":"))

    db = sqlite3.connect(db_path)
    try:
        with db:
            db.executemany("INSERT INTO events(ts, kind, task_id, body) VALUES (?, ?, ?, ?)",
                           rows())
        return int(_scalar(db, "SELECT max(seq) FROM events"))
    finally:
        db.close()


async def _stream_last_seq(jsm: Any) -> int:
    info = await jsm.stream_info(subjects.EVENTS_STREAM)
    return int(info.state.last_seq)


async def run_drain(base: Path, nats_url: str, natsd_pid: int) -> Drain:
    """Hub + agent, a backlog of ``DRAIN_N`` events at the stopped agent, then time the drain."""
    hub = HubProc(base / "hub", nats_url)
    agent: AgentProc | None = None
    nc: Any = None
    hub_db: sqlite3.Connection | None = None
    try:
        progress("starting a hub on the embedded NATS")
        await hub.start()
        nc = await nats.connect(nats_url)
        jsm = nc.jsm()
        hub_db = _ro(hub.data_dir / "hub.db")
        agent = AgentProc(base / "edge", ["--nats", nats_url, "--join-token", hub.join_token()])
        progress("starting an agent joined to it")
        await agent.start()
        async with Api(agent.url, agent.token) as api:
            async def enrolled() -> bool:
                _, info = await api.call("GET", "/v1/info")
                return bool(info.get("link", {}).get("enrolled"))

            await wait_for("the agent to enroll", enrolled)
            _, info = await api.call("GET", "/v1/info")
            agent_id = info["agent_id"]
            task = await api.submit({"name": "real", "command": ["true"],
                                     "resources": {"cpus": 0.1, "mem_mb": 16}})
            await api.wait_state(task["id"], ("finished", "failed"))
            body = await api.task(task["id"])

        edge_db_path = agent.data_dir / "agent.db"

        def applied() -> int:
            assert hub_db is not None
            return int(_scalar(hub_db, "SELECT applied_seq FROM agents WHERE id = ?",
                               agent_id) or 0)

        def edge_last() -> int:
            db = _ro(edge_db_path)
            try:
                return int(_scalar(db, "SELECT max(seq) FROM events") or 0)
            finally:
                db.close()

        async def caught_up() -> bool:
            return applied() == edge_last()

        await wait_for("the hub to apply the real task", caught_up)
        agent.stop()

        progress(f"writing {DRAIN_N} task events into the stopped agent's outbox")
        backlog_end = _fill_outbox(edge_db_path, body, DRAIN_N)
        run = Drain(DRAIN_N, base_applied=applied())
        stream_base = await _stream_last_seq(jsm)
        cpu0 = {"hub": _cpu_s(hub.pid), "nats-server": _cpu_s(natsd_pid)}

        progress(f"draining {DRAIN_N} events edge -> hub")
        agent.proc = None
        start_task = asyncio.create_task(agent.start())
        await asyncio.sleep(0)  # start() spawns before its first await; started_at is set then
        assert agent.proc is not None
        t0 = agent.started_at
        edge_db: sqlite3.Connection | None = None
        stream_seen = stream_base
        deadline = time.perf_counter() + DRAIN_TIMEOUT_S
        while time.perf_counter() < deadline:
            await asyncio.sleep(POLL_S)
            now = time.perf_counter() - t0
            if run.served is None and start_task.done():
                await start_task  # raises if the agent failed to start
                run.served = now
            got = applied()
            if run.hub_first is None and got > run.base_applied:
                run.hub_first, run.hub_first_applied = now, got
            last = await _stream_last_seq(jsm)
            if last > stream_seen:
                stream_seen = last
                run.stream_last = now
                if run.stream_first is None:
                    run.stream_first = now
            if edge_db is None:
                edge_db = _ro(edge_db_path)
            edge = int(_scalar(edge_db, "SELECT max(seq) FROM events") or 0)
            if got >= backlog_end and got == edge:
                run.done, run.applied, run.last_seq = now, got, edge
                break
        if edge_db is not None:
            edge_db.close()
        await start_task
        run.cpu = {"agent": _cpu_s(agent.pid),
                   "hub": _cpu_s(hub.pid) - cpu0["hub"],
                   "nats-server": _cpu_s(natsd_pid) - cpu0["nats-server"]}
        if run.done is None:
            run.applied, run.last_seq = applied(), edge_last()
        run.messages = stream_seen - stream_base
        run.agent_id = agent_id
        run.agent_key = bytes(_scalar(hub_db, "SELECT public_key FROM agents WHERE id = ?",
                                      agent_id))
        for seq in range(stream_base + 1, stream_seen + 1):
            got_msg = await jsm.get_msg(subjects.EVENTS_STREAM, seq)
            data = bytes(got_msg.data or b"")
            run.sent.append(Message(got_msg.subject or "", data,
                                    (got_msg.headers or {}).get("Nats-Msg-Id", f"m{seq}"),
                                    count_events(data)))
        run.hub_tasks = int(_scalar(hub_db, "SELECT count(*) FROM tasks"))
        run.rejected = rejected_envelopes(await hub_metrics(hub.url, hub.token))
        return run
    finally:
        if hub_db is not None:
            hub_db.close()
        if nc is not None:
            await nc.close()
        if agent is not None:
            agent.stop()
        hub.stop()


def drain_rows(run: Drain, raw: Floors | None) -> list[Row]:
    n = run.n
    if run.done is None:
        return [FedRow(f"outbox drain ({n // 1000}k backlog): NOT caught up",
                       f"hub applied {run.applied}, edge last {run.last_seq} after "
                       f"{DRAIN_TIMEOUT_S:.0f} s", goal=f"< {DRAIN_GOAL_S:.0f} s", met=False)]
    rate = n / run.done
    shape = ""
    if raw is not None:
        shape = (f"same {raw.messages} msgs, {raw.per_message:.0f} events/msg, "
                 f"{sum(len(m.data) for m in run.sent) // max(1, raw.messages) // 1000} KB/msg")
    rows = [
        FedRow(f"outbox drain edge->hub ({n // 1000}k events, from agent spawn)", rate,
               "events/s", raw and raw.events_per_s(raw.publish),
               f"raw publish_async, {shape}, no hub" if raw else "raw floors FAILED",
               digits=0),
        FedRow(f"  {n // 1000}k backlog caught up in", run.done, "s", None,
               "agent spawn -> hub applied_seq == edge last seq", f"< {DRAIN_GOAL_S:.0f} s",
               run.done < DRAIN_GOAL_S),
    ]
    if run.served is not None:
        rows.append(FedRow("    of which agent start (URL written)", run.served, "s", None,
                           "python start, store, recovery, API up"))
    if run.stream_first is not None and run.stream_last is not None:
        span = run.stream_last - run.stream_first
        rows.append(FedRow("    agent publishing (stream grew, first -> last poll)", span, "s",
                           None, f"first message at {run.stream_first:.2f} s"))
        if run.messages:
            rows.append(FedRow("    events per JetStream message", n / run.messages, "", None,
                               f"{run.messages} messages for the backlog and announce",
                               digits=0))
    if run.stream_last is not None:
        rows.append(FedRow("    hub tail after the last publish", run.done - run.stream_last,
                           "s", None, f"polled every {POLL_S * 1000:.0f} ms"))
    rows.append(FedRow("    CPU during the drain", ", ".join(
        f"{k} {v:.2f} s" for k, v in run.cpu.items()),
        raw_what=f"{run.done:.2f} s wall on {os.cpu_count()} cores"))
    if run.hub_first is not None and run.done > run.hub_first:
        ingest = (run.applied - run.hub_first_applied) / (run.done - run.hub_first)
        rows.append(FedRow("hub ingest of the drain (applied_seq rise)", ingest, "events/s",
                           raw and raw.events_per_s(raw.fetch_ack),
                           f"raw fetch+ack, {shape}" if raw else "", f">= {HUB_GOAL // 1000}k/s",
                           ingest >= HUB_GOAL, digits=0))
        if raw is not None:
            rows.append(FedRow("  same, against raw fetch+verify+decode", ingest, "events/s",
                               raw.events_per_s(raw.fetch_verify_decode),
                               "raw fetch + Ed25519 open_envelope + orjson of each event + ack",
                               digits=0))
    if raw is not None:
        rows.append(FedRow("  raw publish / fetch+ack of those msgs, msgs/s",
                           f"{raw.publish:.0f} / {raw.fetch_ack:.0f} msgs/s",
                           raw_what=f"best of {RAW_REPEATS}, nats-py, fresh nats-server, "
                                    "OUTPOST_EVENTS config"))
    return rows


# ---------------------------------------------------------------- all


async def _guarded(name: str, job: Awaitable[list[Row]]) -> list[Row]:
    """A failing figure becomes a row saying so; the other figures still run."""
    try:
        return await job
    except Exception as exc:  # a bench reports, it does not stop
        progress(f"{name} failed: {exc!r}")
        return [FedRow(f"{name}: FAILED", f"{type(exc).__name__}: {exc}"[:100])]


async def bench_raw(base: Path, run: Drain) -> Floors:
    """The drain's own messages, published and consumed again on a fresh nats-server."""
    progress(f"raw JetStream: the drain's {len(run.sent)} messages again, no hub "
             f"(best of {RAW_REPEATS})")
    natsd = NatsServer(base / "nats-raw")
    await natsd.start()
    try:
        nc = await nats.connect(natsd.url)
        try:
            js = nc.jetstream(timeout=30, publish_async_max_pending=PIPELINE)
            await ensure_streams(js)
            return await floors(js, run.sent, {run.agent_id: run.agent_key},
                                publishes=RAW_REPEATS, consumes=RAW_REPEATS)
        finally:
            await nc.close()
    finally:
        await natsd.stop()


async def run_async() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="outpost-bench-fed-") as tmp:
        base = Path(tmp)

        async def drain() -> list[Row]:
            natsd = NatsServer(base / "nats")
            await natsd.start()
            try:
                assert natsd.pid is not None
                run = await run_drain(base, natsd.url, natsd.pid)
            finally:
                await natsd.stop()
            raw: Floors | None = None
            try:
                raw = await bench_raw(base, run)
            except Exception as exc:  # the drain's figures still stand
                progress(f"raw JetStream failed: {exc!r}")
            return [*drain_rows(run, raw), FedRow(
                "  checks", f"hub applied_seq {run.applied} == edge last seq {run.last_seq}: "
                f"{run.applied == run.last_seq}; hub tasks {run.hub_tasks} == N+1 "
                f"{run.n + 1}: {run.hub_tasks == run.n + 1}; rejected {run.rejected}")]

        return await _guarded("outbox drain", drain())


def run() -> list[Row]:
    """Every federation figure, each beside raw JetStream moving the same messages."""
    return asyncio.run(run_async())


if __name__ == "__main__":
    print(format_table(run()))
