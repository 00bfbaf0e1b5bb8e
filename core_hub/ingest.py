"""Ingest: apply the agents' signed events from JetStream to the hub's view, once and in order.

This is the hub half of DESIGN.md guarantee 2. Every message on ``OUTPOST_EVENTS`` is opened
with ``wire.open_envelope`` against the sending agent's enrolled key and the agent named by the
subject (or a key it rotated away from, for envelopes from before the rotation:
``keyrotation.open_agent_envelope``); a revoked agent's envelopes are rejected. Anything
rejected is counted by reason, logged, acked and never applied. An accepted envelope covers
the agent's seqs ``first..seq`` and is judged against the agent's ``applied_seq``:

- ``seq <= applied``: a duplicate (a re-sent outbox row, a redelivery): ack, count.
- ``first > applied + 1``: an earlier envelope has not arrived yet: nak with a delay so
  JetStream redelivers it later, apply nothing.
- otherwise apply the events with ``seq > applied``, set ``applied_seq = seq``, ack.

Messages are fetched in batches (``batch``, 256 by default) and applied a chunk per SQLite
transaction, each envelope in its own savepoint, then acked after the commit. A chunk is as
many envelopes as the view applies in about 100 ms at the rate it applied the last ones (at
most 1 MB), and the event loop runs between chunks: the API waits for one chunk at most,
whatever the fetch holds. So an envelope's events, its ``applied_seq`` and
``meta.stream_seq`` commit together (a crash before the commit loses nothing: the messages
are redelivered), and a chunk costs one commit, not one per message. Envelopes out of order
inside one chunk are put in order there, without a nak.

``meta.stream_seq`` is the stream sequence below which *every* message has been dealt with, not
simply the last one applied: a nak'd envelope is still owed, so the floor stops just below it.
On start, ingest recreates its durable pull consumer to deliver from ``stream_seq + 1``: a
restarted hub resumes where its view ends, and a hub whose view file was deleted (stream_seq 0)
rebuilds the whole view from the stream. Re-delivered envelopes it had applied are duplicates.

Event bodies are checked here (the system edge, CONVENTIONS 6): a malformed body in a validly
signed envelope is a bug at that agent; it is counted as ``bad_events`` and skipped, so one bad
event cannot wedge an agent's stream. An envelope whose apply raises anyway (a full disk, a body
SQLite or JSON cannot hold) is rolled back alone and retried with backoff: the view never skips
what it could not store, and ``apply_errors`` shows it.

What an agent says about itself is checked against what it enrolled as (``enroll.py``): its
name, site and resources are fixed there and change only by an admin at the core. An ``agent``
event claiming another name or site, or more resources, has those fields refused (the rest,
status, version, labels, what it uses, is applied); an ``offer`` claiming more free or used
resources than enrolled (per amount the enrollment names) is refused whole, and one claiming
another site stands for the enrolled site (after an admin moved the agent, its own config may
still name the old one). Each is counted in ``refused_claims`` by field and logged (once per
agent and claim), so a stolen edge cannot pose as
another site's agent and draw that site's tasks, or claim capacity it does not have.

Batch events arrive as JSON text (``Envelope.raw_events``). Each is decoded once, with orjson,
for its checks; a task's text that names its sender is then stored as it came, not encoded
again (``store.task_row``). On the 2-core build box that leaves ~18 us of hub CPU per task
event, most of it SQLite's insert and the envelope's Ed25519 check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from core_hub.keyrotation import open_agent_envelope
from core_hub.store import (
    AGENT_JSON_FIELDS,
    AGENT_TEXT_FIELDS,
    AgentKey,
    HistoryRow,
    HubStore,
    TaskRow,
    task_row,
)
from federation import messages, subjects
from federation.errors import Invalid
from federation.loopguard import stop_loops
from federation.schemas import AGENT_STATUSES, TASK_STATES
from federation.wire import Envelope, EnvelopeRejected, Event

log = logging.getLogger(__name__)

DURABLE = "outpost-hub-ingest"
RESULT_STATUSES = messages.RESULT_STATUSES
LOST_REASON = "not on the agent at reconcile"
HISTORY_PRUNE_S = 60.0
# After this many deliveries of one waiting envelope, say so: its predecessor may be gone.
_WARN_REDELIVERIES = 20
# The pause between two chunks of one fetch, for everything else on the event loop: the API,
# heartbeats, NATS pings. A real (timed) sleep rather than sleep(0): the loop then runs
# whatever became ready, and what that schedules in turn (a request's handler after its
# read), before the next chunk, not one step of it per chunk. ~0.5 % of a 100 ms chunk.
_BETWEEN_CHUNKS_S = 0.0005
# How long one chunk's transaction may hold the loop, about: what an API request waits at most
# for ingest. 1 MB of a reconnect storm's 50-event envelopes took ~0.3 s, and held the API
# that long, when chunks were bounded by bytes alone. Not less: each commit costs ~3 ms more
# than its events (the B-tree pages every chunk rewrites), and at 50 ms a fetch of small
# batches became four or five chunks and ingest ~20 % slower (bench.ingest_apply).
CHUNK_BUDGET_S = 0.1
MIN_CHUNK_BYTES = 16 << 10  # below this a chunk's fixed costs (keys read, commit) dominate
# Waiting for the checkpointer to copy the whole WAL (HubStore.wal_wants_draining); after a
# drain that did not complete, ingest stops waiting for one this long.
_WAL_DRAIN_TRIES, _WAL_DRAIN_MAX_S, _WAL_DRAIN_POLL_S = 3, 2.0, 0.002
_WAL_DRAIN_BACKOFF_S = 10.0
_TASK_STATES = frozenset(TASK_STATES)
# Statuses an agent may report about itself; ``revoked`` is the core's word only.
_AGENT_SAYS = frozenset(AGENT_STATUSES) - {"revoked"}


class Outcome(Enum):
    ACK = "ack"  # applied, duplicate or rejected: done with it
    GAP = "gap"  # waits for an earlier envelope: nak with the gap delay
    ERROR = "error"  # applying it failed unexpectedly: nak with the error delay


@dataclass(slots=True)
class IngestStats:
    """Counters for ``/metrics``: ``applied_events`` and ``applied_envelopes``; ``duplicates``
    (envelopes already applied); ``gaps`` (envelope deliveries nak'd to wait for an earlier
    one); ``rejected`` (envelopes by reason: ``wire.REASONS`` plus ``revoked`` and
    ``subject``; a revoked agent's events land in ``revoked``); ``bad_events`` (malformed
    bodies skipped); ``foreign_tasks`` (task rows naming another agent's task id, refused;
    counted once per envelope and task, and not subtracted from ``applied_events``);
    ``apply_errors`` (envelopes whose apply raised); ``refused_claims`` (agent records and
    offers claiming another name or site or more resources than enrolled, by field)."""

    applied_events: int = 0
    applied_envelopes: int = 0
    duplicates: int = 0
    gaps: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    bad_events: int = 0
    foreign_tasks: int = 0
    apply_errors: int = 0
    refused_claims: dict[str, int] = field(default_factory=dict)

    def add(self, other: IngestStats) -> None:
        self.applied_events += other.applied_events
        self.applied_envelopes += other.applied_envelopes
        self.duplicates += other.duplicates
        self.gaps += other.gaps
        self.bad_events += other.bad_events
        self.foreign_tasks += other.foreign_tasks
        self.apply_errors += other.apply_errors
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        for claim, count in other.refused_claims.items():
            self.refused_claims[claim] = self.refused_claims.get(claim, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ingest:
    """Consumes ``OUTPOST_EVENTS`` into ``store`` from ``start()`` until ``stop()``.

    ``durable`` names this view's consumer: give each hub replica (each SQLite view) its own.
    ``batch`` is the fetch size; ``gap_delay_s`` how long a waiting envelope is held back before
    its first redelivery, doubling on each until ``max_gap_delay_s``; ``error_delay_s`` the
    same for an envelope whose apply failed, and the pause after a failed fetch. A fetch is
    applied in transactions of at most ``max_chunk_bytes`` of envelopes, with the event loop
    given back between them, so a fetch of big batches does not hold the loop (and the single
    writer) for seconds; within that bound a chunk takes what applies in about
    ``chunk_budget_s`` (``ChunkSizer``). Every ``history_prune_s`` the task histories that grew
    are cut back to their newest rows.
    """

    def __init__(self, js: JetStreamContext, store: HubStore, *, durable: str = DURABLE,
                 batch: int = 256, fetch_timeout_s: float = 1.0, gap_delay_s: float = 0.5,
                 max_gap_delay_s: float = 30.0, error_delay_s: float = 1.0,
                 ack_wait_s: float = 30.0, max_ack_pending: int = 50_000,
                 max_chunk_bytes: int = 1 << 20, chunk_budget_s: float = CHUNK_BUDGET_S,
                 min_chunk_bytes: int = MIN_CHUNK_BYTES,
                 history_prune_s: float = HISTORY_PRUNE_S,
                 inactive_threshold_s: float | None = None) -> None:
        self._js = js
        self._store = store
        self._durable = durable
        self._inactive_threshold_s = inactive_threshold_s  # a standby's: removed once unused
        self._batch = batch
        self._fetch_timeout_s = fetch_timeout_s
        self._pruned_at = time.monotonic()
        self._history_prune_s = history_prune_s
        self._history_touched: set[str] = set()
        self._gap_delay_s = gap_delay_s
        self._max_gap_delay_s = max_gap_delay_s
        self._error_delay_s = error_delay_s
        self._ack_wait_s = ack_wait_s
        self._max_ack_pending = max_ack_pending
        self.chunks = ChunkSizer(chunk_budget_s, min_chunk_bytes, max_chunk_bytes)
        self._drain_after = 0.0  # monotonic: no WAL drain before (one just failed)
        self.stats = IngestStats()
        self._claims_logged: set[tuple[str, str, str]] = set()  # refused claims, logged once
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        # Envelopes are verified here, a slice ahead of the apply (see _verified); made by
        # start(), shut down by stop().
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-verify")
        # The floor bookkeeping: stream seqs delivered but still owed (nak'd), and the highest
        # stream seq seen. First deliveries come in stream order, so everything below the
        # highest was delivered at least once; only the owed ones are not done.
        self._owed: set[int] = set()
        self._high = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("ingest already started")
        try:
            await self._bind()
        except (nats.errors.Error, OSError) as err:
            # A NATS cluster electing the stream's or consumer's leader (a node just died)
            # answers nothing for a few seconds: the hub starts anyway and the fetch loop
            # binds once it can.
            log.warning("ingest cannot bind its consumer yet (%r); retrying", err,
                        extra={"durable": self._durable})
            await self._unbind()
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-verify")
        self._task = asyncio.create_task(self._run(), name="hub-ingest")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_loops(task)
        await self._unbind()
        self._verifier.shutdown(wait=True)

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Return once ``predicate()`` holds, checking after each chunk is processed."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._progress.wait()

    async def catch_up(self, timeout_s: float) -> bool:
        """Wait until every event the stream holds now is applied (a view rebuilt at a
        takeover must not answer with less than the standby view it replaces); False, logged,
        if that takes longer than ``timeout_s``, and then what is applied so far is served."""
        try:
            async with asyncio.timeout(timeout_s):
                info = await self._js.stream_info(subjects.EVENTS_STREAM)
                target = info.state.last_seq
                while self.floor < target:
                    # The last messages may be gone (per-agent limits): the consumer having
                    # nothing left to deliver or owed also means caught up.
                    mine = await self._js.consumer_info(subjects.EVENTS_STREAM, self._durable)
                    if mine.num_pending == 0 and not mine.num_ack_pending:
                        break
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self._progress.wait()
            return True
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.warning("ingest has not caught up with %s within %.0fs (%r; at seq %d): "
                        "serving what is applied so far", subjects.EVENTS_STREAM, timeout_s,
                        exc, self.floor, extra={"stream_seq": self.floor})
            return False

    @property
    def floor(self) -> int:
        """Every stream message up to this sequence is done (what ``meta.stream_seq`` holds)."""
        return min(self._owed) - 1 if self._owed else self._high

    async def _bind(self) -> None:
        """(Re)create the durable consumer to deliver from the view's floor + 1."""
        await self._unbind()
        start = self._store.stream_seq
        try:
            await self._js.delete_consumer(subjects.EVENTS_STREAM, self._durable)
        except NotFoundError:
            pass
        info = await self._js.stream_info(subjects.EVENTS_STREAM)
        if start > info.state.last_seq:
            log.error("this view has applied %s up to seq %d but the stream ends at %d: "
                      "was the stream recreated? nothing below seq %d will be applied",
                      subjects.EVENTS_STREAM, start, info.state.last_seq, start + 1,
                      extra={"stream_seq": start, "last_seq": info.state.last_seq})
        elif start + 1 < info.state.first_seq:
            log.warning("events %d..%d aged out of %s before this view applied them",
                        start + 1, info.state.first_seq - 1, subjects.EVENTS_STREAM,
                        extra={"stream_seq": start, "first_seq": info.state.first_seq})
        config = ConsumerConfig(
            name=self._durable, durable_name=self._durable,
            description="hub ingest into its SQLite view",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
            opt_start_seq=start + 1 if start else None,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self._ack_wait_s, max_deliver=-1,
            max_ack_pending=self._max_ack_pending, filter_subject=subjects.EVENTS_ALL,
            inactive_threshold=self._inactive_threshold_s)
        await self._js.add_consumer(subjects.EVENTS_STREAM, config)
        self._sub = await self._js.pull_subscribe_bind(durable=self._durable,
                                                      stream=subjects.EVENTS_STREAM)
        self._owed.clear()
        self._high = start
        log.info("ingest consuming %s from stream seq %d", subjects.EVENTS_STREAM, start + 1,
                 extra={"stream_seq": start, "durable": self._durable})

    async def _unbind(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:  # the connection is gone: nothing left to undo
                pass

    async def _run(self) -> None:
        while True:
            try:
                if self._sub is None:
                    await self._bind()
                assert self._sub is not None
                msgs = await self._sub.fetch(self._batch, timeout=self._fetch_timeout_s)
            except TimeoutError:  # nats' own, or asyncio's: nats-py raises both when idle
                self._maybe_prune()
                continue
            except (nats.errors.Error, OSError) as err:
                log.warning("ingest fetch failed, retrying: %s", err,
                            extra={"durable": self._durable})
                await self._unbind()
                await asyncio.sleep(self._error_delay_s)
                continue
            # A fetch may mix redeliveries with new messages: stream order is seq order more
            # often, so fewer envelopes have to wait.
            msgs.sort(key=lambda msg: msg.metadata.sequence.stream)
            at = 0
            while at < len(msgs):
                if at:  # acks do not suspend: without this the chunks of a fetch (9 MB in
                    # a reconnect storm) ran back to back, the loop held for seconds
                    await asyncio.sleep(_BETWEEN_CHUNKS_S)
                await self.before_chunk()
                chunk = self.chunks.take(msgs, at)
                at += len(chunk)
                await self._settle(self.apply_chunk(chunk))
            self._maybe_prune()

    async def before_chunk(self) -> None:
        """What a chunk waits for: the WAL to start again, once it is long."""
        if self._store.wal_wants_draining and time.monotonic() >= self._drain_after:
            await self._let_the_wal_restart()

    async def _let_the_wal_restart(self) -> None:
        """Hold the next write, the loop free, until the store's checkpointer has copied the
        whole WAL (then the next commit starts it again), rather than let it grow to where the
        writer copies it on the loop. A commit by another writer in the meantime spoils a
        checkpoint: a few are tried, then ingest goes on (the writer's safety net remains)."""
        store, since = self._store, time.monotonic()
        for _ in range(_WAL_DRAIN_TRIES):
            ticket = store.drain_wal_requested()
            while (drained := store.wal_drained(ticket)) is None:
                if time.monotonic() - since > _WAL_DRAIN_MAX_S:
                    break
                await asyncio.sleep(_WAL_DRAIN_POLL_S)
            if drained:
                return
            if drained is None:
                break
        # Not drained (other writers, or a checkpointer that stopped answering): no more
        # waiting for a while, so that ingest never waits before every chunk.
        log.info("the WAL could not be drained in %.1fs; not waiting for it for %.0fs",
                 time.monotonic() - since, _WAL_DRAIN_BACKOFF_S)
        self._drain_after = time.monotonic() + _WAL_DRAIN_BACKOFF_S

    def apply_chunk(self, chunk: list[Msg]) -> list[tuple[Msg, Outcome]]:
        """``_process`` one chunk, and learn from how long it took how big the next may be."""
        started = time.perf_counter()
        outcomes = self._process(chunk)
        self.chunks.observe(sum(len(msg.data) for msg in chunk), time.perf_counter() - started)
        return outcomes

    def _maybe_prune(self) -> None:
        """Every ``history_prune_s``: trim the histories that grew to their newest rows, and
        the placement change log to its newest rows."""
        now = time.monotonic()
        if now - self._pruned_at >= self._history_prune_s:
            self._pruned_at = now
            touched, self._history_touched = self._history_touched, set()
            dropped = self._store.prune_history(touched) if touched else 0
            if dropped:
                log.debug("pruned %d task history rows", dropped)
            if changes := self._store.prune_placement_changes():
                log.debug("pruned %d placement change rows", changes)

    async def _settle(self, outcomes: list[tuple[Msg, Outcome]]) -> None:
        for msg, outcome in outcomes:
            try:
                if outcome is Outcome.ACK:
                    await msg.ack()
                else:
                    # Back off on a long wait: a lost predecessor, or an envelope that fails
                    # every time, must not become a hot loop.
                    base = self._gap_delay_s if outcome is Outcome.GAP else self._error_delay_s
                    tries = min(msg.metadata.num_delivered, 16)
                    await msg.nak(delay=min(base * 2 ** (tries - 1), self._max_gap_delay_s))
            except nats.errors.Error as err:  # lost ack: the message comes back, a duplicate
                log.debug("could not settle a message: %s", err)

    # ------------------------------------------------------------ one fetch

    def _process(self, msgs: list[Msg]) -> list[tuple[Msg, Outcome]]:
        """Apply a chunk of a fetch in one transaction (no awaits: the single writer is ours
        till the commit); returns what to tell JetStream about each message, after the
        commit."""
        delta = IngestStats()
        outcomes: dict[int, Outcome] = {}
        owed, high = set(self._owed), self._high
        try:
            with self._store.transaction():
                chunk = _Chunk(self._keys_of(msgs))
                waiting: list[tuple[Msg, Envelope]] = []
                for msg, opened in self._verified(msgs, chunk.keys):
                    env = self._open(msg, opened, delta)
                    outcome = Outcome.ACK if env is None else self._apply(env, chunk, delta)
                    if outcome is Outcome.GAP:
                        assert env is not None
                        waiting.append((msg, env))
                    outcomes[id(msg)] = outcome
                # An envelope that arrived before its predecessor in this same chunk.
                while waiting:
                    still = []
                    for msg, env in waiting:
                        outcome = self._apply(env, chunk, delta)
                        if outcome is Outcome.GAP:
                            still.append((msg, env))
                        else:
                            outcomes[id(msg)] = outcome
                    if len(still) == len(waiting):
                        break
                    waiting = still
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    high = max(high, seq)
                    if outcomes[id(msg)] is Outcome.ACK:
                        owed.discard(seq)
                    else:
                        owed.add(seq)
                for msg, env in waiting:
                    delta.gaps += 1
                    self._log_wait(msg, env, chunk.applied_seq(env.agent))
                self._store.set_applied_seqs(
                    (seq, ts, agent) for agent, (seq, ts) in chunk.seen.items())
                floor = min(owed) - 1 if owed else high
                if floor != self._store.stream_seq:
                    self._store.set_stream_seq(floor)
        except Exception:
            log.exception("ingest could not commit %d messages", len(msgs))
            seqs = [msg.metadata.sequence.stream for msg in msgs]
            self._owed.update(seqs)  # all still owed: the floor must not pass them
            self._high = max(self._high, *seqs)
            self._wake()
            return [(msg, Outcome.ERROR) for msg in msgs]
        self._owed, self._high = owed, high
        self.stats.add(delta)
        self._wake()
        return [(msg, outcomes[id(msg)]) for msg in msgs]

    def _wake(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _verified(self, msgs: list[Msg], keys: dict[str, AgentKey | None],
                  ) -> Iterator[tuple[Msg, _Opened]]:
        """Each message with what verifying it against ``keys`` gave, in order. The Ed25519
        checks run on the verifier thread a slice ahead of the caller's apply (libsodium
        releases the GIL, so they use the other core). The keys were read inside the caller's
        transaction, so each check sees the keys the apply does (nothing else on this loop
        runs until the commit, and other writers wait for it)."""
        slices = [msgs[at:at + size] for at, size in _slices(len(msgs))]
        futures = [self._verifier.submit(_open_all, part, keys) for part in slices]
        for part, future in zip(slices, futures, strict=True):
            yield from zip(part, future.result(), strict=True)

    def _keys_of(self, msgs: list[Msg]) -> dict[str, AgentKey | None]:
        """The key of every agent the messages' subjects name (None if unknown), in one
        read."""
        agents = {agent for msg in msgs if (agent := _agent_of(msg.subject)) is not None}
        known = self._store.agent_keys(agents)
        return {agent: known.get(agent) for agent in agents}

    def _open(self, msg: Msg, opened: _Opened, delta: IngestStats) -> Envelope | None:
        """The verified envelope, or None after counting and logging why it is rejected."""
        if isinstance(opened, Envelope):
            return opened
        agent, err, known = opened
        if agent is None:
            self._reject(delta, "subject", err.message, None)
            return None
        assert isinstance(err, EnvelopeRejected)
        reason = "revoked" if err.reason == "unknown_agent" and known else err.reason
        self._reject(delta, reason, err.message, agent)
        return None

    def _reject(self, delta: IngestStats, reason: str, message: str, agent: str | None) -> None:
        delta.rejected[reason] = delta.rejected.get(reason, 0) + 1
        log.warning("rejected an event envelope (%s): %s", reason, message,
                    extra={"reason": reason, "agent_id": agent})

    def _log_wait(self, msg: Msg, env: Envelope, applied: int) -> None:
        extra = {"agent_id": env.agent, "first": env.first, "seq": env.seq,
                 "applied_seq": applied}
        if msg.metadata.num_delivered >= _WARN_REDELIVERIES:
            log.warning("agent %s: envelope %d..%d still waits for earlier events", env.agent,
                        env.first, env.seq, extra=extra)
        else:
            log.debug("agent %s: envelope %d..%d waits for earlier events", env.agent,
                      env.first, env.seq, extra=extra)

    # ------------------------------------------------------------ one envelope

    def _apply(self, env: Envelope, chunk: _Chunk, delta: IngestStats) -> Outcome:
        applied = chunk.applied_seq(env.agent)
        if env.seq <= applied:
            delta.duplicates += 1
            return Outcome.ACK
        if env.first > applied + 1:
            return Outcome.GAP
        # Undecoded: task bodies are decoded once, in _apply_events, and stored as they came.
        events = env.raw_events()
        if env.first <= applied:
            events = [event for event in events if event.seq > applied]
        try:
            with self._store.savepoint():
                self._apply_events(env.agent, events, delta)
        except Exception:
            log.exception("agent %s: applying envelope %d..%d failed", env.agent, env.first,
                          env.seq, extra={"agent_id": env.agent, "seq": env.seq})
            delta.apply_errors += 1
            return Outcome.ERROR
        chunk.applied(env.agent, env.seq, env.ts)
        delta.applied_envelopes += 1
        return Outcome.ACK

    def _apply_events(self, agent: str, events: list[Event], delta: IngestStats) -> None:
        """Apply ``events`` in order. A batch event's body is still its JSON text (bytes); it
        is decoded here, once, and a task's text is what the view stores (no re-encoding)."""
        store = self._store
        # Task events are coalesced to each task's last state and written in one executemany
        # when the envelope ends or a snapshot needs the table current; other kinds do not
        # touch the tasks table, so they may be applied in between. This loop runs for every
        # event the fleet sends: the task case comes first and calls as little as it can.
        # Each task event becomes its row at once, so its decoded dict is freed before the next
        # is decoded (keeping a thousand alive makes each decode ~3x slower: cold memory).
        tasks: dict[str, TaskRow] = {}
        history: list[HistoryRow] = []
        tasks_ts = 0.0
        loads, decode_error, pop = orjson.loads, orjson.JSONDecodeError, tasks.pop
        for event in events:
            text = event.body
            if type(text) is bytes:
                try:
                    body = loads(text)
                except decode_error:
                    body = None  # which no kind accepts: skipped as malformed
            else:  # a single-event envelope's body, decoded with the envelope
                body, text = text, None
            if event.kind == "task":
                if _task_ok(body):
                    row = task_row(agent, body, text)
                    before = pop(row[0], None)  # keep the order of last states
                    tasks[row[0]] = row
                    if before is None or before[3] != row[3]:  # a change of state: history
                        history.append((row[0], agent, event.seq, event.ts, row[3],
                                        body.get("exit_code"), body.get("reason"), row[4],
                                        body.get("restarts")))
                    tasks_ts = event.ts
                    delta.applied_events += 1
                else:
                    self._bad(delta, agent, event)
                continue
            if tasks and event.kind == "snapshot":
                self._upsert(agent, list(tasks.values()), tasks_ts, delta)
                tasks = {}
                pop = tasks.pop
            if event.kind == "agent" and isinstance(body, dict):
                store.update_agent_record(agent, self._agent_claims(agent, body, event, delta))
            elif event.kind == "offer" and _offer_ok(body):
                if not self._offer_fits(agent, body, event, delta):
                    continue  # refused and counted; the seq still counts as applied
                store.upsert_offer(agent, body)
                used = body.get("used")
                if isinstance(used, dict) and all(_is_number(v) and v >= 0 for v in used.values()):
                    store.update_agent_record(agent, {"used": used})
            elif event.kind == "result" and _result_ok(body):
                store.insert_result(agent, body, event.ts)
            elif event.kind == "snapshot" and _snapshot_ok(body):
                self._upsert(agent, [task_row(agent, task) for task in body["tasks"]], event.ts,
                             delta)
                lost = store.mark_missing_lost(agent, [t["id"] for t in body["tasks"]],
                                               event.ts, LOST_REASON)
                if lost:
                    log.info("agent %s: %d tasks not on the agent at reconcile, now lost",
                             agent, len(lost), extra={"agent_id": agent, "tasks": lost})
            else:
                self._bad(delta, agent, event)
                continue
            delta.applied_events += 1
        if tasks:
            self._upsert(agent, list(tasks.values()), tasks_ts, delta)
        if history:
            store.add_history(history)
            self._history_touched.update(row[0] for row in history)

    def _upsert(self, agent: str, rows: list[TaskRow], ts: float, delta: IngestStats) -> None:
        foreign = self._store.upsert_task_rows(rows, ts)
        if foreign:  # refused task rows (each may stand for several coalesced events)
            delta.foreign_tasks += foreign
            log.warning("agent %s: refused %d task events naming another agent's tasks",
                        agent, foreign, extra={"agent_id": agent})

    def _agent_claims(self, agent: str, body: dict[str, Any], event: Event,
                      delta: IngestStats) -> dict[str, Any]:
        """The fields of an ``agent`` event to apply: never its name, site or resources, which
        stay as enrolled; a claim of others is refused (counted, logged)."""
        fields = _agent_fields(body)
        enrolled = self._store.enrollment(agent)
        for name in ("name", "site"):
            claimed = fields.pop(name, None)
            if claimed is not None and claimed != enrolled[name]:
                self._refuse(delta, agent, event, name, claimed, enrolled[name])
        claimed = fields.pop("resources", None)
        if claimed is not None and _exceeds(claimed, enrolled["resources"]):
            self._refuse(delta, agent, event, "resources", claimed, enrolled["resources"])
        return fields

    def _offer_fits(self, agent: str, body: dict[str, Any], event: Event,
                    delta: IngestStats) -> bool:
        """True if the offer stays within the agent's enrollment (its site; free and used
        amounts no larger than enrolled); the stored offer names the enrolled site."""
        enrolled = self._store.enrollment(agent)
        site = body.get("site", enrolled["site"])
        if site != enrolled["site"]:  # counted; the offer stands for the enrolled site
            self._refuse(delta, agent, event, "offer_site", site, enrolled["site"])
        free = {k: body[k] for k in ("cpus", "mem_mb", "disk_mb") if k in body}
        used = body.get("used")
        for what, amounts in (("offer_resources", free), ("offer_used", used)):
            if isinstance(amounts, dict) and _exceeds(amounts, enrolled["resources"]):
                self._refuse(delta, agent, event, what, amounts, enrolled["resources"])
                return False
        body["site"] = enrolled["site"]
        return True

    def _refuse(self, delta: IngestStats, agent: str, event: Event, what: str, claimed: Any,
                enrolled: Any) -> None:
        delta.refused_claims[what] = delta.refused_claims.get(what, 0) + 1
        said = (agent, what, str(claimed)[:200])
        if said in self._claims_logged:  # an edge repeats its offer every few seconds
            return
        if len(self._claims_logged) < 10_000:
            self._claims_logged.add(said)
        log.warning("agent %s: refused %s %s in event %d (enrolled: %s): only an admin at the "
                    "core changes an agent's enrollment", agent, what, str(claimed)[:200],
                    event.seq, str(enrolled)[:200],
                    extra={"agent_id": agent, "seq": event.seq, "claim": what})

    def _bad(self, delta: IngestStats, agent: str, event: Event) -> None:
        delta.bad_events += 1
        log.warning("agent %s: skipped malformed %s event %d", agent, event.kind, event.seq,
                    extra={"agent_id": agent, "seq": event.seq, "kind": event.kind})


class ChunkSizer:
    """How many bytes of envelopes the next transaction takes: what the view applies in about
    ``budget_s`` at the rate it applied the last chunks, within ``min_bytes..max_bytes``.

    Bytes alone do not bound the time: a byte of a 50-event envelope costs the view about
    three times a byte of a small batch. The rate is a moving average, so one chunk slowed by
    a busy box shrinks the next ones only a little."""

    __slots__ = ("budget_s", "min_bytes", "max_bytes", "_seconds_per_byte")
    _WEIGHT = 0.3  # of the newest chunk in the average

    def __init__(self, budget_s: float, min_bytes: int, max_bytes: int) -> None:
        if budget_s <= 0 or min_bytes < 1 or max_bytes < 1:
            raise ValueError("chunk budget and byte bounds must be positive")
        self.budget_s = budget_s
        self.max_bytes = max_bytes
        self.min_bytes = min(min_bytes, max_bytes)
        self._seconds_per_byte: float | None = None  # none measured yet

    def limit(self) -> int:
        """The byte bound of the next chunk (before any is measured: the smallest)."""
        if self._seconds_per_byte is None:
            return self.min_bytes
        if self._seconds_per_byte <= 0:
            return self.max_bytes
        fits = int(self.budget_s / self._seconds_per_byte)
        return max(self.min_bytes, min(self.max_bytes, fits))

    def observe(self, nbytes: int, seconds: float) -> None:
        """A chunk of ``nbytes`` took ``seconds`` to apply."""
        if nbytes <= 0:
            return
        rate = max(seconds, 0.0) / nbytes
        before = self._seconds_per_byte
        self._seconds_per_byte = rate if before is None else (
            before + self._WEIGHT * (rate - before))

    def take(self, msgs: list[Msg], at: int) -> list[Msg]:
        """The next chunk of ``msgs`` from ``at``: at least one message, then as many more as
        stay within ``limit()`` bytes."""
        limit, size, end = self.limit(), len(msgs[at].data), at + 1
        while end < len(msgs) and size + len(msgs[end].data) <= limit:
            size += len(msgs[end].data)
            end += 1
        return msgs[at:end]


class _Chunk:
    """What one chunk's transaction knows about its agents: their keys as read at its start,
    and the seqs it has applied since (written to ``agents`` once, before the commit)."""

    __slots__ = ("keys", "seen")

    def __init__(self, keys: dict[str, AgentKey | None]) -> None:
        self.keys = keys
        self.seen: dict[str, tuple[int, float]] = {}  # agent -> (applied seq, latest ts)

    def applied_seq(self, agent: str) -> int:
        seen = self.seen.get(agent)
        if seen is not None:
            return seen[0]
        key = self.keys[agent]
        assert key is not None  # open_envelope found its key
        return key.applied_seq

    def applied(self, agent: str, seq: int, ts: float) -> None:
        before = self.seen.get(agent)
        self.seen[agent] = (seq, ts if before is None else max(ts, before[1]))


# What verifying one message gave: its envelope, or (agent or None if the subject names
# none, the error, whether the view knows the agent).
_Opened = Envelope | tuple[str | None, Invalid | EnvelopeRejected, bool]
_FIRST_SLICE, _SLICE = 8, 48  # a small first slice: the apply starts soon


def _slices(total: int) -> Iterator[tuple[int, int]]:
    """(start, size) of the verifier's slices of ``total`` messages."""
    at, size = 0, _FIRST_SLICE
    while at < total:
        yield at, size
        at, size = at + size, _SLICE


def _agent_of(subject: str) -> str | None:
    try:
        return subjects.agent_of(subject)
    except Invalid:
        return None


def _open_all(msgs: list[Msg], keys: dict[str, AgentKey | None]) -> list[_Opened]:
    """Verify ``msgs`` against ``keys`` (runs on the verifier thread: no store access)."""
    out: list[_Opened] = []
    for msg in msgs:
        try:
            agent = subjects.agent_of(msg.subject)
        except Invalid as err:
            out.append((None, err, False))
            continue
        key = keys.get(agent)
        try:
            out.append(open_agent_envelope(msg.data, key, agent))
        except EnvelopeRejected as err:
            out.append((agent, err, key is not None))
    return out


# ------------------------------------------------------------ body checks


def _is_number(x: Any) -> bool:
    return type(x) in (int, float)


def _task_ok(body: Any) -> bool:
    # Runs for every task event: each key is looked up once. A state is checked to be text
    # before the set lookup: a list there would raise (and wedge the stream), not be refused.
    if not isinstance(body, dict):
        return False
    task_id, state = body.get("id"), body.get("state")
    return (isinstance(task_id, str) and 0 < len(task_id) <= 128
            and isinstance(body.get("name"), str)
            and isinstance(state, str) and state in _TASK_STATES
            and type(body.get("generation", 1)) is int)


def _agent_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The agent record fields the hub keeps, those of the right type; the id is the sender's."""
    fields = {k: body[k] for k in AGENT_TEXT_FIELDS if isinstance(body.get(k), str)}
    if fields.get("status", AGENT_STATUSES[0]) not in _AGENT_SAYS:
        del fields["status"]
    fields.update({k: body[k] for k in AGENT_JSON_FIELDS if isinstance(body.get(k), dict)})
    if _is_drivers(body.get("drivers")):
        fields["drivers"] = body["drivers"]
    return fields


def _is_drivers(value: Any) -> bool:
    """The agent record's ``drivers``: a few maps of short texts (name, runtime, version)."""
    return isinstance(value, list) and len(value) <= 16 and all(
        isinstance(d, dict) and len(d) <= 8 and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 32 and len(v) <= 128
            for k, v in d.items()) for d in value)


def _exceeds(claimed: Any, enrolled: dict[str, Any]) -> bool:
    """True if ``claimed`` (amounts by resource) is more than ``enrolled`` in any amount the
    enrollment names, or is not a map of numbers."""
    if not isinstance(claimed, dict):
        return True
    for key, value in claimed.items():
        if not _is_number(value):
            return True
        limit = enrolled.get(key)
        if _is_number(limit) and value > limit + 1e-9:
            return True
    return False


def _offer_ok(body: Any) -> bool:
    # Strict (federation.messages): unknown or ill-typed fields, NaN or a negative amount
    # refuse the whole offer; the placer then only ever sees finite, typed numbers.
    try:
        messages.Offer.from_wire(body)
    except messages.MessageInvalid:
        return False
    return True


def _result_ok(body: Any) -> bool:
    try:
        messages.Result.from_wire(body)
    except messages.MessageInvalid:
        return False
    return True


def _snapshot_ok(body: Any) -> bool:
    # All or nothing: reconciling against a partly unreadable list would mark tasks lost.
    return (isinstance(body, dict) and isinstance(body.get("tasks"), list)
            and all(_task_ok(task) for task in body["tasks"]))
