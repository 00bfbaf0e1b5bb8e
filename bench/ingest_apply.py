"""The hub's apply alone: ``bench.ingest``'s traffic through the real ``Ingest`` and
``HubStore``, with no NATS in the run, next to verify+decode of the same messages.

``bench.ingest`` measures ingest end to end, but on this shared 2-core box its figures (and
its raw floors) move by 15-35 % between runs, so a change worth 10-20 % to the view cannot be
told from noise there. This one takes NATS and the other processes out: the same 1,000 agents'
signed batches of 1-10 events (``bench.ingest.SimAgent``), enrolled straight into a real
``HubStore`` on disk, go through ``Ingest.apply_chunk`` in the hub's fetch-sized slices (256
messages, cut into transactions as the hub cuts them: ``Ingest.chunks``), with its verifier
thread and the store's checkpointer thread running as in the hub. Each message carries the
JetStream reply subject a fetch would give it (stream seq, delivery count); nothing is acked
(no server). The raw limit
is the per-message work any ingest must do, on one thread, on the same messages:
``wire.open_envelope`` against the agent's key and one ``orjson.loads`` per event body.

Figures: events/s (wall), the main thread's and the whole process's CPU per event.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import tempfile
import time
from pathlib import Path

from nats.aio.msg import Msg

from bench.common import Row, format_table, progress
from bench.ingest import AGENTS, BATCHES, SimAgent, fleet_traffic
from bench.rawjs import Message, verifier
from core_hub.ingest import Ingest
from core_hub.store import HubStore

FETCH = 256  # Ingest's default batch

ApplyRow = functools.partial(Row, area="ingest apply")


def as_fetched(msgs: list[Message]) -> list[Msg]:
    """``msgs`` as a pull consumer delivers them the first time (stream seqs 1..n)."""
    now = time.time_ns()
    return [Msg(_client=None, subject=m.subject, data=m.data,  # type: ignore[arg-type]
                reply=f"$JS.ACK.OUTPOST_EVENTS.bench.1.{seq}.{seq}.{now}.0")
            for seq, m in enumerate(msgs, start=1)]


def verify_decode_rate(fetched: list[Msg], keys: dict[str, bytes], events: int) -> float:
    """Events/s of ``bench.rawjs``'s verify+decode work (open_envelope + one orjson.loads per
    event body) over the same messages, on this thread."""
    work = verifier(keys, decode=True)
    t0 = time.perf_counter()
    for msg in fetched:
        work(msg)
    return events / (time.perf_counter() - t0)


def run() -> list[Row]:
    """The figures (about 30 s with 1,000 agents); a failure is a row, as in every bench."""
    try:
        return _run()
    except Exception as exc:  # a bench reports, it does not stop
        progress(f"ingest apply failed: {exc!r}")
        return [ApplyRow("ingest apply: FAILED", f"{type(exc).__name__}: {exc}"[:100])]


def _run() -> list[Row]:
    rng = random.Random(12)
    agents = [SimAgent(i, rng) for i in range(AGENTS)]
    progress(f"ingest apply: signing {AGENTS} x {BATCHES} batches")
    msgs = fleet_traffic(agents, BATCHES, rng)
    total = sum(m.events for m in msgs)
    keys = {a.agent_id: a.signer.public for a in agents}
    fetched = as_fetched(msgs)
    raw = verify_decode_rate(fetched, keys, total)
    with tempfile.TemporaryDirectory(prefix="outpost-bench-apply-") as tmp:
        store = HubStore(Path(tmp) / "hub.db", loop_writer=True)
        try:
            for a in agents:
                store.enroll_agent(a.agent_id, a.signer.public, name=f"ingest-{a.index}",
                                   site=a.site, labels={"zone": "bench"},
                                   resources={"cpus": 4, "mem_mb": 4096, "disk_mb": 0},
                                   version="bench", now=time.time())
            ingest = Ingest(None, store)  # type: ignore[arg-type]  # _process needs no server
            progress(f"ingest apply: {len(fetched)} msgs ({total} events) into the view")
            t0, main0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
            asyncio.run(_apply_all(ingest, fetched))
            wall = time.perf_counter() - t0
            main, proc = time.thread_time() - main0, time.process_time() - proc0
            applied, wal = ingest.stats.applied_events, _size(Path(tmp) / "hub.db-wal")
            asyncio.run(ingest.stop())  # never started: only its verifier thread to end
        finally:
            store.close()
    rate = total / wall
    return [
        ApplyRow(f"hub apply without NATS, {AGENTS} agents' small batches", rate, "events/s",
                 raw, f"open_envelope + orjson.loads per event, same {len(msgs)} msgs, "
                      "one thread", digits=0),
        ApplyRow("  main thread CPU per event", 1e6 * main / total, "us", digits=1),
        ApplyRow("  process CPU per event (main, verifier, checkpointer)",
                 1e6 * proc / total, "us", raw_what=f"on {os.cpu_count()} cores", digits=1),
        ApplyRow("  checks", f"applied {applied} == sent {total}: {applied == total}; "
                             f"WAL at the end {wal / 1e6:.0f} MB"),
    ]


async def _apply_all(ingest: Ingest, fetched: list[Msg]) -> None:
    """Every message, a fetch at a time, as ``Ingest._run`` applies a fetch: cut into chunks,
    the WAL let start again when it asks to be (no acks: there is no server)."""
    for start in range(0, len(fetched), FETCH):
        fetch, at = fetched[start:start + FETCH], 0
        while at < len(fetch):
            await ingest.before_chunk()
            chunk = ingest.chunks.take(fetch, at)
            at += len(chunk)
            ingest.apply_chunk(chunk)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


if __name__ == "__main__":
    print(format_table(run()))
