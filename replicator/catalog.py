"""The catalog: what segments exist (store and local spool) and what each one covers.

Used by ``replicator segments list|inspect|verify`` and, later, by the restore planner.

Invariants:
- Store segments are listed by name (sorted = offset order per partition); their facts
  come from the footer, so listing reads a few KiB per segment, never the data.
- ``verify`` reads every block and names each problem precisely: a corrupt segment by
  name, byte position and offset; a hole between consecutive stored segments by range;
  missing newest segments by the partition's watermark object (its ``stored_end``).
"""

from __future__ import annotations

import asyncio
import builtins
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from replicator import crypto, naming
from replicator.errors import CorruptSegmentError, KeyNotFoundError, SegmentError
from replicator.segment import format as fmt
from replicator.segment.reader import SegmentReader
from replicator.storage.base import ObjectInfo, Store
from replicator.storage.local import LocalStore


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """What a segment's footer (or scanned blocks) say about it: enough to plan reads."""

    name: str  # store name, or spool path
    location: str  # "store" | "spool"
    topic: str
    partition: int
    start: int
    end: int
    records: int
    min_ts: int
    max_ts: int
    watermark_ms: int
    bytes: int


@dataclass(frozen=True, slots=True)
class SegmentEntry(SegmentInfo):
    """One segment as the catalog sees it."""

    raw_bytes: int
    blocks: int
    sealed: bool

    @property
    def compression_ratio(self) -> float:
        return self.bytes / self.raw_bytes if self.raw_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["compression_ratio"] = round(self.compression_ratio, 4)
        return d


@dataclass(frozen=True, slots=True)
class Problem:
    """A verification finding. ``kind``: corrupt | gap | unreadable."""

    kind: str
    name: str
    topic: str
    partition: int
    detail: str
    position: int | None = None
    offset: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _entry(reader: SegmentReader, name: str, location: str) -> SegmentEntry:
    s = reader.summary
    return SegmentEntry(
        name=name,
        location=location,
        topic=reader.header.topic,
        partition=reader.header.partition,
        start=s.start,
        end=s.end,
        records=s.records,
        min_ts=s.min_ts,
        max_ts=s.max_ts,
        watermark_ms=s.watermark_ms,
        bytes=reader.file_size,
        raw_bytes=s.raw_bytes,
        blocks=s.blocks,
        sealed=reader.sealed,
    )


class Catalog:
    """Read-only view over a store and (optionally) this host's spool directory."""

    def __init__(self, *, store: Store, data_dir: Path | None = None) -> None:
        self.store = store
        self.data_dir = data_dir
        self._tmp = Path(tempfile.gettempdir())

    async def store_names(self, topic: str | None = None) -> list[str]:
        objs = await self.store.list(naming.segments_prefix(topic))
        return [o.name for o in objs if naming.is_segment_name(o.name)]

    def spool_paths(self, topic: str | None = None) -> list[Path]:
        if self.data_dir is None:
            return []
        root = self.data_dir / "spool"
        if not root.is_dir():
            return []
        pattern = f"{naming.check_topic(topic)}/*/*" if topic else "*/*/*"
        return sorted(
            p
            for p in root.glob(pattern)
            if p.name.endswith((naming.ACTIVE_SUFFIX, naming.SEALED_SUFFIX))
            and not naming.is_temp(p.name)
        )

    async def _local(self, name: str) -> Path:
        return await self.store.fetch_to(name, self._tmp / name.replace("/", "_"))

    async def list(
        self, topic: str | None = None, *, include_spool: bool = True
    ) -> list[SegmentEntry]:
        """Every segment, store first then spool, sorted by topic, partition, offset.

        A local store's files are read in place; a remote store's summaries come from two
        ranged reads of each segment's tail (trailer, footer), never the whole object."""
        out: list[SegmentEntry] = []
        local = isinstance(self.store, LocalStore)
        objs = await self.store.list(naming.segments_prefix(topic))
        for obj in objs:
            if not naming.is_segment_name(obj.name):
                continue
            if local:
                path = await self._local(obj.name)
                out.append(await asyncio.to_thread(self._read_entry, path, obj.name, "store"))
            else:
                out.append(await remote_entry(self.store, obj))
        if include_spool:
            for path in self.spool_paths(topic):
                try:
                    out.append(await asyncio.to_thread(self._read_entry, path, str(path), "spool"))
                except (SegmentError, OSError):
                    continue  # being written or sealed right now
        out.sort(key=lambda e: (e.topic, e.partition, e.start, e.location))
        return out

    @staticmethod
    def _read_entry(path: Path, name: str, location: str) -> SegmentEntry:
        with SegmentReader(path, name=name, expect_sealed=location == "store") as r:
            return _entry(r, name, location)

    async def inspect(
        self, name_or_path: str
    ) -> tuple[SegmentEntry, builtins.list[dict[str, Any]]]:
        """A segment's summary and its block index (blocks as dicts)."""
        p = Path(name_or_path)
        if p.exists():
            path, name, location = p, str(p), "file"
        else:
            naming.check_relative_name(name_or_path)
            path, name, location = await self._local(name_or_path), name_or_path, "store"

        def read() -> tuple[SegmentEntry, builtins.list[dict[str, Any]]]:
            with SegmentReader(path, name=name, expect_sealed=location == "store") as r:
                blocks = [
                    {
                        "position": b.position,
                        "start": b.start,
                        "end": b.end,
                        "records": b.records,
                        "min_ts": b.min_ts,
                        "max_ts": b.max_ts,
                        "bytes": b.size,
                        "raw_bytes": b.raw_len,
                        "watermark_ms": b.watermark_ms,
                    }
                    for b in r.blocks
                ]
                return _entry(r, name, location), blocks

        return await asyncio.to_thread(read)

    async def verify(
        self, topic: str | None = None
    ) -> tuple[builtins.list[SegmentEntry], builtins.list[Problem]]:
        """Check every stored segment's blocks and the continuity between segments."""
        entries: list[SegmentEntry] = []
        problems: list[Problem] = []
        # read before listing segments: a segment shipped meanwhile can only add coverage
        stored_ends = await self._stored_ends(topic, problems)
        for name in await self.store_names(topic):
            try:
                path = await self._local(name)
            except (SegmentError, OSError) as exc:
                seg = naming.parse_segment_name(name)
                problems.append(Problem("unreadable", name, seg.topic, seg.partition, str(exc)))
                continue
            entry, problem = await asyncio.to_thread(check_segment_file, path, name)
            if entry is not None:
                entries.append(entry)
            if problem is not None:
                problems.append(problem)
        names = await self.store_names(topic)
        problems.extend(find_gaps(names))
        problems.extend(find_missing_tails(names, stored_ends))
        return entries, problems

    async def watermarks(
        self, topic: str | None = None, problems: builtins.list[Problem] | None = None
    ) -> builtins.list[dict[str, Any]]:
        """The store's watermark objects (see docs/FORMAT.md §5); unreadable ones become
        ``problems`` (when given) and are left out."""
        prefix = f"{naming.WATERMARKS_ROOT}/" + (f"{naming.check_topic(topic)}/" if topic else "")
        out: list[dict[str, Any]] = []
        for obj in await self.store.list(prefix):
            if naming.is_temp(obj.name) or not obj.name.endswith(".json"):
                continue
            try:
                doc = orjson.loads(await self.store.get_bytes(obj.name))
                out.append({
                    "name": obj.name,
                    "topic": str(doc["topic"]),
                    "partition": int(doc["partition"]),
                    "stored_end": None if doc["stored_end"] is None else int(doc["stored_end"]),
                    "watermark_ms": int(doc.get("watermark_ms") or 0),
                })
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                if problems is not None:
                    parts = obj.name.removesuffix(".json").split("/")
                    wm_topic = parts[1] if len(parts) == 3 else ""
                    wm_part = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else -1
                    problems.append(
                        Problem("unreadable", obj.name, wm_topic, wm_part, f"bad watermark: {exc}")
                    )
        return out

    async def _stored_ends(
        self, topic: str | None, problems: builtins.list[Problem]
    ) -> dict[tuple[str, int], tuple[str, int]]:
        """Per partition, the watermark object's name and the ``stored_end`` it records."""
        return {
            (d["topic"], d["partition"]): (d["name"], d["stored_end"])
            for d in await self.watermarks(topic, problems)
            if d["stored_end"] is not None  # an idle partition that never had a segment
        }


def check_segment_file(path: Path, name: str) -> tuple[SegmentEntry | None, Problem | None]:
    """Verify one stored segment (a local copy at ``path`` of the store object ``name``):
    every block's checksum, decompression, record framing and offset chain, and that the
    contents cover what the name says. Blocking (run it in a thread).

    Returns the segment's entry when its blocks are readable and the problem found, if any:
    ``corrupt`` (a check failed, an authentication tag included; position and offset of the
    bad block when known), ``unreadable`` (the file could not be opened or is of an
    unsupported version, or encrypted with a key missing from the configured ones) or
    ``unverifiable`` (encrypted, and this host holds no keys at all: the CRC was checked,
    the tags and records could not be -- not evidence of damage)."""
    seg = naming.parse_segment_name(name)
    try:
        with SegmentReader(path, name=name, expect_sealed=True) as r:
            r.verify()
            entry = _entry(r, name, "store")
            unauthenticated = r.unauthenticated_blocks
    except CorruptSegmentError as exc:
        return None, Problem("corrupt", name, seg.topic, seg.partition, exc.reason,
                             exc.position, exc.offset)
    except KeyNotFoundError as exc:
        # with keys configured, a key missing from them blocks every restore of this file:
        # a real problem; on a host without any key it only cannot be checked here
        kind = "unverifiable" if crypto.installed() is None else "unreadable"
        return None, Problem(kind, name, seg.topic, seg.partition, str(exc))
    except (SegmentError, OSError) as exc:
        return None, Problem("unreadable", name, seg.topic, seg.partition, str(exc))
    if unauthenticated:
        return entry, Problem(
            "unverifiable", name, seg.topic, seg.partition,
            f"{unauthenticated} encrypted block(s) checked by CRC only: no keyring here "
            "(configure [encryption] keys to check their tags and records)")
    if (entry.start, entry.end, entry.topic, entry.partition) != (
            seg.start, seg.end, seg.topic, seg.partition):
        return entry, Problem(
            "corrupt", name, seg.topic, seg.partition,
            f"contents cover {entry.topic}[{entry.partition}] [{entry.start}, {entry.end}), "
            f"the name says [{seg.start}, {seg.end})")
    return entry, None


def find_gaps(names: Iterable[str]) -> list[Problem]:
    """Holes or overlaps between consecutive stored segments of each partition."""
    problems: list[Problem] = []
    last: dict[tuple[str, int], naming.SegmentName] = {}
    for seg in sorted(naming.parse_segment_name(n) for n in names):
        key = (seg.topic, seg.partition)
        prev = last.get(key)
        if prev is not None and seg.start != prev.end:
            kind = "gap" if seg.start > prev.end else "overlap"
            problems.append(
                Problem(
                    kind,
                    seg.name,
                    seg.topic,
                    seg.partition,
                    f"{kind}: previous segment ends at {prev.end}, this one starts at {seg.start}",
                    offset=prev.end,
                )
            )
        last[key] = seg
    return problems


def find_missing_tails(
    names: Iterable[str], stored_ends: dict[tuple[str, int], tuple[str, int]]
) -> list[Problem]:
    """Partitions whose newest segments are missing: the watermark object records that
    segments up to ``stored_end`` were stored, but the store's last segment ends earlier.

    :func:`find_gaps` cannot see this hole: no later segment exists to expose it.
    """
    ends: dict[tuple[str, int], int] = {}
    for seg in (naming.parse_segment_name(n) for n in names):
        key = (seg.topic, seg.partition)
        ends[key] = max(ends.get(key, seg.end), seg.end)
    problems: list[Problem] = []
    for (topic, partition), (wm_name, stored_end) in sorted(stored_ends.items()):
        last = ends.get((topic, partition))
        if last is None or last < stored_end:
            have = "no segment" if last is None else f"the newest segment ends at {last}"
            problems.append(
                Problem(
                    "gap",
                    wm_name,
                    topic,
                    partition,
                    f"gap: {wm_name} records segments stored up to offset {stored_end}, "
                    f"but {have}",
                    offset=last,
                )
            )
    return problems


#: tail bytes read first: a footer of a 64 MiB segment of 1 MiB blocks is ~1.5 KiB
_TAIL_GUESS = 64 * 1024
_summary_cache: dict[tuple[str, str, int], SegmentEntry] = {}


async def remote_entry(store: Store, obj: ObjectInfo) -> SegmentEntry:
    """A sealed segment's summary from its trailer and footer, read with ranged gets
    (cached per store, name and size: sealed segments never change)."""
    key = (store.url, obj.name, obj.size)
    hit = _summary_cache.get(key)
    if hit is not None:
        return hit
    where = f"{store.url}/{obj.name}"
    tail_len = min(obj.size, _TAIL_GUESS)
    tail = await store.get_bytes(obj.name, obj.size - tail_len, tail_len)
    trailer = fmt.decode_trailer(tail)
    if trailer is None or len(tail) != tail_len:
        raise CorruptSegmentError(where, max(0, obj.size - fmt.TRAILER.size),
                                  "no segment trailer (not sealed or truncated)")
    footer_pos, footer_len, crc = trailer
    if footer_pos + footer_len + fmt.TRAILER.size != obj.size:
        raise CorruptSegmentError(where, footer_pos, "trailer points outside the file")
    if footer_len + fmt.TRAILER.size <= tail_len:
        footer = tail[tail_len - fmt.TRAILER.size - footer_len: tail_len - fmt.TRAILER.size]
    else:
        footer = await store.get_bytes(obj.name, footer_pos, footer_len)
    if zlib.crc32(footer) != crc:
        raise CorruptSegmentError(where, footer_pos, "footer checksum mismatch")
    summary, _positions = fmt.decode_footer(footer, where, footer_pos)
    parsed = naming.parse_segment_name(obj.name)
    entry = SegmentEntry(
        name=obj.name, location="store", topic=parsed.topic, partition=parsed.partition,
        start=summary.start, end=summary.end, records=summary.records,
        min_ts=summary.min_ts, max_ts=summary.max_ts, watermark_ms=summary.watermark_ms,
        bytes=obj.size, raw_bytes=summary.raw_bytes, blocks=summary.blocks, sealed=True,
    )
    if len(_summary_cache) > 100_000:
        _summary_cache.clear()
    _summary_cache[key] = entry
    return entry
