"""Scratch (temp) files and directories of file-system targets, safe among concurrent restores.

A restore writes into ``.<name>.tmp-restore-<id>`` beside its destination and holds an
exclusive ``flock`` on it from creation to commit/abort (the kernel drops it if the process
dies). The scratch is created under ``.<name>.new-restore-<id>``, locked, then renamed, so
anything named ``tmp-restore`` is locked from the moment it has that name. Leftovers of
killed restores are swept at the next restore -- only those nobody holds, so a sweep never
deletes a live restore's scratch (``new-restore`` leftovers only after a minute).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

#: a ``new-restore`` leftover (killed between create and rename) younger than this is kept
MIN_NEW_AGE_S = 60.0


def new_name(scratch: Path) -> Path:
    """Where ``scratch`` is created before it is locked and renamed to its real name."""
    return scratch.with_name(scratch.name.replace(".tmp-restore-", ".new-restore-", 1))


def claim(created: Path, scratch: Path) -> int:
    """Lock the just-created ``created`` (file or directory), rename it to ``scratch``;
    returns the fd to keep open until commit/abort."""
    fd = os.open(created, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(created, scratch)
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_unlocked(paths: Iterable[Path], remove: Callable[[Path], None],
                    min_age_s: Callable[[Path], float] = lambda _p: 0.0) -> int:
    """Remove each of ``paths`` that no live process holds locked (and that is at least
    ``min_age_s(path)`` old); returns how many were removed."""
    n = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is running right now
            if time.time() - os.fstat(fd).st_mtime < min_age_s(p):
                continue
            remove(p)
            n += 1
        finally:
            os.close(fd)
    return n


def sweep(destination: Path, remove: Callable[[Path], None]) -> int:
    """Remove abandoned scratch leftovers of ``destination``; returns how many."""
    parent, name = destination.parent, destination.name
    return remove_unlocked(
        [*parent.glob(f".{name}.tmp-restore-*"), *parent.glob(f".{name}.new-restore-*")],
        remove, lambda p: MIN_NEW_AGE_S if ".new-restore-" in p.name else 0.0)
