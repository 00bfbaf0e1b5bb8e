"""When an agent's NATS user JWT wants renewing, read from the JWT itself.

The hub issues agent JWTs that expire (core_hub/renewal.py). The agent asks for a new one at
half its lifetime, over its own connection, then reconnects with it; an agent whose JWT has
expired (offline for longer than it lived) connects as the public enroll user to ask. A JWT
without ``exp`` (a hub from before expiry, or NATS without auth) is never renewed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from federation import natsjwt

RENEW_AT = 0.5  # of the JWT's lifetime
RETRY_S = 30.0  # a renewal that failed is tried again after this (or sooner near the end)
SLEEP_MAX_S = 300.0  # the longest wait between two looks (a suspended box's clock jumps)
EXPIRY_MARGIN_S = 60.0  # at most; a JWT this close to its end counts as expired
EXPIRY_MARGIN_SHARE = 0.05  # of the lifetime, for short-lived JWTs


@dataclass(frozen=True, slots=True)
class JwtLifetime:
    """``issued_at`` and ``expires_at`` (unix seconds) of one user JWT."""

    issued_at: float
    expires_at: float

    @classmethod
    def of(cls, jwt: str | None) -> JwtLifetime | None:
        """The lifetime of ``jwt``, or None if there is none, it has no ``exp`` or it does
        not decode (the server is then the judge of it)."""
        claims = _claims(jwt)
        if claims is None:
            return None
        iat, exp = claims.get("iat"), claims.get("exp")
        if type(iat) is not int or type(exp) is not int or exp <= iat:
            return None
        return cls(float(iat), float(exp))

    @property
    def renew_at(self) -> float:
        return self.issued_at + (self.expires_at - self.issued_at) * RENEW_AT

    def expired(self, now: float) -> bool:
        """True once the JWT is (about to be) refused: within the margin of its end."""
        margin = min(EXPIRY_MARGIN_S, (self.expires_at - self.issued_at) * EXPIRY_MARGIN_SHARE)
        return now >= self.expires_at - margin


def jwt_account(jwt: str | None) -> str | None:
    """The account (``A...``) that signed an agent's JWT: where its enroll login is."""
    issuer = (_claims(jwt) or {}).get("iss")
    return issuer if isinstance(issuer, str) and issuer.startswith("A") else None


def may_publish(jwt: str | None, subject: str) -> bool:
    """True if ``jwt`` lets its holder publish to exactly ``subject`` (no JWT: False)."""
    nats = (_claims(jwt) or {}).get("nats")
    publish = nats.get("pub") if isinstance(nats, dict) else None
    allowed = publish.get("allow") if isinstance(publish, dict) else None
    return isinstance(allowed, list) and subject in allowed


def _claims(jwt: str | None) -> dict[str, Any] | None:
    """The claims of a user JWT, or None if there is none or it does not decode."""
    if not jwt:
        return None
    try:
        return natsjwt.decode(jwt, kind=natsjwt.USER)
    except natsjwt.NatsJwtError:
        return None
