"""Fixes for nats-py 2.16's client: a late PONG (patched at import, below) and the socket of
a failed connect (``connect_once``, which the hub's and the agents' connections go through).

``Client.flush(timeout)`` sends a PING and waits for its PONG; on a timeout it cancels the
waiting future but leaves it queued in ``_pongs``. When the PONG does come (a slow server, a
link that was frozen for a moment), ``_process_pong`` calls ``set_result`` on the cancelled
future, the InvalidStateError ends the client's read loop, and the client stays "connected"
while it never reads again: no message, no PubAck, no PONG. That was the agents' "link
stalled while NATS says connected" (issue 11), which the watchdog in ``edge_agent/sync.py``
only papered over by rebuilding the link. PONGs answer PINGs in order, so a PONG still takes
its own queued future off, and only sets a result if nobody gave up on it.

Applied once, at import of this module, which every place that opens a NATS connection
imports first (``edge_agent/sync.py``, ``core_hub/hub.py``, ``core_hub/natsauth.py``; the
``outpost`` CLI speaks HTTP only and does not pay for importing nats-py). The pinned version
is checked by ``tests/test_natsd.py``, so an upgrade gets this re-checked rather than
silently patched wrong.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client

FIXED_FOR = "2.16.0"  # the nats-py version this was written against (pyproject.toml pins it)


async def _process_pong(self: Any) -> None:
    """A PONG answers the oldest PING: its future gets the result unless it was abandoned."""
    if self._pongs:
        future = self._pongs.pop(0)
        if not future.done():
            future.set_result(True)
        self._pongs_received += 1
        self._pings_outstanding = 0


def apply() -> None:
    if getattr(Client._process_pong, "__outpost_fixed__", False):
        return
    _process_pong.__outpost_fixed__ = True  # type: ignore[attr-defined]
    Client._process_pong = _process_pong  # type: ignore[method-assign]


apply()


CLOSE_TIMEOUT_S = 5.0


async def connect_once(url: str, *, close_timeout_s: float = CLOSE_TIMEOUT_S,
                       **options: Any) -> Client:
    """``Client().connect(url, **options)``, but a connect that fails (a server that accepts
    but never answers, a refused login, a cancel) leaves no socket open: nats-py keeps it
    until garbage collection; this closes it (within ``close_timeout_s``) and re-raises."""
    nc = Client()
    try:
        await nc.connect(url, **options)
    except BaseException:
        try:
            await asyncio.wait_for(nc.close(), close_timeout_s)
        except Exception:  # noqa: BLE001 (the connect's own error is the one to report)
            pass
        raise
    return nc
