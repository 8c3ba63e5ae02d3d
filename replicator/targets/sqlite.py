"""SQLite target (``sqlite:///absolute/path.db``): the embedded default.

Layout: one table per entity (``WITHOUT ROWID``, ``key`` primary key) with the columns of
:class:`~replicator.restore.layout.TableLayout` -- timestamps as RFC 3339 UTC text with
microseconds, booleans as 0/1, JSON as canonical text -- plus ``replicator_restores``.

Atomicity: everything is written into ``.<name>.tmp-restore-<id>`` beside the destination
(journal off: the file is scratch until it is complete), fsync'd, then renamed over the
destination and the directory fsync'd. A crash leaves at most a temp file, swept by the next
restore into the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from replicator.errors import TargetError
from replicator.restore.digest import DigestBuilder, StateDigest
from replicator.restore.layout import (
    SQLITE_TYPES,
    Converter,
    Kind,
    TableLayout,
    canonical_json,
    compile_row,
    ts_text,
)
from replicator.storage.local import fsync_dir
from replicator.targets import scratch
from replicator.targets.base import RestoreRecord, RowIn

if TYPE_CHECKING:
    from replicator.restore.planner import RestorePlan
    from replicator.restore.replay import Change
    from replicator.restore.rowcodec import RowCodec, RowTarget

RESTORES_TABLE = "replicator_restores"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


#: event value -> stored value, per kind
SQLITE_CONVERT: dict[Kind, Converter | None] = {
    "text": None,
    "timestamptz": ts_text,
    "bigint": None,
    "double": float,
    "boolean": int,
    "jsonb": canonical_json,
}


def create_table_sql(layout: TableLayout, *, rowid: bool = False) -> str:
    """``WITHOUT ROWID`` (rows clustered by key: the best layout for a restore, loaded in
    key order); ``rowid=True`` for a replica that takes updates in random key order (rows
    appended, only the key index is touched at random: several times cheaper commits)."""
    cols = ", ".join(
        f"{_q(c.name)} {SQLITE_TYPES[c.kind]}"
        + (" PRIMARY KEY NOT NULL" if c.name == "key" else "")
        for c in layout.columns
    )
    return f"CREATE TABLE {_q(layout.entity)} ({cols})" + ("" if rowid else " WITHOUT ROWID")


def sqlite_row_fn(layout: TableLayout) -> Callable[[dict[str, Any], str, int, int],
                                                   tuple[Any, ...]]:
    """``(event, topic, partition, offset) -> row``: the same row as :func:`sqlite_rows`
    builds, straight from a parsed event (a follower's hot path: no intermediate objects)."""
    conv = compile_row(layout.data_columns, SQLITE_CONVERT, source="mapping")

    def row(event: dict[str, Any], topic: str, partition: int, offset: int
            ) -> tuple[Any, ...]:
        ts = event.get("ts")
        return (event["key"], *conv(event.get("data") or {}), event.get("version"), topic,
                partition, offset, ts_text(ts) if isinstance(ts, str) else None)

    return row


def sqlite_rows(layout: TableLayout, rows: Iterable[RowIn]) -> Iterator[tuple[Any, ...]]:
    conv = compile_row(layout.data_columns, SQLITE_CONVERT, source="mapping")
    for live, event in rows:
        ts = event.get("ts")
        yield (live.key, *conv(event.get("data") or {}), event.get("version"), live.topic,
               live.partition, live.offset, ts_text(ts) if isinstance(ts, str) else None)


class SqliteTarget:
    def __init__(self, path: Path, restore_id: str, *, rowid_tables: bool = False) -> None:
        self.path = path
        self.rowid_tables = rowid_tables
        self.location = f"sqlite://{path}"
        self._tmp = path.with_name(f".{path.name}.tmp-restore-{restore_id}")
        self._conn: sqlite3.Connection | None = None
        self._fd: int | None = None
        self._replace = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, *, replace: bool) -> None:
        await asyncio.to_thread(self._open_sync, replace)

    def _open_sync(self, replace: bool) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise TargetError(f"{self.location}: directory {parent} does not exist")
        scratch.sweep(self.path, lambda p: p.unlink(missing_ok=True))  # killed restores
        self._replace = replace
        if self.path.exists() and not replace and self._holds_data(self.path):
            raise TargetError(
                f"{self.location} already holds data; choose another file or pass --replace "
                "(the file is replaced atomically once the restore is verified)"
            )
        try:
            created = scratch.new_name(self._tmp)
            os.close(os.open(created, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            self._fd = scratch.claim(created, self._tmp)
            conn = sqlite3.connect(self._tmp, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA cache_size=-200000")
            conn.execute("BEGIN")
        except (sqlite3.Error, OSError) as exc:
            self._drop_scratch()
            raise TargetError(f"{self.location}: cannot create {self._tmp}: {exc}") from None
        self._conn = conn

    @staticmethod
    def _holds_data(path: Path) -> bool:
        try:
            if path.stat().st_size == 0:
                return False
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                tables = [r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")]
                return bool(tables)
        except sqlite3.DatabaseError:
            return True  # not a database we can read: certainly not ours to overwrite

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise TargetError(f"{self.location}: not open")
        return self._conn

    # -- writing ---------------------------------------------------------------------------

    #: this target takes rows converted by :class:`~replicator.restore.rowcodec.RowCodec`
    row_target: RowTarget = "sqlite"

    async def write(self, layout: TableLayout, rows: Iterable[RowIn]) -> int:
        return await self.write_rows(layout, sqlite_rows(layout, rows))

    async def write_codec(self, codec: RowCodec, plan: RestorePlan, changes: dict[str, Change],
                          digest: DigestBuilder, progress: Callable[[int], None] | None = None
                          ) -> int:
        """Load one entity's live changes, converted by ``codec`` (in a worker thread): by
        the native loader when it is built (events bound straight from their bytes, no
        Python object per value), else through ``executemany``."""
        if codec.sqlite_native:
            return await asyncio.to_thread(self._load_native_sync, codec, plan, changes,
                                           digest, progress)
        return await self.write_rows(codec.layout, codec.rows(plan, changes, digest, progress))

    def _load_native_sync(self, codec: RowCodec, plan: RestorePlan,
                          changes: dict[str, Change], digest: DigestBuilder,
                          progress: Callable[[int], None] | None) -> int:
        from replicator.restore.rowcodec import SqliteFailure

        layout = codec.layout
        with self._own_connection_paused():
            try:
                return codec.sqlite_load(
                    self._tmp, create_table_sql(layout, rowid=self.rowid_tables),
                    self._insert_sql(layout), plan, changes, digest, progress)
            except SqliteFailure as exc:
                raise TargetError(f"{self.location}: loading {layout.entity}: {exc}") from None

    @contextlib.contextmanager
    def _own_connection_paused(self) -> Iterator[None]:
        """The native loader and reader use connections of their own: this one must hold no
        lock meanwhile (journal off: its transaction has nothing to roll back) and starts a
        new transaction afterwards."""
        conn = self._c()
        if conn.in_transaction:
            conn.execute("COMMIT")
        try:
            yield
        finally:
            conn.execute("BEGIN")

    @staticmethod
    def _insert_sql(layout: TableLayout) -> str:
        marks = ", ".join("?" * len(layout.columns))
        return f"INSERT INTO {_q(layout.entity)} VALUES ({marks})"

    async def write_rows(self, layout: TableLayout, rows: Iterable[tuple[Any, ...]]) -> int:
        """Create the entity's table and insert ``rows`` (already in the table's column
        order and stored forms, key order); the iterable is consumed in a worker thread."""
        return await asyncio.to_thread(self._write_sync, layout, rows)

    def _write_sync(self, layout: TableLayout, rows: Iterable[tuple[Any, ...]]) -> int:
        conn = self._c()
        conn.execute(create_table_sql(layout, rowid=self.rowid_tables))
        cur = conn.executemany(self._insert_sql(layout), rows)
        return cur.rowcount

    async def read_digest(self, layout: TableLayout) -> StateDigest:
        return await asyncio.to_thread(self._digest_sync, layout)

    def _digest_sync(self, layout: TableLayout) -> StateDigest:
        from replicator.restore.rowcodec import RowCodec, SqliteFailure

        conn = self._c()
        cols = ", ".join(_q(c.name) for c in (layout.columns[0], *layout.data_columns))
        query = f"SELECT {cols} FROM {_q(layout.entity)}"
        d = DigestBuilder(layout.entity)
        codec = RowCodec(layout, "sqlite")
        if codec.sqlite_native:  # read natively: no Python object per value
            with self._own_connection_paused():
                try:
                    codec.sqlite_digest(self._tmp, query, d)
                except SqliteFailure as exc:
                    raise TargetError(f"{self.location}: reading {layout.entity} back: "
                                      f"{exc}") from None
            return d.result()
        codec.digest_stored(conn.execute(query), d)
        return d.result()

    async def record(self, rec: RestoreRecord) -> None:
        conn = self._c()
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {RESTORES_TABLE} (restore_id TEXT PRIMARY KEY, "
            "at TEXT, at_ms INTEGER, cut TEXT, counts TEXT, digests TEXT, started_at TEXT, "
            "finished_at TEXT, replicator_version TEXT)"
        )
        conn.execute(
            f"INSERT INTO {RESTORES_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.restore_id, rec.at, rec.at_ms, orjson.dumps(rec.cut).decode(),
             orjson.dumps(rec.counts).decode(), orjson.dumps(rec.digests).decode(),
             rec.started_at, rec.finished_at, rec.replicator_version),
        )

    async def commit(self) -> None:
        await asyncio.to_thread(self._commit_sync)

    def _commit_sync(self) -> None:
        conn = self._c()
        conn.execute("COMMIT")
        conn.close()
        self._conn = None
        fd = os.open(self._tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if self._replace:
                os.replace(self._tmp, self.path)
            else:  # create-only: a concurrent restore that finished first is not overwritten
                os.link(self._tmp, self.path)
                self._tmp.unlink()
        except FileExistsError:
            self._drop_scratch()
            raise TargetError(f"{self.location} was written by another restore meanwhile; "
                              "nothing replaced (pass --replace to replace it)") from None
        except FileNotFoundError:
            raise TargetError(f"{self.location}: the scratch file {self._tmp} vanished "
                              "before commit") from None
        fsync_dir(self.path.parent)
        scratch.release(self._fd)
        self._fd = None

    def _drop_scratch(self) -> None:
        if self._fd is not None:
            self._tmp.unlink(missing_ok=True)
        scratch.release(self._fd)
        self._fd = None

    async def abort(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        self._drop_scratch()
