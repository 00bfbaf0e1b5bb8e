"""The two JetStream streams of the wire contract, created or brought up to date at start.

Both the hub and the embedded demo call ``ensure_streams`` every time they start: it is
idempotent, so a second hub replica or a restart never fails on "stream exists", and a changed
limit (a longer retention, say) is applied to the existing stream without losing its messages.

Both streams use limits retention: the hub rebuilds its whole view from ``OUTPOST_EVENTS``
(DESIGN.md, "Scale"), and an agent's durable consumer on ``OUTPOST_COMMANDS`` finds its
commands even after hours away. The duplicate window is what makes ``Nats-Msg-Id =
<agent>:<seq>`` dedupe re-sent outbox rows; it must cover the publisher's retry horizon.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError
from nats.js.manager import JetStreamManager

from federation import subjects

log = logging.getLogger(__name__)

DAY_S = 86400.0
# JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


def stream_configs(*, replicas: int = 1,
                   events_max_age_s: float = 7 * DAY_S,
                   events_max_bytes: int = 1 << 30,
                   commands_max_age_s: float = 7 * DAY_S,
                   commands_max_bytes: int = 256 << 20,
                   duplicate_window_s: float = 120.0) -> list[StreamConfig]:
    """The desired configuration of both streams; separate so tests and tools can read it."""
    if duplicate_window_s > min(events_max_age_s, commands_max_age_s):
        raise ValueError("duplicate window must not be longer than a stream's max age")
    common: dict[str, Any] = dict(retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
                  storage=StorageType.FILE, num_replicas=replicas,
                  duplicate_window=duplicate_window_s)
    return [
        StreamConfig(name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_ALL],
                     description="Outpost agent events, per-agent seq order",
                     max_age=events_max_age_s, max_bytes=events_max_bytes, **common),
        StreamConfig(name=subjects.COMMANDS_STREAM, subjects=[subjects.COMMANDS_ALL],
                     description="Outpost hub commands, one durable consumer per agent",
                     max_age=commands_max_age_s, max_bytes=commands_max_bytes, **common),
    ]


async def ensure_streams(js: JetStreamManager, *, replicas: int = 1,
                         events_max_age_s: float = 7 * DAY_S,
                         events_max_bytes: int = 1 << 30,
                         commands_max_age_s: float = 7 * DAY_S,
                         commands_max_bytes: int = 256 << 20,
                         duplicate_window_s: float = 120.0) -> dict[str, StreamInfo]:
    """Create both streams, or update them in place if they exist with other limits.

    Returns the server's view of each stream by name. Settings JetStream cannot change in place
    (storage type, a replica count the cluster cannot meet) raise the server's error unchanged.
    """
    configs = stream_configs(replicas=replicas, events_max_age_s=events_max_age_s,
                             events_max_bytes=events_max_bytes,
                             commands_max_age_s=commands_max_age_s,
                             commands_max_bytes=commands_max_bytes,
                             duplicate_window_s=duplicate_window_s)
    infos: dict[str, StreamInfo] = {}
    for config in configs:
        try:
            # Creating with an identical config succeeds on the server: nothing to compare.
            info = await js.add_stream(config)
        except BadRequestError as err:
            if err.err_code != _STREAM_NAME_IN_USE:
                raise
            info = await js.update_stream(config)
            log.info("updated stream %s to new limits", config.name,
                     extra={"stream": config.name})
        assert config.name is not None
        infos[config.name] = info
    return infos


# Deliveries of one command before the server gives up on it. The edge acknowledges every
# command it has recorded, applied or not (a failed result says why), so only a command that
# crashes the agent or its store before it is recorded comes back; five tries, not for ever.
COMMAND_MAX_DELIVER = 5


def command_consumer_config(agent_id: str) -> ConsumerConfig:
    """One agent's durable pull consumer on ``OUTPOST_COMMANDS``: its commands only, in order,
    each acked explicitly after the agent recorded it, at most ``COMMAND_MAX_DELIVER`` times."""
    durable = subjects.command_consumer(agent_id)
    return ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                          deliver_policy=DeliverPolicy.ALL, ack_wait=30,
                          max_deliver=COMMAND_MAX_DELIVER,
                          filter_subject=subjects.commands(agent_id))


async def ensure_command_consumer(js: JetStreamManager, agent_id: str) -> None:
    """Create one agent's command consumer (idempotent). The hub does it at enrollment and at
    start, so an agent under least privilege needs no right to create consumers."""
    await js.add_consumer(subjects.COMMANDS_STREAM, config=command_consumer_config(agent_id))


async def delete_command_consumer(js: JetStreamManager, agent_id: str) -> bool:
    """Delete a revoked agent's command consumer, so nothing can fetch its commands any more
    (a site leaf keeps its permissions until it reconnects); False if there was none."""
    from nats.js.errors import NotFoundError

    try:
        return bool(await js.delete_consumer(subjects.COMMANDS_STREAM,
                                             subjects.command_consumer(agent_id)))
    except NotFoundError:
        return False
