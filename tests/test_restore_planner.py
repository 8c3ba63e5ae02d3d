"""The restore planner and the point parser as pure functions: hand-built catalogs, no I/O.

Each scenario builds :class:`SegmentInfo`/:class:`WatermarkInfo` lists by hand and checks the
plan (which files, which offset ranges, the resolved cut, the restorable window) or the exact
error class and message.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from replicator import naming
from replicator.compaction.planner import plan_compaction
from replicator.errors import BackupIncompleteError, BadRequestError, PointNotRestorableError
from replicator.restore.planner import (
    PartitionPlan,
    RestorePlan,
    SegmentInfo,
    WatermarkInfo,
    describe_backups,
    plan_restore,
    plan_scan,
)
from replicator.restore.point import (
    AtOffsets,
    AtTime,
    Latest,
    Point,
    format_ms,
    parse_at,
    parse_offsets,
    parse_time,
)
from replicator.snapshot.manifest import Manifest, SnapshotFile

TE = {"attendance": "attendance", "participant": "participant", "config": "config"}
T0 = 1_764_000_000_000  # a base time in ms


def seg(topic: str, part: int, start: int, end: int, *, loc: str = "store",
        records: int | None = None, min_ts: int | None = None, max_ts: int | None = None,
        wm: int | None = None, size: int = 1000) -> SegmentInfo:
    """A segment with one record per offset and timestamps T0 + offset*1000 by default."""
    n = end - start if records is None else records
    lo = T0 + start * 1000 if min_ts is None else min_ts
    hi = T0 + (end - 1) * 1000 if max_ts is None else max_ts
    name = (f"segments/{topic}/{part:06d}/{start:020d}-{end:020d}.seg" if loc == "store"
            else f"/spool/{topic}/{part}/{start:020d}.sealed")
    return SegmentInfo(name=name, location=loc, topic=topic, partition=part, start=start,
                       end=end, records=n, min_ts=lo, max_ts=hi,
                       watermark_ms=hi if wm is None else wm, bytes=size)


def wmk(topic: str, part: int, stored_end: int | None, wm: int) -> WatermarkInfo:
    return WatermarkInfo(topic, part, stored_end, wm)


def plan(segs: list[SegmentInfo], wms: list[WatermarkInfo] | None = None,
         point: Point | None = None, entities: list[str] | None = None,
         te: dict[str, str] | None = None) -> RestorePlan:
    return plan_restore(segs, wms or [], topic_entities=te or TE,
                        point=point if point is not None else Latest(), entities=entities)


def pp(p: RestorePlan, topic: str, part: int) -> PartitionPlan:
    found = [x for x in p.partitions if (x.topic, x.partition) == (topic, part)]
    assert len(found) == 1, f"{topic}:{part} not exactly once in the plan"
    return found[0]


def reads(p: PartitionPlan) -> list[tuple[str, int, int]]:
    return [(r.segment.location, r.from_offset, r.to_offset) for r in p.reads]


def one_topic(segs: list[SegmentInfo], wms: list[WatermarkInfo] | None = None,
              point: Point | None = None) -> RestorePlan:
    return plan(segs, wms, point, entities=["config"])


# -- chains ---------------------------------------------------------------------------------


def test_contiguous_segments_chain_in_offset_order() -> None:
    segs = [seg("config", 0, 20, 30), seg("config", 0, 0, 10), seg("config", 0, 10, 20)]
    p = one_topic(segs)
    part = pp(p, "config", 0)
    assert reads(part) == [("store", 0, 10), ("store", 10, 20), ("store", 20, 30)]
    assert (part.first, part.covered_end) == (0, 30)
    assert p.at_ms == T0 + 29_000 == part.cut_ms and part.cut_offset is None
    assert p.files == 3 and p.events_estimate == 30 and p.bytes == 3000
    assert p.holes == () and p.entities == ("config",)


def test_store_preferred_over_spool_for_the_same_range() -> None:
    segs = [seg("config", 0, 0, 10, loc="spool"), seg("config", 0, 0, 10),
            seg("config", 0, 10, 20, loc="spool")]
    part = pp(one_topic(segs), "config", 0)
    assert reads(part) == [("store", 0, 10), ("spool", 10, 20)]
    # the order of the input does not matter
    part2 = pp(one_topic(list(reversed(segs))), "config", 0)
    assert reads(part2) == reads(part)


def test_overlap_takes_the_segment_reaching_furthest_and_reads_only_the_new_part() -> None:
    # a spool file that reaches further than the store's wins; the next store file
    # overlapping it is read only from where the chain is
    segs = [seg("config", 0, 0, 10), seg("config", 0, 0, 15, loc="spool"),
            seg("config", 0, 12, 25)]
    part = pp(one_topic(segs), "config", 0)
    assert reads(part) == [("spool", 0, 15), ("store", 15, 25)]
    assert part.covered_end == 25


def test_first_offset_above_zero_is_where_the_chain_starts() -> None:
    part = pp(one_topic([seg("config", 0, 500, 510), seg("config", 0, 510, 520)]), "config", 0)
    assert (part.first, part.covered_end) == (500, 520)
    assert reads(part)[0] == ("store", 500, 510)


# -- holes ----------------------------------------------------------------------------------


def _holey() -> list[SegmentInfo]:
    # config:0 has [0,10) [10,20) then a missing [20,30) then [30,40)
    return [seg("config", 0, 0, 10), seg("config", 0, 10, 20), seg("config", 0, 30, 40),
            seg("config", 1, 0, 40)]


def test_hole_limits_the_window_and_latest_is_refused() -> None:
    with pytest.raises(BackupIncompleteError, match=r"config:0: offsets \[20, 30\) are missing"):
        one_topic(_holey())
    rows = describe_backups(_holey(), [], topic_entities=TE)
    cfg = next(r for r in rows if r.entity == "config")
    assert cfg.holes == ((("config", 0), 20, 30),)
    assert cfg.window.newest_ms == T0 + 19_000  # what config:0 covers before the hole
    assert cfg.to_json()["missing_ranges"] == [
        {"topic": "config", "partition": 0, "from": 20, "to": 30}]


def test_hole_is_fine_when_the_point_does_not_need_data_past_it() -> None:
    p = one_topic(_holey(), point=AtTime(T0 + 15_000))
    part = pp(p, "config", 0)
    assert reads(part) == [("store", 0, 10), ("store", 10, 20)]
    assert part.covered_end == 20
    assert p.holes == ((("config", 0), 20, 30),)
    # exactly the newest point before the hole is still fine
    one_topic(_holey(), point=AtTime(T0 + 19_000))
    # offsets up to the hole are fine too
    p2 = one_topic(_holey(), point=AtOffsets({("config", 0): 20, ("config", 1): 40}))
    assert reads(pp(p2, "config", 0)) == [("store", 0, 10), ("store", 10, 20)]


def test_hole_is_an_error_when_the_point_needs_data_past_it() -> None:
    with pytest.raises(BackupIncompleteError, match=r"\[20, 30\) are missing"):
        one_topic(_holey(), point=AtTime(T0 + 19_001))
    with pytest.raises(BackupIncompleteError, match=r"offset 21 is past it"):
        one_topic(_holey(), point=AtOffsets({("config", 0): 21, ("config", 1): 40}))


# -- watermarks and the window --------------------------------------------------------------


def test_idle_partition_with_only_a_watermark_object() -> None:
    segs = [seg("config", 0, 0, 10, wm=T0 + 50_000)]
    wms = [wmk("config", 0, 10, T0 + 60_000), wmk("config", 1, None, T0 + 55_000)]
    p = one_topic(segs, wms)
    # newest = min(config:0 via its watermark object 60 s, idle config:1 at 55 s)
    assert p.at_ms == T0 + 55_000 and p.window.newest_ms == T0 + 55_000
    idle = pp(p, "config", 1)
    assert idle.reads == () and (idle.first, idle.covered_end) == (0, 0)
    assert idle.newest_ms == T0 + 55_000
    assert pp(p, "config", 0).newest_ms == T0 + 60_000
    # an idle partition takes part in an offsets restore with end 0, and nothing more
    p2 = one_topic(segs, wms, point=AtOffsets({("config", 0): 10, ("config", 1): 0}))
    assert pp(p2, "config", 1).reads == ()
    with pytest.raises(BadRequestError, match=r"offset 1 for config:1 is beyond what is stored"):
        one_topic(segs, wms, point=AtOffsets({("config", 0): 10, ("config", 1): 1}))


def test_watermark_object_ignored_when_it_claims_more_than_the_chain_holds() -> None:
    # the store's watermark object says 20 offsets are stored, but only [0,10) is here:
    # its (newer) watermark must not extend the window
    segs = [seg("config", 0, 0, 10, wm=T0 + 9_000)]
    p = one_topic(segs, [wmk("config", 0, 20, T0 + 99_000)])
    assert p.window.newest_ms == T0 + 9_000
    # an older watermark object never lowers what the segments prove
    p2 = one_topic(segs, [wmk("config", 0, 10, T0 + 1_000)])
    assert p2.window.newest_ms == T0 + 9_000


def test_newest_is_the_minimum_over_partitions() -> None:
    segs = [seg("config", 0, 0, 10, wm=T0 + 30_000), seg("config", 1, 0, 5, wm=T0 + 7_000),
            seg("config", 2, 0, 20, wm=T0 + 40_000)]
    p = one_topic(segs)
    assert p.at_ms == T0 + 7_000
    with pytest.raises(PointNotRestorableError, match=r"limited by config:1") as e:
        one_topic(segs, point=AtTime(T0 + 7_001))
    assert e.value.newest_ms == T0 + 7_000
    assert format_ms(T0 + 7_000) in str(e.value)


def test_a_partition_without_any_watermark_makes_nothing_restorable() -> None:
    segs = [seg("config", 0, 0, 10), seg("config", 1, 0, 10, wm=0)]
    with pytest.raises(PointNotRestorableError, match="no point is restorable yet") as e:
        one_topic(segs)
    assert e.value.newest_ms is None
    # an offsets restore needs no watermark
    one_topic(segs, point=AtOffsets({("config", 0): 10, ("config", 1): 10}))


def test_window_edges_exactly() -> None:
    segs = [seg("config", 0, 0, 10, wm=T0 + 20_000), seg("config", 1, 5, 8, wm=T0 + 25_000)]
    oldest, newest = T0, T0 + 20_000
    for ok in (oldest, newest):
        assert one_topic(segs, point=AtTime(ok)).at_ms == ok
    with pytest.raises(PointNotRestorableError, match="before the oldest retained data") as e1:
        one_topic(segs, point=AtTime(oldest - 1))
    assert (e1.value.oldest_ms, e1.value.newest_ms) == (oldest, newest)
    assert f"restorable window: {format_ms(oldest)} .. {format_ms(newest)}" in str(e1.value)
    with pytest.raises(PointNotRestorableError, match="after the newest restorable time") as e2:
        one_topic(segs, point=AtTime(newest + 1))
    assert format_ms(newest) in str(e2.value)


def test_time_cut_skips_segments_entirely_after_the_point() -> None:
    segs = [seg("config", 0, 0, 10), seg("config", 0, 10, 20), seg("config", 0, 20, 30)]
    t = T0 + 12_000  # inside the second segment
    p = one_topic(segs, point=AtTime(t))
    part = pp(p, "config", 0)
    assert reads(part) == [("store", 0, 10), ("store", 10, 20)]
    assert part.cut_ms == t and p.at_ms == t and part.cut_offset is None
    assert p.to_json()["partitions"][0]["cut_time"] == format_ms(t)
    # exactly on the first record of the third segment: it is read
    assert len(pp(one_topic(segs, point=AtTime(T0 + 20_000)), "config", 0).reads) == 3
    # one ms before it: not read
    assert len(pp(one_topic(segs, point=AtTime(T0 + 19_999)), "config", 0).reads) == 2


def test_empty_segments_are_never_read_but_carry_the_chain() -> None:
    # a segment of only transaction markers (0 records) between two others
    segs = [seg("config", 0, 0, 10), seg("config", 0, 10, 12, records=0, min_ts=0, max_ts=0,
                                           wm=T0 + 9_500),
            seg("config", 0, 12, 20)]
    p = one_topic(segs)
    assert reads(pp(p, "config", 0)) == [("store", 0, 10), ("store", 12, 20)]
    assert p.window.oldest_ms == T0  # the empty segment's min_ts 0 is not "oldest"


# -- offsets --------------------------------------------------------------------------------


def _three() -> list[SegmentInfo]:
    return [s for p in range(3) for s in (seg("attendance", p, 0, 10),
                                          seg("attendance", p, 10, 20))]


def test_offsets_cut_is_exclusive_and_trims_reads() -> None:
    ends = {("attendance", 0): 15, ("attendance", 1): 10, ("attendance", 2): 0}
    p = plan(_three(), point=AtOffsets(ends), entities=["attendance"])
    assert p.at_ms is None
    assert reads(pp(p, "attendance", 0)) == [("store", 0, 10), ("store", 10, 15)]
    assert reads(pp(p, "attendance", 1)) == [("store", 0, 10)]
    assert reads(pp(p, "attendance", 2)) == []
    assert pp(p, "attendance", 0).cut_offset == 15 and pp(p, "attendance", 0).cut_ms is None
    # the end of what is stored is fine
    full = {("attendance", i): 20 for i in range(3)}
    p2 = plan(_three(), point=AtOffsets(full), entities=["attendance"])
    assert reads(pp(p2, "attendance", 2)) == [("store", 0, 10), ("store", 10, 20)]


def test_offsets_select_the_topics_they_name() -> None:
    segs = [*_three(), seg("config", 0, 0, 5)]
    p = plan(segs, point=AtOffsets({("config", 0): 3}))
    assert p.entities == ("config",) and [x.topic for x in p.partitions] == ["config"]
    assert reads(p.partitions[0]) == [("store", 0, 3)]


def test_offsets_refusals() -> None:
    segs = _three()
    with pytest.raises(BadRequestError, match=r"must name every partition.*attendance:2"):
        plan(segs, point=AtOffsets({("attendance", 0): 1, ("attendance", 1): 1}))
    with pytest.raises(BadRequestError, match="unknown topic 'nope' in --offsets"):
        plan(segs, point=AtOffsets({("nope", 0): 1}))
    with pytest.raises(BadRequestError, match=r"no backup of partition\(s\) attendance:7"):
        plan(segs, point=AtOffsets({("attendance", p): 1 for p in (0, 1, 2, 7)}))
    with pytest.raises(BadRequestError,
                       match=r"offset 21 for attendance:1 is beyond what is stored "
                             r"\(covered \[0, 20\)\)"):
        plan(segs, point=AtOffsets({("attendance", 0): 1, ("attendance", 1): 21,
                                    ("attendance", 2): 1}))
    with pytest.raises(BadRequestError, match="not among the selected entities"):
        plan(segs, point=AtOffsets({("attendance", p): 1 for p in range(3)}),
             entities=["config"])


def test_offsets_before_the_oldest_retained() -> None:
    segs = [seg("config", 0, 100, 110)]
    with pytest.raises(PointNotRestorableError,
                       match=r"offset 50 for config:0 is before the oldest retained data "
                             r"\(first stored offset 100\)"):
        one_topic(segs, point=AtOffsets({("config", 0): 50}))
    assert pp(one_topic(segs, point=AtOffsets({("config", 0): 100})), "config", 0).reads == ()


# -- no backups, entities -------------------------------------------------------------------


def test_no_backups_at_all() -> None:
    with pytest.raises(PointNotRestorableError, match="no backups at all") as e:
        plan([], [])
    assert (e.value.oldest_ms, e.value.newest_ms) == (None, None)
    with pytest.raises(PointNotRestorableError, match="no backups at all"):
        plan([], [], point=AtTime(T0))
    rows = describe_backups([], [], topic_entities=TE)
    assert [r.entity for r in rows] == ["attendance", "config", "participant"]
    assert all(r.window.oldest_ms is None and r.window.newest_ms is None and r.segments == 0
               for r in rows)
    # backups of another entity only: still none for the one asked for
    with pytest.raises(PointNotRestorableError, match="no backups at all for participant"):
        plan([seg("config", 0, 0, 5)], [], entities=["participant"])


def test_entity_filter_and_unknown_entity() -> None:
    segs = [seg("attendance", 0, 0, 10, wm=T0 + 5_000),  # lags behind
            seg("participant", 0, 0, 10, wm=T0 + 50_000),
            seg("participant", 1, 0, 10, wm=T0 + 60_000)]
    p = plan(segs, entities=["participant"])
    assert p.entities == ("participant",)
    assert {x.topic for x in p.partitions} == {"participant"}
    assert p.at_ms == T0 + 50_000  # the lagging attendance partition does not limit it
    both = plan(segs, entities=["participant", "attendance"])
    assert both.at_ms == T0 + 5_000 and both.entities == ("attendance", "participant")
    assert plan(segs).at_ms == T0 + 5_000  # default: every entity
    with pytest.raises(BadRequestError, match="unknown entity 'nope'; known: attendance, config"):
        plan(segs, entities=["nope"])


def test_topics_not_in_the_mapping_are_ignored() -> None:
    segs = [seg("config", 0, 0, 10), seg("other", 0, 0, 99, wm=1)]
    assert [x.topic for x in one_topic(segs).partitions] == ["config"]


def test_dry_run_json_shape() -> None:
    segs = [seg("config", 0, 0, 10, size=4096), seg("config", 0, 10, 20, size=4096)]
    doc = one_topic(segs, point=AtTime(T0 + 10_000)).to_json()
    assert doc["at"] == format_ms(T0 + 10_000) and doc["at_ms"] == T0 + 10_000
    assert doc["window"] == {"oldest": format_ms(T0), "newest": format_ms(T0 + 19_000)}
    assert doc["files"] == 2 and doc["bytes"] == 8192 and doc["events_estimate"] == 20
    part = doc["partitions"][0]
    assert part["covered"] == [0, 20] and [f["from"] for f in part["files"]] == [0, 10]


# -- describe_backups / plan_scan -----------------------------------------------------------


def test_describe_backups_per_entity() -> None:
    segs = [seg("attendance", 0, 0, 10, size=100), seg("attendance", 0, 10, 20, size=200),
            seg("attendance", 0, 0, 10, loc="spool", size=999),  # duplicate: not counted
            seg("attendance", 1, 0, 4, size=50, wm=T0 + 2_000),
            seg("config", 0, 0, 3)]
    wms = [wmk("participant", 0, None, T0 + 1_000)]
    rows = {r.entity: r for r in describe_backups(segs, wms, topic_entities=TE)}
    att = rows["attendance"]
    assert (att.partitions, att.segments, att.events, att.bytes) == (2, 3, 24, 350)
    assert att.window.oldest_ms == T0 and att.window.newest_ms == T0 + 2_000
    assert att.holes == ()
    part = rows["participant"]
    assert part.partitions == 1 and part.segments == 0 and part.window.oldest_ms is None
    assert part.window.newest_ms == T0 + 1_000
    js = att.to_json()
    assert js["oldest_restorable"] == format_ms(T0)
    assert js["newest_restorable"] == format_ms(T0 + 2_000)


def test_plan_scan_filters_by_time_and_needs_no_window() -> None:
    segs = [seg("config", 0, 0, 10), seg("config", 0, 10, 20), seg("config", 0, 20, 30),
            seg("config", 1, 0, 10, wm=0)]  # no watermark: a restore would refuse
    everything = plan_scan(segs, [], topic_entities=TE, entity="config")
    assert [len(p.reads) for p in everything.partitions] == [3, 1]
    mid = plan_scan(segs, [], topic_entities=TE, entity="config",
                    from_ms=T0 + 12_000, to_ms=T0 + 21_000)
    assert reads(mid.partitions[0]) == [("store", 10, 20), ("store", 20, 30)]
    assert reads(mid.partitions[1]) == []  # config:1 ends at T0 + 9 s
    with pytest.raises(BadRequestError, match="unknown entity"):
        plan_scan(segs, [], topic_entities=TE, entity="nope")


# -- point parsing --------------------------------------------------------------------------


def _ms(y: int, mo: int, d: int, h: int, mi: int, s: int, us: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, us, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(("text", "want"), [
    ("2026-11-26T10:42:17Z", _ms(2026, 11, 26, 10, 42, 17)),
    ("2026-11-26t10:42:17z", _ms(2026, 11, 26, 10, 42, 17)),
    ("2026-11-26 10:42:17Z", _ms(2026, 11, 26, 10, 42, 17)),
    ("2026-11-26T10:42:17.250+01:00", _ms(2026, 11, 26, 9, 42, 17, us=250_000)),
    ("2026-11-26T10:42:17-05:30", _ms(2026, 11, 26, 16, 12, 17)),
    ("2026-11-26T10:42:17.5Z", _ms(2026, 11, 26, 10, 42, 17) + 500),
    # sub-millisecond digits are truncated, never rounded up
    ("2026-11-26T10:42:17.123999Z", _ms(2026, 11, 26, 10, 42, 17) + 123),
    ("2026-11-26T10:42:17.999999999Z", _ms(2026, 11, 26, 10, 42, 17) + 999),
    ("  2026-11-26T10:42:17Z  ", _ms(2026, 11, 26, 10, 42, 17)),
    ("1969-12-31T23:59:59.500Z", -500),
    ("@1764153737000", 1_764_153_737_000),
    ("@0", 0),
])
def test_parse_time_accepted(text: str, want: int) -> None:
    assert parse_time(text) == want


@pytest.mark.parametrize(("text", "delta_ms"), [
    ("-15m", 15 * 60_000), ("-2h", 2 * 3_600_000), ("-1h30m", 90 * 60_000),
    ("-45s", 45_000), ("-7d", 7 * 86_400_000), ("-1w", 604_800_000),
])
def test_parse_time_relative(text: str, delta_ms: int) -> None:
    assert parse_time(text, now_ms=T0) == T0 - delta_ms


@pytest.mark.parametrize("text", [
    "2026-11-26T10:42:17", "2026-11-26T10:42", "2026-11-26 10:42:17.250",
])
def test_parse_time_naive_is_refused_with_a_hint(text: str) -> None:
    with pytest.raises(BadRequestError, match="no time zone: add Z for UTC") as e:
        parse_time(text)
    assert "accepted: RFC 3339" in str(e.value)


@pytest.mark.parametrize("text", [
    "", "yesterday", "2026-11-26", "2026-13-01T00:00:00Z", "2026-11-26T25:00:00Z",
    "26/11/2026 10:42", "15m", "-15", "-15x", "-", "@", "@-5", "@12.5", "@abc",
    "2026-11-26T10:42:17+0100", "2026-11-26T10:42:17.Z", "latest",
    "@\u00b2", "-\u00b2m",  # superscript two is a "digit" to str.isdigit, not to int()
])
def test_parse_time_refused(text: str) -> None:
    with pytest.raises(BadRequestError, match=r"malformed time .*accepted: RFC 3339"):
        parse_time(text, now_ms=T0)


def test_parse_at() -> None:
    for text in ("latest", "LATEST", " Latest "):
        assert parse_at(text) == Latest()
    assert parse_at("@5") == AtTime(5)
    assert parse_at("-1m", now_ms=T0) == AtTime(T0 - 60_000)
    with pytest.raises(BadRequestError, match="malformed time"):
        parse_at("now")


def test_parse_offsets_accepted() -> None:
    assert parse_offsets("attendance:0:1500, attendance:1:0,config:2:7,") == AtOffsets({
        ("attendance", 0): 1500, ("attendance", 1): 0, ("config", 2): 7})
    assert parse_offsets("a:b:3:4") == AtOffsets({("a:b", 3): 4})  # a topic may hold ':'


@pytest.mark.parametrize(("text", "message"), [
    ("attendance:0", "malformed offset 'attendance:0'"),
    ("attendance:x:1", "malformed offset"),
    ("attendance:0:-1", "malformed offset"),
    (":0:1", "malformed offset"),
    ("attendance:0:1.5", "malformed offset"),
    ("attendance:0:\u00b2", "malformed offset"),
    ("attendance:0:1,attendance:0:2", "given twice"),
    ("", "--offsets is empty"),
    (" , ,", "--offsets is empty"),
])
def test_parse_offsets_refused(text: str, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        parse_offsets(text)


def test_format_ms() -> None:
    assert format_ms(T0 + 7) == "2025-11-24T16:00:00.007Z"
    assert format_ms(None) == "-"
    assert parse_time(format_ms(T0 + 7)) == T0 + 7


def _snap(kind: str, t: int, cut: dict[tuple[str, int], int], topics: list[str],
          root: str = "snapshots", parent: str | None = None, token: str = "aaaaaa"
          ) -> Manifest:
    return Manifest(id=naming.snapshot_id(t, kind, token), kind=kind, time_ms=t, created_ms=0,
                    parent=parent, cut=cut, start={}, root=root,
                    files=tuple(SnapshotFile(x, x, f"{x}.snap", 10, 1, 1, 0, "1:00")
                                for x in topics))


def test_a_topic_added_after_a_trimmed_full_snapshot() -> None:
    """The full predates topic B (no file, no cut for it) and A was trimmed below its cut:
    restoring everything uses the full for A and B's segments from their start; a full
    compaction can be planned on it too."""
    full = _snap("full", T0 + 99_000, {("A", 0): 100}, ["A"])
    segs = [seg("A", 0, 100, 200), seg("B", 0, 0, 50)]
    wms = [wmk("A", 0, 200, T0 + 199_000), wmk("B", 0, 50, T0 + 199_000)]
    te = {"A": "A", "B": "B"}
    p = plan_restore(segs, wms, topic_entities=te, point=Latest(), snapshots=[full],
                     trimmed={("A", 0): 100})
    assert [m.id for m in p.snapshots] == [full.id]
    assert {(x.topic, x.snapshot_cut, tuple(r.from_offset for r in x.reads))
            for x in p.partitions} == {("A", 100, (100,)), ("B", 0, (0,))}
    cp = plan_compaction("full", segs, wms, [full], topic_entities=te, trimmed={("A", 0): 100})
    assert cp.layers == (full,) and cp.starts == {("A", 0): 100, ("B", 0): 0}


def test_an_archive_point_reads_partitions_it_does_not_know() -> None:
    """Restoring exactly an archive point whose cut lacks a partition (its first segment
    was stored after the archive) still reads that partition's records up to T."""
    ta = T0 + 99_000
    arch = _snap("archive", ta, {("A", 0): 100}, ["A"], root="archive")
    segs = [seg("A", 0, 150, 300), seg("A", 1, 0, 20, min_ts=T0, max_ts=T0 + 10_000)]
    p = plan_restore(segs, [wmk("A", 1, 20, T0 + 300_000)], topic_entities={"A": "A"},
                     point=AtTime(ta), snapshots=[arch], trimmed={("A", 0): 150})
    assert [m.id for m in p.snapshots] == [arch.id]
    parts = {x.partition: x for x in p.partitions}
    assert parts[0].reads == () and parts[0].snapshot_cut == 100
    assert [(r.from_offset, r.to_offset) for r in parts[1].reads] == [(0, 20)]
