"""Hub ingest against a real nats-server and a real SQLite view: guarantee 2 from the hub side.

Agents are real Ed25519 keys enrolled in the store; envelopes are made with ``wire.sign_batch``
and published to OUTPOST_EVENTS the way the outbox does. Each test waits on the ingest's own
progress (the view's stream floor), never on a sleep.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from core_hub.ingest import LOST_REASON, ChunkSizer, Ingest
from core_hub.store import HubStore
from federation import subjects, wire
from federation.identity import id_from_public_key
from federation.natsd import NatsServer
from federation.streams import ensure_streams
from federation.wire import Event, Signer
from tests.helpers import wait_until
from tests.nats_fixtures import connect

T0 = 1_700_000_000.0


class Edge:
    """An agent's signing side: its key, id, and next event seq."""

    def __init__(self, seed: int, name: str = "edge") -> None:
        self.signer = Signer(bytes([seed]) * 32)
        self.id = id_from_public_key(self.signer.public)
        self.name = name
        self.seq = 0

    def enroll(self, store: HubStore) -> None:
        store.enroll_agent(self.id, self.signer.public, name=self.name, site="plant-a",
                           labels={}, resources={}, version="0.1.0", now=T0)

    def batch(self, *items: tuple[str, Any], seqs: list[int] | None = None,
              first: int | None = None, signer: Signer | None = None) -> bytes:
        """One signed envelope of ``(kind, body)`` events with the next seqs (or ``seqs``)."""
        if seqs is None:
            seqs = list(range(self.seq + 1, self.seq + 1 + len(items)))
        self.seq = max(self.seq, seqs[-1])
        events = [Event(seq, kind, T0 + seq, body) for seq, (kind, body) in zip(seqs, items,
                                                                              strict=True)]
        return wire.sign_batch(self.id, events, signer or self.signer, ts=T0 + seqs[-1],
                               first=first)


def task(task_id: str, state: str, generation: int = 1) -> tuple[str, dict[str, Any]]:
    return "task", {"id": task_id, "name": f"job-{task_id}", "state": state,
                    "generation": generation, "exit_code": None, "reason": None,
                    "origin": "edge", "agent_id": "", "updated_at": T0}


def reported(edge: Edge, task_id: str, state: str, **fields: Any) -> tuple[str, bytes]:
    """A task event as an edge ships it: JSON text that names the edge as ``agent_id``."""
    return "task", orjson.dumps({**task(task_id, state)[1], "agent_id": edge.id, **fields})


@dataclass
class Hub:
    js: JetStreamContext
    store: HubStore
    dir: Path

    async def publish(self, edge_or_agent: Edge | str, data: bytes,
                      msg_id: str | None = None) -> int:
        """Publish on that agent's events subject; returns the stream sequence."""
        agent = edge_or_agent if isinstance(edge_or_agent, str) else edge_or_agent.id
        ack = await self.js.publish(f"{subjects.PREFIX}.events.{agent}", data,
                                    headers={"Nats-Msg-Id": msg_id} if msg_id else None)
        return ack.seq

    def states(self, agent: str | None = None) -> dict[str, str]:
        return {t["id"]: t["state"] for t in self.store.list_tasks(agent_id=agent)}

    def rows(self) -> dict[str, tuple[str, str, float]]:
        """Each task's stored (agent_id, body text, updated_at), read from the file."""
        with closing(sqlite3.connect(self.dir / "hub.db")) as db:
            return {row[0]: row[1:] for row in db.execute(
                "SELECT id, agent_id, body, updated_at FROM tasks")}

    def view(self) -> dict[str, Any]:
        """Everything ingest builds, for comparing two views."""
        agents = [{k: v for k, v in a.items() if k != "enrolled_at"}
                  for a in self.store.list_agents()]
        return {"agents": agents, "tasks": self.store.list_tasks(),
                "offers": self.store.list_offers(), "results": self.store.list_results(),
                "stream_seq": self.store.stream_seq}


@pytest.fixture
async def hub(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Hub]:
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await ensure_streams(js)
        h = Hub(js, HubStore(tmp_path / "hub.db"), tmp_path)
        try:
            yield h
        finally:
            h.store.close()


@asynccontextmanager
async def ingesting(hub: Hub, **options: Any) -> AsyncIterator[Ingest]:
    options.setdefault("gap_delay_s", 0.05)
    options.setdefault("fetch_timeout_s", 0.5)
    ingest = Ingest(hub.js, hub.store, **options)
    await ingest.start()
    try:
        yield ingest
    finally:
        await ingest.stop()


async def caught_up(ingest: Ingest, hub: Hub, stream_seq: int) -> None:
    await ingest.wait_until(lambda: hub.store.stream_seq >= stream_seq)


async def test_batches_apply_in_order_once(hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    ids = [f"t{i}" for i in range(10)]
    await hub.publish(a, a.batch(*(task(t, "pending") for t in ids)), subjects.msg_id(a.id, 10))
    await hub.publish(a, a.batch(*(task(t, "running") for t in ids)), subjects.msg_id(a.id, 20))
    last = await hub.publish(a, a.batch(
        *(task(t, "finished") for t in ids[:5]),
        ("agent", {"id": "someone-else", "name": "edge", "site": "plant-a", "status": "online",
                   "version": "0.2.0", "isolation": "cgroup-v1", "labels": {"gpu": "no"},
                   "resources": {"cpus": 4, "mem_mb": 2048}, "used": {"cpus": 1}}),
        ("offer", {"id": "o1", "agent_id": a.id, "site": "plant-a", "labels": {},
                   "cpus": 3.0, "mem_mb": 1024, "disk_mb": 0, "expires_at": T0 + 60}),
        ("result", {"command_id": "c1", "status": "applied", "detail": "", "task_id": "t1"})),
        subjects.msg_id(a.id, 28))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
        assert ingest.stats.as_dict() == {
            "applied_events": 28, "applied_envelopes": 3, "duplicates": 0, "gaps": 0,
            "rejected": {}, "bad_events": 0, "foreign_tasks": 0, "apply_errors": 0,
            "refused_claims": {}}
    assert hub.states() == {t: "finished" if i < 5 else "running" for i, t in enumerate(ids)}
    assert {t["agent_id"] for t in hub.store.list_tasks()} == {a.id}
    agent = hub.store.get_agent(a.id)
    assert (agent["id"], agent["applied_seq"], agent["version"], agent["isolation"],
            agent["labels"], agent["resources"], agent["used"], agent["last_seen"]) == (
                a.id, 28, "0.2.0", "cgroup-v1", {"gpu": "no"}, {},  # resources: as enrolled
                {"cpus": 1}, T0 + 28)
    assert [o["id"] for o in hub.store.list_offers(now=T0)] == ["o1"]
    assert hub.store.list_offers(now=T0 + 61) == []
    assert hub.store.get_result("c1")["status"] == "applied"
    assert hub.store.stream_seq == last == 3


async def test_state_changes_become_history_bounded_per_task(hub: Hub) -> None:
    """One history row per change of state (a repeat within a batch is not a change), with
    the exit code and reason; a task's history is cut back to its newest rows."""
    a = Edge(1)
    a.enroll(hub.store)
    last = await hub.publish(a, a.batch(
        task("t1", "pending"), task("t1", "running"), task("t1", "running"),
        reported(a, "t1", "failed", exit_code=3, reason="exit 3")))
    flapping = [task("t2", state) for _ in range(150) for state in ("running", "failed")]
    for i in range(0, len(flapping), 100):
        last = await hub.publish(a, a.batch(*flapping[i:i + 100]))
    async with ingesting(hub, history_prune_s=0.0) as ingest:
        await caught_up(ingest, hub, last)
        rows = hub.store.task_history("t1")
        assert [(r["state"], r["exit_code"], r["reason"]) for r in rows] == [
            ("pending", None, None), ("running", None, None), ("failed", 3, "exit 3")]
        await ingest.wait_until(lambda: len(hub.store.task_history("t2")) <= 2 * 100)
    t2 = hub.store.task_history("t2")
    assert t2[-1]["state"] == "failed" and [r["ts"] for r in t2] == sorted(r["ts"] for r in t2)


async def test_same_envelope_twice_is_applied_once(hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    first = a.batch(task("t1", "running"))
    second = a.batch(task("t1", "finished"))
    await hub.publish(a, first, subjects.msg_id(a.id, 1))
    ack = await hub.js.publish(subjects.events(a.id), first,
                               headers={"Nats-Msg-Id": subjects.msg_id(a.id, 1)})
    assert ack.duplicate  # JetStream itself dropped the re-send with the same id
    await hub.publish(a, first)  # no Nats-Msg-Id: the stream holds it twice
    await hub.publish(a, second, subjects.msg_id(a.id, 2))
    last = await hub.publish(a, first, "another-id")  # and once more, after the next one
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
        assert (ingest.stats.applied_events, ingest.stats.duplicates) == (2, 2)
    assert hub.states() == {"t1": "finished"}
    assert hub.store.get_agent(a.id)["applied_seq"] == 2


async def test_out_of_order_batches_wait_and_apply_in_order(hub: Hub) -> None:
    a, b = Edge(1, "a"), Edge(2, "b")
    a.enroll(hub.store)
    b.enroll(hub.store)
    # b: batch 2 lands before batch 1 in the same fetch: put in order there, no nak.
    b1 = b.batch(task("b1", "pending"), task("b1", "running"))
    b2 = b.batch(task("b1", "finished"))
    await hub.publish(b, b2)
    b_last = await hub.publish(b, b1)
    # a: batch 2 arrives alone, waits (nak'd, redelivered) until batch 1 comes.
    a1 = a.batch(task("a1", "pending"), task("a1", "running"))
    a2 = a.batch(task("a1", "killed"), task("a2", "running"))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, b_last)
        assert hub.states(b.id) == {"b1": "finished"} and ingest.stats.gaps == 0
        a2_seq = await hub.publish(a, a2)
        await ingest.wait_until(lambda: ingest.stats.gaps >= 2)  # redelivered, still waiting
        assert hub.states(a.id) == {} and hub.store.stream_seq == a2_seq - 1
        last = await hub.publish(a, a1)
        await caught_up(ingest, hub, last)
        assert ingest.stats.applied_events == 7
    assert hub.states(a.id) == {"a1": "killed", "a2": "running"}
    assert hub.store.get_agent(a.id)["applied_seq"] == 4


async def test_batch_with_coalesced_seqs_applies_and_real_gaps_wait(hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    await hub.publish(a, a.batch(task("t1", "pending"), task("t2", "pending")))
    # seqs 3, 4 and 6 were superseded states the edge coalesced away: first=3 says so.
    await hub.publish(a, a.batch(task("t1", "running"), task("t2", "running"),
                                 seqs=[5, 7], first=3))
    later = a.batch(task("t1", "finished"), seqs=[9], first=9)  # seq 8 is missing: a gap
    async with ingesting(hub) as ingest:
        later_seq = await hub.publish(a, later)
        await ingest.wait_until(lambda: ingest.stats.gaps >= 1)
        assert hub.store.get_agent(a.id)["applied_seq"] == 7
        assert hub.states() == {"t1": "running", "t2": "running"}
        last = await hub.publish(a, a.batch(task("t2", "failed"), seqs=[8]))
        await caught_up(ingest, hub, max(last, later_seq))
    assert hub.states() == {"t1": "finished", "t2": "failed"}
    assert hub.store.get_agent(a.id)["applied_seq"] == 9


async def test_forged_envelopes_are_rejected_counted_and_never_applied(hub: Hub) -> None:
    a, b, revoked, unknown = Edge(1, "a"), Edge(2, "b"), Edge(3, "r"), Edge(4, "u")
    for edge in (a, b, revoked):
        edge.enroll(hub.store)
    hub.store.revoke_agent(revoked.id)
    await hub.publish(unknown, unknown.batch(task("u1", "running")))
    await hub.publish(a, a.batch(task("x1", "running"), signer=b.signer))  # wrong key
    await hub.publish(b, a.batch(task("x2", "running"), seqs=[1]))  # a's envelope, b's subject
    await hub.publish(revoked, revoked.batch(task("r1", "running")))
    good = a.batch(task("x3", "running"), seqs=[1])
    await hub.publish(a, good.replace(b"running", b"runnin!"))  # tampered bytes
    await hub.publish(a, b"\x93not an envelope")
    await hub.publish("NotAnAgent", good)
    await hub.publish(a, wire.sign_envelope("kill", a.id, 1, {"task_id": "x"}, a.signer))
    last = await hub.publish(a, good)
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
        assert ingest.stats.rejected == {"unknown_agent": 1, "signature": 2, "wrong_agent": 1,
                                         "revoked": 1, "malformed": 1, "subject": 1,
                                         "kind": 1}
        assert ingest.stats.applied_events == 1
    assert hub.states() == {"x3": "running"}
    assert [(ag["id"], ag["applied_seq"]) for ag in hub.store.list_agents()] == sorted(
        [(a.id, 1), (b.id, 0), (revoked.id, 0)])


async def test_an_agent_speaks_only_for_its_own_tasks_and_bad_bodies_are_skipped(
        hub: Hub) -> None:
    a, b = Edge(1, "a"), Edge(2, "b")
    a.enroll(hub.store)
    b.enroll(hub.store)
    await hub.publish(a, a.batch(task("mine", "running")))
    last = await hub.publish(b, b.batch(
        task("mine", "killed"), ("task", {"name": "no id", "state": "running"}),
        ("offer", {"cpus": "lots"}), ("result", {"command_id": "c9", "status": "maybe"}),
        task("theirs", "running")))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
        assert (ingest.stats.foreign_tasks, ingest.stats.bad_events,
                ingest.stats.applied_events) == (1, 3, 3)
    assert hub.states() == {"mine": "running", "theirs": "running"}
    assert hub.store.get_task("mine")["agent_id"] == a.id
    assert hub.store.get_agent(b.id)["applied_seq"] == 5  # skipped, not stuck


async def test_task_text_naming_its_sender_is_stored_as_sent(hub: Hub) -> None:
    a, b = Edge(1, "a"), Edge(2, "b")
    a.enroll(hub.store)
    b.enroll(hub.store)
    # Not orjson's own spelling (spaces, escapes, exponents): kept as it came all the same.
    odd = ('{"id": "t1", "name": "caf\\u00e9\\n", "state": "finished", "generation": 2,'
           f' "exit_code": 1E0, "agent_id": "{a.id}", "updated_at": 1.7e9}}').encode()
    claims_b = reported(a, "t2", "running", agent_id=b.id)
    # Duplicate keys: a reader keeps the last one, as orjson did when the hub decoded it.
    last_is_a = ("task", orjson.dumps({"agent_id": b.id, **task("t3", "running")[1]})[:-1]
                 + f',"agent_id":"{a.id}"}}'.encode())
    last_is_b = ("task", reported(a, "t4", "running")[1][:-1] + f',"agent_id":"{b.id}"}}'.encode())
    no_time = reported(a, "t5", "running")
    no_time = ("task", orjson.dumps({k: v for k, v in orjson.loads(no_time[1]).items()
                                     if k != "updated_at"}))
    last = await hub.publish(a, a.batch(
        reported(a, "t1", "running"), claims_b, last_is_a, ("task", odd), last_is_b, no_time,
        reported(a, "t6", "pending")))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
        assert (ingest.stats.applied_events, ingest.stats.bad_events) == (7, 0)
    rows = hub.rows()
    assert rows["t1"] == (a.id, odd.decode(), 1.7e9)  # the last of t1's two, coalesced
    assert rows["t3"][1] == last_is_a[1].decode()
    assert rows["t6"][1] == reported(a, "t6", "pending")[1].decode()
    # Text naming someone else is stored with the sender put in, like a task without text.
    assert orjson.loads(rows["t2"][1]) == {**orjson.loads(claims_b[1]), "agent_id": a.id}
    assert rows["t5"][2] == T0 + 7  # no updated_at: the envelope's last task event's ts
    for task_id in ("t1", "t2", "t3", "t4", "t5", "t6"):
        assert rows[task_id][0] == a.id
        assert hub.store.get_task(task_id)["agent_id"] == a.id
    assert hub.store.get_task("t1") == orjson.loads(odd)
    assert hub.states() == {"t1": "finished", "t2": "running", "t3": "running", "t4": "running",
                            "t5": "running", "t6": "pending"}


async def test_malformed_task_texts_are_counted_and_skipped(hub: Hub) -> None:
    a, b = Edge(1, "a"), Edge(2, "b")
    a.enroll(hub.store)
    b.enroll(hub.store)
    await hub.publish(b, b.batch(reported(b, "b1", "running")))
    good = orjson.loads(reported(a, "x", "running")[1])

    def text(**change: Any) -> tuple[str, bytes]:
        return "task", orjson.dumps({k: v for k, v in {**good, **change}.items()
                                     if v is not ...})

    def spliced(raw: bytes) -> tuple[str, bytes]:  # one more member, as JSON text
        return "task", orjson.dumps(good)[:-1] + b"," + raw + b"}"

    bad = [("task", b"{not json"), ("task", b"[]"), ("task", b'"t1"'), ("task", b"null"),
           ("task", b""), ("task", orjson.dumps(good) + b" x"), ("task", b"\xff\xfe{}"),
           text(id=5), text(id=""), text(id="x" * 129), text(id=...), text(name=None),
           text(name=...), text(state="sleeping"), text(state=...), text(generation=1.5),
           text(generation=True), text(generation=None), text(generation="2"),
           text(state=["running"]), text(state={"running": 1}), text(id=["x"]),
           spliced(b'"n":"\\ud800"'), spliced(b'"n":1e400'), spliced(b'"n":NaN'),
           spliced(b'"n":"a\tb"')]
    bad.append(("result", orjson.dumps({"command_id": "c1", "status": ["applied"]})))
    last = await hub.publish(a, a.batch(
        *bad, text(id="x" * 128, generation=...), reported(a, "b1", "killed"),
        ("task", orjson.dumps({"id": "t1", "name": "n", "state": "pending"}))))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
        assert (ingest.stats.bad_events, ingest.stats.applied_events,
                ingest.stats.foreign_tasks) == (len(bad), 1 + 3, 1)
    assert hub.states() == {"x" * 128: "running", "b1": "running", "t1": "pending"}
    assert hub.store.get_task("b1")["agent_id"] == b.id
    assert hub.store.get_task("t1")["agent_id"] == a.id
    assert hub.store.get_agent(a.id)["applied_seq"] == len(bad) + 3


async def test_a_single_event_envelope_is_applied(hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    body = {**task("t1", "running")[1], "agent_id": a.id}
    await hub.publish(a, wire.sign_envelope("task", a.id, 1, body, a.signer, ts=T0))
    last = await hub.publish(a, wire.sign_envelope("task", a.id, 2, {"id": 7}, a.signer))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
        assert (ingest.stats.applied_events, ingest.stats.bad_events) == (1, 1)
    assert hub.store.get_task("t1") == body


async def test_snapshot_reconcile_marks_missing_tasks_lost(hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    await hub.publish(a, a.batch(task("t1", "running"), task("t2", "running"),
                                 task("t3", "starting"), task("t4", "finished")))
    last = await hub.publish(a, a.batch(("snapshot", {"tasks": [
        task("t1", "running", 2)[1], task("t3", "finished")[1], task("t5", "pending")[1]]})))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
    assert hub.states() == {"t1": "running", "t2": "lost", "t3": "finished", "t4": "finished",
                            "t5": "pending"}
    lost = hub.store.get_task("t2")
    assert (lost["state"], lost["reason"], lost["updated_at"]) == ("lost", LOST_REASON, T0 + 5)
    assert hub.store.get_task("t1")["generation"] == 2


async def test_a_restarted_ingest_resumes_without_reapplying(hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    await hub.publish(a, a.batch(task("t1", "pending")))
    first_end = await hub.publish(a, a.batch(task("t1", "running")))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, first_end)
    last = await hub.publish(a, a.batch(task("t1", "finished"), task("t2", "running")))
    async with ingesting(hub) as ingest:  # a new instance on the same store
        await caught_up(ingest, hub, last)
        assert ingest.stats.as_dict() == {
            "applied_events": 2, "applied_envelopes": 1, "duplicates": 0, "gaps": 0,
            "rejected": {}, "bad_events": 0, "foreign_tasks": 0, "apply_errors": 0,
            "refused_claims": {}}
    assert hub.states() == {"t1": "finished", "t2": "running"}


async def test_a_deleted_view_is_rebuilt_equal_from_the_stream(hub: Hub) -> None:
    a, b = Edge(1, "a"), Edge(2, "b")
    for edge in (a, b):
        edge.enroll(hub.store)
    for round_ in range(3):
        await hub.publish(a, a.batch(*(task(f"a{i}", "running", round_ + 1) for i in range(20)),
                                     ("offer", {"cpus": 1.0 + round_, "mem_mb": 64,
                                                "expires_at": T0 + round_})))
        await hub.publish(b, b.batch(task(f"b{round_}", "finished"),
                                     ("result", {"command_id": f"c{round_}",
                                                 "status": "applied", "detail": "ok"})))
    await hub.publish(b, b.batch(("agent", {"status": "draining", "version": "0.3"})))
    await hub.publish(a, a.batch(("snapshot", {"tasks": [task("a0", "running", 3)[1]]})))
    last = await hub.publish(b, b"\x93forged")
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)
    before = hub.view()
    assert before["stream_seq"] == last and len(before["tasks"]) == 23

    hub.store.close()
    for suffix in ("", "-wal", "-shm"):
        (hub.dir / f"hub.db{suffix}").unlink(missing_ok=True)
    assert not os.path.exists(hub.dir / "hub.db")
    hub.store = HubStore(hub.dir / "hub.db")
    # Agent keys are the registry, not the view: the enrollments are restored first.
    for edge in (a, b):
        edge.enroll(hub.store)
    async with ingesting(hub, batch=3) as ingest:
        await caught_up(ingest, hub, last)
        assert ingest.stats.duplicates == 0 and ingest.stats.rejected == {"malformed": 1}
    assert hub.view() == before


async def test_a_restart_while_an_envelope_waits_does_not_skip_it(hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    a1 = a.batch(task("t1", "pending"), task("t1", "running"))
    a2 = a.batch(task("t1", "finished"))
    # Batch 2 lands first and waits; batch 1 then applies. The view's stream floor must stay
    # below batch 2 (not jump to batch 1's stream seq), or a restart now would skip it.
    async with ingesting(hub, gap_delay_s=60) as ingest:
        await hub.publish(a, a2)
        await ingest.wait_until(lambda: ingest.stats.gaps >= 1)
        await hub.publish(a, a1)
        await ingest.wait_until(lambda: hub.store.get_agent(a.id)["applied_seq"] == 2)
        assert hub.store.stream_seq == 0 and ingest.floor == 0
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, 2)
        assert (ingest.stats.applied_events, ingest.stats.duplicates) == (1, 1)
    assert hub.states() == {"t1": "finished"}
    assert hub.store.get_agent(a.id)["applied_seq"] == 3


async def test_an_envelope_that_cannot_be_stored_is_retried_not_skipped(hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    await hub.publish(a, a.batch(task("t1", "running")))
    kind, body = task("t2", "running")
    # Valid JSON text the hub can read but not store again (nested past orjson's write limit).
    raw = orjson.dumps(body)[:-1] + b',"deep":' + b"[" * 300 + b"]" * 300 + b"}"
    await hub.publish(a, a.batch(task("t1", "finished"), (kind, raw)))
    await hub.publish(a, a.batch(task("t3", "running")))
    async with ingesting(hub, error_delay_s=0.05) as ingest:
        await ingest.wait_until(lambda: ingest.stats.apply_errors >= 2 and ingest.stats.gaps)
        # Nothing of the failing envelope, nor anything after it, reached the view.
        assert hub.states() == {"t1": "running"}
        assert hub.store.get_agent(a.id)["applied_seq"] == 1
        assert hub.store.stream_seq == 1


async def test_text_nested_deeper_than_orjson_writes_is_not_stored_as_sent(hub: Hub) -> None:
    a, b = Edge(1, "a"), Edge(2, "b")
    a.enroll(hub.store)
    b.enroll(hub.store)

    def nested(edge: Edge, depth: int) -> tuple[str, bytes]:  # the task map is one level
        text = reported(edge, "t-" + edge.name, "running")[1]
        return "task", text[:-1] + b',"deep":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    # Both name their sender. The view holds no body orjson could not write again (nor, a
    # little deeper, json.loads read): a's is encoded, which fails as before, and retried.
    await hub.publish(a, a.batch(nested(a, 255)))
    last = await hub.publish(b, b.batch(nested(b, 254)))
    async with ingesting(hub, error_delay_s=0.05) as ingest:
        await ingest.wait_until(lambda: ingest.stats.apply_errors >= 2
                                and hub.store.get_agent(b.id)["applied_seq"] == 1)
    assert hub.states() == {"t-b": "running"} and hub.store.stream_seq == last - 2
    assert hub.rows()["t-b"][1] == nested(b, 254)[1].decode()


async def test_commits_reach_the_database_file_without_the_writer_checkpointing(
        hub: Hub) -> None:
    a = Edge(1)
    a.enroll(hub.store)
    last = await hub.publish(a, a.batch(reported(a, "t1", "running")))
    async with ingesting(hub) as ingest:
        await caught_up(ingest, hub, last)

    def in_file() -> set[str]:  # what a copy of the file alone, without its WAL, holds
        shutil.copyfile(hub.dir / "hub.db", hub.dir / "copy.db")
        try:
            with closing(sqlite3.connect(hub.dir / "copy.db")) as db:
                return {row[0] for row in db.execute("SELECT id FROM tasks")}
        except sqlite3.DatabaseError:  # copied mid-write, or before the schema got there
            return set()

    # The writer checkpoints only past 128 MB of WAL; the store's own thread copies these
    # few pages into the file soon after the commit. No event says when: poll the file.
    wait_until(lambda: in_file() == {"t1"}, interval=0.02, what="t1 in the database file")


async def floors_seen_while_ingesting(hub: Hub, envelopes: int,
                                      options: Callable[[int], dict[str, Any]],
                                      ) -> tuple[Ingest, list[int]]:
    """Ingest a backlog of ``envelopes`` 4-event envelopes with ``options(size of one)``, while
    a task notes the ingest's floor each time the loop runs it; the ingest and the floors seen
    strictly between none and all."""
    a = Edge(1)
    a.enroll(hub.store)
    for n in range(envelopes):
        last = await hub.publish(a, a.batch(*(reported(a, f"t{n}-{i}", "running")
                                              for i in range(4))))
    size = len(a.batch(*(reported(a, f"probe-{i}", "running") for i in range(4))))
    seen: set[int] = set()

    async def note_floor() -> None:
        while True:
            seen.add(ingest.floor)
            await asyncio.sleep(0)

    async with ingesting(hub, **options(size)) as ingest:
        watcher = asyncio.create_task(note_floor())
        try:
            await caught_up(ingest, hub, last)
        finally:
            watcher.cancel()
    assert hub.store.stream_seq == last == envelopes
    assert ingest.stats.applied_events == envelopes * 4 and ingest.stats.duplicates == 0
    return ingest, sorted(floor for floor in seen if 0 < floor < last)


async def test_the_event_loop_runs_between_the_chunks_of_one_fetch(hub: Hub) -> None:
    """A backlog of big envelopes (a reconnect storm) comes in fetches of many chunks; each
    chunk is one transaction, so that the API, heartbeats and NATS pings wait for one chunk at
    most. They waited for the whole fetch: the chunks ran back to back without giving the
    loop back (acks do not suspend), and ``bench.storm`` saw ``GET /v1/agents`` take up to
    4 s. Here the loop must run at the end of (nearly) every chunk of one fetch."""
    # Chunks of about 4 envelopes: about 10 chunks, in one fetch of the whole backlog.
    _, between = await floors_seen_while_ingesting(
        hub, 40, lambda size: {"max_chunk_bytes": 4 * size})
    assert len(between) >= 6, f"the loop ran only at floors {between}"


async def test_a_chunk_takes_what_applies_within_its_time_budget(hub: Hub) -> None:
    """Bytes alone did not bound how long a chunk holds the loop: 1 MB of a storm's 50-event
    envelopes took ~0.3 s, and every API request waited that long (``bench.storm``'s p99
    200-230 ms). A chunk now takes what applies in ``chunk_budget_s`` at the rate measured so
    far. With a budget no envelope fits in, each chunk is the smallest allowed (here one
    envelope), though the whole backlog would fit in one 1 MB chunk: the loop runs between
    (nearly) every two envelopes, and every event is still applied once."""
    envelopes = 30
    ingest, between = await floors_seen_while_ingesting(
        hub, envelopes, lambda size: {"chunk_budget_s": 1e-9, "min_chunk_bytes": size})
    assert ingest.chunks.max_bytes == 1 << 20  # all of it in one chunk, by bytes
    assert len(between) >= envelopes // 2, f"the loop ran only at floors {between}"


def wal_frames(db_path: Path) -> int:
    """``mxFrame`` of the WAL-index header in the ``-shm`` file (sqlite.org/walformat.html):
    how many frames the WAL holds now, 0 right after it started again."""
    with open(f"{db_path}-shm", "rb") as shm:
        shm.seek(16)
        return int.from_bytes(shm.read(4), sys.byteorder)


async def test_a_sustained_ingest_lets_the_wal_start_again_off_the_event_loop(
        hub: Hub, tmp_path: Path) -> None:
    """A PASSIVE checkpoint on the store's thread copies the frames there are when it starts,
    and under a sustained ingest a commit always landed meanwhile, so the WAL never started
    again: it grew to the writer's safety mark, and each 128 MB the writer checkpointed on the
    event loop (commits of 100-190 ms, every API request waiting). Here, with the marks scaled
    down (safety 600 pages, drain 150), ingest must hold its writes while the thread copies
    the whole WAL once it is past the drain mark: the WAL starts again each time, never near
    the safety mark, and every event is applied once."""
    path = tmp_path / "small-wal.db"
    store = HubStore(path, wal_safety_pages=600, wal_drain_pages=150, checkpoint_every_s=0.01)
    small = Hub(hub.js, store, tmp_path)
    a = Edge(1)
    a.enroll(store)
    envelopes, per = 40, 10
    for n in range(envelopes):
        last = await hub.publish(a, a.batch(*(
            reported(a, f"t{n}-{i}", "running", command=["echo", "x" * 2000])
            for i in range(per))))
    size = len(a.batch(*(reported(a, f"p{i}", "running", command=["echo", "x" * 2000])
                         for i in range(per))))
    frames: list[int] = []

    async def note_wal() -> None:
        while True:
            frames.append(wal_frames(path))
            await asyncio.sleep(0)

    try:
        async with ingesting(small, max_chunk_bytes=size) as ingest:  # an envelope a chunk
            watcher = asyncio.create_task(note_wal())
            try:
                await caught_up(ingest, small, last)
            finally:
                watcher.cancel()
        assert ingest.stats.applied_events == envelopes * per and ingest.stats.duplicates == 0
        assert len(store.list_tasks()) == envelopes * per
    finally:
        store.close()
    assert max(frames) < 600, f"the WAL reached {max(frames)} frames: the writer checkpointed"
    restarts = sum(1 for before, after in itertools.pairwise(frames) if after < before)
    assert restarts >= 2, f"the WAL started again {restarts} times; frames seen {frames[::50]}"


def _msgs(*sizes: int) -> list[Msg]:
    return [Msg(None, subject="x", data=b"e" * size) for size in sizes]  # type: ignore[arg-type]


def test_the_chunk_sizer_follows_the_measured_apply_rate() -> None:
    sizer = ChunkSizer(budget_s=0.05, min_bytes=16 << 10, max_bytes=1 << 20)
    assert sizer.limit() == 16 << 10  # nothing measured: start small
    sizer.observe(1 << 20, 0.3)  # a storm's 1 MB took 0.3 s
    assert sizer.limit() == int(0.05 / (0.3 / (1 << 20)))  # ~170 kB: 50 ms at that rate
    for _ in range(30):  # small batches, ten times cheaper per byte
        sizer.observe(100_000, 0.003)
    assert sizer.limit() == 1 << 20  # never past max_bytes
    sizer.observe(100_000, 10.0)  # one chunk stalled by a busy box
    assert 16 << 10 <= sizer.limit() < 1 << 20  # smaller, never under min_bytes
    for _ in range(30):
        sizer.observe(100_000, 0.003)
    assert sizer.limit() == 1 << 20  # and back


def test_the_chunk_sizer_takes_at_least_one_message_and_stays_within_its_limit() -> None:
    sizer = ChunkSizer(budget_s=0.05, min_bytes=100, max_bytes=1000)
    msgs = _msgs(40, 40, 30, 5000, 10, 10)
    assert [len(m.data) for m in sizer.take(msgs, 0)] == [40, 40]  # 110 would pass 100
    assert [len(m.data) for m in sizer.take(msgs, 2)] == [30]
    assert [len(m.data) for m in sizer.take(msgs, 3)] == [5000]  # alone, too big as it is
    assert [len(m.data) for m in sizer.take(msgs, 4)] == [10, 10]
    with pytest.raises(ValueError):
        ChunkSizer(budget_s=0, min_bytes=1, max_bytes=1)
