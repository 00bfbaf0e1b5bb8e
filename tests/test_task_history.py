"""The core's task history store: kept per task and bounded, never showing what one agent
wrote about another agent's task (real SQLite; the API side is in test_conformance)."""

from __future__ import annotations

from pathlib import Path

from core_hub.store import HubStore, task_row
from federation import history
from federation.schemas import HISTORY_LIMIT


def _task(task_id: str, agent: str, state: str) -> dict:
    return {"id": task_id, "name": "t", "state": state, "generation": 1, "agent_id": agent,
            "updated_at": 1.0}


def test_history_is_bounded_per_task_and_bound_to_the_tasks_agent(tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.db")
    try:
        with store.transaction():
            store.upsert_task_rows([task_row("agent-a", _task("t1", "agent-a", "running"))], 1.0)
            states = ["starting", "running", "failed"] * 150  # 450 changes
            store.add_history([("t1", "agent-a", seq, float(seq), state, None, None, 1, seq // 3)
                               for seq, state in enumerate(states, start=1)])
            # Another agent's claim about t1, and a task the view does not hold.
            store.add_history([("t1", "agent-b", 1000, 1000.0, "killed", None, "forged", 1, 0),
                               ("gone", "agent-a", 1, 1.0, "running", None, None, 1, 0)])
            # A replayed row changes nothing.
            store.add_history([("t1", "agent-a", 450, 9999.0, "lost", None, None, 1, 0)])
        raw = store.task_history("t1")
        assert all(r["reason"] != "forged" for r in raw)
        assert raw[-1]["state"] == "failed" and raw[-1]["ts"] == 450.0
        shown = history.collapse(raw)
        assert len(shown) == HISTORY_LIMIT
        assert [e["ts"] for e in shown] == sorted(e["ts"] for e in shown)
        # Pruning keeps each named task's newest rows (agent-b's row is t1's newest).
        assert store.prune_history(["t1", "gone"], keep=10) == 451 - 10
        assert [r["ts"] for r in store.task_history("t1")] == [float(s) for s in range(442, 451)]
        assert store.prune_history(["t1", "gone"], keep=10) == 0
    finally:
        store.close()
