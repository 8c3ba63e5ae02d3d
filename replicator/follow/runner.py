"""The follower: keep a replica continuously in sync with the backup.

1. **Bootstrap** (a replica with no positions): restore the newest state exactly up to the
   store's contiguous segment ends (an offsets restore: it starts from the cheapest
   snapshot chain and is verified by digest); the restore's cut becomes the positions.
2. **Follow**: one reader per partition feeds a queue: sealed segments from the store
   while they cover the partition's position, else the live tail of a running replicator
   (``--live URL``: durable blocks over HTTP, see :mod:`replicator.server`), else it polls
   the store. The applier folds what is queued into one batch (last change per key) and
   writes it with the positions it reaches in one transaction (:mod:`.replica`).
3. **Fell behind retention**: a position below the oldest offset the store still holds,
   and not servable live, means changes are gone: the follower says so and bootstraps
   again from the newest snapshot instead of applying a gap.

Invariants: positions only move forward; a batch and its positions commit together; a
record is applied only if its offset is ``>=`` its partition's position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from replicator import naming
from replicator.catalog import Catalog
from replicator.errors import ReplicatorError, SegmentError, StoreError
from replicator.follow.replica import TP, Position, Replica
from replicator.restore.layout import TableLayout
from replicator.restore.replay import LiveRow
from replicator.schemas import SchemaRegistry
from replicator.segment import format as fmt
from replicator.segment.reader import SegmentReader
from replicator.server import TAIL_FRAME
from replicator.storage.base import Store
from replicator.targets.base import RowIn

log = logging.getLogger(__name__)

#: (offset, Kafka timestamp ms, value bytes)
Rec = tuple[int, int, bytes | None]


class FellBehindError(ReplicatorError):
    """The changes after a follower's position are no longer in the store."""


@dataclass(slots=True)
class Chunk:
    """Records of one partition, contiguous from the position it was read at."""

    tp: TP
    records: list[Rec]
    end: int
    #: wall-clock ms each live block became durable (lag samples); empty for segments
    durable_ms: list[int] = field(default_factory=list)


@dataclass(slots=True)
class FollowStats:
    applied_events: int = 0
    batches: int = 0
    bootstraps: int = 0
    #: durable -> applied, ms, for live blocks (bounded ring)
    lag_ms: list[float] = field(default_factory=list)

    def note_lag(self, ms: float) -> None:
        self.lag_ms.append(ms)
        if len(self.lag_ms) > 200_000:
            del self.lag_ms[:100_000]


def decode_blocks(body: bytes, start: int) -> tuple[list[Rec], list[int], int]:
    """Records ``>= start`` of tail frames (checksums checked), their blocks' durable
    times, and the end offset of the last block."""
    recs: list[Rec] = []
    times: list[int] = []
    end = start
    pos = 0
    while pos < len(body):
        ms, n = TAIL_FRAME.unpack_from(body, pos)
        pos += TAIL_FRAME.size
        blk = memoryview(body)[pos:pos + n]
        pos += n
        meta, crc = fmt.decode_block_header(blk, 0)
        payload = blk[fmt.BLOCK_HEADER.size:fmt.BLOCK_HEADER.size + meta.payload_len]
        if fmt.block_crc(blk[:fmt.BLOCK_HEADER.size], payload) != crc:
            raise SegmentError(f"live tail block [{meta.start}, {meta.end}) failed its checksum")
        if meta.end <= end:
            continue
        if meta.start > end:
            break  # not contiguous (should not happen): re-ask from ``end``
        raw = fmt.decompress_payload(meta, payload, "live tail")
        recs.extend((r.offset, r.timestamp, r.value) for r in fmt.iter_records(raw)
                    if r.offset >= end)
        times.append(ms)
        end = meta.end
    return recs, times, end


def read_segment(path: Path, name: str, start: int) -> list[Rec]:
    """Records ``>= start`` of a sealed segment file (every block's checksum checked)."""
    with SegmentReader(path, name=name, expect_sealed=True) as r:
        return [(rec.offset, rec.timestamp, rec.value) for rec in r.iter_records(from_offset=start)]


class Follower:
    """``async with Follower(...) as f: await f.run()``; :meth:`request_stop` ends it."""

    def __init__(
        self, *, store: Store, replica: Replica, registry: SchemaRegistry,
        topics: Sequence[str], live: Sequence[str] = (), poll_s: float = 1.0,
        max_batch: int = 20_000, archive_url: str = "",
        on_batch: Callable[[Follower], None] | None = None,
    ) -> None:
        self.store = store
        self.replica = replica
        self.registry = registry
        self.topic_entities = {t: t for t in topics if t in registry.entities}
        self.live = [u.rstrip("/") for u in live]
        self.poll_s = poll_s
        self.max_batch = max_batch
        self.archive_url = archive_url
        self.on_batch = on_batch
        self.layouts = {e: TableLayout.from_schema(e, registry.json_schema(e))
                        for e in set(self.topic_entities.values())}
        self.positions: dict[TP, Position] = {}
        self.stats = FollowStats()
        self._stop = asyncio.Event()
        self._listing: dict[TP, list[naming.SegmentName]] = {}
        self._listing_mono = 0.0
        #: per partition, the offset below which retention removed segments
        self._trimmed: dict[TP, int] = {}
        self._http: Any = None
        self._scratch = Path(tempfile.mkdtemp(prefix="replicator-follow-"))

    def request_stop(self) -> None:
        self._stop.set()

    async def __aenter__(self) -> Follower:
        await self.replica.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        await self.replica.close()
        await self.store.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # -- bootstrap -------------------------------------------------------------------------

    async def bootstrap(self) -> dict[TP, Position]:
        """Restore the newest contiguous state into the replica; returns its positions."""
        from replicator.destinations import coverage
        from replicator.restore.point import AtOffsets
        from replicator.restore.runner import execute_restore, make_plan
        from replicator.snapshot.tiers import Tiers

        cov = await coverage(self.store)
        ends = {tp: e for tp, e in cov.ends.items() if tp[0] in self.topic_entities}
        if not ends:
            raise FellBehindError(f"nothing to bootstrap from yet in {self.store.url}")
        catalog = Catalog(store=self.store, data_dir=None)
        tiers = Tiers.for_store(self.store, self.archive_url)
        plan = await make_plan(catalog, self.registry, list(self.topic_entities),
                               AtOffsets(ends), tiers=tiers)
        report = await execute_restore(catalog, self.registry, plan,
                                       self.replica.restore_url, replace=True, tiers=tiers)
        self.stats.bootstraps += 1
        log.info("replica bootstrapped", extra={
            "target": self.replica.location,
            "rows": {r.entity: r.rows for r in report.results},
            "snapshots": [m.id for m in plan.snapshots]})
        positions = await self.replica.positions()
        if positions is None:
            raise ReplicatorError(f"{self.replica.location}: bootstrap left no positions")
        await self.replica.apply(self.layouts, {}, positions)  # the positions table, seeded
        return positions

    # -- reading ---------------------------------------------------------------------------

    async def _segments(self, tp: TP, refresh: bool) -> list[naming.SegmentName]:
        if refresh or time.monotonic() - self._listing_mono > self.poll_s:
            listing: dict[TP, list[naming.SegmentName]] = {}
            for o in await self.store.list(naming.segments_prefix()):
                if naming.is_segment_name(o.name):
                    s = naming.parse_segment_name(o.name)
                    listing.setdefault((s.topic, s.partition), []).append(s)
            self._listing, self._listing_mono = listing, time.monotonic()
            from replicator.retention import load_trimmed

            self._trimmed = dict(await load_trimmed(self.store))
        return self._listing.get(tp, [])

    async def _from_store(self, tp: TP, pos: int) -> Chunk | None:
        segs = await self._segments(tp, refresh=False)
        seg = next((s for s in segs if s.start <= pos < s.end), None)
        if seg is None and segs and segs[-1].end > pos:
            seg = next((s for s in await self._segments(tp, refresh=True)
                        if s.start <= pos < s.end), None)
        if seg is None:
            oldest = segs[0].start if segs else self._trimmed.get(tp, 0)
            if oldest > pos:
                raise FellBehindError(
                    f"{tp[0]}[{tp[1]}]: the replica is at offset {pos} but the store holds "
                    f"this partition only from offset {oldest} (retention removed the rest)")
            return None
        name = naming.segment_name(seg.topic, seg.partition, seg.start, seg.end)
        tmp = self._scratch / name.replace("/", "_")
        path = await self.store.fetch_to(name, tmp)
        try:
            recs = await asyncio.to_thread(read_segment, path, name, pos)
        finally:
            if path == tmp:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        return Chunk(tp, recs, seg.end)

    async def _from_live(self, tp: TP, pos: int) -> tuple[Chunk | None, int | None]:
        """(records, oldest buffered offset) from the first live endpoint owning ``tp``."""
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for base in self.live:
            url = f"{base}/v1/tail/{tp[0]}/{tp[1]}"
            try:
                async with self._http.get(url, params={"from": str(pos), "wait_ms": "500"}) as r:
                    if r.status == 404:
                        continue
                    if r.status != 200:
                        raise StoreError(f"live tail {url}: HTTP {r.status}")
                    body = await r.read()
                    oldest_h = r.headers.get("X-Replicator-Oldest", "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("live tail unavailable", extra={"url": url, "error": str(exc)})
                continue
            oldest = int(oldest_h) if oldest_h else None
            recs, times, end = await asyncio.to_thread(decode_blocks, body, pos)
            if end > pos:
                return Chunk(tp, recs, end, times), oldest
            return None, oldest
        return None, None

    async def _reader(self, tp: TP, queue: asyncio.Queue[Chunk | BaseException]) -> None:
        pos = self.positions[tp].next_offset
        try:
            while not self._stop.is_set():
                chunk = await self._from_store(tp, pos)
                if chunk is None and self.live:
                    chunk, oldest = await self._from_live(tp, pos)
                    if chunk is None and oldest is not None and pos < oldest:
                        await asyncio.sleep(min(self.poll_s, 0.2))  # wait for the seal
                        continue
                if chunk is None:
                    if not self.live:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), self.poll_s)
                    continue
                for i in range(0, max(1, len(chunk.records)), self.max_batch):
                    part = chunk.records[i:i + self.max_batch]
                    last = i + self.max_batch >= len(chunk.records)
                    end = chunk.end if last else part[-1][0] + 1
                    await queue.put(Chunk(tp, part, end, chunk.durable_ms if last else []))
                pos = chunk.end
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await queue.put(exc)

    # -- applying --------------------------------------------------------------------------

    def _fold(self, chunks: list[Chunk]) -> tuple[dict[str, dict[str, RowIn | None]],
                                                  dict[TP, Position], int]:
        batch: dict[str, dict[str, RowIn | None]] = {}
        moved: dict[TP, Position] = {}
        now = int(time.time() * 1000)
        n = 0
        loads = orjson.loads
        for ch in chunks:
            topic, partition = ch.tp
            entity = self.topic_entities[topic]
            rows = batch.setdefault(entity, {})
            last_ts = self.positions[ch.tp].last_ts_ms
            for offset, ts, value in ch.records:
                n += 1
                last_ts = ts
                if value is None:
                    continue
                event = loads(value)
                key = event["key"]
                if event.get("op") == "delete":
                    rows[key] = None
                else:
                    rows[key] = (LiveRow(key, value, topic, partition, offset, ts), event)
            pos = Position(ch.end, last_ts, now)
            self.positions[ch.tp] = pos
            moved[ch.tp] = pos
        return batch, moved, n

    async def run(self) -> None:
        """Bootstrap if needed, then follow until :meth:`request_stop`."""
        waited = 0
        while not self._stop.is_set():
            positions = await self.replica.positions()
            if positions is None:
                try:
                    positions = await self.bootstrap()
                except FellBehindError as exc:
                    waited += 1
                    (log.warning if waited == 1 else log.debug)(
                        "cannot bootstrap yet (waiting for the first sealed segments): %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.poll_s)
                    continue
            self.positions = {tp: p for tp, p in positions.items()
                              if tp[0] in self.topic_entities}
            try:
                await self._follow()
                return
            except FellBehindError as exc:
                log.error("follower fell behind retention; bootstrapping again from the "
                          "newest snapshot instead of applying a gap: %s", exc)
                await self._forget_positions()

    async def _forget_positions(self) -> None:
        positions = await self.replica.positions() or {}
        self.positions = {}
        # a bootstrap replaces the whole schema/file, positions included
        del positions
        from replicator.follow.replica import PostgresReplica, SqliteReplica

        if isinstance(self.replica, SqliteReplica):
            await self.replica.close()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(str(self.replica.path) + suffix).unlink()
        elif isinstance(self.replica, PostgresReplica):
            await self.replica._c().execute(
                f'DROP SCHEMA IF EXISTS "{self.replica.schema}" CASCADE')

    async def _follow(self) -> None:
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue(maxsize=64)
        readers: dict[TP, asyncio.Task[None]] = {
            tp: asyncio.create_task(self._reader(tp, queue), name=f"follow-{tp[0]}-{tp[1]}")
            for tp in self.positions}
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                await self._add_new_partitions(readers, queue)
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({get, stop_wait}, timeout=self.poll_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    continue
                items = [get.result()]
                count = 0
                while not queue.empty() and count < self.max_batch:
                    items.append(queue.get_nowait())
                    count += sum(len(i.records) for i in items[-1:] if isinstance(i, Chunk))
                errors = [i for i in items if isinstance(i, BaseException)]
                if errors:
                    raise errors[0]
                chunks = [i for i in items if isinstance(i, Chunk)]
                batch, moved, n = self._fold(chunks)
                await self.replica.apply(self.layouts, batch, moved)
                done_ms = time.time() * 1000
                for ch in chunks:
                    for ms in ch.durable_ms:
                        self.stats.note_lag(done_ms - ms)
                self.stats.applied_events += n
                self.stats.batches += 1
                if self.on_batch is not None:
                    self.on_batch(self)
        finally:
            stop_wait.cancel()
            for t in readers.values():
                t.cancel()
            for t in readers.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _add_new_partitions(self, readers: dict[TP, asyncio.Task[None]],
                                  queue: asyncio.Queue[Chunk | BaseException]) -> None:
        """A partition that appeared in the store after the bootstrap starts at its first
        stored offset."""
        if time.monotonic() - self._listing_mono < self.poll_s:
            return
        await self._segments(("", 0), refresh=True)
        for tp, segs in self._listing.items():
            if tp in readers or tp[0] not in self.topic_entities or not segs:
                continue
            self.positions[tp] = Position(segs[0].start)
            readers[tp] = asyncio.create_task(self._reader(tp, queue),
                                              name=f"follow-{tp[0]}-{tp[1]}")


async def follower_status(store: Store, replica: Replica, topics: Sequence[str]
                          ) -> dict[str, Any]:
    """Applied position per partition, lag in events (store end minus position) and in
    seconds (now minus the newest applied record's time, 0 when caught up)."""
    from replicator.destinations import coverage

    await replica.open()
    try:
        positions = await replica.positions()
    finally:
        await replica.close()
    cov = await coverage(store)
    now = int(time.time() * 1000)
    rows: list[dict[str, Any]] = []
    for tp in sorted(set(cov.ends) | set(positions or {})):
        if tp[0] not in topics:
            continue
        p = (positions or {}).get(tp)
        end = cov.ends.get(tp, 0)
        lag = None if p is None else max(0, end - p.next_offset)
        rows.append({
            "topic": tp[0], "partition": tp[1],
            "applied_offset": None if p is None else p.next_offset,
            "stored_end": end, "lag_events": lag,
            "last_applied_ts_ms": None if p is None else p.last_ts_ms,
            "applied_ms": None if p is None else p.applied_ms,
            "lag_s": None if p is None else (0.0 if lag == 0 else
                                             max(0.0, (now - p.last_ts_ms) / 1e3)),
        })
    return {"target": replica.location, "bootstrapped": positions is not None,
            "partitions": rows,
            "lag_events": sum(r["lag_events"] or 0 for r in rows),
            "lag_s": max((float(r["lag_s"] or 0.0) for r in rows), default=0.0)}
