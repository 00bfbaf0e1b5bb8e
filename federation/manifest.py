"""An artifact's manifest, signed by the hub: what an edge checks before it uses any bytes.

The object store's own digest says the bytes arrived as stored; it does not say who stored
them (anyone who could write the bucket could write the digest too). The manifest names the
artifact (``name``, ``version``), its ``sha256`` and ``size``, and carries the hub's Ed25519
signature (the key that signs commands, ``federation/wire.py``) over the exact JSON text, with
a domain prefix so no other signed thing of ours can pass for a manifest. Edges refuse an
artifact whose manifest does not verify, or whose bytes do not hash to its ``sha256``.

Stored in the ``OUTPOST_MANIFESTS`` KV bucket twice: under ``d.<sha256>`` and under
``n.<key of name and version>``, so an edge finds it by digest or by name and version with one
direct get either way (and checks the name and version inside match what it asked for).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from federation import subjects, wire

BUCKET = subjects.MANIFESTS_BUCKET
SIGNED_PREFIX = b"outpost-manifest-v1:"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_FIELDS = ("name", "version", "sha256", "size", "labels", "created")


class ManifestRejected(Exception):
    """A manifest that is not the hub's, or not well formed; ``reason`` says which."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """``name``, ``version``, ``sha256`` (64 hex), ``size`` (bytes), ``labels``, ``created``."""

    name: str
    version: str
    sha256: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "digest": self.digest, "size": self.size, "labels": dict(self.labels),
                "created": self.created}

    @classmethod
    def from_wire(cls, d: Any) -> Manifest:
        if not isinstance(d, dict) or set(d) != set(_FIELDS):
            raise ManifestRejected("manifest: fields must be exactly " + ", ".join(_FIELDS))
        name, version, sha, size = d["name"], d["version"], d["sha256"], d["size"]
        labels, created = d["labels"], d["created"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ManifestRejected("manifest: bad name")
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise ManifestRejected("manifest: bad version")
        if not isinstance(sha, str) or not DIGEST_RE.match("sha256:" + sha):
            raise ManifestRejected("manifest: bad sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestRejected("manifest: bad size")
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ManifestRejected("manifest: labels must map strings to strings")
        if not isinstance(created, (int, float)) or isinstance(created, bool):
            raise ManifestRejected("manifest: bad created")
        return cls(name, version, sha, size, dict(labels), float(created))


def new_manifest(name: str, version: str, sha256: str, size: int,
                 labels: dict[str, str] | None = None) -> Manifest:
    return Manifest.from_wire({"name": name, "version": version, "sha256": sha256,
                               "size": size, "labels": dict(labels or {}),
                               "created": round(time.time(), 3)})


def sign(manifest: Manifest, signer: wire.Signer) -> bytes:
    """The stored form: ``{"body": <JSON text>, "sig": <hex>}``; the signature covers the
    prefix and the exact text, so nothing needs re-encoding to verify."""
    body = json.dumps({k: getattr(manifest, k) for k in _FIELDS}, sort_keys=True)
    sig = signer.sign(SIGNED_PREFIX + body.encode())
    return json.dumps({"body": body, "sig": sig.hex()}).encode()


def open_signed(raw: bytes, hub_public: bytes | None) -> Manifest:
    """The manifest in ``raw`` if ``hub_public`` signed it; else ``ManifestRejected``."""
    if hub_public is None:
        raise ManifestRejected("this agent has no hub key yet (never enrolled): cannot "
                               "verify a manifest")
    try:
        outer = json.loads(raw)
        body, sig = outer["body"], bytes.fromhex(outer["sig"])
        if not isinstance(body, str) or set(outer) != {"body", "sig"}:
            raise ValueError("shape")
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestRejected(f"manifest is not a signed manifest ({exc})") from None
    if not wire.verify(hub_public, sig, SIGNED_PREFIX + body.encode()):
        raise ManifestRejected("manifest is not signed by the hub's key")
    try:
        return Manifest.from_wire(json.loads(body))
    except ValueError as exc:
        raise ManifestRejected(f"manifest body is not JSON ({exc})") from None


def digest_key(sha256: str) -> str:
    return f"d.{sha256}"


def name_key(name: str, version: str) -> str:
    return "n." + hashlib.sha256(f"{name}\0{version}".encode()).hexdigest()[:40]
