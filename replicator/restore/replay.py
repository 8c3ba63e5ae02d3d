"""Replay: follow a :class:`RestorePlan` and reduce the records to the state per key.

Memory is bounded by the number of live keys (plus the keys of one partition being read),
never by history length: records are streamed block by block and only the winning change
per key is kept, as the original value bytes (not decoded).

Rules (DESIGN.md §3):

* within a partition, the later offset wins (partition order), whatever its ``version``;
* across partitions (a publisher that keyed one record into several partitions), the
  partition's final change with the higher ``version`` wins, then the later timestamp, then
  the higher (topic, partition) -- so the result does not depend on reading order;
* ``delete`` removes the key (a tombstone takes part in the cross-partition comparison and
  is dropped at the end).

A corrupt block on the path raises :class:`CorruptSegmentError` naming the file, byte
position and offset; nothing is skipped.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import msgspec

from replicator.errors import CorruptSegmentError
from replicator.restore.foldblock import (
    STOPPED,
    Odd,
    decode_head,
    fold_block,
    fold_block_latest,
    merge_changes,
    new_keyset,
)
from replicator.restore.planner import PartitionPlan, RestorePlan, SegmentInfo
from replicator.segment import format as fmt
from replicator.segment.format import BlockMeta
from replicator.segment.reader import SegmentReader
from replicator.snapshot.file import SnapshotFileReader
from replicator.snapshot.format import Entry
from replicator.snapshot.manifest import Manifest

#: A key's winning change: (version or -1, timestamp ms, partition rank, offset, value or
#: None for a delete, Kafka key bytes, encoded headers) -- the last two only with
#: ``keep_record=True`` (re-publishing needs them), else ``None`` and ``b""``.
Change = tuple[int, int, int, int, bytes | None, bytes | None, bytes]


class LiveRow(NamedTuple):
    """One key's state: the original event bytes of its winning change and where it was.

    A named tuple, not a frozen dataclass: one is built per restored row, and a frozen
    dataclass's ``__init__`` costs several times more."""

    key: str
    value: bytes
    topic: str
    partition: int
    offset: int
    ts_ms: int
    kafka_key: bytes | None = None
    headers_raw: bytes = b""


@dataclass(slots=True)
class ReplayStats:
    events: int = 0
    bytes: int = 0
    files: int = 0


Opener = Callable[[SegmentInfo], Path]
#: partitions folded at once by :func:`replay`: one more than the cores, because a fold
#: holds the GIL while it makes its winners' Python objects and the threads otherwise
#: finish unevenly (2 cores, 3 partitions of 5M events: 2 threads 6.8-7.6 s, 3 threads
#: 6.3-6.6 s, interleaved runs)
REPLAY_THREADS = (os.cpu_count() or 2) + 1
#: Up to this many ``keys``, snapshot files are read through their key index (one block per
#: key) instead of block by block.
INDEX_LOOKUP_MAX_KEYS = 64
#: (snapshot manifest, file's store name) -> a local path of that file
SnapshotOpener = Callable[[Manifest, str], Path]
Progress = Callable[[int], None]


def fold_partition(
    pp: PartitionPlan,
    rank: int,
    opener: Opener,
    keys: Collection[str] | None,
    stats: ReplayStats,
    progress: Progress | None,
    keep_record: bool = False,
    *,
    out: dict[str, Change] | None = None,
    stop_ms: int | None = None,
    after_block: Callable[[dict[str, Change]], None] | None = None,
) -> tuple[dict[str, Change], int | None]:
    """Fold one partition's planned reads into ``out`` (the last change per key); return it
    and, with ``stop_ms``, the offset of the first record whose timestamp is above
    ``stop_ms`` (reading stops there; ``None`` when every record is at or below it).

    The hot loop of restore and compaction: record framing is parsed inline (see
    docs/FORMAT.md), headers are skipped by comparing with the previous record's header
    bytes (publishers send the same headers on every record), and only
    ``key``/``op``/``version`` of each value are decoded. ``pp.cut_ms`` *filters* records
    (a restore to T skips later ones wherever they are); ``stop_ms`` *ends* the partition
    (a snapshot cut is an offset). ``after_block`` may empty ``out`` (compaction spills)."""
    if out is None:
        out = {}
    cut_ms = pp.cut_ms
    fold = fold_block
    last_hdr = b""
    last_hcount = -1
    for read in pp.reads:
        path = opener(read.segment)
        stats.files += 1
        lo, hi = read.from_offset, read.to_offset
        name = read.segment.name
        with SegmentReader(path, name=name,
                           expect_sealed=read.segment.location == "store") as r:
            for meta, raw in r.iter_block_payloads(from_offset=lo, to_offset=hi):
                if cut_ms is not None and meta.min_ts > cut_ms:
                    continue
                try:
                    n, status, stopped, last_hdr, last_hcount = fold(
                        raw, lo, hi, cut_ms, stop_ms, rank, out, keys, keep_record,
                        last_hdr, last_hcount, _odd(name, meta.position))
                except (ValueError, struct.error) as exc:
                    raise CorruptSegmentError(name, meta.position, str(exc)) from None
                stats.events += n
                stats.bytes += meta.size
                if progress is not None:
                    progress(n)
                if after_block is not None:
                    after_block(out)
                if status == STOPPED:
                    return out, stopped
    return out, None


def fold_partition_latest(
    pp: PartitionPlan,
    rank: int,
    opener: Opener,
    keys: Collection[str] | None,
    stats: ReplayStats,
    progress: Progress | None,
    keep_record: bool = False,
    *,
    initial: dict[str, Change] | None = None,
) -> dict[str, Change]:
    """The last change per key of one partition's planned reads (and, for keys they do not
    touch, ``initial``: the partition's state at the snapshot the plan starts from).

    The same state as :func:`fold_partition`, read newest first: the reads, their blocks
    and the records in each block in reverse, a change stored only for a key not met yet.
    Most of a long history is older changes of keys already met, which then cost a lookup
    instead of a new value -- restore's replay is bound by these per-change costs."""
    out: dict[str, Change] = {}
    cut_ms = pp.cut_ms
    fold = fold_block_latest
    seen = new_keyset()

    def blocks() -> Iterator[tuple[str, int, int, BlockMeta, bytes]]:
        for read in reversed(pp.reads):
            stats.files += 1
            lo, hi = read.from_offset, read.to_offset
            with SegmentReader(opener(read.segment), name=read.segment.name,
                               expect_sealed=read.segment.location == "store") as r:
                for meta, raw in r.iter_block_payloads(from_offset=lo, to_offset=hi,
                                                       reverse=True):
                    if cut_ms is None or meta.min_ts <= cut_ms:
                        yield read.segment.name, lo, hi, meta, raw

    for name, lo, hi, meta, raw in blocks():
        try:
            n = fold(raw, lo, hi, cut_ms, rank, out, keys, keep_record,
                     _odd(name, meta.position), seen)
        except (ValueError, struct.error) as exc:
            raise CorruptSegmentError(name, meta.position, str(exc)) from None
        stats.events += n
        stats.bytes += meta.size
        if progress is not None:
            progress(n)
    if initial:
        for key, change in initial.items():
            out.setdefault(key, change)
    return out


def _odd(name: str, position: int) -> Odd:
    """The fold's decoder of last resort for values of one block: the reference decode, or
    :class:`CorruptSegmentError` naming the file, block position and offset."""

    def odd(value: bytes, off: int) -> tuple[str, bool, int | None]:
        try:
            head = decode_head(value)
        except msgspec.DecodeError as exc:
            raise CorruptSegmentError(
                name, position, f"record at offset {off} is not a valid change event ({exc})",
                off) from None
        return head.key, head.op == "delete", head.version

    return odd


def _beats(a: Change, b: Change) -> bool:
    """Cross-partition: does ``a`` (from one partition) win over ``b`` (from another)?"""
    return (a[0], a[1], a[2]) > (b[0], b[1], b[2])


def _link_entries(r: SnapshotFileReader, keys: Collection[str] | None
                  ) -> Iterator[tuple[int, list[Entry]]]:
    """(bytes read, entries) of one snapshot file: for a few ``keys`` only their blocks,
    found through the sparse key index; otherwise every block."""
    if keys is not None and len(keys) <= INDEX_LOOKUP_MAX_KEYS:
        yield 0, [e for k in sorted(keys) for e in r.lookup(k)]
        return
    for b, entries in r.entry_blocks():
        yield b.size, entries


def load_snapshots(
    plan: RestorePlan,
    snapshot_opener: SnapshotOpener,
    *,
    keys: Collection[str] | None = None,
    stats: ReplayStats | None = None,
    progress: Progress | None = None,
    keep_record: bool = False,
) -> dict[tuple[str, int], dict[str, Change]]:
    """The state of each planned partition at the snapshot chain's cut: the chain's links
    read base first, a later link's entry replacing an earlier one for the same key and
    partition (docs/FORMAT.md §7.3). Partitions the plan does not restore are skipped."""
    stats = stats if stats is not None else ReplayStats()
    rank_of = {(pp.topic, pp.partition): i for i, pp in enumerate(plan.partitions)}
    topics = {pp.topic for pp in plan.partitions}
    initial: dict[tuple[str, int], dict[str, Change]] = {tp: {} for tp in rank_of}
    for link in plan.snapshots:
        for f in link.files:
            if f.topic not in topics:
                continue
            stats.files += 1
            with SnapshotFileReader(snapshot_opener(link, f.name), name=f.name) as r:
                for size, entries in _link_entries(r, keys):
                    for key, part, off, ts, ver, value, kkey, hdrs in entries:
                        if keys is not None and key not in keys:
                            continue
                        tp = (f.topic, part)
                        rank = rank_of.get(tp)
                        if rank is None:
                            continue
                        initial[tp][key] = (ver, ts, rank, off, value,
                                            kkey if keep_record else None,
                                            hdrs if keep_record else b"")
                    stats.events += len(entries)
                    stats.bytes += size
                    if progress is not None:
                        progress(len(entries))
    return initial


def replay(
    plan: RestorePlan,
    opener: Opener,
    *,
    keys: Collection[str] | None = None,
    stats: ReplayStats | None = None,
    progress: Progress | None = None,
    keep_record: bool = False,
    snapshot_opener: SnapshotOpener | None = None,
) -> dict[str, dict[str, Change]]:
    """Per entity, the winning change per key (tombstones included). Runs in a thread.

    Starts from the plan's snapshot chain (when it has one; ``snapshot_opener`` gives its
    files) and folds the planned segment reads on top. ``keep_record`` also keeps each
    winner's Kafka key and encoded headers (shared bytes when consecutive records carry the
    same headers) for targets that re-publish."""
    stats = stats if stats is not None else ReplayStats()
    state: dict[str, dict[str, Change]] = {e: {} for e in plan.entities}
    initial: dict[tuple[str, int], dict[str, Change]] = {}
    if plan.snapshots:
        if snapshot_opener is None:
            raise ValueError("the plan starts from a snapshot: a snapshot_opener is needed")
        initial = load_snapshots(plan, snapshot_opener, keys=keys, stats=stats,
                                 progress=progress, keep_record=keep_record)
    lock = threading.Lock()

    def locked(n: int) -> None:
        with lock:
            if progress is not None:
                progress(n)

    def fold_one(rank: int) -> tuple[dict[str, Change], ReplayStats]:
        pp = plan.partitions[rank]
        own = ReplayStats()
        local = fold_partition_latest(pp, rank, opener, keys, own, locked, keep_record,
                                      initial=initial.get((pp.topic, pp.partition)))
        return local, own

    # partitions fold in parallel: a fold releases the GIL for most of its work (framing,
    # envelope scan, decided-key lookups) and decompression releases it too
    with ThreadPoolExecutor(REPLAY_THREADS, thread_name_prefix="replay") as ex:
        folded = list(ex.map(fold_one, range(len(plan.partitions))))
    for rank, (local, own) in enumerate(folded):
        pp = plan.partitions[rank]
        stats.events += own.events
        stats.bytes += own.bytes
        stats.files += own.files
        merged = state[pp.entity]
        if not merged:
            state[pp.entity] = local  # the first partition's dict becomes the entity's
            folded[rank] = ({}, own)
            continue
        merge_changes(merged, local, _beats)
    return state


def live_rows(plan: RestorePlan, changes: dict[str, Change]) -> Iterator[LiveRow]:
    """The live keys of one entity in key order (code point order), tombstones dropped."""
    parts = plan.partitions
    for key in sorted(changes):
        _v, ts, rank, off, value, kkey, hdrs = changes[key]
        if value is None:
            continue
        pp = parts[rank]
        yield LiveRow(key, value, pp.topic, pp.partition, off, ts, kkey, hdrs)


def live_count(changes: dict[str, Change]) -> int:
    return sum(1 for c in changes.values() if c[4] is not None)


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One stored change event and where it is (``history``/``export``/re-publishing)."""

    topic: str
    partition: int
    offset: int
    ts_ms: int
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()


def scan(
    plan: RestorePlan,
    opener: Opener,
    *,
    key: str | None = None,
    from_ms: int | None = None,
    to_ms: int | None = None,
    keys: Collection[str] | None = None,
) -> Iterator[ChangeRecord]:
    """Every change the plan reads (partition by partition, offset order), optionally only
    one key's (or ``keys``') and only timestamps within ``[from_ms, to_ms]``."""
    if key is not None:
        keys = {key}
    for pp in plan.partitions:
        for read in pp.reads:
            path = opener(read.segment)
            with SegmentReader(path, name=read.segment.name,
                               expect_sealed=read.segment.location == "store") as r:
                for meta, raw in r.iter_block_payloads(from_offset=read.from_offset,
                                                       to_offset=read.to_offset):
                    if (to_ms is not None and meta.min_ts > to_ms) or (
                            from_ms is not None and meta.max_ts < from_ms):
                        continue
                    for rec in fmt.iter_records(raw):
                        off, ts, value = rec.offset, rec.timestamp, rec.value
                        if off < read.from_offset or value is None:
                            continue
                        if off >= read.to_offset:
                            break
                        if (to_ms is not None and ts > to_ms) or (
                                from_ms is not None and ts < from_ms):
                            continue
                        if keys is not None:
                            try:
                                if decode_head(value).key not in keys:
                                    continue
                            except msgspec.DecodeError as exc:
                                raise CorruptSegmentError(
                                    read.segment.name, meta.position,
                                    f"record at offset {off} is not a valid change event "
                                    f"({exc})", off,
                                ) from None
                        yield ChangeRecord(pp.topic, pp.partition, off, ts, value, rec.key,
                                           rec.headers)
