"""Hub ingest from a fleet's small batches, next to raw fetch+ack and fetch+verify of the same
messages in the same run (issue 12's goal: >= 20,000 events/s from 1,000 agents).

Real parts: one ``nats-server`` (JetStream), a real ``python -m core_hub run`` on it. The
``AGENTS`` agents enroll through the hub's real enrollment subject (``wire.enroll_request``,
each its own Ed25519 key), then the hub stops. Each agent's traffic is what a real fleet sends:
``BATCHES`` signed batches (``wire.sign_batch``, the agent's own call) of 1-10 events each,
seeded at random, mostly task state changes (a task body as the edge stores it) and now and
then an offer, with the subject and ``Nats-Msg-Id`` the agent's publish loop uses. The batches
of all agents are interleaved (round by round, the agents in a shuffled order, each agent's in
seq order) and published into ``OUTPOST_EVENTS`` while no hub runs. Then, on that stream and
those messages, with nothing else running:

- raw publish, fetch+ack, fetch+verify, fetch+verify+decode (``bench.rawjs``): the floors;
- the hub starts again and ingests the backlog; its rate is the rise of the sum of the agents'
  ``applied_seq`` in its SQLite view (each agent's seqs are 1..n, so that sum counts events),
  between the first and the last poll (every ``POLL_S``) that saw it move.

A backlog gives the hub full fetches, as a fleet sending faster than the hub applies would.
Every rate is in events/s, the raw ones converted with the same messages' events per message.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import psutil

from bench.common import Row, format_table, hub_metrics, progress, rejected_envelopes
from bench.federation import HubProc
from bench.rawjs import Floors, Message, floors
from federation import subjects, wire
from federation.identity import id_from_public_key
from federation.natscreds import ENROLL_CREDENTIALS
from federation.natsd import NatsServer
from federation.streams import ensure_streams

AGENTS = int(os.environ.get("BENCH_INGEST_AGENTS", "1000"))
BATCHES = int(os.environ.get("BENCH_INGEST_BATCHES", "20"))  # per agent
MIN_EVENTS, MAX_EVENTS = 1, 10
OFFER_EVERY = 8  # about one batch in this many carries an offer
GOAL = 20_000
POLL_S = 0.05
TIMEOUT_S = 120.0
ENROLL_CONCURRENCY = 16

IngestRow = functools.partial(Row, area="ingest")



# ---------------------------------------------------------------- the fleet's traffic


class SimAgent:
    """An agent's key, id and event log: task bodies move pending -> running -> finished, a
    new task after each finish, as the edge's store writes them (``Store.to_api``: the spec,
    the state columns, ``healthy``, and the agent's own id and site)."""

    def __init__(self, index: int, rng: random.Random) -> None:
        self.index = index
        self.signer = wire.Signer(rng.randbytes(32))
        self.agent_id = id_from_public_key(self.signer.public)
        self.site = f"site-{index % 40:02d}"
        self.seq = 0
        self.tasks = 0
        self.rng = rng
        self.live: list[dict[str, Any]] = []

    def enroll_request(self, token: str) -> bytes:
        return wire.enroll_request(self.signer, token, name=f"ingest-{self.index}",
                                   site=self.site, labels={"zone": "bench"},
                                   resources={"cpus": 4, "mem_mb": 4096, "disk_mb": 0},
                                   version="bench")

    def _task_event(self, now: float) -> dict[str, Any]:
        if len(self.live) < 3 or self.rng.random() < 0.2:
            self.tasks += 1
            task = {"id": f"{self.agent_id[1:25]}{self.tasks:08x}", "name": f"job-{self.tasks}",
                    "command": ["/usr/bin/env", "python3", "-m", "worker", "--once"],
                    "env": {"MODE": "batch"}, "labels": {"team": "bench"},
                    "resources": {"cpus": 0.25, "mem_mb": 64, "disk_mb": 0},
                    "restart": {"policy": "never", "backoff": 1.0, "max_restarts": 0},
                    "kill_timeout": 10, "state": "pending", "exit_code": None,
                    "reason": None, "origin": "core", "generation": 1, "restarts": 0,
                    "pid": None, "created_at": now, "updated_at": now, "started_at": None,
                    "finished_at": None, "healthy": None, "agent_id": self.agent_id,
                    "site": self.site}
            self.live.append(task)
            return dict(task)
        task = self.live[self.rng.randrange(len(self.live))]
        if task["state"] == "pending":
            task.update(state="running", pid=self.rng.randrange(1000, 60000), started_at=now)
        else:
            task.update(state="finished", exit_code=0, finished_at=now)
            self.live.remove(task)
        task["updated_at"] = now
        return dict(task)

    def _offer(self, now: float) -> dict[str, Any]:
        return {"id": f"{self.agent_id}:{self.seq}", "agent_id": self.agent_id,
                "site": self.site, "labels": {"zone": "bench"}, "cpus": 3.0, "mem_mb": 3800,
                "disk_mb": 0, "used": {"cpus": 1.0, "mem_mb": 296, "disk_mb": 0},
                "created_at": now, "expires_at": now + 3600}

    def batch(self) -> Message:
        """The next signed batch of 1-10 events, as ``Sync._publish_loop`` sends it."""
        now = time.time()
        n = self.rng.randint(MIN_EVENTS, MAX_EVENTS)
        first = self.seq + 1
        events = []
        for i in range(n):
            self.seq += 1
            if i == 0 and self.rng.randrange(OFFER_EVERY) == 0:
                kind, body = "offer", self._offer(now)
            else:
                kind, body = "task", self._task_event(now)
            events.append(wire.Event(self.seq, kind, now, body))
        data = wire.sign_batch(self.agent_id, events, self.signer, first=first)
        return Message(subjects.events(self.agent_id), data,
                       wire.batch_msg_id(self.signer, self.agent_id, first, self.seq), n)


def fleet_traffic(agents: list[SimAgent], rounds: int, rng: random.Random) -> list[Message]:
    """``rounds`` batches per agent, interleaved: each round, every agent once, shuffled."""
    out: list[Message] = []
    order = list(agents)
    for _ in range(rounds):
        rng.shuffle(order)
        out.extend(agent.batch() for agent in order)
    return out


# ---------------------------------------------------------------- the run


async def enroll_all(nats_url: str, token: str, agents: list[SimAgent]) -> None:
    """Every agent through the hub's enrollment subject, ``ENROLL_CONCURRENCY`` at a time."""
    nc = await nats.connect(nats_url, **ENROLL_CREDENTIALS.connect_options())
    try:
        pending = iter(agents)

        async def worker() -> None:
            for agent in pending:
                reply = await nc.request(subjects.ENROLL, agent.enroll_request(token),
                                         timeout=10)
                answer = wire.unpack(reply.data)
                if not answer.get("ok") or answer.get("agent_id") != agent.agent_id:
                    raise RuntimeError(f"enrollment of {agent.index} refused: {answer}")

        await asyncio.gather(*(worker() for _ in range(ENROLL_CONCURRENCY)))
    finally:
        await nc.close()


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


@dataclass
class Ingested:
    """What the hub's ingest run saw (seconds after the hub's spawn)."""

    first_t: float | None = None
    first_applied: int = 0
    done_t: float | None = None
    applied: int = 0
    hub_cpu: float = 0.0
    nats_cpu: float = 0.0
    rejected: str = ""
    tasks: int = 0

    @property
    def rate(self) -> float:
        if self.first_t is None or self.done_t is None or self.done_t <= self.first_t:
            return 0.0
        return (self.applied - self.first_applied) / (self.done_t - self.first_t)


async def hub_ingest(hub: HubProc, natsd_pid: int, total: int) -> Ingested:
    """Start the hub on the backlog; poll its view until every event is applied."""
    out = Ingested()
    db: sqlite3.Connection | None = None
    cpu_nats = _cpu_s(natsd_pid)
    start = asyncio.create_task(hub.start())
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    try:
        deadline = t0 + TIMEOUT_S
        while time.perf_counter() < deadline:
            await asyncio.sleep(POLL_S)
            if db is None:
                if hub.proc is None or not (hub.data_dir / "hub.db").exists():
                    continue
                db = _ro(hub.data_dir / "hub.db")
            now = time.perf_counter() - t0
            got = int(db.execute("SELECT coalesce(sum(applied_seq), 0) FROM agents")
                      .fetchone()[0])
            if out.first_t is None and got > 0:
                out.first_t, out.first_applied = now, got
            out.applied = got
            if got >= total:
                out.done_t = now
                break
        await start
        out.hub_cpu = _cpu_s(hub.pid)
        out.nats_cpu = _cpu_s(natsd_pid) - cpu_nats
        assert db is not None
        out.tasks = int(db.execute("SELECT count(*) FROM tasks").fetchone()[0])
        out.rejected = rejected_envelopes(await hub_metrics(hub.url, hub.token))
        return out
    finally:
        if db is not None:
            db.close()
        if not start.done():
            start.cancel()


def rows(raw: Floors, run: Ingested, total: int) -> list[Row]:
    per = raw.per_message
    shape = (f"same {raw.messages} msgs, {per:.1f} events/msg "
             f"({MIN_EVENTS}-{MAX_EVENTS}), {AGENTS} agents")
    rate = run.rate
    out = [
        IngestRow(f"hub ingest, {AGENTS} agents' small batches (backlog)", rate, "events/s",
                  raw.events_per_s(raw.fetch_ack), f"raw fetch+ack, {shape}",
                  f">= {GOAL:,} events/s", rate >= GOAL, digits=0),
        IngestRow("  same, against raw fetch+verify", rate, "events/s",
                  raw.events_per_s(raw.fetch_verify),
                  "raw fetch + Ed25519 open_envelope + ack, same msgs", digits=0),
        IngestRow("  same, against raw fetch+verify+decode", rate, "events/s",
                  raw.events_per_s(raw.fetch_verify_decode),
                  "as above + orjson.loads of every event body", digits=0),
        IngestRow("  hub ingest in messages", rate / per if per else 0.0, "msgs/s",
                  raw.fetch_ack, "raw fetch+ack of the same msgs", digits=0),
        IngestRow("  raw publish of the same msgs (context)", raw.events_per_s(raw.publish),
                  "events/s", None,
                  f"{raw.publish:.0f} msgs/s, publish_async, no hub running", digits=0),
    ]
    if run.done_t is not None and run.first_t is not None:
        span = run.done_t - run.first_t
        out.append(IngestRow(
            "  CPU over the hub's run", f"hub {run.hub_cpu:.2f} s (incl. start), "
            f"nats-server {run.nats_cpu:.2f} s",
            raw_what=f"{span:.2f} s of ingest on {os.cpu_count()} cores; polled every "
                     f"{POLL_S * 1000:.0f} ms"))
    out.append(IngestRow(
        "  checks", f"applied {run.applied} == sent {total}: {run.applied == total}; "
        f"tasks in view {run.tasks}; rejected {run.rejected}"))
    return out


async def run_async() -> list[Row]:
    rng = random.Random(12)
    with tempfile.TemporaryDirectory(prefix="outpost-bench-ingest-") as tmp:
        base = Path(tmp)
        natsd = NatsServer(base / "nats")
        await natsd.start()
        hub = HubProc(base / "hub", natsd.url)
        nc: Any = None
        try:
            assert natsd.pid is not None
            progress(f"ingest: enrolling {AGENTS} agents at a real hub")
            await hub.start()
            agents = [SimAgent(i, rng) for i in range(AGENTS)]
            await enroll_all(natsd.url, hub.join_token(uses=AGENTS), agents)
            hub.stop()
            progress(f"ingest: signing {AGENTS} x {BATCHES} batches of "
                     f"{MIN_EVENTS}-{MAX_EVENTS} events")
            msgs = fleet_traffic(agents, BATCHES, rng)
            total = sum(m.events for m in msgs)
            nc = await nats.connect(natsd.url)
            js = nc.jetstream(timeout=30, publish_async_max_pending=512)
            await ensure_streams(js)
            keys = {a.agent_id: a.signer.public for a in agents}
            progress(f"ingest: raw floors on the same {len(msgs)} msgs ({total} events)")
            # Published once: the stream holds exactly what the hub will ingest.
            raw = await floors(js, msgs, keys, publishes=1, consumes=2)
            await nc.close()
            nc = None
            progress("ingest: the hub ingests the backlog")
            run = await hub_ingest(hub, natsd.pid, total)
            return rows(raw, run, total)
        finally:
            if nc is not None:
                await nc.close()
            hub.stop()
            await natsd.stop()


def run() -> list[Row]:
    """The ingest goal's figures (about a minute with 1,000 agents)."""
    try:
        return asyncio.run(run_async())
    except Exception as exc:  # a bench reports, it does not stop
        progress(f"ingest failed: {exc!r}")
        return [IngestRow("ingest: FAILED", f"{type(exc).__name__}: {exc}"[:100])]


if __name__ == "__main__":
    print(format_table(run()))
