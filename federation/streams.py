"""The two JetStream streams of the wire contract, created or brought up to date at start.

Both the hub and the embedded demo call ``ensure_streams`` every time they start: it is
idempotent, so a second hub replica or a restart never fails on "stream exists", and a changed
limit (a longer retention, say) is applied to the existing stream without losing its messages.

Both streams use limits retention: the hub rebuilds its whole view from ``OUTPOST_EVENTS``
(DESIGN.md, "Scale"), and an agent finds its commands on ``OUTPOST_COMMANDS`` even after hours
away: it reads them by direct get (``allow_direct``), with no consumer per agent
(``federation/commandlog.py`` says why). ``max_consumers`` is set explicitly: the commands
stream needs none (a few are left for tools), so nothing piles up server state per agent.
The duplicate window is what makes ``Nats-Msg-Id = <agent>:<seq>`` dedupe re-sent outbox
rows; it must cover the publisher's retry horizon.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.js.api import (
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
# No per-agent consumers on the commands stream any more; a few for tools and tests.
COMMANDS_MAX_CONSUMERS = 16


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
                     description="Outpost hub commands, numbered per agent, read by direct get",
                     max_age=commands_max_age_s, max_bytes=commands_max_bytes,
                     allow_direct=True, max_consumers=COMMANDS_MAX_CONSUMERS, **common),
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
