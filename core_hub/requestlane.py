"""One NATS subject's requests, answered one at a time at a bounded rate; the rest shed unread.

The enrollment subject is open to anyone with the public enroll login (core_hub/enroll.py), so
what a stranger can make the hub do there must be bounded: at most ``rate_per_s`` requests a
second (bursts of ``burst``) are handed to the handler, at most ``BACKLOG_S`` seconds of them
wait, and the rest are shed without being read. A full backlog also takes the hub's interest
off the subject until a quarter of it is left, so nats-server drops a flood before it reaches
the hub at all; senders meanwhile get "no responders" and retry after their back-off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from federation.errors import TooManyRequests
from federation.limits import TokenBuckets
from federation.log import Throttled
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)
throttled = Throttled(log)

BACKLOG_S = 4.0  # queued at most this many seconds' worth; an edge waits 5 s for its reply


class RequestLane:
    """Requests on ``subject`` (queue group ``queue``) to ``handle``, at most ``rate_per_s``
    a second; ``shed`` counts those never read (``on_shed`` is told of each), ``name`` says
    which lane in the log."""

    def __init__(self, nc: Client, subject: str, queue: str,
                 handle: Callable[[Msg], Awaitable[None]], *, name: str,
                 rate_per_s: float, burst: int,
                 on_shed: Callable[[], None] | None = None) -> None:
        self._nc = nc
        self.subject = subject
        self._queue = queue
        self._handle = handle
        self.name = name
        self._rate = TokenBuckets(rate_per_s, burst)
        self._backlog: asyncio.Queue[tuple[Msg, float]] = asyncio.Queue(
            maxsize=max(16, int(rate_per_s * BACKLOG_S)))
        self._sub: Subscription | None = None
        self._worker: asyncio.Task[None] | None = None
        self._interest = asyncio.Lock()  # subscribing and unsubscribing, one at a time
        self._pausing: asyncio.Task[None] | None = None
        self.shed = 0
        self._on_shed = on_shed

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name=f"lane-{self.name}")
            await self._listen()

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        pausing, self._pausing = self._pausing, None
        await stop_loops(worker, pausing)
        async with self._interest:
            if self._sub is not None:
                sub, self._sub = self._sub, None
                await sub.unsubscribe()

    async def _listen(self) -> None:
        async with self._interest:
            if self._sub is None and self._worker is not None:
                self._sub = await self._nc.subscribe(self.subject, queue=self._queue,
                                                     cb=self._arrived)
                # The server knows the subscription before this returns, so a request sent
                # right after (from another connection) finds a responder.
                await self._nc.flush()

    async def _pause(self) -> None:
        """A full backlog: stop listening, so the server stops sending."""
        async with self._interest:
            if self._sub is not None:
                sub, self._sub = self._sub, None
                await sub.unsubscribe()
                throttled.warning(f"pause.{self.name}", "%s requests paused: %d queued",
                                  self.name, self._backlog.qsize(),
                                  extra={"lane": self.name, "queued": self._backlog.qsize()})

    async def _arrived(self, msg: Msg) -> None:
        """Queue a request, or shed it unread if the backlog is full (and stop listening
        until it has drained)."""
        try:
            self._backlog.put_nowait((msg, time.monotonic()))
        except asyncio.QueueFull:
            self._shed()
            if self._sub is not None and self._pausing is None:
                self._pausing = asyncio.create_task(self._pause(), name=f"pause-{self.name}")

    def _shed(self) -> None:
        self.shed += 1
        if self._on_shed is not None:
            self._on_shed()
        throttled.warning(f"shed.{self.name}", "%s requests shed: %d so far (over %g a "
                          "second, or queued past %g s)", self.name, self.shed,
                          self._rate.rate, BACKLOG_S, extra={"lane": self.name,
                                                             "shed": self.shed})

    async def _work(self) -> None:
        """Hand queued requests to the handler one at a time, at most at the rate."""
        while True:
            msg, arrived = await self._backlog.get()
            while True:
                try:
                    self._rate.take(self.name)
                    break
                except TooManyRequests as over:
                    await asyncio.sleep(float((over.details or {}).get("retry_after_s", 0.01)))
            if time.monotonic() - arrived > BACKLOG_S:  # its sender has given up on it
                self._shed()
                continue
            try:
                await self._handle(msg)
            except Exception:  # noqa: BLE001 (one request must not end the lane)
                log.exception("%s request failed", self.name, extra={"lane": self.name})
            if self._sub is None and self._backlog.qsize() <= self._backlog.maxsize // 4:
                if self._pausing is not None:
                    await self._pausing
                    self._pausing = None
                await self._listen()
