"""Bearer-token authentication for the API.

Tokens are kept only as SHA-256 digests and compared in constant time. Each token carries a role
(``viewer`` < ``operator`` < ``admin``); the app asks ``role_for`` and checks the route's minimum.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

ROLES = ("viewer", "operator", "admin")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def role_allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


class TokenAuth:
    """Maps bearer tokens to roles; holds digests only. ``lookup`` (digest -> role or None)
    consults a store at each request, so a revoked token stops working at once."""

    def __init__(self, tokens: dict[str, str] | None = None,
                 lookup: Callable[[str], str | None] | None = None) -> None:
        self._digests: dict[str, str] = {}
        self._lookup = lookup
        for token, role in (tokens or {}).items():
            self.add(token, role)

    def add(self, token: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self._digests[digest(token)] = role

    def role_for(self, token: str) -> str | None:
        candidate = digest(token)
        found = None
        for known, role in self._digests.items():
            if hmac.compare_digest(known, candidate):
                found = role
        if found is None and self._lookup is not None:
            found = self._lookup(candidate)  # an indexed lookup by digest: no timing signal
        return found
