"""Agent key rotation at the hub: an agent changes its key and keeps its id, tasks and history.

The agent id is the fingerprint of the agent's *first* key (``identity.id_from_public_key``)
and stays its id for good. To rotate, the agent sends ``wire.rotate_request`` on the
enrollment subject: its id, the current (old) key, the new key and ``until``, the last event
seq it signs with the old key, signed by both keys (the old key vouches for the new one, the
new one proves it is held). The hub checks that the old key is the agent's current key, that
the agent is not revoked and that the new key belongs to nobody, records the new key (store,
then the registry bucket through the enrollment hook) and answers like an enrollment. The
agent swaps keys only after that answer; if the answer is lost it sends the same request
again, and a request for the rotation already recorded is answered ok (idempotent).

Ordering: the old key stays valid for envelopes that end at or below ``until`` (events already
in JetStream, or still in the agent's outbox, from before the rotation: a hub rebuilding its
view from the stream needs them too), and for nothing later: an envelope with the old key's
signature that ends above ``until`` is rejected as ``retired_key``. ``open_agent_envelope`` is
that rule, shared by ingest and the SSE feed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from core_hub.store import AgentKey, HubStore
from federation import subjects, wire
from federation.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized

log = logging.getLogger(__name__)

OP = "rotate"
_FIELDS = frozenset({*wire.ROTATE_FIELDS, "old_sig", "new_sig"})


def is_rotation(request: Any) -> bool:
    """True for a decoded message on the enrollment subject that asks for a key rotation."""
    return isinstance(request, dict) and request.get("op") == OP


class KeyRotations:
    """Checks and records key rotation requests in ``store`` (``clock``: unix seconds)."""

    def __init__(self, store: HubStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def rotate(self, request: dict[str, Any]) -> str:
        """Record the rotation ``request`` asks for; returns the agent id. Raise Invalid,
        Unauthorized, NotFound, Forbidden or Conflict with the reason."""
        _check(request)
        agent_id, old, new = (request["agent_id"], request["old_public_key"],
                              request["new_public_key"])
        until = request["until"]
        known = self._store.agent_key(agent_id)
        if known is None:
            raise NotFound(f"agent {agent_id} is not enrolled", details={"agent_id": agent_id})
        if known.revoked:
            raise Forbidden(f"agent {agent_id} is revoked", details={"agent_id": agent_id})
        if known.public_key == new and (old, until) in known.retired:
            return agent_id  # this rotation again (the agent did not get the answer)
        if known.public_key != old:
            raise Forbidden(f"old_public_key is not agent {agent_id}'s current key",
                            details={"agent_id": agent_id})
        if self._store.agent_with_key(new) is not None:
            raise Conflict("new_public_key already belongs to an agent",
                           details={"agent_id": agent_id})
        # The old key signed every event the hub has applied, and none of an earlier key's.
        floor = max(known.applied_seq, known.retired[-1][1] if known.retired else 0)
        if until < floor:
            raise Invalid(f"until ({until}) is below seq {floor}, which the current key "
                          "already signed", details={"agent_id": agent_id, "floor": floor})
        self._store.rotate_agent_key(agent_id, old, new, until, self._clock())
        log.warning("agent %s rotated its key; the old one signs nothing after seq %d",
                    agent_id, until, extra={"agent_id": agent_id, "until": until})
        return agent_id


def _check(request: dict[str, Any]) -> None:
    if set(request) != _FIELDS:
        raise Invalid(f"key rotation request fields must be {sorted(_FIELDS)}")
    agent_id, until = request["agent_id"], request["until"]
    if not subjects.is_agent_id(agent_id):
        raise Invalid("agent_id is not an agent id")
    if type(until) is not int or until < 0:
        raise Invalid("until must be a non-negative int (the last seq the old key signs)")
    for field in ("old_public_key", "new_public_key"):
        if not isinstance(request[field], bytes) or len(request[field]) != 32:
            raise Invalid(f"{field} must be 32 raw bytes (Ed25519)")
    for field in ("old_sig", "new_sig"):
        if not isinstance(request[field], bytes) or len(request[field]) != wire.SIG_LEN:
            raise Unauthorized(f"{field} is missing or malformed")
    if request["old_public_key"] == request["new_public_key"]:
        raise Invalid("new_public_key is the old key")
    if not wire.rotate_proof_ok(request):
        raise Unauthorized("key rotation proof failed: both keys must sign the request")


def open_agent_envelope(data: bytes, key: AgentKey | None, agent: str) -> wire.Envelope:
    """Verify an event envelope from ``agent`` (on its subject) against what the view knows of
    its keys: the current key, or a retired key for an envelope ending at or below the last
    seq that key signed. Raise ``wire.EnvelopeRejected`` (``unknown_agent`` also for a
    revoked agent: the caller, knowing the key, names that ``revoked``). A revoked agent's
    envelopes ending at or below ``key.revoked_after`` (sent before it was revoked, and applied
    then) still open, for a view rebuilt from the stream."""
    public = key.public_key if key is not None and (
        not key.revoked or key.revoked_after > 0) else None
    try:
        return _not_after_revocation(wire.open_envelope(
            data, lambda _agent: public, agent, kinds=wire.EVENT_ENVELOPE_KINDS), key, agent)
    except wire.EnvelopeRejected as err:
        if err.reason != "signature" or key is None or not key.retired:
            raise
        first_error = err
    for old, until in key.retired:  # rare: only envelopes from around a rotation get here
        try:
            env = wire.open_envelope(data, _always(old), agent, kinds=wire.EVENT_ENVELOPE_KINDS)
        except wire.EnvelopeRejected:
            continue
        if env.seq <= until:
            return _not_after_revocation(env, key, agent)
        raise wire.EnvelopeRejected(
            "retired_key", f"envelope {env.first}..{env.seq} from {agent!r} is signed with a "
            f"key retired after seq {until}", agent=agent)
    raise first_error


def _not_after_revocation(env: wire.Envelope, key: AgentKey | None,
                          agent: str) -> wire.Envelope:
    if key is not None and key.revoked and env.seq > key.revoked_after:
        raise wire.EnvelopeRejected(
            "unknown_agent", f"envelope {env.first}..{env.seq} from {agent!r} comes after its "
            f"revocation (seq {key.revoked_after})", agent=agent)
    return env


def _always(public: bytes) -> Callable[[str], bytes]:
    return lambda _agent: public
