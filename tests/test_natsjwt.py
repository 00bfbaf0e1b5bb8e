"""NATS operator mode: the hub's JWTs against a real nats-server (no mocks).

The JWT codec round trip; a server trusting the hub's operator accepts its accounts and users;
a revocation pushed through the system account cuts a user off at once and refuses it after;
an enrollment changes no server config and reloads nothing; an agent's user JWT lets it speak
only for itself.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core_hub.natsauth import (
    AUTH_FILE_NAME,
    AccountStats,
    NatsAuth,
    NatsOperator,
    push_account,
    record_agent_jwt_ttl,
)
from core_hub.store import HubStore
from federation import natsjwt, subjects
from federation.natscreds import (
    NatsCredentials,
    agent_credentials,
    enroll_credentials,
    user_nkey,
)
from federation.natsd import NatsServer
from tests.helpers import AgentProcess, HubProcess, wait_until, wait_until_async
from tests.test_nats_auth import client, creds_of, enrolled, refused


def test_a_jwt_round_trips_and_a_changed_one_does_not_verify() -> None:
    operator, account, user = (natsjwt.new_seed(k) for k in ("operator", "account", "user"))
    perms = {"publish": {"allow": ["a.>"], "deny": ["a.b"]}, "subscribe": {"allow": ["c"]}}
    token = natsjwt.user_jwt(account, natsjwt.public_of(user), "u", perms)
    claims = natsjwt.decode(token, kind="user")
    assert claims["iss"] == natsjwt.public_of(account)
    assert claims["sub"] == natsjwt.public_of(user) and claims["name"] == "u"
    assert claims["nats"]["pub"] == {"allow": ["a.>"], "deny": ["a.b"]}
    assert claims["nats"]["sub"] == {"allow": ["c"]} and claims["nats"]["version"] == 2
    assert claims["nats"]["bearer_token"] is False and len(claims["jti"]) == 52
    head, body, sig = token.split(".")
    assert "=" not in token and json.loads(natsjwt._unb64(head)) == natsjwt.HEADER
    forged = natsjwt._b64(natsjwt._unb64(body).replace(b"a.>", b">>>"))
    with pytest.raises(natsjwt.NatsJwtError):
        natsjwt.decode(f"{head}.{forged}.{sig}")
    with pytest.raises(natsjwt.NatsJwtError):
        natsjwt.decode(token, kind="account")
    acc = natsjwt.account_jwt(operator, natsjwt.public_of(account), "A", jetstream=True,
                              revocations={natsjwt.public_of(user): 5})
    nats_claims = natsjwt.decode(acc, kind="account")["nats"]
    assert nats_claims["revocations"] == {natsjwt.public_of(user): 5}
    assert nats_claims["limits"]["disk_storage"] == -1 and nats_claims["limits"]["conn"] == -1
    assert natsjwt.read_creds(natsjwt.creds(token, user)) == (token, user)
    seed = bytes(range(32))
    assert natsjwt.public_of(natsjwt.seed_from_raw(seed, "user")) == user_nkey(
        natsjwt.raw_public(natsjwt.public_of(natsjwt.seed_from_raw(seed, "user"))))


@pytest.fixture
def operator_server(tmp_path: Path) -> Iterator[tuple[NatsOperator, NatsServer, NatsAuth,
                                                      HubStore]]:
    operator = NatsOperator.load(tmp_path / "hub")
    store = HubStore(tmp_path / "hub" / "hub.db")
    server = NatsServer(tmp_path / "nats", config_extra=f'include "{AUTH_FILE_NAME}"')

    async def push(jwt: str) -> None:
        await push_account(server.url, operator, jwt)

    auth = NatsAuth(server.store_dir / AUTH_FILE_NAME, store, operator, push)
    auth.write()
    try:
        yield operator, server, auth, store
    finally:
        store.close()


def _agent(store: HubStore, name: str) -> tuple[bytes, str, bytes]:
    from nacl.signing import SigningKey

    from federation.identity import id_from_public_key

    key = SigningKey.generate()
    agent_id = id_from_public_key(bytes(key.verify_key))
    store.enroll_agent(agent_id, bytes(key.verify_key), name=name, site="s", labels={},
                       resources={}, version="", now=0)
    return bytes(key), agent_id, bytes(key.verify_key)


def _issued(store: HubStore, auth: NatsAuth, name: str) -> tuple[str, NatsCredentials]:
    """An agent enrolled in ``store`` and its NATS login with the JWT ``auth`` issues."""
    seed, agent_id, public = _agent(store, name)
    return agent_id, agent_credentials(seed, agent_id, auth.issue(agent_id, public))


async def test_a_real_server_takes_the_operators_accounts_and_users_and_a_revocation(
        operator_server: tuple[NatsOperator, NatsServer, NatsAuth, HubStore]) -> None:
    operator, server, auth, store = operator_server
    await server.start()
    try:
        # The hub's own user: JetStream works in the OUTPOST account.
        async with client(server.url, operator.hub_credentials(setup=True)) as hub:
            js = hub.nc.jetstream(timeout=5)
            await js.add_stream(name=subjects.EVENTS_STREAM, subjects=["outpost.v1.events.>"])
            assert (await js.account_info()).limits.max_streams == -1
        # An agent: its JWT is signed by the account, its nonce by its own key.
        seed, agent_id, public = _agent(store, "a")
        jwt = auth.issue(agent_id, public)
        creds = agent_credentials(seed, agent_id, jwt)
        async with client(server.url, creds) as me:
            await me.nc.publish(subjects.heartbeat(agent_id), b"")
            await me.nc.flush()
            assert not me.errors
        # The public enroll login: the scoped signing key gives it the enroll rights only.
        async with client(server.url, enroll_credentials(operator.account)) as me:
            await me.nc.publish(subjects.heartbeat(agent_id), b"x")
            await me.violation("publish", subjects.heartbeat(agent_id))
        # Without a JWT, or with one the operator never signed: refused.
        assert "Authorization Violation" in await refused(server.url, None)
        stranger = natsjwt.new_seed("account")
        forged = natsjwt.user_jwt(stranger, user_nkey(public), agent_id,
                                  {"publish": {"allow": [">"]}})
        assert "Authorization Violation" in await refused(
            server.url, agent_credentials(seed, agent_id, forged))
        # Revoked: the live connection is closed at once, and it is refused from then on.
        async with client(server.url, creds) as me:
            store.revoke_agent(agent_id, now=1.0e9 * 2)
            assert await auth.refresh() is True
            await wait_until_async(lambda: me.nc.is_closed, 5,
                                   what="the revoked user disconnected")
        assert "Authorization Violation" in await refused(server.url, creds)
        assert await auth.refresh() is False  # nothing more to revoke
    finally:
        await server.stop()
    # A restart reads the account with its revocations from the preload and the resolver.
    await server.start()
    try:
        assert "Authorization Violation" in await refused(server.url, creds)
        async with client(server.url, operator.hub_credentials()):
            pass
    finally:
        await server.stop()


def _server_pid_and_load_time(hub: HubProcess) -> tuple[int, str]:
    ports = next((hub.data_dir / "nats" / "ports").glob("*.ports"))
    monitor = json.loads(ports.read_text())["monitoring"][0]
    with urllib.request.urlopen(f"{monitor}/varz", timeout=5) as resp:
        varz = json.loads(resp.read())
    return int((hub.data_dir / "nats" / "nats-server.pid").read_text()), varz["config_load_time"]


def test_an_enrollment_changes_no_server_config_and_its_agent_speaks_only_for_itself(
        tmp_path: Path, start_agent: Callable[..., AgentProcess]) -> None:
    hub = HubProcess(tmp_path / "hub", "", embedded=True).start()
    try:
        a, a_id = enrolled(start_agent, hub, "a")
        configs = [hub.data_dir / "nats" / AUTH_FILE_NAME,
                   hub.data_dir / "nats" / "nats-server.conf"]
        before = [(p.stat().st_mtime_ns, p.read_text()) for p in configs]
        pid, loaded = _server_pid_and_load_time(hub)
        b, b_id = enrolled(start_agent, hub, "b")  # the new agent connects as itself
        wait_until(lambda: any(x["id"] == b_id and x["status"] == "online"
                               for x in hub.api("GET", "/v1/agents").body["items"]), 15,
                   what="b online")
        assert [(p.stat().st_mtime_ns, p.read_text()) for p in configs] == before
        assert _server_pid_and_load_time(hub) == (pid, loaded)  # same process, no reload

        async def as_b() -> None:
            async with client(hub.nats_url, creds_of(b, b_id)) as me:
                await me.nc.publish(subjects.heartbeat(b_id), b"")  # its own: allowed
                await me.nc.flush()
                assert not me.errors
                for subject in (subjects.events(a_id), subjects.heartbeat(a_id)):
                    await me.nc.publish(subject, b"forged")
                    await me.violation("publish", subject)
                await me.nc.subscribe(subjects.commands_of(a_id))
                await me.violation("subscription", subjects.commands_of(a_id))
            # b's JWT presented with a's key: the nonce signature is not b's, refused.
            mixed = NatsCredentials(seed=creds_of(a, a_id).seed, jwt=creds_of(b, b_id).jwt)
            assert "Authorization Violation" in await refused(hub.nats_url, mixed)

        asyncio.run(as_b())
    finally:
        hub.stop()


def _revoked_fleet(store: HubStore, count: int, *, enrolled_at: float,
                   revoked_at: float) -> None:
    """``count`` agents enrolled and revoked at those times (one transaction)."""
    from nacl.signing import SigningKey

    from federation.identity import id_from_public_key

    with store.transaction():
        for i in range(count):
            public = bytes(SigningKey.generate().verify_key)
            agent_id = id_from_public_key(public)
            store.enroll_agent(agent_id, public, name=f"gone-{i}", site="s", labels={},
                               resources={}, version="", now=enrolled_at)
            store.revoke_agent(agent_id, now=revoked_at)


async def test_a_revocation_still_reaches_the_server_after_twelve_thousand_others(
        operator_server: tuple[NatsOperator, NatsServer, NatsAuth, HubStore]) -> None:
    """Each revoked (or rotated-away) key is an entry of the account JWT, ~93 bytes. Kept for
    good, 12,000 of them make the account JWT 1.1 MB, over nats-server's 1 MB max payload:
    the push fails, and the next agent revoked keeps its live connection. Agent JWTs expire
    (``agent_jwt_ttl_s``), so an entry whose JWTs have all expired leaves the account."""
    operator, server, auth, store = operator_server
    now = time.time()
    day = 86400.0
    # A hub that has issued expiring JWTs (1 day) for a month; 12,000 agents revoked 10 days
    # ago, every JWT of theirs long expired; 5 revoked an hour ago, still within a JWT's life.
    record_agent_jwt_ttl(operator.data_dir, day, now - 30 * day)
    _revoked_fleet(store, 12_000, enrolled_at=now - 20 * day, revoked_at=now - 10 * day)
    _revoked_fleet(store, 5, enrolled_at=now - 20 * day, revoked_at=now - 3600)
    auth.write()
    await server.start()
    try:
        agent_id, creds = _issued(store, auth, "live")
        async with client(server.url, creds) as me:
            store.revoke_agent(agent_id, now=time.time())
            assert await auth.refresh() is True
            await wait_until_async(lambda: me.nc.is_closed, 5,
                                   what="the revoked user disconnected")
        assert "Authorization Violation" in await refused(server.url, creds)
    finally:
        await server.stop()
    kept = natsjwt.decode(auth.current_account_jwt() or "", kind="account")["nats"][
        "revocations"]
    assert len(kept) == 6, "the 5 recent revocations and the new one; none of the 12,000"
    assert auth.account_stats == AccountStats(6, len(auth.current_account_jwt() or ""))


def test_an_account_jwt_near_the_servers_max_payload_is_warned_of(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    operator = NatsOperator.load(tmp_path / "hub")
    store = HubStore(tmp_path / "hub" / "hub.db")
    try:
        auth = NatsAuth(tmp_path / "auth.conf", store, operator)
        _revoked_fleet(store, 9_000, enrolled_at=time.time() - 60, revoked_at=time.time())
        with caplog.at_level("WARNING", logger="core_hub.natsauth"):
            assert auth.write() is True
        stats = auth.account_stats
        assert stats.revocations == 9_000 and stats.jwt_bytes > 3 * (1 << 20) // 4
        assert "no revocation reaches the server" in caplog.text
    finally:
        store.close()


def test_a_revoked_key_leaves_the_account_only_once_its_jwts_have_all_expired(
        tmp_path: Path) -> None:
    from core_hub.natsauth import JWT_CLOCK_SKEW_S, ROTATION_GRACE_S, revocations

    store = HubStore(tmp_path / "hub.db")
    day, now = 86400.0, time.time()
    try:
        assert revocations(store, tmp_path, now) == {}
        _revoked_fleet(store, 1, enrolled_at=now - 40 * day, revoked_at=now - 20 * day)
        legacy = set(revocations(store, tmp_path, now))
        assert len(legacy) == 1, "no record: JWTs may never expire, every revocation is kept"
        record_agent_jwt_ttl(tmp_path, day, now - 30 * day)
        assert set(revocations(store, tmp_path, now)) == legacy, \
            "enrolled before JWTs expired: it may hold one that never does; kept for good"
        edge = now - day - JWT_CLOCK_SKEW_S
        _revoked_fleet(store, 1, enrolled_at=now - 29 * day, revoked_at=edge + 60)
        recent = set(revocations(store, tmp_path, now)) - legacy
        assert len(recent) == 1, "its last JWT (issued by its revocation) may still live"
        _revoked_fleet(store, 1, enrolled_at=now - 29 * day, revoked_at=edge - 60)
        assert set(revocations(store, tmp_path, now)) == legacy | recent
        # A key rotated away: gone once its JWTs (issued before the rotation) have expired.
        seed, agent_id, first = _agent(store, "rotating")
        with store.transaction() as db:  # enrolled after JWTs began to expire
            db.execute("UPDATE agents SET enrolled_at = ? WHERE id = ?", (now - 29 * day,
                                                                          agent_id))
        from nacl.signing import SigningKey

        second = bytes(SigningKey.generate().verify_key)
        store.rotate_agent_key(agent_id, first, second, 0, now - 10)
        assert user_nkey(first) not in revocations(store, tmp_path, now), "within its grace"
        assert user_nkey(first) in revocations(store, tmp_path, now - 10 + ROTATION_GRACE_S)
        later = now + day + JWT_CLOCK_SKEW_S + 60
        assert user_nkey(first) not in revocations(store, tmp_path, later)
        assert user_nkey(second) not in revocations(store, tmp_path, later), "not revoked"
        # A longer lifetime later raises the bound; a shorter one never lowers it.
        record_agent_jwt_ttl(tmp_path, 3 * day, now)
        record_agent_jwt_ttl(tmp_path, 60.0, now)
        assert user_nkey(first) in revocations(store, tmp_path, later)
        assert len(set(revocations(store, tmp_path, now)) - legacy) == 2
    finally:
        store.close()


async def test_a_revocation_whose_push_failed_still_reaches_the_server(
        operator_server: tuple[NatsOperator, NatsServer, NatsAuth, HubStore]) -> None:
    """The account file is written before the push: a push that failed (the server did not
    answer) left the file saying "revoked" and the server not knowing it, and every later
    refresh (the admin's "revoke again", the hub's own tick) saw nothing to change. The
    revoked box kept its NATS connection until the hub restarted."""
    operator, server, auth, store = operator_server
    await server.start()
    try:
        agent_id, creds = _issued(store, auth, "stolen")
        async with client(server.url, creds) as me:
            store.revoke_agent(agent_id, now=time.time())
            server.pause()  # the push's connect times out
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await auth.refresh()
            finally:
                server.resume()
            assert not me.nc.is_closed
            assert auth.push_pending and auth.account_stats.push_pending
            # "Revoke again to retry" (the API's 503 says so): this refresh pushes, though
            # the account file already says "revoked".
            assert await auth.refresh() is False
            await wait_until_async(lambda: me.nc.is_closed, 5,
                                   what="the revoked user disconnected")
            assert not auth.push_pending
        assert "Authorization Violation" in await refused(server.url, creds)
        # And without anyone asking: the hub's own loop retries a failed push.
        agent_id, creds = _issued(store, auth, "stolen-too")
        async with client(server.url, creds) as me:
            store.revoke_agent(agent_id, now=time.time())
            server.pause()
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await auth.refresh()
            finally:
                server.resume()
            await auth.start()
            try:
                await wait_until_async(lambda: me.nc.is_closed, 15,
                                       what="the revoked user disconnected by the retry")
            finally:
                await auth.stop()
        assert "Authorization Violation" in await refused(server.url, creds)
    finally:
        await server.stop()
