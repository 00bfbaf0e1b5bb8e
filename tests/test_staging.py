"""``Stager.resolve`` against a real nats-server: an artifact is used only with the hub's
signature on its manifest and bytes that hash to it; the cache evicts what no live task uses
and says so when everything is in use."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import KeyValueConfig

from edge_agent.artifacts import ArtifactCache, CacheFull
from edge_agent.staging import ArtifactRefused, ArtifactUnavailable, Stager
from edge_agent.store import Store
from federation import manifest, objstore
from federation.natsd import NatsServer
from federation.schemas import validate_task_spec
from federation.wire import Signer
from tests.nats_fixtures import connect

HUB = Signer(os.urandom(32))


async def _publish(js: Any, data: bytes, name: str, version: str, *,
                   signer: Signer = HUB, object_bytes: bytes | None = None) -> str:
    """Push like the hub does: the object under its sha256, the signed manifest twice."""
    sha = hashlib.sha256(data).hexdigest()
    obs = await js.object_store(objstore.BUCKET)
    await obs.put(sha, io.BytesIO(data if object_bytes is None else object_bytes))
    kv = await js.key_value(manifest.BUCKET)
    raw = manifest.sign(manifest.new_manifest(name, version, sha, len(data)), signer)
    await kv.put(manifest.digest_key(sha), raw)
    await kv.put(manifest.name_key(name, version), raw)
    return sha


@pytest.fixture
async def env(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await objstore.ensure_bucket(js)
        await js.create_key_value(KeyValueConfig(bucket=manifest.BUCKET, direct=True))
        store = Store(tmp_path / "agent.db")
        cache = ArtifactCache(store, tmp_path / "artifacts", 1 << 20)
        stager = Stager(cache, nc=lambda: nc, hub_key=lambda: HUB.public)
        try:
            yield {"js": js, "nc": nc, "store": store, "cache": cache, "stager": stager}
        finally:
            await stager.stop()
            store.close()


async def test_resolve_by_digest_and_by_name(env: dict[str, Any]) -> None:
    data = b"#!/bin/sh\necho hello\n" * 1000
    sha = await _publish(env["js"], data, "hello", "1.0")
    path = await env["stager"].resolve({"digest": f"sha256:{sha}"})
    assert path.read_bytes() == data
    assert env["stager"].fetches == 1
    again = await env["stager"].resolve({"name": "hello", "version": "1.0"})
    assert again == path and env["stager"].fetches == 1  # from the cache
    row = env["cache"].get(sha)
    assert row["signed"] and row["origin"] == "core"


async def test_manifest_not_signed_by_the_hub_is_refused(env: dict[str, Any]) -> None:
    sha = await _publish(env["js"], b"payload", "evil", "1", signer=Signer(os.urandom(32)))
    with pytest.raises(ArtifactRefused, match="not signed by the hub"):
        await env["stager"].resolve({"digest": f"sha256:{sha}"})
    with pytest.raises(ArtifactRefused, match="not signed by the hub"):
        await env["stager"].resolve({"name": "evil", "version": "1"})
    assert env["cache"].get(sha) is None and not env["cache"].path(sha).exists()


async def test_object_with_other_bytes_than_the_manifest_is_refused(
        env: dict[str, Any]) -> None:
    sha = await _publish(env["js"], b"the real thing", "app", "2",
                         object_bytes=b"something else entirely")
    with pytest.raises(ArtifactRefused, match="not the signed manifest's"):
        await env["stager"].resolve({"digest": f"sha256:{sha}"})
    assert env["cache"].get(sha) is None


async def test_corrupted_chunk_is_refused(env: dict[str, Any]) -> None:
    """One chunk replaced in the stream (deleted, a changed copy appended): the bytes no
    longer hash to the digest, and the file is not kept."""
    data = os.urandom(3 * objstore.CHUNK_SIZE)
    sha = await _publish(env["js"], data, "big", "1")
    meta = await objstore.read_meta(env["nc"], sha)
    assert meta is not None
    subject = objstore.chunk_subject(meta.nuid)
    second = await env["js"].get_msg(objstore.STREAM, seq=2)
    assert second.subject == subject
    await env["js"].delete_msg(objstore.STREAM, 2)
    await env["js"].publish(subject, b"X" + second.data[1:])
    with pytest.raises(ArtifactRefused, match="do not match its digest"):
        await env["stager"].resolve({"digest": f"sha256:{sha}"})
    assert not env["cache"].path(sha).exists()
    assert not list(env["cache"].parts.iterdir())


async def test_not_pushed_yet_is_unavailable_not_refused(env: dict[str, Any]) -> None:
    with pytest.raises(ArtifactUnavailable, match="not pushed yet"):
        await env["stager"].resolve({"name": "later", "version": "1"})


async def test_full_cache_evicts_unused_and_refuses_when_all_in_use(
        env: dict[str, Any]) -> None:
    store, cache, stager = env["store"], env["cache"], env["stager"]
    a = await _publish(env["js"], os.urandom(600 * 1024), "a", "1")
    b = await _publish(env["js"], os.urandom(600 * 1024), "b", "1")
    c = await _publish(env["js"], os.urandom(600 * 1024), "c", "1")
    spec = validate_task_spec({"name": "user", "command": ["true"]})
    store.insert_task("t1", spec, origin="edge", state="staging", reason=None)
    await stager.resolve({"digest": f"sha256:{a}"})  # not bound to a task: evictable
    await stager.resolve({"digest": f"sha256:{b}"}, task_id="t1")
    assert cache.get(a) is None and cache.evicted == 1  # a went to make room for b
    with pytest.raises(ArtifactUnavailable, match="artifact cache full"):
        await stager.resolve({"digest": f"sha256:{c}"})
    with pytest.raises(CacheFull) as full:
        cache.make_room(600 * 1024)
    assert full.value.status == 409 and full.value.details["limit"] == "artifact_cache_mb"
    store.update_task("t1", state="finished")
    await stager.resolve({"digest": f"sha256:{c}"})  # b is no longer in use: evicted
    assert cache.get(b) is None and cache.get(c) is not None


async def test_cache_survives_a_restart(env: dict[str, Any], tmp_path: Path) -> None:
    sha = await _publish(env["js"], b"kept", "kept", "1")
    await env["stager"].resolve({"digest": f"sha256:{sha}"})
    (env["cache"].blobs / ("f" * 64)).write_bytes(b"half made, no row")
    again = ArtifactCache(env["store"], tmp_path / "artifacts", 1 << 20)
    assert again.get(sha) is not None and again.path(sha).read_bytes() == b"kept"
    assert not (again.blobs / ("f" * 64)).exists()
    assert json.loads(json.dumps(again.page(None, 10, None).to_json()))["items"][0]["name"] \
        == "kept"
