"""Every hub replica serves the whole API: reads from its own view, writes at the leader.

A standby (core_hub/follower.py) answers reads from its live view and forwards every write
(any method but GET and HEAD) to the replica holding the placement lease, whose API URL it
finds in the lease bucket (``Lease.leader_url``). The caller's own credentials go along and
the leader checks them again, so replicas must share the admin token (``admin_token``, or copy
``admin.token`` with ``hub.key``); API tokens live in KV and are shared already. While a
replica has just taken the lease and is still starting its leader's parts, writes get a 503
with ``Retry-After``: no write is taken by a replica that cannot act on it.

``Switch`` lets the one listening socket keep serving across a takeover: the app holds a
``Switch`` and the hub points it at the leader's backend once the leader's parts run.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from federation.errors import Unavailable

log = logging.getLogger(__name__)

FORWARDED_BY = "X-Outpost-Forwarded-By"
READS = frozenset({"GET", "HEAD", "OPTIONS"})
# Hop-by-hop headers (RFC 9110 7.6.1) and those the client library sets itself.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                  "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
CHUNK = 64 * 1024

STANDBY, TAKING_OVER, LEADER = "standby", "taking-over", "leader"


class Switch:
    """Stands for whichever object is ``target`` now (a backend, the artifact service)."""

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "target", target)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "target"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "target":
            object.__setattr__(self, name, value)
        else:
            setattr(object.__getattribute__(self, "target"), name, value)


class ReplicaRouting:
    """This replica's part in the API: ``mode`` is standby, taking-over or leader;
    ``leader_url`` (a standby's) says where the leader serves."""

    def __init__(self, replica: str,
                 leader_url: Callable[[], Awaitable[tuple[str | None, str | None]]]) -> None:
        self.replica = replica
        self.mode = STANDBY
        self.leader_url = leader_url
        self.forwarded = 0
        self.forward_errors = 0
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def middleware(self) -> Any:
        @web.middleware
        async def forward_writes(request: web.Request,
                                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                 ) -> web.StreamResponse:
            if request.method in READS or self.mode == LEADER:
                return await handler(request)
            if self.mode == TAKING_OVER:
                raise Unavailable("this replica is taking over as the leader: try again in a "
                                  "moment", retry_after=1)
            if FORWARDED_BY in request.headers:  # two standbys each thinking the other leads
                raise Unavailable("no replica leads right now: try again in a moment",
                                  retry_after=1)
            return await self._forward(request)
        return forward_writes

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        holder, url = await self._leader()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=300),
                auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers[FORWARDED_BY] = self.replica
        target = url.rstrip("/") + request.rel_url.path_qs
        try:
            async with self._session.request(
                    request.method, target, headers=headers, allow_redirects=False,
                    data=request.content if request.body_exists else None) as resp:
                out = web.StreamResponse(status=resp.status, reason=resp.reason, headers={
                    k: v for k, v in resp.headers.items() if k.lower() not in _HOP})
                await out.prepare(request)
                async for chunk in resp.content.iter_chunked(CHUNK):
                    await out.write(chunk)
                await out.write_eof()
                self.forwarded += 1
                return out
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.forward_errors += 1
            log.warning("could not forward %s %s to the leader %s at %s: %r", request.method,
                        request.rel_url.path, holder, url, exc)
            raise Unavailable(f"the leader replica ({holder}) cannot be reached: try again in "
                              "a moment", retry_after=1) from exc

    async def _leader(self) -> tuple[str, str]:
        try:
            holder, url = await self.leader_url()
        except Exception as exc:  # NATS gone or a cluster electing: nobody to ask now
            raise Unavailable("the leader replica cannot be found now: try again in a moment",
                              retry_after=1) from exc
        if holder is None or url is None:
            raise Unavailable("no replica leads right now: try again in a moment",
                              retry_after=1)
        if holder == self.replica:
            raise Unavailable("this replica is taking over as the leader: try again in a "
                              "moment", retry_after=1)
        return holder, url
