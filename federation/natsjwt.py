"""NATS JWTs (decentralized auth): the hub is the operator and signs its own accounts and users.

Why: with an ``authorization { users }`` block the server config lists every agent, so each
enrollment re-rendered it and reloaded the server (O(fleet) per enrollment, and a server whose
memory grew faster than the fleet). In operator mode the server trusts one operator key; an
account JWT (kept by the server's resolver) says what the account may do, and each user
presents its own JWT, signed by the account, carrying its permissions. Nothing per user is in
the server's config, so an enrollment is one signature at the hub.

Format (nats-io/jwt v2): ``base64url(header) . base64url(claims) . base64url(sig)``, no padding,
header ``{"typ":"JWT","alg":"ed25519-nkey"}``, the signature an Ed25519 signature of the first
two parts by the issuer's nkey; ``jti`` is base32 (no padding) of the SHA-256 of the claims
without ``jti``. Keys are nkeys (``O...`` operator, ``A...`` account, ``U...`` user), through
the ``nkeys`` library.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import nkeys
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from federation.errors import OutpostError

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
OPERATOR, ACCOUNT, USER = "operator", "account", "user"
_PREFIX = {OPERATOR: nkeys.PREFIX_BYTE_OPERATOR, ACCOUNT: nkeys.PREFIX_BYTE_ACCOUNT,
           USER: nkeys.PREFIX_BYTE_USER}
_LEAD = {OPERATOR: "O", ACCOUNT: "A", USER: "U"}
NO_LIMIT = -1


class NatsJwtError(OutpostError):
    """A JWT that is malformed, of the wrong kind, or whose signature does not verify."""

    code = "nats_jwt"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_seed(kind: str) -> str:
    """A fresh nkey seed (``SO...``, ``SA...``, ``SU...``) of ``kind``."""
    return seed_from_raw(os.urandom(32), kind)


def seed_from_raw(raw: bytes, kind: str) -> str:
    """The nkey seed of ``kind`` for a raw 32-byte Ed25519 seed (an agent's identity key)."""
    return bytes(nkeys.encode_seed(bytes(raw), _PREFIX[kind])).decode()


def public_of(seed: str) -> str:
    """The public nkey of a seed."""
    return bytes(nkeys.from_seed(bytearray(seed.encode())).public_key).decode()


def _sign(seed: str, data: bytes) -> bytes:
    return bytes(nkeys.from_seed(bytearray(seed.encode())).sign(data))


def raw_public(public: str) -> bytes:
    """The raw 32-byte Ed25519 key of a public nkey (its checksum checked)."""
    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    body, crc = raw[:-2], raw[-2:]
    if len(body) != 33 or nkeys.crc16_checksum(body) != crc:
        raise ValueError("not a public nkey")
    return bytes(body[1:])


def _verify_key(public: str) -> VerifyKey:
    return VerifyKey(raw_public(public))


def encode(claims: Mapping[str, Any], issuer_seed: str, *, now: float | None = None) -> str:
    """Sign ``claims`` (``sub``, ``name``, ``nats``: what the kind needs) with ``issuer_seed``;
    ``iss``, ``iat`` and ``jti`` are set here."""
    body = {k: v for k, v in claims.items() if k != "jti"}
    body["iat"] = int(time.time() if now is None else now)
    body["iss"] = public_of(issuer_seed)
    body["jti"] = base64.b32encode(hashlib.sha256(
        json.dumps(body, separators=(",", ":"), sort_keys=True).encode()).digest()
    ).decode().rstrip("=")
    head = _b64(json.dumps(HEADER, separators=(",", ":")).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signing_input = f"{head}.{payload}".encode()
    return f"{head}.{payload}.{_b64(_sign(issuer_seed, signing_input))}"


def decode(token: str, *, kind: str | None = None) -> dict[str, Any]:
    """The claims of ``token`` once its signature verifies with its ``iss`` (and, with
    ``kind``, it is a JWT of that kind); raise NatsJwtError otherwise."""
    try:
        head, payload, sig = token.strip().split(".")
        header = json.loads(_unb64(head))
        claims = json.loads(_unb64(payload))
        issuer = claims["iss"]
        _verify_key(issuer).verify(f"{head}.{payload}".encode(), _unb64(sig))
    except (ValueError, KeyError, TypeError, AttributeError, BadSignatureError,
            nkeys.NkeysError) as exc:
        raise NatsJwtError(f"not a valid NATS JWT: {exc!r}") from None
    if header.get("alg") != HEADER["alg"]:
        raise NatsJwtError(f"unexpected JWT algorithm {header.get('alg')!r}")
    if kind is not None and claims.get("nats", {}).get("type") != kind:
        raise NatsJwtError(f"not a NATS {kind} JWT")
    return dict(claims)


def permissions(perms: Mapping[str, Any] | None) -> dict[str, Any]:
    """Our permission maps (``publish``/``subscribe`` with ``allow``/``deny``, as the config
    ``authorization`` block had them) as JWT claims (``pub``/``sub``)."""
    out: dict[str, Any] = {}
    for ours, theirs in (("publish", "pub"), ("subscribe", "sub")):
        part = (perms or {}).get(ours) or {}
        claim = {k: list(part[k]) for k in ("allow", "deny") if part.get(k)}
        if claim:
            out[theirs] = claim
    return out


def operator_jwt(operator_seed: str, name: str, *, system_account: str,
                 signing_keys: Iterable[str] = (), now: float | None = None) -> str:
    """The operator JWT the server trusts (self-signed)."""
    nats: dict[str, Any] = {"type": OPERATOR, "version": 2, "system_account": system_account}
    if keys := list(signing_keys):
        nats["signing_keys"] = keys
    return encode({"sub": public_of(operator_seed), "name": name, "nats": nats},
                  operator_seed, now=now)


def account_jwt(operator_seed: str, account: str, name: str, *, jetstream: bool = False,
                signing_keys: Iterable[str | Mapping[str, Any]] = (),
                revocations: Mapping[str, int] | None = None,
                exports: Iterable[Mapping[str, Any]] = (), now: float | None = None) -> str:
    """An account JWT signed by the operator: no limits (JetStream on if ``jetstream``), the
    account's ``signing_keys`` (a public key, or a user scope map), and ``revocations`` (user
    public nkey -> unix time: that user's JWTs issued at or before it are refused)."""
    limits: dict[str, Any] = {
        "subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT, "imports": NO_LIMIT,
        "exports": NO_LIMIT, "wildcards": True, "conn": NO_LIMIT, "leaf": NO_LIMIT}
    if jetstream:
        limits.update({"mem_storage": NO_LIMIT, "disk_storage": NO_LIMIT,
                       "streams": NO_LIMIT, "consumer": NO_LIMIT})
    nats: dict[str, Any] = {"type": ACCOUNT, "version": 2, "limits": limits}
    if keys := list(signing_keys):
        nats["signing_keys"] = [dict(k) if isinstance(k, Mapping) else k for k in keys]
    if revocations:
        nats["revocations"] = dict(sorted(revocations.items()))
    if exported := [dict(e) for e in exports]:
        nats["exports"] = exported
    return encode({"sub": account, "name": name, "nats": nats}, operator_seed, now=now)


def user_scope(signing_key: str, role: str, perms: Mapping[str, Any] | None,
               connection_types: Iterable[str] = ("STANDARD",)) -> dict[str, Any]:
    """A scoped signing key of an account: users it signs get ``perms`` whatever their JWT
    says (the server enforces the template; such a user JWT must carry no permissions)."""
    template: dict[str, Any] = {**permissions(perms), "subs": NO_LIMIT, "data": NO_LIMIT,
                                "payload": NO_LIMIT,
                                "allowed_connection_types": list(connection_types)}
    return {"kind": "user_scope", "key": signing_key, "role": role, "template": template,
            "description": ""}


def user_jwt(account_seed: str, user: str, name: str, perms: Mapping[str, Any] | None, *,
             connection_types: Iterable[str] = ("STANDARD",),
             issuer_account: str | None = None, scoped: bool = False,
             now: float | None = None, expires: float | None = None) -> str:
    """A user JWT for the public nkey ``user``, signed by ``account_seed`` (the account's key,
    or one of its signing keys with ``issuer_account`` naming the account). Never a bearer
    token: the user must sign the server's nonce with its own key. ``scoped``: signed by a
    scoped signing key, so it carries no permissions of its own. ``expires``: unix seconds
    after which the server refuses it (and closes a connection made with it)."""
    if not user.startswith(_LEAD[USER]):
        raise NatsJwtError("a user JWT's subject is a user nkey (U...)")
    nats: dict[str, Any] = {"type": USER, "version": 2}
    if not scoped:
        nats.update(permissions(perms))
        nats.update({"subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT,
                     "bearer_token": False,
                     "allowed_connection_types": list(connection_types)})
    if issuer_account is not None:
        nats["issuer_account"] = issuer_account
    claims: dict[str, Any] = {"sub": user, "name": name, "nats": nats}
    if expires is not None:
        claims["exp"] = int(expires)
    return encode(claims, account_seed, now=now)


def creds(jwt: str, seed: str) -> str:
    """A ``.creds`` file (what nats.py's ``user_credentials`` and a leaf node's ``credentials``
    read): the user JWT and the user's nkey seed."""
    return ("-----BEGIN NATS USER JWT-----\n"
            f"{jwt}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{seed}\n"
            "------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


def read_creds(text: str) -> tuple[str, str]:
    """(jwt, seed) of a ``.creds`` file's text."""
    blocks = [line.strip() for line in text.splitlines()
              if line.strip() and not line.startswith(("---", "***", "NKEY"))]
    jwt = next((b for b in blocks if b.count(".") == 2), None)
    seed = next((b for b in blocks if b.startswith("SU")), None)
    if jwt is None or seed is None:
        raise NatsJwtError("not a NATS .creds file (no user JWT and seed)")
    return jwt, seed
