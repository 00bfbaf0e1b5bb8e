"""Who a NATS client says it is: the nkey of a hub or an agent, or the public enroll user.

With least privilege on (``core_hub/natsauth.py``), the NATS server knows every enrolled agent
as an nkey user whose public key is the agent's own Ed25519 identity key (nkeys are Ed25519),
so no second secret is handed out or stored: the key that signs the agent's envelopes also
answers the server's connect challenge. An agent that has not enrolled yet connects as the
shared ``outpost-enroll`` user, whose password is public on purpose: that user may only send
an enrollment request and read the answer, and an answer holds nothing secret (the agent id
and the hub's public key).

Each client's request inboxes live under a prefix of its own (``_INBOX.<agent_id>``), so the
server can let an agent read its replies (JetStream acks, fetched commands) and nobody else's.
Against a server without authorization all of this is ignored by the server, so the same
client code works there.

A reply subject is input too: NATS lets a client publish a request with any reply subject,
whatever its own permissions, and a responder that answers it publishes with *its* rights. So
the hub answers only into an inbox space (``reply_in_inbox``): the enroll user's
``_INBOX_ENROLL.>`` (which only enrolling clients may read) or ``_INBOX.<agent_id>.>`` of the
agent the request speaks for. The hub's own inboxes are ``_INBOX_HUB.>``, apart from both.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

from federation import subjects

# The public enroll login (operator mode, core_hub/natsauth.py): a user nkey and an account
# signing key whose seeds are public on purpose. The hub's OUTPOST account lists that signing
# key as *scoped* to the enroll permissions, so the server gives any user it signs those and
# nothing else; an agent makes its own enroll JWT with it, knowing only the account's public
# key (the tail of its join token, ``token_account``).
ENROLL_USER_SEED = "SUAJILRHRB4XBY5B4IDYKQCNN2FTEY4BTJ6HZRV5GBNJNTWZHM6HTDWSAM"
ENROLL_SIGNER_SEED = "SAAHRUGSJR2E3MH7FMSR5TYGZEASYBONKQ7OUFVQ2FPRZ4TKDKQ5AX5GZM"
TOKEN_ACCOUNT_SEP = "."  # a join token: opj_<secret>[.<OUTPOST account public nkey>]
ENROLL_INBOX_PREFIX = "_INBOX_ENROLL"
AGENT_INBOX_ROOT = "_INBOX"  # + ".<agent_id>"
HUB_INBOX_PREFIX = "_INBOX_HUB"
# What follows an inbox prefix in a reply: nats-py's "<nuid>.<token>" or a plain "<nuid>";
# plain tokens only (no wildcards, nothing that could climb into another subject space).
_INBOX_TAIL = re.compile(r"(\.[A-Za-z0-9_-]{1,64}){1,3}")
_NKEY_USER = 20 << 3  # nkeys' version byte of a user key: base32 "U..."
_NKEY_SEED = 18 << 3  # ... and of a seed: "S..."


def _crc16(data: bytes) -> bytes:
    """CRC-16/XMODEM, little-endian: the checksum nkeys append before base32."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc.to_bytes(2, "little")


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw + _crc16(raw)).decode().rstrip("=")


def user_nkey(public_key: bytes) -> str:
    """The nkey (``U...``) of a raw 32-byte Ed25519 public key, as a server config names it."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return _b32(bytes([_NKEY_USER]) + bytes(public_key))


def user_seed(seed: bytes) -> str:
    """The nkey seed (``SU...``) of a raw 32-byte Ed25519 seed, as nats-py's
    ``nkeys_seed_str`` takes it."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    return _b32(bytes([_NKEY_SEED | _NKEY_USER >> 5, (_NKEY_USER & 31) << 3]) + bytes(seed))


def agent_inbox_prefix(agent_id: str) -> str:
    """The inbox prefix of one agent's connection; its permissions allow ``<prefix>.>``."""
    return f"{AGENT_INBOX_ROOT}.{subjects.validate_agent_id(agent_id)}"


def reply_in_inbox(reply: str | None, agent_id: str | None) -> bool:
    """True if a responder may answer on ``reply`` for a request that speaks for ``agent_id``
    (None: no agent, or one not known yet): the enroll user's inbox space, or that agent's."""
    if not reply:
        return False
    prefixes = [ENROLL_INBOX_PREFIX]
    if agent_id is not None and subjects.is_agent_id(agent_id):
        prefixes.append(agent_inbox_prefix(agent_id))
    for prefix in prefixes:
        if reply.startswith(prefix + ".") and _INBOX_TAIL.fullmatch(reply[len(prefix):]):
            return True
    return False


@dataclass(frozen=True, slots=True)
class NatsCredentials:
    """What one connection presents: an nkey ``seed`` (``SU...``) with its user ``jwt`` (the
    server's operator mode: the seed signs the server's nonce, the JWT says who may do what),
    or a ``user``/``password``, and the ``inbox_prefix`` its replies come to. Never logged
    (``repr`` hides the secret)."""

    seed: str | None = None
    user: str | None = None
    password: str | None = None
    inbox_prefix: str = "_INBOX"
    jwt: str | None = None

    def __repr__(self) -> str:
        who = ("jwt" if self.jwt else "nkey") if self.seed else self.user or "anonymous"
        return f"NatsCredentials({who}, inbox_prefix={self.inbox_prefix!r})"

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        options: dict[str, Any] = {"inbox_prefix": self.inbox_prefix}
        if self.seed:
            options["nkeys_seed_str"] = self.seed
            if self.jwt:
                jwt = self.jwt.encode()
                options["user_jwt_cb"] = lambda: jwt
        elif self.user:
            options["user"], options["password"] = self.user, self.password
        return options


def agent_credentials(seed: bytes, agent_id: str, jwt: str | None = None) -> NatsCredentials:
    """An enrolled agent: its identity key as an nkey, the user JWT the hub issued it at
    enrollment (None against a server without auth), its own inbox prefix."""
    return NatsCredentials(seed=user_seed(seed), jwt=jwt or None,
                           inbox_prefix=agent_inbox_prefix(agent_id))


def hub_credentials(seed: bytes, jwt: str | None = None) -> NatsCredentials:
    """The hub: its signing key as an nkey, its replies under ``_INBOX_HUB`` (its permissions:
    ``core_hub/natsauth.hub_permissions``, in its user JWT)."""
    return NatsCredentials(seed=user_seed(seed), jwt=jwt, inbox_prefix=HUB_INBOX_PREFIX)


def token_account(token: str | None) -> str | None:
    """The OUTPOST account public nkey a join token carries (None: a hub without operator
    mode, or an older token)."""
    if not token or TOKEN_ACCOUNT_SEP not in token:
        return None
    account = token.rsplit(TOKEN_ACCOUNT_SEP, 1)[1]
    return account if re.fullmatch(r"A[A-Z2-7]{55}", account) else None


def enroll_credentials(account: str | None) -> NatsCredentials:
    """The public enroll login for the hub whose OUTPOST account is ``account``: a user JWT
    made here, signed by the public enroll signing key (the server gives it the enroll
    permissions only). Without an account (a server without auth), no credentials."""
    if account is None:
        return ENROLL_CREDENTIALS
    from federation import natsjwt

    jwt = natsjwt.user_jwt(ENROLL_SIGNER_SEED, natsjwt.public_of(ENROLL_USER_SEED),
                           "outpost-enroll", None, issuer_account=account, scoped=True, now=0)
    return NatsCredentials(seed=ENROLL_USER_SEED, jwt=jwt, inbox_prefix=ENROLL_INBOX_PREFIX)


ENROLL_CREDENTIALS = NatsCredentials(inbox_prefix=ENROLL_INBOX_PREFIX)  # no auth: inbox only
