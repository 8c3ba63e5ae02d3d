"""The follower: keep a replica continuously in sync with the backup.

1. **Bootstrap** (a replica with no positions): restore the newest state exactly up to the
   store's contiguous segment ends (an offsets restore: it starts from the cheapest
   snapshot chain and is verified by digest); the restore's cut becomes the positions.
2. **Follow**: one reader feeds a queue: per partition, sealed segments from the store
   while they cover its position; the partitions they do not cover come from the live tail
   of a running replicator in one long-poll for all of them (``--live URL``: durable blocks
   over HTTP, see :mod:`replicator.server`; paced to ``live_interval_s`` while data flows),
   else it polls the store. The applier folds what is queued into one batch (last change
   per key) and writes it with the positions it reaches in one transaction
   (:mod:`.replica`).
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from replicator import crypto, naming
from replicator.catalog import Catalog
from replicator.errors import ReplicatorError, SegmentError
from replicator.follow.replica import (
    TP,
    Change,
    Position,
    Replica,
    SqliteReplica,
)
from replicator.gcdefer import young_gc_deferred
from replicator.restore.layout import TableLayout
from replicator.schemas import SchemaRegistry
from replicator.segment import format as fmt
from replicator.segment.reader import SegmentReader
from replicator.server import TAIL_FRAME
from replicator.storage.base import Store, local_copy

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


def decode_frames(body: bytes, starts: dict[TP, int],
                  keyring: crypto.KeyringArg = crypto.INSTALLED) -> list[Chunk]:
    """The tail response's frames as one chunk per partition: records ``>=`` the requested
    start, contiguous (every block's CRC checked; an encrypted block is opened with
    ``keyring``, by default the installed one, and its tag checked), with their blocks'
    durable times."""
    kr = crypto.for_reading(keyring)
    out: dict[TP, Chunk] = {}
    pos = 0
    view = memoryview(body)
    hsize = fmt.BLOCK_HEADER.size
    while pos < len(body):
        ms, partition, n, tlen = TAIL_FRAME.unpack_from(body, pos)
        pos += TAIL_FRAME.size
        topic = body[pos:pos + tlen].decode()
        pos += tlen
        blk = view[pos:pos + n]
        pos += n
        tp = (topic, partition)
        if tp not in starts:
            continue
        ch = out.get(tp)
        end = ch.end if ch is not None else starts[tp]
        meta, crc = fmt.decode_block_header(blk, 0)
        payload = blk[hsize:hsize + meta.payload_len]
        if fmt.block_crc(blk[:hsize], payload) != crc:
            raise SegmentError(f"live tail block {topic}[{partition}] [{meta.start}, "
                               f"{meta.end}) failed its checksum")
        if meta.end <= end or meta.start > end:
            continue  # already have it / not contiguous: re-asked from ``end`` next time
        raw = fmt.open_payload(meta, blk[:hsize], payload, f"live tail {topic}[{partition}]",
                               keyring=kr, context=fmt.block_context(topic, partition))
        if ch is None:
            ch = out[tp] = Chunk(tp, [], end)
        ch.records.extend(fmt.iter_values(raw, end))
        ch.durable_ms.append(ms)
        ch.end = meta.end
    return list(out.values())


def served_partitions(headers: Mapping[str, str]) -> dict[TP, tuple[int, int | None]]:
    """The tail response's ``X-Replicator-Partitions`` header: per partition served,
    (durable end, oldest buffered offset or None)."""
    out: dict[TP, tuple[int, int | None]] = {}
    for k, (durable, oldest) in orjson.loads(headers.get("X-Replicator-Partitions", "{}")
                                             ).items():
        t, _, p = k.rpartition(":")
        out[(t, int(p))] = (int(durable), None if oldest is None else int(oldest))
    return out


def read_segment(path: Path, name: str, start: int) -> list[Rec]:
    """Records ``>= start`` of a sealed segment file (every block's checksum checked)."""
    with SegmentReader(path, name=name, expect_sealed=True) as r:
        return [v for _meta, raw in r.iter_block_payloads(from_offset=start)
                for v in fmt.iter_values(raw, start)]


class Follower:
    """``async with Follower(...) as f: await f.run()``; :meth:`request_stop` ends it."""

    def __init__(
        self, *, store: Store, replica: Replica, registry: SchemaRegistry,
        topics: Sequence[str], live: Sequence[str] = (), poll_s: float = 1.0,
        max_batch: int = 20_000, archive_url: str = "", live_interval_s: float = 0.1,
        apply_interval_s: float = 0.3,
        on_batch: Callable[[Follower], None] | None = None,
        token: str | None = None,
    ) -> None:
        self.store = store
        #: bearer token presented to the live endpoints (never logged)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._auth_warned: set[str] = set()
        self.replica = replica
        self.registry = registry
        self.topic_entities = {t: t for t in topics if t in registry.entities}
        self.live = [u.rstrip("/") for u in live]
        self.poll_s = poll_s
        self.max_batch = max_batch
        self.live_interval_s = live_interval_s
        self.apply_interval_s = apply_interval_s
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
        #: fell behind retention: bootstrap again whatever positions the replica holds
        self._force_bootstrap = False
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
        # the restore replaces the file / schema: no connection may keep the old one
        await self.replica.close()
        if isinstance(self.replica, SqliteReplica):
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(str(self.replica.path) + suffix).unlink()
        await self.replica.open()
        restore_id = time.strftime("%Y%m%d%H%M%S") + "_follow"
        report = await execute_restore(catalog, self.registry, plan,
                                       self.replica.restore_url, replace=True, tiers=tiers,
                                       target=self.replica.bootstrap_target(restore_id))
        self.stats.bootstraps += 1
        log.info("replica bootstrapped", extra={
            "target": self.replica.location,
            "rows": {r.entity: r.rows for r in report.results},
            "snapshots": [m.id for m in plan.snapshots]})
        positions = await self.replica.positions()
        if positions is None:
            raise ReplicatorError(f"{self.replica.location}: bootstrap left no positions")
        await self.replica.apply(self.layouts, {}, positions)  # the positions table, seeded
        self._force_bootstrap = False
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
            trimmed = self._trimmed.get(tp, 0)
            if trimmed > pos:
                raise FellBehindError(
                    f"{tp[0]}[{tp[1]}]: the replica is at offset {pos} but retention removed "
                    f"this partition's segments below offset {trimmed}")
            if segs and segs[0].start > pos:
                # nothing was trimmed: the partition's log simply starts later (an idle
                # partition at bootstrap, Kafka retention before it was ever backed up)
                log.warning("partition starts above the replica's position; moving on",
                            extra={"partition": tp, "position": pos, "first": segs[0].start})
                return Chunk(tp, [], segs[0].start)
            return None
        name = naming.segment_name(seg.topic, seg.partition, seg.start, seg.end)
        async with local_copy(self.store, name, self._scratch) as path:
            recs = await asyncio.to_thread(read_segment, path, name, pos)
        return Chunk(tp, recs, seg.end)

    async def _from_live(self, wanted: dict[TP, int], wait_ms: int
                         ) -> tuple[list[Chunk], dict[TP, tuple[int, int | None]]]:
        """One long-poll per live endpoint for every partition in ``wanted``: the chunks,
        and per partition served (durable end, oldest buffered offset)."""
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40),
                                               headers=self._headers)
        chunks: list[Chunk] = []
        state: dict[TP, tuple[int, int | None]] = {}
        starts = dict(wanted)
        params = [("p", f"{t}:{p}:{pos}") for (t, p), pos in sorted(wanted.items())]
        params.append(("wait_ms", str(wait_ms)))
        for base in self.live:
            url = f"{base}/v1/tail"
            try:
                async with self._http.get(url, params=params) as r:
                    if r.status != 200:
                        if r.status in (401, 403) and url not in self._auth_warned:
                            self._auth_warned.add(url)  # once per endpoint, never the token
                            log.warning("live tail refused the admin token (HTTP %s): "
                                        "following sealed segments only; check "
                                        "server.tokens_file / REPLICATOR_ADMIN_TOKENS",
                                        r.status, extra={"url": url})
                        log.debug("live tail answered HTTP %s", r.status, extra={"url": url})
                        continue
                    body = await r.read()
                    served = served_partitions(r.headers)
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                log.debug("live tail unavailable", extra={"url": url, "error": str(exc)})
                continue
            state.update(served)
            if body:
                got = decode_frames(body, starts)  # small: no thread hand-off
                for ch in got:
                    # two endpoints serving one partition (a rebalance overlap): the next
                    # one's blocks are used only beyond what this one gave
                    starts[ch.tp] = ch.end
                chunks.extend(got)
        return chunks, state

    async def _pump(self, queue: asyncio.Queue[Chunk | BaseException]) -> None:
        """Read every partition from its position on: sealed segments while the store covers
        it, then the live tail (one request for all partitions), else poll the store."""
        read = {tp: p.next_offset for tp, p in self.positions.items()}
        last_live = 0.0
        try:
            while not self._stop.is_set():
                await self._add_new_partitions(read)
                progressed = False
                waiting: dict[TP, int] = {}
                for tp, pos in list(read.items()):
                    chunk = await self._from_store(tp, pos)
                    if chunk is None:
                        waiting[tp] = pos
                        continue
                    await self._put(queue, chunk)
                    read[tp] = chunk.end
                    progressed = True
                if not waiting or progressed:
                    continue
                if not self.live:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.poll_s)
                    continue
                # pace requests while data flows (more blocks per request, far fewer
                # requests); block up to half a second when nothing is new
                pause = self.live_interval_s - (time.monotonic() - last_live)
                if pause > 0:
                    await asyncio.sleep(pause)
                last_live = time.monotonic()
                chunks, state = await self._from_live(waiting, 500)
                for ch in chunks:
                    if ch.end <= read[ch.tp]:
                        continue
                    await self._put(queue, ch)
                    read[ch.tp] = ch.end
                if not chunks and any(old is not None and waiting[tp] < old
                                      for tp, (_d, old) in state.items() if tp in waiting):
                    await asyncio.sleep(min(self.poll_s, 0.2))  # the gap is being sealed
                elif not chunks and not state:
                    with contextlib.suppress(TimeoutError):  # no endpoint answers
                        await asyncio.wait_for(self._stop.wait(), self.poll_s)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await queue.put(exc)

    async def _put(self, queue: asyncio.Queue[Chunk | BaseException], chunk: Chunk) -> None:
        recs = chunk.records
        for i in range(0, max(1, len(recs)), self.max_batch):
            part = recs[i:i + self.max_batch]
            last = i + self.max_batch >= len(recs)
            end = chunk.end if last else part[-1][0] + 1
            await queue.put(Chunk(chunk.tp, part, end, chunk.durable_ms if last else []))

    # -- applying --------------------------------------------------------------------------

    def _fold(self, chunks: list[Chunk]) -> tuple[dict[str, dict[str, Change | None]],
                                                  dict[TP, Position], int]:
        batch: dict[str, dict[str, Change | None]] = {}
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
                    rows[key] = (event, topic, partition, offset)
            pos = Position(ch.end, last_ts, now)
            self.positions[ch.tp] = pos
            moved[ch.tp] = pos
        return batch, moved, n

    async def run(self) -> None:
        """Bootstrap if needed, then follow until :meth:`request_stop`."""
        waited = 0
        while not self._stop.is_set():
            positions = None if self._force_bootstrap else await self.replica.positions()
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
                with young_gc_deferred(50_000):  # batches allocate many short-lived objects
                    await self._follow()
                return
            except FellBehindError as exc:
                log.error("follower fell behind retention; bootstrapping again from the "
                          "newest snapshot instead of applying a gap: %s", exc)
                await self._forget_positions()

    async def _forget_positions(self) -> None:
        """The next round bootstraps whatever positions the replica holds. Nothing is
        dropped up front: the bootstrap replaces the schema / file atomically, so readers
        keep the old state until the new one is complete."""
        self.positions = {}
        self._force_bootstrap = True

    async def _follow(self) -> None:
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue(maxsize=64)
        pump = asyncio.create_task(self._pump(queue), name="follow-pump")
        stop_wait = asyncio.create_task(self._stop.wait())
        applied_mono = 0.0
        try:
            while not self._stop.is_set():
                # at most one commit per apply_interval_s: a commit rewrites every index
                # page its random keys touch, so fewer, larger batches cost far less per
                # change (the interval bounds the lag this adds)
                pause = self.apply_interval_s - (time.monotonic() - applied_mono)
                if pause > 0:
                    await asyncio.sleep(pause)
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({get, stop_wait}, timeout=self.poll_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    continue
                items = [get.result()]
                count = 0
                while not queue.empty() and count < self.max_batch:
                    item = queue.get_nowait()
                    items.append(item)
                    if isinstance(item, Chunk):
                        count += len(item.records)
                errors = [i for i in items if isinstance(i, BaseException)]
                if errors:
                    raise errors[0]
                chunks = [i for i in items if isinstance(i, Chunk)]
                applied_mono = time.monotonic()  # the interval runs from commit start
                batch, moved, n = await asyncio.to_thread(self._fold, chunks)
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
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump

    async def _add_new_partitions(self, read: dict[TP, int]) -> None:
        """A partition that appeared in the store after the bootstrap starts at its first
        stored offset."""
        if time.monotonic() - self._listing_mono < self.poll_s:
            return
        await self._segments(("", 0), refresh=True)
        for tp, segs in self._listing.items():
            if tp in read or tp[0] not in self.topic_entities or not segs:
                continue
            self.positions[tp] = Position(segs[0].start)
            read[tp] = segs[0].start


async def live_ends(live: Sequence[str], tps: Sequence[TP], token: str | None = None
                    ) -> dict[TP, int]:
    """Durable end offsets the running replicator(s) report (``head=1``: no blocks)."""
    import aiohttp

    out: dict[TP, int] = {}
    params = [("p", f"{t}:{p}:0") for t, p in tps] + [("head", "1")]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5),
                                     headers=headers) as http:
        for base in live:
            try:
                async with http.get(f"{base.rstrip('/')}/v1/tail", params=params) as r:
                    if r.status != 200:
                        continue
                    served = served_partitions(r.headers)
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
                continue
            out.update({tp: durable for tp, (durable, _oldest) in served.items()})
    return out


async def follower_status(store: Store, replica: Replica, topics: Sequence[str],
                          live: Sequence[str] = (), *, token: str | None = None
                          ) -> dict[str, Any]:
    """Applied position per partition and the lag: in events, against the newest end known
    (the store's contiguous segments, or the durable end a live endpoint reports); in
    seconds, now minus the newest applied record's time (0 when caught up)."""
    from replicator.destinations import coverage

    await replica.open()
    try:
        positions = await replica.positions()
    finally:
        await replica.close()
    cov = await coverage(store)
    tps = sorted(tp for tp in set(cov.ends) | set(positions or {}) if tp[0] in topics)
    durable = await live_ends(live, tps, token) if live else {}
    now = int(time.time() * 1000)
    rows: list[dict[str, Any]] = []
    for tp in tps:
        p = (positions or {}).get(tp)
        end = max(cov.ends.get(tp, 0), durable.get(tp, 0))
        lag = None if p is None else max(0, end - p.next_offset)
        rows.append({
            "topic": tp[0], "partition": tp[1],
            "applied_offset": None if p is None else p.next_offset,
            "stored_end": cov.ends.get(tp, 0), "durable_end": durable.get(tp),
            "lag_events": lag,
            "last_applied_ts_ms": None if p is None else p.last_ts_ms,
            "applied_ms": None if p is None else p.applied_ms,
            "lag_s": None if p is None else (0.0 if lag == 0 else None if not p.last_ts_ms
                                             else max(0.0, (now - p.last_ts_ms) / 1e3)),
        })
    return {"target": replica.location, "bootstrapped": positions is not None,
            "live": list(live), "partitions": rows,
            "lag_events": sum(r["lag_events"] or 0 for r in rows),
            "lag_s": max((float(r["lag_s"] or 0.0) for r in rows), default=0.0)}
