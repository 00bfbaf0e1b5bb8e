"""Liveness thresholds and the cap on how many agents a pass may declare unreachable."""

from __future__ import annotations

import time
from pathlib import Path

from core_hub.liveness import Liveness, LivenessSettings
from core_hub.store import HubStore


def fleet(tmp_path: Path, n: int) -> HubStore:
    store = HubStore(tmp_path / "hub.db")
    for i in range(n):
        store.enroll_agent(f"a{i:03d}", bytes([i % 256]) * 32, name=f"n{i}", site="s",
                           labels={}, resources={}, version="", now=time.time())
    return store


def statuses(store: HubStore) -> list[str]:
    return [a["status"] for a in store.list_agents()]


def test_thresholds(tmp_path: Path) -> None:
    store = fleet(tmp_path, 1)
    live = Liveness(None, store, LivenessSettings(5.0, 10.0, 20))
    now = 1000.0
    live.beats["a000"] = {"agent": "a000", "received": now}
    live.sweep(now + 1)
    assert statuses(store) == ["online"]
    live.sweep(now + 6)
    assert statuses(store) == ["disconnected"]
    live.sweep(now + 11)
    assert statuses(store) == ["unreachable"]
    live.beats["a000"] = {"agent": "a000", "received": now + 12}
    live.sweep(now + 12)
    assert statuses(store) == ["online"]
    store.close()


def test_a_core_side_blip_does_not_condemn_the_whole_fleet_at_once(tmp_path: Path) -> None:
    store = fleet(tmp_path, 50)
    live = Liveness(None, store, LivenessSettings(5.0, 10.0, max_unreachable_per_s=20))
    now = 1000.0
    for a in store.list_agents():
        live.beats[a["id"]] = {"agent": a["id"], "received": now}
    live.sweep(now)
    assert set(statuses(store)) == {"online"}
    live.sweep(now + 30)  # every heartbeat missed at once
    assert statuses(store).count("unreachable") == 20
    assert statuses(store).count("disconnected") == 30
    live.sweep(now + 31)
    assert statuses(store).count("unreachable") == 40
    live.sweep(now + 32)
    assert statuses(store).count("unreachable") == 50
    store.close()
