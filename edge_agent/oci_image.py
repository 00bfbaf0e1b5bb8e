"""Container images at an edge: where an image comes from, and its unpacked rootfs cache.

An image is an OCI layout directory, an ``oci-archive`` tarball (a tarred layout) or
``docker save`` output. ``resolve_image`` is the one place that turns a task's ``image`` into
a file on this machine (today: a local path; the artifact cache plugs in there). Layers are
never applied by hand: ``skopeo`` turns docker-save output into a layout and ``umoci unpack``
applies layers with whiteouts and keeps every write inside the rootfs. Before that, each
layer's member names are read once and an image whose names climb out of the root (``..``) is
refused outright: umoci would confine the write, but such an image is an attack, not a mistake.

The cache is keyed by manifest digest, so one rootfs serves every task of that image (the
root is mounted read-only by default), and it is bounded: past ``max_entries`` the least
recently used rootfs that no task uses is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")


class ImageError(Exception):
    """The image cannot be used: missing, not an image we read, unsafe, or a tool failed."""


@dataclass(frozen=True, slots=True)
class Unpacked:
    """An image ready to run: ``digest`` of its manifest, ``rootfs``, and ``process``, the
    image's defaults (env, cwd, user) as umoci derived them from the image config."""

    digest: str
    rootfs: Path
    process: dict[str, Any]


def resolve_image(ref: str) -> Path:
    """The local file or directory holding the image at path ``ref`` (an artifact image is
    resolved through the artifact cache first: ``OciDriver.stage``)."""
    path = Path(ref)
    if not path.is_absolute():
        raise ImageError(f"image {ref!r}: give an absolute path of an OCI layout or archive")
    if not path.exists():
        raise ImageError(f"image {ref!r}: no such file or directory on this agent")
    return path


def _run_tool(argv: list[str]) -> None:
    proc = _subprocess_run(argv)
    if proc[0] != 0:
        raise ImageError(f"{argv[0]} failed: {proc[1].strip()[-400:]}")


def _subprocess_run(argv: list[str]) -> tuple[int, str]:
    import subprocess

    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False, timeout=600)
    except FileNotFoundError:
        return 127, f"{argv[0]} is not installed"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} timed out"
    return done.returncode, done.stdout


def _tar_members(path: Path) -> list[str]:
    try:
        with tarfile.open(path) as tar:
            return tar.getnames()
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"image {path}: not a readable tarball ({exc})") from None


def _extract_layout(archive: Path, dest: Path) -> None:
    """An oci-archive (a tarred layout) into ``dest``; tarfile's ``data`` filter refuses
    members that leave ``dest``, links out of it and device files."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"image {archive}: cannot read the archive ({exc})") from None


def _pick_manifest(layout: Path) -> tuple[str, str]:
    """(manifest digest, tag) of the layout's first tagged manifest."""
    try:
        index = json.loads((layout / "index.json").read_text())
        manifests = index["manifests"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ImageError(f"image {layout}: no readable index.json (not an OCI layout)") from None
    for entry in manifests if isinstance(manifests, list) else []:
        if not isinstance(entry, dict):
            continue
        tag = (entry.get("annotations") or {}).get(REF_NAME)
        digest = entry.get("digest")
        if isinstance(tag, str) and isinstance(digest, str) and digest.startswith("sha256:"):
            return digest, tag
    raise ImageError(f"image {layout}: its index.json names no tagged image manifest")


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not hexd.isalnum():
        raise ImageError(f"image {layout}: bad digest {digest!r}")
    return layout / "blobs" / algo / hexd


def check_layers(layout: Path, digest: str) -> None:
    """Refuse a layer whose member names (or hard link targets) climb out of the root."""
    try:
        manifest = json.loads(_blob(layout, digest).read_text())
        layers = manifest["layers"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ImageError(f"image {layout}: manifest {digest} unreadable") from None
    for layer in layers:
        path = _blob(layout, str(layer.get("digest", "")))
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    for name in (member.name, member.linkname if member.islnk() else ""):
                        if name and _escapes(name):
                            raise ImageError(
                                f"image refused: layer {layer['digest'][:19]} writes outside "
                                f"the root filesystem ({name!r})")
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"image {layout}: layer {path.name[:12]} unreadable ({exc})") \
                from None


def _escapes(name: str) -> bool:
    norm = posixpath.normpath(name.lstrip("/"))
    return norm == ".." or norm.startswith("../")


class ImageCache:
    """Unpacked rootfs by manifest digest under ``root``; past ``max_entries`` in all, the
    least recently used that no task needs are removed.

    ``in_use``: the digests tasks still need (never evicted). Sources already read are
    remembered by (path, size, mtime), so starting a cached image reads no tarball.
    """

    def __init__(self, root: Path, in_use: Callable[[], set[str]], max_entries: int = 8) -> None:
        self.root = root
        self.in_use = in_use
        self.max_entries = max_entries
        self.unpacks = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._install = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        self._sources_file = root / "sources.json"
        try:
            self._sources: dict[str, str] = json.loads(self._sources_file.read_text())
        except (OSError, ValueError):
            self._sources = {}

    def entry(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def _source_key(self, path: Path) -> str:
        st = path.stat() if path.is_file() else (path / "index.json").stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def cached(self, ref: str) -> Unpacked | None:
        """The unpacked image of ``ref`` if it is here already (no tool runs, no tar read)."""
        try:
            path = resolve_image(ref)
            key = self._source_key(path)
        except (ImageError, OSError):
            return None
        digest = self._sources.get(key)
        if digest is None and path.is_dir():
            try:
                digest = _pick_manifest(path)[0]
            except ImageError:
                return None
        return self.load(digest) if digest else None

    def load(self, digest: str) -> Unpacked | None:
        entry = self.entry(digest)
        try:
            config = json.loads((entry / "config.json").read_text())
        except (OSError, ValueError):
            return None
        with contextlib.suppress(OSError):
            os.utime(entry)  # last used: the eviction order
        return Unpacked(digest, entry / "rootfs", dict(config.get("process") or {}))

    async def get(self, ref: str) -> Unpacked:
        """The unpacked image of ``ref``, unpacking it first when needed (off the loop)."""
        found = self.cached(ref)
        if found is not None:
            return found
        lock = self._locks.setdefault(ref, asyncio.Lock())
        async with lock:
            found = self.cached(ref)
            if found is None:
                found = await asyncio.to_thread(self.unpack, ref)
        self.evict()
        return found

    def unpack(self, ref: str) -> Unpacked:
        """Unpack ``ref`` now (blocking: tools run; ``get`` calls it off the loop)."""
        path = resolve_image(ref)
        key = self._source_key(path)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".tmp-") as tmp:
            layout = path if path.is_dir() else self._layout_of(path, Path(tmp) / "layout")
            digest, tag = _pick_manifest(layout)
            found = self.load(digest)
            if found is None:
                check_layers(layout, digest)
                bundle = Path(tmp) / "bundle"
                _run_tool(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
                self.unpacks += 1
                # Two sources of one image (a layout and its archive) may unpack at once: the
                # first to finish installs the entry; a running task's rootfs is never replaced.
                with self._install:
                    found = self.load(digest)
                    if found is None:
                        with contextlib.suppress(FileNotFoundError):
                            shutil.rmtree(self.entry(digest))  # a broken entry, no config
                        bundle.rename(self.entry(digest))
                        found = self.load(digest)
                if found is None:
                    raise ImageError(f"image {ref}: umoci left no config.json")
                log.info("image unpacked", extra={"image": ref, "digest": digest})
        with self._install:
            self._sources[key] = digest
            tmp_file = self._sources_file.with_suffix(".tmp")
            tmp_file.write_text(json.dumps(self._sources))
            tmp_file.replace(self._sources_file)
        return found

    def _layout_of(self, archive: Path, dest: Path) -> Path:
        names = _tar_members(archive)
        stripped = {n.lstrip("./") for n in names}
        if "oci-layout" in stripped:
            _extract_layout(archive, dest)
            return dest
        if "manifest.json" in stripped:  # docker save output
            _run_tool(["skopeo", "copy", "--quiet", f"docker-archive:{archive}",
                       f"oci:{dest}:image"])
            return dest
        raise ImageError(f"image {archive}: neither an oci-archive nor docker-save output")

    def evict(self) -> list[str]:
        """Remove the least recently used unused rootfs past the bound; the removed digests."""
        keep = self.in_use()
        total, entries = 0, []
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                total += 1
                digest = entry.name.replace("-", ":", 1)
                if digest not in keep:
                    entries.append((entry.stat().st_mtime, entry, digest))
        entries.sort()
        removed: list[str] = []
        while entries and total - len(removed) > self.max_entries:
            _, entry, digest = entries.pop(0)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(digest)
        if removed:
            log.info("evicted %d unused rootfs", len(removed), extra={"evicted": removed})
            self._sources = {k: v for k, v in self._sources.items() if v not in removed}
        return removed
