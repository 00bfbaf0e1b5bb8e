"""Once per site (issue 14): the bytes that cross a site's uplink while its agents fetch one
artifact, with site peers (``artifact_site_peers``) on and, in the same run, off.

One nats-server (JetStream domain ``hub``, a leafnodes port), one hub on it, a site leaf node
from the bundle's template whose link to the hub goes through a TCP relay that counts every
byte (``bench/relay.py``), and ``BENCH_SITE_AGENTS`` (5) agents of one site on the leaf. An
artifact of ``BENCH_SITE_MB`` (32) MB of random bytes is pushed at the hub; every agent is
asked to stage it at once; the figure is the uplink's bytes until all hold it, in units of the
artifact's size (both directions, with the agents' ordinary traffic meanwhile). The raw limit
beside it is the same fleet with peers off, which is what every agent fetching alone costs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import AgentProc, Api, Row, format_table, progress, wait_for
from bench.federation import HubProc
from bench.relay import Uplink
from core_hub import bundle
from federation.natsd import NatsServer, find_binary

AGENTS = int(os.environ.get("BENCH_SITE_AGENTS", "5"))
SIZE_MB = int(os.environ.get("BENCH_SITE_MB", "32"))
SITE = "shop"
MB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(conf: Path) -> subprocess.Popen[bytes]:
    with (conf.parent / "leaf.log").open("ab") as log:
        return subprocess.Popen([find_binary(), "-c", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT)


async def _leaf(base: Path, hub_leaf_port: int) -> tuple[subprocess.Popen[bytes], str]:
    port, http = _free_port(), _free_port()
    conf = base / "leaf" / "nats-leaf.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(bundle.leaf_conf(SITE, f"nats-leaf://127.0.0.1:{hub_leaf_port}",
                                     data_dir=str(conf.parent), listen=f"127.0.0.1:{port}",
                                     http=f"127.0.0.1:{http}"))
    proc = _spawn(conf)

    async def linked() -> bool:
        try:
            async with aiohttp.ClientSession() as s, \
                    s.get(f"http://127.0.0.1:{http}/leafz") as resp:
                return bool((await resp.json()).get("leafnodes"))
        except (aiohttp.ClientError, ValueError):
            return False

    await wait_for("the site's leaf to link to the hub", linked)
    return proc, f"nats://127.0.0.1:{port}"


async def _push(hub: HubProc, data: bytes) -> str:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {hub.token}"}) as s:
        async with s.post(f"{hub.url}/v1/artifacts?name=siteapp&version=1", data=data) as resp:
            body = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"push: {resp.status} {body}")
            return str(body["digest"])


async def _round(base: Path, hub: HubProc, leaf_url: str, uplink: Uplink, digest: str,
                 peers: bool) -> tuple[float, float]:
    """(bytes over the uplink, seconds) until every agent of the site holds ``digest``."""
    mode = "peers" if peers else "alone"
    agents = [await AgentProc(base / f"{mode}{i}", [
        "--nats", leaf_url, "--join-token", hub.join_token(), "--site", SITE,
        "--name", f"{mode}{i}", *(["--artifact-site-peers"] if peers else [])]).start()
        for i in range(AGENTS)]
    try:
        apis = [Api(a.url, a.token) for a in agents]
        for api in apis:
            await api.__aenter__()
        try:
            for api in apis:
                async def enrolled(api: Api = api) -> bool:
                    _, info = await api.call("GET", "/v1/info")
                    return bool(info.get("link", {}).get("enrolled"))

                await wait_for("an agent to enroll through the leaf", enrolled, within=60)
            await asyncio.sleep(2.0)  # past the first offers and snapshots
            before, start = uplink.carried, time.perf_counter()
            for status, body in await asyncio.gather(*(
                    api.call("POST", f"/v1/artifacts/{digest}/stage", {}) for api in apis)):
                if status != 202:
                    raise RuntimeError(f"stage: {status} {body}")
            for api in apis:
                async def held(api: Api = api) -> bool:
                    return (await api.call("GET", f"/v1/artifacts/{digest}"))[0] == 200

                await wait_for("every agent to hold the artifact", held, within=300)
            return uplink.carried - before, time.perf_counter() - start
        finally:
            for api in apis:
                await api.__aexit__(None, None, None)
    finally:
        for agent in agents:
            agent.stop()


async def _main(base: Path) -> list[Row]:
    leaf_port = _free_port()
    nats = NatsServer(base / "nats", js_domain=bundle.HUB_JS_DOMAIN,
                      config_extra=f'leafnodes {{ listen: "127.0.0.1:{leaf_port}" }}')
    await nats.start()
    hub = await HubProc(base / "hub", nats.url).start()
    uplink = Uplink(leaf_port)
    leaf, leaf_url = await _leaf(base, uplink.port)
    try:
        data = os.urandom(SIZE_MB * MB)  # incompressible: the link cannot shrink it
        digest = await _push(hub, data)
        progress(f"sitefetch: {AGENTS} agents, peers off")
        off_bytes, off_s = await _round(base, hub, leaf_url, uplink, digest, peers=False)
        progress(f"sitefetch: {AGENTS} agents, peers on")
        on_bytes, on_s = await _round(base, hub, leaf_url, uplink, digest, peers=True)
    finally:
        leaf.terminate()
        leaf.wait(10)
        uplink.close()
        hub.stop()
        await nats.stop()
    on_x, off_x = on_bytes / len(data), off_bytes / len(data)
    return [
        Row(f"uplink bytes while {AGENTS} agents of a site fetch {SIZE_MB} MB (peers on)",
            on_x, "x size", off_x, "the same agents with peers off", "about 1x (once)",
            on_x <= 1.2, 2, "artifacts"),
        Row(f"time until all {AGENTS} hold it (peers on)", on_s, "s", off_s,
            "the same agents with peers off", "", None, 2, "artifacts"),
    ]


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="outpost-bench-sitefetch-") as tmp:
        return asyncio.run(_main(Path(tmp)))


if __name__ == "__main__":
    print(format_table(run()))
