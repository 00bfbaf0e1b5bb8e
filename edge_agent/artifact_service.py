"""The edge's side of ``/v1/artifacts``: the local cache as an ``ArtifactService``.

An upload here goes straight into this agent's cache (``origin: edge``, no signature: the
operator who holds this agent's token is trusted by this agent), so local tasks can use it
with no core at all. ``stage`` fetches an artifact from the core ahead of use.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from edge_agent.staging import ArtifactRefused, ArtifactUnavailable, Stager
from federation.backend import Metric, Page
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)


class EdgeArtifacts:
    """``federation.artifacts.ArtifactService`` over the agent's ``Stager`` and cache."""

    def __init__(self, stager: Stager) -> None:
        self.stager = stager
        self.cache = stager.cache
        self.spool_dir: Path = self.cache.spool
        self.max_upload_bytes = self.cache.limit_bytes
        self._staging: set[asyncio.Task[Any]] = set()

    async def add(self, pieces: AsyncIterator[bytes], *, name: str, version: str,
                  labels: dict[str, str]) -> dict[str, Any]:
        """Write the upload to the spool while hashing it, then move it into the cache."""
        path = self.spool_dir / f"upload-{uuid.uuid4().hex}"
        digest, size = hashlib.sha256(), 0
        try:
            with path.open("wb") as out:
                async for piece in pieces:
                    digest.update(piece)
                    size += len(piece)
                    out.write(piece)
            return self.cache.add(path, sha=digest.hexdigest(), size=size, name=name,
                                  version=version, labels=labels,
                                  created=round(time.time(), 3), origin="edge", manifest=None)
        finally:
            path.unlink(missing_ok=True)

    async def list(self, name: str | None, limit: int, cursor: str | None) -> Page:
        return self.cache.page(name, limit, cursor)

    async def get(self, sha: str) -> dict[str, Any]:
        return self.cache.require(sha)

    async def content(self, sha: str) -> tuple[Path, bool]:
        self.cache.require(sha)
        self.cache.touch(sha)
        return self.cache.path(sha), False

    async def delete(self, sha: str) -> dict[str, Any]:
        return self.cache.delete(sha)

    async def stage(self, sha: str, selector: dict[str, Any]) -> dict[str, Any]:
        """Fetch ahead of use (the selector picks agents at the core; here it is this one)."""
        self.stage_ahead(sha)
        return {"digest": f"sha256:{sha}", "staging": True,
                "cached": self.cache.get(sha) is not None}

    def stage_ahead(self, sha: str) -> None:
        """Start fetching ``sha`` into the cache in the background (API or stage command)."""
        job = asyncio.create_task(self._stage(sha), name=f"stage-{sha[:12]}")
        self._staging.add(job)
        job.add_done_callback(self._staging.discard)

    async def _stage(self, sha: str) -> None:
        try:
            await self.stager.resolve({"digest": f"sha256:{sha}"})
        except (ArtifactRefused, ArtifactUnavailable) as exc:
            log.warning("stage of sha256:%s: %s", sha, exc, extra={"digest": sha})

    async def stop(self) -> None:
        await stop_loops(*self._staging, errors=False)
        await self.stager.stop()

    def metrics(self) -> builtins.list[Metric]:
        s = self.stager
        fetching = [({"digest": f"sha256:{sha}"}, float(done) / size if size else 1.0)
                    for sha, (done, size) in s.progress.items()]
        return [
            Metric("outpost_artifact_cache_bytes", "gauge", "Bytes in the artifact cache",
                   [({}, float(self.cache.used_bytes()))]),
            Metric("outpost_artifact_fetched_bytes_total", "counter",
                   "Artifact bytes received from the core (a resumed fetch counts again)",
                   [({}, float(s.fetched_bytes))]),
            *self._peer_metrics(),
            Metric("outpost_artifact_refused_total", "counter",
                   "Artifacts refused (signature, digest, unsafe archive)",
                   [({}, float(s.refused))]),
            Metric("outpost_artifact_evicted_total", "counter",
                   "Artifacts evicted to make room", [({}, float(self.cache.evicted))]),
            Metric("outpost_artifact_fetch_progress", "gauge",
                   "Fraction fetched of each artifact being fetched", fetching),
        ]

    def _peer_metrics(self) -> builtins.list[Metric]:
        peers = self.stager.peers
        if peers is None:
            return []
        st = peers.stats
        return [
            Metric("outpost_artifact_peer_received_bytes_total", "counter",
                   "Artifact bytes received from this site's peers (no uplink byte)",
                   [({}, float(st["received_bytes"]))]),
            Metric("outpost_artifact_peer_served_bytes_total", "counter",
                   "Artifact bytes this agent sent to its site's peers",
                   [({}, float(st["served_bytes"]))]),
            Metric("outpost_artifact_peer_fetches_total", "counter",
                   "Artifact fetches by where the bytes came from",
                   [({"source": "peer"}, float(st["from_peers"])),
                    ({"source": "uplink"}, float(st["went_up"]))]),
            Metric("outpost_artifact_peer_dropped_total", "counter",
                   "Site peer messages dropped (malformed, or a reply subject not a peer's)",
                   [({}, float(st["dropped"]))]),
            Metric("outpost_artifact_peer_given_up_total", "counter",
                   "Site peers left for the uplink (bad bytes, stalled, gone)",
                   [({}, float(st["bad_peers"]))]),
        ]
