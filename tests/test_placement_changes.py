"""The scheduler's pass reads what changed, not the fleet (issue 12: "the scheduler acts on
what changed"): offers and statuses written by any writer, this process or another, reach the
placer through the view's ``placement_changes`` triggers; a reader left behind by pruning
reads everything again. Real SQLite files; the other writer is a separate process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

from core_hub.commands import Commander
from core_hub.scheduler import CoreScheduler
from core_hub.store import HubStore

FULL_SCAN = "SELECT id, status, revoked FROM agents"


def offer(agent: str, offer_id: str, cpus: float) -> dict[str, Any]:
    now = time.time()
    return {"id": offer_id, "agent_id": agent, "site": "berlin", "labels": {}, "cpus": cpus,
            "mem_mb": 512, "disk_mb": 0, "created_at": now, "expires_at": now + 3600}


def enroll(store: HubStore, agent: str) -> None:
    store.enroll_agent(agent, agent.encode().ljust(32, b"k"), name=agent, site="berlin",
                       labels={}, resources={"cpus": 4, "mem_mb": 4096, "disk_mb": 0},
                       version="test", now=time.time())
    with store.transaction() as db:
        db.execute("UPDATE agents SET status = 'online' WHERE id = ?", (agent,))


def other_process_writes(db_path: Path, sql: str, *params: Any) -> None:
    """``sql`` run by another process on the same view file (say an admin's tool)."""
    code = ("import sqlite3, sys, json; db = sqlite3.connect(sys.argv[1]);"
            " db.execute(sys.argv[2], json.loads(sys.argv[3])); db.commit()")
    subprocess.run([sys.executable, "-c", code, str(db_path), sql, json.dumps(params)],
                   check=True, timeout=30)


def offers_of(scheduler: CoreScheduler) -> dict[str, tuple[str | None, float, str]]:
    return {o.agent_id: (o.offer_id, o.cpus, o.status) for o in scheduler.placer.offers()}


def test_a_pass_takes_in_only_what_changed_from_any_writer(tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.db")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    # No launches are placed here, so the pass never sends a command.
    scheduler = CoreScheduler(store, cast(Commander, None))
    try:
        for agent in ("a1", "a2", "a3"):
            enroll(store, agent)
            with store.transaction():
                store.upsert_offer(agent, offer(agent, f"{agent}:1", 2.0))
        asyncio.run(scheduler.tick())  # the first pass reads everything
        assert FULL_SCAN in statements
        assert offers_of(scheduler) == {a: (f"{a}:1", 2.0, "online") for a in ("a1", "a2", "a3")}

        statements.clear()
        asyncio.run(scheduler.tick())  # nothing changed: no agent or offer read at all
        assert not [s for s in statements if "FROM agents" in s or "FROM offers" in s], \
            statements

        # A new offer through the view, a revocation and a status change by another process.
        with store.transaction():
            store.upsert_offer("a1", offer("a1", "a1:2", 3.0))
        other_process_writes(store.path, "UPDATE agents SET revoked = 1, status = 'revoked'"
                             " WHERE id = ?", "a2")
        other_process_writes(store.path, "UPDATE agents SET status = 'disconnected'"
                             " WHERE id = ?", "a3")
        statements.clear()
        asyncio.run(scheduler.tick())
        assert FULL_SCAN not in statements
        assert offers_of(scheduler) == {"a1": ("a1:2", 3.0, "online"),
                                        "a3": ("a3:1", 2.0, "disconnected")}

        # Changes the pass never read are pruned: it reads everything again, and misses none.
        with store.transaction():
            store.upsert_offer("a3", offer("a3", "a3:2", 1.0))
        assert store.prune_placement_changes(keep=0) > 0
        statements.clear()
        asyncio.run(scheduler.tick())
        assert FULL_SCAN in statements
        assert offers_of(scheduler) == {"a1": ("a1:2", 3.0, "online"),
                                        "a3": ("a3:2", 1.0, "disconnected")}

        # An agent removed from the view leaves the placer.
        other_process_writes(store.path, "DELETE FROM agents WHERE id = ?", "a3")
        asyncio.run(scheduler.tick())
        assert set(offers_of(scheduler)) == {"a1"}
    finally:
        store.close()


def test_the_change_log_stays_bounded(tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.db")
    try:
        enroll(store, "a1")
        for n in range(50):
            with store.transaction():
                store.upsert_offer("a1", offer("a1", f"a1:{n}", 1.0))
        last = store.last_placement_change()
        assert store.prune_placement_changes(keep=10) == last - 10
        count = store._db.execute("SELECT count(*) FROM placement_changes").fetchone()[0]
        assert count == 10
        assert store.placement_changes(last - 10) == (last, {"a1"})
        assert store.placement_changes(last - 11) is None  # a reader that far behind rescans
    finally:
        store.close()
