"""Torn tails and corruption: recovery of active segments, and verify of sealed ones."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from replicator import naming
from replicator.catalog import find_gaps, find_missing_tails
from replicator.errors import CorruptSegmentError
from replicator.ingest import Ingestor
from replicator.segment import format as fmt
from replicator.segment.format import BlockMeta, Record
from replicator.segment.reader import SegmentReader, recover_active
from replicator.segment.writer import ActiveSegment, BlockBuilder
from tests.helpers import (
    REPO_ROOT,
    ServiceProcess,
    assert_exactly_once,
    create_topics,
    kafka_contents,
    make_config,
    publish_demo,
    stored_records,
    unique,
    wait_for,
    write_config_toml,
)

# -- unit level: recover_active ---------------------------------------------------------------

N_BLOCKS = 6
PER_BLOCK = 25


def _write_active(path: Path, rng: random.Random) -> tuple[list[BlockMeta], list[list[Record]]]:
    """An unsealed segment of N_BLOCKS blocks (random-ish values so lz4 cannot shrink much)."""
    seg = ActiveSegment.create(path, topic="attendance", partition=1, base_offset=1000)
    builder = BlockBuilder(1000)
    metas: list[BlockMeta] = []
    per_block: list[list[Record]] = []
    off = 1000
    for _ in range(N_BLOCKS):
        recs = []
        for _ in range(PER_BLOCK):
            value = orjson.dumps({"n": off, "pad": rng.randbytes(40).hex()})
            rec = Record(off, 1_700_000_000_000 + off, 0, f"k{off}".encode(), value,
                         (("entity", b"attendance"),))
            builder.append(rec.offset, rec.timestamp, rec.timestamp_type, rec.key, rec.value,
                           rec.headers)
            recs.append(rec)
            off += 1
        off += 2  # a Kafka gap (e.g. transaction marker) inside the coverage
        builder.skip_to(off)
        blk = builder.take()
        assert blk is not None
        metas.append(seg.write(blk))
        seg.sync()
        per_block.append(recs)
    seg.close()
    assert path.stat().st_size == metas[-1].position + metas[-1].size
    return metas, per_block


def _records(path: Path) -> list[Record]:
    with SegmentReader(path) as r:
        assert not r.sealed
        r.verify()
        return list(r.iter_records())


def _flat(per_block: list[list[Record]], n: int) -> list[Record]:
    return [r for blk in per_block[:n] for r in blk]


@pytest.mark.parametrize("trial", range(12))
def test_truncated_inside_last_block(tmp_path: Path, trial: int) -> None:
    rng = random.Random(100 + trial)
    path = tmp_path / "00000000000000001000.active"
    metas, per_block = _write_active(path, rng)
    last = metas[-1]
    # anywhere from 1 byte into the block to 1 byte short of its end (header included)
    cut_at = rng.randrange(last.position + 1, last.position + last.size)
    if trial == 0:
        cut_at = last.position + fmt.BLOCK_HEADER.size - 1  # torn inside the header
    elif trial == 1:
        cut_at = last.position + last.size - 1  # one byte short
    os.truncate(path, cut_at)
    res = recover_active(path)
    assert res.header is not None and res.header.base_offset == 1000
    assert res.valid_end == last.position
    assert res.truncated_bytes == cut_at - last.position
    assert res.blocks == metas[:-1]
    assert res.blocks_after_damage == 0
    assert res.end_offset == metas[-2].end
    assert res.reason in ("short block header", "incomplete block")
    assert path.stat().st_size == last.position
    assert _records(path) == _flat(per_block, N_BLOCKS - 1)
    # the file is appendable again from the cut point, and reads back whole
    seg = ActiveSegment.reopen(res)
    builder = BlockBuilder(seg.end)
    for r in per_block[-1]:
        builder.append(r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers)
    blk = builder.take()
    assert blk is not None
    seg.write(blk)
    seg.sync()
    summary = seg.seal()
    assert summary.records == N_BLOCKS * PER_BLOCK
    with SegmentReader(path, expect_sealed=True) as r:
        r.verify()
        assert list(r.iter_records()) == _flat(per_block, N_BLOCKS)


@pytest.mark.parametrize("trial", range(16))
def test_random_bytes_in_last_block(tmp_path: Path, trial: int,
                                    caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(200 + trial)
    path = tmp_path / "00000000000000001000.active"
    metas, per_block = _write_active(path, rng)
    last = metas[-1]
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    n = rng.randrange(1, 9)
    at = rng.randrange(last.position, last.position + last.size - n + 1)
    if trial == 0:
        at = last.position  # the magic
    elif trial == 1:
        at = last.position + 4  # the stored CRC
    for i in range(at, at + n):
        data[i] ^= rng.randrange(1, 256)  # always a different byte
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="replicator.segment.reader"):
        res = recover_active(path)
    assert res.valid_end == last.position
    assert res.truncated_bytes == size - last.position
    assert res.blocks == metas[:-1]
    assert res.blocks_after_damage == 0
    assert path.stat().st_size == last.position
    assert _records(path) == _flat(per_block, N_BLOCKS - 1)
    rec = next(r for r in caplog.records if r.getMessage() == "torn tail truncated")
    assert rec.levelno == logging.WARNING
    assert (rec.path, rec.position, rec.bytes) == (str(path), last.position, size - last.position)  # type: ignore[attr-defined]


@pytest.mark.parametrize("zeros", [1, 63, 64, 65, 4096])
def test_appended_zeros_are_cut(tmp_path: Path, zeros: int) -> None:
    path = tmp_path / "00000000000000001000.active"
    metas, per_block = _write_active(path, random.Random(zeros))
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\0" * zeros)
    res = recover_active(path)
    assert res.blocks == metas
    assert res.valid_end == size and res.truncated_bytes == zeros
    assert res.reason == ("short block header" if zeros < fmt.BLOCK_HEADER.size
                          else "bad block magic")
    assert res.blocks_after_damage == 0
    assert path.stat().st_size == size
    assert _records(path) == _flat(per_block, N_BLOCKS)
    # idempotent: a second recovery finds nothing to cut
    again = recover_active(path)
    assert again.truncated_bytes == 0 and again.reason is None and again.blocks == metas


def test_no_truncate_mode_only_reports(tmp_path: Path) -> None:
    path = tmp_path / "00000000000000001000.active"
    metas, _ = _write_active(path, random.Random(9))
    os.truncate(path, metas[-1].position + 10)
    before = path.read_bytes()
    res = recover_active(path, truncate=False)
    assert res.truncated_bytes == 10 and res.valid_end == metas[-1].position
    assert path.read_bytes() == before


@pytest.mark.parametrize("victim", [0, 2, 4])
@pytest.mark.parametrize("where", ["header", "payload"])
def test_corruption_in_a_middle_block_truncates_there(
    tmp_path: Path, victim: int, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(victim * 10 + len(where))
    path = tmp_path / "00000000000000001000.active"
    metas, per_block = _write_active(path, rng)
    size = path.stat().st_size
    m = metas[victim]
    pos = m.position + (40 if where == "header" else fmt.BLOCK_HEADER.size + m.payload_len // 3)
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x5A
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="replicator.segment.reader"):
        res = recover_active(path)
    assert res.valid_end == m.position
    assert res.truncated_bytes == size - m.position
    assert res.blocks == metas[:victim]
    assert res.reason == "block checksum mismatch"
    # the intact blocks after the damage are counted: this was corruption, not a torn write
    assert res.blocks_after_damage == N_BLOCKS - victim - 1
    assert path.stat().st_size == m.position
    assert _records(path) == _flat(per_block, victim)
    assert res.end_offset == (metas[victim - 1].end if victim else 1000)
    rec = next(r for r in caplog.records
               if r.getMessage() == "active segment damaged before its tail; truncating")
    assert rec.levelno == logging.ERROR
    assert rec.valid_blocks_lost == N_BLOCKS - victim - 1  # type: ignore[attr-defined]
    assert rec.position == m.position  # type: ignore[attr-defined]


def test_header_only_damage_cases(tmp_path: Path) -> None:
    empty = tmp_path / "a.active"
    empty.write_bytes(b"")
    res = recover_active(empty)
    assert res.header is None and res.end_offset is None and res.reason == "empty file"
    # crash while writing the header: too short to hold it
    hdr = fmt.SegmentHeader(topic="t", partition=0, base_offset=5, created_ms=1).encode()
    torn = tmp_path / "b.active"
    torn.write_bytes(hdr[:10])
    res = recover_active(torn)
    assert res.header is None and res.truncated_bytes == 10
    torn.write_bytes(hdr[:-3])
    res = recover_active(torn)
    assert res.header is None and "truncated" in (res.reason or "")
    # a complete header with a bad checksum is corruption: refuse, do not delete data
    bad = bytearray(hdr + b"\0" * 100)
    bad[fmt.FILE_HEADER.size + 3] ^= 1
    broken = tmp_path / "c.active"
    broken.write_bytes(bytes(bad))
    with pytest.raises(CorruptSegmentError, match="file header checksum mismatch"):
        recover_active(broken)
    assert broken.read_bytes() == bytes(bad)
    # header only (crash right after creation): valid, covers nothing
    fresh = tmp_path / "d.active"
    fresh.write_bytes(hdr)
    res = recover_active(fresh)
    assert res.header is not None and res.blocks == [] and res.end_offset == 5
    assert res.truncated_bytes == 0


# -- service level: crash, damaged tail, restart ----------------------------------------------


def _distinct_stored(data_dir: Path, topics: list[str]) -> int:
    """Distinct (tp, offset) currently in store + spool; tolerant of files moving under us."""
    for _ in range(20):
        try:
            seen: set[tuple[str, int, int]] = set()
            for tp, recs in stored_records(data_dir, topics).items():
                seen.update((tp[0], tp[1], r.offset) for r in recs)
            return len(seen)
        except (FileNotFoundError, CorruptSegmentError, ValueError):
            continue
    return -1


def _active_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "spool").rglob(f"*{naming.ACTIVE_SUFFIX}"))


def _store_segments(data_dir: Path) -> list[str]:
    root = data_dir / "store"
    return sorted(str(p.relative_to(root)) for p in (root / "segments").rglob("*.seg"))


async def _publish_slowly(bootstrap: str, topics: dict[str, str], batches: int, per: int,
                          seed: int) -> int:
    n = 0
    for i in range(batches):
        n += await publish_demo(bootstrap, topics, per, seed=seed + i)
        await asyncio.sleep(0.4)
    return n


def _actives_hold_records(data: Path, want: int) -> bool:
    """``want`` active segments exist and each has a block with records (not only
    watermark blocks, which is what a seal right after the last batch would leave)."""
    try:
        actives = _active_files(data)
        if len(actives) != want:
            return False
        for path in actives:
            with SegmentReader(path) as r:
                if not any(b.records for b in r.blocks):
                    return False
        return True
    except (FileNotFoundError, CorruptSegmentError):
        return False


async def _until_actives_hold_records(data: Path, want: int, bootstrap: str,
                                      topics: dict[str, str], durable: object) -> int:
    """Publish a little more until every active segment holds records; return how many."""
    extra = 0
    for i in range(5):
        if _actives_hold_records(data, want):
            return extra
        extra += await publish_demo(bootstrap, topics, 20, seed=900 + i)
        total = extra
        await wait_for(lambda total=total: durable(total), 60, "extra batch durable")  # type: ignore[operator]
    assert _actives_hold_records(data, want)
    return extra


def _last_record_block(path: Path) -> tuple[BlockMeta, int, int]:
    """The last block holding records; records in it and after it; the file size."""
    with SegmentReader(path) as r:
        assert not r.sealed
        blocks = r.blocks
        size = r.file_size
    with_recs = [b for b in blocks if b.records]
    assert with_recs, f"want record blocks in the active segment: {blocks}"
    victim = with_recs[-1]
    lost = sum(b.records for b in blocks if b.position >= victim.position)
    return victim, lost, size


async def _run_until(ing: Ingestor, cond: object, timeout: float, what: str) -> None:
    task = asyncio.create_task(ing.run())
    try:
        await wait_for(lambda: cond() or task.done(), timeout, what)  # type: ignore[operator]
        if task.done():
            task.result()
    finally:
        ing.request_stop()
        await task


@pytest.mark.integration
async def test_sigkill_then_torn_tail_is_truncated_and_reconsumed(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = unique("attendance")
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    topics = {"attendance": topic, "participant": topic, "config": topic}
    data = tmp_path / "data"
    cfg = make_config(data, kafka_bootstrap, [topic], seal_bytes=64 * 1024, seal_age_s=600)
    conf = write_config_toml(tmp_path / "replicator.toml", cfg)
    svc = ServiceProcess(conf, tmp_path / "service.log")
    n1 = await publish_demo(kafka_bootstrap, topics, 3000, seed=11)
    svc.start()
    try:
        await wait_for(lambda: _distinct_stored(data, [topic]) >= n1, 120, "phase 1 durable")
        await wait_for(lambda: len(_store_segments(data)) >= 1, 60, "a sealed segment shipped")
        assert svc.alive(), (tmp_path / "service.log").read_text()[-3000:]
        n2 = await _publish_slowly(kafka_bootstrap, topics, 8, 10, seed=100)
        await wait_for(lambda: _distinct_stored(data, [topic]) >= n1 + n2, 60, "phase 2 durable")
        n2 += await _until_actives_hold_records(
            data, 1, kafka_bootstrap, topics,
            lambda extra: _distinct_stored(data, [topic]) >= n1 + n2 + extra)
    finally:
        svc.kill()  # a crash: nothing sealed, nothing flushed beyond what is on disk
    assert svc.proc is not None and svc.proc.returncode == -9
    actives = _active_files(data)
    assert len(actives) == 1, actives
    active = actives[0]
    victim, lost, _size = _last_record_block(active)
    cut_at = victim.position + victim.size // 2
    os.truncate(active, cut_at)
    shipped_before = _store_segments(data)

    cfg2 = make_config(data, kafka_bootstrap, [topic], seal_bytes=64 * 1024, seal_age_s=600)
    with caplog.at_level(logging.INFO):
        async with Ingestor(config=cfg2) as ing:
            await _run_until(ing, lambda: ing.stats.ingested >= lost, 120,
                             f"{lost} truncated records re-consumed")
            await asyncio.sleep(1.0)
        assert ing.stats.ingested == lost
    cut = [r for r in caplog.records if r.getMessage() == "torn tail truncated"]
    assert len(cut) == 1
    assert cut[0].path == str(active)  # type: ignore[attr-defined]
    assert cut[0].position == victim.position  # type: ignore[attr-defined]
    assert cut[0].bytes == cut_at - victim.position  # type: ignore[attr-defined]
    assert cut[0].reason == "incomplete block"  # type: ignore[attr-defined]
    names = _store_segments(data)
    assert set(shipped_before) <= set(names)
    # the recovered leftover was shipped ending exactly where the cut began
    assert any(naming.parse_segment_name(n).end == victim.start for n in names), names
    assert any(naming.parse_segment_name(n).start == victim.start for n in names), names
    assert find_gaps(names) == []
    assert not _active_files(data)
    expected = await kafka_contents(kafka_bootstrap, [topic])
    assert sum(len(v) for v in expected.values()) == n1 + n2
    assert assert_exactly_once(stored_records(data, [topic]), expected) == n1 + n2


@pytest.mark.integration
async def test_crash_without_seal_then_random_bytes_in_tail(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In-process crash: stop the loops, close files and the consumer, but never seal."""
    topic = unique("participant")
    await create_topics(kafka_bootstrap, [topic], partitions=2)
    topics = {"attendance": topic, "participant": topic, "config": topic}
    data = tmp_path / "data"
    cfg = make_config(data, kafka_bootstrap, [topic], seal_bytes=64 * 1024, seal_age_s=600)
    n1 = await publish_demo(kafka_bootstrap, topics, 5000, seed=21)
    ing = Ingestor(config=cfg)
    await ing.start()
    crashed = False
    try:
        task = asyncio.create_task(ing.run())
        await wait_for(lambda: ing.stats.ingested >= n1 or task.done(), 120, "phase 1")
        await wait_for(lambda: len(_store_segments(data)) >= 2, 60, "segments shipped")
        n2 = await _publish_slowly(kafka_bootstrap, topics, 8, 20, seed=200)
        await wait_for(lambda: ing.stats.ingested >= n1 + n2 or task.done(), 60, "phase 2")
        n2 += await _until_actives_hold_records(
            data, 2, kafka_bootstrap, topics,
            lambda extra: ing.stats.ingested >= n1 + n2 + extra and all(
                p.builder is not None and p.durable == p.builder.position
                for p in ing.spool.logs.values()))
        ing.request_stop()
        await task
        spool = ing.spool
        await wait_for(lambda: all(p.builder is not None and p.durable == p.builder.position
                                   for p in spool.logs.values()), 10, "last flush")
        # crash: background loops end, files and consumer close, nothing sealed or shipped
        spool._stopping = True
        spool._ship_wakeup.set()
        for t in spool._tasks:
            await t
        for plog in spool.logs.values():
            plog.close_sync()
        consumer = ing._consumer
        ing._consumer = None
        assert consumer is not None
        await consumer.stop()
        crashed = True
    finally:
        if not crashed:
            await ing.stop()
    actives = _active_files(data)
    assert len(actives) == 2, actives
    rng = random.Random(5)
    damaged: dict[Path, tuple[BlockMeta, int, int]] = {}
    for active in actives:
        victim, lost, size = _last_record_block(active)
        buf = bytearray(active.read_bytes())
        at = rng.randrange(victim.position + fmt.BLOCK_HEADER.size,
                           victim.position + victim.size - 8)
        for i in range(at, at + 8):
            buf[i] ^= rng.randrange(1, 256)
        active.write_bytes(bytes(buf))
        damaged[active] = (victim, lost, size)
    total_lost = sum(v[1] for v in damaged.values())

    cfg2 = make_config(data, kafka_bootstrap, [topic], seal_bytes=64 * 1024, seal_age_s=600)
    with caplog.at_level(logging.INFO):
        async with Ingestor(config=cfg2) as ing2:
            await _run_until(ing2, lambda: ing2.stats.ingested >= total_lost, 120,
                             "damaged records re-consumed")
            await asyncio.sleep(1.0)
        assert ing2.stats.ingested == total_lost
    msgs = {"torn tail truncated", "active segment damaged before its tail; truncating"}
    cuts = {r.path: r for r in caplog.records if r.getMessage() in msgs}  # type: ignore[attr-defined]
    assert set(cuts) == {str(p) for p in damaged}
    for path, (victim, _lost, size) in damaged.items():
        rec = cuts[str(path)]
        assert rec.position == victim.position  # type: ignore[attr-defined]
        assert rec.bytes == size - victim.position  # type: ignore[attr-defined]
        assert rec.reason == "block checksum mismatch"  # type: ignore[attr-defined]
    names = _store_segments(data)
    assert find_gaps(names) == []
    expected = await kafka_contents(kafka_bootstrap, [topic])
    assert sum(len(v) for v in expected.values()) == n1 + n2
    assert assert_exactly_once(stored_records(data, [topic]), expected) == n1 + n2


# -- sealed segments: verify names the damage ---------------------------------------------------


def _verify_cli(conf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    return subprocess.run(
        [sys.executable, "-m", "replicator", "--config", str(conf), "segments", "verify",
         *extra],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120, check=False,
    )


@pytest.fixture()
async def stored_topic(kafka_bootstrap: str, tmp_path: Path) -> tuple[Path, Path, str, int]:
    """A data dir whose store holds >= 4 sealed segments of one partition; its config file."""
    topic = unique("config")
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    topics = {"attendance": topic, "participant": topic, "config": topic}
    data = tmp_path / "data"
    n = 0
    for round_ in range(4):  # every clean stop seals: one segment per round at least
        n += await publish_demo(kafka_bootstrap, topics, 500, seed=300 + round_)
        cfg = make_config(data, kafka_bootstrap, [topic])
        async with Ingestor(config=cfg) as ing:
            await _run_until(
                ing,
                lambda ing=ing: ing.stats.ingested >= 500
                and all(p.durable_watermark_ms for p in ing.spool.logs.values()),
                120, "round ingested and watermarked")
    conf = write_config_toml(tmp_path / "verify.toml", cfg)
    return data, conf, topic, n


@pytest.mark.integration
async def test_verify_names_corrupt_sealed_segment(
    stored_topic: tuple[Path, Path, str, int],
) -> None:
    data, conf, topic, n = stored_topic
    ok = _verify_cli(conf, "--json")
    assert ok.returncode == 0, ok.stderr
    doc = orjson.loads(ok.stdout)
    assert doc["problems"] == [] and doc["records"] == n and doc["segments"] >= 4
    names = _store_segments(data)
    victim_name = names[len(names) // 2]
    path = data / "store" / victim_name
    with SegmentReader(path, expect_sealed=True) as r:
        blocks = [b for b in r.blocks if b.records]
    block = blocks[len(blocks) // 2]
    before = path.read_bytes()
    at = block.position + fmt.BLOCK_HEADER.size + block.payload_len // 2
    with path.open("r+b") as f:
        f.seek(at)
        f.write(bytes(b ^ 0xA5 for b in before[at : at + 6]))
    proc = _verify_cli(conf, "--json")
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    doc = orjson.loads(proc.stdout)
    assert doc["problems"] == [{
        "kind": "corrupt", "name": victim_name, "topic": topic, "partition": 0,
        "detail": "block checksum mismatch", "position": block.position, "offset": block.start,
    }]
    assert "Traceback" not in proc.stderr
    human = _verify_cli(conf)
    assert human.returncode == 4
    line = next(ln for ln in human.stdout.splitlines() if ln.startswith("CORRUPT:"))
    assert victim_name in line and f"at byte {block.position}" in line
    assert f"(offset {block.start})" in line and "checksum" in line
    assert "1 problem(s)" in human.stdout
    # damage is reported, never repaired behind the operator's back
    assert path.stat().st_size == len(before)


@pytest.mark.integration
async def test_verify_reports_missing_segment_as_gap(
    stored_topic: tuple[Path, Path, str, int],
) -> None:
    data, conf, topic, _n = stored_topic
    names = _store_segments(data)
    victim = naming.parse_segment_name(names[1])
    (data / "store" / names[1]).unlink()
    proc = _verify_cli(conf, "--json")
    assert proc.returncode == 6, (proc.stdout, proc.stderr)
    problems = orjson.loads(proc.stdout)["problems"]
    assert len(problems) == 1
    p = problems[0]
    assert p["kind"] == "gap" and p["name"] == names[2] and p["topic"] == topic
    assert p["offset"] == victim.start
    assert f"ends at {victim.start}" in p["detail"]
    assert f"starts at {victim.end}" in p["detail"]
    human = _verify_cli(conf)
    assert human.returncode == 6
    assert any(ln.startswith("GAP:") and names[2] in ln for ln in human.stdout.splitlines())


@pytest.mark.integration
async def test_verify_reports_missing_newest_segment(
    stored_topic: tuple[Path, Path, str, int],
) -> None:
    """The newest segment deleted: no later segment shows the hole, the watermark does."""
    data, conf, _topic, _n = stored_topic
    names = _store_segments(data)
    last = naming.parse_segment_name(names[-1])
    wm = orjson.loads((data / "store" / naming.watermark_name(last.topic, 0)).read_bytes())
    assert wm["stored_end"] == last.end
    (data / "store" / names[-1]).unlink()
    proc = _verify_cli(conf, "--json")
    problems = orjson.loads(proc.stdout)["problems"]
    assert proc.returncode == 6, (proc.stdout, proc.stderr)
    assert len(problems) == 1 and problems[0]["kind"] == "gap"
    assert problems[0]["offset"] == last.start


def test_gap_detection_unit() -> None:
    a = naming.segment_name("t", 0, 0, 10)
    b = naming.segment_name("t", 0, 10, 20)
    c = naming.segment_name("t", 0, 25, 30)
    d = naming.segment_name("t", 0, 28, 40)
    other = naming.segment_name("t", 1, 500, 600)
    assert find_gaps([b, a, other]) == []
    gaps = find_gaps([a, b, c, d, other])
    assert [(p.kind, p.name, p.offset) for p in gaps] == [("gap", c, 20), ("overlap", d, 30)]



def test_missing_tail_detection_unit() -> None:
    a = naming.segment_name("t", 0, 0, 10)
    b = naming.segment_name("t", 0, 10, 20)
    wm0 = naming.watermark_name("t", 0)
    wm1 = naming.watermark_name("t", 1)
    assert find_missing_tails([a, b], {("t", 0): (wm0, 20)}) == []
    got = find_missing_tails([a], {("t", 0): (wm0, 20), ("t", 1): (wm1, 7)})
    assert [(p.kind, p.name, p.partition, p.offset) for p in got] == [
        ("gap", wm0, 0, 10), ("gap", wm1, 1, None)]
    assert "up to offset 20" in got[0].detail and "ends at 10" in got[0].detail
    assert "no segment" in got[1].detail


def _damaged_header_active(data: Path, topic: str) -> tuple[Path, bytes]:
    """An active segment whose (complete) file header fails its checksum."""
    path = naming.active_segment_path(data, topic, 0, 0)
    path.parent.mkdir(parents=True)
    hdr = bytearray(fmt.SegmentHeader(topic=topic, partition=0, base_offset=0,
                                      created_ms=1).encode())
    hdr[-3] ^= 1
    content = bytes(hdr) + fmt.encode_block(b"", records=0, start=0, end=3, min_ts=-1,
                                            max_ts=-1)
    path.write_bytes(content)
    return path, content


@pytest.mark.integration
async def test_corrupt_active_header_stops_ingest_loudly(kafka_bootstrap: str,
                                                         tmp_path: Path) -> None:
    """Not a silent stall: the partition cannot be opened, so ingest must fail, naming it."""
    topic = unique("attendance")
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    await publish_demo(kafka_bootstrap, {"attendance": topic, "participant": topic,
                                         "config": topic}, 50, seed=5)
    data = tmp_path / "data"
    path, content = _damaged_header_active(data, topic)
    async with Ingestor(config=make_config(data, kafka_bootstrap, [topic])) as ing:
        task = asyncio.create_task(ing.run())
        try:
            await wait_for(task.done, 30, "ingest to fail on the corrupt active segment")
        finally:
            ing.request_stop()
        with pytest.raises(CorruptSegmentError) as ei:
            await task
        assert ing.stats.ingested == 0
    assert ei.value.path == str(path) and ei.value.position == 0
    assert "file header checksum mismatch" in str(ei.value)
    assert path.read_bytes() == content  # never "repaired" by deleting it
    assert _store_segments(data) == []


@pytest.mark.integration
async def test_cli_run_exits_4_on_corrupt_active_header(kafka_bootstrap: str,
                                                        tmp_path: Path) -> None:
    topic = unique("attendance")
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    data = tmp_path / "data"
    path, content = _damaged_header_active(data, topic)
    conf = write_config_toml(tmp_path / "r.toml", make_config(data, kafka_bootstrap, [topic]))
    svc = ServiceProcess(conf, tmp_path / "service.log")
    svc.start()
    try:
        assert svc.proc is not None
        code = await asyncio.to_thread(svc.proc.wait, 60)
    finally:
        svc.kill()
    out = (tmp_path / "service.log").read_text()
    assert code == 4, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("replicator: error:")]
    assert len(errors) == 1, out[-3000:]
    assert str(path) in errors[0] and "at byte 0" in errors[0]
    assert "Traceback" not in out
    assert path.read_bytes() == content


@pytest.mark.integration
async def test_verify_reports_truncated_and_footer_damaged_segments(
    stored_topic: tuple[Path, Path, str, int],
) -> None:
    data, conf, _topic, _n = stored_topic
    names = _store_segments(data)
    assert len(names) >= 4
    # 1: lost its tail (footer and trailer gone, part of the last block too)
    p1 = data / "store" / names[0]
    with SegmentReader(p1, expect_sealed=True) as r:
        last = r.blocks[-1]
    os.truncate(p1, last.position + last.size // 2)
    # 2: one byte of the footer index changed
    p2 = data / "store" / names[1]
    tr = fmt.decode_trailer(p2.read_bytes())
    assert tr is not None
    footer_pos = tr[0]
    buf = bytearray(p2.read_bytes())
    buf[footer_pos + fmt.FOOTER_HEAD.size + 3] ^= 0x40
    p2.write_bytes(bytes(buf))
    # 3: written by a future format version
    p3 = data / "store" / names[2]
    buf = bytearray(p3.read_bytes())
    buf[8] = 9  # major version field of the file header
    p3.write_bytes(bytes(buf))
    proc = _verify_cli(conf, "--json")
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    problems = {p["name"]: p for p in orjson.loads(proc.stdout)["problems"]}
    assert set(problems) == {names[0], names[1], names[2]}, problems
    a, b, c = problems[names[0]], problems[names[1]], problems[names[2]]
    assert a["kind"] == "corrupt" and "no valid footer" in a["detail"]
    assert a["position"] == last.position and a["offset"] == last.start
    assert b["kind"] == "corrupt" and b["detail"] == "footer checksum mismatch"
    assert b["position"] == footer_pos
    assert c["kind"] == "unreadable" and "version 9.0 is not supported" in c["detail"]
    human = _verify_cli(conf)
    assert human.returncode == 4
    assert "3 problem(s)" in human.stdout
    for n in names[:3]:
        assert any(n in ln for ln in human.stdout.splitlines() if ln.startswith(
            ("CORRUPT:", "UNREADABLE:")))
