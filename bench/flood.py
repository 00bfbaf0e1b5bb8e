"""A flood through the public enroll login, against a real hub (embedded NATS, least privilege).

Anyone may log in as the public enroll user, so this is what any stranger can do. A flooder
process sends bogus enrollment requests (fresh keys, a made-up join token) as fast as it can,
for ``FLOOD_S`` seconds. Meanwhile ``bench.apiprobe``, in a process of its own, times
``GET /v1/tasks`` on the hub. The raw figure is the same GET from the same probe with no flood,
in the same run. Also reported: the hub's CPU during the flood, the requests the hub read
(answered, refused, shed, dropped) per request sent, and the bytes it logged.

Usage: ``python -m bench.flood`` (also part of ``make bench``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from bench.common import ROOT, Row, format_table, percentile, progress, url_once_serving

FLOOD_S = 10.0
IDLE_S = 10.0
KEYS = 50  # distinct bogus requests, sent round and round


def flood(nats_url: str, account: str, seconds: float) -> int:
    """Send bogus enrollment requests as the public enroll user; the number sent."""
    import nats

    from federation import subjects, wire
    from federation.identity import id_from_public_key
    from federation.natscreds import enroll_credentials

    bogus = f"opj_{'x' * 43}.{account}"
    signers = [wire.Signer(os.urandom(32)) for _ in range(KEYS)]
    requests = [(f"_INBOX.{id_from_public_key(s.public)}.x",
                 wire.enroll_request(s, bogus, name=f"n{i}", site="s"))
                for i, s in enumerate(signers)]

    async def run() -> int:
        nc = await nats.connect(nats_url, **enroll_credentials(account).connect_options())
        sent = 0
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            for reply, data in requests:
                await nc.publish(subjects.ENROLL, data, reply=reply)
            sent += len(requests)
            if sent % (20 * KEYS) == 0:
                await nc.flush()
        await nc.flush()
        await nc.close()
        return sent

    return asyncio.run(run())


class Hub:
    """``python -m core_hub run --embedded-nats`` in a temporary data dir."""

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "hub"
        self.log_path = root / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = self.token = self.nats_url = ""

    def start(self) -> Hub:
        self.data_dir.mkdir(parents=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "core_hub", "run", "--data-dir", str(self.data_dir),
                 "--embedded-nats", "--nats-port", "0", "--listen", "127.0.0.1:0"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.url = asyncio.run(url_once_serving(self.data_dir / "hub.url", self.proc, 0.05))
        if not self.url:
            raise RuntimeError(f"hub did not start: {self.log_path.read_text()[-2000:]}")
        self.token = (self.data_dir / "admin.token").read_text().strip()
        deadline = time.monotonic() + 10
        while not (self.data_dir / "nats.url").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.nats_url = (self.data_dir / "nats.url").read_text()
        return self

    def account(self) -> str:
        """The OUTPOST account's public key, as a join token carries it."""
        from core_hub.__main__ import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["token", "create", "--data-dir", str(self.data_dir), "--ttl", "60"])
        return out.getvalue().strip().split(".", 1)[1]

    def metric(self, name: str) -> float:
        req = urllib.request.Request(self.url + "/metrics",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (our own hub)
            text = resp.read().decode()
        return sum(float(m.group(1)) for m in re.finditer(
            rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _probe(hub: Hub, seconds: float, during: subprocess.Popen[str] | None = None) -> list[float]:
    """``GET /v1/tasks`` latencies (s) from ``bench.apiprobe`` over ``seconds``."""
    probe = subprocess.Popen([sys.executable, "-m", "bench.apiprobe", hub.token,
                              hub.url + "/v1/tasks"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if during is not None:
        during.wait(seconds + 60)
    else:
        time.sleep(seconds)
    out, _ = probe.communicate("", timeout=60)
    return list(json.loads(out)[hub.url + "/v1/tasks"]["seconds"])


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="outpost-flood-") as tmp:
        hub = Hub(Path(tmp)).start()
        try:
            return _measure(hub)
        finally:
            hub.stop()


def _measure(hub: Hub) -> list[Row]:
    account = hub.account()
    progress(f"flood: GET /v1/tasks for {IDLE_S:.0f} s with no flood")
    idle = _probe(hub, IDLE_S)
    read = ("outpost_enrollments_total", "outpost_enrollment_requests_shed_total",
            "outpost_replies_dropped_total")
    read_before = sum(hub.metric(name) for name in read)
    log_before = hub.log_path.stat().st_size
    assert hub.proc is not None
    ps = psutil.Process(hub.proc.pid)
    cpu_before, began = sum(ps.cpu_times()[:2]), time.monotonic()
    progress(f"flood: {FLOOD_S:.0f} s of bogus enrollment requests through the public login")
    flooder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from bench.flood import flood; "
         "print(flood(sys.argv[1], sys.argv[2], float(sys.argv[3])))",
         hub.nats_url, account, str(FLOOD_S)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    during = _probe(hub, FLOOD_S, flooder)
    elapsed = time.monotonic() - began
    sent = int((flooder.stdout.read() if flooder.stdout else "0").strip() or 0)
    cpu = (sum(ps.cpu_times()[:2]) - cpu_before) / elapsed * 100
    time.sleep(1.0)  # what was queued is read or shed by now
    reached = sum(hub.metric(name) for name in read) - read_before
    logged = hub.log_path.stat().st_size - log_before
    p99_idle, p99_flood = percentile(idle, 99) * 1000, percentile(during, 99) * 1000
    return [
        Row("GET /v1/tasks p99 during an enroll flood", p99_flood, "ms", p99_idle,
            "the same GET, same probe, no flood (this run)", "under 100 ms", p99_flood < 100,
            area="trust"),
        Row("bogus enrollment requests sent", sent / elapsed, "/s",
            raw_what="one flooder process, the public enroll login", digits=0, area="trust"),
        Row("of those, read by the hub", reached / max(sent, 1) * 100, "%",
            raw_what="answered + refused + shed + dropped, per request sent", digits=1,
            area="trust"),
        Row("hub CPU during the flood", cpu, "%", 100.0, "one core", digits=0, area="trust"),
        Row("hub log written during the flood", logged / 1024, "KB",
            raw_what=f"{FLOOD_S:.0f} s", digits=1, area="trust"),
    ]


def main() -> int:
    print(format_table(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
