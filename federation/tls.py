"""TLS contexts for the API (server side), for API clients and for NATS links.

TLS is optional everywhere: on one box or a private network plain HTTP and ``nats://`` are
simpler, but an edge reached over the internet needs its bearer tokens and events encrypted.
Certificates come from PEM files named in the config; a private CA is trusted by naming its
file (``nats_ca``, ``outpost --cacert``), never by turning verification off.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from federation.errors import ConfigError

log = logging.getLogger(__name__)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """An HTTPS server context for ``cert`` (PEM, chain allowed) and its ``key``; TLS 1.2+."""
    try:
        if os.stat(key).st_mode & 0o077:
            log.warning("TLS key %s is open to its group or others; chmod 600 it", key)
    except OSError:
        pass  # load_cert_chain below says what is wrong with it
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key: cannot load {cert} with {key}: {exc}",
                          details={"setting": "tls_cert"}) from None
    return ctx


def client_context(cafile: Path | str | None = None, setting: str = "cacert") -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only ``cafile`` when given."""
    try:
        return ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{setting}: cannot load CA file {cafile}: {exc}",
                          details={"setting": setting}) from None
