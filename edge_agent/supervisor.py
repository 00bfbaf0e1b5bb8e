"""The task lifecycle at an edge: admit, start, watch, health-check, restart, kill, recover.

States follow Mesos: ``pending`` -> ``staging`` -> (``starting`` while a health check has not
passed yet) -> ``running`` -> ``finished`` | ``failed`` | ``killed``, and ``lost`` when the agent
cannot know how a run ended. Every change is one store transaction with its event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.executor import Executor, Running, SpawnError, process_start_ticks
from edge_agent.faults import NO_FAULTS, Faults
from edge_agent.oci import ImageError, OciDriver
from edge_agent.policy import BACKOFF_RESET_AFTER, decide_restart, describe_exit
from edge_agent.reserve import Reserve
from edge_agent.scheduler import Capacity, admit, free_capacity
from edge_agent.staging import ArtifactRefused, ArtifactUnavailable, Stager
from edge_agent.store import Store
from federation.errors import Conflict, Invalid
from federation.loopguard import LoopGuard, stop_loops
from federation.outside import disk_full, outside_error
from federation.schemas import TERMINAL_STATES

log = logging.getLogger(__name__)

TICK = 0.25


@dataclass(slots=True)
class _Pending:
    resources: dict[str, Any]
    not_before: float
    reason: str | None


class Supervisor:
    """Owns every task on this agent from submission to its last exit."""

    def __init__(self, store: Store, executor: Executor, capacity: Capacity, boot: str, *,
                 stop_tasks_on_exit: bool, events_keep: int, max_tasks: int = 1000,
                 faults: Faults = NO_FAULTS, loops: LoopGuard | None = None,
                 reserve: Reserve | None = None, oci: OciDriver | None = None) -> None:
        self.faults = faults
        self.loops = loops or LoopGuard()
        self.reserve = reserve
        # Records (exits, starts) a full disk held back, per task in order; the tick retries.
        self.unrecorded: dict[str, list[Callable[[], object]]] = {}
        self.store = store
        self.oci = oci  # the container driver, when this agent has runc
        self.executor = executor
        self.capacity = capacity
        self.boot = boot
        self.stop_tasks_on_exit = stop_tasks_on_exit
        self.events_keep = events_keep
        self.max_tasks = max_tasks  # tasks not yet ended held at once (AgentConfig.max_tasks)
        self.reserved: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, _Pending] = {}
        self.exit_reasons: dict[str, str] = {}
        self.updating: set[str] = set()  # running tasks being stopped to restart with a new spec
        self.killing: set[str] = set()  # kills under way (also those a full disk kept unrecorded)
        self.health_tasks: dict[str, asyncio.Task[None]] = {}
        self.background: set[asyncio.Task[None]] = set()
        self.restarts_total = 0
        self.stopping = False
        self._ticker: asyncio.Task[None] | None = None
        self.stager: Stager | None = None  # set by the agent: fetches and places artifacts
        self.staging: dict[str, asyncio.Task[None]] = {}
        executor.on_exit = self._on_exit
        executor.on_started = self._started
        if oci is not None:
            oci.active = lambda: [*self.reserved, *self.pending]

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.recover()
        self.schedule()
        self._ticker = asyncio.create_task(self._tick_loop(), name="supervisor-tick")

    async def stop(self) -> None:
        self.stopping = True
        await stop_loops(self._ticker)
        for task in self.health_tasks.values():
            task.cancel()
        if self.stop_tasks_on_exit:
            kills = [self._kill_process(tid) for tid in list(self.executor.running)]
            await asyncio.gather(*kills, return_exceptions=True)
        await stop_loops(*self.background, *self.health_tasks.values(), errors=False)
        self.executor.detach_all()

    def free(self) -> Capacity:
        return free_capacity(self.capacity, list(self.reserved.values()))

    # ------------------------------------------------------------ submit and kill

    def submit(self, spec: dict[str, Any], origin: str = "edge",
               task_id: str | None = None) -> dict[str, Any]:
        need = spec["resources"]
        self._check_driver(spec)
        self._check_capacity(need)
        self._check_count()
        task_id = task_id or uuid.uuid4().hex
        # One commit for the submission and, when it fits, its admission (``staging``): every
        # state still gets its own event, but the disk is touched once. The process is spawned
        # only after that commit (``_start``), so no process ever runs for a task not on disk.
        try:
            with self.store.transaction():
                self.store.insert_task(task_id, spec, origin=origin, state="pending",
                                       reason="waiting to be scheduled")
                self.pending[task_id] = _Pending(need, 0.0, "waiting to be scheduled")
                self.schedule()
        except BaseException:
            self.pending.pop(task_id, None)  # not on disk: not pending either
            raise
        return self.store.to_api(self.store.row(task_id))

    def at_task_cap(self) -> bool:
        return self.store.count_active() >= self.max_tasks

    def _check_count(self) -> None:
        """Refuse a task past ``max_tasks`` (ended tasks do not count); nothing is stored."""
        active = self.store.count_active()
        if active >= self.max_tasks:
            raise Conflict(
                f"this agent already holds {active} tasks that have not ended, its most "
                f"(max_tasks {self.max_tasks}); kill or wait for some, or submit elsewhere",
                details={"limit": "max_tasks", "max_tasks": self.max_tasks, "active": active})

    def _check_driver(self, spec: dict[str, Any]) -> None:
        if spec.get("driver") == "oci" and self.oci is None:
            raise Invalid("driver: this agent has no OCI runtime (runc is not on its PATH); "
                          "run the task with driver process or on an agent that offers oci",
                          details={"field": "driver", "drivers": ["process"]})

    def _check_capacity(self, need: dict[str, Any]) -> None:
        """A task that could never fit this agent, even idle, is refused up front."""
        if not self.capacity.fits(need):
            raise Invalid(
                "resources: more than this agent has in all "
                f"({self.capacity.cpus:g} cpus, {self.capacity.mem_mb} MB memory, "
                f"{self.capacity.disk_mb} MB disk)",
                details={"field": "resources", "capacity": {
                    "cpus": self.capacity.cpus, "mem_mb": self.capacity.mem_mb,
                    "disk_mb": self.capacity.disk_mb}})

    async def kill(self, ref: str) -> tuple[bool, dict[str, Any]]:
        """Kill a task; (True, task) when the process is still being stopped."""
        return self.request_kill(ref)

    def request_kill(self, ref: str) -> tuple[bool, dict[str, Any]]:
        """The synchronous part of a kill: record it; the signals follow in the background.

        On a full disk the kill goes ahead even if it cannot be recorded: stopping the task
        (often the one filling the disk) matters more; its exit is recorded once there is room.
        """
        row = self.store.find(ref)
        task_id = row["id"]
        if row["state"] in TERMINAL_STATES and task_id not in self.pending:
            return False, self.store.to_api(row)
        if task_id in self.pending or task_id not in self.executor.running:
            self.pending.pop(task_id, None)
            self.reserved.pop(task_id, None)
            staging = self.staging.pop(task_id, None)
            if staging is not None:
                staging.cancel()
            row = self._must(lambda: self.store.update_task(
                task_id, state="killed", want="kill", reason="killed on request",
                not_before=None, finished_at=time.time()))
            return False, self.store.to_api(row)
        if row["want"] != "kill" and task_id not in self.killing:
            self.killing.add(task_id)
            self._spawn_bg(self._kill_process(task_id), f"kill-{task_id}")
            try:
                row = self._must(lambda: self.store.update_task(task_id, want="kill",
                                                                reason="kill requested"))
            except Exception as exc:
                if not disk_full(exc):
                    raise
                log.warning("disk full: killing task %s before its kill could be recorded",
                            task_id, extra={"task": task_id})
                task = self.store.to_api(row)
                task["want"] = "kill"
                return True, task
        return True, self.store.to_api(row)

    def _must(self, write: Any) -> Any:
        """A write the agent must make: on a full disk, release the reserve and try again."""
        try:
            return write()
        except Exception as exc:
            if not disk_full(exc) or self.reserve is None or not self.reserve.release():
                raise
        return write()

    def update(self, ref: str, spec: dict[str, Any], generation: int) -> dict[str, Any]:
        """Replace a task's spec, based on ``generation`` (the one the caller saw).

        A running task restarts with the new spec (not counted as a failure or a restart); a
        pending one just waits with the new resources. An old generation is a ``Conflict``.
        """
        row = self.store.find(ref)
        task_id = row["id"]
        if generation != row["generation"]:
            raise Conflict(f"task {task_id} is at generation {row['generation']}, not "
                           f"{generation}: read it again", details={
                               "generation": row["generation"]})
        if row["state"] in TERMINAL_STATES and task_id not in self.pending:
            raise Conflict(f"task {task_id} has ended ({row['state']}); submit a new one")
        if row["want"] == "kill":
            raise Conflict(f"task {task_id} is being killed")
        self._check_capacity(spec["resources"])
        new_gen = row["generation"] + 1
        self.store.replace_spec(task_id, spec, new_gen, f"updated to generation {new_gen}")
        if task_id in self.pending:
            self.pending[task_id].resources = spec["resources"]
            self.schedule()
        elif task_id in self.executor.running:
            self.updating.add(task_id)
            old = json.loads(row["spec"])
            self._spawn_bg(self.executor.kill(task_id, float(old["kill_timeout"])),
                           f"update-{task_id}")
        return self.store.to_api(self.store.row(task_id))

    async def _kill_process(self, task_id: str) -> None:
        spec = json.loads(self.store.row(task_id)["spec"])
        await self.executor.kill(task_id, float(spec["kill_timeout"]))

    def _spawn_bg(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # ------------------------------------------------------------ scheduling

    def schedule(self) -> None:
        """Start every pending task that is due and fits, in submission order."""
        if not self.pending or self.stopping:
            return
        now = time.time()
        due = [(tid, p.resources) for tid, p in self.pending.items() if p.not_before <= now]
        if not due:
            return
        result = admit(due, self.free())
        for task_id, reason in result.waiting.items():
            entry = self.pending[task_id]
            if entry.reason != reason:
                entry.reason = reason
                self.store.update_task(task_id, reason=reason)
        for task_id in result.start:
            self._start(task_id)

    def _start(self, task_id: str) -> None:
        """Admit: reserve and record ``staging`` (the intent); spawn once that is committed."""
        entry = self.pending.pop(task_id)
        self.reserved[task_id] = entry.resources

        def undo() -> None:
            self.reserved.pop(task_id, None)
            self.pending.setdefault(task_id, entry)

        self.executor.clear_run(task_id)  # a restart: the last run's files must not be read
        spec = json.loads(self.store.row(task_id)["spec"])
        uses = spec.get("artifacts")
        if uses and self.stager is not None:
            sandbox = self.executor.task_dir(task_id) / "sandbox"
            with contextlib.suppress(OSError):  # then staged the long way, with retries
                if self.stager.place_cached(task_id, uses, sandbox):
                    uses = None
        self.store.update_task(task_id, state="staging", not_before=None,
                               reason="staging artifacts" if uses else None)
        stage = bool(uses)
        self.store.after_commit(lambda: self._launch(task_id, stage), undo=undo)

    def _launch(self, task_id: str, stage: bool) -> None:
        """Stage or spawn a committed ``staging`` task (unless a kill or a stop came first)."""
        row = self.store.row(task_id)
        if row["state"] != "staging" or task_id in self.executor.running or self.stopping:
            if row["state"] != "staging":
                self.reserved.pop(task_id, None)
            return
        if row["want"] == "kill":
            self.reserved.pop(task_id, None)
            self.store.update_task(task_id, state="killed", reason="killed on request",
                                   finished_at=time.time())
            return
        spec = json.loads(row["spec"])
        if stage:
            job = asyncio.create_task(self._stage(task_id, spec), name=f"stage-{task_id}")
            self.staging[task_id] = job
            self.background.add(job)
            job.add_done_callback(self.background.discard)
            job.add_done_callback(lambda _: self.staging.pop(task_id, None))
            return
        self._spawn(task_id, spec)

    def _still_staging(self, task_id: str) -> bool:
        row = self.store.row(task_id)
        return row["state"] == "staging" and row["want"] != "kill" and not self.stopping

    async def _stage(self, task_id: str, spec: dict[str, Any]) -> None:
        """Fetch and place the task's artifacts, then start it; not available yet: stay
        ``staging`` with the reason and try again (1 s doubling to 30 s); refused: failed."""
        delay = 1.0
        last_reason: list[str] = [""]

        def progress(text: str) -> None:
            if text != last_reason[0] and self._still_staging(task_id):
                last_reason[0] = text
                self.store.update_task(task_id, reason=text)

        sandbox = self.executor.task_dir(task_id) / "sandbox"
        while True:
            try:
                if self.stager is None:
                    raise ArtifactRefused("this agent has no artifact cache")
                await self.stager.place(task_id, spec["artifacts"], sandbox, progress)
                break
            except ArtifactRefused as exc:
                if self._still_staging(task_id):
                    self.reserved.pop(task_id, None)
                    log.warning("task refused its artifact: %s", exc, extra={"task": task_id})
                    self._ended(task_id, None, f"artifact refused: {exc}", failed=True)
                    self.schedule()
                return
            except (ArtifactUnavailable, OSError) as exc:
                if not self._still_staging(task_id):
                    return
                progress(f"waiting for artifact: {exc}; retrying in {delay:g}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        if self._still_staging(task_id):
            self._spawn(task_id, spec)

    def _spawn(self, task_id: str, spec: dict[str, Any]) -> None:
        """Start a committed task whose artifacts (if any) are in place, by its driver."""
        if spec.get("driver") == "oci":
            self._start_container(task_id, spec)
        else:
            self._run(task_id, spec, None)

    def _run(self, task_id: str, spec: dict[str, Any],
             launch: tuple[list[str], dict[str, str]] | None) -> None:
        try:
            run = self.executor.spawn(task_id, spec, launch)
        except SpawnError as exc:
            why = str(exc)
            self.reserved.pop(task_id, None)
            self._record(task_id, "a failed start", lambda: self._spawn_failed(task_id, why))
            return
        self.faults.after_spawn()
        if launch is not None:
            self._hook_container(task_id, run)
        health = spec.get("health")
        started = time.time()
        self._record(task_id, "the start", lambda: self.store.update_task(
            task_id, state="starting" if health else "running", pid=run.pid,
            pid_start=None, boot_id=self.boot, started_at=started,
            exit_code=None, healthy=None))
        if health:
            self._watch_health(task_id, spec)

    # ------------------------------------------------------------ containers

    def _start_container(self, task_id: str, spec: dict[str, Any]) -> None:
        """Run at once when the image is unpacked already; else unpack it in the background
        (the task stays ``staging``) and run when that is done."""
        if self.oci is None:
            self._spawn_failed(task_id, "this agent has no OCI runtime (runc is not on PATH)")
            return
        image = self.oci.cached(task_id, spec)
        if image is None:
            self.store.update_task(task_id, reason="unpacking the image")
            self._spawn_bg(self._stage_image(task_id, spec), f"image-{task_id}")
            return
        self._run_container(task_id, spec, image)

    async def _stage_image(self, task_id: str, spec: dict[str, Any]) -> None:
        """Fetch (an artifact image) and unpack the image, then run the container. An
        artifact that cannot be had yet keeps the task ``staging`` with the reason and is
        tried again (1 s doubling to 30 s), as for a task's other artifacts."""
        assert self.oci is not None
        delay = 1.0
        while True:
            try:
                image = await self.oci.stage(task_id, spec)
                break
            except ArtifactUnavailable as exc:
                if not self._still_staging(task_id):
                    self.reserved.pop(task_id, None)
                    return
                self.store.update_task(task_id, reason=f"waiting for the image artifact: "
                                       f"{exc}; retrying in {delay:g}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception as exc:  # noqa: BLE001 (a task never stays staging on a surprise)
                if not isinstance(exc, ImageError | OSError | ArtifactRefused):
                    log.exception("image staging failed", extra={"task": task_id})
                if self.store.row(task_id)["state"] == "staging":
                    self._spawn_failed(task_id, f"image: {exc}")
                    self.schedule()
                return
        row = self.store.row(task_id)
        if row["state"] != "staging" or row["want"] == "kill" or self.stopping:
            self.reserved.pop(task_id, None)  # killed (or the agent stopping) meanwhile
            return
        self._run_container(task_id, spec, image)

    def _run_container(self, task_id: str, spec: dict[str, Any], image: Any) -> None:
        assert self.oci is not None
        try:
            launch = self.oci.launch(task_id, spec, image)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._spawn_failed(task_id, f"cannot write the container bundle: {exc}")
            return
        self._run(task_id, spec, (launch.argv, launch.env))

    def _spawn_failed(self, task_id: str, why: str) -> None:
        self.reserved.pop(task_id, None)
        with self.store.transaction():
            self._ended(task_id, None, why, failed=True, spawn_failed=True)

    def _hook_container(self, task_id: str, run: Running) -> None:
        oci = self.oci
        if oci is None:
            return

        def reaped() -> None:
            reason = oci.finish(task_id)
            if reason is not None:
                self.exit_reasons.setdefault(task_id, reason)

        run.on_reap = reaped
        run.hard_kill = lambda: oci.kill_all(task_id)

    async def _tick_loop(self) -> None:
        last_rotate = last_prune = time.monotonic()
        self.faults.hold_the_loop()
        while True:
            await self.loops.pause("supervisor-tick", TICK)
            with self.loops.guard("supervisor-tick"):
                now = time.time()
                if any(p.not_before and p.not_before <= now for p in self.pending.values()):
                    self.schedule()
                if self.unrecorded:
                    self.record_unrecorded()
                mono = time.monotonic()
                if mono - last_rotate > 5:
                    last_rotate = mono
                    self.executor.rotate_logs()
                    if self.reserve is not None:
                        self.reserve.ensure()  # again, once the disk has room
                if mono - last_prune > 30:
                    last_prune = mono
                    self.store.prune_events(self.events_keep)
                    # Task cgroups whose stray processes outlived the task's exit.
                    self.executor.isolation.sweep(set(self.executor.running))

    # ------------------------------------------------------------ exits

    def _on_exit(self, task_id: str, code: int | None) -> None:
        """Record an exit; on a full disk it is kept (``unrecorded``) until there is room."""
        health = self.health_tasks.pop(task_id, None)
        if health:
            health.cancel()
        self.reserved.pop(task_id, None)
        if self._record(task_id, f"exit {code}", lambda: self._record_exit(task_id, code)):
            self.schedule()

    def _record(self, task_id: str, what: str, write: Callable[[], object]) -> bool:
        """Make a record the agent must keep; on a full disk (even with the reserve spent)
        hold it, in order with the task's other held records, for the tick. True if made."""
        if task_id in self.unrecorded:
            self.unrecorded[task_id].append(write)
            return False
        try:
            self._must(write)
        except Exception as exc:
            if not disk_full(exc):
                raise
            self.unrecorded[task_id] = [write]
            log.warning("disk full: %s of task %s kept until it can be recorded", what,
                        task_id, extra={"task": task_id})
            return False
        return True

    def record_unrecorded(self) -> None:
        """Make the records a full disk held back (each tick, until there is room)."""
        for task_id, writes in list(self.unrecorded.items()):
            while writes:
                try:
                    writes[0]()
                except Exception as exc:
                    if outside_error(exc) is None:
                        raise
                    return  # still full: the next tick tries again
                writes.pop(0)
            del self.unrecorded[task_id]
            log.info("recorded what task %s did while the disk was full", task_id,
                     extra={"task": task_id})
        self.schedule()

    def _started(self, task_id: str, pid: int, start_ticks: int) -> None:
        """Note a run's start ticks (for re-adoption; without them a restarted agent finds
        the process by its argv in /proc, so a full disk here only costs a warning)."""
        try:
            self.store.set_pid_start(task_id, pid, start_ticks)
        except Exception as exc:
            if outside_error(exc) is None:
                raise
            log.warning("cannot record the start of task %s: %s", task_id, exc,
                        extra={"task": task_id})

    def _record_exit(self, task_id: str, code: int | None) -> None:
        """The store's side of an exit, in one transaction (so a retry after a full disk
        never records half of it twice)."""
        with self.store.transaction():
            self._exit_in_tx(task_id, code)
        self.killing.discard(task_id)
        self.updating.discard(task_id)
        self.exit_reasons.pop(task_id, None)

    def _exit_in_tx(self, task_id: str, code: int | None) -> None:
        if self.stopping and self.stop_tasks_on_exit:
            self.reserved.pop(task_id, None)
            self.store.update_task(task_id, state="killed", exit_code=code, pid=None,
                                   reason="stopped with the agent", finished_at=time.time())
            return
        override = self.exit_reasons.get(task_id)
        if task_id in self.updating:
            row = self.store.row(task_id)
            if row["want"] != "kill":
                spec = json.loads(row["spec"])
                reason = f"restarting with generation {row['generation']}"
                self.store.update_task(task_id, state="pending", exit_code=code, pid=None,
                                       healthy=None, reason=reason, finished_at=time.time())
                self.pending[task_id] = _Pending(spec["resources"], 0.0, reason)
                return
        if override:
            self._ended(task_id, code, override, failed=True)
        else:
            self._ended(task_id, code, None, failed=code != 0)

    def _ended(self, task_id: str, code: int | None, reason: str | None, *, failed: bool,
               spawn_failed: bool = False, lost: bool = False) -> None:
        """Record how a run ended, then apply the restart policy."""
        row = self.store.row(task_id)
        spec = json.loads(row["spec"])
        now = time.time()
        if row["want"] == "kill" or task_id in self.killing:
            self.store.update_task(task_id, state="killed", exit_code=code, pid=None,
                                   healthy=None, reason="killed on request (" +
                                   describe_exit(code) + ")", finished_at=now)
            return
        state = "lost" if lost else ("failed" if failed else "finished")
        ran = now - (row["started_at"] or now)
        failures = 0 if not failed else (1 if ran >= BACKOFF_RESET_AFTER else row["failures"] + 1)
        why = reason or describe_exit(code)
        self.store.update_task(task_id, state=state, exit_code=code, pid=None, healthy=None,
                               reason=why, failures=failures, finished_at=now)
        decision = decide_restart(spec["restart"], failed=failed or lost,
                                  restarts=row["restarts"], failures=max(failures, 1))
        if not decision.restart:
            if spec["restart"]["policy"] != "never":
                self.store.update_task(task_id, reason=f"{why}; {decision.why}")
            return
        self.restarts_total += 1
        reason_text = f"{decision.why} after {why}"
        self.store.update_task(task_id, state="pending", restarts=row["restarts"] + 1,
                               not_before=now + decision.delay, reason=reason_text)
        self.pending[task_id] = _Pending(spec["resources"], now + decision.delay, reason_text)
        # Wake exactly when the backoff ends (the tick is only a safety net).
        asyncio.get_running_loop().call_later(decision.delay, self.schedule)
        log.info("task ended (%s); %s", why, decision.why,
                 extra={"task": task_id, "exit_code": code})

    # ------------------------------------------------------------ health

    def _watch_health(self, task_id: str, spec: dict[str, Any]) -> None:
        old = self.health_tasks.pop(task_id, None)
        if old:
            old.cancel()
        self.health_tasks[task_id] = asyncio.create_task(
            self._health_loop(task_id, spec), name=f"health-{task_id}")

    async def _health_loop(self, task_id: str, spec: dict[str, Any]) -> None:
        check = spec["health"]
        await asyncio.sleep(check["grace"])
        misses = 0
        healthy: bool | None = None
        while True:
            ok, detail = await self._probe(task_id, spec)
            if ok:
                misses = 0
                if healthy is not True:
                    healthy = True
                    self.store.update_task(task_id, state="running", healthy=1)
            else:
                misses += 1
                if misses >= check["retries"]:
                    log.info("task unhealthy: %s", detail, extra={"task": task_id})
                    self.store.update_task(task_id, healthy=0)
                    self.exit_reasons[task_id] = (
                        f"unhealthy: {misses} failed checks in a row ({detail})")
                    self.health_tasks.pop(task_id, None)
                    await self.executor.kill(task_id, float(spec["kill_timeout"]))
                    return
            await asyncio.sleep(check["interval"])

    async def _probe(self, task_id: str, spec: dict[str, Any]) -> tuple[bool, str]:
        check = spec["health"]
        env = {**self.executor.base_env, **spec.get("env", {}), "OUTPOST_TASK_ID": task_id}
        command = list(check["command"])
        if spec.get("driver") == "oci" and self.oci is not None:
            command, env = self.oci.exec_argv(task_id, command), dict(self.executor.base_env)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                cwd=self.executor.task_dir(task_id) / "sandbox", env=env)
        except OSError as exc:
            return False, f"check cannot start: {exc}"
        try:
            code = await asyncio.wait_for(proc.wait(), check["timeout"])
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return False, f"check timed out after {check['timeout']:g}s"
        return code == 0, f"check exit {code}"

    # ------------------------------------------------------------ recovery

    def recover(self) -> None:
        """After an agent (re)start: re-adopt live tasks, settle the ones that ended meanwhile,
        start again what was admitted but never spawned, and stop any process of ours whose
        task is not on disk (or has ended): never an orphan."""
        adopted = ended = 0
        live = self.executor.live_wrappers()
        for row in self.store.active_rows():
            task_id, spec = row["id"], json.loads(row["spec"])
            if row["state"] == "pending":
                if row["want"] == "kill":
                    self.store.update_task(task_id, state="killed", reason="killed on request",
                                           finished_at=time.time())
                    continue
                self.pending[task_id] = _Pending(spec["resources"], row["not_before"] or 0.0,
                                                 row["reason"])
                continue
            pid, start = row["pid"], row["pid_start"]
            if (pid is None or start is None) and task_id in live:  # crashed before recording
                pid = live[task_id]
                start = process_start_ticks(pid)
            if (row["state"] == "staging" and pid is None and row["want"] != "kill"
                    and not self.executor.ever_spawned(task_id)):
                # Admitted and committed, but the agent stopped before the spawn (or while
                # fetching its artifacts): start it now (staging again from the cache, or
                # resuming the fetch); nothing was started.
                self.store.update_task(task_id, state="pending", reason="starting again: the "
                                       "agent stopped before this task was started")
                self.pending[task_id] = _Pending(spec["resources"], 0.0, None)
                continue
            run = None
            if pid is not None and (row["boot_id"] in (None, self.boot)):
                run = self.executor.adopt(task_id, pid, start)
            if run is not None:
                adopted += 1
                if spec.get("driver") == "oci":
                    self._hook_container(task_id, run)
                self.reserved[task_id] = spec["resources"]
                if row["pid"] != pid or row["pid_start"] != start or row["state"] == "staging":
                    state = "starting" if spec.get("health") else "running"
                    self.store.update_task(task_id, state=state, pid=pid, pid_start=start,
                                           boot_id=self.boot, started_at=time.time())
                if row["want"] == "kill":
                    self._spawn_bg(self._kill_process(task_id), f"kill-{task_id}")
                elif spec.get("health"):
                    self._watch_health(task_id, spec)
                continue
            ended += 1
            rebooted = row["boot_id"] not in (None, self.boot)
            code = None if rebooted else self.executor.recorded_exit(task_id)
            verdict = None
            if spec.get("driver") == "oci" and self.oci is not None:
                verdict = self.oci.finish(task_id)  # the container left behind, deleted
            if verdict is not None:
                self._ended(task_id, code, verdict + " while the agent was down", failed=True)
            elif code is not None:
                self._ended(task_id, code, describe_exit(code) + " while the agent was down",
                            failed=code != 0)
            else:
                why = ("host rebooted; the process is gone" if rebooted
                       else "process ended while the agent was down; exit status unknown")
                self._ended(task_id, None, why, failed=True, lost=True)
        stopped = self.executor.stop_unknown(live, self.store.known_task_ids(list(live)))
        swept = self.executor.isolation.sweep(set(self.executor.running))
        if swept:
            log.info("removed %d cgroups no process used", swept)
        if adopted or ended or stopped:
            log.info("recovered tasks: %d re-adopted, %d ended while down, %d unknown "
                     "processes stopped", adopted, ended, stopped)

    def snapshot(self) -> dict[str, Any]:
        """Every task not yet ended, for the core to reconcile its view after a reconnect."""
        return {"tasks": [self.store.to_api(r) for r in self.store.active_rows()]}
