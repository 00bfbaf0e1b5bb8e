"""The artifact routes of the one API (``/v1/artifacts``), at an edge and at the core.

An upload is streamed: the node's ``ArtifactService`` takes the body piece by piece as it
arrives, never whole in memory, bounded by ``max_upload_bytes`` (413) and by a read timeout
(408). The core publishes the pieces as object store chunks while hashing them, then the
manifest signed by the hub's key; an edge writes them to its cache, where the artifact serves
local tasks with no core at all. Artifacts are addressed by ``sha256:<hex>``.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from federation import schemas
from federation.backend import Page
from federation.errors import BadRequest, Invalid, PayloadTooLarge, RequestTimeout, Unavailable

READ_TIMEOUT_S = 30.0  # a body that stops coming for this long is cut
_HEX = re.compile(r"^[0-9a-f]{64}$")


class ArtifactService(Protocol):
    """What the artifact routes need from a node (``edge_agent`` / ``core_hub`` artifacts)."""

    max_upload_bytes: int

    async def add(self, pieces: AsyncIterator[bytes], *, name: str, version: str,
                  labels: dict[str, str]) -> dict[str, Any]:
        """Take an upload as it arrives (``pieces`` raise the route's 4xx errors: too large,
        too slow) and return the artifact it made."""
        ...

    async def list(self, name: str | None, limit: int, cursor: str | None) -> Page: ...

    async def get(self, sha: str) -> dict[str, Any]: ...

    async def content(self, sha: str) -> tuple[Path, bool]:
        """The file to send and whether to remove it after (a core fetches into the spool)."""
        ...

    async def delete(self, sha: str) -> dict[str, Any]: ...

    async def stage(self, sha: str, selector: dict[str, Any]) -> dict[str, Any]: ...


ARTIFACTS = web.AppKey("artifacts", ArtifactService)


def _service(request: web.Request) -> ArtifactService:
    service = request.app.get(ARTIFACTS)
    if service is None:
        raise Unavailable("this node has no artifact store")
    return service


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status,
                        content_type="application/json")


def parse_digest(raw: str) -> str:
    """The hex of ``sha256:<hex>`` (or of a bare hex digest), or ``BadRequest``."""
    hexpart = raw.removeprefix("sha256:")
    if not _HEX.match(hexpart):
        raise BadRequest("digest: must be sha256:<64 lowercase hex digits>",
                         details={"field": "digest"})
    return hexpart


def _upload_fields(request: web.Request) -> tuple[str, str, dict[str, str]]:
    q, h = request.query, request.headers
    name = q.get("name") or h.get("X-Outpost-Artifact-Name") or ""
    version = q.get("version") or h.get("X-Outpost-Artifact-Version") or ""
    if not re.match(schemas.ARTIFACT_NAME_PATTERN, name):
        raise Invalid("name: required; letters, digits, . _ - (at most 128)",
                      details={"field": "name"})
    if not re.match(schemas.ARTIFACT_VERSION_PATTERN, version):
        raise Invalid("version: required; letters, digits, . _ + - (at most 64)",
                      details={"field": "version"})
    labels: dict[str, str] = {}
    for pair in [*q.getall("label", []), *h.getall("X-Outpost-Artifact-Label", [])]:
        key, sep, value = pair.partition("=")
        if not sep or not re.match(schemas.LABEL_KEY_PATTERN, key) or len(value) > 256:
            raise Invalid("label: must look like key=value, with a valid label key",
                          details={"field": "label"})
        labels[key] = value
    if len(labels) > 32:
        raise Invalid("label: at most 32", details={"field": "label"})
    return name, version, labels


async def upload(request: web.Request) -> web.Response:
    service = _service(request)
    name, version, labels = _upload_fields(request)
    limit = service.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"artifact: at most {limit} bytes", details={"limit": limit})
    body = await service.add(_pieces(request, limit), name=name, version=version,
                             labels=labels)
    return _json(body, status=201)


async def _pieces(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """The request body in pieces of up to 1 MB, as it comes; 4xx when too big, too slow or
    empty."""
    size = 0
    while True:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                piece = await request.content.readany()
        except TimeoutError:
            raise RequestTimeout(f"artifact body: nothing for {READ_TIMEOUT_S:g} s",
                                 details={"limit_s": READ_TIMEOUT_S}) from None
        if not piece:
            break
        size += len(piece)
        if size > limit:
            raise PayloadTooLarge(f"artifact: at most {limit} bytes", details={"limit": limit})
        yield piece
    if size == 0:
        raise BadRequest("artifact: the body is empty")


async def list_artifacts(request: web.Request) -> web.Response:
    raw = request.query.get("limit") or "100"
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise BadRequest("limit: must be an integer between 1 and 1000",
                         details={"field": "limit"})
    name = request.query.get("name") or None
    page = await _service(request).list(name, int(raw), request.query.get("cursor") or None)
    return _json(page.to_json())


async def get_artifact(request: web.Request) -> web.Response:
    return _json(await _service(request).get(parse_digest(request.match_info["digest"])))


async def artifact_content(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    sha = parse_digest(request.match_info["digest"])
    path, remove = await service.content(sha)
    try:
        resp = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(path.stat().st_size), "ETag": f'"sha256:{sha}"'})
        from federation.app import _start

        await _start(request, resp)
        fd = os.open(path, os.O_RDONLY)
        try:
            while piece := os.read(fd, 256 * 1024):
                await resp.write(piece)
        finally:
            os.close(fd)
        await resp.write_eof()
        return resp
    finally:
        if remove:
            path.unlink(missing_ok=True)


async def delete_artifact(request: web.Request) -> web.Response:
    return _json(await _service(request).delete(parse_digest(request.match_info["digest"])))


async def stage_artifact(request: web.Request) -> web.Response:
    from federation.app import _read_json

    selector = schemas.validate("stage", schemas.STAGE_SELECTOR, await _read_json(request))
    body = await _service(request).stage(parse_digest(request.match_info["digest"]), selector)
    return _json(body, status=202)
