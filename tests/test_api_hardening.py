"""Issue 10 section 5 against a real edge and a real core over TCP: clients that connect and
send nothing, or half a request, or half a body, or stay idle after an answer, are closed (they
used to hold their connections for an hour); a token in the query string is refused."""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, http, joined, wait_until

PER_KIND = 10


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    sock.setblocking(False)
    return sock


def _closed(sock: socket.socket) -> bool:
    """True once the server has closed (EOF or reset); answers it sent are read and dropped."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _slow_clients(url: str, token: str) -> dict[str, list[socket.socket]]:
    host = urlsplit(url).netloc
    kinds: dict[str, list[socket.socket]] = {
        "silent": [], "half_head": [], "trickle": [], "half_body": [], "idle_keepalive": []}
    for _ in range(PER_KIND):
        kinds["silent"].append(_connect(url))
        half = _connect(url)
        half.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\n".encode())
        kinds["half_head"].append(half)
        trickle = _connect(url)
        trickle.sendall(b"G")
        kinds["trickle"].append(trickle)
        body = _connect(url)
        body.sendall(f"POST /v1/tasks HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                     f"{token}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n"
                     f"\r\n{{\"name\":".encode())
        kinds["half_body"].append(body)
        idle = _connect(url)
        idle.sendall(f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        kinds["idle_keepalive"].append(idle)
    return kinds


def test_slow_and_silent_clients_are_closed(start_agent: Callable[..., AgentProcess],
                                            hub_proc: HubProcess,
                                            nats_proc: NatsServer) -> None:
    edge = joined(start_agent, hub_proc, nats_proc)
    nodes = {"edge": _slow_clients(edge.url, edge.token),
             "core": _slow_clients(hub_proc.url, hub_proc.token)}
    trickled = 0

    def still_open() -> dict[str, int]:
        nonlocal trickled
        trickled += 1
        counts: dict[str, int] = {}
        for role, kinds in nodes.items():
            for kind, socks in kinds.items():
                open_now = [s for s in socks if not _closed(s)]
                if kind == "trickle" and trickled % 10 == 0:  # a byte every ~half second
                    for s in open_now:
                        try:
                            s.send(b"E")
                        except OSError:
                            pass
                if open_now:
                    counts[f"{role}.{kind}"] = len(open_now)
        return counts

    left: dict[str, int] = {}

    def all_closed() -> bool:
        left.clear()
        left.update(still_open())
        return not left

    try:
        wait_until(all_closed, timeout=60, what="every slow client closed")
    except AssertionError:
        raise AssertionError(f"still open after 60 s: {left}") from None
    finally:
        for kinds in nodes.values():
            for socks in kinds.values():
                for s in socks:
                    s.close()
    # Both nodes still answer whoever asks properly.
    assert http("GET", edge.url + "/v1/health").status == 200
    assert http("GET", hub_proc.url + "/v1/health").status == 200


def test_a_token_in_the_query_string_is_refused(start_agent: Callable[..., AgentProcess],
                                                hub_proc: HubProcess,
                                                nats_proc: NatsServer) -> None:
    edge = joined(start_agent, hub_proc, nats_proc)
    for node in (edge, hub_proc):
        for path in ("/v1/tasks", "/v1/events", "/metrics"):
            resp = http("GET", f"{node.url}{path}?token={node.token}")
            assert resp.status == 401, (node.url, path, resp.status)
            assert "query string" in resp.body["error"]["message"]
        assert node.api("GET", "/v1/tasks").status == 200  # the header still works
