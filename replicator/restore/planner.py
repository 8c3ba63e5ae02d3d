"""The restore planner: catalog + requested point -> which bytes to read, up to where.

A pure function (:func:`plan_restore`): no I/O, no clock, so every scenario is a unit test.
The executor (:mod:`replicator.restore.replay`) only follows the plan.

Per partition the planner builds a **chain**: segments that cover ``[first, end)`` without a
hole, preferring the store over this host's spool where both hold a range, and the segment
reaching furthest where several start at or before the chain's position. A hole (a missing
file) ends the chain there; the hole is kept in the plan and only becomes an error when the
requested point needs data past it.

Restorable window (the selected entities' partitions):

* ``newest``: the minimum over partitions of what each has durably covered -- the largest
  watermark of its chain's segments, or its watermark object in the store when that object's
  ``stored_end`` is inside the chain (an idle partition);
* ``oldest``: the earliest record timestamp in any chain (nothing older is retained).

Semantics: restoring to T reads, per partition, every record with ``timestamp <= T``
(segments whose smallest timestamp is above T are not read at all). ``latest`` resolves to
``newest``. Offsets give per-partition end offsets (exclusive) and must name every partition
of the selected topics.

Snapshots (a later issue) slot in as another kind of chain link: a link that replaces the
replay of ``[first, cut)`` with a state load, followed by the same segment reads.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from replicator.catalog import SegmentInfo as SegmentInfo  # re-exported: plans are built from it
from replicator.errors import BackupIncompleteError, BadRequestError, PointNotRestorableError
from replicator.restore.point import AtOffsets, Latest, Point, format_ms
from replicator.snapshot.manifest import Manifest, SnapshotFile, chain_of

TP = tuple[str, int]

#: Planning estimate of replay speed (events/s) for ``--dry-run``; the real figure is measured.
REPLAY_EVENTS_PER_S = 100_000


@dataclass(frozen=True, slots=True)
class WatermarkInfo:
    """A partition's watermark object from the store."""

    topic: str
    partition: int
    stored_end: int | None
    watermark_ms: int


@dataclass(frozen=True, slots=True)
class Read:
    """Read ``segment``'s records with ``from_offset <= offset < to_offset``."""

    segment: SegmentInfo
    from_offset: int
    to_offset: int


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    topic: str
    partition: int
    entity: str
    reads: tuple[Read, ...]
    #: records with ``offset < cut_offset`` (offset restores); ``None`` for time restores
    cut_offset: int | None
    #: records with ``timestamp <= cut_ms`` (time restores); ``None`` for offset restores
    cut_ms: int | None
    first: int  # first offset the chain covers
    covered_end: int  # end of the chain
    newest_ms: int  # newest point this partition has durably covered (0: none)
    #: where the segment reads start: the snapshot chain's cut (``None``: no snapshot)
    snapshot_cut: int | None = None

    @property
    def events_estimate(self) -> int:
        return sum(r.segment.records for r in self.reads)

    @property
    def bytes(self) -> int:
        return sum(r.segment.bytes for r in self.reads)

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "entity": self.entity,
            "cut_offset": self.cut_offset,
            "cut_time": format_ms(self.cut_ms) if self.cut_ms is not None else None,
            "covered": [self.first, self.covered_end],
            "snapshot_cut": self.snapshot_cut,
            "newest_restorable": format_ms(self.newest_ms) if self.newest_ms else None,
            "files": [
                {"name": r.segment.name, "location": r.segment.location,
                 "from": r.from_offset, "to": r.to_offset, "bytes": r.segment.bytes}
                for r in self.reads
            ],
            "events_estimate": self.events_estimate,
        }


@dataclass(frozen=True, slots=True)
class Window:
    oldest_ms: int | None
    newest_ms: int | None

    def describe(self) -> str:
        return f"{format_ms(self.oldest_ms)} .. {format_ms(self.newest_ms)}"


@dataclass(frozen=True, slots=True)
class RestorePlan:
    point: Point
    #: the time restored to (``None`` for an offsets restore)
    at_ms: int | None
    window: Window
    entities: tuple[str, ...]
    partitions: tuple[PartitionPlan, ...]
    holes: tuple[tuple[TP, int, int], ...] = field(default=())
    #: the snapshot chain the restore starts from, base (a full) first; empty: none
    snapshots: tuple[Manifest, ...] = field(default=())

    def _snapshot_files(self) -> list[SnapshotFile]:
        topics = {p.topic for p in self.partitions}
        return [f for m in self.snapshots for f in m.files if f.topic in topics]

    @property
    def events_estimate(self) -> int:
        return sum(p.events_estimate for p in self.partitions) + sum(
            f.entries for f in self._snapshot_files())

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.partitions) + sum(
            f.bytes for f in self._snapshot_files())

    @property
    def files(self) -> int:
        return sum(len(p.reads) for p in self.partitions) + len(self._snapshot_files())

    @property
    def seconds_estimate(self) -> float:
        return round(self.events_estimate / REPLAY_EVENTS_PER_S, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": format_ms(self.at_ms) if self.at_ms is not None else None,
            "at_ms": self.at_ms,
            "window": {"oldest": format_ms(self.window.oldest_ms),
                       "newest": format_ms(self.window.newest_ms)},
            "entities": list(self.entities),
            "files": self.files,
            "bytes": self.bytes,
            "events_estimate": self.events_estimate,
            "seconds_estimate": self.seconds_estimate,
            "snapshots": [
                {"id": m.id, "kind": m.kind, "time": format_ms(m.time_ms),
                 "files": [{"name": f.name, "bytes": f.bytes, "entries": f.entries}
                           for f in m.files if f.topic in {p.topic for p in self.partitions}]}
                for m in self.snapshots
            ],
            "partitions": [p.to_json() for p in self.partitions],
        }


@dataclass(slots=True)
class Chain:
    segments: list[SegmentInfo]
    first: int
    end: int
    hole: tuple[int, int] | None
    newest_ms: int


def _chain(segs: Sequence[SegmentInfo], wm: WatermarkInfo | None) -> Chain:
    """Contiguous segments from the lowest covered offset; see the module docstring."""
    ordered = sorted(segs, key=lambda s: (s.start, s.location != "store", -s.end))
    chain: list[SegmentInfo] = []
    hole: tuple[int, int] | None = None
    first = ordered[0].start if ordered else ((wm.stored_end or 0) if wm else 0)
    pos = first
    i = 0
    while i < len(ordered):
        best: SegmentInfo | None = None
        while i < len(ordered) and ordered[i].start <= pos:
            s = ordered[i]
            if s.end > pos and (best is None or s.end > best.end
                                or (s.end == best.end and best.location != "store"
                                    and s.location == "store")):
                best = s
            i += 1
        if best is None:
            if i < len(ordered):
                hole = (pos, ordered[i].start)
            break
        chain.append(best)
        pos = best.end
    newest = max((s.watermark_ms for s in chain), default=0)
    if wm is not None and wm.watermark_ms > newest:
        stored_end = wm.stored_end
        if (stored_end is None and not chain) or (stored_end is not None and stored_end <= pos):
            newest = wm.watermark_ms
    return Chain(chain, first, pos, hole, newest)


def segment_chains(segments: Iterable[SegmentInfo], watermarks: Iterable[WatermarkInfo],
            topics: Collection[str]) -> dict[TP, Chain]:
    """The chain of every partition of ``topics`` that has segments or a watermark object,
    in (topic, partition) order."""
    by_tp: dict[TP, list[SegmentInfo]] = {}
    for s in segments:
        if s.topic in topics:
            by_tp.setdefault((s.topic, s.partition), []).append(s)
    wms = {(w.topic, w.partition): w for w in watermarks if w.topic in topics}
    return {tp: _chain(by_tp.get(tp, []), wms.get(tp)) for tp in sorted(set(by_tp) | set(wms))}


def window_of(chains: Iterable[Chain]) -> Window:
    """Oldest record time and the newest point every partition has durably covered."""
    cs = list(chains)
    oldest = min((s.min_ts for c in cs for s in c.segments if s.records), default=None)
    newest = (min(c.newest_ms for c in cs) or None) if cs else None
    return Window(oldest, newest)


@dataclass(frozen=True, slots=True)
class Base:
    """Where a restore can start: a snapshot chain (``links``, base first) or, with no
    links, the segments from each partition's first stored offset."""

    links: tuple[Manifest, ...]
    #: per partition, the offset the segment reads start from
    starts: Mapping[TP, int]
    #: partitions whose segments from the chain's cut are gone (an archive point): the
    #: base then serves only the snapshot's own point (its time, or exactly its cut), those
    #: partitions read nothing and the others read their segments as usual
    alone_parts: frozenset[TP] = frozenset()

    @property
    def alone(self) -> bool:
        return bool(self.alone_parts)

    @property
    def time_ms(self) -> int | None:
        return self.links[-1].time_ms if self.links else None


def snapshot_chains(snapshots: Iterable[Manifest]) -> list[tuple[Manifest, ...]]:
    """Every complete chain (a full, then its links) ending at one of ``snapshots``."""
    snaps = list(snapshots)
    by_id = {m.id: m for m in snaps}
    return [tuple(c) for m in snaps if (c := chain_of(m.id, by_id)) is not None]


def bases(chains: Mapping[TP, Chain], snapshots: Iterable[Manifest],
          trimmed: Mapping[TP, int] | None = None) -> list[Base]:
    """Every usable base for the partitions of ``chains``. The origin (no snapshot) is one
    only while retention has removed no segment of those partitions (``trimmed``: per
    partition, the offset below which segments were deleted)."""
    trimmed = trimmed or {}
    topics = {tp[0] for tp in chains}
    out: list[Base] = []
    if all(not trimmed.get(tp, 0) for tp in chains):
        out.append(Base((), {tp: c.first for tp, c in chains.items()}))
    for links in snapshot_chains(snapshots):
        last = links[-1]
        # a link without a file for a topic is empty for it only if the link knew none of
        # its partitions (a topic added later); otherwise the link is damaged: skip it
        if any(t not in {f.topic for f in link.files}
               and any(tp[0] == t for tp in link.cut) for link in links for t in topics):
            continue
        starts: dict[TP, int] = {}
        alone: set[TP] = set()
        usable = True
        for tp, c in chains.items():
            cut = last.cut.get(tp)
            if cut is None:  # a partition created after the snapshot
                usable = usable and not trimmed.get(tp, 0)
                starts[tp] = c.first
            else:
                starts[tp] = cut
                if not c.first <= cut <= c.end:
                    alone.add(tp)
        if usable:
            out.append(Base(links, starts, frozenset(alone)))
    return out


def base_fits(base: Base, at_ms: int | None, ends: Mapping[TP, int] | None,
          chains: Mapping[TP, Chain]) -> bool:
    """Can ``base`` serve the point (a time, or per-partition end offsets)?"""
    if not base.links:
        return ends is None or all(not 0 < ends[tp] < c.first for tp, c in chains.items())
    last = base.links[-1]
    if ends is not None:
        return all(ends[tp] == base.starts[tp] if tp in base.alone_parts
                   else base.starts[tp] <= ends[tp] for tp in chains)
    assert at_ms is not None
    return at_ms == last.time_ms if base.alone else last.time_ms <= at_ms


def chain_reads(c: Chain, start: int, at_ms: int | None, end: int | None, alone: bool
           ) -> list[Read]:
    reads: list[Read] = []
    if alone:
        return reads
    pos = c.first
    for s in c.segments:
        lo, hi = max(pos, s.start, start), s.end
        pos = hi
        if hi <= lo:
            continue
        if end is not None:
            if lo >= end:
                break
            hi = min(hi, end)
        elif at_ms is not None and (not s.records or s.min_ts > at_ms):
            continue
        if s.records:
            reads.append(Read(s, lo, hi))
    return reads


def base_cost(base: Base, chains: Mapping[TP, Chain], at_ms: int | None,
          ends: Mapping[TP, int] | None) -> int:
    topics = {tp[0] for tp in chains}
    snap = sum(f.bytes for m in base.links for f in m.files if f.topic in topics)
    return snap + sum(
        r.segment.bytes for tp, c in chains.items()
        for r in chain_reads(c, base.starts[tp], at_ms, ends[tp] if ends else None,
                             tp in base.alone_parts))


def window_with(chains: Mapping[TP, Chain], usable: Iterable[Base]) -> Window:
    """The restorable window: newest from the segment chains (:func:`window_of`), oldest
    from the oldest base that segments continue (an archive point is not a window)."""
    w = window_of(chains.values())
    oldest: int | None = None
    for b in usable:
        if b.alone:
            continue
        t = w.oldest_ms if not b.links else b.links[-1].time_ms
        if t is not None and (oldest is None or t < oldest):
            oldest = t
    return Window(oldest, w.newest_ms)


def _archive_points(usable: Iterable[Base]) -> str:
    pts = sorted({b.links[-1].time_ms for b in usable if b.alone and b.links})
    if not pts:
        return ""
    return "; archive points (restorable exactly): " + ", ".join(format_ms(t) for t in pts)


def plan_restore(
    segments: Iterable[SegmentInfo],
    watermarks: Iterable[WatermarkInfo],
    *,
    topic_entities: Mapping[str, str],
    point: Point,
    entities: Sequence[str] | None = None,
    snapshots: Iterable[Manifest] = (),
    trimmed: Mapping[TP, int] | None = None,
) -> RestorePlan:
    """Plan a restore of ``entities`` (default: all in ``topic_entities``) to ``point``.

    Among the usable bases (the segments from the start, or a snapshot chain followed by the
    segments from its cut) the one reading the fewest bytes wins. Raises
    :class:`BadRequestError` (unknown entity/topic/partition, offsets beyond what is
    stored), :class:`PointNotRestorableError` (outside the window, or no backup at all) and
    :class:`BackupIncompleteError` (the point needs data past a missing segment).
    """
    known = sorted(set(topic_entities.values()))
    wanted = list(entities) if entities else known
    for e in wanted:
        if e not in known:
            raise BadRequestError(f"unknown entity {e!r}; known: {', '.join(known)}")
    topics = {t: e for t, e in topic_entities.items() if e in wanted}
    snaps = list(snapshots)

    chains = segment_chains(segments, watermarks, topics)
    tps = list(chains)

    if isinstance(point, AtOffsets):
        for tp in point.ends:
            if tp[0] not in topic_entities:
                raise BadRequestError(
                    f"unknown topic {tp[0]!r} in --offsets; "
                    f"known: {', '.join(sorted(topic_entities))}"
                )
        topics = {t: e for t, e in topics.items() if any(tp[0] == t for tp in point.ends)}
        for tp in point.ends:
            if tp[0] in topic_entities and tp[0] not in topics:
                raise BadRequestError(
                    f"topic {tp[0]!r} in --offsets is not among the selected entities"
                )
        tps = [tp for tp in tps if tp[0] in topics]
        unknown = sorted(set(point.ends) - set(tps))
        if unknown:
            raise BadRequestError(
                "no backup of partition(s) " + ", ".join(f"{t}:{p}" for t, p in unknown)
            )
        missing = sorted(tp for tp in tps if tp not in point.ends)
        if missing:
            raise BadRequestError(
                "--offsets must name every partition of the topics it restores; missing "
                + ", ".join(f"{t}:{p}" for t, p in missing)
            )

    if not tps:
        raise PointNotRestorableError(
            "no backups at all for " + ", ".join(sorted(set(topics.values())) or wanted),
            oldest_ms=None, newest_ms=None,
        )

    chains = {tp: chains[tp] for tp in tps}
    usable = bases(chains, snaps, trimmed)
    window = window_with(chains, usable)
    oldest, newest = window.oldest_ms, window.newest_ms
    holes = tuple((tp, c.hole[0], c.hole[1]) for tp, c in chains.items() if c.hole)

    at_ms: int | None
    ends: Mapping[TP, int] | None = None
    if isinstance(point, AtOffsets):
        at_ms = None
        ends = point.ends
        for tp, end in point.ends.items():
            c = chains[tp]
            if end > c.end:
                if c.hole:
                    raise BackupIncompleteError(
                        f"{tp[0]}:{tp[1]}: offsets [{c.hole[0]}, {c.hole[1]}) are missing "
                        f"from the backup (a segment file is gone); offset {end} is past it"
                    )
                raise BadRequestError(
                    f"offset {end} for {tp[0]}:{tp[1]} is beyond what is stored "
                    f"(covered [{c.first}, {c.end}))"
                )
        fitting = [b for b in usable if base_fits(b, None, ends, chains)]
        if not fitting:
            early = [(tp, o) for tp, o in ends.items() if 0 < o < chains[tp].first] or [
                (tp, o) for tp, o in ends.items()]
            (t, p), off = early[0]
            raise PointNotRestorableError(
                f"offset {off} for {t}:{p} is before the oldest retained data "
                f"(first stored offset {chains[(t, p)].first})" + _archive_points(usable),
                oldest_ms=oldest, newest_ms=newest,
            )
    else:
        if newest is None:
            raise PointNotRestorableError(
                "no point is restorable yet: not every partition has a durable watermark "
                "(is the replicator running and caught up?)",
                oldest_ms=oldest, newest_ms=None,
            )
        if isinstance(point, Latest) and holes:
            # the backup holds data past a missing file: "latest" would silently go back
            tp, a, b = holes[0]
            raise BackupIncompleteError(
                f"{tp[0]}:{tp[1]}: offsets [{a}, {b}) are missing from the backup (a segment "
                f"file is gone), so 'latest' cannot be reached; the newest complete point is "
                f"{format_ms(newest)} (restore it explicitly with --at if that is acceptable)"
            )
        at_ms = newest if isinstance(point, Latest) else point.ts_ms
        fitting = [b for b in usable if base_fits(b, at_ms, None, chains)]
        if not fitting or (oldest is not None and at_ms < oldest
                           and not any(b.alone for b in fitting)):
            raise PointNotRestorableError(
                f"{format_ms(at_ms)} is before the oldest retained data; "
                f"restorable window: {window.describe()}" + _archive_points(usable),
                oldest_ms=oldest, newest_ms=newest,
            )
        if at_ms > newest:
            limiting = [tp for tp, c in chains.items() if c.newest_ms == newest]
            for tp in limiting:
                c = chains[tp]
                if c.hole:
                    raise BackupIncompleteError(
                        f"{tp[0]}:{tp[1]}: offsets [{c.hole[0]}, {c.hole[1]}) are missing from "
                        f"the backup (a segment file is gone); the newest complete point is "
                        f"{format_ms(newest)}"
                    )
            raise PointNotRestorableError(
                f"{format_ms(at_ms)} is after the newest restorable time {format_ms(newest)} "
                f"(the newest point every partition has durably covered; limited by "
                + ", ".join(f"{t}:{p}" for t, p in limiting) + ")",
                oldest_ms=oldest, newest_ms=newest,
            )

    # fewest bytes; on a tie the newer base (fewer events to fold)
    base = min(fitting, key=lambda b: (base_cost(b, chains, at_ms, ends), -(b.time_ms or -1)))
    plans: list[PartitionPlan] = []
    for tp in tps:
        c = chains[tp]
        cut_offset = ends[tp] if ends is not None else None
        start = base.starts[tp]
        plans.append(PartitionPlan(
            topic=tp[0], partition=tp[1], entity=topics[tp[0]],
            reads=tuple(chain_reads(c, start, at_ms, cut_offset, tp in base.alone_parts)),
            cut_offset=cut_offset, cut_ms=at_ms if cut_offset is None else None,
            first=c.first, covered_end=c.end, newest_ms=c.newest_ms,
            snapshot_cut=start if base.links else None,
        ))
    return RestorePlan(
        point=point, at_ms=at_ms, window=window,
        entities=tuple(sorted(set(topics.values()))), partitions=tuple(plans), holes=holes,
        snapshots=base.links,
    )


@dataclass(frozen=True, slots=True)
class EntityBackups:
    """``backups list``: one entity's restorable window and what its backup holds."""

    entity: str
    window: Window
    partitions: int
    segments: int
    events: int
    bytes: int
    holes: tuple[tuple[TP, int, int], ...]
    #: per partition, the offsets its segments cover without a hole: ``[first, end)``
    ranges: tuple[tuple[TP, int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "oldest_restorable": format_ms(self.window.oldest_ms)
            if self.window.oldest_ms is not None else None,
            "newest_restorable": format_ms(self.window.newest_ms)
            if self.window.newest_ms is not None else None,
            "partitions": self.partitions,
            "segments": self.segments,
            "events": self.events,
            "bytes": self.bytes,
            "missing_ranges": [
                {"topic": tp[0], "partition": tp[1], "from": a, "to": b}
                for tp, a, b in self.holes
            ],
            "segment_ranges": [
                {"topic": tp[0], "partition": tp[1], "from": a, "to": b}
                for tp, a, b in self.ranges
            ],
        }


def describe_backups(
    segments: Iterable[SegmentInfo],
    watermarks: Iterable[WatermarkInfo],
    *,
    topic_entities: Mapping[str, str],
    snapshots: Iterable[Manifest] = (),
    trimmed: Mapping[TP, int] | None = None,
) -> list[EntityBackups]:
    """Per entity: the restorable window (same rules as :func:`plan_restore`) and sizes."""
    segs = list(segments)
    wms = list(watermarks)
    snaps = list(snapshots)
    out: list[EntityBackups] = []
    for entity in sorted(set(topic_entities.values())):
        topics = {t for t, e in topic_entities.items() if e == entity}
        chains = segment_chains(segs, wms, topics)
        used = [s for c in chains.values() for s in c.segments]
        out.append(EntityBackups(
            entity=entity, window=window_with(chains, bases(chains, snaps, trimmed)),
            partitions=len(chains),
            segments=len(used), events=sum(s.records for s in used),
            bytes=sum(s.bytes for s in used),
            holes=tuple((tp, c.hole[0], c.hole[1]) for tp, c in chains.items() if c.hole),
            ranges=tuple((tp, c.first, c.end) for tp, c in chains.items()),
        ))
    return out


def plan_scan(
    segments: Iterable[SegmentInfo],
    watermarks: Iterable[WatermarkInfo],
    *,
    topic_entities: Mapping[str, str],
    entity: str,
    from_ms: int | None = None,
    to_ms: int | None = None,
) -> RestorePlan:
    """Read every stored change of ``entity`` (optionally only timestamps in
    ``[from_ms, to_ms]``), for ``history`` and ``export``: no restorable-window check."""
    known = sorted(set(topic_entities.values()))
    if entity not in known:
        raise BadRequestError(f"unknown entity {entity!r}; known: {', '.join(known)}")
    topics = {t for t, e in topic_entities.items() if e == entity}
    plans: list[PartitionPlan] = []
    for tp, c in segment_chains(segments, watermarks, topics).items():
        if not c.segments:
            continue  # a partition known only from its watermark object: nothing to read
        reads: list[Read] = []
        pos = c.first
        for s in c.segments:
            lo = max(pos, s.start)
            pos = s.end
            if not s.records:
                continue
            if (to_ms is not None and s.min_ts > to_ms) or (
                    from_ms is not None and s.max_ts < from_ms):
                continue
            reads.append(Read(s, lo, s.end))
        plans.append(PartitionPlan(
            topic=tp[0], partition=tp[1], entity=entity, reads=tuple(reads), cut_offset=None,
            cut_ms=to_ms, first=c.first, covered_end=c.end, newest_ms=c.newest_ms,
        ))
    return RestorePlan(point=Latest(), at_ms=to_ms, window=Window(None, None),
                       entities=(entity,), partitions=tuple(plans))
