"""Synthetic backups for restore tests, and the independent oracle.

:func:`build_history` makes a multi-partition change history (upserts, deletes, re-inserts,
out-of-order Kafka timestamps within a partition are not produced: CreateTime is monotonic
per partition here, like a real producer's) as real demo events, writes it as real segment
files into a :class:`LocalStore` (several segments per partition, watermark blocks, a
watermark object per partition) exactly as ingest would lay them out.

:class:`Oracle` applies the events in memory with the simplest possible code: for a time T,
every event with timestamp <= T, in partition order; the last op per key wins. It shares no
code with the replay under test.
"""

from __future__ import annotations

import random
import sqlite3
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from replicator import naming
from replicator.demo import iter_events
from replicator.restore.layout import TableLayout, canonical, canonical_stored
from replicator.schemas import SchemaRegistry
from replicator.segment.writer import ActiveSegment, BlockBuilder
from replicator.storage.local import LocalStore

ENTITIES = ("attendance", "participant", "config")
BASE_MS = 1_764_000_000_000


@dataclass
class Event:
    topic: str
    partition: int
    offset: int
    ts_ms: int
    key: str
    op: str
    value: bytes
    data: dict[str, Any] | None


@dataclass
class History:
    store_root: Path
    events: list[Event] = field(default_factory=list)
    #: per (topic, partition): watermark of the whole partition
    newest_ms: int = 0
    oldest_ms: int = 0
    partitions: int = 3

    def by_partition(self) -> dict[tuple[str, int], list[Event]]:
        out: dict[tuple[str, int], list[Event]] = {}
        for e in self.events:
            out.setdefault((e.topic, e.partition), []).append(e)
        return out


def build_history(
    root: Path, *, seed: int = 7, events: int = 3000, partitions: int = 3,
    per_segment: int = 150,
) -> History:
    """Write a realistic history (the demo generator's stream: registrations, updates,
    check-ins, corrections, deletes, erasures, config changes) into ``root/store``."""
    rng = random.Random(seed)
    reg = SchemaRegistry.load()
    store = LocalStore(root=root / "store")
    h = History(store_root=root / "store", partitions=partitions)
    offsets: dict[tuple[str, int], int] = {}
    ts = BASE_MS
    for ce in iter_events(events, seed=seed):
        part = zlib.crc32(ce.key.encode()) % partitions
        ts += rng.choice((0, 1, 3, 10, 250))  # equal timestamps happen
        tp = (ce.entity, part)
        off = offsets.get(tp, 0)
        offsets[tp] = off + 1 + (1 if rng.random() < 0.03 else 0)  # gaps: tx markers
        value = orjson.dumps(ce.envelope(schema_version=reg.schema_version(ce.entity)))
        h.events.append(Event(ce.entity, part, off, ts, ce.key, ce.op, value,
                              dict(ce.data) if ce.data is not None else None))
    h.oldest_ms = min(e.ts_ms for e in h.events)
    h.newest_ms = ts + 1000
    for (topic, part), evs in h.by_partition().items():
        _write_partition(store, root / "tmp", topic, part, evs, per_segment, h.newest_ms,
                         offsets[(topic, part)])
    return h


def _write_partition(store: LocalStore, tmp: Path, topic: str, part: int, evs: list[Event],
                     per_segment: int, watermark_ms: int, end: int) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    start = 0
    chunks = [evs[i:i + per_segment] for i in range(0, len(evs), per_segment)]
    for ci, chunk in enumerate(chunks):
        last = ci == len(chunks) - 1
        seg_end = end if last else chunks[ci + 1][0].offset
        path = tmp / f"{topic}-{part}-{start}.seg"
        seg = ActiveSegment.create(path, topic=topic, partition=part, base_offset=start)
        b = BlockBuilder(start)
        for i, e in enumerate(chunk):
            b.append(e.offset, e.ts_ms, 0, e.key.encode(), e.value, [("entity", topic.encode())])
            if i % 40 == 39:
                blk = b.take(0)
                if blk is not None:
                    seg.write(blk)
        b.skip_to(seg_end)
        blk = b.take(watermark_ms if last else chunk[-1].ts_ms)
        if blk is not None:
            seg.write(blk)
        seg.sync()
        seg.seal()
        store.put_file_sync(naming.segment_name(topic, part, start, seg_end), path)
        start = seg_end
    store.put_bytes_sync(naming.watermark_name(topic, part), orjson.dumps({
        "topic": topic, "partition": part, "stored_end": end, "durable_end": end,
        "watermark_ms": watermark_ms, "updated_ms": watermark_ms}), create_only=False)


class Oracle:
    """The expected state, computed independently of the replicator's replay."""

    def __init__(self, history: History) -> None:
        self.h = history

    def state(self, entity: str, at_ms: int | None = None,
              ends: dict[tuple[str, int], int] | None = None) -> dict[str, dict[str, Any]]:
        """key -> data of the live records of ``entity`` at ``at_ms`` (or up to ``ends``)."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.h.events:  # generated in time order; per partition in offset order
            if e.topic != entity:
                continue
            if at_ms is not None and e.ts_ms > at_ms:
                continue
            if ends is not None and e.offset >= ends.get((e.topic, e.partition), 0):
                continue
            if e.op == "delete":
                out.pop(e.key, None)
            else:
                assert e.data is not None
                out[e.key] = e.data
        return out


def canonical_rows(layout: TableLayout, state: dict[str, dict[str, Any]]
                   ) -> dict[str, tuple[Any, ...]]:
    """The oracle's rows in the canonical form (for a row-by-row comparison)."""
    return {k: tuple(canonical(c.kind, d.get(c.name)) for c in layout.data_columns)
            for k, d in state.items()}


def stored_rows(layout: TableLayout, rows: list[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """Rows read back from a target (key first, then the data columns) in canonical form."""
    return {r[0]: tuple(canonical_stored(c.kind, v)
                        for c, v in zip(layout.data_columns, r[1:], strict=True))
            for r in rows}


def layouts() -> dict[str, TableLayout]:
    reg = SchemaRegistry.load()
    return {e: TableLayout.from_schema(e, reg.json_schema(e)) for e in ENTITIES}


def sqlite_rows(path: Path, layout: TableLayout) -> dict[str, tuple[Any, ...]]:
    """What a restored SQLite file holds for one entity, in canonical form."""
    cols = ", ".join(f'"{c.name}"' for c in (layout.columns[0], *layout.data_columns))
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f'SELECT {cols} FROM "{layout.entity}"').fetchall()
    return stored_rows(layout, rows)


async def pg_rows(dsn: str, schema: str, layout: TableLayout) -> dict[str, tuple[Any, ...]]:
    """What a restored PostgreSQL schema holds for one entity, in canonical form."""
    conn = await asyncpg.connect(dsn)
    try:
        cols = ", ".join(f'"{c.name}"' for c in (layout.columns[0], *layout.data_columns))
        rows = await conn.fetch(f'SELECT {cols} FROM "{schema}"."{layout.entity}"')
        return stored_rows(layout, [tuple(r) for r in rows])
    finally:
        await conn.close()
