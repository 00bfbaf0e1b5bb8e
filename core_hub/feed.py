"""The fleet's event feed for ``GET /v1/events`` at the core, read straight from JetStream.

``OUTPOST_EVENTS`` already is the fleet's ordered, durable event log, so the feed is an
ordered consumer on it, not a second copy. Each SSE id is ``stream_seq * 4096 + index`` (the
index of the event inside its batch envelope; batches hold at most 1000), so a client resumes
exactly where it stopped with ``Last-Event-ID``. Envelopes are verified as at ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from core_hub.keyrotation import open_agent_envelope
from core_hub.store import AgentKey
from federation import subjects, wire
from federation.backend import StreamEvent

SLOTS = 4096
RECENT_MESSAGES = 8  # how far back "recent" reaches: a few batch envelopes, not the history


def recent_after(stream_seq: int, messages: int = RECENT_MESSAGES) -> int:
    """The SSE id to resume after for the last ``messages`` envelopes up to ``stream_seq``
    (what a page opening now shows as "just happened")."""
    return max(0, (stream_seq - messages + 1) * SLOTS - 1)


async def fleet_events(js: Any, key_of: Callable[[str], AgentKey | None],
                       after: int | None) -> AsyncIterator[StreamEvent]:
    """Events after SSE id ``after`` (None: only new ones), forever. The consumer is made
    here, before the API starts the stream: a NATS that cannot make it is a 503, not a
    stream that breaks after its headers."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)

    async def on_msg(msg: Any) -> None:
        await queue.put(msg)

    if after is None:
        sub = await js.subscribe(subjects.EVENTS_ALL, cb=on_msg, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.NEW)
        start_seq, skip_index = 0, -1
    else:
        start_seq, skip_index = divmod(after, SLOTS)
        sub = await js.subscribe(subjects.EVENTS_ALL, cb=on_msg, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                 config=ConsumerConfig(opt_start_seq=max(start_seq, 1)))
    return _events(sub, queue, key_of, start_seq, skip_index)


async def _events(sub: Any, queue: asyncio.Queue[Any], key_of: Callable[[str], AgentKey | None],
                  start_seq: int, skip_index: int) -> AsyncIterator[StreamEvent]:
    try:
        while True:
            msg = await queue.get()
            seq = msg.metadata.sequence.stream
            agent = msg.subject.rsplit(".", 1)[-1]
            try:
                env = open_agent_envelope(msg.data, key_of(agent), agent)
            except wire.EnvelopeRejected:
                continue
            for index, event in enumerate(env.events()):
                if seq == start_seq and index <= skip_index:
                    continue
                body = event.body if isinstance(event.body, dict) else {"value": event.body}
                yield StreamEvent(seq * SLOTS + index, event.kind,
                                  {**body, "_agent": env.agent, "_seq": event.seq})
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
