"""Building one topic's snapshot file: fold segments, spill sorted runs, merge, write.

Runs in a worker thread (never on the event loop). Memory is bounded by ``budget`` buffered
changes, not by the number of keys: when the buffer is full it is written out as a sorted
run (in the snapshot file format itself) and emptied; the snapshot is then a k-way merge of
the existing chain's files, the runs and the last buffer, all sorted by ``(key, partition,
offset)``.

Invariants:
- For one ``(key, partition)`` the entry with the highest offset wins (partition order):
  the merge orders entries by ``(key, partition, offset)`` and keeps the last of each
  ``(key, partition)``; sources never hold the same offset twice (a chain link ends where
  the next begins, runs cover disjoint offsets).
- The state digest counts each key's winner across partitions by the replay rule (version,
  then timestamp, then partition), tombstones excluded -- the same digest a restore computes.
- The writer's content hash (over the uncompressed blocks) goes into the summary, so a
  re-read of the stored copy proves the file holds exactly what was digested.
- With encryption on, nothing of the data reaches the disk in the clear: the snapshot file
  is sealed with the active key, and the spilled runs with a throw-away key that lives
  only in this process's memory (a run left behind by a crash is unreadable, and swept).
"""

from __future__ import annotations

import heapq
import os
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from replicator import crypto
from replicator.crypto import INSTALLED, Keyring, KeyringArg
from replicator.restore.digest import DigestBuilder
from replicator.restore.layout import CANONICAL, TableLayout, compile_row
from replicator.restore.planner import PartitionPlan
from replicator.restore.replay import Change, Opener, ReplayStats, fold_partition
from replicator.snapshot.file import SnapshotFileReader, SnapshotFileWriter
from replicator.snapshot.format import Entry

#: Buffered changes before a sorted run is spilled (about 1 KiB each with Python overhead).
DEFAULT_BUDGET = 200_000


@dataclass(frozen=True, slots=True)
class TopicResult:
    topic: str
    path: Path
    bytes: int
    entries: int
    live: int
    tombstones: int
    digest: str
    content_hash: str
    cuts: dict[int, int]  # partition -> cut (exclusive end offset)
    runs: int
    #: id of the key the file is sealed with (None: not encrypted)
    key_id: str | None = None


def _sorted_entries(buf: dict[int, dict[str, Change]]) -> list[Entry]:
    """The buffered changes as entries sorted by ``(key, partition)``. Plain tuple order is
    enough (and faster than a key function): one buffer holds a ``(key, partition)`` once,
    so comparisons never reach the value."""
    out: list[Entry] = [
        (key, part, off, ts, ver, value, kkey, hdrs)
        for part, changes in buf.items()
        for key, (ver, ts, _rank, off, value, kkey, hdrs) in changes.items()
    ]
    out.sort()
    return out


#: entries per pickled chunk of a run file
RUN_CHUNK = 1024


_RUN_AAD = b"replicator compaction run chunk\x00"
_RUN_LEN = struct.Struct("<I")


def _write_run(path: Path, entries: list[Entry], keyring: Keyring | None = None) -> None:
    """A sorted run: private and short-lived -- created in this compaction's own work
    directory (swept at start, never read from a store) and read back only by this
    process -- so it is a sequence of pickled chunks: ~1 us per entry to write and read,
    several times cheaper than the snapshot encoding (and than :mod:`marshal`, whose
    ``load`` from a file reads byte by byte). With ``keyring`` (the build's throw-away
    key) each chunk is a length-prefixed sealed blob bound to its index."""
    with path.open("xb") as f:
        for n, i in enumerate(range(0, len(entries), RUN_CHUNK)):
            if keyring is None:
                pickle.dump(entries[i:i + RUN_CHUNK], f, protocol=pickle.HIGHEST_PROTOCOL)
                continue
            blob = keyring.seal(pickle.dumps(entries[i:i + RUN_CHUNK],
                                             protocol=pickle.HIGHEST_PROTOCOL),
                                _RUN_AAD + _RUN_LEN.pack(n))
            f.write(_RUN_LEN.pack(len(blob)))
            f.write(blob)


def _read_run(path: Path, keyring: Keyring | None = None) -> Iterator[Entry]:
    with path.open("rb") as f:
        n = 0
        while True:
            if keyring is None:
                try:
                    chunk = pickle.load(f)  # a fresh unpickler per chunk: memos are per dump
                except EOFError:
                    return
            else:
                head = f.read(_RUN_LEN.size)
                if not head:
                    return
                pos = f.tell() - len(head)
                blob = f.read(_RUN_LEN.unpack(head)[0]) if len(head) == _RUN_LEN.size else b""
                chunk = pickle.loads(crypto.open_blob(
                    keyring, blob, _RUN_AAD + _RUN_LEN.pack(n), name=str(path), position=pos,
                    what="run chunk"))
                n += 1
            yield from chunk


def _read_file(path: Path, name: str) -> Iterator[Entry]:
    with SnapshotFileReader(path, name=name) as r:
        yield from r


def _dedupe(merged: Iterator[Entry]) -> Iterator[Entry]:
    """For equal ``(key, partition)`` keep the last (the merge is stable by source)."""
    prev: Entry | None = None
    for e in merged:
        if prev is not None and (e[0] != prev[0] or e[1] != prev[1]):
            yield prev
        prev = e
    if prev is not None:
        yield prev


def build_topic(
    *,
    topic: str,
    layout: TableLayout,
    parts: Iterable[PartitionPlan],
    stop_ms: int,
    opener: Opener,
    layer_files: Iterable[tuple[Path, str]],
    out_path: Path,
    work_dir: Path,
    meta: dict[str, Any],
    budget: int = DEFAULT_BUDGET,
    stats: ReplayStats | None = None,
    progress: Callable[[int], None] | None = None,
    keyring: KeyringArg = INSTALLED,
) -> TopicResult:
    """Write ``out_path``: the merge of ``layer_files`` (local path, name; base first) and
    the changes of ``parts`` up to each partition's cut (first record after ``stop_ms``).
    With a sealing ``keyring`` (by default the process's) the file is encrypted."""
    stats = stats if stats is not None else ReplayStats()
    buf: dict[int, dict[str, Change]] = {}
    runs: list[Path] = []
    sealer = crypto.for_writing(keyring)
    run_keyring = (None if sealer is None
                   else Keyring.from_keys([os.urandom(crypto.KEY_BYTES)]))

    def spill(_current: dict[str, Change]) -> None:
        if sum(len(d) for d in buf.values()) < budget:
            return
        run = work_dir / f"run-{len(runs):04d}.snap"
        _write_run(run, _sorted_entries(buf), run_keyring)
        runs.append(run)
        for d in buf.values():
            d.clear()

    cuts: dict[int, int] = {}
    for pp in parts:
        d = buf.setdefault(pp.partition, {})
        _, stopped = fold_partition(pp, pp.partition, opener, None, stats, progress,
                                    keep_record=True, out=d, stop_ms=stop_ms,
                                    after_block=spill)
        start = pp.snapshot_cut if pp.snapshot_cut is not None else pp.first
        cuts[pp.partition] = stopped if stopped is not None else max(start, pp.covered_end)
    last = _sorted_entries(buf)
    buf.clear()

    sources: list[Iterator[Entry]] = [_read_file(p, n) for p, n in layer_files]
    sources += [_read_run(r, run_keyring) for r in runs]
    sources.append(iter(last))
    # tuple order (key, partition, offset): a later change of the same key and partition
    # sorts after the earlier one wherever it comes from, and _dedupe keeps the last
    merged = _dedupe(heapq.merge(*sources))

    canon = compile_row(layout.data_columns, CANONICAL, source="mapping")
    digest = DigestBuilder(layout.entity)
    writer = SnapshotFileWriter(out_path, meta, keyring=sealer)
    add_entry = writer.add
    entries = tombstones = 0
    loads = orjson.loads
    add = digest.add
    try:
        group: list[Entry] = []
        for e in merged:
            add_entry(*e)
            entries += 1
            if e[5] is None:
                tombstones += 1
            if group and group[0][0] != e[0]:
                _count_winner(group, canon, add, loads)
                group = []
            group.append(e)
        if group:
            _count_winner(group, canon, add, loads)
        result = digest.result()
        writer.flush_block()
        content_hash = writer.content_hash
        size = writer.finish({"topic": topic, "entity": layout.entity, "entries": entries,
                              "live": result.count, "tombstones": tombstones,
                              "digest": str(result), "content_hash": content_hash,
                              "cuts": {str(p): c for p, c in sorted(cuts.items())}})
    except BaseException:
        writer.abort()
        raise
    finally:
        for r in runs:
            r.unlink(missing_ok=True)
    return TopicResult(topic, out_path, size, entries, result.count, tombstones, str(result),
                       content_hash, cuts, len(runs), writer.key_id)


def _count_winner(group: list[Entry], canon: Callable[[Any], tuple[Any, ...]],
                  add: Callable[[str, tuple[Any, ...]], None],
                  loads: Callable[[bytes], Any]) -> None:
    """Add one key's cross-partition winner (version, timestamp, partition) to the digest."""
    win = group[0] if len(group) == 1 else max(group, key=lambda e: (e[4], e[3], e[1]))
    if win[5] is not None:
        add(win[0], canon(loads(win[5]).get("data") or {}))
