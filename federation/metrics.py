"""Prometheus exposition for ``/metrics``, built from the backend's ``Metric`` families.

prometheus-client is imported only when metrics are scraped: an idle edge agent should not pay
for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from federation.backend import Metric


def _app_metrics(stats: dict[str, Any]) -> list[Metric]:
    return [
        Metric("outpost_http_requests_total", "counter", "API requests served",
               [({}, float(stats.get("requests", 0)))]),
        Metric("outpost_http_internal_errors_total", "counter",
               "API requests that failed with an internal error",
               [({}, float(stats.get("errors", 0)))]),
        Metric("outpost_http_rate_limited_total", "counter",
               "API requests refused (429) by the per-token request rate limit",
               [({}, float(stats.get("rate_limited", 0)))]),
        Metric("outpost_http_streams_refused_total", "counter",
               "Streams refused (429) because the token held the most it may",
               [({}, float(stats.get("streams_refused", 0)))]),
        Metric("outpost_http_unknown_tokens_total", "counter",
               "API requests with an unknown or revoked token (401)",
               [({}, float(stats.get("unknown_tokens", 0)))]),
        Metric("outpost_http_guesses_refused_total", "counter",
               "API requests refused (429) because their address sent too many unknown tokens",
               [({}, float(stats.get("guesses_refused", 0)))]),
        Metric("outpost_uptime_seconds", "gauge", "Seconds since the API started",
               [({}, time.time() - stats.get("started", time.time()))]),
    ]


class _Collector:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for fam in self._families:
            names = sorted({k for labels, _ in fam.samples for k in labels})
            cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
            name = fam.name.removesuffix("_total") if fam.kind == "counter" else fam.name
            out = cls(name, fam.help, labels=names)
            for labels, value in fam.samples:
                out.add_metric([labels.get(n, "") for n in names], value)
            yield out


def render(families: list[Metric], stats: dict[str, Any]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector([*families, *_app_metrics(stats)]))
    return generate_latest(registry)
