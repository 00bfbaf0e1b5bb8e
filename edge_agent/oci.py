"""The OCI task driver: a task of ``driver: "oci"`` runs as a runc container.

Why it is this small: a container is started as ``runc run --keep <id>`` in the FOREGROUND,
as the command of the ordinary task wrapper (``wrapper.sh``). runc stays the container's
parent, forwards signals to it and exits with its status, so everything the process driver
does (logs into files and their rotation, the exit status file, kill with its timeout,
restart policies, re-adoption of a live wrapper after an agent SIGKILL) works unchanged. What
is container-specific is here: the bundle (``config.json`` over the cached rootfs), health
checks through ``runc exec``, the OOM verdict read from the container's cgroup before
``runc delete --force`` removes it, and a stale container of the same id (left by a crash or
a reboot) cleared before a start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.isolation import Isolation
from edge_agent.oci_image import ImageCache, ImageError, Unpacked
from edge_agent.oci_spec import build_config
from edge_agent.staging import Stager
from federation.artifactrefs import image_artifact

log = logging.getLogger(__name__)


def runc_version(runc: str) -> str | None:
    """``1.1.5+ds1`` from ``runc --version``, or None when it does not answer."""
    try:
        out = subprocess.run([runc, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.splitlines()[0] if out else ""
    return first.split()[-1] if first.startswith("runc version") else None


@dataclass(frozen=True, slots=True)
class Launch:
    """How the wrapper starts one run: ``argv`` (runc) and the environment runc gets."""

    argv: list[str]
    env: dict[str, str]


class OciDriver:
    """Containers of one agent: runc state under ``state_dir``, rootfs in ``images``."""

    name = "oci"

    def __init__(self, runc: str, version: str, state_dir: Path, tasks_dir: Path,
                 isolation: Isolation, images: ImageCache, base_env: dict[str, str]) -> None:
        self.runc = runc
        self.version = version
        self.state_dir = state_dir
        self.tasks_dir = tasks_dir
        self.isolation = isolation
        self.images = images
        self.base_env = base_env
        # Tasks not ended (set by the supervisor): only their images are kept from eviction.
        self.active: Callable[[], Iterable[str]] = lambda: ()
        self.stager: Stager | None = None  # the artifact cache (set by the agent)
        state_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def detect(cls, data_dir: Path, tasks_dir: Path, isolation: Isolation,
               base_env: dict[str, str], max_images: int = 8) -> OciDriver | None:
        """The driver when runc is on the agent's PATH and answers, else None."""
        runc = shutil.which("runc", path=base_env.get("PATH"))
        version = runc_version(runc) if runc else None
        if runc is None or version is None:
            log.info("no OCI runtime: runc not found on PATH; oci tasks are refused")
            return None
        drv: OciDriver | None = None

        def in_use() -> set[str]:
            return drv.digests_in_use() if drv is not None else set()

        images = ImageCache(data_dir / "images", in_use, max_entries=max_images)
        drv = cls(runc, version, data_dir / "runc", tasks_dir, isolation, images, base_env)
        return drv

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "runtime": "runc", "version": self.version}

    def container_id(self, task_id: str) -> str:
        return f"outpost-{task_id}"

    def bundle(self, task_id: str) -> Path:
        return self.tasks_dir / task_id / "bundle"

    def _runc(self, *args: str) -> list[str]:
        return [self.runc, "--root", str(self.state_dir), *args]

    # ------------------------------------------------------------ images

    def digests_in_use(self) -> set[str]:
        """Digests the bundles of this agent's tasks not yet ended point at (never evicted
        under them)."""
        found = set()
        for task_id in self.active():
            with contextlib.suppress(OSError):
                found.add((self.bundle(task_id) / "image.digest").read_text().strip())
        return found

    def cached(self, task_id: str, spec: dict[str, Any]) -> Unpacked | None:
        """The image of this task if it is unpacked already: the digest this task ran last
        (a restart or a reboot needs neither the source nor the core), else the source's."""
        marker = self.bundle(task_id) / "image.digest"
        with contextlib.suppress(OSError):
            previous = marker.read_text().strip()
            source = self.bundle(task_id) / "image.ref"
            if source.read_text() == spec["image"]:
                found = self.images.load(previous)
                if found is not None:
                    return found
        source = self._source(task_id, spec["image"])
        return self.images.cached(source) if source is not None else None

    def _source(self, task_id: str, image: str) -> str | None:
        """Where the image's bytes are on this agent now: its path, or for an artifact image
        the artifact cache's file (bound to the task, so never evicted under it)."""
        ref = image_artifact(image)
        if ref is None:
            return image
        if self.stager is None:
            return None
        path = self.stager.cached(ref, task_id=task_id)
        return str(path) if path is not None else None

    async def stage(self, task_id: str, spec: dict[str, Any]) -> Unpacked:
        """Fetch an artifact image if it is not here (verified: ``staging.Stager``), then
        unpack it (off the event loop). ``ImageError`` says why not; an artifact that cannot
        be had yet raises ``ArtifactUnavailable``, one refused ``ArtifactRefused``."""
        ref = image_artifact(spec["image"])
        if ref is None:
            return await self.images.get(spec["image"])
        if self.stager is None:
            raise ImageError("this agent has no artifact cache for an artifact image")
        path = await self.stager.resolve(ref, task_id=task_id)
        return await self.images.get(str(path))

    # ------------------------------------------------------------ runs

    def launch(self, task_id: str, spec: dict[str, Any], image: Unpacked) -> Launch:
        """Write the bundle of this run and return how the wrapper starts it."""
        bundle = self.bundle(task_id)
        bundle.mkdir(parents=True, exist_ok=True)
        rootfs = image.rootfs
        if not (spec.get("oci") or {}).get("read_only_root", True):
            # A writable root is the task's own copy (kept across its restarts): the cached
            # rootfs is shared by every task of the image.
            own = bundle / "rootfs"
            marker = bundle / "rootfs.digest"
            if not own.exists() or _read(marker) != image.digest:
                shutil.rmtree(own, ignore_errors=True)
                subprocess.run(["cp", "-a", "--reflink=auto", str(image.rootfs), str(own)],
                               check=True)
                marker.write_text(image.digest)
            rootfs = own
        sandbox = self.tasks_dir / task_id / "sandbox"
        for mount in (spec.get("oci") or {}).get("mounts", []):
            (sandbox / mount["source"]).mkdir(parents=True, exist_ok=True)
        config = build_config(spec, task_id=task_id, rootfs=rootfs, sandbox=sandbox,
                              image_process=image.process,
                              cgroups_path=self.isolation.runtime_cgroup(task_id))
        (bundle / "config.json").write_text(json.dumps(config))
        (bundle / "image.digest").write_text(image.digest)
        (bundle / "image.ref").write_text(spec["image"])
        self.clear_stale(task_id)
        argv = self._runc("run", "--keep", "--no-new-keyring", "-b", str(bundle),
                          self.container_id(task_id))
        return Launch(argv, dict(self.base_env))

    def clear_stale(self, task_id: str) -> None:
        """A container of this id that a crash or reboot left behind is deleted first."""
        if (self.state_dir / self.container_id(task_id)).exists():
            self._delete(task_id)

    def _delete(self, task_id: str) -> None:
        subprocess.run(self._runc("delete", "--force", self.container_id(task_id)),
                       stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=30)

    def finish(self, task_id: str) -> str | None:
        """After the run ended: why the kernel ended it (if it did), then delete the container
        (its cgroup, kept by ``--keep`` until now, goes with it)."""
        reason = None
        if self.isolation.oom_killed(task_id):
            reason = "out of memory: the kernel killed it at its mem_mb limit"
        self._delete(task_id)
        return reason

    def kill_all(self, task_id: str) -> None:
        """SIGKILL every process of the container (also where no cgroup of ours holds it)."""
        subprocess.run(self._runc("kill", "--all", self.container_id(task_id), "KILL"),
                       stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=30)

    def exec_argv(self, task_id: str, command: list[str]) -> list[str]:
        """A health check run inside the container."""
        return self._runc("exec", self.container_id(task_id), *command)

    async def state(self, task_id: str) -> dict[str, Any] | None:
        """``runc state`` of the task's container (its init pid, status), or None."""
        proc = await asyncio.create_subprocess_exec(
            *self._runc("state", self.container_id(task_id)), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            return None
        try:
            state: dict[str, Any] = json.loads(out)
        except ValueError:
            return None
        return state


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


__all__ = ["ImageError", "Launch", "OciDriver", "runc_version"]
