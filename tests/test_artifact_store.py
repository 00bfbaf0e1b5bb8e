"""The artifact store's bytes over real JetStream: streamed put, a get to a file that resumes
from its last chunk after nats-server is SIGKILLed mid-fetch, and signed manifests."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from federation import manifest, objstore
from federation.natsd import NatsServer
from federation.wire import Signer
from tests.nats_fixtures import connect


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


async def test_put_then_fetch_to_file(nats_server: NatsServer, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    sha = _random_file(src, 3 * objstore.CHUNK_SIZE + 17)
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await objstore.ensure_bucket(js)
        meta = await objstore.put_file(js, sha, src)
        assert meta.sha256 == sha and meta.chunks == 4
        again = await objstore.put_file(js, sha, src)  # same name, same bytes: kept
        assert again.nuid == meta.nuid
        fetcher = objstore.Fetcher(nc)
        seen: list[int] = []
        got = await fetcher.fetch(sha, tmp_path / "out.part",
                                  lambda done, size: seen.append(done))
        assert got.sha256 == sha
        assert (tmp_path / "out.part").read_bytes() == src.read_bytes()
        assert seen[-1] == src.stat().st_size and fetcher.received == src.stat().st_size
        assert not (tmp_path / "out.part.json").exists()
        with pytest.raises(objstore.FetchError) as missing:
            await fetcher.fetch("0" * 64, tmp_path / "none.part")
        assert not missing.value.retry


async def test_fetch_resumes_after_nats_is_killed(tmp_path: Path) -> None:
    """SIGKILL nats-server mid-fetch, start it again on the same port and store: the fetch
    goes on from the chunk after the last one written; fewer than two chunks come twice."""
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        src = tmp_path / "src.bin"
        size = 24 * objstore.CHUNK_SIZE
        sha = _random_file(src, size)
        async with connect(server.url) as nc:
            js = nc.jetstream()
            await objstore.ensure_bucket(js)
            await objstore.put_file(js, sha, src)
            # 1 MB/s: the fetch of 3 MB takes about 3 s, so the kill lands in the middle.
            fetcher = objstore.Fetcher(nc, rate_kbps=1024, request_timeout_s=1.0)
            half = asyncio.Event()
            part = tmp_path / "out.part"
            fetch = asyncio.create_task(fetcher.fetch(
                sha, part, lambda done, _: half.set() if done >= size // 3 else None))
            await asyncio.wait_for(half.wait(), 30)
            server.kill()
            await asyncio.sleep(0.5)
            assert not fetch.done()
            await server.start()
            meta = await asyncio.wait_for(fetch, 60)
        assert meta.sha256 == sha
        assert part.read_bytes() == src.read_bytes()
        again = fetcher.received - size
        assert 0 <= again < 2 * objstore.CHUNK_SIZE, f"fetched {again} bytes twice"
    finally:
        await server.stop()


async def test_fetch_resumes_from_the_file_after_a_crash(nats_server: NatsServer,
                                                        tmp_path: Path) -> None:
    """A fresh Fetcher (an agent restarted) goes on from the progress file beside the part."""
    src = tmp_path / "src.bin"
    size = 10 * objstore.CHUNK_SIZE
    sha = _random_file(src, size)
    part = tmp_path / "out.part"
    async with connect(nats_server.url) as nc:
        js = nc.jetstream()
        await objstore.ensure_bucket(js)
        await objstore.put_file(js, sha, src)
        first = objstore.Fetcher(nc, batch=1, rate_kbps=1024)  # slow enough to cut
        four = asyncio.Event()
        task = asyncio.create_task(first.fetch(
            sha, part, lambda done, _: four.set() if done >= 4 * objstore.CHUNK_SIZE else None))
        await asyncio.wait_for(four.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        done_before = part.stat().st_size
        assert 0 < done_before < size
        second = objstore.Fetcher(nc)
        await second.fetch(sha, part)
        assert part.read_bytes() == src.read_bytes()
        assert second.received == size - done_before


def test_manifest_signed_by_the_hub_only(tmp_path: Path) -> None:
    hub, other = Signer(os.urandom(32)), Signer(os.urandom(32))
    m = manifest.new_manifest("app", "1.0", "ab" * 32, 5, {"tier": "web"})
    raw = manifest.sign(m, hub)
    assert manifest.open_signed(raw, hub.public) == m
    with pytest.raises(manifest.ManifestRejected, match="not signed by the hub"):
        manifest.open_signed(manifest.sign(m, other), hub.public)
    tampered = raw.replace(b'\\"size\\": 5', b'\\"size\\": 6')
    assert tampered != raw
    with pytest.raises(manifest.ManifestRejected, match="not signed by the hub"):
        manifest.open_signed(tampered, hub.public)
    with pytest.raises(manifest.ManifestRejected):
        manifest.open_signed(b"{}", hub.public)
