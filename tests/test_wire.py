"""Signed envelopes: what is accepted, and that everything else is rejected with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation import wire
from federation.identity import id_from_public_key, load_or_create_key
from federation.wire import Envelope, EnvelopeRejected, Event, Signer, open_envelope

AGENT_SIGNER = Signer(bytes(range(32)))
AGENT = id_from_public_key(AGENT_SIGNER.public)
OTHER_SIGNER = Signer(bytes(range(1, 33)))
KEYS = {AGENT: AGENT_SIGNER.public, id_from_public_key(OTHER_SIGNER.public): OTHER_SIGNER.public}
TASK = {"id": "t1", "state": "running", "generation": 3, "exit_code": None, "env": {"A": "1"}}


def signed(kind: str = "task", body: Any = TASK, seq: int = 7, agent: str = AGENT,
           signer: Signer = AGENT_SIGNER) -> bytes:
    return wire.sign_envelope(kind, agent, seq, body, signer, ts=1700000000.5)


def reject(data: bytes, reason: str, expected_agent: str | None = AGENT, **kw: Any) -> None:
    with pytest.raises(EnvelopeRejected) as info:
        open_envelope(data, KEYS.get, expected_agent, **kw)
    assert info.value.reason == reason, info.value.message


def fields(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data)


def repack(d: dict[str, Any]) -> bytes:
    return msgpack.packb(d)


def test_round_trip() -> None:
    data = signed()
    env = open_envelope(data, KEYS.get, AGENT)
    assert env == Envelope(1, "task", AGENT, 7, 1700000000.5, TASK, env.sig)
    assert len(env.sig) == 64
    assert env.events() == [Event(7, "task", 1700000000.5, TASK)]
    # The wire form is exactly msgpack's encoding of the map in contract key order.
    assert data == repack(fields(data)) and list(fields(data)) == list(wire.FIELDS)


def test_batch_round_trip() -> None:
    events = [Event(s, "task" if s % 2 else "offer", 1700000000.0 + s, {"n": s})
              for s in range(10, 15)]
    env = open_envelope(wire.sign_batch(AGENT, events, AGENT_SIGNER), KEYS.get, AGENT)
    assert env.kind == "batch" and env.seq == 14 and env.first == 10
    assert env.events() == events
    wider = open_envelope(wire.sign_batch(AGENT, events[2:], AGENT_SIGNER, first=5), KEYS.get,
                          AGENT)
    assert wider.first == 5 and wider.events() == events[2:]
    # Bodies travel as JSON text; one that is not JSON reads as None, skipped by its reader.
    raw = [Event(20, "task", 1.0, b'{"a": 1}'), Event(21, "task", 1.0, b"{not json")]
    got = open_envelope(wire.sign_batch(AGENT, raw, AGENT_SIGNER), KEYS.get, AGENT).events()
    assert [e.body for e in got] == [{"a": 1}, None]


def test_command_is_bound_to_its_target_agent() -> None:
    hub = OTHER_SIGNER
    data = signed("launch", {"command_id": "c1", "expires": 1.0}, seq=1, signer=hub)
    env = open_envelope(data, lambda a: hub.public if a == AGENT else None, AGENT,
                        kinds=wire.COMMAND_KINDS)
    assert env.kind == "launch"
    with pytest.raises(ValueError):
        env.events()
    # The same command replayed on another agent's subject is refused.
    with pytest.raises(EnvelopeRejected) as info:
        open_envelope(data, lambda a: hub.public, "a" + "z" * 25, kinds=wire.COMMAND_KINDS)
    assert info.value.reason == "wrong_agent"


def test_kinds_limits_what_a_subject_accepts() -> None:
    reject(signed("launch", {}), "kind", kinds=wire.EVENT_ENVELOPE_KINDS)
    reject(signed("task"), "kind", kinds=wire.COMMAND_KINDS)


def test_tampered_body_is_rejected() -> None:
    d = fields(signed())
    d["body"] = {**TASK, "state": "killed"}
    reject(repack(d), "signature")
    data = bytearray(signed())
    data[data.index(b"running")] ^= 0x20  # "Running": same length, same framing
    reject(bytes(data), "signature")


def test_tampered_header_fields_are_rejected() -> None:
    for key, value in (("seq", 8), ("ts", 1.0)):
        d = fields(signed())
        d[key] = value
        reject(repack(d), "signature")


def test_wrong_key_unknown_agent_wrong_agent() -> None:
    reject(signed(signer=OTHER_SIGNER), "signature")
    stranger = "a" + "q" * 25
    reject(signed(agent=stranger), "unknown_agent", expected_agent=stranger)
    reject(signed(), "wrong_agent", expected_agent=id_from_public_key(OTHER_SIGNER.public))


def test_malformed_shapes() -> None:
    good = fields(signed())
    extra = {**good, "x": 1}
    missing = {k: v for k, v in good.items() if k != "ts"}
    reordered = {"sig": good["sig"], **{k: v for k, v in good.items() if k != "sig"}}
    bad_seq = {**good, "seq": -1}
    bool_v = {**good, "v": True}
    short_sig = {**good, "sig": good["sig"][:63]}
    str_sig = {**good, "sig": "x" * 64}
    for d in (extra, missing, reordered, bad_seq, bool_v, short_sig, str_sig):
        reject(repack(d), "malformed")
    ext_body = repack({**good, "body": msgpack.ExtType(5, b"")})
    for data in (b"", b"\xc1", b"garbage that is not msgpack", repack([1, 2]), repack("x"),
                 signed() + b"\x00", signed()[:-1], ext_body):
        reject(data, "malformed")


def test_non_canonical_framing_is_rejected() -> None:
    data = signed()
    # Same map, but a map16 header: decodes identically, is not the signed frame.
    reject(b"\xde\x00\x07" + data[1:], "malformed")
    # Same map, but the signature as bin16.
    reject(data[:-66] + b"\xc5\x00\x40" + data[-64:], "malformed")


def test_unknown_version_and_kind() -> None:
    reject(repack({**fields(signed()), "v": 2}), "version")
    reject(repack({"v": 2, "anything": "goes"}), "version")
    reject(repack({**fields(signed()), "kind": "bogus"}), "kind")
    with pytest.raises(ValueError):
        signed("bogus")


def _b(events: Any, first: Any = 1) -> dict[str, Any]:
    return {"first": first, "events": events}


@pytest.mark.parametrize("body, seq", [
    (_b([]), 1),
    (_b([{"seq": 1, "kind": "task", "ts": 1.0, "body": b"{}"}]), 2),  # seq is not the last event's
    (_b([{"seq": 2, "kind": "task", "ts": 1.0, "body": b"{}"},
         {"seq": 1, "kind": "task", "ts": 1.0, "body": b"{}"}]), 1),  # out of order
    (_b([{"seq": 1, "kind": "launch", "ts": 1.0, "body": b"{}"}]), 1),  # a command inside
    (_b([{"seq": 1, "kind": "batch", "ts": 1.0, "body": []}]), 1),  # nested batch
    (_b([{"seq": 1, "kind": "task", "ts": 1.0}]), 1),  # missing body
    (_b([{"seq": 1, "kind": ["task"], "ts": 1.0, "body": b"{}"}]), 1),
    (_b([{"seq": 3, "kind": "task", "ts": 1.0, "body": b"{}"}], first=4), 3),  # first after event
    (_b([{"seq": 1, "kind": "task", "ts": 1.0, "body": b"{}"}], first=-1), 1),
    ([{"seq": 1, "kind": "task", "ts": 1.0, "body": b"{}"}], 1),  # the old bare-list form
    (_b([{"seq": 1, "kind": "task", "ts": 1.0, "body": {}}]), 1),  # body not JSON text
    ("not a list", 1),
])
def test_malformed_batches(body: Any, seq: int) -> None:
    with pytest.raises(ValueError):
        signed("batch", body, seq)
    # Signed anyway by a buggy or hostile agent: refused at the hub.
    d = fields(signed("task", None, seq))
    reject(repack({**d, "kind": "batch", "body": body}), "malformed")


def test_sign_rejects_bad_arguments() -> None:
    for agent, seq in (("A.B", 1), ("", 1), (AGENT, -1), (AGENT, True)):
        with pytest.raises(ValueError):
            signed(agent=agent, seq=seq)
    with pytest.raises(ValueError):
        wire.sign_batch(AGENT, [], AGENT_SIGNER)
    with pytest.raises(ValueError):
        Signer(b"short")


def test_keys_from_identity_interoperate(tmp_path: Path) -> None:
    """identity.py makes keys with PyNaCl; ``cryptography`` signs the same bytes identically."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed, public = load_or_create_key(tmp_path / "agent.key")
    signer = Signer(seed)
    assert signer.public == public
    message = b"outpost"
    assert signer.sign(message) == Ed25519PrivateKey.from_private_bytes(seed).sign(message)
    agent = id_from_public_key(public)
    env = open_envelope(wire.sign_envelope("agent", agent, 1, {}, signer), {agent: public}.get,
                        agent)
    assert env.agent == agent


def test_verify() -> None:
    sig = AGENT_SIGNER.sign(b"data")
    assert wire.verify(AGENT_SIGNER.public, sig, b"data")
    assert not wire.verify(AGENT_SIGNER.public, sig, b"Data")
    assert not wire.verify(OTHER_SIGNER.public, sig, b"data")
    assert not wire.verify(AGENT_SIGNER.public[:31], sig, b"data")
    assert not wire.verify(AGENT_SIGNER.public, sig[:63], b"data")


def test_rejection_is_an_outpost_error() -> None:
    with pytest.raises(EnvelopeRejected) as info:
        open_envelope(b"\xc1", KEYS.get)
    assert info.value.body()["error"]["details"]["reason"] == "malformed"
    assert info.value.reason in wire.REASONS


# -- properties ------------------------------------------------------------------------------

PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=80))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)
agents = st.sampled_from([*KEYS, "a" + "q" * 25]) | st.text(max_size=30)
# Maps shaped like envelopes, so the checks past the first ones are reached too.
envelope_like = st.fixed_dictionaries({
    "v": st.sampled_from([1, 1, 2, True, "1"]),
    "kind": st.sampled_from(sorted(wire.KINDS)) | st.text(max_size=8),
    "agent": agents,
    "seq": st.integers(-5, 2**64 - 1) | values,
    "ts": st.floats() | st.integers(-(2**63), 2**63) | values,
    "body": values,
    "sig": st.binary(min_size=64, max_size=64) | st.binary(max_size=70) | values,
})


def assert_only_rejected(data: bytes, expected_agent: str | None) -> None:
    try:
        open_envelope(data, KEYS.get, expected_agent)
    except EnvelopeRejected as err:
        assert err.reason in wire.REASONS
    else:
        raise AssertionError(f"accepted {data!r}")


@PROPERTY
@given(st.binary(max_size=300), st.sampled_from([None, AGENT]))
def test_arbitrary_bytes_are_only_ever_rejected(data: bytes, expected: str | None) -> None:
    assert_only_rejected(data, expected)


@PROPERTY
@given(st.dictionaries(st.sampled_from(wire.FIELDS) | st.text(max_size=5), values, max_size=9)
       | envelope_like, st.sampled_from([None, AGENT]))
def test_arbitrary_maps_are_only_ever_rejected(d: dict[str, Any], expected: str | None) -> None:
    assert_only_rejected(msgpack.packb(d), expected)


@PROPERTY
@given(st.data())
def test_any_single_byte_change_is_rejected(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["task", "batch", "kill"]))
    body = (_b([{"seq": 1, "kind": "task", "ts": 1.0, "body": data.draw(st.binary())}])
            if kind == "batch" else data.draw(values))
    original = bytearray(signed(kind, body, seq=1))
    index = data.draw(st.integers(0, len(original) - 1))
    original[index] ^= data.draw(st.integers(1, 255))
    assert_only_rejected(bytes(original), AGENT)
