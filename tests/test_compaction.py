"""Snapshots built by compaction: a chain (full, incremental, differential) restores exactly
what replaying every segment restores, and what the independent oracle says."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from replicator.catalog import Catalog
from replicator.compaction.runner import CompactionReport, compact
from replicator.errors import CompactionError
from replicator.restore.point import AtTime, Latest, Point
from replicator.restore.runner import execute_restore, make_plan
from replicator.schemas import SchemaRegistry
from replicator.snapshot.file import SnapshotFileReader
from replicator.snapshot.tiers import Tiers
from replicator.storage.local import LocalStore
from tests.restore_history import (
    ENTITIES,
    History,
    Oracle,
    build_history,
    canonical_rows,
    layouts,
    sqlite_rows,
)

REG = SchemaRegistry.load()


def _cat(h: History) -> Catalog:
    return Catalog(store=LocalStore(root=h.store_root), data_dir=None)


def run_compact(h: History, kind: str, work: Path, at_ms: int | None = None,
                budget: int = 200_000) -> CompactionReport:
    cat = _cat(h)
    return asyncio.run(compact(cat, Tiers.for_store(cat.store), REG, ENTITIES, kind,
                               work_dir=work, at_ms=at_ms, budget=budget))


def restore_rows(h: History, point: Point, out: Path, *, snapshots: bool = True
                 ) -> tuple[Any, dict[str, dict[str, tuple[Any, ...]]]]:
    cat = _cat(h)

    async def go() -> Any:
        plan = await make_plan(cat, REG, ENTITIES, point, use_snapshots=snapshots)
        rep = await execute_restore(cat, REG, plan, f"sqlite://{out}")
        return plan, rep

    plan, rep = asyncio.run(go())
    assert all(r.ok for r in rep.results)
    lay = layouts()
    return plan, {e: sqlite_rows(out, lay[e]) for e in ENTITIES}


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("chist"), events=4000, seed=5)


def test_chain_restores_equal_segments_and_oracle(history: History, tmp_path: Path) -> None:
    ts = sorted(e.ts_ms for e in history.events)
    t1, t2, t3, t4 = (ts[len(ts) * i // 5] for i in (1, 2, 3, 4))
    full = run_compact(history, "full", tmp_path / "w", at_ms=t1)
    inc = run_compact(history, "incremental", tmp_path / "w", at_ms=t2)
    diff = run_compact(history, "differential", tmp_path / "w", at_ms=t3)
    inc2 = run_compact(history, "incremental", tmp_path / "w", at_ms=t4)
    assert inc.manifest.parent == full.manifest.id
    assert diff.manifest.parent == full.manifest.id
    assert inc2.manifest.parent == diff.manifest.id
    oracle = Oracle(history)
    lay = layouts()
    rng = random.Random(3)
    points: list[Point] = [AtTime(t) for t in (t1, t2, t3, t4)]
    points += [AtTime(rng.randrange(t1, ts[-1])) for _ in range(4)] + [Latest()]
    for i, point in enumerate(points):
        plan, got = restore_rows(history, point, tmp_path / f"c{i}.db")
        _, want = restore_rows(history, point, tmp_path / f"s{i}.db", snapshots=False)
        assert got == want
        for e in ENTITIES:
            assert got[e] == canonical_rows(lay[e], oracle.state(e, plan.at_ms))
    # at t4 the cheapest chain is full -> differential -> incremental
    plan, _ = restore_rows(history, AtTime(t4), tmp_path / "x.db")
    assert [m.id for m in plan.snapshots] == [full.manifest.id, diff.manifest.id,
                                              inc2.manifest.id]
    assert all(p.snapshot_cut == inc2.manifest.cut[(p.topic, p.partition)]
               for p in plan.partitions)


def test_full_digest_is_the_state_digest(history: History, tmp_path: Path) -> None:
    ts = sorted(e.ts_ms for e in history.events)
    t = ts[len(ts) // 2]
    rep = run_compact(history, "full", tmp_path / "w", at_ms=t, budget=50)
    assert rep.runs > 0  # small budget: sorted runs were spilled and merged
    plan, _ = restore_rows(history, AtTime(t), tmp_path / "a.db", snapshots=False)
    cat = _cat(history)
    r = asyncio.run(execute_restore(cat, REG, plan, f"sqlite://{tmp_path / 'b.db'}"))
    by_entity = {x.entity: str(x.expected) for x in r.results}
    for f in rep.manifest.files:
        assert f.digest == by_entity[f.entity]
        path = history.store_root / "snapshots" / rep.manifest.id / f.name
        with SnapshotFileReader(path) as sr:
            n, _ = sr.verify()
            assert n == f.entries
            keys = [e[0] for e in sr]
            assert keys == sorted(keys)


def test_incremental_needs_a_parent(tmp_path: Path) -> None:
    h = build_history(tmp_path / "h", events=300, seed=1)
    with pytest.raises(CompactionError, match="run `replicator compact --kind full` first"):
        run_compact(h, "incremental", tmp_path / "w")
    run_compact(h, "full", tmp_path / "w")
    with pytest.raises(CompactionError, match="nothing new since snapshot"):
        run_compact(h, "incremental", tmp_path / "w")


def test_point_lookup_reads_the_key_index(history: History, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``get --at`` (a restore of a few keys) finds each key's block through the snapshot's
    sparse index: scanning the file's blocks is made to fail, and the answer still equals
    the oracle's."""
    from replicator.restore.replay import replay
    from replicator.restore.runner import local_paths, snapshot_paths

    ts = sorted(e.ts_ms for e in history.events)
    t = ts[-1]
    run_compact(history, "full", tmp_path / "w", at_ms=t)
    cat = _cat(history)
    tiers = Tiers.for_store(cat.store)
    plan = asyncio.run(make_plan(cat, REG, ENTITIES, AtTime(t), ["participant"], tiers=tiers))
    assert plan.snapshots and not any(p.reads for p in plan.partitions)
    paths = asyncio.run(local_paths(cat, plan))
    snaps = asyncio.run(snapshot_paths(tiers, plan))

    def no_scan(self: SnapshotFileReader) -> Any:
        raise AssertionError("a point look-up must not scan the snapshot's blocks")

    monkeypatch.setattr(SnapshotFileReader, "block_payloads", no_scan)
    want = Oracle(history).state("participant", t)
    for key in [*sorted(want)[:3], "prt_absent"]:
        state = replay(plan, lambda s: paths[s.name], keys={key},
                       snapshot_opener=lambda m, n: snaps[(m.id, n)])
        change = state["participant"].get(key)
        if key in want:
            assert change is not None and change[4] is not None
            assert orjson.loads(change[4])["data"] == want[key]
        else:
            assert change is None or change[4] is None
