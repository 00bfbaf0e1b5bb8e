"""An HTTP latency probe in a process of its own, for a bench whose own event loop is busy.

``bench.storm`` runs its 1,000 simulated agents in its own process: a request timed from
there would count the simulator's loop delays as the hub's. This process does nothing but
time GETs, one in flight, cycling through its URLs with a short pause between rounds, until
its stdin closes; then it prints one JSON line: ``{"url": {"seconds": [...], "at": [...],
"errors": {...}}}``, ``at`` being when each timed GET began, in seconds from the probe's start.

Usage: ``python -m bench.apiprobe TOKEN URL [URL ...]``
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp

PAUSE_S = 0.02  # between rounds: a steady trickle, not a load of its own
REQUEST_TIMEOUT_S = 60.0


async def probe(token: str, urls: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {url: {"seconds": [], "at": [], "errors": {}} for url in urls}
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_reader(0, lambda: os.read(0, 1) or stop.done() or stop.set_result(None))
    began = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"},
                                     timeout=timeout) as session:
        while not stop.done():
            for url in urls:
                t0 = time.perf_counter()
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as err:
                    status = type(err).__name__
                if status == 200:
                    out[url]["seconds"].append(time.perf_counter() - t0)
                    out[url]["at"].append(t0 - began)
                else:
                    errors = out[url]["errors"]
                    errors[str(status)] = errors.get(str(status), 0) + 1
            await asyncio.sleep(PAUSE_S)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m bench.apiprobe TOKEN URL [URL ...]", file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(probe(argv[0], argv[1:]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
