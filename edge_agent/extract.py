"""Safe extraction of an artifact archive (.tar, .tar.gz, .zip) into a task's sandbox.

An archive is input from whoever pushed it: every member is checked before anything is
written, and the whole archive is refused (``UnsafeArchive``, with the member named) if one
member would land outside the destination: ``..`` parts, absolute paths, symbolic or hard
links whose target leaves it, device files, FIFOs. Regular files and directories only, plus
links that stay inside. Python's ``tarfile`` ``data`` filter checks much of this too; the rules
are ours so the same hold for zip and the refusal reads the same.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path


class UnsafeArchive(Exception):
    """An archive we will not extract; the message names the member and why."""


def kind_of(path: Path) -> str | None:
    """``tar`` or ``zip`` from the file's own bytes (names lie), or None if neither."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        return None
    return None


def _inside(name: str, what: str) -> str:
    """The member's normalised relative path, or ``UnsafeArchive``."""
    if not name or "\0" in name:
        raise UnsafeArchive(f"{what}: an empty or NUL name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchive(f"{what} {name!r}: an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeArchive(f"{what} {name!r}: a '..' path leaves the destination")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm in (".", ""):
        return "."
    return norm


def _link_stays(member: str, target: str, hard: bool) -> None:
    if target.startswith("/"):
        raise UnsafeArchive(f"link {member!r} -> {target!r}: an absolute target")
    base = "" if hard else posixpath.dirname(member)
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchive(f"link {member!r} -> {target!r} leaves the destination")


def extract(archive: Path, dest: Path) -> int:
    """Extract ``archive`` into ``dest`` (created); returns how many members were written."""
    kind = kind_of(archive)
    if kind is None:
        raise UnsafeArchive(f"{archive.name}: not a tar, tar.gz or zip archive")
    dest.mkdir(parents=True, exist_ok=True)
    return _extract_zip(archive, dest) if kind == "zip" else _extract_tar(archive, dest)


def _extract_tar(archive: Path, dest: Path) -> int:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            name = _inside(m.name, "member")
            if m.issym() or m.islnk():
                _link_stays(name, m.linkname, hard=m.islnk())
                if m.islnk():
                    _inside(m.linkname, "hard link target")
            elif not (m.isfile() or m.isdir()):
                raise UnsafeArchive(f"member {m.name!r}: a device file, FIFO or other "
                                    "special file")
        # Checked above member by member; the 'data' filter refuses the same things again
        # (and strips set-uid bits), so a gap in one list is caught by the other.
        tar.extractall(dest, members=members, filter="data")
        return len(members)


def _extract_zip(archive: Path, dest: Path) -> int:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _inside(info.filename, "member")
            mode = info.external_attr >> 16
            if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                # A zip can carry a symlink (S_IFLNK) or a device in its Unix attributes.
                raise UnsafeArchive(f"member {info.filename!r}: not a regular file or "
                                    "directory")
        root = dest.resolve()
        for info in infos:
            target = (dest / _inside(info.filename, "member")).resolve()
            if target != root and root not in target.parents:
                raise UnsafeArchive(f"member {info.filename!r} leaves the destination")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(target, mode & 0o755 | 0o600)
        return len(infos)
