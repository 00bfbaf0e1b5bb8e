"""Errors from outside Outpost (NATS, SQLite) mapped into the error tree at one seam.

httpx maps httpcore's exceptions to its own in one context manager
(``map_httpcore_exceptions``); this is ours. A backend wraps its API methods with
``map_outside_errors`` (or the ``mapped`` class decorator), so a NATS that does not answer or a
view another process has locked is a 503 the client can retry, never a 500. What is left as a
500 is a bug in Outpost itself.
"""

from __future__ import annotations

import errno
import functools
import inspect
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import nats.errors

from federation.errors import InsufficientStorage, OutpostError, Unavailable

C = TypeVar("C", bound=type)


SQLITE_FULL = 13


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: SQLite's SQLITE_FULL or an ENOSPC/EDQUOT."""
    if isinstance(exc, sqlite3.Error):
        return ((getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == SQLITE_FULL
                or "database or disk is full" in str(exc))
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def outside_error(exc: BaseException) -> OutpostError | None:
    """The error-tree form of an outside failure, or None if ``exc`` is not one."""
    if disk_full(exc):
        return InsufficientStorage("the disk is full: this change was not stored; free some "
                                   "space and retry", details={"cause": "disk_full"})
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return Unavailable("the view is locked by another process; retry",
                           details={"cause": "sqlite_busy"})
    if isinstance(exc, sqlite3.Error):
        return Unavailable(f"the view cannot be used now: {exc}",
                           details={"cause": "sqlite"})
    if isinstance(exc, nats.errors.Error | TimeoutError | ConnectionError):
        return Unavailable(f"NATS did not answer ({type(exc).__name__}); retry",
                           details={"cause": "nats"})
    return None


@contextmanager
def map_outside_errors() -> Iterator[None]:
    """Re-raise NATS and SQLite errors inside the block as ``Unavailable`` (503)."""
    try:
        yield
    except OutpostError:
        raise
    except Exception as exc:
        mapped_exc = outside_error(exc)
        if mapped_exc is None:
            raise
        raise mapped_exc from exc


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            with map_outside_errors():
                return await fn(*args, **kwargs)
        return call_async

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with map_outside_errors():
            return fn(*args, **kwargs)
    return call


def mapped(cls: C) -> C:
    """Class decorator: every public method of ``cls`` maps outside errors (see above)."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, _wrap(value))
    return cls
