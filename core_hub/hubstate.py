"""The hub's own state in JetStream KV buckets, so a deleted or lost view loses none of it.

Ingest rebuilds the fleet from ``OUTPOST_EVENTS`` and the registry restores agents' keys, but
some state starts at the hub and no event carries it: services (and the instances each has
replaced), API tokens and join tokens (digests only, as the view keeps them), and launches
(the core's placements, with the task record of those not placed yet). DESIGN says the hub
never holds state JetStream cannot rebuild, so each of these is mirrored to a KV bucket.

Intent before effect: a change and its mark in ``kv_dirty`` commit in one SQLite transaction
(triggers make the mark, so the ``outpost-hub token``/``apitoken`` commands run by other
processes mark theirs too). ``StateMirror`` writes each marked key's current record to its
bucket and clears the mark only if it was not marked again meanwhile. A crash between the
commit and the write leaves the mark, which the next start writes out first. A hub starting
on a fresh view then restores from the buckets every record the view lacks, before it serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from core_hub.store import HubStore
from federation import subjects
from federation.kvsnapshot import current_entries
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)

# The view's name of each kind of record (kv_dirty.bucket) -> its KV bucket.
BUCKETS = {"join_tokens": subjects.JOIN_TOKENS_BUCKET,
           "api_tokens": subjects.API_TOKENS_BUCKET,
           "services": subjects.SERVICES_BUCKET,
           "launches": subjects.LAUNCHES_BUCKET}
FLUSH_S = 0.2


class StateMirror:
    """Writes the view's marked changes to KV (a loop, and once more at stop); restores a
    fresh view from KV at start. ``open()`` before either."""

    def __init__(self, js: Any, store: HubStore, replicas: int = 1,
                 fence: Callable[[], Awaitable[int]] | None = None) -> None:
        self.js = js
        self.fence = fence  # the placement lease's claim: a replica that lost it writes nothing
        self.store = store
        self.replicas = replicas
        self.kv: dict[str, Any] = {}
        self.written = 0
        self.failures = 0
        self._loop: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    async def open(self) -> None:
        """Bind the buckets (``streams.ensure_hub_buckets`` made them during the hub's set-up:
        the hub's run-time NATS user may not create one)."""
        for kind, bucket in BUCKETS.items():
            self.kv[kind] = await self.js.key_value(bucket)

    async def flush(self) -> int:
        """Write every change marked now (not those marked while this runs: the loop's next
        pass takes them); returns how many keys were written."""
        async with self._flushing:  # the loop and the command sender both flush
            return await self._flush()

    async def _flush(self) -> int:
        written = 0
        dirty = self.store.dirty_state(limit=100_000)
        if dirty and self.fence is not None:
            await self.fence()
        for kind, key, gen in dirty:
            record = self.store.state_record(kind, key)
            if record is None:
                await self.kv[kind].delete(key)
            else:
                await self.kv[kind].put(key, orjson.dumps(record))
            self.store.clear_dirty(kind, key, gen)
            written += 1
        self.written += written
        return written

    async def restore(self) -> int:
        """Bring into the view every record the buckets have and the view lacks; returns how
        many. Run after ``flush`` (so the view's own unsent changes win) and before serving."""
        restored: dict[str, int] = {}
        for kind, kv in self.kv.items():
            for key, entry in (await current_entries(kv)).items():
                if self.store.restore_state(kind, key, orjson.loads(entry.value)):
                    restored[kind] = restored.get(kind, 0) + 1
        if restored:
            log.info("restored hub state from JetStream KV: %s",
                     ", ".join(f"{n} {kind}" for kind, n in restored.items()),
                     extra={"restored": restored})
        return sum(restored.values())

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="hub-state-mirror")

    async def stop(self) -> None:
        """Stop the loop, then write what is still marked (the hub bounds how long)."""
        await stop_loops(self._loop)
        await self.flush()

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
                if failing:
                    log.info("hub state: writing to JetStream KV again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception:  # NATS away or hung: the marks stay, the next pass retries
                self.failures += 1
                if not failing:
                    log.exception("hub state: could not mirror it to JetStream KV yet; retrying")
                failing = True
