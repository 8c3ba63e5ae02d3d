"""Local-filesystem store (the embedded default).

Puts go temp name -> fsync -> link/rename -> fsync directory. ``create_only`` uses
``os.link`` from the temp name, which fails if the final name exists, so a sealed segment
is never overwritten even by two racing writers. Blocking file work runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
from pathlib import Path

from replicator import naming
from replicator.errors import ObjectExistsError, ObjectNotFoundError, StoreError
from replicator.storage.base import ObjectInfo


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte of ``data`` is written (short writes are legal)."""
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.write(fd, view[written:])


def makedirs_durable(path: Path) -> None:
    """Create ``path`` and parents, fsync'ing each directory that was created."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)


class LocalStore:
    """A directory used as an object store. ``root`` is created on first write."""

    def __init__(self, *, root: Path) -> None:
        self.root = root.resolve()

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, name: str) -> Path:
        naming.check_relative_name(name)
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise StoreError(f"object name escapes the store: {name!r}")
        return path

    # -- blocking implementations (run in a thread) ---------------------------------------

    def _publish(self, tmp: Path, final: Path, create_only: bool) -> None:
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        try:
            if create_only:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise ObjectExistsError(str(final.relative_to(self.root))) from None
                tmp.unlink()
            else:
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(final.parent)

    def put_file_sync(self, name: str, source: Path, *, create_only: bool = True) -> None:
        final = self._path(name)
        makedirs_durable(final.parent)
        tmp = naming.temp_sibling(final, secrets.token_hex(4))
        try:
            os.link(source, tmp)  # same filesystem: no copy; the data is already fsync'd
        except OSError:
            shutil.copyfile(source, tmp)
        self._publish(tmp, final, create_only)

    def put_bytes_sync(self, name: str, data: bytes, *, create_only: bool = True) -> None:
        final = self._path(name)
        makedirs_durable(final.parent)
        tmp = naming.temp_sibling(final, secrets.token_hex(4))
        with tmp.open("xb") as f:
            f.write(data)
        self._publish(tmp, final, create_only)

    def list_sync(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root
        # start the walk at the deepest directory the prefix names
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = base / head if head else base
        if not start.is_dir():
            return []
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, base)
            for fn in filenames:
                if fn.startswith(naming.TEMP_PREFIX):
                    continue
                rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                if rel.startswith(prefix):
                    try:
                        size = os.stat(os.path.join(dirpath, fn)).st_size
                    except FileNotFoundError:
                        continue
                    out.append(ObjectInfo(rel, size))
        out.sort(key=lambda o: o.name)
        return out

    def get_bytes_sync(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            with path.open("rb") as f:
                f.seek(start)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # a directory, or a name below a file, is no object either (as on S3)
            raise ObjectNotFoundError(name) from None

    def delete_sync(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return  # not an object (missing, a directory, below a file): nothing to delete
        fsync_dir(path.parent)

    def sweep_temp_sync(self, older_than_s: float = 0.0, prefix: str = "") -> int:
        """Remove temp files a crash left behind (older than ``older_than_s``), under the
        directory ``prefix`` names (the whole store by default). A scoped sweep (``prefix``
        given) also removes the directories below ``prefix`` it leaves empty; the whole-store
        sweep never removes a directory (another writer may be about to use it)."""
        n = 0
        top = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not top.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        for dirpath, _dirs, files in os.walk(top, topdown=False):
            for fn in files:
                if fn.startswith(naming.TEMP_PREFIX):
                    path = os.path.join(dirpath, fn)
                    try:
                        if os.stat(path).st_mtime <= cutoff:
                            os.unlink(path)
                            n += 1
                    except FileNotFoundError:
                        continue
            if prefix.strip("/") and dirpath != str(top):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # only succeeds when empty
        return n

    # -- the Store protocol -----------------------------------------------------------------

    async def put_file(self, name: str, source: Path, *, create_only: bool = True) -> None:
        await asyncio.to_thread(self.put_file_sync, name, source, create_only=create_only)

    async def put_bytes(self, name: str, data: bytes, *, create_only: bool = True) -> None:
        await asyncio.to_thread(self.put_bytes_sync, name, data, create_only=create_only)

    async def get_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        return await asyncio.to_thread(self.get_bytes_sync, name, start, length)

    async def fetch_to(self, name: str, dest: Path) -> Path:
        path = self._path(name)
        if not path.is_file():
            raise ObjectNotFoundError(name)
        return path  # already local: read in place

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        return await asyncio.to_thread(self.list_sync, prefix)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.delete_sync, name)

    async def sweep(self, older_than_s: float, prefix: str = "") -> int:
        return await asyncio.to_thread(self.sweep_temp_sync, older_than_s, prefix)

    def prune_sync(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        with contextlib.suppress(FileNotFoundError, OSError):
            path.rmdir()  # only when empty
            fsync_dir(path.parent)

    async def prune(self, prefix: str) -> None:
        await asyncio.to_thread(self.prune_sync, prefix)

    async def close(self) -> None:
        return None
