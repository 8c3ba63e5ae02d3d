"""Retention and the archive tier, scenario by scenario: nothing removed without a base
older than the horizon; segments before the base's cut removed and recorded; an expired
point refused with the window named; archive snapshots moved after ``archive_after_days``
(and still restorable at their exact point), deleted after ``archive_delete_days``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from replicator import naming
from replicator.errors import PointNotRestorableError
from replicator.restore.point import AtTime, Latest
from replicator.restore.runner import load_catalog
from replicator.retention import (
    DAY_MS,
    Policy,
    RetentionPlan,
    apply_retention,
    load_trimmed,
    plan_retention,
)
from replicator.snapshot.tiers import Tiers
from tests.restore_history import ENTITIES, History, Oracle, build_history, canonical_rows, layouts
from tests.test_compaction import _cat, restore_rows, run_compact


def retention(h: History, now_ms: int, policy: Policy, apply: bool = True) -> RetentionPlan:
    cat = _cat(h)
    tiers = Tiers.for_store(cat.store)

    async def go() -> RetentionPlan:
        segs, _ = await load_catalog(cat)
        plan = plan_retention(segs, await tiers.list(), topics=ENTITIES, policy=policy,
                              now_ms=now_ms, trimmed=await load_trimmed(cat.store))
        if apply:
            await apply_retention(tiers, plan)
        return plan

    return asyncio.run(go())


def listing(h: History) -> list[tuple[str, str]]:
    cat = _cat(h)
    tiers = Tiers.for_store(cat.store)
    return [(tiers.tier_of(m), m.kind) for m in asyncio.run(tiers.list())]


def test_window_and_archive_tier(tmp_path: Path) -> None:
    h = build_history(tmp_path / "h", events=2000, seed=9)
    ts = sorted(e.ts_ms for e in h.events)
    t_arch, t_full, t_inc = ts[len(ts) // 4], ts[len(ts) // 2], ts[3 * len(ts) // 4]
    arch = run_compact(h, "archive", tmp_path / "w", at_ms=t_arch)
    full = run_compact(h, "full", tmp_path / "w", at_ms=t_full)
    run_compact(h, "incremental", tmp_path / "w", at_ms=t_inc)
    day = DAY_MS
    # horizon before every snapshot: nothing may go
    plan = retention(h, t_arch - 1 + int(30 * day), Policy(), apply=False)
    assert plan.anchor is None and not plan.actions
    assert "every segment and snapshot is kept" in plan.note
    # horizon just after the full: the full is the window's base; segments before its cut go
    now = t_full + int(30 * day) + 1
    plan = retention(h, now, Policy())
    assert plan.anchor is not None and plan.anchor.id == full.manifest.id
    removed = [a for a in plan.actions if a.kind == "delete-segment"]
    assert removed and all(a.name.startswith("segments/") for a in removed)
    trimmed = asyncio.run(load_trimmed(_cat(h).store))
    assert trimmed and all(v <= full.manifest.cut[tp] for tp, v in trimmed.items())
    # points from the base on still equal the oracle; an older one is refused by name
    oracle = Oracle(h)
    lay = layouts()
    for i, point in enumerate([AtTime(t_full), AtTime((t_full + t_inc) // 2), Latest()]):
        plan_r, got = restore_rows(h, point, tmp_path / f"r{i}.db")
        assert plan_r.snapshots
        for e in ENTITIES:
            assert got[e] == canonical_rows(lay[e], oracle.state(e, plan_r.at_ms))
    with pytest.raises(PointNotRestorableError, match="restorable window") as exc:
        restore_rows(h, AtTime(t_full - 1), tmp_path / "old.db")
    assert "archive points" in str(exc.value)  # the archive snapshot is still an exact point
    # the archive's own point restores exactly its state (segments from its cut are gone)
    plan_a, got = restore_rows(h, AtTime(t_arch), tmp_path / "a.db")
    assert [m.id for m in plan_a.snapshots] == [arch.manifest.id]
    for e in ENTITIES:
        assert got[e] == canonical_rows(lay[e], oracle.state(e, t_arch))
    # after archive_after_days the archive snapshot moves to the archive tier
    assert ("hot", "archive") in listing(h)
    retention(h, t_arch + int(91 * day), Policy())
    assert ("archive", "archive") in listing(h) and ("hot", "archive") not in listing(h)
    assert (h.store_root / naming.ARCHIVE_ROOT / arch.manifest.id / "manifest.json").exists()
    assert not (h.store_root / naming.SNAPSHOTS_ROOT / arch.manifest.id).exists() or not list(
        (h.store_root / naming.SNAPSHOTS_ROOT / arch.manifest.id).iterdir())
    plan_a, got = restore_rows(h, AtTime(t_arch), tmp_path / "a2.db")
    assert plan_a.snapshots[0].root == naming.ARCHIVE_ROOT
    assert got["attendance"] == canonical_rows(lay["attendance"],
                                               oracle.state("attendance", t_arch))
    # and after archive_delete_days it is gone
    retention(h, t_arch + int(366 * day), Policy())
    assert ("archive", "archive") not in listing(h)
    with pytest.raises(PointNotRestorableError, match="restorable window"):
        restore_rows(h, AtTime(t_arch), tmp_path / "gone.db")
