"""The spool: per-partition active segments, group commit, sealing and shipping to the store.

Data path of one record: ``BlockBuilder.append``/``extend`` (event loop) -> ingest calls
``Spool.wake`` -> the committer (``Spool._flush_loop``) runs ``Spool.flush``, which takes a
block per partition, writes all of them and fsyncs them (concurrently, one pool
thread per file) in one worker-thread call that returns when every fsync returned (group
commit) -> the record is *durable*; ``PartitionLog.durable`` advances -> ingest may commit
that offset to Kafka. A segment is sealed on size or age (footer + fsync, renamed to
``.sealed`` in the spool) and a background shipper puts it into the store, then removes
the spool copy.

Adaptive group commit (leader/follower, like a database WAL): a commit starts as soon as
records are pending and no commit is in flight, at least ``commit_spacing_s`` after the
previous one started (so blocks do not shrink to a handful of records), and at least every
``flush_interval_s`` (watermarks of idle partitions, seals by age). Records appended while
a commit is in flight go into the next one, which starts when that commit returns: under
load commits run back to back and a record waits for at most the rest of the current
commit plus its own, instead of for the next tick of a fixed timer.

Invariants:
- ``durable`` only moves forward and only after the fsync that covers it returned.
- Quarantine lines are fsync'd before (or with) the blocks that cover their offsets.
- Only the partition's owner writes its segments. Before a partition is released (revoke,
  shutdown) its active segment is sealed and shipped, so the next owner resumes from the
  store. On open, leftovers from a crash are recovered and shipped first; a leftover
  overlapping what the store already holds (another owner re-consumed it meanwhile) is
  trimmed to the part the store lacks, so no offset is ever stored twice.
- A sealed segment in the store is never overwritten (create-only puts).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import orjson

from replicator import naming
from replicator.errors import ObjectExistsError, ReplicatorError, SegmentError
from replicator.metrics import Metrics
from replicator.quarantine import QuarantineLog
from replicator.segment.format import SegmentSummary
from replicator.segment.reader import SegmentReader, recover_active
from replicator.segment.writer import ActiveSegment, BlockBuilder, PendingBlock
from replicator.storage.base import Store
from replicator.storage.local import fsync_dir

log = logging.getLogger(__name__)

TP = tuple[str, int]

#: fsyncs of one group commit run concurrently on up to this many threads
_FSYNC_THREADS = 8
#: the live-tail buffer is kept this long after a follower's last request
TAIL_IDLE_S = 300.0


class SpoolError(ReplicatorError):
    """Local durability failed (disk full, I/O error): the service must stop."""


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    """Tunables of the spool (see config.IngestSettings for the user-facing names)."""

    data_dir: Path
    flush_interval_s: float = 0.05
    #: minimum time between the starts of two group commits (adaptive commit)
    commit_spacing_s: float = 0.005
    seal_bytes: int = 64 * 1024 * 1024
    seal_age_s: float = 60.0
    block_bytes: int = 1024 * 1024
    watermark_interval_s: float = 1.0
    max_pending_bytes: int = 32 * 1024 * 1024
    ship_retry_max_s: float = 30.0
    #: encoded durable blocks kept in memory per partition for live followers (bytes)
    tail_buffer_bytes: int = 16 * 1024 * 1024


def _now_ms() -> int:
    return int(time.time() * 1000)


async def store_end(store: Store, topic: str, partition: int) -> int | None:
    """Coverage end of the newest stored segment of a partition (None: nothing stored)."""
    objs = await store.list(naming.segments_prefix(topic, partition))
    ends = [naming.parse_segment_name(o.name).end for o in objs if naming.is_segment_name(o.name)]
    return max(ends) if ends else None


def _leftover_end(path: Path) -> int | None:
    """Coverage end of a spool leftover (None if unreadable: keep it for its owner)."""
    try:
        with SegmentReader(path) as r:
            return r.summary.end
    except (SegmentError, OSError):
        return None


class PartitionLog:
    """Everything about one topic-partition this instance owns."""

    def __init__(
        self, *, topic: str, partition: int, settings: SpoolSettings, store: Store
    ) -> None:
        self.topic = naming.check_topic(topic)
        self.partition = naming.check_partition(partition)
        self.settings = settings
        self.store = store
        self.dir = naming.spool_dir(settings.data_dir, topic, partition)
        self.builder: BlockBuilder | None = None
        self.active: ActiveSegment | None = None
        self.durable = -1
        self.store_end: int | None = None
        #: wall-clock ms at which ingest last saw this partition caught up (position >= LSO)
        self.caught_up_ms = 0
        self.durable_watermark_ms = 0
        self._last_watermark_mono = 0.0
        self._to_ship: list[Path] = []
        self._ship_lock = asyncio.Lock()
        self.sealed_segments = 0
        self.shipped_end: int | None = None
        #: the store's watermark object is behind (an idle segment was dropped unshipped)
        self.watermark_dirty = False
        #: recent durable blocks for live followers: (start, end, durable wall ms, bytes);
        #: ``_written`` holds the newest written block until its fsync returns
        self.recent: collections.deque[tuple[int, int, int, bytes]] = collections.deque()
        self.recent_bytes = 0
        self._written: bytes | None = None
        self._tail_wanted_until = 0.0

    @property
    def tp(self) -> TP:
        return (self.topic, self.partition)

    def __repr__(self) -> str:
        return f"PartitionLog({self.topic}[{self.partition}] durable={self.durable})"

    # -- opening ---------------------------------------------------------------------------

    async def open(self) -> int | None:
        """Recover and ship leftovers; return the offset to resume from (None: no data yet)."""
        leftovers: list[Path] = []
        if self.dir.is_dir():
            for p in sorted(self.dir.iterdir()):
                if naming.is_temp(p.name):
                    p.unlink()
                elif p.name.endswith((naming.ACTIVE_SUFFIX, naming.SEALED_SUFFIX)):
                    leftovers.append(p)
        for path in leftovers:
            sealed = await asyncio.to_thread(self._seal_leftover, path)
            if sealed is not None:
                self._to_ship.append(sealed)
        await self.ship_pending()
        self.store_end = await self._store_end()
        return self.store_end

    def start_at(self, offset: int) -> None:
        """Begin coverage at ``offset`` (the resume point, or Kafka's log start)."""
        self.builder = BlockBuilder(offset)
        self.durable = offset

    def _seal_leftover(self, path: Path) -> Path | None:
        """Turn a crash leftover into a sealed spool file (or remove it if it holds nothing)."""
        if path.name.endswith(naming.SEALED_SUFFIX):
            return path
        recovery = recover_active(path, truncate=True)
        if recovery.header is None:
            log.warning(
                "removing active segment without a valid header",
                extra={"path": str(path), "reason": recovery.reason},
            )
            path.unlink()
            fsync_dir(path.parent)
            return None
        end = recovery.end_offset
        assert end is not None
        if end == recovery.header.base_offset:
            path.unlink()
            fsync_dir(path.parent)
            return None
        seg = ActiveSegment.reopen(recovery)
        summary = seg.seal()
        return self._rename_sealed(path, summary)

    def _rename_sealed(self, path: Path, summary: SegmentSummary) -> Path:
        final = naming.sealed_spool_path(
            self.settings.data_dir, self.topic, self.partition, summary.start, summary.end
        )
        os.replace(path, final)
        fsync_dir(final.parent)
        return final

    async def _store_end(self) -> int | None:
        return await store_end(self.store, self.topic, self.partition)

    # -- group commit (called by Spool.flush) ----------------------------------------------

    def take_block(self, now_mono: float) -> PendingBlock | None:
        """The block to write in this group commit, with a watermark when one is due."""
        b = self.builder
        if b is None:
            return None
        wm = 0
        if self.caught_up_ms > self.durable_watermark_ms and (
            b.has_pending
            or now_mono - self._last_watermark_mono >= self.settings.watermark_interval_s
        ):
            wm = self.caught_up_ms
        return b.take(wm)

    def write_block_sync(self, block: PendingBlock) -> None:
        """Append one block to the active segment (created on demand). Worker thread."""
        if self.active is None:
            path = naming.active_segment_path(
                self.settings.data_dir, self.topic, self.partition, block.start
            )
            self.active = ActiveSegment.create(
                path, topic=self.topic, partition=self.partition, base_offset=block.start
            )
        self.active.write(block)
        self._written = self.active.last_block

    def block_durable(self, block: PendingBlock, now_mono: float) -> None:
        self.durable = block.end
        data, self._written = self._written, None
        if data is not None and self.settings.tail_buffer_bytes > 0 and (
                now_mono < self._tail_wanted_until):
            self.recent.append((block.start, block.end, int(time.time() * 1000), data))
            self.recent_bytes += len(data)
            while self.recent_bytes > self.settings.tail_buffer_bytes and len(self.recent) > 1:
                self.recent_bytes -= len(self.recent.popleft()[3])
        if block.watermark_ms:
            self.durable_watermark_ms = block.watermark_ms
            self._last_watermark_mono = now_mono

    def tail(self, from_offset: int) -> tuple[list[tuple[int, bytes]], int | None]:
        """Durable blocks holding offsets ``>= from_offset`` as (durable ms, encoded block),
        and the oldest offset the buffer still holds (None: empty). Nothing when
        ``from_offset`` is below the buffer (the caller reads sealed segments first).

        The buffer is filled only while followers ask (for ``TAIL_IDLE_S`` after the last
        request), so an instance nobody follows keeps no blocks in memory."""
        self._tail_wanted_until = time.monotonic() + TAIL_IDLE_S
        oldest = self.recent[0][0] if self.recent else None
        if oldest is None or from_offset < oldest:
            return [], oldest
        out: list[tuple[int, bytes]] = []
        for _start, end, ms, data in reversed(self.recent):  # newest first: stop early
            if end <= from_offset:
                break
            if end <= self.durable:
                out.append((ms, data))
        out.reverse()
        return out, oldest

    def seal_due(self, now_mono: float) -> bool:
        a = self.active
        if a is None:
            return False
        if a.size >= self.settings.seal_bytes:
            return True
        return now_mono - a.opened_monotonic >= self.settings.seal_age_s

    def seal_sync(self) -> Path | None:
        """Seal the active segment into a ``.sealed`` spool file. Worker thread.

        An active segment that covers no offsets (only watermark blocks of an idle
        partition) is dropped instead; its watermark goes to the store's watermark object.
        """
        a = self.active
        if a is None:
            return None
        self.active = None
        if a.end == a.base_offset:
            a.close()
            a.path.unlink()
            fsync_dir(a.path.parent)
            self.watermark_dirty = True
            return None
        summary = a.seal()
        self.sealed_segments += 1
        return self._rename_sealed(a.path, summary)

    # -- shipping ----------------------------------------------------------------------------

    @property
    def ship_backlog(self) -> int:
        return len(self._to_ship)

    def queue_ship(self, path: Path) -> None:
        if path not in self._to_ship:
            self._to_ship.append(path)

    async def ship_pending(self, metrics: Metrics | None = None) -> None:
        """Put every sealed spool file into the store, in offset order, then remove it."""
        async with self._ship_lock:
            self._adopt_sealed_files()
            while self._to_ship:
                path = self._to_ship[0]
                await self._ship_one(path, metrics)
                self._to_ship.pop(0)
            await self._put_watermark()

    def _adopt_sealed_files(self) -> None:
        """Queue any ``.sealed`` spool file not yet queued (defence in depth)."""
        if not self.dir.is_dir():
            return
        queued = set(self._to_ship)
        found = sorted(p for p in self.dir.glob(f"*{naming.SEALED_SUFFIX}") if p not in queued)
        if found:
            self._to_ship = sorted([*self._to_ship, *found])

    async def _ship_one(self, path: Path, metrics: Metrics | None) -> None:
        if not path.exists():
            # Shipped already: a seal renames the file before its coroutine queues it, and in
            # that window the shipper may adopt and ship it from disk. Only shipping removes
            # a .sealed file, so a missing one is never lost data.
            return
        with SegmentReader(path, expect_sealed=True) as r:
            summary = r.summary
        store_end = await self._store_end()
        source = path
        trimmed: Path | None = None
        if store_end is not None and summary.end <= store_end:
            log.info(
                "spool segment already covered by the store; dropping it",
                extra={"path": str(path), "store_end": store_end},
            )
        else:
            if store_end is not None and summary.start < store_end:
                trimmed = await asyncio.to_thread(self._trim_sync, path, store_end)
                source = trimmed
                with SegmentReader(trimmed, expect_sealed=True) as r:
                    summary = r.summary
            elif store_end is not None and summary.start > store_end:
                log.error(
                    "offset gap between stored segments",
                    extra={
                        "topic": self.topic,
                        "partition": self.partition,
                        "store_end": store_end,
                        "segment_start": summary.start,
                    },
                )
            name = naming.segment_name(self.topic, self.partition, summary.start, summary.end)
            try:
                await self.store.put_file(name, source)
            except ObjectExistsError:
                log.warning(
                    "segment already in the store (shipped before a crash)", extra={"segment": name}
                )
            if metrics is not None:
                metrics.segments_sealed.labels(self.topic).inc()
                metrics.sealed_bytes.labels(self.topic).inc(source.stat().st_size)
        self.shipped_end = summary.end
        for p in (trimmed, path):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        fsync_dir(path.parent)

    def _trim_sync(self, path: Path, start: int) -> Path:
        """A sealed copy of ``path`` holding only offsets ``>= start``. Worker thread."""
        tmp = naming.temp_sibling(path, "trim")
        if tmp.exists():
            tmp.unlink()
        with SegmentReader(path, expect_sealed=True) as r:
            end = r.summary.end
            seg = ActiveSegment.create(
                tmp, topic=self.topic, partition=self.partition, base_offset=start
            )
            builder = BlockBuilder(start)
            for rec in r.iter_records(from_offset=start):
                builder.append(
                    rec.offset, rec.timestamp, rec.timestamp_type, rec.key, rec.value, rec.headers
                )
                if builder.pending_bytes >= self.settings.block_bytes:
                    blk = builder.take()
                    assert blk is not None
                    seg.write(blk)
            builder.skip_to(end)
            blk = builder.take(r.summary.watermark_ms)
            if blk is not None:
                seg.write(blk)
            seg.seal()
        log.warning(
            "trimmed spool segment to what the store lacks",
            extra={"path": str(path), "from": start, "to": end},
        )
        return tmp

    async def _put_watermark(self) -> None:
        """Record in the store how far this partition is stored and until when it is complete.

        With no active segment and nothing waiting to ship, everything durable is in the
        store, so the durable watermark holds for the store too -- this is how an idle
        partition's watermark reaches the store without a segment per seal interval.
        Otherwise only the stored end is known here (the shipped footers carry their own
        watermarks) and ``watermark_ms`` is 0.
        """
        nothing_stored = self.shipped_end is None and self.store_end is None
        if self.active is None and not self._to_ship and self.durable >= 0:
            # None: the partition has never had a segment (idle since its log start)
            stored_end: int | None = None if nothing_stored else self.durable
            watermark = self.durable_watermark_ms
        else:
            stored_end, watermark = self.shipped_end, 0
        if not watermark and stored_end is None:
            return
        doc = {
            "topic": self.topic,
            "partition": self.partition,
            "stored_end": stored_end,
            "durable_end": self.durable,
            "watermark_ms": watermark,
            "updated_ms": _now_ms(),
        }
        await self.store.put_bytes(
            naming.watermark_name(self.topic, self.partition),
            orjson.dumps(doc),
            create_only=False,
        )
        self.watermark_dirty = False

    def close_sync(self) -> None:
        if self.active is not None:
            self.active.close()
            self.active = None


class Spool:
    """All partitions this instance owns, plus quarantine logs and the group-commit loop."""

    def __init__(self, *, settings: SpoolSettings, store: Store, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.logs: dict[TP, PartitionLog] = {}
        self.quarantine: dict[str, QuarantineLog] = {}
        self._lock = asyncio.Lock()
        self._release_lock = asyncio.Lock()
        self._ship_wakeup = asyncio.Event()
        #: set when records (or quarantine lines) are pending: wakes the committer
        self._commit_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._failure: BaseException | None = None
        self.flushes = 0
        self._fsync_pool: ThreadPoolExecutor | None = None
        #: ``time.monotonic()`` when the latest group commit's fsyncs returned (worker thread):
        #: the moment its records became durable, before the loop gets to note it
        self.last_sync_mono = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="spool-flush"),
            asyncio.create_task(self._ship_loop(), name="spool-ship"),
        ]

    async def stop(self) -> None:
        """Flush, seal and ship everything, then close. Safe to call twice.

        The background loops are asked to finish, not cancelled: cancelling a coroutine
        that awaits a worker thread would leave that thread's work (a sealed file, say)
        unaccounted for.
        """
        self._stopping = True
        self._ship_wakeup.set()
        self._commit_wakeup.set()
        for t in self._tasks:
            with contextlib.suppress(Exception):
                await t
        self._tasks = []
        if self._failure is None:
            await self.release(list(self.logs))
        for q in self.quarantine.values():
            q.close()
        pool, self._fsync_pool = self._fsync_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    @property
    def failure(self) -> BaseException | None:
        """The error that ended local durability (a failed group commit), if any."""
        return self._failure

    @property
    def stopping(self) -> bool:
        return self._stopping

    def check(self) -> None:
        """Raise the spool's background failure, if any (called by ingest)."""
        if self._failure is not None:
            raise SpoolError(f"local durability failed: {self._failure}") from self._failure

    # -- partitions ------------------------------------------------------------------------

    async def open_partition(self, topic: str, partition: int) -> PartitionLog:
        plog = PartitionLog(
            topic=topic, partition=partition, settings=self.settings, store=self.store
        )
        await plog.open()
        self.logs[plog.tp] = plog
        return plog

    async def release(self, tps: Iterable[TP]) -> None:
        """Flush, seal and ship the given partitions, then forget them (revoke/shutdown).

        Serialized: a shutdown and a rebalance revoke may ask for the same partitions at
        once; whichever comes second finds them already released.
        """
        async with self._release_lock:
            tps = [tp for tp in tps if tp in self.logs]
            if not tps:
                return
            await self.flush()
            async with self._lock:
                logs = [self.logs[tp] for tp in tps]
                paths = await asyncio.to_thread(self._seal_many_sync, logs)
            for plog in logs:
                if plog.tp in paths:
                    plog.queue_ship(paths[plog.tp])
                await plog.ship_pending(self.metrics)
                plog.close_sync()
                if self.logs.get(plog.tp) is plog:
                    del self.logs[plog.tp]

    async def prune_foreign_leftovers(self) -> int:
        """Remove spool leftovers of partitions this instance does not own (any more) whose
        range the store already covers -- a crash left them, another owner re-consumed and
        stored that range. Leftovers the store does not cover are kept: their owner-to-be
        ships them when the partition comes back. Returns how many files were removed.
        """
        root = self.settings.data_dir / "spool"
        if not root.is_dir():
            return 0
        removed = 0
        for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for part_dir in sorted(p for p in topic_dir.iterdir() if p.is_dir()):
                if not part_dir.name.isdigit():
                    continue
                tp = (topic_dir.name, int(part_dir.name))
                if tp in self.logs:
                    continue
                files = sorted(
                    p for p in part_dir.iterdir()
                    if p.name.endswith((naming.ACTIVE_SUFFIX, naming.SEALED_SUFFIX))
                )
                if not files:
                    continue
                covered = await store_end(self.store, *tp)
                if covered is None:
                    continue
                for f in files:
                    end = await asyncio.to_thread(_leftover_end, f)
                    if end is not None and end <= covered and tp not in self.logs:
                        f.unlink()
                        removed += 1
                        log.info("removed spool leftover the store already covers",
                                 extra={"path": str(f), "store_end": covered})
        return removed

    def quarantine_for(self, topic: str) -> QuarantineLog:
        q = self.quarantine.get(topic)
        if q is None:
            q = self.quarantine[topic] = QuarantineLog(data_dir=self.settings.data_dir, topic=topic)
        return q

    @property
    def pending_bytes(self) -> int:
        return sum(p.builder.pending_bytes for p in self.logs.values() if p.builder is not None)

    # -- group commit ----------------------------------------------------------------------

    def wake(self) -> None:
        """Records or quarantine lines were added: commit them as soon as allowed."""
        self._commit_wakeup.set()

    async def flush(self) -> int:
        """One group commit: write every partition's pending block, fsync, advance ``durable``.

        Returns the number of records made durable.
        """
        async with self._lock:
            now = time.monotonic()
            work: list[tuple[PartitionLog, PendingBlock]] = []
            for plog in self.logs.values():
                blk = plog.take_block(now)
                if blk is not None:
                    work.append((plog, blk))
            qlogs = [q for q in self.quarantine.values() if q.has_pending]
            if not work and not qlogs:
                return 0
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._write_sync, work, qlogs)
            except OSError as exc:
                self._failure = exc
                raise SpoolError(f"group commit failed: {exc}") from exc
            self.metrics.fsync_seconds.observe(time.perf_counter() - t0)
            records = 0
            raw = 0
            for plog, blk in work:
                plog.block_durable(blk, now)
                records += blk.records
                raw += len(blk.raw)
                self.metrics.durable_offset.labels(plog.topic, str(plog.partition)).set(
                    plog.durable
                )
                if plog.durable_watermark_ms:
                    self.metrics.watermark.labels(plog.topic, str(plog.partition)).set(
                        plog.durable_watermark_ms / 1000
                    )
            self.metrics.group_commit_bytes.observe(raw)
            self.flushes += 1
            due = [p for p in self.logs.values() if p.seal_due(now)]
            if due:
                paths = await asyncio.to_thread(self._seal_many_sync, due)
                for plog in due:
                    if plog.tp in paths:
                        plog.queue_ship(paths[plog.tp])
                self._ship_wakeup.set()
            return records

    def _write_sync(
        self, work: list[tuple[PartitionLog, PendingBlock]], qlogs: list[QuarantineLog]
    ) -> None:
        """Write the group commit's blocks and fsync them. Worker thread.

        Quarantine lines are fsync'd first (before the blocks covering their offsets are
        even written). The segment files are fsync'd concurrently, one pool thread per
        file, and this returns only once every one of those fsyncs returned: the commit
        costs about the slowest fsync instead of their sum (with the disk shared, one
        fsync often takes several ms).
        """
        for q in qlogs:
            q.sync()
        for plog, blk in work:
            plog.write_block_sync(blk)
        actives = [plog.active for plog, _ in work if plog.active is not None]
        if len(actives) == 1:
            actives[0].sync()
        elif actives:
            pool = self._fsync_pool
            if pool is None:
                pool = self._fsync_pool = ThreadPoolExecutor(
                    max_workers=_FSYNC_THREADS, thread_name_prefix="spool-fsync"
                )
            futures = [pool.submit(a.sync) for a in actives]
            wait(futures)  # all of them, even if one failed: no fsync outlives the commit
            for f in futures:
                f.result()  # raises the first failure
        self.last_sync_mono = time.monotonic()

    @staticmethod
    def _seal_many_sync(logs: list[PartitionLog]) -> dict[TP, Path]:
        out: dict[TP, Path] = {}
        for plog in logs:
            p = plog.seal_sync()
            if p is not None:
                out[plog.tp] = p
        return out

    async def _flush_loop(self) -> None:
        """The committer: a group commit when woken (records pending) and none is in
        flight, spaced at least ``commit_spacing_s`` apart, and at least every
        ``flush_interval_s``."""
        interval = self.settings.flush_interval_s
        spacing = min(self.settings.commit_spacing_s, interval)
        wakeup = self._commit_wakeup
        last = time.monotonic()
        while not self._stopping:
            idle = interval - (time.monotonic() - last)
            if idle > 0 and not wakeup.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout=idle)
            gap = spacing - (time.monotonic() - last)
            if gap > 0:
                await asyncio.sleep(gap)  # records arriving meanwhile join this commit
            if self.stopping:
                return  # stop() flushes (via release) itself
            wakeup.clear()  # set again by appends during the commit: they get the next one
            last = time.monotonic()
            try:
                await self.flush()
            except SpoolError:
                log.exception("group commit failed; ingest will stop")
                return

    async def _ship_loop(self) -> None:
        """Ship sealed segments; on store errors retry with exponential backoff."""
        delay = 0.5
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ship_wakeup.wait(), timeout=1.0)
            self._ship_wakeup.clear()
            for plog in list(self.logs.values()):
                if not plog.ship_backlog and not plog.watermark_dirty:
                    continue
                try:
                    await plog.ship_pending(self.metrics)
                    delay = 0.5
                except (OSError, SegmentError, ReplicatorError) as exc:
                    self.metrics.store_errors.labels("put").inc()
                    log.warning(
                        "shipping to the store failed; will retry",
                        extra={"partition": plog.tp, "error": str(exc), "retry_s": delay},
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.ship_retry_max_s)
                    self._ship_wakeup.set()
