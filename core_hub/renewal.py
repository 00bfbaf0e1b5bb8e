"""A fresh NATS user JWT for an agent's current key, before (or after) the one it has expires.

Agent user JWTs expire (``agent_jwt_ttl_s``, core_hub/natsauth.py), so that the account's list
of revoked keys can forget a key once every JWT ever issued for it has expired: without expiry
that list only grows, and past ~11,000 revoked or rotated-away keys the account JWT no longer
fits in a NATS message, and no revocation reaches the server any more.

The agent asks on the enrollment subject (``wire.renew_request``: its id and current key, signed
by that key), over its own connection while its JWT is valid, or through the public enroll
login once it has expired (an edge offline for longer than the JWT lives). The hub answers like
an enrollment, with ``nats_jwt``, for the agent's current key of an agent not revoked, and
refuses anything else: a retired key, a revoked agent, an unknown one.
"""

from __future__ import annotations

from typing import Any

from core_hub.store import HubStore
from federation import subjects, wire
from federation.errors import Forbidden, Invalid, NotFound, Unauthorized

OP = "renew"
_FIELDS = frozenset({*wire.RENEW_FIELDS, "sig"})


def is_renewal(request: Any) -> bool:
    """True for a decoded message on the enrollment subject that asks for a fresh JWT."""
    return isinstance(request, dict) and request.get("op") == OP


def renew(store: HubStore, request: dict[str, Any]) -> str:
    """Check a renewal request; returns the agent id whose current key may have a new JWT.
    Raise Invalid, Unauthorized, NotFound or Forbidden with the reason."""
    if set(request) != _FIELDS:
        raise Invalid(f"renewal request fields must be {sorted(_FIELDS)}")
    agent_id, public, sig = request["agent_id"], request["public_key"], request["sig"]
    if not subjects.is_agent_id(agent_id):
        raise Invalid("agent_id is not an agent id")
    if not isinstance(public, bytes) or len(public) != 32:
        raise Invalid("public_key must be 32 raw bytes (Ed25519)")
    if not isinstance(sig, bytes) or len(sig) != wire.SIG_LEN:
        raise Unauthorized("sig is missing or malformed")
    if not wire.renew_proof_ok(request):
        raise Unauthorized("renewal proof failed: sig does not verify with public_key")
    known = store.agent_key(agent_id)
    if known is None:
        raise NotFound(f"agent {agent_id} is not enrolled", details={"agent_id": agent_id})
    if known.revoked:
        raise Forbidden(f"agent {agent_id} is revoked; enroll a new key",
                        details={"agent_id": agent_id})
    if known.public_key != public:
        raise Forbidden(f"public_key is not agent {agent_id}'s current key",
                        details={"agent_id": agent_id})
    return str(agent_id)
