"""The core's side of ``/v1/artifacts``: JetStream Object Store plus manifests signed by the hub.

A push puts the uploaded file into the ``OUTPOST_ARTIFACTS`` object store under its sha256
(``federation/objstore.py``), then writes the manifest signed with the hub key to the
``OUTPOST_MANIFESTS`` KV bucket under the digest and under the name and version. A version is
immutable: the same name and version with other bytes is a 409. Everything lives in JetStream
(replicated like the streams), so the hub keeps no artifact state of its own.

Where artifacts are: each agent's offer lists the digests it holds (``Offer.artifacts``), so
``GET /v1/artifacts/{digest}`` names the agents and sites. ``stage`` sends matching agents a
``stage`` command (``federation/messages.py``), which the edge applies by fetching ahead.
Deleting purges the object's chunks and meta through the hub's set-up user (the run-time user
has no purge right) and is refused (409) while a task that has not ended uses the artifact.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from core_hub.store import HubStore
from federation import manifest, objstore
from federation.backend import Page
from federation.errors import Conflict, NotFound, Unavailable
from federation.kvsnapshot import current_entries
from federation.pagination import decode_cursor, encode_cursor
from federation.schemas import TERMINAL_STATES
from federation.wire import Signer

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 8 << 30
_ENDED = tuple(sorted(TERMINAL_STATES))


class CoreArtifacts:
    """``federation.artifacts.ArtifactService`` at the core."""

    def __init__(self, *, js: Any, nc: Any, store: HubStore, signer: Signer, spool_dir: Path,
                 setup_connection: Callable[[], Awaitable[Any]],
                 send_stage: Callable[[str, str], Awaitable[Any]] | None = None) -> None:
        self.js, self.nc, self.store, self.signer = js, nc, store, signer
        self.spool_dir = spool_dir  # where content is fetched to before it is sent
        self.max_upload_bytes = MAX_UPLOAD_BYTES
        self.setup_connection = setup_connection
        self.send_stage = send_stage  # (agent_id, digest hex): queue a stage command
        self._kv: Any = None

    async def _bucket(self) -> Any:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(manifest.BUCKET)
            except Exception as exc:
                raise Unavailable(f"artifact store not reachable: {exc!r}") from None
        return self._kv

    async def _manifest(self, key: str) -> tuple[manifest.Manifest, bytes] | None:
        from nats.js.errors import KeyNotFoundError

        kv = await self._bucket()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return manifest.open_signed(entry.value, self.signer.public), entry.value

    async def add(self, pieces: AsyncIterator[bytes], *, name: str, version: str,
                  labels: dict[str, str]) -> dict[str, Any]:
        """Publish the upload as chunks while it arrives (``objstore.ObjectWriter``), then the
        object's meta under its sha256 and the signed manifest. Chunks of an upload that
        fails, or that turns out to be an artifact already stored, are purged."""
        same = await self._manifest(manifest.name_key(name, version))
        writer = objstore.ObjectWriter(self.js, uuid.uuid4().hex)
        try:
            async for piece in pieces:
                await writer.write(piece)
            sha = writer.digest.hexdigest()
            if same is not None and same[0].sha256 != sha:
                raise Conflict(f"artifact {name} {version} exists with other bytes "
                               f"(sha256:{same[0].sha256}); push a new version",
                               details={"digest": same[0].digest})
            have = await objstore.read_meta(self.nc, sha)
            if have is not None and have.sha256 == sha:
                await writer.abandon()
                await self._purge(writer.chunks_subject)  # the bytes are stored already
            else:
                await writer.commit(sha)
        except BaseException:
            await writer.abandon()
            await asyncio.shield(self._purge(writer.chunks_subject))
            raise
        size = writer.size
        signed = manifest.new_manifest(name, version, sha, size, labels)
        raw = manifest.sign(signed, self.signer)
        kv = await self._bucket()
        existing = await self._manifest(manifest.digest_key(sha))
        if existing is None:
            await kv.put(manifest.digest_key(sha), raw)
        await kv.put(manifest.name_key(name, version), raw)
        log.info("artifact %s %s pushed (sha256:%s, %d bytes)", name, version, sha, size,
                 extra={"digest": sha})
        return self._view(existing[0] if existing else signed)

    async def _purge(self, subject: str) -> None:
        """Purge one subject of the object stream (the set-up user's right, not the hub's)."""
        try:
            nc = await self.setup_connection()
        except Exception as exc:
            log.warning("could not purge %s: %r", subject, exc)
            return
        try:
            await nc.jetstream(timeout=5).purge_stream(objstore.STREAM, subject=subject)
        except Exception as exc:
            log.warning("could not purge %s: %r", subject, exc)
        finally:
            await nc.close()

    def _view(self, m: manifest.Manifest) -> dict[str, Any]:
        return {**m.to_json(), "origin": "core", "signed": True}

    async def _all(self) -> builtins.list[manifest.Manifest]:
        # Not kv.keys(): nats-py's watcher may end before its first key (kvsnapshot.py).
        entries = await current_entries(await self._bucket())
        return [manifest.open_signed(entry.value, self.signer.public)
                for key, entry in sorted(entries.items()) if key.startswith("d.")]

    async def list(self, name: str | None, limit: int, cursor: str | None) -> Page:
        c = decode_cursor(cursor, n=str, v=str, s=str)
        after = (c["n"], c["v"], c["s"]) if c else ("", "", "")
        items = sorted((m for m in await self._all() if name is None or m.name == name),
                       key=lambda m: (m.name, m.version, m.sha256))
        items = [m for m in items if (m.name, m.version, m.sha256) > after]
        page, nxt = items[:limit], None
        if len(items) > limit:
            last = page[-1]
            nxt = encode_cursor({"n": last.name, "v": last.version, "s": last.sha256})
        return Page([self._view(m) for m in page], nxt)

    async def get(self, sha: str) -> dict[str, Any]:
        got = await self._manifest(manifest.digest_key(sha))
        if got is None:
            raise NotFound(f"no artifact sha256:{sha}", details={"digest": f"sha256:{sha}"})
        return {**self._view(got[0]), "agents": self.holders(sha)}

    def holders(self, sha: str) -> builtins.list[dict[str, str]]:
        """Agents whose latest offer lists the artifact, with their site."""
        rows = self.store.read(
            "SELECT o.agent_id, o.body FROM offers o WHERE o.body LIKE ?", (f"%{sha}%",))
        out = []
        for row in rows:
            body = json.loads(row["body"])
            if sha in (body.get("artifacts") or []):
                out.append({"id": row["agent_id"], "site": str(body.get("site", ""))})
        return sorted(out, key=lambda a: (a["site"], a["id"]))

    async def resolve(self, ref: dict[str, str]) -> str | None:
        """The sha256 (hex) an artifact reference (``{"digest"}`` or ``{"name", "version"}``)
        names, or None when the core holds no such artifact."""
        if ref.get("digest"):
            key = manifest.digest_key(ref["digest"].removeprefix("sha256:"))
        else:
            key = manifest.name_key(ref["name"], ref["version"])
        got = await self._manifest(key)
        return None if got is None else got[0].sha256

    async def content(self, sha: str) -> tuple[Path, bool]:
        await self.get(sha)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        part = self.spool_dir / f"get-{uuid.uuid4().hex}"
        try:
            await objstore.Fetcher(self.nc).fetch(sha, part)
        except objstore.FetchError as exc:
            part.unlink(missing_ok=True)
            raise Unavailable(str(exc)) from None
        return part, True

    def users(self, m: manifest.Manifest) -> builtins.list[str]:
        """Tasks in the view that have not ended and name this artifact."""
        marks = ",".join("?" * len(_ENDED))
        rows = self.store.read(
            f"SELECT id, body FROM tasks WHERE state NOT IN ({marks}) AND "
            "(body LIKE ? OR body LIKE ?)", (*_ENDED, f"%{m.sha256}%", f"%{m.name}%"))
        out = []
        for row in rows:
            body = json.loads(row["body"])
            if body.get("image") in (m.digest, f"{m.name}:{m.version}"):  # an oci image
                out.append(row["id"])
                continue
            for use in body.get("artifacts") or []:
                if use.get("digest") == m.digest or (
                        use.get("name") == m.name and use.get("version") == m.version):
                    out.append(row["id"])
                    break
        return out

    async def delete(self, sha: str) -> dict[str, Any]:
        got = await self._manifest(manifest.digest_key(sha))
        if got is None:
            raise NotFound(f"no artifact sha256:{sha}", details={"digest": f"sha256:{sha}"})
        m = got[0]
        users = self.users(m)
        if users:
            raise Conflict(f"artifact sha256:{sha} is used by {len(users)} task(s) that have "
                           "not ended", details={"tasks": users[:20]})
        kv = await self._bucket()
        await kv.delete(manifest.digest_key(sha))
        await kv.delete(manifest.name_key(m.name, m.version))
        meta = await objstore.read_meta(self.nc, sha)
        if meta is not None:
            await self._purge(objstore.chunk_subject(meta.nuid))
        await self._purge(objstore.meta_subject(sha))
        return self._view(m)

    async def stage_on(self, agent_id: str, sha: str) -> None:
        """Queue one stage command (a rollout's ``stage_first``)."""
        if self.send_stage is None:
            raise Unavailable("this hub cannot send stage commands")
        await self.send_stage(agent_id, sha)

    async def stage(self, sha: str, selector: dict[str, Any]) -> dict[str, Any]:
        await self.get(sha)
        if self.send_stage is None:
            raise Unavailable("this hub cannot send stage commands")
        agents = self._select(selector)
        await asyncio.gather(*(self.send_stage(a, sha) for a in agents))
        return {"digest": f"sha256:{sha}", "agents": agents}

    def _select(self, selector: dict[str, Any]) -> builtins.list[str]:
        rows = self.store.read("SELECT id, site, labels FROM agents WHERE revoked = 0 AND "
                               "status != 'unreachable'")
        picked = []
        wanted_ids = set(selector.get("agents") or [])
        for row in rows:
            if selector.get("site") and row["site"] != selector["site"]:
                continue
            labels = json.loads(row["labels"] or "{}")
            if any(labels.get(k) != v for k, v in (selector.get("labels") or {}).items()):
                continue
            if wanted_ids and row["id"] not in wanted_ids:
                continue
            picked.append(row["id"])
        return sorted(picked)
