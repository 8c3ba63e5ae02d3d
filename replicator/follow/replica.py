"""Replica targets: a standby database a follower keeps in sync, change batch by batch.

The layout is the restore's (one table per entity, ``key`` primary key, typed data columns,
``_version/_topic/_partition/_offset/_ts``), bootstrapped by a restore; on top of it the
replica keeps ``replicator_positions`` (per partition: the next offset to apply, the Kafka
timestamp of the last applied record and when it was applied).

Invariant: :meth:`Replica.apply` writes a batch's rows **and** the positions it reaches in
one transaction, so after a crash at any instant the stored positions describe exactly the
rows that are there: a restarted follower neither loses nor repeats a change.

Cross-partition rule (a key published to two partitions, which publishers should not do):
an upsert replaces a row from another partition only when its ``(version, ts, partition)``
is greater, like the restore's tie-break; a delete always applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from replicator.errors import TargetError
from replicator.restore.layout import TableLayout
from replicator.restore.replay import LiveRow
from replicator.targets.base import RowIn, Target
from replicator.targets.postgres import check_schema_name, pg_rows, split_url
from replicator.targets.postgres import create_table_sql as pg_create_table_sql
from replicator.targets.sqlite import create_table_sql as sqlite_create_table_sql
from replicator.targets.sqlite import sqlite_row_fn

TP = tuple[str, int]
POSITIONS_TABLE = "replicator_positions"
RESTORES_TABLE = "replicator_restores"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a partition stands in the replica."""

    next_offset: int
    last_ts_ms: int = 0
    applied_ms: int = 0


#: A key's newest change in a batch: (parsed event, topic, partition, offset)
Change = tuple[dict[str, Any], str, int, int]
#: One batch: per entity, per key, the winning change (``None``: deleted)
Batch = Mapping[str, Mapping[str, Change | None]]


class Replica(Protocol):
    #: where the replica lives, for messages (no credentials)
    location: str
    #: the URL a bootstrap restore writes into
    restore_url: str

    def bootstrap_target(self, restore_id: str) -> Target | None:
        """The restore target a bootstrap writes through (None: the URL's default)."""

    async def open(self) -> None:
        """Connect; the tables may not exist yet (not bootstrapped)."""

    async def positions(self) -> dict[TP, Position] | None:
        """Stored positions; after a fresh bootstrap, the restore's cut; None when the
        replica was never bootstrapped."""

    async def apply(self, layouts: Mapping[str, TableLayout], batch: Batch,
                    positions: Mapping[TP, Position]) -> None:
        """Write ``batch`` and ``positions`` in one transaction."""

    async def close(self) -> None: ...


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _cut_positions(cut: Any) -> dict[TP, Position] | None:
    doc = orjson.loads(cut) if isinstance(cut, (str, bytes)) else cut
    out: dict[TP, Position] = {}
    for p in doc or []:
        if p.get("end_offset") is None:
            return None  # a time restore: no exact offsets to continue from
        out[(str(p["topic"]), int(p["partition"]))] = Position(int(p["end_offset"]))
    return out


def _upsert_guard(table: str, new: str) -> str:
    """SQL: may the incoming row ``new`` replace the stored row of ``table``?"""
    return (f"({table}._topic = {new}._topic AND {table}._partition = {new}._partition) OR "
            f"(COALESCE({new}._version, -1), {new}._ts, {new}._partition) > "
            f"(COALESCE({table}._version, -1), {table}._ts, {table}._partition)")


class SqliteReplica:
    """A SQLite file kept in sync.

    Tables are rowid tables (a bootstrap creates them so): updates arrive in random key
    order, and a clustered (``WITHOUT ROWID``) table would rewrite a leaf page per row.
    WAL journal with ``synchronous=NORMAL``: a commit is not fsync'd, a checkpoint is, so
    a power loss can lose the newest batches -- rows and positions together (a WAL commit
    is atomic) -- and the follower re-applies them: nothing is lost or applied twice.
    Checkpoints run every ``checkpoint_s`` from a second connection in a worker thread
    (passive: never blocks the applier), not inside the applier's commits.
    """

    def __init__(self, path: Path, *, checkpoint_s: float = 5.0, read_only: bool = False
                 ) -> None:
        self.path = path
        #: status readers: never write, never checkpoint, never take the write lock
        self.read_only = read_only
        self.location = f"sqlite://{path}"
        self.restore_url = self.location
        self.checkpoint_s = checkpoint_s
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._row_fns: dict[str, Any] = {}
        #: entity tables known to exist on the current connection
        self._tables: set[str] = set()

    def bootstrap_target(self, restore_id: str) -> Target | None:
        from replicator.targets.sqlite import SqliteTarget

        return SqliteTarget(self.path, restore_id, rowid_tables=True)

    async def open(self) -> None:
        if not self.path.parent.is_dir():
            raise TargetError(f"{self.location}: directory {self.path.parent} does not exist")
        if self._checkpointer is None and not self.read_only:
            self._checkpointer = asyncio.create_task(self._checkpoint_loop())

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_s)
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.to_thread(self._checkpoint_sync, "PASSIVE")

    def _checkpoint_sync(self, mode: str) -> None:
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as c:
            c.execute(f"PRAGMA wal_checkpoint({mode})")

    def _c(self) -> sqlite3.Connection:
        if self._conn is None and self.read_only:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                         isolation_level=None, check_same_thread=False)
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint_loop
            conn.execute("PRAGMA cache_size=-65536")  # 64 MiB of pages
            self._conn = conn
        return self._conn

    async def positions(self) -> dict[TP, Position] | None:
        return await asyncio.to_thread(self._positions_sync)

    def _positions_sync(self) -> dict[TP, Position] | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        c = self._c()
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if POSITIONS_TABLE in tables:
            rows = c.execute(f"SELECT topic, partition, next_offset, last_ts_ms, applied_ms "
                             f"FROM {POSITIONS_TABLE}").fetchall()
            if rows:
                return {(t, int(p)): Position(int(n), int(ts), int(a)) for t, p, n, ts, a in rows}
        if RESTORES_TABLE in tables:
            row = c.execute(f"SELECT cut FROM {RESTORES_TABLE} ORDER BY finished_at DESC "
                            "LIMIT 1").fetchone()
            if row:
                return _cut_positions(row[0])
        return None

    async def apply(self, layouts: Mapping[str, TableLayout], batch: Batch,
                    positions: Mapping[TP, Position]) -> None:
        await asyncio.to_thread(self._apply_sync, layouts, batch, positions)

    def _apply_sync(self, layouts: Mapping[str, TableLayout], batch: Batch,
                    positions: Mapping[TP, Position]) -> None:
        c = self._c()
        try:
            c.execute("BEGIN IMMEDIATE")
            c.execute(f"CREATE TABLE IF NOT EXISTS {POSITIONS_TABLE} (topic TEXT NOT NULL, "
                      "partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, "
                      "last_ts_ms INTEGER NOT NULL, applied_ms INTEGER NOT NULL, "
                      "PRIMARY KEY (topic, partition))")
            for entity, changes in batch.items():
                layout = layouts[entity]
                t = _q(entity)
                if entity not in self._tables:
                    # an entity with nothing stored when the replica was bootstrapped has
                    # no table yet: its first changes create it
                    c.execute(sqlite_create_table_sql(layout, rowid=True).replace(
                        "CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
                    self._tables.add(entity)
                names = layout.column_names
                cols = ", ".join(_q(n) for n in names)
                sets = ", ".join(f"{_q(n)} = excluded.{_q(n)}" for n in names if n != "key")
                row = self._row_fns.get(entity)
                if row is None:
                    row = self._row_fns[entity] = sqlite_row_fn(layout)
                ups = [row(*ch) for k, ch in sorted(changes.items()) if ch is not None]
                dels = [(k,) for k, ch in changes.items() if ch is None]
                if ups:
                    c.executemany(
                        f"INSERT INTO {t} ({cols}) VALUES ({', '.join('?' * len(names))}) "
                        f"ON CONFLICT(key) DO UPDATE SET {sets} WHERE "
                        + _upsert_guard(t, "excluded"), ups)
                if dels:
                    c.executemany(f"DELETE FROM {t} WHERE key = ?", dels)
            c.executemany(
                f"INSERT INTO {POSITIONS_TABLE} VALUES (?, ?, ?, ?, ?) ON CONFLICT(topic, "
                "partition) DO UPDATE SET next_offset = excluded.next_offset, "
                "last_ts_ms = excluded.last_ts_ms, applied_ms = excluded.applied_ms",
                [(t, p, pos.next_offset, pos.last_ts_ms, pos.applied_ms)
                 for (t, p), pos in positions.items()])
            c.execute("COMMIT")
        except sqlite3.Error as exc:
            self._tables.clear()  # a rolled-back CREATE TABLE is gone too
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise TargetError(f"{self.location}: applying changes failed: {exc}") from None

    async def close(self) -> None:
        self._tables.clear()  # a bootstrap may replace the file
        task, self._checkpointer = self._checkpointer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            if not self.read_only:
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.to_thread(self._checkpoint_sync, "TRUNCATE")


class PostgresReplica:
    """A PostgreSQL schema kept in sync (default schema ``replica``)."""

    def __init__(self, url: str, *, default_schema: str = "replica") -> None:
        self._dsn, schema, shown = split_url(url)
        self.schema = check_schema_name(schema or default_schema)
        self.location = f"{shown} (schema {self.schema})"
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                 if k != "schema"] + [("schema", self.schema)]
        # every connection parameter (host, sslmode, ...) kept: the bootstrap must write
        # into the very database the replica connection reads
        self.restore_url = urlunsplit(parts._replace(query=urlencode(query)))
        self._conn: asyncpg.Connection | None = None
        self._staged: set[str] = set()
        #: entity tables known to exist (reset with the connection)
        self._tables: set[str] = set()

    def bootstrap_target(self, restore_id: str) -> Target | None:
        return None  # the URL's PostgreSQL target, into this schema

    async def open(self) -> None:
        try:
            self._conn = await asyncpg.connect(self._dsn, timeout=10)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise TargetError(f"cannot connect to {self.location}: "
                              f"{exc or type(exc).__name__}") from None
        self._staged = set()
        self._tables = set()

    def _c(self) -> asyncpg.Connection:
        if self._conn is None:
            raise TargetError(f"{self.location}: not open")
        return self._conn

    async def positions(self) -> dict[TP, Position] | None:
        c = self._c()
        s = self.schema
        tables = {r[0] for r in await c.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", s)}
        if POSITIONS_TABLE in tables:
            rows = await c.fetch(f"SELECT topic, partition, next_offset, last_ts_ms, applied_ms "
                                 f"FROM {_q(s)}.{POSITIONS_TABLE}")
            if rows:
                return {(r[0], int(r[1])): Position(int(r[2]), int(r[3]), int(r[4]))
                        for r in rows}
        if RESTORES_TABLE in tables:
            cut = await c.fetchval(f"SELECT cut FROM {_q(s)}.{RESTORES_TABLE} "
                                   "ORDER BY finished_at DESC LIMIT 1")
            if cut is not None:
                return _cut_positions(cut)
        return None

    async def apply(self, layouts: Mapping[str, TableLayout], batch: Batch,
                    positions: Mapping[TP, Position]) -> None:
        c = self._c()
        s = _q(self.schema)
        try:
            async with c.transaction():
                await c.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.{POSITIONS_TABLE} (topic text NOT NULL, "
                    "partition bigint NOT NULL, next_offset bigint NOT NULL, "
                    "last_ts_ms bigint NOT NULL, applied_ms bigint NOT NULL, "
                    "PRIMARY KEY (topic, partition))")
                for entity, changes in batch.items():
                    await self._apply_entity(c, layouts[entity], changes)
                await c.executemany(
                    f"INSERT INTO {s}.{POSITIONS_TABLE} VALUES ($1, $2, $3, $4, $5) "
                    "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = "
                    "EXCLUDED.next_offset, last_ts_ms = EXCLUDED.last_ts_ms, "
                    "applied_ms = EXCLUDED.applied_ms",
                    [(t, p, pos.next_offset, pos.last_ts_ms, pos.applied_ms)
                     for (t, p), pos in positions.items()])
        except asyncpg.PostgresError as exc:
            self._staged.clear()  # a rolled-back CREATE TEMP TABLE is gone too
            self._tables.clear()
            raise TargetError(f"{self.location}: applying changes failed: {exc}") from None

    async def _apply_entity(self, c: asyncpg.Connection, layout: TableLayout,
                            changes: Mapping[str, Change | None]) -> None:
        s, t = _q(self.schema), _q(layout.entity)
        table = f"{s}.{t}"
        stage = _q(f"_in_{layout.entity}")
        ups: Sequence[RowIn] = [
            (LiveRow(k, b"", ch[1], ch[2], ch[3], 0), ch[0])
            for k, ch in sorted(changes.items()) if ch is not None]
        dels = [k for k, ch in changes.items() if ch is None]
        if layout.entity not in self._tables:
            # an entity with nothing stored when the replica was bootstrapped has no table
            # yet: its first changes create it
            await c.execute(pg_create_table_sql(self.schema, layout).replace(
                "CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
            self._tables.add(layout.entity)
        if ups:
            if layout.entity not in self._staged:
                await c.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
                                f"(LIKE {table}) ON COMMIT DELETE ROWS")
                self._staged.add(layout.entity)
            names = layout.column_names
            await c.copy_records_to_table(f"_in_{layout.entity}", columns=names,
                                          records=pg_rows(layout, ups))
            cols = ", ".join(_q(n) for n in names)
            sets = ", ".join(f"{_q(n)} = EXCLUDED.{_q(n)}" for n in names if n != "key")
            await c.execute(
                f"INSERT INTO {table} AS cur ({cols}) SELECT {cols} FROM {stage} "
                f"ON CONFLICT (key) DO UPDATE SET {sets} WHERE "
                + _upsert_guard("cur", "EXCLUDED"))
        if dels:
            await c.execute(f"DELETE FROM {table} WHERE key = ANY($1::text[])", dels)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def open_replica(url: str, *, read_only: bool = False) -> Replica:
    """A replica for ``postgresql://...[?schema=]`` or ``sqlite:///abs/path.db``
    (``read_only``: for status, a SQLite replica is opened without any write)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresReplica(url)
    if url.startswith("sqlite://"):
        raw = url[len("sqlite://"):]
        if not raw.startswith("/"):
            raise TargetError(f"replica {url!r}: the path must be absolute (sqlite:///abs/path)")
        return SqliteReplica(Path(raw), read_only=read_only)
    raise TargetError(f"unsupported replica target {url!r}: use postgresql:// or sqlite:///")
