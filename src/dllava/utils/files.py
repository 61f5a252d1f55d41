"""Writing files atomically, with ordinary permissions, and cleaning what an interrupted write left.

One home for "write a file atomically" (checkpoints, ``summary.json``, ``eval.json``,
``sweep_summary.csv``): :func:`atomic_write` writes beside the final path under a hidden temporary
name and renames it into place, so a reader never sees half a file and a crash leaves the previous
file. The temp file is created with ``open(..., "xb")``, i.e. mode ``0666`` minus the umask, like any
file the process writes (``0644`` under umask 022, ``0664`` under 002): ``tempfile.mkstemp`` would
create it ``0600`` and the rename would keep that, so teammates could not read the result.

Temp names say who writes them: ``.<name>.<pid>@<host>.<token>.tmp``. :func:`clean_stale_temps`
removes the ones whose writer is gone, never one another live process is writing:

* a temp file of this process is stale (the cleaner runs only before this process starts a write);
* a temp file of another process on this host is stale once that pid no longer runs;
* anything whose writer cannot be told (a pid on another host, a sharded checkpoint's
  ``.<name>.tmp/`` directory, which every rank writes, a temp file named by an older version) is stale
  once nothing in it has been modified for :data:`STALE_AFTER_S` (a writer modifies its file
  continuously; one silent for an hour is dead or hung).

A pid reused by an unrelated process keeps its temp file until the age rule removes it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Callable

STALE_AFTER_S = 3600.0

_OWNED = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)@(?P<host>.+)\.(?P<token>[0-9a-f]{8})\.tmp$")
# temp names of earlier versions: mkstemp's ``.<name>.<8 random chars>.tmp`` files, sharded ``.<name>.tmp/``
_UNOWNED = re.compile(r"^\.(?P<target>.+\.ckpt)(\.[A-Za-z0-9_]{8})?\.tmp$")


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk, not only the file."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """A fresh hidden temp name beside ``path`` that records its writer (see the module docstring)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}@{socket.gethostname()}.{secrets.token_hex(4)}.tmp"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], durable: bool = False) -> Path:
    """Create ``path`` through ``write(handle)`` into a temp file and a rename; mode follows the umask.

    ``durable``: fsync the file and the directory, so the new content survives a power loss (checkpoints).
    On any error (or Ctrl-C) the temp file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _last_modified(path: Path) -> float:
    """Newest mtime of ``path`` and, for a directory, of anything inside it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for child in path.rglob("*"):
            try:
                newest = max(newest, child.lstat().st_mtime)
            except FileNotFoundError:
                pass
    return newest


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temp file or directory of ours whose writer is gone (module docstring)."""
    owned = _OWNED.match(path.name)
    if owned is None and _UNOWNED.match(path.name) is None:
        return False  # not ours
    if owned is not None and owned["host"] == socket.gethostname():
        pid = int(owned["pid"])
        if pid == os.getpid() or not _pid_running(pid):
            return True
    now = time.time() if now is None else now
    try:
        return now - _last_modified(path) > STALE_AFTER_S
    except FileNotFoundError:  # its writer just renamed or removed it
        return False


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the stale temp files and directories of ours in ``directory``; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in directory.iterdir():
        if not entry.name.startswith(".") or not is_stale_temp(entry, now):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
