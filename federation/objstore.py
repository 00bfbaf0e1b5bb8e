"""Artifacts' bytes over JetStream Object Store: streamed put, and a resumable get to a file.

Put is nats-py's ``ObjectStore.put`` with a file object (it reads and publishes one chunk at a
time, so a big file is never whole in memory). Get is our own: nats-py's ``get`` either holds
the whole object in memory (nats.py #703) or, with ``writeinto``, runs an ordered consumer
that starts again from the first chunk after a cut. ``Fetcher`` instead asks for chunks by
stream sequence with batched direct gets (``$JS.API.DIRECT.GET.<stream>`` with
``next_by_subj`` and ``batch``): no consumer state on the server, a reader needs only the
right to read the stream, and after a cut (NATS killed, link down, agent restarted) it asks
again from the sequence after the last chunk it wrote. Progress is kept beside the partial
file (``<part>.json``), so an agent crash resumes too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUCKET = "OUTPOST_ARTIFACTS"
STREAM = f"OBJ_{BUCKET}"
DIRECT_GET = f"$JS.API.DIRECT.GET.{STREAM}"
CHUNK_SIZE = 128 * 1024  # nats-py's default chunk; what a cut costs at most, again
BATCH = 8  # chunks asked for at once: about 1 MB in flight
REQUEST_TIMEOUT_S = 5.0
GIVE_UP_AFTER_S = 30.0  # without one chunk of progress; the caller retries later, resuming


class FetchError(Exception):
    """An object could not be had now (gone, unreachable, or not what its meta says)."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry  # False: asking again will not help (missing, corrupt)


def chunk_subject(nuid: str) -> str:
    return f"$O.{BUCKET}.C.{nuid}"


def meta_subject(name: str) -> str:
    return f"$O.{BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """An object's meta message: ``name``, ``nuid`` (its chunks' subject), ``size``,
    ``chunks``, ``sha256`` (hex, from the store's ``SHA-256=`` digest), ``deleted``."""

    name: str
    nuid: str
    size: int
    chunks: int
    sha256: str
    deleted: bool

    @classmethod
    def from_json(cls, raw: bytes) -> ObjectMeta:
        d = json.loads(raw)
        digest = str(d.get("digest") or "")
        prefix = "SHA-256="
        if not digest.upper().startswith(prefix):
            raise ValueError(f"object meta has no SHA-256 digest: {digest!r}")
        sha = base64.urlsafe_b64decode(digest[len(prefix):]).hex()
        size, chunks = d.get("size", 0), d.get("chunks", 0)
        if not isinstance(size, int) or not isinstance(chunks, int) or size < 0 or chunks < 0:
            raise ValueError("object meta: size and chunks must be non-negative integers")
        return cls(name=str(d["name"]), nuid=str(d.get("nuid") or ""), size=size,
                   chunks=chunks, sha256=sha, deleted=bool(d.get("deleted", False)))


async def ensure_bucket(js: Any, *, replicas: int = 1) -> None:
    """Create the artifact bucket if it is missing (the hub's set-up user; idempotent)."""
    from nats.js.api import ObjectStoreConfig
    from nats.js.errors import BucketNotFoundError

    try:
        await js.object_store(BUCKET)
    except BucketNotFoundError:
        await js.create_object_store(BUCKET, ObjectStoreConfig(
            description="Outpost artifacts, named by sha256", replicas=replicas))
        log.info("created object store %s", BUCKET, extra={"bucket": BUCKET})


async def put_file(js: Any, name: str, path: Path) -> ObjectMeta:
    """Store ``path`` under ``name``; an object already stored whole under it is kept (names
    are content digests: the same name is the same bytes)."""
    obs = await js.object_store(BUCKET)
    from nats.js.errors import NotFoundError

    try:
        have = await obs.get_info(name)
        if have.size == path.stat().st_size:
            return _meta(have)
    except NotFoundError:
        pass
    with path.open("rb") as fh:
        info = await obs.put(name, fh)
    return _meta(info)


def _meta(info: Any) -> ObjectMeta:
    return ObjectMeta.from_json(json.dumps(info.as_dict()).encode())


class ObjectWriter:
    """Writes one object as its bytes arrive: chunks are published while the upload is still
    coming (one pass, never whole in memory, no spool file), with ``window`` publish acks in
    flight instead of nats-py's one at a time; the meta message, published last by
    ``commit``, is what makes the object exist (as with nats-py's own put). ``chunks_subject``
    names what to purge if the upload is abandoned or turns out to be a duplicate."""

    def __init__(self, js: Any, nuid: str, *, window: int = 8) -> None:
        self.js = js
        self.nuid = nuid
        self.chunks_subject = chunk_subject(nuid)
        self.window = window
        self.size = 0
        self.chunks = 0
        self.digest = hashlib.sha256()
        self._buffer = bytearray()
        self._acks: list[asyncio.Future[Any]] = []

    async def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self._buffer += data
        while len(self._buffer) >= CHUNK_SIZE:
            chunk = bytes(self._buffer[:CHUNK_SIZE])
            del self._buffer[:CHUNK_SIZE]
            await self._publish(chunk)

    async def _publish(self, chunk: bytes) -> None:
        if len(self._acks) >= self.window:
            await self._acks.pop(0)
        self._acks.append(asyncio.ensure_future(self.js.publish(self.chunks_subject, chunk)))
        self.chunks += 1

    async def commit(self, name: str) -> ObjectMeta:
        """Publish what is left and the meta message under ``name``; returns the meta."""
        if self._buffer:
            await self._publish(bytes(self._buffer))
            self._buffer.clear()
        await asyncio.gather(*self._acks)
        self._acks.clear()
        info = {"name": name, "description": None, "headers": None,
                "options": {"max_chunk_size": CHUNK_SIZE}, "bucket": BUCKET, "nuid": self.nuid,
                "size": self.size, "chunks": self.chunks,
                "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "digest": "SHA-256=" + base64.urlsafe_b64encode(self.digest.digest()).decode()}
        raw = json.dumps(info).encode()
        await self.js.publish(meta_subject(name), raw, headers={"Nats-Rollup": "sub"})
        return ObjectMeta.from_json(raw)

    async def abandon(self) -> None:
        """Stop publishing; the caller purges ``chunks_subject`` (the hub's set-up user)."""
        for ack in self._acks:
            ack.cancel()
        await asyncio.gather(*self._acks, return_exceptions=True)
        self._acks.clear()


async def read_meta(nc: Any, name: str, wait_s: float = REQUEST_TIMEOUT_S) -> ObjectMeta | None:
    """The object's meta by direct get of its last meta message; None if there is none."""
    reply = await nc.request(f"{DIRECT_GET}.{meta_subject(name)}", b"", timeout=wait_s)
    status = (reply.headers or {}).get("Status")
    if status == "404":
        return None
    if status:
        raise FetchError(f"object store answered {status} for {name}", retry=True)
    meta = ObjectMeta.from_json(reply.data)
    return None if meta.deleted else meta


class RateLimit:
    """A token bucket over bytes (``kbps`` kilobytes per second; 0: no cap), so one fetch
    cannot take the whole link from events, heartbeats and commands."""

    def __init__(self, kbps: int) -> None:
        self.rate = kbps * 1024.0
        self.allowance = 0.0
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        # At most a quarter second of burst: a long pause does not buy a flood after it.
        self.allowance = min(self.rate / 4, self.allowance + (now - self.stamp) * self.rate)
        self.stamp = now
        self.allowance -= n
        if self.allowance < 0:
            await asyncio.sleep(-self.allowance / self.rate)


@dataclass(slots=True)
class _Resume:
    nuid: str
    next_seq: int
    offset: int

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"nuid": self.nuid, "next_seq": self.next_seq,
                                   "offset": self.offset}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> _Resume | None:
        try:
            d = json.loads(path.read_text())
            return cls(str(d["nuid"]), int(d["next_seq"]), int(d["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


Progress = Callable[[int, int], None]  # (bytes written, size)


class Fetcher:
    """Fetches objects into files, resuming after a cut; ``received`` counts every chunk byte
    that came over NATS (a resumed fetch shows what was asked for twice)."""

    def __init__(self, nc: Any, *, rate_kbps: int = 0, batch: int = BATCH,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 give_up_after_s: float = GIVE_UP_AFTER_S) -> None:
        self.nc = nc
        self.limit = RateLimit(rate_kbps)
        self.batch = max(1, batch if rate_kbps <= 0 else min(batch, 2))
        self.request_timeout_s = request_timeout_s
        self.give_up_after_s = give_up_after_s
        self.received = 0

    async def fetch(self, name: str, part: Path, progress: Progress | None = None) -> ObjectMeta:
        """Write object ``name`` into ``part``; returns its meta once the whole object is there
        and its sha256 matches the meta's. The caller checks that digest against what it
        trusts (the signed manifest) and moves the file into place."""
        meta: ObjectMeta | None = await self._retrying(lambda: read_meta(self.nc, name))
        if meta is None:
            raise FetchError(f"no object {name} in the artifact store", retry=False)
        state_path = part.with_name(part.name + ".json")
        state = _Resume.load(state_path)
        if state is None or state.nuid != meta.nuid or not part.exists() \
                or part.stat().st_size < state.offset:
            state = _Resume(meta.nuid, 1, 0)
        digest = hashlib.sha256()
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, state.offset)
            _hash_prefix(fd, state.offset, digest)
            os.lseek(fd, state.offset, os.SEEK_SET)
            stalled_since = time.monotonic()
            while state.offset < meta.size:
                try:
                    got = await self._batch(meta, state, fd, digest, state_path, progress)
                except FetchError:
                    raise
                except Exception as exc:  # a cut: timeout, connection closed, reconnecting
                    got = 0
                    if time.monotonic() - stalled_since > self.give_up_after_s:
                        raise FetchError(f"fetch of {name} stalled at {state.offset} of "
                                         f"{meta.size} bytes: {exc!r}", retry=True) from exc
                    log.info("fetch of %s cut at %d bytes (%r); resuming", name,
                             state.offset, exc, extra={"object": name})
                    await asyncio.sleep(0.2)
                if got:
                    stalled_since = time.monotonic()
        finally:
            os.close(fd)
        if state.offset != meta.size or digest.hexdigest() != meta.sha256:
            with contextlib.suppress(FileNotFoundError):
                state_path.unlink()
            part.unlink(missing_ok=True)
            raise FetchError(f"object {name}: the bytes fetched do not match its digest",
                             retry=False)
        with contextlib.suppress(FileNotFoundError):
            state_path.unlink()
        return meta

    async def _retrying(self, call: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.give_up_after_s
        while True:
            try:
                return await call()
            except FetchError:
                raise
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise FetchError(f"artifact store unreachable: {exc!r}", retry=True) from exc
                await asyncio.sleep(0.2)

    async def _batch(self, meta: ObjectMeta, state: _Resume, fd: int, digest: Any,
                     state_path: Path, progress: Progress | None) -> int:
        """Ask for the next ``batch`` chunks from ``state.next_seq``; write each as it comes."""
        subject = chunk_subject(meta.nuid)
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        got = 0
        try:
            request = {"seq": state.next_seq, "next_by_subj": subject, "batch": self.batch}
            await self.nc.publish(DIRECT_GET, json.dumps(request).encode(), reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=self.request_timeout_s)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "204":  # end of this batch
                    return got
                if status == "404":
                    raise FetchError(f"object {meta.name}: chunks missing after "
                                     f"{state.offset} of {meta.size} bytes", retry=False)
                if status:
                    raise RuntimeError(f"direct get answered {status}")
                if headers.get("Nats-Subject") != subject:
                    raise FetchError(f"object {meta.name}: a chunk from another subject",
                                     retry=False)
                data = msg.data
                self.received += len(data)
                if state.offset + len(data) > meta.size:
                    raise FetchError(f"object {meta.name}: more bytes than its size",
                                     retry=False)
                try:
                    os.write(fd, data)
                    digest.update(data)
                    state.offset += len(data)
                    state.next_seq = int(headers["Nats-Sequence"]) + 1
                    state.save(state_path)
                except OSError as exc:  # the disk, not the link: asking again will not help
                    raise FetchError(f"object {meta.name}: cannot write: {exc}",
                                     retry=False) from exc
                got += 1
                if progress is not None:
                    progress(state.offset, meta.size)
                await self.limit.take(len(data))
                if state.offset >= meta.size:
                    return got
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _hash_prefix(fd: int, length: int, digest: Any) -> None:
    """Feed the first ``length`` bytes already on disk (a resumed fetch) into ``digest``."""
    os.lseek(fd, 0, os.SEEK_SET)
    left = length
    while left > 0:
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            break
        digest.update(block)
        left -= len(block)
