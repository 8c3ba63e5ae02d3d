"""The compaction planner: catalog + snapshot kind -> what to merge and read.

A pure function (:func:`plan_compaction`), like the restore planner it shares its chain and
base logic with. Only segments in the store take part (a snapshot describes shipped data).

* The snapshot's time ``T`` is the newest point every partition has durably covered in the
  store (the restore window's ``newest``). Per partition, the snapshot's cut is the offset
  of the first record stamped after ``T`` (or the end of the stored chain): every record it
  reflects is at or before ``T``; a later straggler stamped ``<= T`` is read from segments
  by any restore, so the layering stays exact (see :mod:`replicator.snapshot.manifest`).
* **full / archive**: the state at ``T``; merges the cheapest existing chain (the restore
  planner's choice of base) with the segments from that chain's cut.
* **differential**: the changes since the newest full (parent: that full).
* **incremental**: the changes since the newest snapshot of any kind (parent: it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from replicator.catalog import SegmentInfo
from replicator.errors import CompactionError
from replicator.restore.planner import (
    TP,
    PartitionPlan,
    WatermarkInfo,
    base_cost,
    base_fits,
    bases,
    chain_reads,
    segment_chains,
    snapshot_chains,
    window_of,
)
from replicator.restore.point import format_ms
from replicator.snapshot.manifest import FULL_KINDS, Manifest, newest

KINDS = ("full", "differential", "incremental", "archive")


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    kind: str
    time_ms: int
    #: the snapshot this one chains to (differential, incremental); ``None`` for a full
    parent: Manifest | None
    #: an existing chain merged into a full (base first); empty for the other kinds
    layers: tuple[Manifest, ...]
    #: per partition, the segment reads from ``start`` (``cut_ms`` is ``None``: the executor
    #: stops each partition at its first record stamped after ``time_ms``)
    partitions: tuple[PartitionPlan, ...]
    topic_entities: Mapping[str, str]

    @property
    def starts(self) -> dict[TP, int]:
        return {(p.topic, p.partition): p.snapshot_cut if p.snapshot_cut is not None
                else p.first for p in self.partitions}

    @property
    def segment_bytes(self) -> int:
        return sum(p.bytes for p in self.partitions)

    @property
    def events_estimate(self) -> int:
        topics = set(self.topic_entities)
        return sum(p.events_estimate for p in self.partitions) + sum(
            f.entries for m in self.layers for f in m.files if f.topic in topics)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": format_ms(self.time_ms),
            "parent": self.parent.id if self.parent else None,
            "merges": [m.id for m in self.layers],
            "segments": sum(len(p.reads) for p in self.partitions),
            "segment_bytes": self.segment_bytes,
            "events_estimate": self.events_estimate,
        }


def plan_compaction(
    kind: str,
    segments: Iterable[SegmentInfo],
    watermarks: Iterable[WatermarkInfo],
    snapshots: Iterable[Manifest],
    *,
    topic_entities: Mapping[str, str],
    trimmed: Mapping[TP, int] | None = None,
    at_ms: int | None = None,
) -> CompactionPlan:
    """Plan one snapshot of ``kind`` over every topic in ``topic_entities``, as of the
    newest durable point (or ``at_ms``, which must not be later).

    Raises :class:`CompactionError` when there is nothing durable to compact, no parent for
    a differential/incremental, no new data since the parent, or a segment is missing
    between the parent's cut and the stored end.
    """
    if kind not in KINDS:
        raise CompactionError(f"unknown snapshot kind {kind!r}; use one of {', '.join(KINDS)}")
    stored = [s for s in segments if s.location == "store"]
    snaps = [m for m in snapshots]
    chains = segment_chains(stored, watermarks, topic_entities)
    if not chains:
        raise CompactionError("nothing to compact: the store holds no segments yet")
    time_ms = window_of(chains.values()).newest_ms
    if time_ms is None:
        raise CompactionError("nothing to compact: not every partition has a durable "
                              "watermark in the store yet")
    if at_ms is not None:
        if at_ms > time_ms:
            raise CompactionError(f"{format_ms(at_ms)} is after the newest durable point "
                                  f"{format_ms(time_ms)}")
        time_ms = at_ms
    parent: Manifest | None = None
    layers: tuple[Manifest, ...] = ()
    if kind in FULL_KINDS:
        fitting = [b for b in bases(chains, snaps, trimmed)
                   if not b.alone and base_fits(b, time_ms, None, chains)]
        if not fitting:
            raise CompactionError("no complete history to build a full snapshot from: the "
                                  "segments were trimmed and no snapshot chain continues them")
        base = min(fitting, key=lambda b: (base_cost(b, chains, time_ms, None),
                                           -(b.time_ms or -1)))
        layers, starts = base.links, dict(base.starts)
    else:
        # only a snapshot whose whole chain is still there can be built on
        complete = [m for c in snapshot_chains(snaps) for m in c[-1:]]
        parent = newest(complete, FULL_KINDS if kind == "differential" else None)
        if parent is None:
            raise CompactionError(
                f"no {'full ' if kind == 'differential' else ''}snapshot to build "
                f"a{'' if kind == 'differential' else 'n'} {kind} on yet; "
                "run `replicator compact --kind full` first")
        if parent.time_ms >= time_ms:
            raise CompactionError(
                f"nothing new since snapshot {parent.id}: it already covers "
                f"{format_ms(parent.time_ms)}, the newest durable point")
        starts = {tp: parent.cut.get(tp, c.first) for tp, c in chains.items()}
    for tp, c in chains.items():
        if not c.first <= starts[tp] <= c.end:
            raise CompactionError(
                f"{tp[0]}:{tp[1]}: the store's segments cover [{c.first}, {c.end}) but the "
                f"snapshot must continue from offset {starts[tp]}: segments are missing")
    parts = tuple(
        PartitionPlan(
            topic=tp[0], partition=tp[1], entity=topic_entities[tp[0]],
            reads=tuple(chain_reads(c, starts[tp], None, None, False)),
            cut_offset=None, cut_ms=None, first=c.first, covered_end=c.end,
            newest_ms=c.newest_ms, snapshot_cut=starts[tp],
        )
        for tp, c in chains.items()
    )
    return CompactionPlan(kind, time_ms, parent, layers, parts, dict(topic_entities))
