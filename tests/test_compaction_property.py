"""Property (hypothesis, stateful): whatever sequence of compactions (full, differential,
incremental, archive at increasing times) and retention runs (random ``now`` and policies)
happens, every point of the restorable window restores exactly the oracle's state -- via the
cheapest snapshot chain, and via the segments alone as long as retention has not trimmed
them -- and every snapshot still listed restores its own point.

One synthetic history is built per module; each example works on its own copy of its store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from replicator import naming
from replicator.catalog import Catalog
from replicator.errors import CompactionError, PointNotRestorableError
from replicator.restore import planner as restore_planner
from replicator.restore.planner import RestorePlan
from replicator.restore.point import AtTime, Latest, Point
from replicator.restore.runner import execute_restore, load_catalog, make_plan
from replicator.retention import (
    DAY_MS,
    Policy,
    RetentionPlan,
    apply_retention,
    load_trimmed,
    plan_retention,
)
from replicator.snapshot.file import SnapshotFileReader
from replicator.snapshot.manifest import FULL_KINDS, Manifest, chain_of
from replicator.snapshot.tiers import Tiers
from tests.restore_history import (
    ENTITIES,
    History,
    Oracle,
    build_history,
    canonical_rows,
    layouts,
    sqlite_rows,
)
from tests.test_compaction import REG, _cat, restore_rows, run_compact

LAY = layouts()
KINDS = ["full", "differential", "incremental", "archive"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("prop"), events=1500, seed=21, partitions=3,
                         per_segment=50)


def copy_history(h: History, root: Path) -> History:
    shutil.copytree(h.store_root, root / "store")
    return dataclasses.replace(h, store_root=root / "store")


def oracle_rows(oracle: Oracle, at_ms: int) -> dict[str, dict[str, tuple[object, ...]]]:
    return {e: canonical_rows(LAY[e], oracle.state(e, at_ms)) for e in ENTITIES}


def snapshots(h: History, tier: str | None = None) -> list[Manifest]:
    cat = _cat(h)
    return asyncio.run(Tiers.for_store(cat.store).list(tier=tier))


def latest_plan(h: History) -> RestorePlan:
    return asyncio.run(make_plan(_cat(h), REG, ENTITIES, Latest()))


def run_retention(h: History, policy: Policy, now_ms: int) -> tuple[RetentionPlan, list[str]]:
    cat = _cat(h)
    tiers = Tiers.for_store(cat.store)

    async def go() -> tuple[RetentionPlan, list[str]]:
        segs, _ = await load_catalog(cat)
        plan = plan_retention(segs, await tiers.list(), topics=ENTITIES, policy=policy,
                              now_ms=now_ms, trimmed=await load_trimmed(cat.store))
        done = await apply_retention(tiers, plan)
        return plan, [a.name for a in done]

    return asyncio.run(go())


def trimmed(h: History) -> dict[tuple[str, int], int]:
    return asyncio.run(load_trimmed(_cat(h).store))


def segment_names(h: History) -> set[str]:
    return {str(p.relative_to(h.store_root)) for p in (h.store_root / "segments").rglob("*.seg")}


def restore_via_chain(h: History, at_ms: int, out: Path, done: RestorePlan
                      ) -> tuple[list[Manifest], dict[str, dict[str, tuple[object, ...]]]] | None:
    """Restore to ``at_ms`` from the whole chain of the newest listed snapshot that can
    serve it, whatever it costs (the planner's cost is replaced by "more links first", so
    neither the segments alone nor a shorter prefix of the chain is chosen). ``None`` when
    no snapshot serves ``at_ms`` or when that chain is the one ``done`` (an executed plan)
    restored from."""
    cat = _cat(h)
    snaps = snapshots(h)
    by_id = {m.id: m for m in snaps}
    for m in sorted(snaps, key=lambda m: (m.time_ms, m.id), reverse=True):
        links = chain_of(m.id, by_id)
        if m.time_ms > at_ms or links is None:
            continue
        with mock.patch.object(restore_planner, "base_cost", lambda b, *_: -len(b.links)):
            try:
                plan = asyncio.run(make_plan(cat, REG, ENTITIES, AtTime(at_ms),
                                             tiers=_OnlyThese(cat, links)))
            except PointNotRestorableError:
                continue  # an archive point (its segments are gone) serves only its own time
        assert [x.id for x in plan.snapshots] == [x.id for x in links]
        if [x.id for x in done.snapshots] == [x.id for x in links]:
            return None  # already restored this way
        rep = asyncio.run(execute_restore(cat, REG, plan, f"sqlite://{out}"))
        assert all(r.ok for r in rep.results)
        return links, {e: sqlite_rows(out, LAY[e]) for e in ENTITIES}
    return None


class _OnlyThese(Tiers):
    """The store's tiers, listing only the given snapshots."""

    def __init__(self, cat: Catalog, links: list[Manifest]) -> None:
        t = Tiers.for_store(cat.store)
        super().__init__(t.hot, t.archive)
        self.links = links

    async def list(self, *, tier: str | None = None) -> list[Manifest]:
        return list(self.links)


class CompactionMachine(RuleBasedStateMachine):
    template: History  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="cprop-"))
        self.h = copy_history(self.template, self.dir)
        self.work = self.dir / "work"
        self.oracle = Oracle(self.h)
        self.last_at = self.h.oldest_ms - 1  # compactions happen at increasing times
        self.n = 0
        self.log: list[str] = []

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def db(self) -> Path:
        self.n += 1
        return self.dir / f"r{self.n}.db"

    def restore_and_check(self, point: Point) -> RestorePlan:
        """Restore via the planner's choice, via the newest snapshot chain that can serve
        the point (forced, even when replaying segments would read fewer bytes) and via
        segments alone; each must equal the oracle at the plan's time."""
        plan: RestorePlan
        plan, got = restore_rows(self.h, point, self.db())
        assert plan.at_ms is not None
        want = oracle_rows(self.oracle, plan.at_ms)
        assert got == want, (point, [m.id for m in plan.snapshots], self.log)
        event("restore: planner chose "
              + ("/".join(m.kind[:4] for m in plan.snapshots) or "segments"))
        forced = restore_via_chain(self.h, plan.at_ms, self.db(), plan)
        if forced is not None:
            links, rows = forced
            event(f"restore: forced chain {'/'.join(m.kind[:4] for m in links)}")
            assert rows == want, (point, [m.id for m in links], self.log)
        if not plan.snapshots:
            return plan  # that was the restore from segments alone
        try:
            _, seg_only = restore_rows(self.h, point, self.db(), snapshots=False)
        except PointNotRestorableError:
            # only once retention removed segments may the segments alone fall short
            assert trimmed(self.h), (point, self.log)
            event("restore: segments alone fall short (trimmed)")
        else:
            assert seg_only == want, (point, self.log)
        return plan

    # -- steps -----------------------------------------------------------------------------

    @initialize(first=st.sampled_from(["full", "archive"]),
                more=st.lists(st.sampled_from(KINDS), max_size=3),
                fracs=st.lists(st.floats(0.0, 0.6), min_size=4, max_size=4, unique=True),
                check=st.floats(0.0, 1.0))
    def history_of_snapshots(self, first: str, more: list[str], fracs: list[float],
                             check: float) -> None:
        """A few snapshots in the first 60% of the history, the first a full/archive."""
        span = self.h.newest_ms - self.h.oldest_ms
        for kind, frac in zip([first, *more], sorted(fracs), strict=False):
            at = max(self.h.oldest_ms + int(span * frac), self.last_at + 1)
            self.do_compact(kind, at)
        self.check_window(check)

    def check_window(self, frac: float) -> None:
        """Restore at a point of the current window (its newest via ``latest``)."""
        w = latest_plan(self.h).window
        assert w.oldest_ms is not None and w.newest_ms == self.h.newest_ms
        if frac >= 1.0:
            plan = self.restore_and_check(Latest())
            assert plan.at_ms == w.newest_ms
            return
        t = w.oldest_ms + int((w.newest_ms - w.oldest_ms) * frac)
        plan = self.restore_and_check(AtTime(t))
        assert plan.at_ms == t

    @precondition(lambda self: self.last_at < self.h.newest_ms)
    @rule(kind=st.sampled_from(KINDS), frac=st.floats(0.0, 0.5), check=st.floats(0.0, 1.0))
    def compact(self, kind: str, frac: float, check: float) -> None:
        lo = self.last_at + 1
        self.do_compact(kind, lo + int((self.h.newest_ms - lo) * frac))
        self.check_window(check)

    def do_compact(self, kind: str, at: int) -> None:
        hot = snapshots(self.h, "hot")
        if kind == "differential":
            cands = [m for m in hot if m.kind in FULL_KINDS]
        elif kind == "incremental":
            cands = hot
        else:
            cands = []
        want_parent = max(cands, key=lambda m: (m.time_ms, m.id)) if cands else None
        self.log.append(f"{kind}@{at}")
        if kind in ("differential", "incremental") and want_parent is None:
            with pytest.raises(CompactionError, match="run `replicator compact --kind full`"):
                run_compact(self.h, kind, self.work, at_ms=at)
            return
        rep = run_compact(self.h, kind, self.work, at_ms=at)
        m = rep.manifest
        assert (m.kind, m.time_ms) == (kind, at)
        assert m.parent == (want_parent.id if want_parent else None)
        assert {f.topic for f in m.files} == set(ENTITIES)
        for f in m.files:
            with SnapshotFileReader(self.h.store_root / "snapshots" / m.id / f.name) as r:
                assert r.verify()[0] == f.entries
        for tp, cut in m.cut.items():
            assert m.start[tp] <= cut
            # the cut is the first offset stamped after the snapshot's time
            evs = [e for e in self.h.events if (e.topic, e.partition) == tp]
            assert all(e.ts_ms <= at for e in evs if e.offset < cut)
            assert all(e.ts_ms > at for e in evs if e.offset >= cut)
        self.last_at = at

    def draw_time(self, data: st.DataObject, lo: int, hi: int, label: str) -> int:
        """A time in ``[lo, hi]``: uniform, ``hi`` itself, or just after a snapshot's time
        (where retention's decisions change)."""
        near = sorted({m.time_ms + 1 for m in snapshots(self.h) if lo <= m.time_ms + 1 <= hi})
        how = data.draw(st.sampled_from(["uniform", "high", "snapshot"] if near
                                        else ["uniform", "high"]), label=label)
        if how == "uniform":
            return data.draw(st.integers(lo, hi), label=label)
        if how == "high":
            return hi
        return data.draw(st.sampled_from(near), label=label)

    @rule(data=st.data(), seg_days=st.sampled_from([0.25, 1.0, 30.0]),
          check=st.floats(0.0, 1.0))
    def retention(self, data: st.DataObject, seg_days: float, check: float) -> None:
        span = self.h.newest_ms - self.h.oldest_ms
        horizon = self.draw_time(data, self.h.oldest_ms, self.h.newest_ms + span // 10,
                                 "horizon")
        now = horizon + int(seg_days * DAY_MS)
        # a sane policy (as the config demands): segments <= archive_after <= archive_delete
        move_before = self.draw_time(data, self.h.oldest_ms - 1, horizon, "move_before")
        delete_before = self.draw_time(data, self.h.oldest_ms - 1, move_before,
                                       "delete_before")
        policy = Policy(segments_days=seg_days, archive_after_days=(now - move_before) / DAY_MS,
                        archive_delete_days=(now - delete_before) / DAY_MS)
        assert now - int(policy.archive_after_days * DAY_MS) in (move_before, move_before - 1,
                                                                  move_before + 1)
        before = {m.id: m for m in snapshots(self.h)}
        segs_before = segment_names(self.h)
        plan, done = run_retention(self.h, policy, now)
        self.log.append(f"retention(h={horizon}, seg={seg_days}, move<{move_before}, "
                        f"del<{delete_before}) anchor={plan.anchor and plan.anchor.id}")
        assert plan.horizon_ms == horizon
        assert done == [a.name for a in sorted(plan.actions, key=lambda a: (
            ("archive-snapshot", "delete-snapshot", "delete-segment",
             "delete-archive").index(a.kind)))]
        after = {m.id: m for m in snapshots(self.h)}
        anchor = plan.anchor
        for kind in sorted({a.kind for a in plan.actions}):
            event(f"retention: {kind}")
        if anchor is None:
            assert segment_names(self.h) == segs_before
            assert not any(a.kind in ("delete-segment", "delete-snapshot") for a in plan.actions)
        else:
            assert anchor.kind in FULL_KINDS and anchor.time_ms <= horizon
            # nothing the window needs is gone: the anchor and every newer hot snapshot
            assert anchor.id in after and after[anchor.id].root == "snapshots"
            for m in before.values():
                if m.root == "snapshots" and m.time_ms >= anchor.time_ms:
                    assert m.id in after, (m.id, self.log)
            for a in plan.actions:
                if a.kind == "delete-segment":
                    seg = naming.parse_segment_name(a.name)
                    assert seg.end <= anchor.cut[(seg.topic, seg.partition)], a.name
            w = latest_plan(self.h).window
            assert w.oldest_ms is not None and w.oldest_ms <= anchor.time_ms
        for a in plan.actions:
            if a.kind == "archive-snapshot":
                assert after[a.name].root == "archive" and before[a.name].time_ms < move_before
            elif a.kind in ("delete-snapshot", "delete-archive"):
                assert a.name not in after
        assert segment_names(self.h) == segs_before - {
            a.name for a in plan.actions if a.kind == "delete-segment"}
        self.check_window(check)

    @rule(data=st.data(), frac=st.floats(0.0, 1.0))
    def probe(self, data: st.DataObject, frac: float) -> None:
        """Every listed snapshot's own time is restorable (an archive point exactly); a
        point before the window is refused with a message naming the window."""
        snaps = snapshots(self.h)
        m = data.draw(st.sampled_from(snaps))
        plan = self.restore_and_check(AtTime(m.time_ms))
        assert plan.at_ms == m.time_ms
        w = latest_plan(self.h).window
        assert w.oldest_ms is not None
        points = {m.time_ms for m in snaps}  # exactly restorable
        t = self.h.oldest_ms - 5_000 + int((w.oldest_ms - self.h.oldest_ms + 5_000) * frac)
        if t < w.oldest_ms and t not in points:
            event("probe: expired point refused")
            with pytest.raises(PointNotRestorableError, match="restorable window"):
                asyncio.run(make_plan(_cat(self.h), REG, ENTITIES, AtTime(t)))

    @invariant()
    def snapshots_are_complete(self) -> None:
        """Each snapshot id is listed once (one tier) and its chain is complete."""
        snaps = snapshots(self.h)
        by_id = {m.id: m for m in snaps}
        assert len(by_id) == len(snaps), [m.id for m in snaps]
        for m in snaps:
            assert chain_of(m.id, by_id) is not None, (m.id, self.log)


def test_compaction_and_retention_keep_every_window_point_exact(template: History) -> None:
    CompactionMachine.template = template
    run_state_machine_as_test(CompactionMachine, settings=settings(
        max_examples=10, stateful_step_count=8, deadline=None, database=None,
        # no shrinking: it would take minutes; the failure message carries the step log
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_expired_point_names_the_restorable_window(template: History, tmp_path: Path) -> None:
    h = copy_history(template, tmp_path)
    ts = sorted(e.ts_ms for e in h.events)
    t1, t2 = ts[len(ts) // 4], ts[len(ts) // 2]
    old = run_compact(h, "full", tmp_path / "w", at_ms=t1).manifest
    anchor = run_compact(h, "full", tmp_path / "w", at_ms=t2).manifest
    horizon = (t2 + h.newest_ms) // 2
    now = horizon + 30 * DAY_MS
    plan, done = run_retention(h, Policy(segments_days=30, archive_after_days=90,
                                         archive_delete_days=365), now)
    assert plan.anchor is not None and plan.anchor.id == anchor.id
    assert plan.horizon_ms == horizon
    deleted = {a.name for a in plan.actions if a.kind == "delete-segment"}
    assert deleted and set(done) == deleted | {old.id}
    assert [a.kind for a in plan.actions if a.name == old.id] == ["delete-snapshot"]
    assert [m.id for m in snapshots(h)] == [anchor.id]
    assert trimmed(h) == plan.trimmed and all(
        v <= anchor.cut[tp] for tp, v in plan.trimmed.items())

    oracle = Oracle(h)
    for t in (t1, t2 - 1, h.oldest_ms):
        with pytest.raises(PointNotRestorableError, match="restorable window") as ei:
            asyncio.run(make_plan(_cat(h), REG, ENTITIES, AtTime(t)))
        assert ei.value.oldest_ms == t2
        assert ei.value.newest_ms == h.newest_ms
        with pytest.raises(PointNotRestorableError):  # segments alone: trimmed
            asyncio.run(make_plan(_cat(h), REG, ENTITIES, AtTime(t), use_snapshots=False))
    for i, t in enumerate((t2, (t2 + h.newest_ms) // 2, h.newest_ms)):
        plan_r, got = restore_rows(h, AtTime(t), tmp_path / f"r{i}.db")
        assert [m.id for m in plan_r.snapshots] == [anchor.id]
        assert got == oracle_rows(oracle, t)
        with pytest.raises(PointNotRestorableError):
            restore_rows(h, AtTime(t), tmp_path / f"s{i}.db", snapshots=False)
