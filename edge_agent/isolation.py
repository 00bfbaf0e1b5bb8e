"""Resource isolation for task processes: cgroup v2, cgroup v1, or rlimits only.

One small interface (``Isolation``) chosen once at start and reported in ``/v1/info``. The task
wrapper joins the cgroups itself (it writes its pid to each ``cgroup.procs`` before running the
command), so nothing runs between fork and exec in the agent.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CFS_PERIOD_US = 100_000
DEFAULT_NOFILE = 4096
# A task cgroup of another agent with no process for this long is a leftover: the wrapper joins
# its cgroup milliseconds after the agent creates it.
STALE_S = 60.0
PREFIX = "outpost-"


def _rmdir(path: Path) -> bool:
    """Remove a cgroup dir; False while it holds processes or child cgroups."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return False
    except OSError:
        return False
    return True


def _children(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []


def _has_procs(path: Path) -> bool:
    try:
        return bool((path / "cgroup.procs").read_text().split())
    except OSError:
        return False


def sweep_roots(roots: list[Path], keep: set[str], now: float | None = None) -> int:
    """Remove what no process uses any more under ``roots`` (this agent's, one per hierarchy):
    task cgroups not in ``keep`` without processes, and beside each root the ``outpost-*`` dirs
    of earlier agents (their task cgroups idle for ``STALE_S``, then the dir once empty). An
    agent whose empty root is removed here makes it again at its next task."""
    now = time.time() if now is None else now
    removed = 0
    for root in roots:
        for child in _children(root):
            if child.name not in keep and not _has_procs(child) and _rmdir(child):
                removed += 1
        for other in _children(root.parent):
            if not other.name.startswith(PREFIX) or other == root:
                continue
            for child in _children(other):
                try:
                    idle = now - child.stat().st_mtime
                except OSError:
                    continue
                if idle > STALE_S and not _has_procs(child) and _rmdir(child):
                    removed += 1
            if not _children(other) and _rmdir(other):
                removed += 1
    return removed


class Isolation:
    """rlimits only: the fallback when no cgroup hierarchy is writable.

    Memory is bounded by RLIMIT_AS (address space, not resident memory), so it is coarser than
    a cgroup; CPU is not bounded.
    """

    name = "rlimit"

    def prepare(self, task_id: str, resources: dict[str, Any]) -> list[str]:
        """Creates the task's cgroups; returns the ``cgroup.procs`` files to join."""
        return []

    def address_space_kb(self, resources: dict[str, Any]) -> int:
        return int(resources.get("mem_mb", 0)) * 1024

    def pids(self, task_id: str) -> list[int]:
        return []

    def kill_all(self, task_id: str) -> None:
        for pid in self.pids(task_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def release(self, task_id: str) -> None:
        """Removes the task's cgroups once its processes are gone."""

    def sweep(self, keep: set[str]) -> int:
        """Removes cgroups no task in ``keep`` uses (and earlier agents' leftovers)."""
        return 0

    def close(self) -> None:
        """At agent stop: removes the agent's own cgroup dirs if no task is left in them."""

    def memory_usage(self, task_id: str) -> int | None:
        return None

    def runtime_cgroup(self, task_id: str) -> str | None:
        """The ``cgroupsPath`` a container runtime gives this task's container, so the
        container's cgroup is the very one this isolation would make (usage, kill-all and
        release then see it like any task's); None: the runtime's default."""
        return None

    def oom_killed(self, task_id: str) -> bool:
        """Whether the kernel's OOM killer ended a process of the task's (still kept) cgroup."""
        return False


def _make_cgroup(path: Path) -> None:
    """``mkdir -p`` that survives another agent's sweep removing the (empty) parent between
    the two mkdirs (seen here: "No such file or directory" for a task's cgroup)."""
    for attempt in range(5):
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            if attempt == 4:
                raise


class CgroupV1(Isolation):
    """Controllers ``memory``, ``cpu`` (and ``pids``) as separate v1 hierarchies."""

    name = "cgroup-v1"

    def __init__(self, mounts: dict[str, Path], subdir: str) -> None:
        self.subdir = subdir
        self.roots = {ctrl: mount / subdir for ctrl, mount in mounts.items()}
        for root in self.roots.values():
            root.mkdir(parents=True, exist_ok=True)

    def address_space_kb(self, resources: dict[str, Any]) -> int:
        return 0

    def prepare(self, task_id: str, resources: dict[str, Any]) -> list[str]:
        procs = []
        for ctrl, root in self.roots.items():
            path = root / task_id
            _make_cgroup(path)  # the root too, if a sweep removed it
            if ctrl == "memory":
                (path / "memory.limit_in_bytes").write_text(
                    str(int(resources["mem_mb"]) * 1024 * 1024))
            elif ctrl == "cpu":
                (path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                quota = max(int(float(resources["cpus"]) * CFS_PERIOD_US), 1000)
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            procs.append(str(path / "cgroup.procs"))
        return procs

    def pids(self, task_id: str) -> list[int]:
        path = self.roots.get("memory", next(iter(self.roots.values()))) / task_id
        try:
            return [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except (FileNotFoundError, ValueError):
            return []

    def release(self, task_id: str) -> None:
        for root in self.roots.values():
            try:
                (root / task_id).rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove cgroup %s: %s", root / task_id, exc)

    def sweep(self, keep: set[str]) -> int:
        return sweep_roots(list(self.roots.values()), keep)

    def close(self) -> None:
        for root in self.roots.values():
            _rmdir(root)

    def memory_usage(self, task_id: str) -> int | None:
        try:
            return int((self.roots["memory"] / task_id / "memory.usage_in_bytes").read_text())
        except (KeyError, FileNotFoundError, ValueError):
            return None

    def runtime_cgroup(self, task_id: str) -> str | None:
        # Relative: runc joins it to its own cgroup in each hierarchy, the agent's (the v1
        # controllers may sit at different paths), exactly as ``roots`` were made.
        return f"{self.subdir}/{task_id}"

    def oom_killed(self, task_id: str) -> bool:
        return _counter(self.roots.get("memory", Path("/nonexistent")) / task_id /
                        "memory.oom_control", "oom_kill") > 0


class CgroupV2(Isolation):
    """One unified hierarchy; ``memory.max`` and ``cpu.max`` per task."""

    name = "cgroup-v2"

    def __init__(self, root: Path, base: Path = Path("/sys/fs/cgroup")) -> None:
        self.root = root
        self.base = base

    def address_space_kb(self, resources: dict[str, Any]) -> int:
        return 0

    def prepare(self, task_id: str, resources: dict[str, Any]) -> list[str]:
        if not self.root.exists():  # removed by another agent's sweep while it was empty
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "cgroup.subtree_control").write_text("+memory +cpu")
        path = self.root / task_id
        path.mkdir(exist_ok=True)
        (path / "memory.max").write_text(str(int(resources["mem_mb"]) * 1024 * 1024))
        quota = max(int(float(resources["cpus"]) * CFS_PERIOD_US), 1000)
        (path / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        return [str(path / "cgroup.procs")]

    def pids(self, task_id: str) -> list[int]:
        try:
            return [int(p) for p in (self.root / task_id / "cgroup.procs").read_text().split()]
        except (FileNotFoundError, ValueError):
            return []

    def kill_all(self, task_id: str) -> None:
        kill_file = self.root / task_id / "cgroup.kill"
        if kill_file.exists():
            try:
                kill_file.write_text("1")
                return
            except OSError:
                pass
        super().kill_all(task_id)

    def release(self, task_id: str) -> None:
        try:
            (self.root / task_id).rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove cgroup %s: %s", self.root / task_id, exc)

    def sweep(self, keep: set[str]) -> int:
        return sweep_roots([self.root], keep)

    def close(self) -> None:
        _rmdir(self.root)

    def memory_usage(self, task_id: str) -> int | None:
        try:
            return int((self.root / task_id / "memory.current").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def runtime_cgroup(self, task_id: str) -> str | None:
        return "/" + str((self.root / task_id).relative_to(self.base))

    def oom_killed(self, task_id: str) -> bool:
        return _counter(self.root / task_id / "memory.events", "oom_kill") > 0


def _counter(path: Path, key: str) -> int:
    """``key``'s value in a flat-keyed cgroup file (``memory.events``), 0 when absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _own_cgroup(controller: str | None) -> str:
    """This process's cgroup path in the v1 hierarchy of ``controller`` (or v2 when None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller is None and ctrls == "":
            return path
        if controller is not None and controller in ctrls.split(","):
            return path
    return "/"


def _try_v2(base: Path, subdir: str) -> Isolation | None:
    if not (base / "cgroup.controllers").exists():
        return None
    wanted = {"memory", "cpu"}
    if not wanted <= set((base / "cgroup.controllers").read_text().split()):
        return None
    own = base / _own_cgroup(None).lstrip("/")
    try:
        if own != base:
            # The no-internal-processes rule: move ourselves into a leaf before delegating.
            leaf = own / "agent"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
        (own / "cgroup.subtree_control").write_text("+memory +cpu")
        root = own / subdir
        root.mkdir(parents=True, exist_ok=True)
        (root / "cgroup.subtree_control").write_text("+memory +cpu")
        return CgroupV2(root, base)
    except OSError as exc:
        log.info("cgroup v2 at %s not usable: %s", own, exc)
        return None


def _try_v1(base: Path, subdir: str) -> Isolation | None:
    mounts: dict[str, Path] = {}
    for ctrl in ("memory", "cpu"):
        mount = base / ctrl
        if not (mount / "cgroup.procs").exists():
            return None
        mounts[ctrl] = mount / _own_cgroup(ctrl).lstrip("/")
    try:
        iso = CgroupV1(mounts, subdir)
        probe = iso.prepare("probe", {"cpus": 1, "mem_mb": 64})
        if not probe:
            return None
        iso.release("probe")
        return iso
    except OSError as exc:
        log.info("cgroup v1 under %s not usable: %s", base, exc)
        return None


def choose(mode: str, subdir: str, base: Path = Path("/sys/fs/cgroup")) -> Isolation:
    """The strongest isolation this host allows (``mode``: auto, cgroup-v2, cgroup-v1, rlimit)."""
    if mode in ("auto", "cgroup-v2"):
        iso = _try_v2(base, subdir)
        if iso is not None:
            return iso
    if mode in ("auto", "cgroup-v1"):
        iso = _try_v1(base, subdir)
        if iso is not None:
            return iso
    if mode not in ("auto", "rlimit"):
        log.warning("isolation %s unavailable here; using rlimits", mode)
    return Isolation()
