"""The pure half of ``replicator verify``, scenario by scenario (no I/O): which files a run
reads, how the rotating sample covers every old file, how gaps get their reason, which
snapshots ``--deep`` rebuilds and from what."""

from __future__ import annotations

import math

import pytest

from replicator import naming
from replicator.ops.verify import (
    Candidate,
    Check,
    DeepRecord,
    FileState,
    Finding,
    Outcome,
    StoreState,
    VerifyPlan,
    changed_note,
    continuity,
    cover,
    deep_due,
    deep_source,
    manifest_findings,
    next_state,
    plan_verify,
    sample_size,
    segment_info,
)
from replicator.snapshot.manifest import Manifest, SnapshotFile

T = "attendance"


def seg(p: int, start: int, end: int) -> str:
    return naming.segment_name(T, p, start, end)


def cands(n: int, size: int = 100) -> list[Candidate]:
    return [Candidate(seg(0, i * 10, i * 10 + 10), size, "segment") for i in range(n)]


def run(files: list[Candidate], state: StoreState, *, fraction: float = 0.1, minimum: int = 2,
        full: bool = False, bad: set[str] | None = None, now: int = 1000
        ) -> tuple[VerifyPlan, StoreState]:
    """One run: plan, every check finds ``bad`` files corrupt, the state moves on."""
    plan = plan_verify(files, state, sample_fraction=fraction, sample_min=minimum, full=full)
    outs = [Outcome(c, Finding("corrupt", c.name, "bad") if c.name in (bad or set()) else None,
                    "cafe0000") for c in plan.checks]
    return plan, next_state(state, plan, outs, now_ms=now)


def reasons(plan: VerifyPlan) -> dict[str, str]:
    return {c.name: c.reason for c in plan.checks}


# -- planning ---------------------------------------------------------------------------------


def test_first_run_reads_everything_as_new() -> None:
    files = cands(5)
    plan, state = run(files, StoreState())
    assert reasons(plan) == {f.name: "new" for f in files}
    assert plan.skipped == () and plan.old_files == 0 and plan.rotation_runs == 0
    assert state.run == 1 and set(state.files) == {f.name for f in files}
    assert all(s.result == "ok" and s.run == 1 and s.checksum == "cafe0000"
               for s in state.files.values())


def test_second_run_reads_new_files_and_a_sample_of_old_ones() -> None:
    files = cands(50)
    _, state = run(files, StoreState())
    new = [Candidate(seg(0, 500, 510), 100, "segment"), Candidate(seg(0, 510, 520), 100,
                                                                  "segment")]
    plan, _ = run(files + new, state, fraction=0.1, minimum=2)
    r = reasons(plan)
    assert {n for n, why in r.items() if why == "new"} == {c.name for c in new}
    sampled = [n for n, why in r.items() if why == "sample"]
    assert len(sampled) == 5 == plan.sample  # ceil(0.1 * 50)
    assert sampled == sorted(f.name for f in files)[:5]  # all verified in run 1: by name
    assert len(plan.skipped) == 45 and plan.old_files == 50 and plan.rotation_runs == 10


@pytest.mark.parametrize(("old", "fraction", "minimum", "want"), [
    (0, 0.05, 8, 0), (5, 0.05, 8, 5), (100, 0.05, 8, 8), (1000, 0.05, 8, 50),
    (1001, 0.05, 8, 51), (10, 0.0, 0, 0), (10, 1.0, 0, 10)])
def test_sample_size(old: int, fraction: float, minimum: int, want: int) -> None:
    assert sample_size(old, fraction, minimum) == want


def test_rotation_rereads_every_old_file_within_ceil_n_over_k_runs() -> None:
    files = cands(24)
    _, state = run(files, StoreState())
    k = sample_size(24, 0.1, 2)
    assert k == 3
    seen: set[str] = set()
    for i in range(8):  # ceil(24 / 3)
        plan, state = run(files, state, now=2000 + i)
        assert plan.rotation_runs == 8
        sampled = {c.name for c in plan.checks}
        assert len(sampled) == 3 and not sampled & seen  # never the same file twice
        seen |= sampled
    assert seen == {f.name for f in files}
    # the next round starts over with the file read longest ago
    plan, _ = run(files, state)
    assert [c.name for c in plan.checks] == [f.name for f in files[:3]]


def test_rotation_with_a_remainder() -> None:
    files = cands(23)
    _, state = run(files, StoreState())
    seen: set[str] = set()
    for i in range(math.ceil(23 / 3)):
        plan, state = run(files, state, now=2000 + i)
        seen |= {c.name for c in plan.checks}
    assert seen == {f.name for f in files}


def test_same_clock_runs_still_rotate() -> None:
    """The run number orders the sample, so runs within one millisecond still rotate."""
    files = cands(10)
    _, state = run(files, StoreState(), now=5)
    first, state = run(files, state, fraction=0.0, minimum=3, now=5)
    second, _ = run(files, state, fraction=0.0, minimum=3, now=5)
    assert not {c.name for c in first.checks} & {c.name for c in second.checks}


def test_failed_file_stays_failed_until_it_verifies() -> None:
    files = cands(30)
    bad = files[17].name
    _, state = run(files, StoreState(), bad={bad})
    assert state.files[bad].result == "corrupt"
    for _ in range(5):  # read every run, whatever the sample
        plan, state = run(files, state, fraction=0.0, minimum=1, bad={bad})
        assert reasons(plan)[bad] == "failed"
        assert state.files[bad].result == "corrupt"
    plan, state = run(files, state, fraction=0.0, minimum=1)  # repaired
    assert reasons(plan)[bad] == "failed" and state.files[bad].result == "ok"
    plan, _ = run(files, state, fraction=0.0, minimum=1)
    assert bad not in reasons(plan)


def test_size_change_is_read_again() -> None:
    files = cands(10)
    _, state = run(files, StoreState())
    grown = [Candidate(f.name, f.size + (7 if i == 3 else 0), f.kind) for i, f in enumerate(files)]
    plan, state = run(grown, state, fraction=0.0, minimum=0)
    assert reasons(plan) == {files[3].name: "changed"}
    assert state.files[files[3].name].size == 107


def test_full_reads_everything_and_dropped_files_are_forgotten() -> None:
    files = cands(10)
    _, state = run(files, StoreState())
    plan, state = run(files[2:], state, full=True)
    assert set(reasons(plan).values()) == {"full"} and len(plan.checks) == 8
    assert plan.dropped == tuple(sorted(f.name for f in files[:2]))
    assert set(state.files) == {f.name for f in files[2:]}


def test_no_sample_configured_means_no_rotation() -> None:
    files = cands(4)
    _, state = run(files, StoreState())
    plan, _ = run(files, state, fraction=0.0, minimum=0)
    assert plan.checks == () and plan.rotation_runs is None


def test_vanished_file_is_forgotten_and_other_state_kept() -> None:
    files = cands(3)
    _, state = run(files, StoreState())
    state = StoreState(state.run, state.files, {"sid": DeepRecord("ok", 1, ("snapshots",))})
    plan = plan_verify(files, state, sample_fraction=1.0, sample_min=0)
    outs = [Outcome(plan.checks[0], vanished=True)] + [Outcome(c) for c in plan.checks[1:]]
    new = next_state(state, plan, outs, now_ms=9)
    assert files[0].name not in new.files and new.run == 2 and "sid" in new.deep


def test_changed_note_only_for_a_rewritten_file_that_verified_before() -> None:
    c = Check("x", 10, "segment", "sample")
    ok = FileState(10, "aaaaaaaa", 1, 1, "ok")
    assert changed_note(c, ok, "aaaaaaaa") is None
    assert changed_note(c, None, "bbbbbbbb") is None
    assert changed_note(c, FileState(10, "aaaaaaaa", 1, 1, "corrupt"), "bbbbbbbb") is None
    note = changed_note(c, ok, "bbbbbbbb")
    assert note is not None and note.kind == "changed" and not note.is_problem
    assert "aaaaaaaa" in note.detail and "bbbbbbbb" in note.detail


# -- continuity -------------------------------------------------------------------------------


def kinds(findings: list[Finding]) -> list[tuple[str, int | None, int | None, str | None]]:
    return [(f.kind, f.offset, f.end, f.reason) for f in findings]


def test_contiguous_segments_from_zero_have_no_findings() -> None:
    names = [seg(0, 0, 10), seg(0, 10, 25), seg(1, 0, 7)]
    ends = {(T, 0): ("wm0", 25), (T, 1): ("wm1", 7)}
    assert continuity(names, ends, {}) == []


def test_hole_between_segments_is_missing_with_its_range() -> None:
    f = continuity([seg(0, 0, 10), seg(0, 20, 30)], {}, {})
    assert kinds(f) == [("missing", 10, 20, None)]
    assert f[0].name == seg(0, 20, 30) and f[0].is_problem and "[10, 20)" in f[0].detail


def test_hole_below_the_retention_point_is_retention() -> None:
    # retention trimmed up to 20 but was interrupted: segment [0, 10) is still there
    f = continuity([seg(0, 0, 10), seg(0, 20, 30)], {}, {(T, 0): 20})
    assert kinds(f) == [("gap-ok", 10, 20, "retention")]
    assert not f[0].is_problem


def test_hole_straddling_the_retention_point_is_split() -> None:
    f = continuity([seg(0, 0, 10), seg(0, 30, 40)], {}, {(T, 0): 20})
    assert kinds(f) == [("gap-ok", 10, 20, "retention"), ("missing", 20, 30, None)]


def test_missing_newest_segments_from_the_watermark() -> None:
    f = continuity([seg(0, 0, 10)], {(T, 0): ("watermarks/x.json", 30)}, {})
    assert kinds(f) == [("missing", 10, 30, None)]
    assert f[0].name == "watermarks/x.json"


def test_partition_wholly_trimmed_by_retention_is_ok() -> None:
    f = continuity([], {(T, 0): ("wm", 30)}, {(T, 0): 30})
    assert kinds(f) == [("gap-ok", None, 30, "retention")]
    f = continuity([], {(T, 0): ("wm", 40)}, {(T, 0): 30})
    assert kinds(f) == [("gap-ok", None, 30, "retention"), ("missing", 30, 40, None)]


def test_leading_gap_reasons() -> None:
    # retention removed everything below the first segment: ok
    assert kinds(continuity([seg(0, 30, 40)], {}, {(T, 0): 30})) == [
        ("gap-ok", None, 30, "retention")]
    # retention stopped at 20 but the first segment starts at 30: [20, 30) is missing
    assert kinds(continuity([seg(0, 30, 40)], {}, {(T, 0): 20})) == [("missing", 20, 30, None)]
    # a snapshot was built from offset 0: [0, 30) is missing
    assert kinds(continuity([seg(0, 30, 40)], {}, {}, {(T, 0): 0})) == [("missing", 0, 30, None)]
    # nothing says anything was stored below 30: ingest began at Kafka's log start
    assert kinds(continuity([seg(0, 30, 40)], {}, {})) == [("gap-ok", None, 30, "kafka")]
    assert continuity([seg(0, 0, 40)], {}, {}, {(T, 0): 0}) == []


def test_overlap_is_a_note() -> None:
    f = continuity([seg(0, 0, 10), seg(0, 5, 20)], {}, {})
    assert [x.kind for x in f] == ["overlap"] and not f[0].is_problem


# -- manifests --------------------------------------------------------------------------------


def manifest(kind: str, t: int, parent: str | None, cut: dict[tuple[str, int], int],
             start: dict[tuple[str, int], int], *, nbytes: int = 100) -> Manifest:
    sid = naming.snapshot_id(t, kind, f"{t:06x}"[-6:])
    files = (SnapshotFile(T, T, T + naming.SNAPSHOT_SUFFIX, nbytes, 5, 4, 1, "4:00"),)
    return Manifest(sid, kind, t, t, parent, cut, start, files)


def test_manifest_findings() -> None:
    full = manifest("full", 1000, None, {(T, 0): 10}, {(T, 0): 0})
    inc = manifest("incremental", 2000, full.id, {(T, 0): 20}, {(T, 0): 10})
    orphan = manifest("incremental", 3000, "00000000000000000500-full-aaaaaa",
                      {(T, 0): 30}, {(T, 0): 20})

    def obj(m: Manifest, f: str) -> str:
        return naming.snapshot_dir(m.id) + f

    sizes = {obj(full, T + ".snap"): 100, obj(inc, T + ".snap"): 99}
    found, good = manifest_findings([full, inc, orphan], lambda m, n: sizes.get(n), obj)
    assert [(m.id, f.name) for m, f in good] == [(full.id, T + ".snap")]
    got = {(f.kind, f.name) for f in found}
    assert got == {("corrupt", obj(inc, T + ".snap")), ("missing", obj(orphan, T + ".snap")),
                   ("missing", naming.snapshot_manifest_name(orphan.id))}


# -- deep -------------------------------------------------------------------------------------


def test_deep_due_rebuilds_each_snapshot_once_per_identity() -> None:
    a = manifest("full", 1000, None, {(T, 0): 10}, {(T, 0): 0})
    b = manifest("incremental", 2000, a.id, {(T, 0): 20}, {(T, 0): 10})
    c = manifest("incremental", 3000, b.id, {(T, 0): 30}, {(T, 0): 20})
    ident = {a.id: ("snapshots", "1"), b.id: ("snapshots", "2"), c.id: ("snapshots", "3")}
    records = {a.id: DeepRecord("ok", 1, ("snapshots", "1")),
               b.id: DeepRecord("ok", 1, ("snapshots", "old")),
               c.id: DeepRecord("digest-mismatch", 1, ("snapshots", "3"))}
    due, done = deep_due([c, b, a], records, ident)
    assert [m.id for m in done] == [a.id]
    assert [m.id for m in due] == [b.id, c.id]  # other files since; failed: again
    due, done = deep_due([c, b, a], records, ident, redo=True)
    assert len(due) == 3 and not done


def segs(*ranges: tuple[int, int, int]) -> dict[tuple[str, int], list]:  # type: ignore[type-arg]
    out: dict[tuple[str, int], list] = {}  # type: ignore[type-arg]
    for p, a, b in ranges:
        out.setdefault((T, p), []).append(segment_info(seg(p, a, b), 100))
    return out


def test_cover() -> None:
    s = segs((0, 0, 10), (0, 10, 20), (0, 20, 30))[(T, 0)]
    reads, hole = cover(s, 5, 25)
    assert hole is None
    assert [(r.segment.start, r.from_offset, r.to_offset) for r in reads] == [
        (0, 5, 10), (10, 10, 20), (20, 20, 25)]
    assert cover(s, 10, 10) == ((), None)
    assert cover(s[:1] + s[2:], 0, 30)[1] == (10, 20)
    assert cover(s, 0, 40)[1] == (30, 40)


def test_deep_source_incremental_reads_exactly_its_range() -> None:
    full = manifest("full", 1000, None, {(T, 0): 10}, {(T, 0): 0})
    inc = manifest("incremental", 2000, full.id, {(T, 0): 25}, {(T, 0): 10})
    src = deep_source(inc, [full, inc], segs((0, 0, 10), (0, 10, 20), (0, 20, 30)), {}, set())
    assert src.skip is None and src.base is None and src.how == "segments"
    assert src.ranges == {(T, 0): (10, 25)}
    assert [(r.from_offset, r.to_offset) for r in src.reads[(T, 0)]] == [(10, 20), (20, 25)]


def test_deep_source_says_why_segments_are_not_there() -> None:
    full = manifest("full", 1000, None, {(T, 0): 10}, {(T, 0): 0})
    inc = manifest("incremental", 2000, full.id, {(T, 0): 25}, {(T, 0): 10})
    trimmed = deep_source(inc, [full, inc], segs((0, 20, 30)), {(T, 0): 20}, set())
    assert trimmed.skip is not None and "removed by retention" in trimmed.skip
    missing = deep_source(inc, [full, inc], segs((0, 0, 10), (0, 20, 30)), {}, set())
    assert missing.skip is not None and "[10, 20)" in missing.skip
    assert "a segment file is missing" in missing.skip


def test_deep_source_full_builds_on_a_verified_full_else_from_the_origin() -> None:
    a = manifest("full", 1000, None, {(T, 0): 10, (T, 1): 5}, {(T, 0): 0, (T, 1): 0})
    b = manifest("full", 2000, None, {(T, 0): 25, (T, 1): 8}, {(T, 0): 10, (T, 1): 5})
    s = segs((0, 0, 10), (0, 10, 30), (1, 0, 8))
    on_a = deep_source(b, [a, b], s, {}, {a.id})
    assert on_a.base is a and on_a.ranges == {(T, 0): (10, 25), (T, 1): (5, 8)}
    assert on_a.how == f"snapshot {a.id} + segments"
    origin = deep_source(b, [a, b], s, {}, set())  # a not verified: from the first offset
    assert origin.base is None and origin.ranges == {(T, 0): (0, 25), (T, 1): (0, 8)}
    # retention removed the beginning and no verified full to start from
    gone = deep_source(b, [a, b], segs((0, 10, 30), (1, 5, 8)), {(T, 0): 10, (T, 1): 5},
                       set())
    assert gone.skip is not None and "removed by retention" in gone.skip
    # ... but on top of the verified full it still works
    assert deep_source(b, [a, b], segs((0, 10, 30), (1, 5, 8)), {(T, 0): 10, (T, 1): 5},
                       {a.id}).skip is None
    # a later full is never a base; nor is the snapshot itself
    assert deep_source(a, [a, b], s, {}, {a.id, b.id}).base is None


def test_deep_source_full_whose_first_segment_is_missing() -> None:
    a = manifest("full", 1000, None, {(T, 0): 25}, {(T, 0): 0})
    src = deep_source(a, [a], segs((0, 10, 30)), {}, set())
    assert src.skip is not None and "begin at 10" in src.skip
