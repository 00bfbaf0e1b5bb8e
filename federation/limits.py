"""Per-token API limits: a request rate (token bucket) and a cap on open streams.

One client with a valid token must not be able to starve a small edge box of its event loop
(a tight request loop) or of its sockets and memory (hundreds of SSE or log-follow streams).
Both limits are kept per bearer-token digest, in memory: a restart forgets them, which is fine
for limits whose windows are seconds. Requests without a token (``/v1/health``, the OpenAPI
document, the dashboard's static files) are not limited: they are cheap and carry no identity.
Going over a limit is a ``TooManyRequests`` (429); nothing already accepted is touched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from federation.errors import ConfigError, TooManyRequests


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """``rate_per_s``: requests per second one token may make on average (0: no limit);
    ``burst``: how many it may make at once after being idle; ``streams_per_token``: how many
    endless responses (``/v1/events``, ``logs?follow=true``) one token may hold open."""

    rate_per_s: float = 1000.0
    burst: int = 2000
    streams_per_token: int = 32

    def __post_init__(self) -> None:
        if not 0 <= self.rate_per_s <= 1_000_000:
            raise ConfigError(f"rate_limit_per_s: {self.rate_per_s!r} is not valid; expected "
                              "0 (no limit) to 1000000", details={"setting": "rate_limit_per_s"})
        if not 1 <= self.burst <= 1_000_000:
            raise ConfigError(f"rate_limit_burst: {self.burst!r} is not valid; expected 1 to "
                              "1000000", details={"setting": "rate_limit_burst"})
        if not 1 <= self.streams_per_token <= 10_000:
            raise ConfigError(f"max_streams_per_token: {self.streams_per_token!r} is not valid; "
                              "expected 1 to 10000", details={"setting": "max_streams_per_token"})


class TokenBuckets:
    """One token bucket per key: ``burst`` deep, refilled at ``rate_per_s``.

    ``take(key)`` spends one request or raises ``TooManyRequests`` saying when the next one is
    due. Keys are digests of tokens that passed authentication, so the map is as large as the
    set of live tokens; buckets idle long enough to be full again are dropped when it grows.
    """

    MAX_KEYS = 10_000

    def __init__(self, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens left, at)
        self.refused = 0

    def take(self, key: str) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0 - 1e-9:  # float sums of refills must not refuse a due request
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.MAX_KEYS:
                self._prune(now)
            return
        self._buckets[key] = (tokens, now)
        self.refused += 1
        raise self._refusal((1.0 - tokens) / self.rate)

    def check(self, key: str) -> None:
        """Raise as ``take`` would, without spending anything."""
        if self.rate <= 0:
            return
        tokens, at = self._buckets.get(key, (self.burst, 0.0))
        tokens = min(self.burst, tokens + (self.clock() - at) * self.rate)
        if tokens < 1.0 - 1e-9:
            self.refused += 1
            raise self._refusal((1.0 - tokens) / self.rate)

    def _refusal(self, wait: float) -> TooManyRequests:
        return TooManyRequests(
            f"rate limit: this token may make {self.rate:g} requests per second "
            f"(bursts of {self.burst:g}); retry after {wait:.2f} s",
            retry_after=max(1, math.ceil(wait)),
            details={"limit": "rate", "rate_per_s": self.rate, "burst": self.burst,
                     "retry_after_s": round(wait, 3)})

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        for key, (_, at) in list(self._buckets.items()):
            if now - at >= full_after:
                del self._buckets[key]


class FailedLogins(TokenBuckets):
    """Unknown or revoked tokens per client address: ``FAILED_LOGINS_BURST`` guesses, then
    ``FAILED_LOGINS_PER_S``. While an address is over, every token it sends gets 429 before
    it is looked up, so guessing cannot go on at the request rate (a right guess would not
    show). A request with no token at all is not a guess and is not counted."""

    def _refusal(self, wait: float) -> TooManyRequests:
        return TooManyRequests(
            f"too many unknown tokens from this address; retry after {wait:.0f} s",
            retry_after=max(1, math.ceil(wait)),
            details={"limit": "failed_logins", "per_s": self.rate, "burst": self.burst,
                     "retry_after_s": round(wait, 3)})


FAILED_LOGINS_BURST = 30
FAILED_LOGINS_PER_S = 0.5


class StreamSlots:
    """How many endless responses each key holds open, capped at ``per_key``."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._open: dict[str, int] = {}
        self.refused = 0

    def count(self, key: str) -> int:
        return self._open.get(key, 0)

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """One slot for the duration of the ``with``; ``TooManyRequests`` if none is free."""
        held = self._open.get(key, 0)
        if held >= self.per_key:
            self.refused += 1
            raise TooManyRequests(
                f"this token already holds {held} open streams (events or log follows), the "
                f"most allowed; close one and try again", details={
                    "limit": "streams", "max_streams_per_token": self.per_key, "open": held})
        self._open[key] = held + 1
        try:
            yield
        finally:
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]


class Limiter:
    """The limits one API app enforces: ``buckets`` for requests, ``streams`` for streams,
    ``failed_logins`` for guessed tokens (per client address)."""

    def __init__(self, limits: ApiLimits) -> None:
        self.limits = limits
        self.buckets = TokenBuckets(limits.rate_per_s, limits.burst)
        self.streams = StreamSlots(limits.streams_per_token)
        self.failed_logins = FailedLogins(FAILED_LOGINS_PER_S, FAILED_LOGINS_BURST)
