"""Restore's per-row work for the relational targets, in one pass: live changes -> target
rows plus the backup side of the state digest; rows read back -> the target side.

Two implementations with the same results:

* the Python reference (:func:`event_rows` feeding the target's row converter, and the
  :data:`~replicator.restore.layout.CANONICAL_STORED` converters for the read-back);
* the native ``replicator.restore._rows`` (C, built at install). Its raw path scans the
  event's JSON bytes itself and writes rows and digest text without a Python object per
  value; an event it does not take plainly goes to its orjson path, which converts plain
  values itself and hands everything else -- an unusual timestamp, a value of an unexpected
  type, an event that does not parse -- to the reference converters, per value or per row.
  With SQLite's headers it also loads and reads back SQLite tables through SQLite's C API.

Tests compare the two on hostile rows; the restore tests compare both with an independent
oracle. ``REPLICATOR_NO_NATIVE=1`` forces the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson

from replicator.restore.digest import DigestBuilder
from replicator.restore.layout import (
    CANONICAL,
    CANONICAL_STORED,
    Kind,
    TableLayout,
    canonical_stored,
    compile_row,
    rfc3339_to_micros,
    ts_text,
)
from replicator.restore.planner import RestorePlan
from replicator.restore.replay import Change, LiveRow, live_rows

RowTarget = Literal["pg", "sqlite"]
KIND_CODES: dict[Kind, int] = {"text": 0, "timestamptz": 1, "bigint": 2, "double": 3,
                               "boolean": 4, "jsonb": 5}
_KINDS: dict[int, Kind] = {v: k for k, v in KIND_CODES.items()}
_TARGET_CODES: dict[RowTarget, int] = {"pg": 0, "sqlite": 1}
_PG_BINARY = 2
#: PostgreSQL binary COPY: signature, flags, header extension length (and the trailer)
PG_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
PG_COPY_TRAILER = b"\xff\xff"
#: live keys converted per native call (the rows of one call are held at once)
CHUNK = 5000
#: live keys per binary COPY chunk: small, so that the server works on one chunk while the
#: next is encoded instead of waiting for a large one to drain
COPY_CHUNK = 500
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def _load_native() -> Any:
    if os.environ.get("REPLICATOR_NO_NATIVE"):
        return None
    try:
        from replicator.restore import _rows  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _rows


native: Any = _load_native()

RowIn = tuple[Any, dict[str, Any]]


class SqliteFailure(Exception):
    """SQLite refused the native loader or reader (its message); the target turns it into
    a :class:`~replicator.errors.TargetError` naming itself."""


def event_rows(
    layout: TableLayout, plan: RestorePlan, changes: dict[str, Change], digest: DigestBuilder,
    progress: Callable[[int], None] | None = None,
) -> Iterator[RowIn]:
    """Live rows in key order with their parsed event; feeds ``digest`` (the backup side).
    The reference path, and the input of targets without a native row form."""
    canon = compile_row(layout.data_columns, CANONICAL, source="mapping")
    loads = orjson.loads
    add = digest.add
    n = 0
    for live in live_rows(plan, changes):
        event = loads(live.value)
        add(live.key, canon(event.get("data") or {}))
        yield live, event
        n += 1
        if progress is not None and n == 10_000:
            progress(n)
            n = 0
    if progress is not None and n:
        progress(n)


def _row_fn(layout: TableLayout, target: RowTarget) -> Callable[[Iterable[RowIn]],
                                                                Iterator[tuple[Any, ...]]]:
    if target == "pg":
        from replicator.targets.postgres import pg_rows

        return lambda rows: pg_rows(layout, rows)
    from replicator.targets.sqlite import sqlite_rows

    return lambda rows: sqlite_rows(layout, rows)


def _ts_target(target: RowTarget) -> Callable[[str], Any]:
    if target == "pg":
        from replicator.targets.postgres import _ts

        return _ts
    return ts_text


class RowCodec:
    """The row form of one entity for one target kind (``pg`` or ``sqlite``)."""

    def __init__(self, layout: TableLayout, target: RowTarget, *,
                 use_native: bool = True) -> None:
        self.layout = layout
        self.target = target
        self.native = native if use_native else None
        self._names = tuple(c.name for c in layout.data_columns)
        self._kinds = tuple(KIND_CODES[c.kind] for c in layout.data_columns)
        self._rows = _row_fn(layout, target)
        canon = compile_row(layout.data_columns, CANONICAL, source="mapping")
        rows_of = self._rows

        def slow_row(key: str, value: bytes, topic: str, partition: int, offset: int
                     ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
            event = orjson.loads(value)
            (row,) = rows_of([(LiveRow(key, value, topic, partition, offset, 0), event)])
            return row, (key, *canon(event.get("data") or {}))

        def stored(kind: int, value: Any) -> Any:
            return canonical_stored(_KINDS[kind], value)

        def dt_micros(value: datetime) -> int:
            return (value - EPOCH) // _MICRO

        def jsonb(text: bytes) -> tuple[bytes, bytes]:
            value = orjson.loads(text)
            return orjson.dumps(value), orjson.dumps(value, option=orjson.OPT_SORT_KEYS)

        self._helpers = (
            orjson.loads, orjson.dumps, {"option": orjson.OPT_SORT_KEYS}, UTC,
            _ts_target(target), rfc3339_to_micros, slow_row, stored, dt_micros, jsonb,
        )

    def rows(self, plan: RestorePlan, changes: dict[str, Change], digest: DigestBuilder,
             progress: Callable[[int], None] | None = None) -> Iterator[tuple[Any, ...]]:
        """The target rows of the live keys in key order; feeds ``digest``."""
        if self.native is None:
            yield from self._rows(event_rows(self.layout, plan, changes, digest, progress))
            return
        keys, values = self._in_key_order(changes)
        parts = [(p.topic, p.partition) for p in plan.partitions]
        encode = self.native.encode_chunk
        tcode = _TARGET_CODES[self.target]
        for i in range(0, len(keys), CHUNK):
            rows, n, hi, lo = encode(self._names, self._kinds, tcode, keys[i : i + CHUNK],
                                     values[i : i + CHUNK], parts, self._helpers)
            digest.add_sum(n, (hi << 64) | lo)
            yield from rows
            if progress is not None and n:
                progress(n)

    def _in_key_order(self, changes: dict[str, Change]) -> tuple[list[str], list[Change]]:
        """The keys in key order (code point order, as ``sorted``) and their changes."""
        if self.native is not None:
            both = self.native.sort_changes(changes)
            if both is not None:
                return both  # type: ignore[no-any-return]
        keys = sorted(changes)
        return keys, [changes[k] for k in keys]

    @property
    def sqlite_native(self) -> bool:
        """The native SQLite loader and read-back are built (SQLite's headers were there)."""
        return (self.native is not None and self.target == "sqlite"
                and hasattr(self.native, "sqlite_load"))

    def sqlite_load(self, path: Path, create_sql: str, insert_sql: str, plan: RestorePlan,
                    changes: dict[str, Change], digest: DigestBuilder,
                    progress: Callable[[int], None] | None = None) -> int:
        """Create the table (``create_sql``) and insert the live keys in key order into the
        SQLite file ``path`` through a connection of the native loader's own, in one
        transaction; feeds ``digest``. The rows are those :meth:`rows` gives. Raises
        :class:`SqliteFailure` for what SQLite refuses (the file is then the caller's to
        drop: a failed load commits nothing)."""
        nat = self.native
        if nat is None or not self.sqlite_native:
            raise ValueError("the native SQLite loader is not built")
        keys, values = self._in_key_order(changes)
        parts = [(p.topic, p.partition) for p in plan.partitions]
        try:
            n, hi, lo = nat.sqlite_load(os.fsencode(path), create_sql, insert_sql,
                                        self._names, self._kinds, keys, values, parts,
                                        self._helpers, progress)
        except nat.SqliteError as exc:
            raise SqliteFailure(str(exc)) from None
        digest.add_sum(n, (hi << 64) | lo)
        return int(n)

    def sqlite_digest(self, path: Path, select_sql: str, digest: DigestBuilder) -> None:
        """Add the rows of ``select_sql`` (key, data columns), read from the SQLite file
        ``path`` through a read-only connection of its own, to ``digest``."""
        nat = self.native
        if nat is None or not self.sqlite_native:
            raise ValueError("the native SQLite read-back is not built")
        try:
            n, hi, lo = nat.sqlite_digest(os.fsencode(path), select_sql, self._kinds,
                                          self._helpers)
        except nat.SqliteError as exc:
            raise SqliteFailure(str(exc)) from None
        digest.add_sum(n, (hi << 64) | lo)

    def pg_copy_data(self, plan: RestorePlan, changes: dict[str, Change],
                     digest: DigestBuilder, progress: Callable[[int], None] | None = None
                     ) -> Iterator[bytes]:
        """The live keys as PostgreSQL binary ``COPY`` data (header, chunks of rows in key
        order, trailer) for a table of this layout; feeds ``digest``. Native only: the same
        rows as :meth:`rows` would give, encoded without a Python object per value."""
        if self.native is None or self.target != "pg":
            raise ValueError("binary COPY data needs the native codec and a PostgreSQL layout")
        yield PG_COPY_HEADER
        keys, values = self._in_key_order(changes)
        parts = [(p.topic, p.partition) for p in plan.partitions]
        encode = self.native.encode_chunk
        for i in range(0, len(keys), COPY_CHUNK):
            data, n, hi, lo = encode(self._names, self._kinds, _PG_BINARY,
                                     keys[i : i + COPY_CHUNK], values[i : i + COPY_CHUNK],
                                     parts, self._helpers)
            digest.add_sum(n, (hi << 64) | lo)
            if data:
                yield data
            if progress is not None and n:
                progress(n)
        yield PG_COPY_TRAILER

    def pg_copy_digest(self, digest: DigestBuilder) -> PgCopyDigest:
        """A sink for ``COPY (SELECT key, <data columns> ...) TO STDOUT (FORMAT binary)``
        that adds the rows to ``digest`` (native only)."""
        if self.native is None:
            raise ValueError("reading binary COPY data needs the native codec")
        return PgCopyDigest(self.native, self._kinds, self._helpers, digest)

    def digest_stored(self, rows: Iterable[Any], digest: DigestBuilder) -> None:
        """Add rows read back from the target -- ``(key, *data columns)`` -- to ``digest``."""
        if self.native is None:
            canon = compile_row(self.layout.data_columns, CANONICAL_STORED,
                                source="sequence", offset=1)
            add = digest.add
            for row in rows:
                add(row[0], canon(row))
            return
        n, hi, lo = self.native.digest_rows(self._kinds, _TARGET_CODES[self.target], rows,
                                            self._helpers)
        digest.add_sum(n, (hi << 64) | lo)


class PgCopyDigest:
    """Feeds PostgreSQL binary ``COPY`` output, in chunks cut anywhere, to the native
    digest; :meth:`finish` checks that the data ended with the trailer and nothing after."""

    def __init__(self, native_mod: Any, kinds: tuple[int, ...], helpers: tuple[Any, ...],
                 digest: DigestBuilder) -> None:
        self._native = native_mod
        self._kinds = kinds
        self._helpers = helpers
        self._digest = digest
        self._buf = b""
        self._header = False
        self.done = False

    async def feed(self, chunk: bytes) -> None:
        data = self._buf + chunk if self._buf else bytes(chunk)
        if not self._header:
            if len(data) < 19:
                self._buf = data
                return
            if data[:11] != PG_COPY_HEADER[:11]:
                raise ValueError("not PostgreSQL binary COPY data")
            start = 19 + int.from_bytes(data[15:19], "big")
            if len(data) < start:
                self._buf = data
                return
            data = data[start:]
            self._header = True
        if self.done:
            if data:
                raise ValueError("binary COPY data after the trailer")
            return
        consumed, n, hi, lo, done = self._native.digest_copy(self._kinds, data, self._helpers)
        self._digest.add_sum(n, (hi << 64) | lo)
        self._buf = data[consumed:]
        self.done = bool(done)

    def finish(self) -> None:
        if not self.done or self._buf:
            raise ValueError("binary COPY data ended before its trailer")
