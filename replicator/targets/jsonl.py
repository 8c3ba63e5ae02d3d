"""JSONL target (``jsonl:///absolute/dir``): one file per entity, sorted by key.

Each line: ``{"key":…, "data":{…}, "_version":…, "_topic":…, "_partition":…, "_offset":…,
"_ts":…}`` with ``data`` exactly the event's row image. ``replicator_restores.json`` holds the
restore's record. Written into ``.<dir>.tmp-restore-<id>`` beside the destination, fsync'd and
renamed into place; an existing non-empty directory is refused unless ``--replace`` (then the
old directory is renamed away and removed after the new one is in place).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import orjson

from replicator.errors import TargetError
from replicator.restore.digest import DigestBuilder, StateDigest
from replicator.restore.layout import CANONICAL, TableLayout, compile_row
from replicator.storage.local import fsync_dir
from replicator.targets import scratch
from replicator.targets.base import RestoreRecord, RowIn


class JsonlTarget:
    def __init__(self, path: Path, restore_id: str) -> None:
        self.path = path
        self.location = f"jsonl://{path}"
        self._tmp = path.with_name(f".{path.name}.tmp-restore-{restore_id}")
        self._old = path.with_name(f".{path.name}.old-restore-{restore_id}")
        self._fd: int | None = None
        self._replace = False

    async def open(self, *, replace: bool) -> None:
        await asyncio.to_thread(self._open_sync, replace)

    def _open_sync(self, replace: bool) -> None:
        self._replace = replace
        parent = self.path.parent
        if not parent.is_dir():
            raise TargetError(f"{self.location}: directory {parent} does not exist")
        scratch.sweep(self.path, lambda p: shutil.rmtree(p, ignore_errors=True))
        if self.path.exists():
            if not self.path.is_dir():
                raise TargetError(f"{self.location}: {self.path} exists and is not a directory")
            if any(self.path.iterdir()) and not replace:
                raise TargetError(f"{self.location} already holds data; choose another "
                                  "directory or pass --replace")
        created = scratch.new_name(self._tmp)
        created.mkdir()
        self._fd = scratch.claim(created, self._tmp)

    def _file(self, entity: str) -> Path:
        return self._tmp / f"{entity}.jsonl"

    async def write(self, layout: TableLayout, rows: Iterable[RowIn]) -> int:
        return await asyncio.to_thread(self._write_sync, layout, rows)

    def _write_sync(self, layout: TableLayout, rows: Iterable[RowIn]) -> int:
        n = 0
        with open(self._file(layout.entity), "wb", buffering=1 << 20) as f:
            for live, event in rows:
                f.write(orjson.dumps({
                    "key": live.key, "data": event.get("data"),
                    "_version": event.get("version"), "_topic": live.topic,
                    "_partition": live.partition, "_offset": live.offset, "_ts": event.get("ts"),
                }))
                f.write(b"\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        return n

    async def read_digest(self, layout: TableLayout) -> StateDigest:
        return await asyncio.to_thread(self._digest_sync, layout)

    def _digest_sync(self, layout: TableLayout) -> StateDigest:
        d = DigestBuilder(layout.entity)
        canon = compile_row(layout.data_columns, CANONICAL, source="mapping")
        with open(self._file(layout.entity), "rb") as f:
            for line in f:
                row = orjson.loads(line)
                d.add(row["key"], canon(row.get("data") or {}))
        return d.result()

    async def record(self, rec: RestoreRecord) -> None:
        p = self._tmp / "replicator_restores.json"
        await asyncio.to_thread(p.write_bytes, orjson.dumps(dataclasses.asdict(rec)))

    async def commit(self) -> None:
        await asyncio.to_thread(self._commit_sync)

    def _commit_sync(self) -> None:
        p = self._tmp / "replicator_restores.json"
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self._tmp)
        moved_old = False
        if self.path.exists() and any(self.path.iterdir()):
            # non-empty now: --replace was given at open, or another restore finished first
            if not self._replace:
                raise TargetError(f"{self.location} was written by another restore meanwhile; "
                                  "nothing replaced (pass --replace to replace it)")
            os.rename(self.path, self._old)
            moved_old = True
        try:
            os.rename(self._tmp, self.path)  # onto an absent or empty directory only
        except OSError as exc:
            if moved_old:
                os.rename(self._old, self.path)
            raise TargetError(f"{self.location}: cannot move the result into place: "
                              f"{exc}") from None
        fsync_dir(self.path.parent)
        shutil.rmtree(self._old, ignore_errors=True)
        scratch.release(self._fd)
        self._fd = None

    async def abort(self) -> None:
        if self._fd is not None:
            await asyncio.to_thread(shutil.rmtree, self._tmp, True)
        scratch.release(self._fd)
        self._fd = None
