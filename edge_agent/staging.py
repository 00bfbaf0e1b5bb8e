"""Staging: what an edge does between admitting a task with ``artifacts`` and starting it.

``Stager.resolve(ref)`` is the one call other code (tasks, and later container images) makes:
``{"digest": "sha256:..."}`` or ``{"name", "version"}`` in, the path of the cached, verified
file out, fetched from the core if it is not here. From the core an artifact is used only if
the hub's signed manifest verifies with the hub key the agent enrolled with, names what was
asked for, and the fetched bytes hash to its sha256; otherwise ``ArtifactRefused`` with the
reason, and nothing is run. ``ArtifactUnavailable`` means "not now" (core unreachable, not
pushed yet, cache full of in-use artifacts): the task stays ``staging`` and is retried.

With ``artifact_site_peers`` on (an agent behind a site's leaf node), the bytes come from a
site peer that has or is fetching the artifact when there is one (``edge_agent/sitepeers.py``):
a site's agents get it over the uplink once. The manifest still comes from the core, and what a
peer sends must hash to it like what the core sends.

``place`` puts a task's artifacts into its sandbox at ``dest`` (a copy with ``mode``, or the
archive extracted safely: ``edge_agent/extract.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.artifacts import ArtifactCache, CacheFull
from edge_agent.extract import UnsafeArchive, extract
from edge_agent.sitepeers import SitePeers
from federation import manifest, objstore
from federation.loopguard import stop_loops

log = logging.getLogger(__name__)

KV_DIRECT = f"$JS.API.DIRECT.GET.KV_{manifest.BUCKET}.$KV.{manifest.BUCKET}"
SMALL_COPY = 1 << 20  # placed inline; bigger files are copied on a thread


class ArtifactUnavailable(Exception):
    """Not available now; worth asking again later."""


class ArtifactRefused(Exception):
    """Available but not to be used: bad signature, wrong digest, unsafe archive."""


class Stager:
    """Resolves artifact references to cached files, fetching (once per digest at a time)."""

    def __init__(self, cache: ArtifactCache, *, nc: Callable[[], Any],
                 hub_key: Callable[[], bytes | None], rate_kbps: int = 0) -> None:
        self.cache = cache
        self.nc = nc  # the link's connection, or None while there is none
        self.hub_key = hub_key
        self.rate_kbps = rate_kbps
        self.progress: dict[str, tuple[int, int]] = {}  # digest -> (bytes here, size)
        self.fetched_bytes = 0  # every byte that came over NATS (resumes show twice)
        self.fetches = 0
        self.refused = 0
        self.peer_bytes = 0  # bytes got from site peers instead of the uplink
        self.peers: SitePeers | None = None  # edge_agent/sitepeers.py, when artifact_site_peers
        self._inflight: dict[str, asyncio.Task[Path]] = {}

    # ---------------------------------------------------------------- resolve

    def cached(self, ref: dict[str, Any], *, task_id: str | None = None) -> Path | None:
        """The file for ``ref`` if it is in the cache now (marked used, one commit)."""
        sha = self.cache.local_sha(ref)
        if sha is not None and self.cache.use(sha, task_id):
            return self.cache.path(sha)
        return None

    async def resolve(self, ref: dict[str, Any], *, task_id: str | None = None) -> Path:
        """The cached, verified file for ``ref``; fetched from the core if it is not here."""
        here = self.cached(ref, task_id=task_id)
        if here is not None:
            return here
        if "digest" in ref:
            sha = str(ref["digest"]).removeprefix("sha256:")
            signed: tuple[manifest.Manifest, bytes] | None = None
        else:
            local = self.cache.by_name(ref["name"], ref["version"])
            if local is not None:
                sha, signed = local["sha256"], None
            else:
                signed = await self._manifest(manifest.name_key(ref["name"], ref["version"]),
                                              f"{ref['name']} {ref['version']}")
                m = signed[0]
                if (m.name, m.version) != (ref["name"], ref["version"]):
                    self.refused += 1
                    raise ArtifactRefused(f"manifest for {ref['name']} {ref['version']} names "
                                          f"{m.name} {m.version}")
                sha = m.sha256
        if task_id is not None:
            self.cache.bind(task_id, sha)  # before any eviction can look at it
        path = self.cache.path(sha)
        if self.cache.get(sha) is not None and path.exists():
            self.cache.touch(sha)
            return path
        running = self._inflight.get(sha)
        if running is None:
            # The fetch is the stager's, not the asking task's: a killed task does not cut a
            # fetch others wait for (or that the next try of the same task resumes).
            running = asyncio.create_task(self._fetch(sha, signed), name=f"fetch-{sha[:12]}")
            self._inflight[sha] = running
            running.add_done_callback(lambda t: self._fetch_done(sha, t))
        return await asyncio.shield(running)

    def _fetch_done(self, sha: str, task: asyncio.Task[Path]) -> None:
        if self._inflight.get(sha) is task:
            del self._inflight[sha]
        if not task.cancelled():
            task.exception()  # retrieved here; each waiter gets it from its own await

    async def stop(self) -> None:
        """Cancel fetches under way (their progress files stay: the next start resumes)."""
        await stop_loops(*self._inflight.values(), errors=False)

    async def _manifest(self, key: str, what: str) -> tuple[manifest.Manifest, bytes]:
        nc = self._link()
        try:
            reply = await nc.request(f"{KV_DIRECT}.{key}", b"", timeout=5)
        except Exception as exc:
            raise ArtifactUnavailable(f"core not reachable for {what}: {exc!r}") from None
        headers = reply.headers or {}
        if headers.get("Status") == "404" or headers.get("KV-Operation") in ("DEL", "PURGE") \
                or not reply.data:
            raise ArtifactUnavailable(f"no artifact {what} at the core (not pushed yet?)")
        if headers.get("Status"):
            raise ArtifactUnavailable(f"core answered {headers.get('Status')} for {what}")
        try:
            return manifest.open_signed(reply.data, self.hub_key()), bytes(reply.data)
        except manifest.ManifestRejected as exc:
            self.refused += 1
            raise ArtifactRefused(f"artifact {what}: {exc}") from None

    def _link(self) -> Any:
        nc = self.nc()
        if nc is None or not getattr(nc, "is_connected", False):
            raise ArtifactUnavailable("not here, and the core is not reachable now")
        return nc

    async def _fetch(self, sha: str, found: tuple[manifest.Manifest, bytes] | None) -> Path:
        if found is None:
            found = await self._manifest(manifest.digest_key(sha), f"sha256:{sha}")
        signed, raw = found
        if signed.sha256 != sha:
            self.refused += 1
            raise ArtifactRefused(f"manifest for sha256:{sha} is for sha256:{signed.sha256}")
        try:
            self.cache.make_room(signed.size)
        except CacheFull as exc:
            raise ArtifactUnavailable(exc.message) from None
        self.fetches += 1
        self.progress[sha] = (0, signed.size)
        try:
            part, source = await self._fetch_bytes(sha, signed)
        finally:
            self.progress.pop(sha, None)
        try:
            self.cache.add(part, sha=sha, size=signed.size, name=signed.name,
                           version=signed.version, labels=signed.labels,
                           created=signed.created, origin="core",
                           manifest=raw)
        except CacheFull as exc:
            raise ArtifactUnavailable(exc.message) from None
        log.info("artifact %s %s (sha256:%s, %d bytes) fetched from %s and verified",
                 signed.name, signed.version, sha, signed.size, source,
                 extra={"digest": sha, "source": source})
        return self.cache.path(sha)

    async def _fetch_bytes(self, sha: str, signed: manifest.Manifest) -> tuple[Path, str]:
        """The artifact's bytes in a part file that hashes to the signed sha256: from a site
        peer if one has it or is fetching it, else over the uplink (resumably)."""
        def progress(done: int, size: int) -> None:
            self._progress(sha, done, size)

        peers = self.peers
        if peers is not None:
            pulled = self.cache.parts / f"{sha}.peer"
            if await peers.fetch(sha, signed.size, pulled, progress):
                self.peer_bytes += signed.size
                return pulled, "a site peer"
        try:
            return await self._fetch_uplink(sha, signed, progress), "the core"
        finally:
            if peers is not None:
                peers.done(sha)

    async def _fetch_uplink(self, sha: str, signed: manifest.Manifest,
                            progress: Callable[[int, int], None]) -> Path:
        fetcher = objstore.Fetcher(self._link(), rate_kbps=self.rate_kbps)
        part = self.cache.parts / f"{sha}.part"
        try:
            meta = await fetcher.fetch(sha, part, progress)
        except objstore.FetchError as exc:
            if exc.retry:
                raise ArtifactUnavailable(str(exc)) from None
            self.refused += 1
            raise ArtifactRefused(str(exc)) from None
        finally:
            self.fetched_bytes += fetcher.received
        if meta.sha256 != signed.sha256 or meta.size != signed.size:
            part.unlink(missing_ok=True)
            self.refused += 1
            raise ArtifactRefused(f"artifact sha256:{sha}: the stored object's digest "
                                  f"sha256:{meta.sha256} is not the signed manifest's")
        return part

    def _progress(self, sha: str, done: int, size: int) -> None:
        self.progress[sha] = (done, size)

    # ---------------------------------------------------------------- place

    async def place(self, task_id: str, uses: list[dict[str, Any]], sandbox: Path,
                    on_progress: Callable[[str], None] | None = None) -> None:
        """Resolve each of a task's artifacts and put it at its ``dest`` in ``sandbox``."""
        sandbox.mkdir(parents=True, exist_ok=True)
        for use in uses:
            what = use.get("digest") or f"{use['name']} {use['version']}"
            src = self.cached(use, task_id=task_id) or await self._resolve_reporting(
                use, task_id, what, on_progress)
            dest = sandbox / use["dest"]
            if use.get("extract"):
                try:
                    await asyncio.to_thread(extract, src, dest)
                except UnsafeArchive as exc:
                    self.refused += 1
                    raise ArtifactRefused(f"artifact {what}: {exc}") from None
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".outpost-tmp")
                if src.stat().st_size <= SMALL_COPY:
                    shutil.copyfile(src, tmp)  # a thread costs more than this copy
                else:
                    await asyncio.to_thread(shutil.copyfile, src, tmp)
                os.chmod(tmp, int(use.get("mode", "0644"), 8))
                os.replace(tmp, dest)

    def place_cached(self, task_id: str, uses: list[dict[str, Any]], sandbox: Path) -> bool:
        """``place`` done inline when every artifact is cached, small and not an archive
        (the common restart or rollout case: no task, no thread); False: use ``place``."""
        found = []
        for use in uses:
            sha = self.cache.local_sha(use)
            if use.get("extract") or sha is None or not self.cache.has(sha) \
                    or self.cache.path(sha).stat().st_size > SMALL_COPY:
                return False
            found.append((use, sha))
        sandbox.mkdir(parents=True, exist_ok=True)
        for use, sha in found:
            if not self.cache.use(sha, task_id):
                return False
            dest = sandbox / use["dest"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".outpost-tmp")
            shutil.copyfile(self.cache.path(sha), tmp)
            os.chmod(tmp, int(use.get("mode", "0644"), 8))
            os.replace(tmp, dest)
        return True

    async def _resolve_reporting(self, use: dict[str, Any], task_id: str, what: str,
                                 on_progress: Callable[[str], None] | None) -> Path:
        """``resolve``, telling ``on_progress`` how far a fetch is about once a second."""
        job = asyncio.ensure_future(self.resolve(use, task_id=task_id))
        try:
            while True:
                done, _ = await asyncio.wait({job}, timeout=1.0)
                if done:
                    return job.result()
                if on_progress is not None and self.progress:
                    sha = str(use.get("digest", "")).removeprefix("sha256:")
                    have, size = self.progress.get(sha) or next(iter(self.progress.values()))
                    pct = 100 * have // size if size else 100
                    on_progress(f"fetching artifact {what}: {have >> 20} of {size >> 20} MB "
                                f"({pct}%)")
        finally:
            if not job.done():
                job.cancel()
                with contextlib.suppress(BaseException):
                    await job

    def metrics(self) -> dict[str, float]:
        return {"fetched_bytes": self.fetched_bytes, "peer_bytes": self.peer_bytes,
                "fetches": self.fetches,
                "refused": self.refused, "evicted": self.cache.evicted,
                "cache_bytes": self.cache.used_bytes(), "fetching": len(self.progress),
                "updated": time.time()}
