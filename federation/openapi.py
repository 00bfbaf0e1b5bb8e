"""Builds ``/openapi.json`` from the route table and the same schemas that validate requests."""

from __future__ import annotations

import re
from typing import Any

from federation import __version__, schemas

_STATUS_TEXT = {400: "Bad request", 401: "No or unknown token", 403: "Role may not do this",
                404: "Not found", 408: "Body sent too slowly", 409: "Conflict",
                413: "Body too large",
                422: "A field is invalid",
                429: "Over a per-token limit (request rate or open streams)",
                503: "Unavailable now",
                507: "The node's disk is full; nothing was stored"}


def _operation(route: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_{route.handler.__name__}",
        "parameters": [],
        "responses": {},
    }
    for name in re.findall(r"{(\w+)}", route.path):
        op["parameters"].append({"name": name, "in": "path", "required": True,
                                 "schema": {"type": "string", "minLength": 1}})
    for name, where, schema in route.params:
        op["parameters"].append({"name": name, "in": where, "required": False,
                                 "schema": schema})
    if route.request is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": route.request}}}
    if getattr(route, "upload", None):
        op["requestBody"] = {"required": True, "content": {
            route.upload: {"schema": {"type": "string", "format": "binary"}}}}
    created = ("/v1/tasks", "/v1/services", "/v1/artifacts")
    accepted = (("DELETE", "/v1/services/{name}"), ("POST", "/v1/artifacts/{digest}/stage"))
    ok = "201" if route.method == "POST" and route.path in created \
        else "202" if (route.method, route.path) in accepted else "200"
    if route.stream:
        op["responses"][ok] = {"description": "OK",
                               "content": {route.stream: {"schema": {"type": "string"}}}}
    else:
        op["responses"][ok] = {"description": "OK", "content": {
            "application/json": {"schema": route.response or {"type": "object"}}}}
    if route.method == "DELETE" and route.path == "/v1/tasks/{id}":
        op["responses"]["202"] = {"description": "Kill under way", "content": {
            "application/json": {"schema": route.response or {"type": "object"}}}}
    errors = [400, 404, 409, 413, 422, 503]
    if route.role is not None:  # only a token is limited: /v1/health never answers 429
        errors[1:1] = [401, 403]
        errors.insert(-1, 429)
    if route.request is not None or getattr(route, "upload", None):
        errors.append(408)
    if route.method in ("POST", "PUT", "PATCH", "DELETE"):
        errors.append(507)
    for code in errors:
        op["responses"][str(code)] = {"description": _STATUS_TEXT[code], "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if 429 in errors:
        op["responses"]["429"]["headers"] = {"Retry-After": {
            "description": "Seconds until the request rate allows another request (absent "
                           "when the limit is on open streams)",
            "required": False, "schema": {"type": "integer", "minimum": 1}}}
    if route.role is not None:
        op["security"] = [{"bearer": []}]
    return op


def document(routes: tuple[Any, ...], role: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Outpost API", "version": __version__,
                 "description": f"The same API at every edge and at the core (served by: {role})"},
        "paths": paths,
        "components": {
            "schemas": {"Error": schemas.ERROR, "TaskSpec": schemas.TASK_SPEC,
                        "Task": schemas.TASK, "Agent": schemas.AGENT, "Offer": schemas.OFFER},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
