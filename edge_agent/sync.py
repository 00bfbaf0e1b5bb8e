"""The edge's link to the core: enroll, ship the outbox, take commands, send heartbeats.

Everything here is optional and may be down for hours: the agent works the same without it.
The outbox is the store's event log; this module only reads it, ships it to JetStream in signed
batches (``Nats-Msg-Id`` for dedupe, one only this agent can make: ``wire.batch_msg_id``; many
in flight), and moves the ack watermark after the server's ack. The hub orders and dedupes by
each event's per-agent seq, so whatever fails in between (a lost ack, a crash, a resend with
other batch bounds) nothing is lost or applied twice. Heartbeats carry the ack watermark, so
the hub notices events acked here that never reached it (``core_hub/liveness.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.jwtrenewal import RETRY_S as RENEW_RETRY_S
from edge_agent.jwtrenewal import SLEEP_MAX_S as RENEW_SLEEP_MAX_S
from edge_agent.jwtrenewal import JwtLifetime, jwt_account, may_publish
from edge_agent.store import Store
from federation import messages, subjects, wire
from federation.commandlog import POLL_S, CommandReader
from federation.errors import OutpostError
from federation.log import redact_url
from federation.loopguard import LoopGuard, stop_loops
from federation.natscreds import agent_credentials, enroll_credentials, token_account

log = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 400_000
IN_FLIGHT = 16
PUBLISH_TIMEOUT = 5.0
AGENT_REQUEST_TIMEOUT_S = 5.0  # a rotation or renewal on the agent's own subject
# An offer shipped to the core lives OFFER_LIFETIME_S, or OFFER_LIFETIME_HEARTBEATS heartbeats
# if longer, and is renewed once half of that has passed. Offers are looked at once per
# heartbeat, so a renewal lands at most half a lifetime plus one heartbeat after the last:
# before it expires. (A fixed 30 s with 30 s heartbeats left an agent without an offer at the
# core for part of every cycle, and all of it at 45 s.)
OFFER_LIFETIME_S = 30.0
OFFER_LIFETIME_HEARTBEATS = 3


def offer_lifetime(heartbeat_s: float) -> float:
    """Seconds an offer shipped by an agent heartbeating every ``heartbeat_s`` stays usable."""
    return max(OFFER_LIFETIME_S, OFFER_LIFETIME_HEARTBEATS * heartbeat_s)
# An idle agent's loops wait for the store's next commit (every event is one) and look again
# only this often without one: a Pi-class box, or a simulator of thousands of agents, does
# not spend a query and a timer per loop per second on an outbox that has not changed.
IDLE_RECHECK_S = 30.0
ROTATION_RECHECK_S = 1.0  # while a key rotation waits for the hub: retry that soon
BOUND_EVERY_S = 1.0  # the outbox bound is checked at most this often


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """``nats_url``: the core's (or the site leaf's) NATS; ``join_token``: used once to enroll;
    ``heartbeat_s``: heartbeat period; ``outbox_max``: unshipped events kept before coalescing;
    ``nats_ca``: CA file that signed the NATS server's certificate (TLS links)."""

    nats_url: str
    join_token: str | None
    heartbeat_s: float = 2.0
    outbox_max: int = 200_000
    version: str = ""
    nats_ca: Path | None = None


ENROLL_RETRY_S = (60.0, 600.0)  # a refused join token: retry after 1 min, doubling to 10
UNREACHABLE_LOG_S = 10.0  # at most one "cannot reach NATS" line per this many seconds
# The link watchdog: heartbeats are confirmed by a round trip (flush); none for this many
# intervals (at least STALL_MIN_S), or a publish left without an answer for STALL_PUBLISH_S,
# while NATS says connected, and the link is rebuilt. (A path that stops
# forwarding without closing; a timed-out flush no longer kills nats-py's read loop:
# federation/natsclient.py.)
STALL_INTERVALS = 3
STALL_MIN_S = 10.0
STALL_PUBLISH_S = 3 * PUBLISH_TIMEOUT
NATS_AUTH = "nats_auth"  # store meta: "jwt" (the hub issued user JWTs) or "none"
CLOSE_TIMEOUT_S = 2.0  # nats.py's close drains into the socket, with no bound of its own
# nats.py's own PINGs: never more often than the heartbeat, whose flush is already a round
# trip the watchdog checks. A fixed 3 s ping cost an idle agent with 30 s heartbeats ten
# round trips per heartbeat (bytes on a metered uplink; at fleet size, a third of an idle
# agent's CPU and 3,000+ PINGs/s at the server per 10,000 agents).
PING_MIN_S = 3.0
PING_OUTSTANDING = 2
# Commands: the wake-up (a core-NATS message per command) is lost only while the link is down,
# and a reconnect wakes the reader, so the safety tick can follow the heartbeat's pace.
COMMAND_POLL_HEARTBEATS = 2


def ping_interval(heartbeat_s: float) -> float:
    """Seconds between nats.py's PINGs for an agent that heartbeats every ``heartbeat_s``."""
    return max(PING_MIN_S, heartbeat_s)


def command_poll(heartbeat_s: float) -> float:
    """Seconds between the command reader's safety ticks (see ``CommandReader``)."""
    return max(POLL_S, COMMAND_POLL_HEARTBEATS * heartbeat_s)


def _jwt_meta(public: bytes) -> str:
    """The store meta key of the user JWT for one of the agent's keys."""
    return f"nats_jwt.{public.hex()}"


class LinkStalled(Exception):  # noqa: N818 (a signal to rebuild the link)
    """The link says connected but nothing goes through it."""


class EnrollmentRefused(OutpostError):
    """The core said no to the join token (used up, expired, unknown): retrying at once
    cannot help, so the link logs it once and backs off."""


class KeyRotated(Exception):  # noqa: N818 (a signal to reconnect, not a failure)
    """Raised out of the serve loops once the hub has taken the agent's new key."""


class JwtRenewed(Exception):  # noqa: N818 (a signal to reconnect, not a failure)
    """Raised out of the serve loops once the hub has issued a new user JWT."""


class JwtExpired(Exception):  # noqa: N818 (a signal to renew through the enroll login)
    """Raised out of the serve loops when the link is down and its JWT has expired (by this
    box's clock, or the server refused it): reconnecting with it would fail for good."""


class LoginRefused(Exception):  # noqa: N818 (a signal to renew through the enroll login)
    """Raised out of the first connect when the server refuses the agent's expiring JWT: by
    the server's clock it may have expired though this box's clock, behind, says not."""


def _refuses_login(exc: Exception) -> bool:
    text = str(exc).lower()
    return "authorization violation" in text or "authentication expired" in text


# Applies one verified command synchronously (inside the store transaction that records it):
# returns (status, detail, extra fields for the result event).
CommandHandler = Callable[[messages.Command], tuple[str, str | None, dict[str, Any]]]


class Sync:
    """Owns the NATS connection of one agent and the three loops that use it."""

    def __init__(self, settings: SyncSettings, store: Store, signer: wire.Signer,
                 agent_record: Callable[[], dict[str, Any]],
                 snapshot: Callable[[], dict[str, Any]], on_command: CommandHandler,
                 offer: Callable[[], dict[str, Any] | None] = lambda: None,
                 nats_key: bytes | None = None) -> None:
        self.settings = settings
        self.store = store
        self.signer = signer
        self.agent_id = store.agent_id
        self.agent_record = agent_record
        self.snapshot = snapshot
        self.on_command = on_command
        self.offer = offer
        # Serves on each connection while it is up (edge_agent/sitepeers.py), when set.
        self.site_peers: Any = None
        self._nats_key = nats_key  # the identity seed: the agent's NATS nkey once enrolled
        self.rpc_backend: Any = None  # the EdgeBackend live reads are answered from
        # edge_agent.keyrotation.KeyRotation, set by the agent: finishes a pending key rotation.
        self.rotation: Any = None
        self.loops = LoopGuard()  # the agent's, shared with the supervisor (one metric)
        self._last_offer: tuple[Any, ...] | None = None
        self._last_offer_at = 0.0
        self._commands: CommandReader | None = None  # the running reader, woken on reconnect
        self.connected = False
        # The watchdog's marks: the last heartbeat round trip, and since when the oldest
        # publish still without an answer has waited (None: none waits).
        self._beat_ok = time.monotonic()
        self._unanswered_since: float | None = None
        self.last_error: dict[str, Any] | None = None  # shown in /v1/info link
        self.nc: Any = None
        self.js: Any = None
        self.hub_key: bytes | None = None
        # This box's wall clock, for its JWT's lifetime (a test sets one that runs behind).
        self.clock: Callable[[], float] = time.time
        # Set when the server refused the agent's expiring JWT: renew through the enroll login.
        self._login_refused = asyncio.Event()
        self.stats = {"published_events": 0, "published_batches": 0, "publish_errors": 0,
                      "commands_applied": 0, "commands_rejected": 0, "reconnects": 0,
                      "link_rebuilds": 0,
                      "coalesced_events": 0}
        self._main: asyncio.Task[None] | None = None
        self._bound: asyncio.Task[None] | None = None
        floor = store.get_meta("outbox_acked")
        store.publish_floor = int(floor) if floor else 0
        hub = store.get_meta("hub_public_key")
        self.hub_key = bytes.fromhex(hub) if hub else None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name="sync")
        self._bound = asyncio.create_task(self._bound_loop(), name="sync-outbox-bound")

    async def stop(self) -> None:
        await stop_loops(self._main, self._bound)
        await self._close()

    async def _bound_loop(self) -> None:
        """Keep the outbox within ``outbox_max``, link or no link (it grows most when down):
        checked after commits (only they grow it), at most every ``BOUND_EVERY_S``."""
        while True:
            seen = self.store.commits
            with self.loops.guard("sync-outbox-bound"):
                self.bound_outbox()
            await self.loops.pause("sync-outbox-bound", BOUND_EVERY_S)
            if self.store.commits == seen:  # nothing committed since the check: wait for it
                await self._until_change(IDLE_RECHECK_S)

    async def _until_change(self, timeout_s: float) -> None:
        """Return after the store's next commit, or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.store.wait_for_change()

    def bound_outbox(self) -> None:
        depth, _ = self.store.outbox_depth()
        if depth > self.settings.outbox_max:
            dropped = self.store.coalesce_outbox()
            self.stats["coalesced_events"] += dropped
            log.warning("outbox over %d events; coalesced %d superseded ones",
                        self.settings.outbox_max, dropped, extra={"agent": self.agent_id})

    async def _close(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        self.connected = False
        if nc is None:
            return
        try:
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 (a stalled socket: close never returns; cut it)
            writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
            if writer is not None:
                writer.transport.abort()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                # Not enrolled, or enrolled before the hub issued user JWTs: enroll (again;
                # an enrolled key re-enrolls without using up a token) to get one.
                enrolling = self.hub_key is None or self.store.get_meta(NATS_AUTH) is None
                # Offline for longer than its JWT lives: ask for a new one as the enroll user.
                lifetime = None if enrolling else JwtLifetime.of(self._jwt())
                renewing = lifetime is not None and (lifetime.expired(self.clock())
                                                     or self._login_refused.is_set())
                if renewing:
                    log.info("NATS credentials expired; renewing them through the enroll "
                             "login", extra={"agent": self.agent_id})
                await self._connect(enrolling=enrolling or renewing)
                if enrolling or renewing:
                    await (self._enroll() if enrolling else self._renew(own_link=False))
                    # The enroll user may do nothing else: come back as this agent.
                    await self._close()
                    await self._connect(enrolling=False)
                delay, self.last_error = 0.5, None
                await self._serve()
            except asyncio.CancelledError:
                raise
            except LinkStalled:  # logged and counted by the watchdog; come back at once
                await self._close()
                continue
            except KeyRotated:  # the NATS user is the identity key: come back as the new one
                log.info("key rotated; reconnecting with the new key",
                         extra={"agent": self.agent_id})
                await self._close()
                continue
            except JwtRenewed:
                log.info("NATS credentials renewed; reconnecting with them",
                         extra={"agent": self.agent_id})
                await self._close()
                continue
            except JwtExpired:
                log.warning("NATS credentials expired while the link was down",
                            extra={"agent": self.agent_id})
                await self._close()
                continue
            except LoginRefused:  # renewed on the next pass, through the enroll login
                await self._close()
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 15.0)
                continue
            except EnrollmentRefused as exc:
                delay = self._refused(exc, delay)
                await self._close()
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # any failure of the link: drop it and come back later
                self._note_error(f"link to core down: {exc!r}", delay)
                log.warning("link to core down: %r", exc, extra={"agent": self.agent_id},
                            exc_info=log.isEnabledFor(logging.DEBUG))
                if self.rotation is not None and self.rotation.pending():
                    # The hub may have taken the new key (and told NATS) while its answer was
                    # lost: the next try connects as the other of the two keys.
                    self._nats_key = self.rotation.other_key(self._nats_key)
            await self._close()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 15.0)

    def _note_error(self, reason: str, retry_in: float) -> None:
        """What went wrong last, for ``/v1/info`` (``link.last_error``)."""
        now = time.time()
        self.last_error = {"reason": reason, "at": now, "retry_at": now + retry_in}

    def _refused(self, exc: EnrollmentRefused, delay: float) -> float:
        """One clear error per distinct refusal, then a long backoff; returns the wait."""
        wait = min(max(delay * 2, ENROLL_RETRY_S[0]), ENROLL_RETRY_S[1])
        if self.last_error is None or self.last_error["reason"] != exc.message:
            log.error("%s; get a new one (outpost-hub token create) and restart the agent "
                      "with --join-token; retrying in %.0f s", exc.message, wait,
                      extra={"agent": self.agent_id})
        self._note_error(exc.message, wait)
        return wait

    async def _connect(self, *, enrolling: bool) -> None:
        from federation.natsclient import connect_once

        url = redact_url(self.settings.nats_url)
        tries = {"n": 0, "logged": 0.0}

        async def _disconnected() -> None:
            self.connected = False

        async def _reconnected() -> None:
            self.connected = True
            self.stats["reconnects"] += 1
            if self._commands is not None:  # a command's wake-up may have come while away
                self._commands.wake()
            self._announce()

        async def _error(exc: Exception) -> None:
            log.debug("nats: %s", exc)
            if self.connected:
                return
            if (not enrolling and _refuses_login(exc)
                    and JwtLifetime.of(self._jwt()) is not None):
                # nats-py would retry the same JWT for ever: renew it instead (a revoked
                # agent is told no there, and backs off).
                if not self._login_refused.is_set():
                    log.warning("NATS refused this agent's login (%s); its credentials may "
                                "have expired by the server's clock: renewing them", exc,
                                extra={"agent": self.agent_id})
                self._login_refused.set()
                if connecting:  # out of nats-py's first-connect loop; a reconnect's loop
                    raise LoginRefused()  # is left by the renew loop (JwtExpired)
            # nats.py retries the first connect (and reconnects) by itself: say so, at a rate.
            tries["n"] += 1
            now = time.monotonic()
            reason = f"cannot reach NATS at {url}: {exc or type(exc).__name__}"
            self._note_error(reason, 1.0)
            if now - tries["logged"] >= UNREACHABLE_LOG_S:
                tries["logged"] = now
                log.warning("%s (attempt %d; retrying every second)", reason, tries["n"],
                            extra={"agent": self.agent_id})

        connecting = True
        # LoginRefused, or a cancel, leaves no socket behind (connect_once closes it).
        nc = await connect_once(
            self.settings.nats_url, close_timeout_s=CLOSE_TIMEOUT_S,
            name=f"outpost-agent-{self.agent_id}",
            connect_timeout=3, reconnect_time_wait=1, max_reconnect_attempts=-1,
            ping_interval=ping_interval(self.settings.heartbeat_s),
            max_outstanding_pings=PING_OUTSTANDING, allow_reconnect=True,
            # Without it a publish (or ping) that finds 2 MB pending waits for the flusher
            # with no bound: on a stalled socket, forever (heartbeats and pings included).
            flush_timeout=PUBLISH_TIMEOUT,
            disconnected_cb=_disconnected, reconnected_cb=_reconnected, error_cb=_error,
            **self._credentials(enrolling),
            **self._tls())
        connecting = False
        self.nc = nc
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT)
        self.connected = True
        self._beat_ok, self._unanswered_since = time.monotonic(), None
        log.info("connected to %s", redact_url(self.settings.nats_url),
                 extra={"agent": self.agent_id})

    def _tls(self) -> dict[str, Any]:
        """nats.connect's ``tls`` for a tls:// URL or a private CA; none for plain nats://."""
        if self.settings.nats_ca is None and not self.settings.nats_url.startswith("tls://"):
            return {}
        from federation.tls import client_context

        return {"tls": client_context(self.settings.nats_ca, "nats_ca")}

    def _credentials(self, enrolling: bool) -> dict[str, Any]:
        """Who this connection is to NATS (federation/natscreds.py): the public enroll user
        before enrollment, then the agent's own nkey (its identity key)."""
        if enrolling:
            # The account is the join token's; an enrolled agent renewing may have no token
            # any more: its JWT's issuer is the same account.
            account = token_account(self.settings.join_token) or jwt_account(self._jwt())
            return enroll_credentials(account).connect_options()
        if self._nats_key is None:
            return {}
        return agent_credentials(self._nats_key, self.agent_id, self._jwt()).connect_options()

    def _jwt(self) -> str | None:
        """The user JWT of the key this agent connects to NATS as, if the hub issued one."""
        if self._nats_key is None:
            return None
        return self.store.get_meta(_jwt_meta(wire.Signer(self._nats_key).public))

    async def _agent_request(self, request: bytes, *, own_link: bool = True) -> Any:
        """A rotation or renewal request and its reply. Over the agent's own link it goes to
        the agent's own subject, which the public enroll login cannot flood, if its JWT lets
        it; a hub (or a site leaf's JWT) from before that subject does not answer there, and
        the request goes to ``subjects.ENROLL`` after all."""
        from nats.errors import NoRespondersError

        if own_link and may_publish(self._jwt(), subjects.agent_requests(self.agent_id)):
            try:
                return await self.nc.request(subjects.agent_requests(self.agent_id), request,
                                             timeout=AGENT_REQUEST_TIMEOUT_S)
            except (NoRespondersError, TimeoutError) as exc:
                log.info("no answer on the agent's own request subject (%r); asking on %s",
                         exc, subjects.ENROLL, extra={"agent": self.agent_id})
        return await self.nc.request(subjects.ENROLL, request, timeout=5)

    async def _renew(self, *, own_link: bool = True) -> None:
        """Ask the hub for a new user JWT for the key this agent connects as, and keep it.
        Raise EnrollmentRefused if the hub says no (a revoked agent), OutpostError on a
        garbled answer, or whatever the request raises."""
        assert self._nats_key is not None
        signer = wire.Signer(self._nats_key)
        reply = await self._agent_request(wire.renew_request(signer, self.agent_id),
                                          own_link=own_link)
        answer = wire.unpack(reply.data)
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else "not a map"
            raise EnrollmentRefused(f"NATS credentials renewal refused by the core: {error}")
        jwt = answer.get("nats_jwt")
        if answer.get("agent_id") != self.agent_id or not isinstance(jwt, str) or not jwt:
            raise OutpostError("the core's renewal answer is not for this agent's key")
        self.store.set_meta(_jwt_meta(signer.public), jwt)
        self._login_refused.clear()
        log.info("NATS credentials renewed", extra={"agent": self.agent_id})

    async def _renew_loop(self) -> None:
        """While connected: renew the user JWT at half its lifetime, then reconnect with it
        (JwtRenewed). While nats.py is reconnecting on its own: once the JWT has expired,
        reconnecting cannot work; give the link back to ``_run`` to renew (JwtExpired)."""
        while True:
            lifetime = JwtLifetime.of(self._jwt())
            if lifetime is None:  # never expires (or no auth): nothing to do on this link
                return
            now, refused = self.clock(), self._login_refused.is_set()
            if not self.connected and (refused or lifetime.expired(now)):
                raise JwtExpired()
            if not self.connected or (now < lifetime.renew_at and not refused):
                # Woken now and then (the wall clock may jump), and by a refused login.
                wait = (min(lifetime.renew_at - now, RENEW_SLEEP_MAX_S) if now < lifetime.renew_at
                        else min(RENEW_RETRY_S, max(lifetime.expires_at - now, 0.1)))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._login_refused.wait()
                continue
            try:
                await self._renew()
            except Exception as exc:  # no answer, a refusal: try again, the JWT still works
                self._note_error(f"NATS credentials not renewed: {exc}", RENEW_RETRY_S)
                log.warning("NATS credentials not renewed, will retry: %r", exc,
                            extra={"agent": self.agent_id})
                await asyncio.sleep(min(RENEW_RETRY_S,
                                        max((lifetime.expires_at - self.clock()) / 4, 0.5)))
                continue
            raise JwtRenewed()

    def _keep_jwt(self, public: bytes, answer: dict[str, Any]) -> None:
        """Keep the user JWT the hub issued for ``public`` (none: a NATS without auth)."""
        jwt = answer.get("nats_jwt")
        if isinstance(jwt, str) and jwt:
            self.store.set_meta(_jwt_meta(public), jwt)
        self.store.set_meta(NATS_AUTH, "jwt" if jwt else "none")

    # ------------------------------------------------------------ enrollment

    async def _enroll(self) -> None:
        token = self.settings.join_token
        if not token:
            raise OutpostError("not enrolled and no join token given (--join-token)")
        record = self.agent_record()
        request = wire.enroll_request(
            self.signer, token, name=record["name"], site=record["site"],
            labels=record["labels"], resources=record["resources"],
            version=self.settings.version)
        reply = await self.nc.request(subjects.ENROLL, request, timeout=5)
        answer = wire.unpack(reply.data)
        if not answer.get("ok"):
            raise EnrollmentRefused(f"enrollment refused by the core: {answer.get('error')}")
        if answer["agent_id"] != self.agent_id:
            raise OutpostError("enrollment answered for another agent id")
        self._keep_jwt(self.signer.public, answer)
        self.hub_key = bytes(answer["hub_public_key"])
        self.store.set_meta("hub_public_key", self.hub_key.hex())
        log.info("enrolled with the core", extra={"agent": self.agent_id})

    # ------------------------------------------------------------ the connected loops

    async def _serve(self) -> None:
        self._announce()
        rpc = None
        if self.rpc_backend is not None:
            from edge_agent.rpc import RpcServer

            rpc = RpcServer(self.nc, self.rpc_backend)
            await rpc.start()
        if self.site_peers is not None:
            await self.site_peers.start(self.nc)
        loops = [asyncio.create_task(self._publish_loop(), name="sync-publish"),
                 asyncio.create_task(self._command_loop(), name="sync-commands"),
                 asyncio.create_task(self._heartbeat_loop(), name="sync-heartbeat"),
                 asyncio.create_task(self._watchdog_loop(), name="sync-watchdog"),
                 asyncio.create_task(self._renew_loop(), name="sync-renew")]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            await stop_loops(*loops, errors=False)
            if rpc is not None:
                await rpc.stop()
            if self.site_peers is not None:
                await self.site_peers.stop()

    def _announce(self) -> None:
        """After (re)connecting: the agent record and a snapshot go out, in seq order."""
        self.store.append_event("agent", self.agent_record())
        self.store.append_event("snapshot", self.snapshot())

    async def _publish_loop(self) -> None:
        floor = self.store.publish_floor or 0
        while True:
            if not self.connected:
                await asyncio.sleep(0.2)
                continue
            rows = self.store.events_after(floor, MAX_BATCH_EVENTS * IN_FLIGHT)
            if self.rotation is not None and self.rotation.pending():
                # Until the hub takes the new key, the old one signs only up to ``until``.
                until = await self._rotate()
                rows = [row for row in rows if row["seq"] <= until]
            if not rows:
                self._unanswered_since = None  # nothing waits for an answer
                pending = self.rotation is not None and self.rotation.pending()
                await self._until_change(ROTATION_RECHECK_S if pending else IDLE_RECHECK_S)
                continue
            batches = self._batches(floor, rows)
            if self._unanswered_since is None:
                self._unanswered_since = time.monotonic()
            # An id only this agent can make (wire.batch_msg_id): another edge cannot make the
            # stream drop this agent's batches as duplicates of its own messages.
            sends = [self.js.publish(subjects.events(self.agent_id), data, headers={
                         "Nats-Msg-Id": wire.batch_msg_id(self.signer, self.agent_id, first,
                                                          last)})
                     for first, last, _, data in batches]
            results = await asyncio.gather(*sends, return_exceptions=True)
            if any(not isinstance(r, TimeoutError) for r in results):
                self._unanswered_since = None  # answered, even if with an error
            for (first, last, count, _), result in zip(batches, results, strict=True):
                if isinstance(result, BaseException):
                    self.stats["publish_errors"] += 1
                    log.info("publish of %d..%d failed: %r", first, last, result)
                    break
                self.stats["published_batches"] += 1
                self.stats["published_events"] += count
                floor = last
            self._set_floor(floor)
            if any(isinstance(r, BaseException) for r in results):
                await asyncio.sleep(0.5)

    async def _rotate(self) -> int:
        """Ask the hub to take the pending key (at most every few seconds); once it has,
        sign with the new key and reconnect as it. Returns the seq the old key signs up to."""
        rotation = self.rotation
        until: int = rotation.until()
        if not rotation.due():
            return until
        try:
            reply = await self._agent_request(rotation.request(self.signer))
            answer = wire.unpack(reply.data)
            seed = rotation.answered(answer)
            if seed is not None:
                self._keep_jwt(wire.Signer(seed).public, answer)
        except Exception as exc:  # no answer, a garbled one, a full disk: try again later
            log.warning("key rotation not finished, will retry: %r", exc,
                        extra={"agent": self.agent_id})
            return until
        if seed is None:
            return until
        self.signer = wire.Signer(seed)
        self._nats_key = seed
        raise KeyRotated()

    def _batches(self, floor: int, rows: list[Any]) -> list[tuple[int, int, int, bytes]]:
        """Signed batches of ``rows``: (first seq covered, last seq, event count, bytes)."""
        out: list[tuple[int, int, int, bytes]] = []
        events: list[wire.Event] = []
        size = 0
        first = floor + 1

        def close() -> None:
            nonlocal first, events, size
            out.append((first, events[-1].seq, len(events),
                        wire.sign_batch(self.agent_id, events, self.signer, first=first)))
            first, events, size = events[-1].seq + 1, [], 0

        for row in rows:
            # The stored JSON text goes out as it is: no decode and re-encode per event.
            events.append(wire.Event(row["seq"], row["kind"], row["ts"], row["body"].encode()))
            size += len(row["body"])
            if len(events) >= MAX_BATCH_EVENTS or size >= MAX_BATCH_BYTES:
                close()
        if events:
            close()
        return out

    def _set_floor(self, floor: int) -> None:
        if floor != self.store.publish_floor:
            self.store.publish_floor = floor
            self.store.set_meta("outbox_acked", str(floor))

    async def _command_loop(self) -> None:
        # Commands are this agent's numbered log (federation/commandlog.py): no consumer; the
        # last number applied is kept in the store, so an edge away for hours resumes there.
        async def apply(number: int, data: bytes) -> None:
            await self._apply_command(data)
            self.store.set_meta("command_number", str(number))

        reader = CommandReader(self.nc, self.js, self.agent_id,
                               int(self.store.get_meta("command_number") or 0), apply,
                               self._command_applied,
                               poll_s=command_poll(self.settings.heartbeat_s))
        self._commands = reader
        try:
            await reader.run()
        finally:
            self._commands = None

    def _command_applied(self, data: bytes) -> bool:
        """Whether this envelope's command id is recorded as applied (forged ones: treated as
        applied, there is nothing to do with them)."""
        hub_key = self.hub_key
        try:
            env = wire.open_envelope(data, lambda a: hub_key if a == self.agent_id else None,
                                     expected_agent=self.agent_id, kinds=wire.COMMAND_KINDS)
        except wire.EnvelopeRejected:
            return True
        body = env.body if isinstance(env.body, dict) else {}
        return self.store.command_seen(str(body.get("id", "")))

    async def _apply_command(self, data: bytes) -> None:
        hub_key = self.hub_key
        try:
            env = wire.open_envelope(data, lambda a: hub_key if a == self.agent_id else None,
                                     expected_agent=self.agent_id, kinds=wire.COMMAND_KINDS)
        except wire.EnvelopeRejected as exc:
            self.stats["commands_rejected"] += 1
            log.warning("command rejected (%s): %s", exc.reason, exc.message,
                        extra={"agent": self.agent_id})
            return
        try:
            command = messages.command_from_wire(env.kind, env.body)
        except messages.MessageInvalid as exc:
            # Signed by the hub but not a command this agent can read: answered (when it has
            # an id to answer) and acknowledged, never a reason to drop the link.
            self.stats["commands_rejected"] += 1
            log.warning("command refused: %s", exc.message, extra={"agent": self.agent_id})
            if exc.command_id is not None and not self.store.command_seen(exc.command_id):
                self._record(exc.command_id, env.kind, None, "rejected",
                             f"not a valid command: {exc.message}", {})
            return
        if self.store.command_seen(command.id):
            return
        task_id = getattr(command, "task_id", None)
        try:
            with self.store.transaction():
                if command.expires_at < time.time():
                    status, detail = "expired", "expired before the agent received it"
                    extra: dict[str, Any] = {}
                else:
                    try:
                        status, detail, extra = self.on_command(command)
                    except OutpostError as exc:
                        status, detail, extra = "rejected", exc.message, {}
                self._record(command.id, env.kind, task_id, status, detail, extra)
        except Exception as exc:  # noqa: BLE001 (whatever it was, its effect was rolled back)
            # A command the agent could not apply: a failed result, acknowledged. Left
            # unacknowledged it would come back every ack_wait and fail the same way.
            log.exception("command %s %s could not be applied", env.kind, command.id,
                          extra={"agent": self.agent_id, "command": command.id})
            status, detail = "rejected", f"could not apply: {type(exc).__name__}: {exc}"[:1000]
            self._record(command.id, env.kind, task_id, status, detail, {})
        self.stats["commands_applied"] += 1
        log.info("command %s %s: %s", env.kind, status, detail or "",
                 extra={"agent": self.agent_id, "command": command.id})

    def _record(self, command_id: str, kind: str, task_id: str | None, status: str,
                detail: str | None, extra: dict[str, Any]) -> None:
        result = messages.Result(command_id=command_id, kind=kind, status=status,
                                 task_id=task_id, detail=detail, **extra)
        self.store.record_command(command_id, kind, status, detail, result.to_wire())

    def _offer_if_changed(self) -> None:
        """Queue an ``offer`` event when what the agent can take has changed."""
        offer = self.offer()
        key = None if offer is None else (offer["cpus"], offer["mem_mb"], offer["disk_mb"],
                                          tuple(offer.get("artifacts") or ()))
        now = time.monotonic()
        lifetime = offer_lifetime(self.settings.heartbeat_s)
        if key != self._last_offer or now - self._last_offer_at > lifetime / 2:
            self._last_offer, self._last_offer_at = key, now
            if offer is not None:
                created = float(offer.get("created_at") or time.time())
                self.store.append_event("offer", {**offer, "created_at": created,
                                                  "expires_at": created + lifetime})

    async def _heartbeat_loop(self) -> None:
        while True:
            with self.loops.guard("sync-heartbeat"):
                self._offer_if_changed()
                if self.connected:
                    depth, age = self.store.outbox_depth()
                    beat = {"agent": self.agent_id, "ts": time.time(),
                            "seq": self.store.last_event_seq(), "outbox": depth,
                            "outbox_age": age,
                            "acked": self.store.publish_floor or 0}  # the hub checks for gaps
                    with contextlib.suppress(Exception):
                        await self.nc.publish(subjects.heartbeat(self.agent_id),
                                              wire.pack(beat))
                        # A round trip: the beat really left (the watchdog's progress mark).
                        await self.nc.flush(timeout=max(self.settings.heartbeat_s, 2.0))
                        self._beat_ok = time.monotonic()
            await self.loops.pause("sync-heartbeat", self.settings.heartbeat_s)

    async def _watchdog_loop(self) -> None:
        """Rebuild a link that says connected but moves nothing (see ``LinkStalled``)."""
        beat = self.settings.heartbeat_s
        while True:
            await asyncio.sleep(beat)
            now = time.monotonic()
            if not self.connected:  # nats.py is reconnecting by itself: not a stall
                self._beat_ok, self._unanswered_since = now, None
                continue
            why = self.stalled(now)
            if why is not None:
                self.stats["link_rebuilds"] += 1
                log.warning("link stalled while NATS says connected (%s); rebuilding it", why,
                            extra={"agent": self.agent_id})
                raise LinkStalled(why)

    def stalled(self, now: float) -> str | None:
        """Why the link counts as stalled at ``now`` (monotonic), or None."""
        quiet = now - self._beat_ok
        if quiet > max(STALL_INTERVALS * self.settings.heartbeat_s, STALL_MIN_S):
            return f"no heartbeat went through for {quiet:.0f} s"
        # Counted from the oldest publish still waiting, not from the last answer: an event
        # recorded after a quiet spell is not a stall while its PubAck is on its way.
        since = self._unanswered_since
        if since is not None and now - since > STALL_PUBLISH_S:
            return f"no publish answered for {now - since:.0f} s"
        return None

    def status(self) -> dict[str, Any]:
        depth, age = self.store.outbox_depth()
        lifetime = JwtLifetime.of(self._jwt())
        return {"enabled": True, "connected": self.connected, "enrolled": self.hub_key is not None,
                "nats_url": self.settings.nats_url, "outbox_depth": depth,
                "outbox_oldest_age_s": age, "acked_seq": self.store.publish_floor,
                # When its NATS user JWT expires (None: it never does); renewed at half.
                "credentials_expire_at": None if lifetime is None else lifetime.expires_at,
                "last_error": self.last_error, **self.stats}
