"""The enrolled agents' keys, kept in a JetStream key-value bucket as well as the hub's view.

The hub's SQLite file is a cache that JetStream can rebuild (DESIGN: "the hub never holds state
JetStream cannot rebuild"); the one thing ingest cannot rebuild from events is who may send
them. So every enrollment, key rotation and revocation is also written to the
``OUTPOST_AGENTS`` bucket, and a hub starting with a fresh or deleted view restores the keys
from it before ingest begins. A record holds the agent's current key, its retired keys (each
with the last seq it signed, so a rebuild still verifies the events from before a rotation)
and whether it is revoked.

On start the bucket and the view are also reconciled for agents both know: revocation is
sticky either way (a revocation made with ``outpost-hub agents revoke`` while the hub was down
reaches the bucket here), and the side that knows more key rotations wins (a key is only ever
retired, never brought back). The hub's other state (services, tokens, launches) is mirrored
by ``core_hub.hubstate``.

A record that does not decode or lacks a field (written by a bug, by hand, or by anyone who
could publish to ``$KV.OUTPOST_AGENTS.>``) is skipped with a warning naming its key, and counted
in ``Registry.skipped``: one bad record must not keep the hub from starting.
"""

from __future__ import annotations

import logging
from typing import Any

from core_hub.store import HubStore
from federation import subjects, wire
from federation.kvsnapshot import current_entries
from federation.streams import AGENTS_BUCKET

log = logging.getLogger(__name__)

BUCKET = AGENTS_BUCKET
_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "public_key": bytes, "name": str, "site": str, "labels": dict, "resources": dict,
    "version": str, "enrolled_at": (int, float)}


class Registry:
    """Mirror of the agent registry in a KV bucket (one key per agent id)."""

    def __init__(self, js: Any, store: HubStore, replicas: int = 1) -> None:
        self.js = js
        self.store = store
        self.replicas = replicas
        self.kv: Any = None
        self.skipped = 0  # unreadable records left out of the last restore

    async def open(self) -> None:
        """Bind the bucket (``streams.ensure_hub_buckets`` made it during the hub's set-up)."""
        self.kv = await self.js.key_value(BUCKET)

    async def save(self, agent_id: str) -> None:
        agent = self.store.get_agent(agent_id)
        record = {"public_key": bytes.fromhex(agent["public_key"]), "name": agent["name"],
                  "site": agent["site"], "labels": agent["labels"],
                  "resources": agent["resources"], "version": agent["version"],
                  "enrolled_at": agent["enrolled_at"], "revoked": agent["revoked"],
                  "revoked_at": agent["revoked_at"], "retired_keys": agent["retired_keys"],
                  "revoked_after_seq": agent["revoked_after_seq"],
                  # drained with migrate: services move their instances off it (backend.py)
                  "migrate": bool(self.store.get_meta(f"migrate:{agent_id}"))}
        await self.kv.put(agent_id, wire.pack(record))

    async def restore(self) -> int:
        """Enroll into the view every agent the bucket knows and the view does not, and
        reconcile revocations and key rotations for those both know; returns how many agents
        were new to the view."""
        records: dict[str, dict[str, Any]] = {}
        for key, entry in (await current_entries(self.kv)).items():
            record = _record(key, entry.value)
            if record is None:
                self.skipped += 1
            else:
                records[key] = record
        restored = 0
        for agent_id, record in records.items():
            if self.store.agent_key(agent_id) is None:
                self.store.enroll_agent(
                    agent_id, record["public_key"], name=record["name"], site=record["site"],
                    labels=record["labels"], resources=record["resources"],
                    version=record["version"], now=record["enrolled_at"])
                restored += 1
            if self._reconcile(agent_id, record):
                await self.save(agent_id)
        if restored:
            log.info("restored %d agents from the %s bucket", restored, BUCKET)
        return restored

    def follow(self, key: str, value: bytes | None) -> None:
        """A standby's view (core_hub.follower) takes one live change of the bucket: a new
        agent, a rotation, a revocation, or an enrollment taken back (``value`` None)."""
        if value is None:
            if self.store.agent_key(key) is not None:
                self.store.forget_agent(key)
            return
        record = _record(key, value)
        if record is None:
            self.skipped += 1
            return
        if self.store.agent_key(key) is None:
            self.store.enroll_agent(
                key, record["public_key"], name=record["name"], site=record["site"],
                labels=record["labels"], resources=record["resources"],
                version=record["version"], now=record["enrolled_at"])
        self._reconcile(key, record)

    def _reconcile(self, agent_id: str, record: dict[str, Any]) -> bool:
        """Bring the view up to ``record``; True if the view knows more than the bucket."""
        agent = self.store.get_agent(agent_id)
        retired = list(record.get("retired_keys") or [])
        if len(retired) > len(agent["retired_keys"]):
            self.store.restore_agent_keys(agent_id, record["public_key"], retired)
            log.info("agent %s: key rotation restored from the %s bucket", agent_id, BUCKET,
                     extra={"agent_id": agent_id})
        if record.get("revoked") and not agent["revoked"]:
            after = record.get("revoked_after_seq")  # absent in records from before it
            self.store.revoke_agent(agent_id, record.get("revoked_at"),
                                    after if isinstance(after, int) and after >= 0 else 0)
        migrate = bool(self.store.get_meta(f"migrate:{agent_id}"))
        if record.get("migrate") is True and not migrate:
            self.store.set_meta(f"migrate:{agent_id}", "1")
        return (len(agent["retired_keys"]) > len(retired)
                or (agent["revoked"] and not record.get("revoked"))
                or (migrate and record.get("migrate") is not True))


def _record(key: str, value: bytes) -> dict[str, Any] | None:
    """The decoded record under ``key``, or None (logged) if it is not a usable one."""
    problem = None
    try:
        record = wire.unpack(value)
    except ValueError as err:
        record, problem = None, f"not msgpack ({err})"
    if problem is None and not isinstance(record, dict):
        problem = "not a map"
    elif problem is None and not subjects.is_agent_id(key):
        problem = "the key is not an agent id"
    elif problem is None:
        assert isinstance(record, dict)
        bad = [field for field, kind in _RECORD_TYPES.items()
               if not isinstance(record.get(field), kind)]
        if bad:
            problem = f"missing or ill-typed fields {bad}"
        elif len(record["public_key"]) != 32:
            problem = "public_key is not 32 bytes"
    if problem is not None:
        log.warning("skipping the unreadable %s record %r: %s", BUCKET, key[:80], problem,
                    extra={"key": key[:80], "bucket": BUCKET})
        return None
    return record
