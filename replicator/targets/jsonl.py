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
from replicator.targets.base import RestoreRecord, RowIn


class JsonlTarget:
    def __init__(self, path: Path, restore_id: str) -> None:
        self.path = path
        self.location = f"jsonl://{path}"
        self._tmp = path.with_name(f".{path.name}.tmp-restore-{restore_id}")
        self._old = path.with_name(f".{path.name}.old-restore-{restore_id}")

    async def open(self, *, replace: bool) -> None:
        await asyncio.to_thread(self._open_sync, replace)

    def _open_sync(self, replace: bool) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise TargetError(f"{self.location}: directory {parent} does not exist")
        for leftover in parent.glob(f".{self.path.name}.tmp-restore-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if self.path.exists():
            if not self.path.is_dir():
                raise TargetError(f"{self.location}: {self.path} exists and is not a directory")
            if any(self.path.iterdir()) and not replace:
                raise TargetError(f"{self.location} already holds data; choose another "
                                  "directory or pass --replace")
        self._tmp.mkdir()

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
        if self.path.exists():
            os.rename(self.path, self._old)
        os.rename(self._tmp, self.path)
        fsync_dir(self.path.parent)
        shutil.rmtree(self._old, ignore_errors=True)

    async def abort(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self._tmp, True)
