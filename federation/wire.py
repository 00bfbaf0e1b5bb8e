"""The signed envelope every event and command travels in, and the only place msgpack is used.

An envelope is the msgpack map ``{v, kind, agent, seq, ts, body, sig}`` (DESIGN.md, "Wire
contract"). ``sig`` is Ed25519 over the msgpack map of the six other fields, encoded in exactly
that key order. Agents sign events with their enrolled key; the hub signs commands with its key
and puts the *target* agent's id in ``agent``, so a command cannot be replayed to another agent.

Verification works on the bytes received, never on a re-encoding: a signed envelope is the
signed six-key map with its fixmap header byte raised from 6 to 7 entries and
``"sig": <64-byte bin8>`` appended. So the signed bytes are ``0x86 + data[1:-70]``, checked
against the decoded structure, with no second msgpack pass over a large batch body and no
dependence on how a sender's encoder chose integer or string widths.

``open_envelope`` is the system edge for everything that arrives over NATS: whatever the bytes,
it returns a checked ``Envelope`` or raises ``EnvelopeRejected`` with a ``reason`` for metrics.

Ed25519 is PyNaCl (libsodium), imported on first use: on the 2-core build box it verified
~15k envelopes/s against ~6k/s for ``cryptography`` (the hub needs 7k/s), and its import costs
~2 MB RSS against ~8 MB, which matters on the edge. Signatures are identical (RFC 8032), so
keys and envelopes interoperate with ``cryptography`` (``identity.py`` makes the keys).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import msgpack
import orjson

from federation import subjects
from federation.errors import OutpostError

if TYPE_CHECKING:
    from nacl.signing import VerifyKey

VERSION = 1

EVENT_KINDS = frozenset({"task", "offer", "agent", "snapshot", "result"})
BATCH = "batch"
COMMAND_KINDS = frozenset({"launch", "kill", "drain", "update", "stage"})
KINDS = EVENT_KINDS | {BATCH} | COMMAND_KINDS
# What an agent may put on its events subject; the hub passes this as ``kinds``.
EVENT_ENVELOPE_KINDS = EVENT_KINDS | {BATCH}

FIELDS = ("v", "kind", "agent", "seq", "ts", "body", "sig")
BATCH_EVENT_FIELDS = frozenset({"seq", "kind", "ts", "body"})
SIG_LEN = 64
# fixstr "sig" then the bin8 header of a 64-byte value: the fixed tail before the signature.
_SIG_TAIL = b"\xa3sig\xc4\x40"
_TRAILER_LEN = len(_SIG_TAIL) + SIG_LEN

# ``retired_key``: signed by a key the agent has rotated away from, past the last seq it signed.
Reason = Literal["malformed", "version", "kind", "unknown_agent", "signature", "wrong_agent",
                 "retired_key"]
REASONS: frozenset[str] = frozenset(get_args(Reason))


class EnvelopeRejected(OutpostError):
    """An envelope that must not be applied. ``reason`` is one of ``REASONS`` (a metrics label);
    ``agent`` is the claimed agent id when the envelope got far enough to have one."""

    status = 400
    code = "envelope_rejected"

    def __init__(self, reason: Reason, message: str, *, agent: str | None = None) -> None:
        super().__init__(message, details={"reason": reason, "agent": agent})
        self.reason = reason
        self.agent = agent


@dataclass(frozen=True, slots=True)
class Event:
    """One event: ``seq`` (per-agent, gap-free order), ``kind`` (one of EVENT_KINDS), ``ts``
    (unix seconds at the agent), ``body`` (the kind's payload)."""

    seq: int
    kind: str
    ts: float
    body: Any


@dataclass(frozen=True, slots=True)
class Envelope:
    """A verified envelope: ``v`` (format version), ``kind``, ``agent`` (sender of an event,
    target of a command), ``seq`` (for a batch, its last event's), ``ts``, ``body`` (for a batch,
    ``{"first": N, "events": [{seq, kind, ts, body}, ...]}``), ``sig`` (64-byte Ed25519).

    A batch covers the seq range ``first..seq``: seqs in that range that it does not carry were
    coalesced away at the edge on purpose (superseded states), so the hub may skip them; a seq
    before ``first`` that the hub has not applied is a real gap and the batch must wait."""

    v: int
    kind: str
    agent: str
    seq: int
    ts: float
    body: Any
    sig: bytes

    def events(self) -> list[Event]:
        """The events this envelope carries, in seq order: one, or a whole batch."""
        if self.kind == BATCH:
            return [Event(e["seq"], e["kind"], float(e["ts"]), _json_body(e["body"]))
                    for e in self.body["events"]]
        return self.raw_events()

    def raw_events(self) -> list[Event]:
        """``events()`` without decoding: a batch event's body is its JSON text (``bytes``) as
        it came, for a reader that decodes only what it needs (or hands the text on as is);
        a single event's body is already decoded, as in ``events()``."""
        if self.kind == BATCH:
            return [Event(e["seq"], e["kind"], float(e["ts"]), e["body"])
                    for e in self.body["events"]]
        if self.kind in EVENT_KINDS:
            return [Event(self.seq, self.kind, self.ts, self.body)]
        raise ValueError(f"a {self.kind!r} envelope is a command, not events")

    @property
    def first(self) -> int:
        """The first seq this envelope covers (for a single event, its own)."""
        return int(self.body["first"]) if self.kind == BATCH else self.seq


# -- Ed25519 ---------------------------------------------------------------------------------


class Signer:
    """An Ed25519 signing key from its raw 32-byte seed; ``public`` is the raw 32-byte key."""

    __slots__ = ("_key", "public")

    def __init__(self, seed: bytes) -> None:
        from nacl.signing import SigningKey

        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._key = SigningKey(bytes(seed))
        self.public = bytes(self._key.verify_key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data).signature


def batch_msg_id(signer: Signer, agent: str, first: int, last: int) -> str:
    """The ``Nats-Msg-Id`` of an agent's batch ``first..last``: ``<agent>:<first>:<last>:<tag>``.

    JetStream dedupes by this id across the whole stream, not per subject, so an id another
    publisher can compute lets it poison the dedupe: agent A publishing on its own subject with
    B's next id made the stream drop B's batch as a duplicate while B took the ack as stored.
    The ``tag`` is 12 bytes of the agent's Ed25519 signature over the bounds: deterministic (a
    resent batch after a lost ack gets the same id, so the stream still drops the copy), yet
    nobody without the agent's key can make it, and nobody but the hub can read it off the
    stream (agents may not read the events stream). Per-subject expectations
    (``Nats-Expected-Last-Subject-Sequence``) would also defend, but serialise the pipelined
    publishes; a check of each duplicate ack against the stream would need the agents to read
    it. If an id does collide anyway, nothing is applied twice: the hub applies each agent's
    events once by seq."""
    tag = signer.sign(f"outpost-msg-id:{agent}:{first}:{last}".encode())[:12].hex()
    return f"{agent}:{first}:{last}:{tag}"


def verify(public: bytes, sig: bytes, data: bytes) -> bool:
    """True if ``sig`` is a valid Ed25519 signature of ``data`` by raw key ``public``."""
    from nacl.exceptions import BadSignatureError

    try:
        _verify_key(bytes(public)).verify(data, sig)
    except (BadSignatureError, ValueError, TypeError):  # also a wrong-length key or signature
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _verify_key(public: bytes) -> VerifyKey:
    # Parsing the key is ~30% of a verify; the hub sees the same few thousand keys all day.
    from nacl.signing import VerifyKey

    return VerifyKey(public)


# -- sign ------------------------------------------------------------------------------------


def sign_envelope(kind: str, agent: str, seq: int, body: Any, signer: Signer,
                  ts: float | None = None) -> bytes:
    """The msgpack bytes of a signed envelope. Raise ValueError on arguments we would reject."""
    if kind not in KINDS:
        raise ValueError(f"unknown envelope kind {kind!r}")
    if not subjects.is_agent_id(agent):
        raise ValueError(f"agent id {agent!r} is not subject-safe")
    if not _is_int(seq) or seq < 0:
        raise ValueError(f"seq must be a non-negative int, not {seq!r}")
    if kind == BATCH and (problem := _batch_problem(body, seq)):
        raise ValueError(problem)
    stamp = time.time() if ts is None else float(ts)
    signed: bytes = msgpack.packb({"v": VERSION, "kind": kind, "agent": agent, "seq": seq,
                                   "ts": stamp, "body": body})
    # == packb of the seven-key map: fixmap 7 header, the same six pairs, then "sig".
    return b"\x87" + signed[1:] + _SIG_TAIL + signer.sign(signed)


def sign_batch(agent: str, events: Sequence[Event], signer: Signer,
               ts: float | None = None, first: int | None = None) -> bytes:
    """One envelope, one signature, for several events of one agent (in seq order), covering
    seqs ``first`` (default: the first event's) to the last event's.

    Inside a batch each event's body travels as JSON text (msgpack bin): the edge keeps its
    events as JSON already, so it ships them without decoding, and the hub decodes each once.
    An event whose body is ``bytes`` is taken to be that JSON text as it is."""
    if not events:
        raise ValueError("a batch needs at least one event")
    body = {"first": events[0].seq if first is None else first,
            "events": [{"seq": e.seq, "kind": e.kind, "ts": float(e.ts),
                        "body": e.body if isinstance(e.body, bytes) else orjson.dumps(e.body)}
                       for e in events]}
    return sign_envelope(BATCH, agent, events[-1].seq, body, signer, ts)


# -- open ------------------------------------------------------------------------------------


def open_envelope(data: bytes, verify_key_for: Callable[[str], bytes | None],
                  expected_agent: str | None = None, *,
                  kinds: Collection[str] = KINDS) -> Envelope:
    """Decode and verify ``data``; raise EnvelopeRejected unless every check passes.

    ``verify_key_for(agent)`` returns the raw public key that must have signed for ``agent``
    (the agent's enrolled key at the hub; the hub's key at an edge, for its own id) or None.
    ``expected_agent`` is the id in the subject the message came on. ``kinds`` narrows what is
    accepted on this subject (the hub passes EVENT_ENVELOPE_KINDS, an edge COMMAND_KINDS).
    """
    try:
        d = msgpack.unpackb(data, ext_hook=_no_ext)
    except Exception as err:  # garbage in: msgpack raises ValueError subclasses, or TypeError
        raise EnvelopeRejected("malformed", f"not msgpack: {err}") from None
    if not isinstance(d, dict):
        raise EnvelopeRejected("malformed", f"not a map but {type(d).__name__}")
    v = d.get("v")
    if _is_int(v) and v != VERSION:
        raise EnvelopeRejected("version", f"unsupported envelope version {v}")
    if list(d) != list(FIELDS):
        raise EnvelopeRejected("malformed", f"keys {sorted(map(str, d))} are not {list(FIELDS)}")
    kind, agent, seq, ts, sig = d["kind"], d["agent"], d["seq"], d["ts"], d["sig"]
    if not (_is_int(v) and isinstance(kind, str) and isinstance(agent, str) and _is_int(seq)
            and seq >= 0 and _is_number(ts) and isinstance(sig, bytes) and len(sig) == SIG_LEN):
        raise EnvelopeRejected("malformed", "a field has the wrong type or range")
    if kind not in KINDS or kind not in kinds:
        raise EnvelopeRejected("kind", f"kind {kind!r} not accepted here", agent=agent)
    if expected_agent is not None and agent != expected_agent:
        raise EnvelopeRejected("wrong_agent", f"envelope from {agent!r} on the subject of "
                               f"{expected_agent!r}", agent=agent)
    if kind == BATCH and (problem := _batch_problem(d["body"], seq)):
        raise EnvelopeRejected("malformed", problem, agent=agent)
    # The structure is right; now the exact bytes must be the canonical frame around it.
    if data[0] != 0x87 or data[-_TRAILER_LEN:-SIG_LEN] != _SIG_TAIL:
        raise EnvelopeRejected("malformed", "non-canonical envelope framing", agent=agent)
    public = verify_key_for(agent)
    if public is None:
        raise EnvelopeRejected("unknown_agent", f"no key for agent {agent!r}", agent=agent)
    if not verify(public, sig, b"\x86" + bytes(data[1:-_TRAILER_LEN])):
        raise EnvelopeRejected("signature", f"bad signature from {agent!r}", agent=agent)
    return Envelope(cast(int, v), kind, agent, seq, float(ts), d["body"], sig)


# -- plain maps: enrollment and heartbeats ---------------------------------------------------


def pack(obj: Any) -> bytes:
    """msgpack of a plain map (enrollment requests and replies, heartbeats)."""
    return bytes(msgpack.packb(obj))


def unpack(data: bytes) -> Any:
    """Decode ``pack`` output; ValueError on anything else (extension types included)."""
    try:
        return msgpack.unpackb(data, ext_hook=_no_ext)
    except Exception as err:  # msgpack raises ValueError subclasses, or TypeError
        raise ValueError(f"not msgpack: {err}") from None


def enroll_request(signer: Signer, token: str, *, name: str, site: str,
                   labels: dict[str, str] | None = None,
                   resources: dict[str, Any] | None = None, version: str = "") -> bytes:
    """The enrollment request an edge sends: the map plus ``sig``, its signature by the key it
    enrolls (proof of possession; see ``enroll_proof_ok``)."""
    request: dict[str, Any] = {"token": token, "public_key": signer.public, "name": name,
                               "site": site, "labels": labels or {},
                               "resources": resources or {}, "version": version}
    request["sig"] = signer.sign(pack(request))
    return pack(request)


def enroll_proof_ok(request: dict[str, Any]) -> bool:
    """True if ``request['sig']`` signs the rest of the request with ``request['public_key']``."""
    signed = {key: value for key, value in request.items() if key != "sig"}
    return verify(request["public_key"], request["sig"], pack(signed))


# The fields of a key rotation request, in the order they are signed (both signatures are over
# the msgpack of these, so the old key vouches for the new one and the new key proves it is held).
ROTATE_FIELDS = ("op", "agent_id", "old_public_key", "new_public_key", "until")


def rotate_request(old: Signer, new: Signer, agent_id: str, until: int) -> bytes:
    """An agent's request (sent to ``subjects.ENROLL``) to replace its key ``old`` with ``new``:
    every event envelope it signed, or will sign, with ``old`` ends at or below seq ``until``;
    later ones carry ``new``'s signature. ``old_sig`` and ``new_sig`` sign the same bytes."""
    request: dict[str, Any] = {"op": "rotate", "agent_id": agent_id,
                               "old_public_key": old.public, "new_public_key": new.public,
                               "until": until}
    signed = pack(request)
    request["old_sig"] = old.sign(signed)
    request["new_sig"] = new.sign(signed)
    return pack(request)


def rotate_proof_ok(request: dict[str, Any]) -> bool:
    """True if both keys of a rotation request signed its fields (see ``rotate_request``)."""
    signed = pack({key: request[key] for key in ROTATE_FIELDS})
    return (verify(request["old_public_key"], request["old_sig"], signed)
            and verify(request["new_public_key"], request["new_sig"], signed))


# The fields of a renewal request (a fresh NATS user JWT for the agent's current key), in the
# order they are signed by that key.
RENEW_FIELDS = ("op", "agent_id", "public_key")


def renew_request(signer: Signer, agent_id: str) -> bytes:
    """An agent's request (sent to ``subjects.ENROLL``) for a new user JWT for its current key
    ``signer``: the one it has expires. ``sig`` proves the key is held. A replayed request
    gets nobody anything: the JWT is no bearer token, the server wants the key's signature."""
    request: dict[str, Any] = {"op": "renew", "agent_id": agent_id, "public_key": signer.public}
    request["sig"] = signer.sign(pack(request))
    return pack(request)


def renew_proof_ok(request: dict[str, Any]) -> bool:
    """True if ``request['sig']`` signs the renewal's fields with ``request['public_key']``."""
    signed = pack({key: request[key] for key in RENEW_FIELDS})
    return verify(request["public_key"], request["sig"], signed)


def _batch_problem(body: Any, seq: int) -> str | None:
    """Why ``body`` is not a valid batch ending at ``seq``, or None if it is."""
    if not isinstance(body, dict) or body.keys() != {"first", "events"}:
        return "a batch body is a map of first and events"
    first, events = body["first"], body["events"]
    if not isinstance(events, list) or not events:
        return "a batch's events are a non-empty list"
    if not _is_int(first) or first < 0:
        return "a batch's first is a non-negative int"
    last = first - 1
    # The hub runs this for every event it receives: the checks of _is_int and _is_number,
    # inlined, and the names bound locally.
    fields, kinds, isfinite = BATCH_EVENT_FIELDS, EVENT_KINDS, math.isfinite
    for event in events:
        if not isinstance(event, dict) or event.keys() != fields:
            return f"a batch event has keys {sorted(BATCH_EVENT_FIELDS)}"
        kind, event_seq, ts = event["kind"], event["seq"], event["ts"]
        if not isinstance(kind, str) or kind not in kinds:
            return f"a batch holds events, not {kind!r}"
        if (type(event_seq) is not int or event_seq <= last
                or not ((type(ts) is float and isfinite(ts)) or type(ts) is int)):
            return "batch events need increasing int seqs and numeric ts"
        if not isinstance(event["body"], bytes):
            return "a batch event's body is JSON text (bin)"
        last = event_seq
    if last != seq:
        return f"a batch's seq ({seq}) must be its last event's ({last})"
    return None


def _json_body(raw: bytes) -> Any:
    """A batch event's body; None (which no kind accepts) when it is not valid JSON, so a bad
    event is skipped as malformed by its reader instead of failing the whole envelope."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool


def _is_number(x: Any) -> bool:
    return (type(x) is float and math.isfinite(x)) or type(x) is int


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the wire format")
