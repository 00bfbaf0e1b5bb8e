"""The OCI runtime config (``config.json``) of one container task, built from its task spec.

Why a module of its own: this is where a task's promises become kernel settings (namespaces,
cgroup limits, capabilities, mounts), so it is one pure function a reader can check line by
line, and a test can read back. The image contributes only what users expect from it (its
``PATH`` and other environment, its working directory); everything that bounds the container
comes from the spec and the defaults here: every capability dropped, ``noNewPrivileges``, a
read-only root unless asked, no network unless ``host`` is asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.isolation import CFS_PERIOD_US, DEFAULT_NOFILE

OCI_VERSION = "1.0.2"
SANDBOX_MOUNT = "/sandbox"  # the task's sandbox inside the container: logs, artifacts, output

# Kernel views a container must not see or change (runc's own defaults, `runc spec`).
MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def parse_user(user: str | None) -> tuple[int, int]:
    """``UID[:GID]`` (numeric: the agent never reads the image's /etc/passwd) -> (uid, gid)."""
    if not user:
        return 0, 0
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def _env_list(image_env: list[str], spec_env: dict[str, str]) -> list[str]:
    """The image's environment, overridden key by key by the spec's."""
    merged: dict[str, str] = {}
    for item in image_env:
        key, sep, value = item.partition("=")
        if sep:
            merged[key] = value
    merged.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    merged.update(spec_env)
    return [f"{k}={v}" for k, v in merged.items()]


def _base_mounts(host_network: bool) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]},
    ]
    # sysfs cannot be mounted afresh in the host's network namespace: bind it read-only there.
    if host_network:
        mounts.append({"destination": "/sys", "type": "bind", "source": "/sys",
                       "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
    else:
        mounts.append({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                       "options": ["nosuid", "noexec", "nodev", "ro"]})
    return mounts


def build_config(spec: dict[str, Any], *, task_id: str, rootfs: Path, sandbox: Path,
                 image_process: dict[str, Any], cgroups_path: str | None) -> dict[str, Any]:
    """The ``config.json`` of ``spec`` (validated, defaults filled) for runc.

    ``image_process``: the ``process`` part of the config umoci derived from the image (its
    env and cwd are used); ``cgroups_path``: where the container's cgroup goes (the agent's
    isolation decides, so its usage and kill-all see the container like any task).
    """
    opts = spec.get("oci") or {}
    host_network = opts.get("network", "none") == "host"
    uid, gid = parse_user(opts.get("user"))
    resources = spec["resources"]
    mem = int(resources["mem_mb"]) * 1024 * 1024
    quota = max(int(float(resources["cpus"]) * CFS_PERIOD_US), 1000)
    env = _env_list(list(image_process.get("env") or []), {
        **spec.get("env", {}), "OUTPOST_TASK_ID": task_id, "OUTPOST_TASK_NAME": spec["name"],
        "OUTPOST_SANDBOX": SANDBOX_MOUNT})
    mounts = _base_mounts(host_network)
    mounts.append({"destination": SANDBOX_MOUNT, "type": "bind", "source": str(sandbox),
                   "options": ["rbind", "rw", "nosuid", "nodev"]})
    for m in opts.get("mounts", []):
        mounts.append({"destination": m["destination"], "type": "bind",
                       "source": str(sandbox / m["source"]),
                       "options": ["rbind", "ro" if m.get("read_only") else "rw", "nosuid",
                                   "nodev"]})
    namespaces = [{"type": t} for t in ("pid", "mount", "ipc", "uts")]
    if not host_network:
        namespaces.append({"type": "network"})
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": {
            "devices": [{"allow": False, "access": "rwm"}],
            "memory": {"limit": mem, "swap": mem},
            "cpu": {"quota": quota, "period": CFS_PERIOD_US},
        },
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    }
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": list(spec["command"]),
            "env": env,
            "cwd": image_process.get("cwd") or "/",
            # Every capability dropped: none listed in any set.
            "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                             "permitted": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": DEFAULT_NOFILE,
                         "soft": DEFAULT_NOFILE},
                        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": bool(opts.get("read_only_root", True))},
        "hostname": spec["name"][:63],
        "mounts": mounts,
        "linux": linux,
    }
