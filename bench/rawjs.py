"""Raw JetStream floors for one given set of messages: publish, fetch+ack, fetch+verify(+decode).

A federation figure (an outbox drain, hub ingest) is only worth its ratio if the raw limit
moves the *same* messages: the same sizes, the same events per message, the same subjects and
``Nats-Msg-Id`` headers. So the benches collect the messages their run really sent (or build
them as agents do) and hand them here; each floor runs on a stream configured like
``OUTPOST_EVENTS`` and returns messages per second, which the caller turns into events per
second with the same messages' own event count (events with events, messages with messages).

The consume floors are what any ingest must do at least, done from one nats-py connection in
this process: ``fetch`` in batches like the hub's, ``ack`` each; then also the envelope's
Ed25519 check (``wire.open_envelope`` against the agent's key), then also one ``orjson.loads``
per event body (the decode every event needs before it can be checked).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from federation import subjects, wire

PIPELINE = 512  # acks outstanding while publishing (the agent keeps up to its IN_FLIGHT)
FETCH = 256  # the hub's ingest fetch size (core_hub.ingest.Ingest batch)


@dataclass(frozen=True, slots=True)
class Message:
    """One JetStream message as an agent sends it, and how many events its envelope carries."""

    subject: str
    data: bytes
    msg_id: str
    events: int


def count_events(data: bytes) -> int:
    """Events in an event envelope (a batch's list, or 1), read without checking the signature."""
    d = wire.unpack(data)
    if d.get("kind") == wire.BATCH:
        return len(d["body"]["events"])
    return 1


async def publish_rate(js: JetStreamContext, msgs: Sequence[Message]) -> float:
    """Messages/s for ``publish_async`` of ``msgs`` with up to ``PIPELINE`` acks pending (the
    context's ``publish_async_max_pending`` bounds it), until every ack is in."""
    t0 = time.perf_counter()
    acks = [await js.publish_async(m.subject, m.data, headers={"Nats-Msg-Id": m.msg_id})
            for m in msgs]
    await asyncio.gather(*acks)
    return len(msgs) / (time.perf_counter() - t0)


Work = Callable[[Msg], None]


async def consume_rate(js: JetStreamContext, n: int, name: str, start_seq: int,
                       work: Work | None = None) -> float:
    """Messages/s for a fresh durable pull consumer (configured like the hub's) to fetch ``n``
    messages from stream seq ``start_seq`` in ``FETCH`` batches, run ``work`` on each, and ack
    each; the consumer is deleted after."""
    config = ConsumerConfig(
        name=name, durable_name=name, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq, ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=-1,
        max_ack_pending=50_000, filter_subject=subjects.EVENTS_ALL)
    await js.add_consumer(subjects.EVENTS_STREAM, config)
    sub = await js.pull_subscribe_bind(durable=name, stream=subjects.EVENTS_STREAM)
    try:
        done = 0
        t0 = time.perf_counter()
        while done < n:
            batch = await sub.fetch(min(FETCH, n - done), timeout=5)
            for msg in batch:
                if work is not None:
                    work(msg)
                await msg.ack()
            done += len(batch)
        return n / (time.perf_counter() - t0)
    finally:
        await sub.unsubscribe()
        await js.delete_consumer(subjects.EVENTS_STREAM, name)


def verifier(keys: Mapping[str, bytes], *, decode: bool) -> Work:
    """``work`` that opens each envelope against its agent's key (``wire.open_envelope``, as
    ingest does) and, with ``decode``, also decodes every event body once with orjson."""
    loads = orjson.loads

    def work(msg: Msg) -> None:
        agent = subjects.agent_of(msg.subject)
        env = wire.open_envelope(msg.data, keys.get, agent, kinds=wire.EVENT_ENVELOPE_KINDS)
        if decode:
            for event in env.raw_events():
                if type(event.body) is bytes:
                    loads(event.body)

    return work


@dataclass(frozen=True, slots=True)
class Floors:
    """Messages/s of each floor for one message set, and that set's events per message."""

    publish: float
    fetch_ack: float
    fetch_verify: float
    fetch_verify_decode: float
    messages: int
    events: int

    @property
    def per_message(self) -> float:
        return self.events / self.messages if self.messages else 0.0

    def events_per_s(self, msgs_per_s: float) -> float:
        return msgs_per_s * self.per_message


async def floors(js: JetStreamContext, msgs: Sequence[Message], keys: Mapping[str, bytes],
                 *, publishes: int = 1, consumes: int = 1) -> Floors:
    """Publish ``msgs`` ``publishes`` times into ``OUTPOST_EVENTS`` of ``js``'s server (the
    first time under their own msg ids, then under new ones: the same ids again would be
    dropped as duplicates), then consume the first copy three ways, ``consumes`` times each.
    Each floor is the best of its runs: the box's limit, not its noise."""
    info: Any = await js.stream_info(subjects.EVENTS_STREAM)
    start = int(info.state.last_seq) + 1
    publish = []
    for r in range(publishes):
        batch = msgs if r == 0 else [Message(m.subject, m.data, f"{m.msg_id}:r{r}", m.events)
                                     for m in msgs]
        publish.append(await publish_rate(js, batch))
    n = len(msgs)
    rates: list[float] = []
    for i, work in enumerate((None, verifier(keys, decode=False), verifier(keys, decode=True))):
        rates.append(max([await consume_rate(js, n, f"bench-raw-{i}-{r}", start, work)
                          for r in range(consumes)]))
    return Floors(max(publish), *rates, messages=n, events=sum(m.events for m in msgs))
