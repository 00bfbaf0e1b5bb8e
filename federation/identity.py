"""Node identity: an Ed25519 keypair on disk, and the id derived from its public key.

The id is the key's fingerprint, so nobody can claim an id without holding its private key.
The crypto library is imported only when a key is created or used for signing.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path


def id_from_public_key(public: bytes, prefix: str = "a") -> str:
    """``a`` + 25 base32 characters of SHA-256(public key): short, DNS- and subject-safe."""
    digest = base64.b32encode(hashlib.sha256(public).digest()).decode().lower()
    return prefix + digest[:25]


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def load_or_create_key(path: Path) -> tuple[bytes, bytes]:
    """(private seed, public key) raw bytes; created with mode 0600 on first use.

    PyNaCl (libsodium) rather than ``cryptography``: ~2 MB of RSS instead of ~8 MB on an edge
    box, and the same RFC 8032 keys, so either library reads them.
    """
    from nacl.signing import SigningKey

    if path.exists():
        seed = path.read_bytes()
        key = SigningKey(seed)
    else:
        key = SigningKey.generate()
        seed = bytes(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, seed)
    return seed, bytes(key.verify_key)


def load_or_create_token(path: Path) -> str:
    """A random admin token kept in ``path`` (0600), so a fresh node is never open."""
    from federation.auth import new_token

    if path.exists():
        return path.read_text().strip()
    token = new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, token.encode())
    return token
