"""Settled launch records of ended tasks are pruned (they grew the view and its KV mirror with
every task the core ever placed); everything the scheduler may still need stays. Real SQLite,
the hub's own store."""

from __future__ import annotations

from pathlib import Path

from core_hub.store import HubStore

NOW = 1_000_000.0
OLD = NOW - 7200


def _launch(store: HubStore, task_id: str, status: str, at: float,
            task_state: str | None) -> None:
    with store.transaction():
        store.save_launch(task_id, spec={"name": task_id}, agent_id="a1", command_id=None,
                          status=status, excluded=[], reason=None, now=at)
        if task_state is not None:
            store.put_core_task({"id": task_id, "name": task_id, "agent_id": "a1",
                                 "state": task_state}, at)


def test_only_old_settled_launches_of_ended_or_gone_tasks_are_pruned(tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.db")
    try:
        _launch(store, "ended", "accepted", OLD, "finished")
        _launch(store, "gone", "cancelled", OLD, None)
        _launch(store, "aside", "set_aside", OLD, "failed")
        _launch(store, "running", "accepted", OLD, "running")  # its task still runs
        _launch(store, "recent", "accepted", NOW - 60, "finished")  # within the keep time
        _launch(store, "pending", "pending", OLD, "pending")  # not settled: still placed
        _launch(store, "sent", "sent", OLD, "killed")  # its answer is still awaited
        before = {key for bucket, key, _gen in store.dirty_state(10_000) if bucket == "launches"}
        for bucket, key, gen in store.dirty_state(10_000):
            store.clear_dirty(bucket, key, gen)

        assert store.prune_launches(NOW - 3600) == 3
        left = {launch["task_id"] for launch in store.launches(
            "pending", "placing", "sent", "accepted", "cancelled", "set_aside")}
        assert left == {"running", "recent", "pending", "sent"}
        # The deletions are marked for the KV mirror (core_hub/hubstate.py deletes those keys).
        marked = {key for bucket, key, _gen in store.dirty_state(10_000) if bucket == "launches"}
        assert before >= {"ended", "gone", "aside"} and marked == {"ended", "gone", "aside"}
        assert store.prune_launches(NOW - 3600) == 0
    finally:
        store.close()
