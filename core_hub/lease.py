"""Which hub replica may place: a lease in the ``OUTPOST_LEASE`` KV bucket, with fencing.

Several hub replicas serve the API, but placement and service passes must run in one of them
at a time, or two replicas could launch one task on two agents. The lease is one KV key,
``leader``, and the bucket's ``max_age`` is the lease's TTL, so JetStream's own clock ends a
lease nobody renews (no replica compares wall clocks):

- *Acquire* with ``create``: it succeeds only while the key is absent (never held, released,
  or aged out), so of several contenders exactly one wins.
- *Renew* with ``update(last=revision)``, the revision we last wrote: any other write since
  (a new holder after ours aged out) makes it fail, and we stop placing at once.
- *Fence* every placement with the same compare-and-set before its launch is published
  (``claim``): a replica that was stopped (SIGSTOP, a partition) and wakes up still believing
  it leads holds a stale revision, so JetStream refuses its claim and nothing it decided is
  sent. The lease is not only a timer; each decision is checked against it.
- *Release* at a clean stop with ``delete(last=revision)``, so another replica takes over
  within one retry rather than one TTL.

The revision of the acquiring write is the epoch (stream sequences only grow); the revision a
claim wrote travels with the launch (``lease``), so an edge's log says which leader sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from federation import subjects
from federation.errors import OutpostError
from federation.streams import LEASE_TTL_S

log = logging.getLogger(__name__)

KEY = "leader"
TTL_S = LEASE_TTL_S


class LeaseLost(OutpostError):
    """This replica does not hold the lease (any more): place nothing."""

    code = "lease_lost"
    status = 503


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    epoch: int

    @classmethod
    def decode(cls, raw: bytes) -> LeaseRecord | None:
        """None for anything that is not a well-formed record (a node is hostile until proven
        otherwise: a corrupt record is treated as expired, not trusted)."""
        try:
            body = orjson.loads(raw)
            holder, epoch = body["holder"], body["epoch"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return None
        if (not isinstance(holder, str) or not holder or isinstance(epoch, bool)
                or not isinstance(epoch, int)):
            return None
        return cls(holder=holder, epoch=epoch)

    def encode(self) -> bytes:
        return orjson.dumps({"holder": self.holder, "epoch": self.epoch})


class Lease:
    """One replica's view of the lease. ``held`` is true only between a successful acquire or
    renew and the next failure; ``claim()`` re-checks it against JetStream."""

    def __init__(self, js: Any, holder: str, *, ttl_s: float = TTL_S) -> None:
        self.js = js
        self.holder = holder
        self.ttl_s = ttl_s
        self.revision = 0  # the KV revision we last wrote; 0 when we do not hold the lease
        self.epoch = 0
        self.acquired = 0
        self.lost = 0
        self._kv: Any = None
        self._lock = asyncio.Lock()
        self._loop: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self.revision > 0

    async def open(self) -> None:
        self._kv = await self.js.key_value(subjects.LEASE_BUCKET)

    async def start(self) -> None:
        await self.open()
        await self.try_acquire()
        self._loop = asyncio.create_task(self._run(), name="lease")

    async def stop(self, *, release: bool = True) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if release and self.held:
            # Hand over at once rather than after a TTL (fenced: a lease we already lost is
            # left alone).
            with contextlib.suppress(Exception):
                await self._kv.delete(KEY, last=self.revision)
            self.revision = 0

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3 if self.held else self.ttl_s / 4)
            try:
                if self.held:
                    await self.renew()
                else:
                    await self.try_acquire()
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                pass  # logged where it was lost; try to acquire on the next turn
            except Exception:  # noqa: BLE001 - a lease loop that dies would stop placement
                log.exception("lease loop error")

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it (absent, released or aged out)."""
        from nats.js.errors import KeyWrongLastSequenceError

        async with self._lock:
            if self.held:
                return True
            try:
                # The epoch is this write's revision; the record names it after the fact.
                revision = await self._kv.create(KEY, LeaseRecord(self.holder, 0).encode())
            except KeyWrongLastSequenceError:
                return False  # held by another replica (or it was faster)
            self.revision = self.epoch = revision
            self.acquired += 1
            log.info("lease acquired", extra={"holder": self.holder, "epoch": revision})
            return True

    async def holder_now(self) -> LeaseRecord | None:
        """Who holds the lease, as the bucket says (None: nobody, or a record not ours to
        trust)."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(KEY)
        except KeyNotFoundError:
            return None
        return LeaseRecord.decode(entry.value) if entry.value else None

    async def renew(self) -> None:
        await self.claim()

    async def claim(self) -> int:
        """Compare-and-set the lease: extends it and proves we still hold it. Returns the
        revision written (the fencing token); raises ``LeaseLost`` otherwise."""
        async with self._lock:
            if not self.held:
                raise LeaseLost("this replica does not hold the placement lease")
            return await self._write(LeaseRecord(self.holder, self.epoch))

    async def _write(self, record: LeaseRecord) -> int:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            self.revision = await self._kv.update(KEY, record.encode(), last=self.revision)
        except KeyWrongLastSequenceError:
            self._lose("another replica holds the lease")
        except Exception as exc:
            # No answer does not prove we lost it, but a claim we cannot prove must not pass;
            # keep the revision: the next renew (or the TTL) decides.
            raise LeaseLost(f"the lease could not be checked: {exc}") from exc
        return self.revision

    def _lose(self, why: str) -> None:
        self.revision = 0
        self.lost += 1
        log.warning("lease lost", extra={"holder": self.holder, "epoch": self.epoch,
                                         "why": why})
        raise LeaseLost(why)
