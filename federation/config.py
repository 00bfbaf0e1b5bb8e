"""Loads settings once, from a TOML file, ``OUTPOST_*`` environment variables and flags.

Later sources win: file < environment < flags. The result is a frozen dataclass handed down to
whoever needs it; nothing deeper in the code reads the environment. Every bad value becomes a
``ConfigError`` naming the setting and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from federation.errors import ConfigError
from federation.limits import ApiLimits

T = TypeVar("T")


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None or (isinstance(value, str) and value == "" and type(None) in args):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0], source)
    try:
        return _convert(value, hint, origin, name)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} (from {source}): {exc}, got {value!r}",
                          details={"setting": name, "source": source}) from None


def _convert(value: Any, hint: Any, origin: Any, name: str) -> Any:
    """``value`` as ``hint``; ``ValueError("expected ...")`` says what the setting takes."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("expected an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
    if hint is str or hint is Path:
        if not isinstance(value, str | Path):
            raise ValueError("expected a string")
        return hint(value)
    if origin is dict:
        if isinstance(value, str):
            value = parse_pairs(value.split(",") if value else [], name)
        if not isinstance(value, Mapping):
            raise ValueError("expected a table of key = value")
        return {str(k): str(v) for k, v in value.items()}
    if origin is tuple or origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ValueError("expected a list")
        return tuple(str(v) for v in value)
    return value


# Settings every node (edge and hub) takes as flags too: per-token API limits, HTTPS for the
# API, and the CA that signed its NATS server's certificate.
API_FLAGS = ("rate_limit_per_s", "rate_limit_burst", "max_streams_per_token", "tls_cert",
             "tls_key", "nats_ca")


class ArgParser(argparse.ArgumentParser):
    """argparse without abbreviations: ``--cpu 1`` is an error, not a silent ``--cpus 1``.
    Subparsers made from one are of the same class, so the whole command tree refuses them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_api_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``API_FLAGS``, with the same names and help at the edge and the hub."""
    p.add_argument("--rate-limit", dest="rate_limit_per_s",
                   help="API requests per second per token (1000; 0: no limit)")
    p.add_argument("--rate-burst", dest="rate_limit_burst",
                   help="API requests a token may make at once (2000)")
    p.add_argument("--max-streams", dest="max_streams_per_token",
                   help="open event and log-follow streams per token (32)")
    p.add_argument("--tls-cert", help="PEM certificate (chain): serve the API over HTTPS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--nats-ca", help="CA file that signed the NATS server's certificate")


def parse_pairs(items: list[str], name: str) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; a malformed item is a ``ConfigError``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{name}: {item!r} is not key=value", details={"setting": name})
        out[key.strip()] = value.strip()
    return out


# The tables the two configs live in: a file with only the other's table is a mix-up.
SECTIONS = {"agent": "outpost-agent", "hub": "outpost-hub run"}


def load_toml(path: Path | None, section: str | None = None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    if section is not None:
        other = next((o for o in SECTIONS if o != section and isinstance(data.get(o), dict)),
                     None)
        if section not in data and other is not None:
            raise ConfigError(
                f"config file {path} holds a [{other}] table: it is a config for "
                f"{SECTIONS[other]}; {SECTIONS.get(section, section)} reads an [{section}] "
                "table (or settings at the top level)", details={"setting": section})
        data = data.get(section, data)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table of settings",
                              details={"setting": section})
    return data


def build_settings(
    cls: type[T],
    *,
    file: Mapping[str, Any],
    env: Mapping[str, str],
    flags: Mapping[str, Any],
    file_name: str = "config file",
) -> T:
    """Merge the three sources into ``cls`` (a frozen dataclass), coercing and checking types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(file) - set(fields)
    if unknown:
        raise ConfigError(f"{file_name}: unknown setting(s) {', '.join(sorted(unknown))}",
                          details={"unknown": sorted(unknown)})
    values: dict[str, Any] = {}
    for name in fields:
        env_key = f"OUTPOST_{name.upper()}"
        for source, mapping, key in ((file_name, file, name), (f"${env_key}", env, env_key),
                                     ("flag", flags, name)):
            if key in mapping and mapping[key] is not None:
                values[name] = _coerce(name, mapping[key], hints[name], source)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


LOG_LEVELS = ("debug", "info", "warning", "error")
NATS_URL = r"^(nats|tls)://[^\s/]+$"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The settings every node (edge agent and hub) takes, checked in one place so the two
    cannot drift: ``data_dir``, ``listen`` (HOST:PORT of the API), ``admin_token``, logging,
    ``nats_url``, per-token API limits (``federation.limits``), HTTPS for the API
    (``tls_cert``/``tls_key``) and ``nats_ca`` (the CA that signed the NATS server's
    certificate). Subclasses add their own fields and call ``NodeConfig.__post_init__``."""

    data_dir: Path
    listen: str = "127.0.0.1:7070"
    admin_token: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    nats_url: str | None = None
    rate_limit_per_s: float = 1000.0
    rate_limit_burst: int = 2000
    max_streams_per_token: int = 32
    tls_cert: Path | None = None
    tls_key: Path | None = None
    nats_ca: Path | None = None

    def __post_init__(self) -> None:
        self.host_port  # noqa: B018 (validates listen)
        if self.log_format not in ("text", "json"):
            self._bad("log_format", self.log_format, "text | json")
        if self.log_level not in LOG_LEVELS:
            self._bad("log_level", self.log_level, " | ".join(LOG_LEVELS))
        if self.nats_url is not None and not re.match(NATS_URL, self.nats_url):
            self._bad("nats_url", self.nats_url, "nats://HOST:PORT")
        if self.admin_token is not None and len(self.admin_token) < 16:
            self._bad("admin_token", "(hidden)", "at least 16 characters")
        self.api_limits  # noqa: B018 (validates the limits)
        check_tls_files(self.tls_cert, self.tls_key)
        check_readable(self.nats_ca, "nats_ca")

    @property
    def api_limits(self) -> ApiLimits:
        return ApiLimits(self.rate_limit_per_s, self.rate_limit_burst, self.max_streams_per_token)

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @staticmethod
    def _bad(setting: str, value: object, expected: str) -> NoReturn:
        raise ConfigError(f"{setting}: {value!r} is not valid; expected {expected}",
                          details={"setting": setting})


def parse_listen(listen: str, setting: str = "listen") -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free port) to (host, port); ``ConfigError`` otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{setting}: {listen!r} is not valid; expected HOST:PORT",
                          details={"setting": setting})
    return host.strip("[]") or "0.0.0.0", int(port)


def check_tls_files(cert: Path | None, key: Path | None, setting: str = "tls") -> None:
    """A certificate and its key come together, and both files must be readable now (a typo
    should stop the node at start, not at the first TLS handshake)."""
    if (cert is None) != (key is None):
        raise ConfigError(f"{setting}_cert and {setting}_key: give both or neither",
                          details={"setting": f"{setting}_cert"})
    for name, path in ((f"{setting}_cert", cert), (f"{setting}_key", key)):
        check_readable(path, name)


def check_readable(path: Path | None, setting: str) -> None:
    """``ConfigError`` unless ``path`` is None or a readable file."""
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}",
                          details={"setting": setting}) from None
