"""Restore executor: catalog -> plan -> replay -> target -> digest check -> commit.

Thin on purpose: the decisions live in :mod:`~replicator.restore.planner` (what to read)
and :mod:`~replicator.restore.replay` (what state results). Success is only claimed after the
digest of what the target holds equals the digest derived from the backup; on a mismatch
the target is aborted (nothing visible) and :class:`DigestMismatchError` is raised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import replicator
from replicator.catalog import Catalog
from replicator.errors import BadRequestError, DigestMismatchError
from replicator.restore.digest import DigestBuilder, StateDigest
from replicator.restore.layout import TableLayout
from replicator.restore.planner import (
    RestorePlan,
    SegmentInfo,
    WatermarkInfo,
    plan_restore,
)
from replicator.restore.point import Point, format_ms
from replicator.restore.replay import (
    ReplayStats,
    live_count,
    replay,
    scan,
)
from replicator.restore.rowcodec import RowCodec, event_rows
from replicator.schemas import SchemaRegistry
from replicator.snapshot.tiers import Tiers
from replicator.targets import RestoreRecord, Target, open_target
from replicator.targets.base import CodecTarget


async def load_catalog(catalog: Catalog) -> tuple[list[SegmentInfo], list[WatermarkInfo]]:
    """What the planner needs: every segment (store, then this host's spool) and the
    store's watermark objects."""
    segs: list[SegmentInfo] = list(await catalog.list(include_spool=True))
    wms = [
        WatermarkInfo(d["topic"], d["partition"], d["stored_end"], d["watermark_ms"])
        for d in await catalog.watermarks()
    ]
    return segs, wms


async def make_plan(
    catalog: Catalog, registry: SchemaRegistry, topics: Sequence[str], point: Point,
    entities: Sequence[str] | None = None, *, tiers: Tiers | None = None,
    use_snapshots: bool = True,
) -> RestorePlan:
    """Plan from what the store (and spool) holds: segments, watermarks, snapshots of both
    tiers and the retention record. ``use_snapshots=False`` plans from segments alone (a
    re-publication of the raw event stream needs every event)."""
    from replicator.retention import load_trimmed

    segs, wms = await load_catalog(catalog)
    tiers = tiers or Tiers.for_store(catalog.store)
    snaps = await tiers.list() if use_snapshots else []
    topic_entities = {t: t for t in topics if t in registry.entities}
    return plan_restore(segs, wms, topic_entities=topic_entities, point=point,
                        entities=entities, snapshots=snaps,
                        trimmed=await load_trimmed(catalog.store))


async def snapshot_paths(tiers: Tiers, plan: RestorePlan) -> dict[tuple[str, str], Path]:
    """A local path for every snapshot file the plan reads, by (snapshot id, file name)."""
    topics = {p.topic for p in plan.partitions}
    return {(m.id, f.name): await tiers.fetch(m, f.name)
            for m in plan.snapshots for f in m.files if f.topic in topics}


async def local_paths(catalog: Catalog, plan: RestorePlan) -> dict[str, Path]:
    """A local path for every file the plan reads (store objects fetched if remote)."""
    out: dict[str, Path] = {}
    for pp in plan.partitions:
        for r in pp.reads:
            s = r.segment
            if s.name in out:
                continue
            if s.location == "store":
                tmp = Path(catalog._tmp) / ("restore-" + s.name.replace("/", "_"))
                out[s.name] = await catalog.store.fetch_to(s.name, tmp)
            else:
                out[s.name] = Path(s.name)
    return out


@dataclass
class EntityResult:
    entity: str
    rows: int
    expected: StateDigest
    actual: StateDigest

    @property
    def ok(self) -> bool:
        return self.expected == self.actual

    def to_json(self) -> dict[str, Any]:
        return {"entity": self.entity, "rows": self.rows, "digest": self.actual.hex,
                "expected_digest": self.expected.hex, "ok": self.ok}


@dataclass
class RestoreReport:
    restore_id: str
    plan: RestorePlan
    location: str
    results: list[EntityResult] = field(default_factory=list)
    events: int = 0
    replay_seconds: float = 0.0
    load_seconds: float = 0.0
    verify_seconds: float = 0.0
    seconds: float = 0.0
    schema: str | None = None
    replaced_schema: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "restore_id": self.restore_id,
            "ok": all(r.ok for r in self.results),
            "target": self.location,
            "schema": self.schema,
            "replaced_schema": self.replaced_schema,
            "at": format_ms(self.plan.at_ms) if self.plan.at_ms is not None else None,
            "cut": cut_json(self.plan),
            "events_replayed": self.events,
            "entities": [r.to_json() for r in self.results],
            "seconds": round(self.seconds, 3),
            "replay_seconds": round(self.replay_seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "verify_seconds": round(self.verify_seconds, 3),
        }


def cut_json(plan: RestorePlan) -> list[dict[str, Any]]:
    return [
        {"topic": p.topic, "partition": p.partition,
         "end_offset": p.cut_offset, "at": format_ms(p.cut_ms) if p.cut_ms is not None else None}
        for p in plan.partitions
    ]


def default_schema_name(plan: RestorePlan) -> str:
    stamp = plan.at_ms if plan.at_ms is not None else int(time.time() * 1000)
    return "restore_" + time.strftime("%Y%m%d_%H%M%S", time.gmtime(stamp / 1000))


async def execute_restore(
    catalog: Catalog,
    registry: SchemaRegistry,
    plan: RestorePlan,
    target_url: str,
    *,
    keys: Collection[str] | None = None,
    replace: bool = False,
    swap_into: str | None = None,
    progress: Callable[[int], None] | None = None,
    phase: Callable[[str, int], None] | None = None,
    target: Target | None = None,
    tiers: Tiers | None = None,
) -> RestoreReport:
    """Run ``plan`` into ``target_url``; raises before anything is visible on any failure."""
    t0 = time.monotonic()
    started = format_ms(int(time.time() * 1000))
    restore_id = time.strftime("%Y%m%d%H%M%S") + "_" + uuid.uuid4().hex[:6]
    if target is None:
        target = open_target(target_url, restore_id=restore_id,
                             default_schema=default_schema_name(plan), swap_into=swap_into)
    report = RestoreReport(restore_id, plan, target.location)
    from replicator.targets.kafka import KafkaTarget

    kafka = target if isinstance(target, KafkaTarget) else None
    if kafka is not None and kafka.mode == "events" and plan.snapshots:
        raise BadRequestError("re-publishing the event stream needs a plan from segments "
                              "alone (make_plan(..., use_snapshots=False))")
    await target.open(replace=replace)
    try:
        paths = await local_paths(catalog, plan)
        snaps = await snapshot_paths(tiers or Tiers.for_store(catalog.store), plan)
        stats = ReplayStats()
        state = await asyncio.to_thread(
            replay, plan, lambda s: paths[s.name], keys=keys, stats=stats, progress=progress,
            keep_record=kafka is not None, snapshot_opener=lambda m, n: snaps[(m.id, n)])
        report.events = stats.events
        if phase is not None:
            phase("loading", sum(live_count(state[e]) for e in plan.entities))
        t1 = time.monotonic()
        report.replay_seconds = t1 - t0
        expected: dict[str, DigestBuilder] = {}
        counts: dict[str, int] = {}
        if kafka is not None:
            parts: dict[str, int] = {}
            for pp in plan.partitions:
                parts[pp.topic] = max(parts.get(pp.topic, 0), pp.partition + 1)
            await kafka.prepare(parts)
        for entity in plan.entities:
            layout = TableLayout.from_schema(entity, registry.json_schema(entity))
            d = expected[entity] = DigestBuilder(entity)
            row_target = getattr(target, "row_target", None)
            if row_target is not None and kafka is None:
                codec = RowCodec(layout, row_target)
                counts[entity] = await cast(CodecTarget, target).write_codec(
                    codec, plan, state[entity], d, progress)
                state[entity] = {}
                continue
            rows = event_rows(layout, plan, state[entity], d, progress)
            if kafka is not None and kafka.mode == "events":
                for _ in rows:  # the expected digest of the state the events lead to
                    pass
                entity_plan = dataclasses.replace(
                    plan, partitions=tuple(p for p in plan.partitions if p.entity == entity))
                counts[entity] = await kafka.write_events(
                    scan(entity_plan, lambda s: paths[s.name], to_ms=plan.at_ms, keys=keys))
            else:
                counts[entity] = await target.write(layout, rows)
            state[entity] = {}  # free as we go
        t2 = time.monotonic()
        report.load_seconds = t2 - t1
        for entity in plan.entities:
            layout = TableLayout.from_schema(entity, registry.json_schema(entity))
            actual = await target.read_digest(layout)
            report.results.append(
                EntityResult(entity, counts[entity], expected[entity].result(), actual))
        report.verify_seconds = time.monotonic() - t2
        bad = [r for r in report.results if not r.ok]
        if bad:
            raise DigestMismatchError(
                "digest mismatch, nothing committed: " + "; ".join(
                    f"{r.entity}: backup says {r.expected}, target holds {r.actual}" for r in bad)
            )
        await target.record(RestoreRecord(
            restore_id=restore_id,
            at=format_ms(plan.at_ms) if plan.at_ms is not None else None,
            at_ms=plan.at_ms, cut=cut_json(plan), counts=counts,
            digests={r.entity: str(r.actual) for r in report.results},
            started_at=started, finished_at=format_ms(int(time.time() * 1000)),
            replicator_version=replicator.__version__,
        ))
        await target.commit()
    except BaseException:
        await target.abort()
        raise
    report.schema = getattr(target, "final_schema", None)
    report.replaced_schema = getattr(target, "replaced_schema", None)
    report.seconds = time.monotonic() - t0
    return report
