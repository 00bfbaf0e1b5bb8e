"""The one REST API, served by every node: ``build_app(backend)``.

Edge and core differ only in the ``Backend`` they pass in; routes, validation, errors, auth,
paging and the OpenAPI document are the same code, so "the same API everywhere" stays true.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web

from federation import artifacts, schemas, strictjson
from federation.auth import TokenAuth, digest, role_allows
from federation.backend import TASK_ORDERS, Backend, TaskQuery
from federation.errors import (
    BadRequest,
    Forbidden,
    OutpostError,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    error_body,
)
from federation.limits import ApiLimits, Limiter

log = logging.getLogger(__name__)

BACKEND = web.AppKey("backend", Backend)
AUTH = web.AppKey("auth", TokenAuth)
STATS = web.AppKey("stats", dict[str, Any])
ROLE = web.RequestKey("role", str)
LIMITER = web.AppKey("limiter", Limiter)
# The caller's token digest: the key of its rate bucket and of its stream slots.
CALLER = web.RequestKey("caller", str)
# Handlers that stream without end (SSE, log follow); cancelled at shutdown so it is prompt.
STREAMS = web.AppKey("streams", set[asyncio.Task[Any]])
# A streamed response whose headers are out: an error after that may only end it.
STARTED = web.RequestKey("started", web.StreamResponse)
MAX_BODY = 256 * 1024
# A client must send a whole request head within IDLE_S of connecting (or of the previous
# answer), and a body within BODY_READ_S: a slow or silent client may not hold a connection
# (and its file descriptor) open for ever. Streams (SSE, log follow) are not limited: they are
# answers, and they check their reader is still there.
IDLE_S = 10.0
BODY_READ_S = 10.0
# aiohttp's own keep-alive timer (default about an hour) also runs from the moment a
# connection opens until its first full request head: one setting bounds both.
RUNNER_OPTIONS: dict[str, Any] = {"keepalive_timeout": IDLE_S}
SSE_KEEPALIVE = 15.0
DISCONNECT_POLL = 1.0  # how often a quiet stream checks that its client is still there

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One API route: what it does, who may call it, and the schemas the OpenAPI doc shows."""

    method: str
    path: str
    handler: Handler
    role: str | None  # None: no token needed
    summary: str
    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    params: tuple[tuple[str, str, dict[str, Any]], ...] = ()  # (name, in, JSON Schema)
    stream: str | None = None  # media type of a streamed response
    upload: str | None = None  # media type of a streamed request body (an artifact's bytes)


def _json(data: Any, status: int = 200) -> web.Response:
    # orjson: lists of tasks are the hot path; ``orjson.Fragment`` items (task JSON kept as
    # text by a store) are copied into the answer without being decoded and encoded again.
    return web.Response(body=orjson.dumps(data, default=str), status=status,
                        content_type="application/json")


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: must be an integer", details={"field": name}) from None
    if not low <= value <= high:
        raise BadRequest(f"{name}: must be between {low} and {high}", details={"field": name})
    return value


def _bool_param(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise BadRequest(f"{name}: must be true or false", details={"field": name})


async def _read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"body: at most {MAX_BODY} bytes", details={"limit": MAX_BODY})
    try:
        async with asyncio.timeout(BODY_READ_S):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(f"body: not received within {BODY_READ_S:g} s",
                             details={"limit_s": BODY_READ_S}) from None
    if not raw:
        raise BadRequest("body: a JSON object is required")
    return strictjson.loads(raw)


def _backend(request: web.Request) -> Backend:
    return request.app[BACKEND]


# ---------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.Response:
    return _json(await _backend(request).health())


async def info(request: web.Request) -> web.Response:
    # token_role: what the caller's own token may do (the dashboard hides what it may not).
    return _json({**await _backend(request).info(), "token_role": request.get(ROLE)})


def _task_order(order: str) -> str:
    if order not in TASK_ORDERS:
        raise BadRequest(f"order: must be one of {', '.join(TASK_ORDERS)}",
                         details={"field": "order", "allowed": list(TASK_ORDERS)})
    return order


async def list_tasks(request: web.Request) -> web.Response:
    q = request.query
    states = tuple(s for s in q.get("state", "").split(",") if s)
    for s in states:
        if s not in schemas.TASK_STATES:
            raise BadRequest(f"state: unknown state {s!r}",
                             details={"field": "state", "allowed": schemas.TASK_STATES})
    label = None
    if q.get("label"):
        key, sep, value = q["label"].partition("=")
        if not sep or not re.match(schemas.LABEL_KEY_PATTERN, key):
            raise BadRequest("label: must look like key=value, with a valid label key",
                             details={"field": "label"})
        label = (key, value)
    query = TaskQuery(
        states=states,
        label=label,
        name=q.get("name") or None,
        agent_id=q.get("agent") or None,
        site=q.get("site") or None,
        limit=_int_param(request, "limit", 100, 1, 1000),
        cursor=q.get("cursor") or None,
        order=_task_order(q.get("order") or "id"),
    )
    page = await _backend(request).list_tasks(query)
    return _json(page.to_json())


async def create_task(request: web.Request) -> web.Response:
    spec = schemas.validate_task_spec(await _read_json(request))
    return _json(await _backend(request).create_task(spec), status=201)


async def get_task(request: web.Request) -> web.Response:
    return _json(await _backend(request).get_task(request.match_info["id"]))


async def task_history(request: web.Request) -> web.Response:
    return _json(await _backend(request).task_history(request.match_info["id"]))


async def kill_task(request: web.Request) -> web.Response:
    later, body = await _backend(request).kill_task(request.match_info["id"])
    return _json(body, status=202 if later else 200)


async def task_logs(request: web.Request) -> web.StreamResponse:
    stream = request.query.get("stream", "stdout")
    if stream not in ("stdout", "stderr"):
        raise BadRequest("stream: must be stdout or stderr", details={"field": "stream"})
    tail = _int_param(request, "tail", 100, 0, 100_000)
    follow = _bool_param(request, "follow")
    # Only a follow is endless, so only a follow takes one of the token's stream slots.
    with _stream_slot(request) if follow else contextlib.nullcontext():
        return await _send_logs(request, stream, tail, follow)


async def _send_logs(request: web.Request, stream: str, tail: int,
                     follow: bool) -> web.StreamResponse:
    chunks = await _backend(request).open_logs(
        request.match_info["id"], stream=stream, tail=tail, follow=follow
    )
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                       "Cache-Control": "no-cache"})
    await _start(request, resp)
    try:
        with _streaming(request):
            try:
                async with contextlib.aclosing(_while_connected(request, chunks,
                                                                None)) as items:
                    async for chunk in items:
                        if chunk:  # no keepalives here (None): a log stream has no idle beat
                            await resp.write(chunk)
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
        if request.transport is None or request.transport.is_closing():
            return resp  # the reader left: there is nobody to end the body for
        await resp.write_eof()
    except ConnectionResetError:  # the reader left mid-write
        pass
    return resp


async def _while_connected(request: web.Request, source: AsyncIterator[T],
                           keepalive: float | None) -> AsyncGenerator[T | None, None]:
    """The items of ``source``, plus ``None`` after each ``keepalive`` seconds of quiet; ends
    when the client has gone.

    aiohttp does not cancel a handler whose client left, and a quiet stream writes nothing that
    could fail, so the connection is looked at every ``DISCONNECT_POLL`` s: a closed stream
    gives its slot back within a second or so. The next-item wait is kept across those wake-ups:
    cancelling it (as wait_for would) would close ``source`` after the first quiet period.
    """
    it = source.__aiter__()
    loop = asyncio.get_running_loop()
    poll = DISCONNECT_POLL if keepalive is None else min(DISCONNECT_POLL, keepalive)
    quiet_since = loop.time()
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=poll)
            if not done:
                if request.transport is None or request.transport.is_closing():
                    return
                if keepalive is not None and loop.time() - quiet_since >= keepalive:
                    quiet_since = loop.time()
                    yield None
                continue
            fut, pending = pending, None
            try:
                item = fut.result()
            except StopAsyncIteration:
                return
            quiet_since = loop.time()
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)


async def _start(request: web.Request, resp: web.StreamResponse) -> None:
    """Send a stream's headers, and note that from now on an error can only end it."""
    await resp.prepare(request)
    request[STARTED] = resp


def _cut(request: web.Request, exc: BaseException) -> web.StreamResponse:
    """End a started response after an error (Starlette's ServerErrorMiddleware does so): close
    the connection once what was written has gone, without the body's end marker, so the
    client sees a cut stream instead of a clean end (or a second response in the body)."""
    log.warning("stream %s %s cut by an error after it started: %s", request.method,
                request.path, exc if isinstance(exc, OutpostError) else repr(exc),
                exc_info=not isinstance(exc, OutpostError), extra={"path": request.path})
    if request.transport is not None:
        request.transport.close()
    return request[STARTED]


class _streaming:
    """Registers the current handler as an endless stream for the app's shutdown to cancel."""

    def __init__(self, request: web.Request) -> None:
        self.streams: set[asyncio.Task[Any]] = request.app[STREAMS]
        self.task = asyncio.current_task()

    def __enter__(self) -> None:
        if self.task is not None:
            self.streams.add(self.task)

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.streams.discard(self.task)


def _stream_slot(request: web.Request) -> contextlib.AbstractContextManager[None]:
    """One of the caller's stream slots, held until the stream ends (429 if none is free)."""
    return request.app[LIMITER].streams.hold(request.get(CALLER, ""))


async def _cancel_streams(app: web.Application) -> None:
    streams: set[asyncio.Task[Any]] = app[STREAMS]
    for task in list(streams):
        task.cancel()


async def list_services(request: web.Request) -> web.Response:
    return _json((await _backend(request).list_services()).to_json())


async def create_service(request: web.Request) -> web.Response:
    service = schemas.validate_service(await _read_json(request))
    return _json(await _backend(request).create_service(service), status=201)


async def get_service(request: web.Request) -> web.Response:
    return _json(await _backend(request).get_service(request.match_info["name"]))


async def replace_service(request: web.Request) -> web.Response:
    service = schemas.validate_service(await _read_json(request))
    return _json(await _backend(request).replace_service(request.match_info["name"], service))


async def delete_service(request: web.Request) -> web.Response:
    return _json(await _backend(request).delete_service(request.match_info["name"]),
                 status=202)


async def list_agents(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", 100, 1, 1000)
    page = await _backend(request).list_agents(limit, request.query.get("cursor") or None)
    return _json(page.to_json())


async def get_agent(request: web.Request) -> web.Response:
    return _json(await _backend(request).get_agent(request.match_info["id"]))


async def drain_agent(request: web.Request) -> web.Response:
    migrate = _bool_param(request, "migrate")
    return _json(await _backend(request).drain_agent(request.match_info["id"], migrate))


async def revoke_agent(request: web.Request) -> web.Response:
    return _json(await _backend(request).revoke_agent(request.match_info["id"]))


async def change_enrollment(request: web.Request) -> web.Response:
    change = schemas.validate("enrollment_change", schemas.ENROLLMENT_CHANGE,
                              await _read_json(request))
    return _json(await _backend(request).change_enrollment(request.match_info["id"], change))


async def list_offers(request: web.Request) -> web.Response:
    return _json((await _backend(request).list_offers()).to_json())


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("Last-Event-ID: must be an integer event id",
                         details={"field": "Last-Event-ID"}) from None
    if value < 0:
        raise BadRequest("Last-Event-ID: must not be negative", details={"field": "Last-Event-ID"})
    return value


async def events(request: web.Request) -> web.StreamResponse:
    after = _last_event_id(request)
    with _stream_slot(request):
        return await _send_events(request, after)


async def _send_events(request: web.Request, after: int | None) -> web.StreamResponse:
    feed = await _backend(request).open_events(after)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await _start(request, resp)
    await resp.write(b"retry: 2000\n\n")
    with _streaming(request):
        try:
            async with contextlib.aclosing(_while_connected(request, feed,
                                                            SSE_KEEPALIVE)) as items:
                async for ev in items:
                    if ev is None:
                        await resp.write(b": keepalive\n\n")
                        continue
                    data = orjson.dumps(ev.data, default=str).decode()
                    await resp.write(
                        f"id: {ev.id}\nevent: {ev.kind}\ndata: {data}\n\n".encode())
        except ConnectionResetError:
            pass
        finally:
            await feed.aclose()  # type: ignore[attr-defined]
    return resp


async def metrics(request: web.Request) -> web.Response:
    from federation.metrics import render

    families = _backend(request).metrics()
    limiter = request.app[LIMITER]
    base: dict[str, Any] = request.app[STATS]
    stats = {**base, "rate_limited": limiter.buckets.refused,
             "streams_refused": limiter.streams.refused,
             "guesses_refused": limiter.failed_logins.refused}
    return web.Response(body=render(families, stats), content_type="text/plain",
                        charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    from federation.openapi import document

    return _json(document(ROUTES, role=_backend(request).role))


# ---------------------------------------------------------------- routing

_STATES = "|".join(schemas.TASK_STATES)
_P_LIMIT = ("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000})
_P_CURSOR = (_P_LIMIT, ("cursor", "query", {"type": "string"}))
_P_BOOL = {"type": "boolean"}
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", health, None, "Liveness of this node"),
    Route("GET", "/v1/info", info, "viewer", "Role, version and identity of this node",
          response=schemas.INFO),
    Route("GET", "/metrics", metrics, "viewer", "Prometheus metrics", stream="text/plain"),
    Route("GET", "/v1/tasks", list_tasks, "viewer", "List tasks",
          response=schemas.page_of(schemas.TASK),
          params=(("state", "query", {"type": "string",
                                      "pattern": f"^({_STATES})(,({_STATES}))*$"}),
                  ("label", "query", {"type": "string",
                                      "pattern": schemas.LABEL_KEY_PATTERN[:-1] + "=.*$"}),
                  ("name", "query", {"type": "string"}), ("agent", "query", {"type": "string"}),
                  ("site", "query", {"type": "string"}),
                  ("order", "query", {"type": "string", "enum": list(TASK_ORDERS),
                                      "default": "id"}), *_P_CURSOR)),
    Route("POST", "/v1/tasks", create_task, "operator", "Submit a task",
          request=schemas.TASK_SPEC, response=schemas.TASK),
    Route("GET", "/v1/tasks/{id}", get_task, "viewer", "One task", response=schemas.TASK),
    Route("DELETE", "/v1/tasks/{id}", kill_task, "operator", "Kill a task",
          response=schemas.TASK),
    Route("GET", "/v1/tasks/{id}/history", task_history, "viewer",
          "A task's recent state changes, oldest first", response=schemas.HISTORY),
    Route("GET", "/v1/tasks/{id}/logs", task_logs, "viewer", "A task's output",
          params=(("stream", "query", {"enum": ["stdout", "stderr"]}),
                  ("tail", "query", {"type": "integer", "minimum": 0, "maximum": 100_000}),
                  ("follow", "query", _P_BOOL)), stream="text/plain"),
    Route("GET", "/v1/services", list_services, "viewer", "List services",
          response=schemas.page_of(schemas.SERVICE_VIEW)),
    Route("POST", "/v1/services", create_service, "operator",
          "Keep N instances of a task running across the fleet", request=schemas.SERVICE,
          response=schemas.SERVICE_VIEW),
    Route("GET", "/v1/services/{name}", get_service, "viewer", "One service",
          response=schemas.SERVICE_VIEW),
    Route("PUT", "/v1/services/{name}", replace_service, "operator",
          "Change a service (instances, constraints, disconnect rules)",
          request=schemas.SERVICE, response=schemas.SERVICE_VIEW),
    Route("DELETE", "/v1/services/{name}", delete_service, "operator",
          "Stop every instance and forget the service", response=schemas.SERVICE_VIEW),
    Route("GET", "/v1/agents", list_agents, "viewer", "List agents",
          response=schemas.page_of(schemas.AGENT), params=_P_CURSOR),
    Route("GET", "/v1/agents/{id}", get_agent, "viewer", "One agent", response=schemas.AGENT),
    Route("POST", "/v1/agents/{id}/drain", drain_agent, "operator",
          "Stop new placements on an agent", response=schemas.AGENT,
          params=(("migrate", "query", _P_BOOL),)),
    Route("POST", "/v1/agents/{id}/revoke", revoke_agent, "admin",
          "Distrust an agent for good: its events are rejected, it gets no placements "
          "(core only; an edge answers 409)", response=schemas.AGENT),
    Route("POST", "/v1/agents/{id}/enrollment", change_enrollment, "admin",
          "Change an agent's enrolled site, name or resources, which agents cannot change "
          "themselves (core only; an edge answers 409)", request=schemas.ENROLLMENT_CHANGE,
          response=schemas.AGENT),
    Route("GET", "/v1/offers", list_offers, "viewer", "Free resources offered by agents",
          response=schemas.page_of(schemas.OFFER)),
    Route("GET", "/v1/events", events, "viewer",
          "Server-sent events; resume with Last-Event-ID", stream="text/event-stream",
          params=(("after", "query", {"type": "integer", "minimum": 0}),
                  ("Last-Event-ID", "header", {"type": "integer", "minimum": 0}))),
    Route("POST", "/v1/artifacts", artifacts.upload, "operator",
          "Upload an artifact (the body is the file, streamed; name, version and labels in "
          "the query or X-Outpost-Artifact-* headers)", response=schemas.ARTIFACT,
          params=(("name", "query", {"type": "string",
                                     "pattern": schemas.ARTIFACT_NAME_PATTERN}),
                  ("version", "query", {"type": "string",
                                        "pattern": schemas.ARTIFACT_VERSION_PATTERN}),
                  ("label", "query", {"type": "string"})),
          upload="application/octet-stream"),
    Route("GET", "/v1/artifacts", artifacts.list_artifacts, "viewer", "List artifacts",
          response=schemas.page_of(schemas.ARTIFACT),
          params=(("name", "query", {"type": "string"}), *_P_CURSOR)),
    Route("GET", "/v1/artifacts/{digest}", artifacts.get_artifact, "viewer",
          "One artifact (at the core: which agents hold it)", response=schemas.ARTIFACT),
    Route("GET", "/v1/artifacts/{digest}/content", artifacts.artifact_content, "viewer",
          "An artifact's bytes", stream="application/octet-stream"),
    Route("DELETE", "/v1/artifacts/{digest}", artifacts.delete_artifact, "operator",
          "Delete an artifact (409 while a task that has not ended uses it)",
          response=schemas.ARTIFACT),
    Route("POST", "/v1/artifacts/{digest}/stage", artifacts.stage_artifact, "operator",
          "Fetch an artifact ahead of use on the agents a selector picks",
          request=schemas.STAGE_SELECTOR),
    Route("GET", "/openapi.json", openapi, None, "This document"),
)


def _error_response(exc: OutpostError) -> web.Response:
    resp = _json(exc.body(), status=exc.status)
    resp.headers.update(exc.headers())
    return resp


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large"}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    stats = request.app[STATS]
    stats["requests"] = stats.get("requests", 0) + 1
    try:
        return await handler(request)
    except OutpostError as exc:
        if STARTED in request:
            return _cut(request, exc)
        resp = _error_response(exc)
        if isinstance(exc, RequestTimeout):
            resp.force_close()  # the rest of a body that came too slowly is not waited for
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            return _error_response(PayloadTooLarge(
                f"body: at most {MAX_BODY} bytes", details={"limit": MAX_BODY}))
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason if exc.status != 404 else f"no route {request.method} {request.path}"
        resp = _json(error_body(code, message), status=exc.status)
        if "Allow" in exc.headers:  # RFC 9110: a 405 says which methods the resource has
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        stats["errors"] = stats.get("errors", 0) + 1
        if STARTED in request:
            return _cut(request, exc)
        log.exception("unhandled error", extra={"path": request.path})
        return _json(error_body("internal", "internal error; see the node's log"), status=500)


def _auth_middleware(roles: dict[tuple[str, str], str | None]) -> Any:
    @web.middleware
    async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        key = (request.method, resource.canonical if resource else "")
        needed = roles.get(key, "viewer") if resource else None
        if needed is not None:
            # The header only: a token in the address ends up in access logs, proxy logs and
            # browser history (SECURITY.md). The dashboard reads its event stream with fetch.
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                token = ""
            if not token:
                raise Unauthorized("a bearer token is required (Authorization: Bearer ...); "
                                   "a token in the query string is not accepted")
            token = token.strip()
            guesses = request.app[LIMITER].failed_logins
            address = request.remote or "?"
            guesses.check(address)
            role = request.app[AUTH].role_for(token)
            if role is None:
                stats = request.app[STATS]
                stats["unknown_tokens"] = stats.get("unknown_tokens", 0) + 1
                log.info("unknown or revoked token from %s", address,
                         extra={"remote": address, "path": request.path})
                guesses.take(address)
                raise Unauthorized("unknown or revoked token")
            # Counted only once the token is known: the buckets stay as few as the tokens.
            request[CALLER] = caller = digest(token)
            request.app[LIMITER].buckets.take(caller)
            if not role_allows(role, needed):
                raise Forbidden(f"role {role!r} may not do this; needs {needed!r}",
                                details={"role": role, "needed": needed})
            request[ROLE] = role
        return await handler(request)

    return _auth


def build_app(
    backend: Backend,
    auth: TokenAuth,
    *,
    extra_routes: list[web.RouteDef] | None = None,
    public_paths: tuple[str, ...] = (),
    limits: ApiLimits | None = None,
    artifact_service: artifacts.ArtifactService | None = None,
    middlewares: list[Any] | None = None,
) -> web.Application:
    """The API app over ``backend``. ``extra_routes`` add role-specific pages (``/``);
    ``limits`` are the per-token request rate and open-stream cap (defaults: ``ApiLimits()``);
    ``middlewares`` run after authentication (a hub standby's forwarding of writes)."""
    roles: dict[tuple[str, str], str | None] = {(r.method, r.path): r.role for r in ROUTES}
    for path in public_paths:
        roles[("GET", path)] = None
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[_errors, _auth_middleware(roles), *(middlewares or [])])
    app[BACKEND] = backend
    if artifact_service is not None:
        app[artifacts.ARTIFACTS] = artifact_service
    app[AUTH] = auth
    app[LIMITER] = Limiter(limits or ApiLimits())
    app[STATS] = {"started": time.time()}
    app[STREAMS] = set()
    app.on_shutdown.append(_cancel_streams)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
    if extra_routes:
        app.router.add_routes(extra_routes)
    return app
