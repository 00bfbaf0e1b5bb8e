"""What the deployment tests run: nats-servers started from the shipped config files (as an
operator would, not through ``federation.natsd``), and a TCP relay standing in for a site's
uplink, which a test can cut and restore while both ends stay up."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.natsd import find_binary
from tests.helpers import ROOT, HubProcess, free_port, wait_until


def replace_once(text: str, old: str, new: str) -> str:
    """``text`` with its one ``old`` replaced: a shipped file that changed shape fails here."""
    assert text.count(old) == 1, f"expected exactly one {old!r} in the shipped file"
    return text.replace(old, new)


def monitor(port: int, path: str) -> tuple[int, Any]:
    """GET on a nats-server's monitoring port: (status, parsed JSON or None); 0 if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, None
    except (OSError, ValueError):
        return 0, None


class ConfServer:
    """``nats-server -c <conf>``: ``port`` for clients, ``http_port`` for monitoring (both fixed in
    the config, so a restart comes back where it was)."""

    def __init__(self, conf: Path, port: int, http_port: int) -> None:
        self.conf = conf
        self.port = port
        self.http_port = http_port
        self.log_path = conf.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def launch(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([find_binary(), "-c", str(self.conf)],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited: {self.log_path.read_text()[-3000:]}")
            return monitor(self.http_port, "/healthz")[0] == 200

        wait_until(healthy, timeout, what=f"nats-server {self.conf.name} healthy")

    def start(self) -> ConfServer:
        self.launch()
        self.wait_healthy()
        return self

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def leafs(self) -> int:
        return int((monitor(self.http_port, "/leafz")[1] or {}).get("leafnodes", 0))


@dataclass
class SecureHub:
    """A hub on a nats-server run from ``configs/nats/hub.conf`` with least privilege on, as
    docs/deploy.md says: ``leaf_port`` is its leafnodes port."""

    hub: HubProcess
    nats: ConfServer
    leaf_port: int


@contextlib.contextmanager
def secure_hub_with_leafnodes(tmp_path: Path, *hub_args: str) -> Iterator[SecureHub]:
    hub_dir, auth_file = tmp_path / "hub", tmp_path / "hub" / "nats-auth.conf"
    pid_file = tmp_path / "hub-nats.pid"
    made = subprocess.run([sys.executable, "-m", "core_hub", "nats-auth", "--data-dir",
                           str(hub_dir), "--out", str(auth_file), "--pid-file", str(pid_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert made.returncode == 0 and "written" in made.stdout, made.stderr
    client_port, http_port, leaf_port = free_port(), free_port(), free_port()
    text = (ROOT / "configs" / "nats" / "hub.conf").read_text()
    for old, new in (('"0.0.0.0:4222"', f'"127.0.0.1:{client_port}"'),
                     ('"127.0.0.1:8222"', f'"127.0.0.1:{http_port}"'),
                     ('"0.0.0.0:7422"', f'"127.0.0.1:{leaf_port}"'),
                     ('"/var/lib/outpost-nats"', f'"{tmp_path / "hub-nats"}"'),
                     ('# pid_file: "/var/lib/outpost-nats/nats-server.pid"',
                      f'pid_file: "{pid_file}"'),
                     ('# include "../../var/lib/outpost-hub/nats-auth.conf"',
                      'include "hub/nats-auth.conf"')):
        text = replace_once(text, old, new)
    (tmp_path / "hub-nats.conf").write_text(text)
    nats = ConfServer(tmp_path / "hub-nats.conf", client_port, http_port).start()
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'[hub]\nnats_auth_file = "{auth_file}"\n'
                        f'nats_pid_file = "{pid_file}"\n')
    hub = HubProcess(hub_dir, nats.url, ["--config", str(hub_toml), *hub_args])
    try:
        hub.start()
        yield SecureHub(hub, nats, leaf_port)
    finally:
        hub.stop()
        nats.kill()


def site_leaf(tmp_path: Path, name: str, site: str, hub_leaf_port: int,
              leaf_creds: Path | None) -> ConfServer:
    """A site's leaf node from the bundle's template, linking to ``hub_leaf_port``; started."""
    from core_hub import bundle

    port, http = free_port(), free_port()
    conf = tmp_path / name / "nats-leaf.conf"
    conf.parent.mkdir()
    conf.write_text(bundle.leaf_conf(site, f"nats-leaf://127.0.0.1:{hub_leaf_port}",
                                     data_dir=str(conf.parent), listen=f"127.0.0.1:{port}",
                                     http=f"127.0.0.1:{http}",
                                     leaf_creds=str(leaf_creds) if leaf_creds else None))
    return ConfServer(conf, port, http).start()
