"""Once per site: an artifact crosses a site's uplink once, then the site's agents share it.

The agents of a site talk to each other through the site's leaf node on
``outpost.v1.site.<site>.>`` (``federation.subjects.site_peers``), which the leaf never carries
to the hub (``deny_imports``/``deny_exports`` in ``nats-leaf.conf``): what moves there costs no
uplink byte. An agent that needs an artifact it does not hold (it has the hub's signed manifest,
a few hundred bytes over the uplink) first asks its peers:

    who.<sha256>     "who has it?" Answered by each peer that holds it (``has``), is fetching
                     it (``fetching``, with how many bytes it has so far) or is asking too
                     (``wanting``). Answers come for ``ASK_WINDOW_S``.
    get.<agent>      "bytes ``offset`` to ``offset + length`` of <sha256>", to one peer: the
                     bytes it has there (from its cache, or from the file it is still writing),
                     none yet, or "gone".

A peer that holds it, or fetches it over the uplink, is followed: its bytes are pulled as they
arrive, so five agents that start together get the artifact at about the speed of one uplink
fetch. A peer that is itself pulling from another (``pulling``) is not followed, so followers
never form a ring that waits on itself when the one they follow dies. When nobody has it, of
the agents asking at once the one with the lowest id goes up alone and the others follow it.
Asking is symmetric (a peer that asks while another asks answers ``wanting``), so two agents
that start together both see each other.

Peers are not trusted: what a peer sends is hashed as it is written and must be the signed
manifest's sha256 and size; a peer that sends bad bytes, nothing for ``STALL_S``, or keeps
the lowest id without ever fetching (``GO_UP_AFTER_S``) is left for the uplink. Answers go only
to reply subjects in the site's own ``to.<agent>.<ref>`` space, never wherever a peer asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation import subjects

log = logging.getLogger(__name__)

ASK_WINDOW_S = 0.3  # how long answers to "who has it?" are collected
PIECE = 256 * 1024  # bytes per get: well under NATS's default 1 MB max_payload
GET_TIMEOUT_S = 2.0
STALL_S = 6.0  # a followed peer with no new byte for this long is given up on
WAIT_POLL_S = 0.2  # how often to ask again while the peer has no new bytes yet
GO_UP_AFTER_S = 15.0  # the longest an agent defers to a peer that does not fetch
_SHA = re.compile(r"[0-9a-f]{64}")
HAS, FETCHING, PULLING, WANTING = "has", "fetching", "pulling", "wanting"
STATES = (HAS, FETCHING, PULLING, WANTING)

Progress = Callable[[int, int], None]


class PeerMessageInvalid(ValueError):
    """A site peer's message that is not what the protocol says (dropped and counted)."""


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    """One peer's answer to "who has <sha>?"."""

    agent: str
    state: str  # HAS | FETCHING (over the uplink) | PULLING (from a peer) | WANTING
    have: int  # bytes it holds so far
    size: int

    def encode(self) -> bytes:
        return json.dumps({"agent": self.agent, "state": self.state, "have": self.have,
                           "size": self.size}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PeerAnswer:
        d = _object(raw, {"agent", "state", "have", "size"})
        if not subjects.is_agent_id(d["agent"]) or d["state"] not in STATES:
            raise PeerMessageInvalid("answer: bad agent or state")
        if not all(_count(d[k]) for k in ("have", "size")) or d["have"] > d["size"]:
            raise PeerMessageInvalid("answer: have and size must be counts, have <= size")
        return cls(d["agent"], d["state"], d["have"], d["size"])


@dataclass(frozen=True, slots=True)
class PieceRequest:
    """"Bytes ``offset`` to ``offset + length`` of ``sha``", to one peer."""

    agent: str  # who asks
    sha: str
    offset: int
    length: int

    def encode(self) -> bytes:
        return json.dumps({"agent": self.agent, "sha": self.sha, "offset": self.offset,
                           "length": self.length}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PieceRequest:
        d = _object(raw, {"agent", "sha", "offset", "length"})
        if not subjects.is_agent_id(d["agent"]) or not isinstance(d["sha"], str) \
                or not _SHA.fullmatch(d["sha"]):
            raise PeerMessageInvalid("get: bad agent or sha")
        if not _count(d["offset"]) or not _count(d["length"]) or not 0 < d["length"] <= PIECE:
            raise PeerMessageInvalid(f"get: offset must be a count, length 1 to {PIECE}")
        return cls(d["agent"], d["sha"], d["offset"], d["length"])


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 53


def _object(raw: bytes, keys: set[str]) -> dict[str, Any]:
    if len(raw) > 1024:
        raise PeerMessageInvalid("message too long")
    try:
        d = json.loads(raw)
    except ValueError as exc:
        raise PeerMessageInvalid(f"not JSON: {exc}") from None
    if not isinstance(d, dict) or set(d) != keys:
        raise PeerMessageInvalid(f"expected exactly the keys {sorted(keys)}")
    return d


class SitePeers:
    """This agent's side of the site's artifact sharing: it answers peers and asks them.

    ``progress`` is the stager's map of fetches under way (sha -> bytes written, size): what a
    fetch in progress can already give. ``blob`` says where a held artifact's file is."""

    def __init__(self, agent_id: str, site: str, *, blob: Callable[[str], Path],
                 progress: dict[str, tuple[int, int]]) -> None:
        self.agent_id = subjects.validate_agent_id(agent_id)
        self.prefix = subjects.site_peers(site)
        self.blob = blob
        self.progress = progress
        self.nc: Any = None
        self.writing: dict[str, Path] = {}  # sha -> the file its fetch writes (uplink or peer)
        self.going_up: set[str] = set()  # fetches over the uplink (the rest pull from peers)
        self.wanting: set[str] = set()
        self._rivals: dict[str, set[str]] = {}  # sha -> peers seen asking while we ask
        self._replies: dict[str, asyncio.Queue[Any]] = {}
        self._subs: list[Any] = []
        self._reply_to = re.compile(
            re.escape(self.prefix) + r"\.to\.[a-z0-9]{1,64}\.[A-Za-z0-9]{1,32}")
        self.stats = {"served_bytes": 0, "received_bytes": 0, "from_peers": 0, "went_up": 0,
                      "dropped": 0, "bad_peers": 0}

    # ---------------------------------------------------------------- the link

    async def start(self, nc: Any) -> None:
        """Answer and ask on ``nc`` (the link's connection, each time it is made)."""
        await self.stop()
        self.nc = nc
        self._subs = [await nc.subscribe(f"{self.prefix}.who.*", cb=self._on_who),
                      await nc.subscribe(f"{self.prefix}.get.{self.agent_id}", cb=self._on_get),
                      await nc.subscribe(f"{self.prefix}.to.{self.agent_id}.*",
                                         cb=self._on_reply)]

    async def stop(self) -> None:
        subs, self._subs, self.nc = self._subs, [], None
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # ---------------------------------------------------------------- answering

    def _answerable(self, msg: Any) -> bool:
        if msg.reply and self._reply_to.fullmatch(msg.reply) \
                and not msg.reply.startswith(f"{self.prefix}.to.{self.agent_id}."):
            return True
        self._drop(f"reply subject {msg.reply!r} is not a site peer's")
        return False

    def _drop(self, why: str) -> None:
        self.stats["dropped"] += 1
        log.info("site peers: dropped a message: %s", why)

    async def _on_who(self, msg: Any) -> None:
        sha = msg.subject.rsplit(".", 1)[-1]
        try:
            asker = json.loads(msg.data).get("agent") if len(msg.data) < 256 else None
        except (ValueError, AttributeError):
            asker = None
        if not _SHA.fullmatch(sha) or not subjects.is_agent_id(asker):
            self._drop("who: bad sha or agent")
            return
        if asker == self.agent_id or not self._answerable(msg):
            return
        answer = self._state(sha)
        if sha in self.wanting:
            self._rivals.setdefault(sha, set()).add(asker)
        if answer is not None:
            await self._send(msg.reply, answer.encode())

    def _state(self, sha: str) -> PeerAnswer | None:
        blob = self.blob(sha)
        with contextlib.suppress(OSError):
            if blob.exists():
                size = blob.stat().st_size
                return PeerAnswer(self.agent_id, HAS, size, size)
        if sha in self.writing and sha in self.progress:
            have, size = self.progress[sha]
            state = FETCHING if sha in self.going_up else PULLING
            return PeerAnswer(self.agent_id, state, min(have, size), size)
        if sha in self.wanting:
            return PeerAnswer(self.agent_id, WANTING, 0, 0)
        return None

    async def _on_get(self, msg: Any) -> None:
        try:
            ask = PieceRequest.decode(msg.data)
        except PeerMessageInvalid as exc:
            self._drop(str(exc))
            return
        if not self._answerable(msg):
            return
        data, have, gone = b"", 0, False
        blob = self.blob(ask.sha)
        try:
            data, have = _read(blob, ask.offset, ask.length, None)
        except OSError:
            part = self.writing.get(ask.sha)
            if part is None or ask.sha not in self.progress:
                gone = True
            else:
                with contextlib.suppress(OSError):
                    data, have = _read(part, ask.offset, ask.length, self.progress[ask.sha][0])
        self.stats["served_bytes"] += len(data)
        await self._send(msg.reply, data, {"Outpost-Have": str(have),
                                           **({"Outpost-Gone": "1"} if gone else {})})

    async def _send(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        nc = self.nc
        if nc is None:
            return
        with contextlib.suppress(Exception):  # the link went; the asker asks again
            await nc.publish(subject, data, headers=headers)

    async def _on_reply(self, msg: Any) -> None:
        queue = self._replies.get(msg.subject.rsplit(".", 1)[-1])
        if queue is not None:
            queue.put_nowait(msg)

    # ---------------------------------------------------------------- asking

    async def fetch(self, sha: str, size: int, part: Path, progress: Progress) -> bool:
        """Get ``sha`` (``size`` bytes) from the site's peers into ``part``: True once it is
        all there and hashes to ``sha``. False: this agent is to fetch it over the uplink
        itself (nobody at the site has it, or those who said so did not deliver); from then on
        peers are told it is ``fetching`` it, until ``done``."""
        if self.nc is None:
            return False
        given_up: set[str] = set()
        go_up_at = time.monotonic() + GO_UP_AFTER_S
        self.wanting.add(sha)
        try:
            while self.nc is not None:
                answers, rivals = await self._ask(sha)
                sources = [a for a in answers if a.state in (HAS, FETCHING)
                           and a.agent not in given_up and a.size == size]
                if sources:
                    best = max(sources, key=lambda a: (a.state == HAS, a.have))
                    self.wanting.discard(sha)
                    if await self._pull(best.agent, sha, size, part, progress):
                        self.stats["from_peers"] += 1
                        return True
                    given_up.add(best.agent)
                    self.stats["bad_peers"] += 1
                    self.wanting.add(sha)
                    continue
                ahead = {a.agent for a in answers if a.state == WANTING} | rivals
                ahead = {a for a in ahead - given_up if a < self.agent_id}
                if not ahead or time.monotonic() > go_up_at:
                    break
                await asyncio.sleep(WAIT_POLL_S)  # the lowest id is going up: follow it
        finally:
            self.wanting.discard(sha)
        self.stats["went_up"] += 1
        self.writing[sha] = part
        self.going_up.add(sha)
        return False

    def done(self, sha: str) -> None:
        """The uplink fetch ``fetch`` sent this agent on has ended (either way)."""
        self.writing.pop(sha, None)
        self.going_up.discard(sha)

    async def _ask(self, sha: str) -> tuple[list[PeerAnswer], set[str]]:
        ref, queue = secrets.token_hex(8), asyncio.Queue[Any]()
        self._replies[ref] = queue
        self._rivals[sha] = set()
        try:
            await self.nc.publish(f"{self.prefix}.who.{sha}",
                                  json.dumps({"agent": self.agent_id}).encode(),
                                  reply=f"{self.prefix}.to.{self.agent_id}.{ref}")
            await asyncio.sleep(ASK_WINDOW_S)
        except Exception as exc:  # no link: nobody to ask
            log.info("site peers: cannot ask (%r)", exc)
        finally:
            del self._replies[ref]
        answers: dict[str, PeerAnswer] = {}
        while not queue.empty():
            try:
                answer = PeerAnswer.decode(queue.get_nowait().data)
            except PeerMessageInvalid as exc:
                self._drop(str(exc))
                continue
            if answer.agent != self.agent_id:
                answers[answer.agent] = answer
        return list(answers.values()), self._rivals.pop(sha, set())

    async def _pull(self, peer: str, sha: str, size: int, part: Path,
                    progress: Progress) -> bool:
        """Follow ``peer``'s copy of ``sha`` into ``part``, hashing as it comes."""
        digest, offset = hashlib.sha256(), 0
        self.writing[sha] = part
        progress(0, size)
        last_new = time.monotonic()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        ok = False
        try:
            while offset < size:
                if time.monotonic() - last_new > STALL_S or self.nc is None:
                    log.warning("site peers: %s sent nothing new of sha256:%s for %.0f s",
                                peer, sha, STALL_S, extra={"peer": peer, "digest": sha})
                    return False
                try:
                    msg = await self._request(
                        f"{self.prefix}.get.{peer}",
                        PieceRequest(self.agent_id, sha, offset, min(PIECE, size - offset)))
                except TimeoutError:
                    continue
                headers = msg.headers or {}
                if headers.get("Outpost-Gone"):
                    return False
                data = msg.data
                if not data:
                    await asyncio.sleep(WAIT_POLL_S)
                    continue
                if offset + len(data) > size:
                    return False
                os.write(fd, data)
                digest.update(data)
                offset += len(data)
                self.stats["received_bytes"] += len(data)
                progress(offset, size)
                last_new = time.monotonic()
            ok = digest.hexdigest() == sha
            if not ok:
                log.warning("site peers: %s sent bytes that are not sha256:%s; fetching it "
                            "over the uplink instead", peer, sha,
                            extra={"peer": peer, "digest": sha})
            return ok
        finally:
            os.close(fd)
            self.writing.pop(sha, None)
            if not ok:
                part.unlink(missing_ok=True)

    async def _request(self, subject: str, ask: PieceRequest) -> Any:
        nc = self.nc
        if nc is None:
            raise TimeoutError
        ref, queue = secrets.token_hex(8), asyncio.Queue[Any]()
        self._replies[ref] = queue
        try:
            await nc.publish(subject, ask.encode(),
                             reply=f"{self.prefix}.to.{self.agent_id}.{ref}")
            return await asyncio.wait_for(queue.get(), GET_TIMEOUT_S)
        finally:
            del self._replies[ref]


def _read(path: Path, offset: int, length: int, limit: int | None) -> tuple[bytes, int]:
    """Up to ``length`` bytes of ``path`` at ``offset`` (below ``limit`` when the file is still
    being written), and how many bytes the file holds that may be read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        have = os.fstat(fd).st_size if limit is None else limit
        return os.pread(fd, max(0, min(length, have - offset)), offset), have
    finally:
        os.close(fd)
