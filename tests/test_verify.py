"""``replicator verify`` on synthetic stores: a clean store is ok; a flipped byte in a segment
or a snapshot file is corrupt (exit 4); a deleted segment or snapshot file is missing (exit
6) with the range named; a gap below the retention point is retention (exit 0); ``--deep``
catches a snapshot whose digest does not match its segments; runs are incremental (new files
plus a rotating sample) and still catch a file corrupted after it was verified; the state is
kept per store."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from replicator import naming
from replicator.catalog import Catalog
from replicator.ops.verify import STATE_FILE, VerifyReport, load_state, verify_store
from replicator.retention import save_trimmed
from replicator.schemas import SchemaRegistry
from replicator.segment.reader import SegmentReader
from replicator.segment.writer import ActiveSegment, BlockBuilder
from replicator.snapshot.file import SnapshotFileReader
from replicator.storage.local import LocalStore
from tests.restore_history import History, build_history
from tests.test_compaction import run_compact

REPO = Path(__file__).resolve().parent.parent
REG = SchemaRegistry.load()
T = "attendance"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> History:
    """A store with segments of 9 partitions and a full -> incremental chain."""
    h = build_history(tmp_path_factory.mktemp("vbase") / "data", events=2000, seed=5,
                      per_segment=120)
    ts = sorted(e.ts_ms for e in h.events)
    work = tmp_path_factory.mktemp("vwork")
    run_compact(h, "full", work, at_ms=ts[len(ts) // 3])
    run_compact(h, "incremental", work, at_ms=ts[2 * len(ts) // 3])
    return h


@pytest.fixture
def data(base: History, tmp_path: Path) -> Path:
    """A private copy of the base store's data directory (``<data>/store``)."""
    dst = tmp_path / "data"
    shutil.copytree(base.store_root.parent, dst)
    return dst


def verify(data_dir: Path, *, state: Path | None = None, **kw: Any) -> VerifyReport:
    kw.setdefault("sample_fraction", 0.05)
    kw.setdefault("sample_min", 8)
    if kw.get("deep"):
        kw.setdefault("registry", REG)
    return asyncio.run(verify_store(LocalStore(root=data_dir / "store"),
                                    state_path=state or data_dir / STATE_FILE, **kw))


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "REPLICATOR_INGEST_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "replicator", "verify", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
                          check=False)


def segments(data_dir: Path, topic: str = T, partition: int = 0) -> list[Path]:
    return sorted((data_dir / "store" / naming.segments_prefix(topic, partition)).glob("*.seg"))


def name_of(data_dir: Path, path: Path) -> str:
    return path.relative_to(data_dir / "store").as_posix()


def snapshots(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "store" / naming.SNAPSHOTS_ROOT).iterdir())


def flip_segment_byte(path: Path) -> int:
    """Flip one byte inside the first data block's payload; return its position."""
    with SegmentReader(path, expect_sealed=True) as r:
        block = next(b for b in r.blocks if b.records)
        pos = block.position + 64 + 7
    _flip(path, pos)
    return block.position


def flip_snapshot_byte(path: Path) -> int:
    with SnapshotFileReader(path) as r:
        pos = r.blocks[0].position
    _flip(path, pos + 24 + 7)
    return pos


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))


def checked_names(data_dir: Path, report: VerifyReport, state: Path | None = None) -> set[str]:
    """The files the run read (recorded with the run's number)."""
    stores, _ = load_state(state or data_dir / STATE_FILE)
    st = stores[report.store]
    return {n for n, s in st.files.items() if s.run == report.run}


def append_segment(data_dir: Path, topic: str, partition: int, n: int) -> str:
    """Store one more segment of ``n`` upserts continuing ``topic[partition]``."""
    last = segments(data_dir, topic, partition)[-1]
    start = naming.parse_segment_name(name_of(data_dir, last)).end
    tmp = data_dir / f"new-{topic}-{partition}-{start}.seg"
    seg = ActiveSegment.create(tmp, topic=topic, partition=partition, base_offset=start)
    b = BlockBuilder(start)
    for i in range(n):
        value = orjson.dumps({"entity": topic, "op": "delete", "key": f"k{i}",
                              "ts": "2025-11-24T16:00:00Z", "schema_version": 1})
        b.append(start + i, 1_764_100_000_000 + i, 0, f"k{i}".encode(), value, [])
    blk = b.take(1_764_100_000_000 + n)
    assert blk is not None
    seg.write(blk)
    seg.sync()
    seg.seal()
    name = naming.segment_name(topic, partition, start, start + n)
    LocalStore(root=data_dir / "store").put_file_sync(name, tmp)
    tmp.unlink()
    return name


# -- a clean store ----------------------------------------------------------------------------


def test_clean_store_is_ok(data: Path) -> None:
    out = cli(data, "--json")
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["status"] == "ok" and [p for p in doc["problems"] if p["kind"] != "gap-ok"] == []
    segs = doc["checks"]["segments"]
    assert segs["listed"] == segs["checked"] == len(list((data / "store").rglob("*.seg")))
    assert doc["checks"]["snapshot_files"]["checked"] == 6  # 2 snapshots x 3 topics
    assert doc["checks"]["manifests"] == {"listed": 2, "checked": 2, "failed": 0}
    assert doc["checks"]["continuity"]["partitions"] == 9
    assert doc["files_skipped"] == 0 and doc["bytes_read"] > 0
    human = cli(data)
    assert human.returncode == 0, human.stderr
    last = human.stdout.strip().splitlines()[-1]
    assert last.startswith("verify: ok -- ") and "0 files checked" not in last
    assert "8 files checked" in last  # the second run: the sample only


# -- corrupt ----------------------------------------------------------------------------------


def test_flipped_byte_in_a_segment_is_corrupt(data: Path) -> None:
    bad = segments(data)[1]
    pos = flip_segment_byte(bad)
    out = cli(data, "--json")
    assert out.returncode == 4, out.stdout + out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["status"] == "corrupt"
    (p,) = [p for p in doc["problems"] if p["kind"] == "corrupt"]
    assert p["name"] == name_of(data, bad) and p["position"] == pos
    assert "checksum" in p["detail"] and p["offset"] is not None
    human = cli(data)
    assert human.returncode == 4
    assert f"CORRUPT: {name_of(data, bad)} at byte {pos}" in human.stdout
    assert human.stdout.strip().splitlines()[-1].startswith("verify: CORRUPT: 1 corrupt")
    # `segments verify` (the same per-segment check) agrees
    _, problems = asyncio.run(Catalog(store=LocalStore(root=data / "store")).verify())
    assert [(x.kind, x.name, x.position) for x in problems] == [
        ("corrupt", name_of(data, bad), pos)]


def test_corrupt_snapshot_file(data: Path) -> None:
    snap = snapshots(data)[0] / "participant.snap"
    flip_snapshot_byte(snap)
    rep = verify(data)
    assert rep.status == "corrupt"
    (p,) = rep.problems
    assert p.kind == "corrupt" and p.name == name_of(data, snap)
    assert "checksum" in p.detail


def test_snapshot_digest_differing_from_its_manifest(data: Path) -> None:
    mpath = snapshots(data)[1] / naming.MANIFEST_NAME
    doc = orjson.loads(mpath.read_bytes())
    doc["files"][0]["digest"] = "1:" + "0" * 32
    mpath.write_bytes(orjson.dumps(doc))
    rep = verify(data)
    assert rep.status == "corrupt"
    assert [p.kind for p in rep.problems] == ["digest-mismatch"]


# -- missing ----------------------------------------------------------------------------------


def test_deleted_middle_segment_is_missing_with_the_gap_named(data: Path) -> None:
    gone = segments(data)[2]
    s = naming.parse_segment_name(name_of(data, gone))
    gone.unlink()
    out = cli(data, "--json")
    assert out.returncode == 6, out.stdout + out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["status"] == "missing"
    (p,) = [p for p in doc["problems"] if p["kind"] == "missing"]
    assert (p["topic"], p["partition"], p["offset"], p["end"]) == (T, 0, s.start, s.end)
    assert f"[{s.start}, {s.end})" in p["detail"]
    human = cli(data)
    assert human.returncode == 6
    assert f"MISSING: {name_of(data, segments(data)[2])} [{s.start}, {s.end})" in human.stdout


def test_missing_snapshot_file(data: Path) -> None:
    gone = snapshots(data)[1] / "config.snap"
    gone.unlink()
    rep = verify(data)
    assert rep.status == "missing"
    assert [(p.kind, p.name) for p in rep.problems] == [("missing", name_of(data, gone))]


def test_corrupt_wins_over_missing(data: Path) -> None:
    flip_segment_byte(segments(data)[0])
    segments(data)[3].unlink()
    assert verify(data).status == "corrupt"
    assert cli(data).returncode == 4


def test_gap_below_the_retention_point_is_retention(data: Path) -> None:
    segs = segments(data)
    s0, s1 = (naming.parse_segment_name(name_of(data, p)) for p in segs[:2])
    store = LocalStore(root=data / "store")
    # retention trimmed up to s1.end but was interrupted after removing s1 only
    asyncio.run(save_trimmed(store, {(T, 0): s1.end}))
    segs[1].unlink()
    out = cli(data, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["status"] == "ok"
    gaps = [p for p in doc["problems"] if p["kind"] == "gap-ok"]
    assert [(g["topic"], g["partition"], g["offset"], g["end"], g["reason"]) for g in gaps] == [
        (T, 0, s0.end, s1.end, "retention")]
    # the same hole above the retention point is a missing file
    asyncio.run(save_trimmed(store, {(T, 0): s0.end}))
    assert cli(data).returncode == 6
    # and when retention removed the first segments too, the leading gap is retention
    asyncio.run(save_trimmed(store, {(T, 0): s1.end}))
    segs[0].unlink()
    rep = verify(data)
    assert rep.status == "ok"
    assert [(f.kind, f.end, f.reason) for f in rep.findings] == [("gap-ok", s1.end, "retention")]


# -- deep -------------------------------------------------------------------------------------


def test_deep_rebuilds_every_snapshot_once(base: History, data: Path, tmp_path: Path) -> None:
    h = History(store_root=data / "store")
    ts = sorted(e.ts_ms for e in base.events)
    run_compact(h, "differential", tmp_path / "w", at_ms=ts[3 * len(ts) // 4])
    run_compact(h, "full", tmp_path / "w", at_ms=ts[4 * len(ts) // 5])
    rep = verify(data, deep=True)
    assert rep.status == "ok", rep.problems
    assert rep.checks["deep"] == {"snapshots": 4, "already_verified": 0, "rebuilt": 4, "ok": 4,
                                  "mismatch": 0, "skipped": 0}
    hows = [how for _sid, how, _r in rep.deep_rebuilt]
    first_full = rep.deep_rebuilt[0][0]
    assert hows == ["segments", "segments", "segments", f"snapshot {first_full} + segments"]
    again = verify(data, deep=True)
    assert again.checks["deep"]["already_verified"] == 4 and again.checks["deep"]["rebuilt"] == 0
    redo = verify(data, deep=True, full=True)
    assert redo.checks["deep"]["rebuilt"] == 4


def test_deep_detects_a_snapshot_that_does_not_match_its_segments(data: Path,
                                                                   tmp_path: Path) -> None:
    # a snapshot from another history (same topics and partitions, fewer events): every
    # checksum and its footer digest are right, only its content is not this store's
    other = build_history(tmp_path / "other", events=900, seed=11, per_segment=120)
    foreign = run_compact(other, "full", tmp_path / "w").manifest
    shutil.copytree(other.store_root / naming.SNAPSHOTS_ROOT / foreign.id,
                    data / "store" / naming.SNAPSHOTS_ROOT / foreign.id)
    shallow = verify(data)
    assert shallow.status == "ok"  # checksums alone cannot tell
    out = cli(data, "--deep", "--json")
    assert out.returncode == 4, out.stdout + out.stderr
    doc = orjson.loads(out.stdout)
    bad = [p for p in doc["problems"] if p["kind"] == "digest-mismatch"]
    assert bad and {p["name"] for p in bad} == {naming.snapshot_manifest_name(foreign.id)}
    assert any("digest" in p["detail"] for p in bad)
    results = {d["snapshot"]: d["result"] for d in doc["deep_rebuilt"]}
    assert results[foreign.id] == "digest-mismatch"
    assert sum(r == "ok" for r in results.values()) == 2  # the store's own chain
    # a mismatch is not remembered away: the next deep run rebuilds it again
    again = verify(data, deep=True)
    assert again.checks["deep"]["mismatch"] == 1 and again.status == "corrupt"


def test_deep_after_retention_builds_on_the_verified_full(tmp_path: Path) -> None:
    h = build_history(tmp_path / "data", events=2000, seed=8, per_segment=30)
    data = h.store_root.parent
    ts = sorted(e.ts_ms for e in h.events)
    f1 = run_compact(h, "full", tmp_path / "w", at_ms=ts[len(ts) // 3]).manifest
    inc = run_compact(h, "incremental", tmp_path / "w", at_ms=ts[len(ts) // 2]).manifest
    assert verify(data, deep=True).checks["deep"]["ok"] == 2
    # retention removes attendance[0]'s segments before f1's cut (f1 is the window's base)
    cut = f1.cut[(T, 0)]
    old = [p for p in segments(data) if naming.parse_segment_name(name_of(data, p)).end <= cut]
    assert old
    trim = naming.parse_segment_name(name_of(data, old[-1])).end
    asyncio.run(save_trimmed(LocalStore(root=data / "store"), {(T, 0): trim}))
    for p in old:
        p.unlink()
    f2 = run_compact(h, "full", tmp_path / "w").manifest
    rep = verify(data, deep=True)
    assert rep.status == "ok", rep.problems
    assert rep.deep_rebuilt == [(f2.id, f"snapshot {f1.id} + segments", "ok")]
    assert [(f.kind, f.reason) for f in rep.findings] == [("gap-ok", "retention")]
    # redoing everything: f1 cannot be rebuilt any more (its history is gone) but stays the
    # base it was verified to be; the incremental and f2 are rebuilt again
    redo = verify(data, deep=True, full=True)
    assert redo.status == "ok"
    assert [sid for sid, _why in redo.deep_skipped] == [f1.id]
    assert "removed by retention" in redo.deep_skipped[0][1]
    assert [(sid, r) for sid, _how, r in redo.deep_rebuilt] == [(inc.id, "ok"), (f2.id, "ok")]


# -- incremental ------------------------------------------------------------------------------


def test_second_run_reads_new_files_and_a_sample(data: Path, tmp_path: Path) -> None:
    first = verify(data)
    everything = first.files_checked
    assert everything == first.checks["segments"]["listed"] + 6 and first.files_skipped == 0
    second = verify(data)
    sampled = checked_names(data, second)
    k = max(8, math.ceil(0.05 * everything))
    assert second.files_checked == k and second.files_skipped == everything - k
    assert second.rotation_runs == math.ceil(everything / k)
    # new: one segment and one incremental snapshot (3 files)
    new_seg = append_segment(data, "config", 1, 5)
    h = History(store_root=data / "store")
    inc = run_compact(h, "incremental", tmp_path / "w").manifest
    third = verify(data)
    read = checked_names(data, third)
    new = {new_seg} | {naming.snapshot_file_name(inc.id, t) for t in ("attendance",
                                                                       "participant", "config")}
    assert new <= read and len(read - new) == k
    assert not (read - new) & sampled  # the sample moved on
    assert third.status == "ok"


def test_file_corrupted_after_verification_is_caught_by_the_rotation(data: Path) -> None:
    kw = {"sample_fraction": 0.0, "sample_min": 4}
    verify(data, **kw)
    stores, _ = load_state(data / STATE_FILE)
    names = sorted(stores[next(iter(stores))].files)
    victim = sorted(segments(data, "participant", 2))[-1]
    vname = name_of(data, victim)
    flip_segment_byte(victim)
    # --full catches it at once (on a copy of the state)
    shutil.copy(data / STATE_FILE, data / "copy.json")
    assert verify(data, state=data / "copy.json", full=True, **kw).status == "corrupt"
    # the rotation reads files in name order (all verified in one run): the victim's turn
    turn = names.index(vname) // 4 + 1
    runs = math.ceil(len(names) / 4)
    assert turn <= runs
    for i in range(1, turn + 1):
        rep = verify(data, **kw)
        assert rep.rotation_runs == runs
        assert rep.status == ("corrupt" if i == turn else "ok"), i
    assert [p.name for p in rep.problems] == [vname]
    # from now on it is read every run until it verifies, whatever the sample
    for _ in range(2):
        rep = verify(data, **kw)
        assert rep.status == "corrupt" and vname in checked_names(data, rep)
    flip_segment_byte(victim)  # repaired (the same flip undone)
    assert verify(data, **kw).status == "ok"
    stores, _ = load_state(data / STATE_FILE)
    assert stores[next(iter(stores))].files[vname].result == "ok"


def test_state_is_kept_per_store(base: History, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(base.store_root.parent, a)
    shutil.copytree(base.store_root.parent, b)
    shared = tmp_path / "state" / STATE_FILE
    ra = verify(a, state=shared)
    rb = verify(b, state=shared)  # same names, other store: all new again
    assert ra.files_checked == rb.files_checked and rb.files_skipped == 0
    stores, note = load_state(shared)
    assert note is None and set(stores) == {ra.store, rb.store} and ra.store != rb.store
    assert verify(a, state=shared).files_skipped > 0  # a's own state is still there


def test_unreadable_state_file_means_everything_is_checked(data: Path) -> None:
    verify(data)
    (data / STATE_FILE).write_text("{not json")
    rep = verify(data)
    assert rep.files_skipped == 0 and rep.notes and "unreadable" in rep.notes[0]
    stores, note = load_state(data / STATE_FILE)
    assert note is None and stores  # rewritten whole


# -- other stores -----------------------------------------------------------------------------


def test_archive_tier_in_another_store(data: Path, tmp_path: Path) -> None:
    arch = run_compact(History(store_root=data / "store"), "archive", tmp_path / "w").manifest
    # moved to the archive store, as retention does after retention.archive_after_days
    shutil.copytree(data / "store" / naming.SNAPSHOTS_ROOT / arch.id,
                    tmp_path / "cold" / naming.ARCHIVE_ROOT / arch.id)
    shutil.rmtree(data / "store" / naming.SNAPSHOTS_ROOT / arch.id)
    cold = LocalStore(root=tmp_path / "cold")
    rep = verify(data, archive=cold, deep=True)
    assert rep.status == "ok", rep.problems
    assert rep.archive == cold.url and rep.checks["snapshot_files"]["checked"] == 9
    assert (arch.id, "ok") in [(sid, r) for sid, _how, r in rep.deep_rebuilt]
    stores, _ = load_state(data / STATE_FILE)
    assert set(stores) == {rep.store, cold.url}
    assert set(stores[cold.url].files) == {naming.snapshot_file_name(arch.id, t,
                                                                     naming.ARCHIVE_ROOT)
                                           for t in ("attendance", "participant", "config")}
    bad = tmp_path / "cold" / naming.snapshot_file_name(arch.id, "config", naming.ARCHIVE_ROOT)
    flip_snapshot_byte(bad)
    rep = verify(data, archive=cold, full=True)
    assert [(p.kind, p.name) for p in rep.problems] == [
        ("corrupt", naming.snapshot_file_name(arch.id, "config", naming.ARCHIVE_ROOT))]


async def test_s3_store(base: History, s3_bucket: str, tmp_path: Path) -> None:
    from replicator.storage.base import open_store
    from replicator.storage.mirror import mirror

    s3 = open_store(s3_bucket)
    try:
        await mirror(LocalStore(root=base.store_root), s3)
        state = tmp_path / STATE_FILE
        rep = await verify_store(s3, state_path=state, deep=True, registry=REG)
        assert rep.status == "ok", rep.problems
        n = rep.checks["segments"]["listed"]
        assert rep.files_checked == n + 6 and rep.checks["deep"]["ok"] == 2
        assert rep.bytes_read >= sum(p.stat().st_size for p in
                                     base.store_root.rglob("*") if p.suffix == ".seg")
        again = await verify_store(s3, state_path=state)
        assert again.files_checked == 8 and again.status == "ok"
        name = naming.segment_name(T, 1, 0, naming.parse_segment_name(name_of(
            base.store_root.parent, segments(base.store_root.parent, T, 1)[0])).end)
        body = bytearray(await s3.get_bytes(name))
        body[len(body) // 3] ^= 0x01
        await s3.put_bytes(name, bytes(body), create_only=False)
        bad = await verify_store(s3, state_path=state, full=True)
        assert bad.status == "corrupt" and [p.name for p in bad.problems] == [name]
    finally:
        await s3.close()


def test_empty_and_absent_stores(tmp_path: Path) -> None:
    (tmp_path / "empty" / "store").mkdir(parents=True)
    rep = verify(tmp_path / "empty")
    assert rep.status == "ok" and rep.files_checked == 0
    assert any("nothing to verify" in n for n in rep.notes)
    out = cli(tmp_path / "absent")
    assert out.returncode == 5 and "does not exist" in out.stderr
