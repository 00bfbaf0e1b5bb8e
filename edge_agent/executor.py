"""Starts, watches, signals and re-adopts task processes.

Each task runs as ``sh wrapper.sh`` in its own session (so signals reach its whole process
group and it survives the agent), with stdout/stderr appended straight to files in the task's
directory. Exits are noticed through a pidfd on the event loop: no thread per child, no polling,
and it works the same for a child we spawned and for a process re-adopted after an agent crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.isolation import DEFAULT_NOFILE, Isolation

log = logging.getLogger(__name__)

WRAPPER = str(Path(__file__).with_name("wrapper.sh"))
ExitCallback = Callable[[str, "int | None"], None]
START_TICKS_DELAY = 0.05
EXIT_SLOT_BYTES = 16


class SpawnError(Exception):
    """The command could not be started at all (not found, not executable, cgroup refused)."""


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def process_start_ticks(pid: int) -> int | None:
    """Start time of a live ``pid`` in clock ticks since boot: with the pid, a unique process
    name. None when there is no such process or it has already exited (a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces or parentheses; fields resume after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass(slots=True)
class Running:
    """A live task process: ``pid`` (also its process group), its start ticks, its pidfd."""

    task_id: str
    pid: int
    start_ticks: int | None
    pidfd: int
    child: bool
    exited: asyncio.Future[int | None] = field(repr=False)
    # Driver hooks (containers): run when the wrapper is gone, before its cgroup is released;
    # and a SIGKILL of processes the wrapper's process group does not hold.
    on_reap: Callable[[], None] | None = field(default=None, repr=False)
    hard_kill: Callable[[], None] | None = field(default=None, repr=False)


class Executor:
    """Owns every task process the agent knows; reports each exit once through ``on_exit``."""

    def __init__(self, tasks_dir: Path, isolation: Isolation, base_env: dict[str, str],
                 on_exit: ExitCallback, log_max_bytes: int, log_keep: int) -> None:
        self.tasks_dir = tasks_dir
        self.isolation = isolation
        self.base_env = base_env
        self.on_exit = on_exit
        self.on_started: Callable[[str, int, int], None] = lambda *_: None
        self.log_max_bytes = log_max_bytes
        self.log_keep = log_keep
        self.running: dict[str, Running] = {}
        self.spawned = 0
        tasks_dir.mkdir(parents=True, exist_ok=True)

    def task_dir(self, task_id: str) -> Path:
        return self.tasks_dir / task_id

    def log_path(self, task_id: str, stream: str) -> Path:
        return self.task_dir(task_id) / f"{stream}.log"

    # ------------------------------------------------------------ start

    def spawn(self, task_id: str, spec: dict[str, Any],
              launch: tuple[list[str], dict[str, str]] | None = None) -> Running:
        """Start ``spec['command']`` now; raises ``SpawnError`` if it cannot start.

        ``launch`` (argv, env) replaces the command for a driver (runc for a container): the
        wrapper runs it without joining cgroups, since the runtime makes the container's."""
        if launch is None:
            argv = list(spec["command"])
            env = {**self.base_env, **spec.get("env", {}),
                   "OUTPOST_TASK_ID": task_id, "OUTPOST_TASK_NAME": spec["name"]}
        else:
            argv, env = list(launch[0]), dict(launch[1])
        if "/" not in argv[0] and shutil.which(argv[0], path=env.get("PATH")) is None:
            raise SpawnError(f"command not found: {argv[0]}")
        tdir = self.task_dir(task_id)
        # A relative path is the sandbox's (the wrapper runs the task there): an artifact's
        # binary placed at dest "bin/app" runs as "./bin/app".
        exe = argv[0] if argv[0].startswith("/") else str(tdir / "sandbox" / argv[0])
        if "/" in argv[0] and not os.access(exe, os.X_OK):
            raise SpawnError(f"not an executable file: {argv[0]}")
        self.clear_run(task_id)
        os.makedirs(tdir / "sandbox", exist_ok=True)
        try:
            procs = [] if launch else self.isolation.prepare(task_id, spec["resources"])
        except OSError as exc:
            raise SpawnError(f"cannot set up isolation: {exc}") from None
        as_kb = 0 if launch else self.isolation.address_space_kb(spec["resources"])
        wrapper_argv = ["sh", WRAPPER, str(tdir), str(DEFAULT_NOFILE), str(as_kb), *procs,
                        "--", *argv]
        try:  # where the wrapper writes the exit status when the disk is full by then
            (tdir / "exit.slot").write_bytes(b" " * EXIT_SLOT_BYTES)
        except OSError as exc:
            raise SpawnError(f"cannot start: {exc}") from None
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        out = os.open(tdir / "stdout.log", flags, 0o640)
        err = os.open(tdir / "stderr.log", flags, 0o640)
        try:
            pid = os.posix_spawn(
                "/bin/sh", wrapper_argv, env,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, err, 2)],
                setsid=True)
        except OSError as exc:
            raise SpawnError(f"cannot start: {exc}") from None
        finally:
            os.close(out)
            os.close(err)
        self.spawned += 1
        pidfd = os.pidfd_open(pid)
        run = self._watch(task_id, pid, None, pidfd, child=True)
        # Reading /proc/<pid>/stat while the new process is still loading contends with it
        # (~1 ms here); the start time is only needed for re-adoption, so read it a bit later.
        asyncio.get_running_loop().call_later(START_TICKS_DELAY, self._note_start, run)
        return run

    def _note_start(self, run: Running) -> None:
        if self.running.get(run.task_id) is run and run.start_ticks is None:
            run.start_ticks = process_start_ticks(run.pid)
            if run.start_ticks is not None:
                self.on_started(run.task_id, run.pid, run.start_ticks)

    def adopt(self, task_id: str, pid: int, start_ticks: int | None) -> Running | None:
        """Watch a process left by a previous agent run, if it is still that very process."""
        try:
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            return None
        # Checked after opening the pidfd: it pins the process, so a pid reused later cannot
        # slip in between the check and the watch.
        if start_ticks is None or process_start_ticks(pid) != start_ticks:
            os.close(pidfd)
            return None
        return self._watch(task_id, pid, start_ticks, pidfd, child=False)

    def live_wrappers(self) -> dict[str, int]:
        """Our wrappers alive now, found in /proc (their argv holds this agent's task dirs):
        task id -> pid. Each is a session leader (spawned with setsid), which tells it from
        the short-lived forks of itself it makes to run the command."""
        prefix = str(self.tasks_dir).encode() + b"/"
        found: dict[str, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if (len(argv) > 2 and argv[1] == WRAPPER.encode() and argv[2].startswith(prefix)
                    and stat[0] not in ("Z", "X") and int(stat[3]) == int(entry.name)):
                found[argv[2][len(prefix):].decode(errors="replace")] = int(entry.name)
        return found

    def stop_unknown(self, live: dict[str, int], known: set[str]) -> int:
        """SIGKILL the wrappers in ``live`` this executor does not watch (their task never
        committed, or has ended); drop the dirs of tasks not in ``known``. Returns how many."""
        stopped = 0
        for task_id, pid in live.items():
            if task_id in self.running:
                continue
            log.warning("stopping process %d of task %s: %s", pid, task_id,
                        "its task was never recorded" if task_id not in known
                        else "its task has ended", extra={"task": task_id})
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            self.isolation.kill_all(task_id)
            self.isolation.release(task_id)
            if task_id not in known and "/" not in task_id:
                shutil.rmtree(self.task_dir(task_id), ignore_errors=True)
            stopped += 1
        return stopped

    def clear_run(self, task_id: str) -> None:
        """Forget what the previous run of a restarted task left (its pid and exit files)."""
        for stale in ("exit", "exit.tmp", "exit.slot", "run.pid"):
            with contextlib.suppress(FileNotFoundError):
                (self.task_dir(task_id) / stale).unlink()

    def ever_spawned(self, task_id: str) -> bool:
        """Whether a wrapper ever ran for this run (it writes ``run.pid`` first thing)."""
        return ((self.task_dir(task_id) / "run.pid").exists()
                or self.recorded_exit(task_id) is not None)

    def _watch(self, task_id: str, pid: int, start: int | None, pidfd: int,
               child: bool) -> Running:
        loop = asyncio.get_running_loop()
        run = Running(task_id, pid, start, pidfd, child, loop.create_future())
        self.running[task_id] = run
        loop.add_reader(pidfd, self._reap, run)
        return run

    # ------------------------------------------------------------ exit

    def _reap(self, run: Running) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(run.pidfd)
        os.close(run.pidfd)
        code = self.recorded_exit(run.task_id)
        if run.child:
            try:
                _, status = os.waitpid(run.pid, 0)
                waited = os.waitstatus_to_exitcode(status)
                if code is None:
                    code = 128 - waited if waited < 0 else waited
            except ChildProcessError:
                pass
        self.running.pop(run.task_id, None)
        if run.on_reap is not None:
            try:
                run.on_reap()
            except Exception:  # a driver's clean-up must not lose the exit
                log.exception("driver clean-up failed", extra={"task": run.task_id})
        self.isolation.release(run.task_id)
        if not run.exited.done():
            run.exited.set_result(code)
        self.on_exit(run.task_id, code)

    def recorded_exit(self, task_id: str) -> int | None:
        """The exit status the wrapper wrote, if it got to write one (in ``exit``, or in
        ``exit.slot`` when the disk was full)."""
        for name in ("exit", "exit.slot"):
            try:
                return int((self.task_dir(task_id) / name).read_text())
            except (FileNotFoundError, ValueError):
                continue
        return None

    # ------------------------------------------------------------ stop

    async def kill(self, task_id: str, grace: float) -> None:
        """SIGTERM the task's process group, then SIGKILL it (and its cgroup) after ``grace`` s."""
        run = self.running.get(task_id)
        if run is None:
            return
        self._signal(run, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(run.exited), grace)
            return
        except TimeoutError:
            log.info("task did not stop in %.1fs; SIGKILL", grace, extra={"task": task_id})
        # The task's cgroup first: a container (own session, own pid namespace) is not in the
        # wrapper's process group, and once it is gone runc and the wrapper exit on their own.
        self.isolation.kill_all(task_id)
        if run.hard_kill is not None:
            run.hard_kill()
        self._signal(run, signal.SIGKILL)
        await asyncio.shield(run.exited)

    def _signal(self, run: Running, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, sig)

    def detach_all(self) -> None:
        """Stop watching (agent shutdown without stopping tasks): processes keep running."""
        loop = asyncio.get_running_loop()
        for run in list(self.running.values()):
            loop.remove_reader(run.pidfd)
            os.close(run.pidfd)
            if not run.exited.done():
                run.exited.cancel()
        self.running.clear()

    # ------------------------------------------------------------ logs

    def rotate_logs(self) -> int:
        """Copy-and-truncate logs over the size limit (tasks keep their O_APPEND fds).

        One log that cannot be rotated does not stop the others; on a full disk the copy is
        given up and the log truncated anyway (its lines are lost, the disk gets room).
        """
        rotated = 0
        for task_id in list(self.running):
            for stream in ("stdout", "stderr"):
                path = self.log_path(task_id, stream)
                try:
                    if path.stat().st_size <= self.log_max_bytes:
                        continue
                    self._rotate(path)
                    rotated += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("cannot rotate %s: %s", path, exc, extra={"task": task_id})
        return rotated

    def _rotate(self, path: Path) -> None:
        for n in range(self.log_keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{n + 1}"))
        if self.log_keep > 0:
            copy = path.with_name(f"{path.name}.1")
            try:
                shutil.copyfile(path, copy)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                with contextlib.suppress(OSError):
                    copy.unlink()
                log.warning("disk full: %s truncated without keeping a copy (%d bytes lost)",
                            path, path.stat().st_size)
        os.truncate(path, 0)
