"""Compaction executor: plan -> build each topic's file (in a thread) -> verify -> store ->
re-read the stored copy -> manifest.

Crash safety: files are built under temp names in ``work_dir`` and put create-only under
the snapshot's directory; the manifest goes last. A crash at any instant leaves either no
manifest (the directory is an orphan, swept by the next run) or a complete, verified
snapshot. Only one compaction runs per data directory (an ``flock`` on ``work_dir``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator import naming
from replicator.catalog import Catalog
from replicator.compaction.build import DEFAULT_BUDGET, TopicResult, build_topic
from replicator.compaction.planner import CompactionPlan, plan_compaction
from replicator.errors import CompactionError
from replicator.restore.layout import TableLayout
from replicator.restore.point import format_ms
from replicator.restore.replay import ReplayStats
from replicator.restore.runner import load_catalog
from replicator.schemas import SchemaRegistry
from replicator.snapshot.file import SnapshotFileReader
from replicator.snapshot.manifest import Manifest, SnapshotFile
from replicator.snapshot.tiers import Tiers


@dataclass
class CompactionReport:
    manifest: Manifest
    plan: CompactionPlan
    seconds: float = 0.0
    events: int = 0
    bytes_read: int = 0
    runs: int = 0
    swept: int = 0
    results: list[TopicResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "id": m.id, "kind": m.kind, "time": format_ms(m.time_ms), "parent": m.parent,
            "merged": [x.id for x in self.plan.layers],
            "events_read": self.events, "bytes_read": self.bytes_read,
            "spilled_runs": self.runs, "seconds": round(self.seconds, 3),
            "bytes": m.size, "swept_leftovers": self.swept,
            "files": [f.to_json() for f in m.files],
        }


@contextlib.contextmanager
def compaction_lock(work_dir: Path) -> Iterator[None]:
    """One maintenance job (compaction or retention) per data directory; a second one fails
    fast instead of waiting."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with (work_dir / ".lock").open("a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactionError(f"another compaction or retention run is in progress "
                                  f"(lock {work_dir}/.lock)") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sweep_work_dir(work_dir: Path) -> int:
    """Remove local leftovers (temp files, runs) of an interrupted compaction."""
    n = 0
    for p in work_dir.iterdir():
        if p.name == ".lock":
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


async def make_compaction_plan(catalog: Catalog, tiers: Tiers, registry: SchemaRegistry,
                               topics: Sequence[str], kind: str,
                               at_ms: int | None = None) -> CompactionPlan:
    from replicator.retention import load_trimmed

    segs, wms = await load_catalog(catalog)
    snaps = await tiers.list(tier="hot")
    return plan_compaction(kind, segs, wms, snaps,
                           topic_entities={t: t for t in topics if t in registry.entities},
                           trimmed=await load_trimmed(catalog.store), at_ms=at_ms)


async def compact(
    catalog: Catalog,
    tiers: Tiers,
    registry: SchemaRegistry,
    topics: Sequence[str],
    kind: str,
    *,
    work_dir: Path,
    budget: int = DEFAULT_BUDGET,
    progress: Callable[[int], None] | None = None,
    at_ms: int | None = None,
    plan: CompactionPlan | None = None,
) -> CompactionReport:
    """Build, verify and publish one snapshot of ``kind``; return what was done."""
    t0 = time.monotonic()
    with compaction_lock(work_dir):
        await asyncio.to_thread(sweep_work_dir, work_dir)
        swept = await tiers.sweep_orphans()
        if plan is None:
            plan = await make_compaction_plan(catalog, tiers, registry, topics, kind, at_ms)
        sid = naming.snapshot_id(plan.time_ms, plan.kind, secrets.token_hex(3))
        build_dir = work_dir / sid
        build_dir.mkdir()
        try:
            report = await _build_all(catalog, tiers, registry, plan, sid, build_dir, budget,
                                      progress)
        finally:
            await asyncio.to_thread(shutil.rmtree, build_dir, True)
        report.swept = swept
    report.seconds = time.monotonic() - t0
    return report


async def _build_all(catalog: Catalog, tiers: Tiers, registry: SchemaRegistry,
                     plan: CompactionPlan, sid: str, build_dir: Path, budget: int,
                     progress: Callable[[int], None] | None) -> CompactionReport:
    paths: dict[str, Path] = {}
    for pp in plan.partitions:
        for r in pp.reads:
            if r.segment.name not in paths:
                paths[r.segment.name] = await catalog.store.fetch_to(
                    r.segment.name, build_dir / ("seg-" + r.segment.name.replace("/", "_")))
    stats = ReplayStats()
    files: list[SnapshotFile] = []
    cut: dict[tuple[str, int], int] = {}
    results: list[TopicResult] = []
    for topic, entity in sorted(plan.topic_entities.items()):
        layout = TableLayout.from_schema(entity, registry.json_schema(entity))
        layers = []
        for m in plan.layers:
            f = m.file_for(topic)
            if f is None:
                if any(tp[0] == topic for tp in m.cut):
                    raise CompactionError(f"snapshot {m.id} has no file for {topic}")
                continue  # the topic was added after that snapshot
            layers.append((await tiers.fetch(m, f.name), tiers.object_name(m, f.name)))
        parts = [pp for pp in plan.partitions if pp.topic == topic]
        out = build_dir / f"{topic}.snap"
        meta = {"snapshot_id": sid, "kind": plan.kind, "topic": topic, "entity": entity,
                "time_ms": plan.time_ms}
        res = await asyncio.to_thread(
            build_topic, topic=topic, layout=layout, parts=parts, stop_ms=plan.time_ms,
            opener=lambda s: paths[s.name], layer_files=layers, out_path=out,
            work_dir=build_dir, meta=meta, budget=budget, stats=stats, progress=progress)
        results.append(res)
        name = naming.snapshot_file_name(sid, topic)
        await tiers.hot.put_file(name, out)
        # re-read the stored copy -- the one readers will use -- before any manifest names
        # it; a failed check leaves an orphan (no manifest) for the next run to sweep
        stored = await tiers.hot.fetch_to(name, build_dir / f"stored-{topic}.snap")
        await asyncio.to_thread(_check_file, stored, name, res)
        files.append(SnapshotFile(topic=topic, entity=entity,
                                  name=topic + naming.SNAPSHOT_SUFFIX, bytes=res.bytes,
                                  entries=res.entries, live=res.live,
                                  tombstones=res.tombstones, digest=res.digest,
                                  key_id=res.key_id))
        for p, c in res.cuts.items():
            cut[(topic, p)] = c
    manifest = Manifest(
        id=sid, kind=plan.kind, time_ms=plan.time_ms, created_ms=int(time.time() * 1000),
        parent=plan.parent.id if plan.parent else None, cut=cut, start=plan.starts,
        files=tuple(files),
    )
    await tiers.hot.put_bytes(naming.snapshot_manifest_name(sid), manifest.encode())
    return CompactionReport(manifest=manifest, plan=plan, events=stats.events,
                            bytes_read=stats.bytes, runs=sum(r.runs for r in results),
                            results=results)


def _check_file(path: Path, name: str, res: TopicResult) -> None:
    """Re-read a built file: every checksum, the order, the count and the content hash."""
    with SnapshotFileReader(path, name=name) as r:
        entries, content = r.verify()
    if entries != res.entries or content != res.content_hash:
        raise CompactionError(
            f"{name}: re-read check failed (wrote {res.entries} entries, hash "
            f"{res.content_hash[:16]}…; read {entries}, hash {content[:16]}…); "
            "the snapshot was not published")
