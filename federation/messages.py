"""Typed bodies of what travels inside envelopes: commands (hub to edge), offers and command
results (edge to hub).

``wire.py`` checks an envelope's frame and signature; this module checks what it carries. Each
body becomes a frozen slotted dataclass through a strict ``from_wire``: an unknown key, a
missing one, a value of the wrong type, a non-finite number or text with NUL is refused with
``MessageInvalid`` instead of being dropped or passed on, so nothing ill-typed gets past the
decode into the placer, the supervisor or SQLite. A signature proves who sent a body, not that
the sender (a buggy hub, a stolen edge) sent a sane one. It is a module of its own, next to
``wire.py``, so the envelope code and the body types change apart.

The hub builds each command through the same class it is decoded with at the edge
(``command_from_wire`` before signing), so it cannot send a command the edge would refuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from federation.errors import Invalid, OutpostError
from federation.schemas import validate_task_spec

MAX_ID = 128
RESULT_STATUSES = frozenset({"applied", "declined", "expired", "rejected", "duplicate"})


class MessageInvalid(OutpostError):
    """A body that does not decode: ``field`` names what is wrong; ``command_id`` is the id of
    a command whose id at least was readable (so the edge can still answer it)."""

    status = 422
    code = "invalid_message"

    def __init__(self, message: str, *, field: str, command_id: str | None = None) -> None:
        super().__init__(message, details={"field": field})
        self.field = field
        self.command_id = command_id


# ---------------------------------------------------------------- value checks
# Each returns the value as the dataclass keeps it, or raises ValueError saying what is wrong.


def _ident(value: Any) -> str:
    if isinstance(value, str) and 0 < len(value) <= MAX_ID and value.isascii() and all(
            c.isalnum() or c in "-_.:" for c in value):
        return value
    raise ValueError(f"an id of 1-{MAX_ID} letters, digits or -_.:")


def _opt_ident(value: Any) -> str | None:
    return None if value is None else _ident(value)


def _text(value: Any) -> str:
    if isinstance(value, str) and len(value) <= 4096 and "\x00" not in value:
        return value
    raise ValueError("text of at most 4096 characters, without NUL")


def _opt_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _number(value: Any) -> float:
    # An int stays an int (memory in MB is counted in whole numbers); bool is not a number.
    if type(value) in (int, float) and math.isfinite(value):
        return value  # type: ignore[no-any-return]
    raise ValueError("a finite number")


def _amount(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError("a finite number, not negative")
    return number


def _count(value: Any) -> int:
    if type(value) is int and 0 <= value < 2**63:
        return value
    raise ValueError("a non-negative integer")


def _flag(value: Any) -> bool:
    if type(value) is bool:
        return value
    raise ValueError("true or false")


def _spec(value: Any) -> dict[str, Any]:
    try:
        return validate_task_spec(value)
    except Invalid as exc:
        raise ValueError(f"a valid task spec ({exc.message})") from None


def _labels(value: Any) -> dict[str, str]:
    if isinstance(value, dict) and len(value) <= 64 and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256
            for k, v in value.items()):
        return dict(value)
    raise ValueError("a map of short texts")


def _names(value: Any) -> list[str]:
    if isinstance(value, list) and len(value) <= 16 and all(
            isinstance(v, str) and 0 < len(v) <= 32 for v in value):
        return list(value)
    raise ValueError("a list of short names")


def _usage(value: Any) -> dict[str, float]:
    if isinstance(value, dict) and set(value) <= {"cpus", "mem_mb", "disk_mb"}:
        return {k: _amount(v) for k, v in value.items()}
    raise ValueError("a map of cpus, mem_mb, disk_mb amounts")


# ---------------------------------------------------------------- strict decoding

M = TypeVar("M")


def _decode(cls: type[M], body: Any, checks: Mapping[str, Callable[[Any], Any]],
            what: str, command_id: str | None = None) -> M:
    if not isinstance(body, dict):
        raise MessageInvalid(f"{what}: the body is not a map", field="(body)",
                             command_id=command_id)
    unknown = [k for k in body if k not in checks]
    if unknown:
        raise MessageInvalid(f"{what}: unknown field {str(unknown[0])[:64]!r}",
                             field=str(unknown[0])[:64], command_id=command_id)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in body:
            if f.metadata.get("required", True):
                raise MessageInvalid(f"{what}: {f.name} is required", field=f.name,
                                     command_id=command_id)
            continue
        try:
            values[f.name] = checks[f.name](body[f.name])
        except ValueError as exc:
            raise MessageInvalid(f"{what}: {f.name} must be {exc}", field=f.name,
                                 command_id=command_id) from None
    return cls(**values)


def _optional(default: Any) -> Any:
    return field(default=default, metadata={"required": False})


def _wire(message: Any) -> dict[str, Any]:
    return {f.name: getattr(message, f.name) for f in fields(message)}


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Launch:
    """Run ``spec`` as task ``task_id`` here; ``offer_id``: the offer it was placed on."""

    KIND: ClassVar[str] = "launch"
    id: str
    expires_at: float
    task_id: str
    spec: dict[str, Any]
    offer_id: str | None = _optional(None)


@dataclass(frozen=True, slots=True)
class Kill:
    """Stop task ``task_id``."""

    KIND: ClassVar[str] = "kill"
    id: str
    expires_at: float
    task_id: str


@dataclass(frozen=True, slots=True)
class Update:
    """Replace task ``task_id``'s spec; ``generation``: the one the hub based it on."""

    KIND: ClassVar[str] = "update"
    id: str
    expires_at: float
    task_id: str
    generation: int
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Drain:
    """Take no new tasks; ``migrate``: the hub moves service instances away."""

    KIND: ClassVar[str] = "drain"
    id: str
    expires_at: float
    migrate: bool = _optional(False)


@dataclass(frozen=True, slots=True)
class Stage:
    """Fetch artifact ``digest`` (64 hex) into the cache ahead of use."""

    KIND: ClassVar[str] = "stage"
    id: str
    expires_at: float
    digest: str


Command = Launch | Kill | Update | Drain | Stage
COMMANDS: dict[str, type[Launch] | type[Kill] | type[Update] | type[Drain] | type[Stage]] = {
    c.KIND: c for c in (Launch, Kill, Update, Drain, Stage)}


def _sha_hex(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(
            c in "0123456789abcdef" for c in value):
        return value
    raise ValueError("a sha256 digest in 64 lowercase hex digits")


_COMMAND_CHECKS: dict[str, Callable[[Any], Any]] = {
    "id": _ident, "expires_at": _number, "task_id": _ident, "spec": _spec,
    "offer_id": _opt_text, "generation": _count, "migrate": _flag, "digest": _sha_hex}


def command_from_wire(kind: str, body: Any) -> Command:
    """The command of ``kind`` that ``body`` holds, or ``MessageInvalid`` (with the command's
    id when that much was readable)."""
    cls = COMMANDS.get(kind)
    command_id = None
    if isinstance(body, dict):
        try:
            command_id = _ident(body.get("id"))
        except ValueError:
            pass
    if cls is None:
        raise MessageInvalid(f"unknown command kind {str(kind)[:32]!r}", field="kind",
                             command_id=command_id)
    checks = {f.name: _COMMAND_CHECKS[f.name] for f in fields(cls)}
    return _decode(cls, body, checks, kind, command_id)


def command_to_wire(command: Command) -> dict[str, Any]:
    return _wire(command)


# ---------------------------------------------------------------- edge to hub


@dataclass(frozen=True, slots=True)
class Offer:
    """What an agent has free now (``cpus``, ``mem_mb``, ``disk_mb``), its ``labels`` and
    ``site`` as it says them, what it ``used``, the task ``drivers`` it runs (absent: only
    processes), and until when the offer holds. Only the amounts and the expiry are required
    (the hub names the agent by the envelope's sender)."""

    cpus: float
    mem_mb: float
    expires_at: float
    disk_mb: float = _optional(0)
    id: str = _optional("")
    agent_id: str = _optional("")
    site: str = _optional("")
    labels: dict[str, str] | None = _optional(None)
    created_at: float = _optional(0.0)
    used: dict[str, float] | None = _optional(None)
    artifacts: list[str] | None = _optional(None)  # sha256 of the artifacts it holds
    drivers: list[str] | None = _optional(None)

    @classmethod
    def from_wire(cls, body: Any) -> Offer:
        return _decode(cls, body, _OFFER_CHECKS, "offer")

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in _wire(self).items() if v is not None}


_OFFER_CHECKS: dict[str, Callable[[Any], Any]] = {
    "id": _text, "agent_id": _ident, "site": _text, "labels": _labels, "cpus": _amount,
    "mem_mb": _amount, "disk_mb": _amount, "expires_at": _number, "created_at": _number,
    "used": _usage, "artifacts": lambda v: _digests(v), "drivers": _names}


MAX_OFFER_ARTIFACTS = 1000


def _digests(value: Any) -> list[str]:
    if isinstance(value, list) and len(value) <= MAX_OFFER_ARTIFACTS and all(
            isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)
            for d in value):
        return list(value)
    raise ValueError(f"a list of at most {MAX_OFFER_ARTIFACTS} sha256 hex digests")


def _status(value: Any) -> str:
    if isinstance(value, str) and value in RESULT_STATUSES:
        return value
    raise ValueError(f"one of {sorted(RESULT_STATUSES)}")


def _kind(value: Any) -> str:
    if isinstance(value, str) and value in COMMANDS:
        return value
    raise ValueError(f"one of {sorted(COMMANDS)}")


@dataclass(frozen=True, slots=True)
class Result:
    """How an edge handled command ``command_id`` (of ``kind``, about ``task_id``): ``status``,
    a readable ``detail``; ``offer_id`` for a launch, ``generation`` for an update."""

    command_id: str
    status: str
    kind: str | None = _optional(None)
    task_id: str | None = _optional(None)
    detail: str | None = _optional(None)
    offer_id: str | None = _optional(None)
    generation: int | None = _optional(None)

    @classmethod
    def from_wire(cls, body: Any) -> Result:
        return _decode(cls, body, _RESULT_CHECKS, "result")

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in _wire(self).items()
                if v is not None or k in ("kind", "task_id", "detail")}


_RESULT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "command_id": _ident, "kind": _kind, "status": _status, "task_id": _opt_ident,
    "detail": _opt_text, "offer_id": _opt_text,
    "generation": lambda v: None if v is None else _count(v)}
