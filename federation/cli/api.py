"""The CLI's HTTP client for one node: JSON calls, line streams, the error kinds (each with
its exit code) and a parser for server-sent events. Standard library only."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED, EXIT_PIPE = 1, 2, 3, 130, 141
# The server sends an SSE keepalive every 15 s; three missed ones mean the link is dead.
EVENTS_READ_TIMEOUT = 45.0


class CliError(Exception):
    """A failure reported as one line on stderr; ``exit_code`` says which kind."""

    exit_code = EXIT_API


class UsageError(CliError):
    exit_code = EXIT_USAGE


class Unreachable(CliError):
    exit_code = EXIT_UNREACHABLE


class ApiError(CliError):
    """The node answered with an error body; printed as ``STATUS CODE: MESSAGE``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message




@dataclass(frozen=True, slots=True)
class Client:
    """Talks to one node. Fields: ``url`` (no trailing slash), ``token``, ``timeout`` seconds,
    ``context`` (TLS for https:// URLs: trusts ``--cacert``; None: the system's CAs)."""

    url: str
    token: str | None
    timeout: float
    context: ssl.SSLContext | None = None

    def _open(self, method: str, path: str, query: dict[str, Any] | None, body: Any,
              headers: dict[str, str], timeout: float | None) -> http.client.HTTPResponse:
        target = self.url + path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(target, data=data, method=method, headers=headers)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            resp: http.client.HTTPResponse = urllib.request.urlopen(req, timeout=timeout,
                                                                    context=self.context)
            return resp
        except urllib.error.HTTPError as err:
            raise self._api_error(err) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise Unreachable(
                    f"cannot reach {self.url}: its TLS certificate is not trusted "
                    f"({err.reason.verify_message}); pass --cacert CA.pem (or set "
                    "OUTPOST_CACERT) if a private CA signed it") from None
            raise Unreachable(f"cannot reach {self.url}: {reason(err.reason)}") from None
        except (OSError, http.client.HTTPException) as err:
            raise Unreachable(f"cannot reach {self.url}: {reason(err)}") from None

    def _api_error(self, err: urllib.error.HTTPError) -> ApiError:
        try:
            raw = err.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            err.close()
        try:
            body = json.loads(raw)["error"]
            code, message = str(body["code"]), str(body["message"])
        except (ValueError, TypeError, KeyError):
            code, message = "http_error", str(err.reason)  # not an Outpost error body
        if err.code == 401 and not self.token:
            message += "; pass --token or set OUTPOST_TOKEN"
        return ApiError(err.code, code, " ".join(message.split()))

    def call(self, method: str, path: str, query: dict[str, Any] | None = None,
             body: Any = None) -> tuple[int, Any]:
        """One JSON request: (status, decoded body)."""
        with self._open(method, path, query, body, {"Accept": "application/json"},
                        self.timeout) as resp:
            try:
                raw = resp.read()
            except (OSError, http.client.HTTPException) as err:
                raise Unreachable(f"lost the connection to {self.url}: {reason(err)}") from None
            status = resp.status
        try:
            return status, json.loads(raw)
        except ValueError:
            raise CliError(f"{self.url}{path} did not answer with JSON; is it an Outpost node?") \
                from None

    def get(self, path: str, query: dict[str, Any] | None = None) -> Any:
        return self.call("GET", path, query)[1]

    def lines(self, path: str, query: dict[str, Any] | None = None, *,
              headers: dict[str, str] | None = None,
              timeout: float | None) -> Iterator[bytes]:
        """The response body line by line as the node sends it; ends when the node ends it."""
        with self._open("GET", path, query, None, headers or {}, timeout) as resp:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as err:
                    raise Unreachable(
                        f"lost the connection to {self.url}: {reason(err)}") from None
                if not line:
                    return
                yield line


def reason(err: object) -> str:
    if isinstance(err, TimeoutError):
        return "no answer in time"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


def task_path(task_id: str, suffix: str = "") -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}{suffix}"


def pages(client: Client, path: str, query: dict[str, Any], every: bool) -> dict[str, Any]:
    """One page, or with ``every`` all of them merged (``next_cursor`` then null)."""
    page = client.get(path, query)
    items = list(page["items"])
    seen: set[str] = set()
    while every and page.get("next_cursor"):
        cursor = page["next_cursor"]
        if cursor in seen:
            raise CliError(f"{client.url} returned the same cursor twice; stopping")
        seen.add(cursor)
        page = client.get(path, {**query, "cursor": cursor})
        items.extend(page["items"])
    return {"items": items, "next_cursor": None if every else page.get("next_cursor")}




@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event: ``id`` (None if the server sent none), ``kind``, raw ``data``."""

    id: int | None
    kind: str
    data: str


def parse_sse(lines: Iterator[bytes]) -> Iterator[SseEvent]:
    """Events from an ``text/event-stream`` body; comments (keepalives) and ``retry`` skipped."""
    ident: int | None = None
    kind, data = "message", list[str]()
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(ident, kind, "\n".join(data))
            kind, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            ident = int(value) if value.isdigit() else ident
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)
