"""The store interface: the one plug point every backend (local, S3, ...) implements.

Invariants every implementation keeps (the conformance tests check them):
- ``put_file``/``put_bytes`` are atomic: a reader sees the whole object or nothing.
- With ``create_only=True`` (the default) an existing object is never overwritten; the
  call raises :class:`ObjectExistsError` instead.
- A completed put is durable (fsync'd / acknowledged) before the call returns.
- ``list`` returns names in lexical order, which :mod:`replicator.naming` makes numeric.
- Names are store-relative, validated by :func:`naming.check_relative_name`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

from replicator.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its store-relative name and size in bytes."""

    name: str
    size: int


@runtime_checkable
class Store(Protocol):
    """A destination for sealed segments: put, get, list, delete."""

    @property
    def url(self) -> str:
        """Where the store points, without credentials (safe to print)."""
        ...

    async def put_file(self, name: str, source: Path, *, create_only: bool = True) -> None:
        """Store the contents of the local file ``source`` under ``name``."""
        ...

    async def put_bytes(self, name: str, data: bytes, *, create_only: bool = True) -> None:
        """Store ``data`` under ``name``."""
        ...

    async def get_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes (all if None) of ``name`` from ``start``."""
        ...

    async def fetch_to(self, name: str, dest: Path) -> Path:
        """Make ``name`` available as a local file; return its path (may be ``dest``)."""
        ...

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose name starts with ``prefix``, sorted by name."""
        ...

    async def delete(self, name: str) -> None:
        """Remove ``name``; removing a missing object is not an error."""
        ...

    async def sweep(self, older_than_s: float, prefix: str = "") -> int:
        """Remove leftovers of interrupted puts older than ``older_than_s`` (under the
        directory ``prefix``, default everywhere); return how many.

        The age guard keeps a sweep from racing another writer's put on a shared store.
        """
        ...

    async def prune(self, prefix: str) -> None:
        """Remove the now-empty container of ``prefix`` (a local directory); a no-op where
        containers do not exist (object stores) or when it is not empty."""
        ...

    async def close(self) -> None:
        """Release connections (a no-op for a local directory); the store stays usable:
        a later call opens them again."""
        ...


@contextlib.asynccontextmanager
async def local_copy(store: Store, name: str, scratch: Path, *, private: bool = False
                     ) -> AsyncIterator[Path]:
    """``name`` as a local file for the duration of the block: read in place when the store
    is local (``fetch_to`` returns its own path), else fetched into ``scratch`` and removed
    afterwards. ``private=True`` always gives a copy of the caller's own (never the store's
    file itself, e.g. before handing it to another local store that may hard-link it)."""
    tmp = scratch / (".fetch-" + os.urandom(6).hex())
    path = await store.fetch_to(name, tmp)
    try:
        if private and path != tmp:
            await asyncio.to_thread(shutil.copyfile, path, tmp)
            path = tmp
        yield path
    finally:
        if path == tmp:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def open_store(url: str) -> Store:
    """Build a store from a URL: ``file:///path`` or a plain path (local directory), or
    ``s3://bucket/prefix?endpoint=...`` (S3-compatible object storage)."""
    from replicator.storage.local import LocalStore

    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from replicator.storage.s3 import S3Store

        return S3Store.from_url(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            # file://relative/dir: treat netloc as the first path component
            path = parsed.netloc + parsed.path
        return LocalStore(root=Path(path))
    raise ConfigError("store.url", f"unsupported store scheme {parsed.scheme!r} (use file:// or s3://)")
