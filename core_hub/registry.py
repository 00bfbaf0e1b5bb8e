"""The enrolled agents' keys, kept in a JetStream key-value bucket as well as the hub's view.

The hub's SQLite file is a cache that JetStream can rebuild (DESIGN: "the hub never holds state
JetStream cannot rebuild"); the one thing ingest cannot rebuild from events is who may send
them. So every enrollment (and revocation) is also written to the ``OUTPOST_AGENTS`` bucket, and
a hub starting with a fresh or deleted view restores the keys from it before ingest begins.
Join tokens stay local: losing them only means making new ones.
"""

from __future__ import annotations

import logging
from typing import Any

from core_hub.store import HubStore
from federation import wire

log = logging.getLogger(__name__)

BUCKET = "OUTPOST_AGENTS"


class Registry:
    """Mirror of the agent registry in a KV bucket (one key per agent id)."""

    def __init__(self, js: Any, store: HubStore, replicas: int = 1) -> None:
        self.js = js
        self.store = store
        self.replicas = replicas
        self.kv: Any = None

    async def open(self) -> None:
        from nats.js.api import KeyValueConfig
        from nats.js.errors import BucketNotFoundError

        try:
            self.kv = await self.js.key_value(BUCKET)
        except BucketNotFoundError:
            self.kv = await self.js.create_key_value(
                KeyValueConfig(bucket=BUCKET, history=1, replicas=self.replicas))

    async def save(self, agent_id: str) -> None:
        agent = self.store.get_agent(agent_id)
        record = {"public_key": bytes.fromhex(agent["public_key"]), "name": agent["name"],
                  "site": agent["site"], "labels": agent["labels"],
                  "resources": agent["resources"], "version": agent["version"],
                  "enrolled_at": agent["enrolled_at"], "revoked": agent["revoked"]}
        await self.kv.put(agent_id, wire.pack(record))

    async def restore(self) -> int:
        """Enroll into the view every agent the bucket knows and the view does not."""
        from nats.js.errors import NoKeysError

        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return 0
        restored = 0
        for agent_id in keys:
            if self.store.agent_key(agent_id) is not None:
                continue
            entry = await self.kv.get(agent_id)
            record = wire.unpack(entry.value)
            self.store.enroll_agent(agent_id, record["public_key"], name=record["name"],
                                    site=record["site"], labels=record["labels"],
                                    resources=record["resources"], version=record["version"],
                                    now=record["enrolled_at"])
            if record.get("revoked"):
                self.store.revoke_agent(agent_id)
            restored += 1
        if restored:
            log.info("restored %d agents from the %s bucket", restored, BUCKET)
        return restored
