"""Unit tests of the segment format, naming, the local store and configuration (no Kafka)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from replicator import naming
from replicator.config import load_config
from replicator.errors import (
    ConfigError,
    CorruptSegmentError,
    InvalidNameError,
    ObjectExistsError,
    ObjectNotFoundError,
    StoreError,
    UnsupportedVersionError,
)
from replicator.segment import format as fmt
from replicator.segment.format import Record, SegmentHeader
from replicator.segment.reader import SegmentReader, recover_active
from replicator.segment.writer import ActiveSegment, BlockBuilder, PendingBlock
from replicator.storage.local import LocalStore

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- helpers --------------------------------------------------------------------------------

TRICKY_RECORDS: list[Record] = [
    Record(0, 1_700_000_000_000, 0, None, b'{"a":1}', ()),
    Record(1, 1_700_000_000_001, 1, b"k1", None, ()),
    Record(2, 1_700_000_000_002, 0, b"", b"", ()),
    Record(3, 1_700_000_000_003, 0, b"k3", b"v3", (("h-none", None), ("h-empty", b""))),
    Record(4, 1_700_000_000_004, 0, "ключ".encode(), b"\x00\xff" * 7,
           (("größe-😀", b"\xe2\x82\xac"), ("日本", None), ("x", b"y" * 300))),
    Record(5, 1_699_999_999_000, 1, b"big", bytes(random.Random(5).randbytes(3 * 1024 * 1024)),
           (("entity", b"attendance"),)),
    Record(6, 0, 0, None, None, ()),
]


def _write_segment(
    path: Path,
    blocks: list[list[Record]],
    *,
    base: int = 0,
    ends: list[int] | None = None,
    watermarks: list[int] | None = None,
    seal: bool = True,
) -> tuple[ActiveSegment, list[fmt.BlockMeta]]:
    """Write ``blocks`` of records (one block each) with BlockBuilder + ActiveSegment."""
    seg = ActiveSegment.create(path, topic="t", partition=3, base_offset=base)
    builder = BlockBuilder(base)
    metas = []
    for i, recs in enumerate(blocks):
        for r in recs:
            builder.append(r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers)
        if ends is not None:
            builder.skip_to(ends[i])
        blk = builder.take(watermarks[i] if watermarks else 0)
        assert blk is not None
        metas.append(seg.write(blk))
    seg.sync()
    if seal:
        seg.seal()
    else:
        seg.close()
    return seg, metas


def _recs(offsets: list[int], ts0: int = 1000) -> list[Record]:
    return [
        Record(o, ts0 + o, 0, f"k{o}".encode(), f'{{"n":{o}}}'.encode(), (("i", str(o).encode()),))
        for o in offsets
    ]


# -- records round trip ---------------------------------------------------------------------


def test_encode_iter_records_round_trip_tricky_values() -> None:
    raw = b"".join(
        fmt.encode_record(r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers)
        for r in TRICKY_RECORDS
    )
    assert list(fmt.iter_records(raw)) == TRICKY_RECORDS


def test_segment_round_trip_keeps_bytes_exactly(tmp_path: Path) -> None:
    path = tmp_path / "s.seg"
    _write_segment(path, [TRICKY_RECORDS[:3], TRICKY_RECORDS[3:6], TRICKY_RECORDS[6:]])
    with SegmentReader(path, expect_sealed=True) as r:
        assert r.sealed
        summary = r.verify()
        got = list(r.iter_records())
    assert got == TRICKY_RECORDS
    # null vs empty are distinct, header None survives
    assert got[0].key is None and got[2].key == b"" and got[2].value == b""
    assert got[1].value is None and got[6].value is None and got[6].key is None
    assert dict(got[3].headers) == {"h-none": None, "h-empty": b""}
    assert got[4].headers[0] == ("größe-😀", "€".encode())
    assert len(got[5].value or b"") == 3 * 1024 * 1024
    assert summary.records == len(TRICKY_RECORDS)
    assert (summary.start, summary.end) == (0, 7)
    assert summary.min_ts == 0 and summary.max_ts == 1_700_000_000_004


# -- checksums ------------------------------------------------------------------------------


def _one_block() -> bytes:
    raw = b"".join(
        fmt.encode_record(r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers)
        for r in _recs(list(range(10, 20)))
    )
    return fmt.encode_block(raw, records=10, start=10, end=20, min_ts=1010, max_ts=1019,
                            watermark_ms=42)


def _block_ok(data: bytes) -> bool:
    """What a reader decides about a block: plausible header, complete, CRC matches."""
    try:
        meta, crc = fmt.decode_block_header(data[: fmt.BLOCK_HEADER.size], 0)
    except fmt.BlockHeaderError:
        return False
    if meta.size > len(data):
        return False  # incomplete
    payload = data[fmt.BLOCK_HEADER.size : meta.size]
    return fmt.block_crc(data[: fmt.BLOCK_HEADER.size], payload) == crc


def test_block_crc_detects_every_single_bit_flip_in_header_fields() -> None:
    data = _one_block()
    assert _block_ok(data)
    meta, _ = fmt.decode_block_header(data, 0)
    assert (meta.start, meta.end, meta.records, meta.watermark_ms) == (10, 20, 10, 42)
    for byte in range(fmt.BLOCK_HEADER.size):
        for bit in range(8):
            bad = bytearray(data)
            bad[byte] ^= 1 << bit
            assert not _block_ok(bytes(bad)), f"bit {bit} of header byte {byte} undetected"


def test_block_crc_detects_bit_flips_in_payload() -> None:
    data = _one_block()
    rng = random.Random(7)
    for byte in range(fmt.BLOCK_HEADER.size, len(data)):
        bad = bytearray(data)
        bad[byte] ^= 1 << rng.randrange(8)
        assert not _block_ok(bytes(bad)), f"flip in payload byte {byte} undetected"


@pytest.mark.parametrize(
    ("where", "bit"),
    [("header_start", 0x10), ("header_start", 0x01), ("header_end", 0x10), ("header_end", 0x01),
     ("header_ts", 0x10), ("header_count", 0x01), ("payload", 0x10)],
)
def test_sealed_reader_names_file_position_and_offset_of_flipped_block(
    tmp_path: Path, where: str, bit: int
) -> None:
    path = tmp_path / "s.seg"
    _, metas = _write_segment(path, [_recs(list(range(0, 10))), _recs(list(range(10, 20))),
                                     _recs(list(range(20, 30)))])
    victim = metas[1]
    rel = {
        "header_count": 16,  # record count
        "header_start": 24,  # start field (10 -> 26: implausible, end < start; 10 -> 11)
        "header_end": 32,  # end field (20 -> 4: implausible; 20 -> 21)
        "header_ts": 40,  # min_ts
        "payload": fmt.BLOCK_HEADER.size + victim.payload_len // 2,
    }[where]
    with path.open("r+b") as f:
        f.seek(victim.position + rel)
        b = f.read(1)
        f.seek(victim.position + rel)
        f.write(bytes([b[0] ^ bit]))
    with pytest.raises(CorruptSegmentError) as ei, SegmentReader(
        path, name="segments/t/000003/x.seg", expect_sealed=True
    ) as r:
        assert [rec.offset for rec in r.iter_records(to_offset=10)] == list(range(10))
        r.verify()
    exc = ei.value
    assert exc.path == "segments/t/000003/x.seg"
    assert exc.position == victim.position
    assert exc.offset == 10, exc  # from the footer index, not from the damaged header
    assert "segments/t/000003/x.seg" in str(exc) and f"byte {victim.position}" in str(exc)
    assert "offset 10" in str(exc)


# -- footer / trailer -----------------------------------------------------------------------


def test_sealed_footer_and_trailer_read_back(tmp_path: Path) -> None:
    path = tmp_path / "s.seg"
    blocks = [_recs([100, 101, 103], ts0=5000), [], _recs([110, 111], ts0=4000)]
    seg, metas = _write_segment(path, blocks, base=100, ends=[105, 108, 120],
                                watermarks=[0, 7777, 9999])
    assert seg.size == path.stat().st_size
    data = path.read_bytes()
    tr = fmt.decode_trailer(data)
    assert tr is not None
    footer_pos, footer_len, crc = tr
    assert footer_pos == metas[-1].position + metas[-1].size
    assert footer_pos + footer_len + fmt.TRAILER.size == len(data)
    footer = data[footer_pos : footer_pos + footer_len]
    assert zlib.crc32(footer) == crc
    summary, positions = fmt.decode_footer(footer, "s", footer_pos)
    assert positions == [m.position for m in metas]
    assert summary.start == 100 and summary.end == 120
    assert summary.records == 5 and summary.blocks == 3
    assert summary.min_ts == 4110 and summary.max_ts == 5103
    assert summary.watermark_ms == 9999
    with SegmentReader(path, expect_sealed=True) as r:
        assert r.sealed and r.summary == summary
        assert [b.position for b in r.blocks] == positions
        assert [(b.start, b.end, b.records) for b in r.blocks] == [
            (100, 105, 3), (105, 108, 0), (108, 120, 2)]
        # no records, coverage advanced by skip_to, carries a watermark
        assert r.blocks[1].flags == fmt.FLAG_WATERMARK and r.blocks[1].watermark_ms == 7777
        assert [rec.offset for rec in r.iter_records()] == [100, 101, 103, 110, 111]
        assert r.data_end == footer_pos
    # an unsealed file gives the same facts by scanning
    tail = tmp_path / "active"
    _write_segment(tail, blocks, base=100, ends=[105, 108, 120], watermarks=[0, 7777, 9999],
                   seal=False)
    with SegmentReader(tail) as r:
        assert not r.sealed
        assert r.summary == summary
    # a damaged footer in a sealed file is an error, never a silent rescan
    bad = bytearray(data)
    bad[footer_pos + 12] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(CorruptSegmentError, match="footer checksum mismatch") as ei:
        SegmentReader(path, expect_sealed=True)
    assert ei.value.position == footer_pos
    # an active file opened as a sealed one is refused with a clear message
    with pytest.raises(CorruptSegmentError, match="no valid footer"):
        SegmentReader(tail, expect_sealed=True)


# -- versions -------------------------------------------------------------------------------


def test_unknown_major_version_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "future.seg"
    # (major 2 is the encrypted format, docs/FORMAT.md §2.5; 3 is unknown)
    hdr = SegmentHeader(topic="t", partition=0, base_offset=0, created_ms=1, major=3, minor=3)
    original = hdr.encode() + b"whatever a future version stores"
    path.write_bytes(original)
    with pytest.raises(UnsupportedVersionError) as ei:
        SegmentReader(path, expect_sealed=True)
    msg = str(ei.value)
    assert str(path) in msg and "3.3" in msg and "upgrade" in msg
    assert "major versions up to 2" in msg
    assert (ei.value.major, ei.value.minor) == (3, 3)
    # recovery must not "repair" (truncate) a file it cannot understand
    with pytest.raises(UnsupportedVersionError):
        recover_active(path)
    assert path.read_bytes() == original
    # a newer minor version of the same major is readable
    ok = tmp_path / "minor.seg"
    hdr2 = SegmentHeader(topic="t", partition=0, base_offset=0, created_ms=1, minor=9)
    ok.write_bytes(hdr2.encode())
    with SegmentReader(ok) as r:
        assert r.header.minor == 9 and r.blocks == []


# -- BlockBuilder ---------------------------------------------------------------------------


def test_block_builder_coverage_semantics() -> None:
    b = BlockBuilder(50)
    assert not b.has_pending and b.take() is None
    wm = b.take(watermark_ms=123)
    assert wm == PendingBlock(b"", 0, 50, 50, fmt.NO_TS, fmt.NO_TS, 123, fmt.FLAG_WATERMARK)
    b.skip_to(40)  # never moves backwards
    assert b.position == 50 and not b.has_pending
    b.skip_to(53)  # e.g. quarantined or transaction markers
    assert b.has_pending and b.pending_records == 0
    b.append(53, 900, 0, b"k", b"v", [])
    b.append(57, 800, 1, None, None, [("h", None)])
    assert b.position == 58 and b.pending_records == 2 and b.pending_bytes > 0
    b.skip_to(60)
    blk = b.take(watermark_ms=999)
    assert blk is not None
    assert (blk.start, blk.end, blk.records, blk.min_ts, blk.max_ts) == (50, 60, 2, 800, 900)
    assert blk.watermark_ms == 999 and blk.flags == 0  # has records: not watermark-only
    assert [r.offset for r in fmt.iter_records(blk.raw)] == [53, 57]
    # after take the next block starts where this one ended, with fresh stats
    assert b.pending_bytes == 0 and b.pending_records == 0 and not b.has_pending
    b.skip_to(61)
    blk2 = b.take()
    assert blk2 is not None
    assert (blk2.start, blk2.end, blk2.records, blk2.min_ts, blk2.flags) == (
        60, 61, 0, fmt.NO_TS, 0)


def test_watermark_only_blocks_in_a_segment(tmp_path: Path) -> None:
    path = tmp_path / "wm.seg"
    seg = ActiveSegment.create(path, topic="t", partition=0, base_offset=7)
    b = BlockBuilder(7)
    for w in (11, 22):
        blk = b.take(watermark_ms=w)
        assert blk is not None
        seg.write(blk)
    b.append(7, 5, 0, b"k", b"v", [])
    blk = b.take(watermark_ms=33)
    assert blk is not None
    seg.write(blk)
    summary = seg.seal()
    assert (summary.start, summary.end, summary.records, summary.blocks) == (7, 8, 1, 3)
    assert summary.watermark_ms == 33 and (summary.min_ts, summary.max_ts) == (5, 5)
    with SegmentReader(path, expect_sealed=True) as r:
        assert r.verify() == summary
        assert [(m.start, m.end, m.flags) for m in r.blocks] == [
            (7, 7, fmt.FLAG_WATERMARK), (7, 7, fmt.FLAG_WATERMARK), (7, 8, 0)]
        assert [rec.offset for rec in r.iter_records()] == [7]


def test_active_segment_rejects_non_contiguous_block(tmp_path: Path) -> None:
    seg = ActiveSegment.create(tmp_path / "a.active", topic="t", partition=0, base_offset=0)
    with pytest.raises(ValueError, match="starts at 5, segment ends at 0"):
        seg.write(PendingBlock(b"", 0, 5, 6, fmt.NO_TS, fmt.NO_TS))
    seg.close()


# -- iter_records boundaries ----------------------------------------------------------------


def test_iter_records_from_to_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "r.seg"
    # offsets with holes; block ranges [0,10) [10,20) [20,30) [30,35)
    b1, b2, b3 = [0, 1, 2, 5, 9], [10, 12, 13, 19], [20, 21, 29]
    _write_segment(path, [_recs(b1), _recs(b2), _recs(b3), []], ends=[10, 20, 30, 35])
    every = b1 + b2 + b3
    with SegmentReader(path, expect_sealed=True) as r:

        def offs(lo: int | None, hi: int | None) -> list[int]:
            return [rec.offset for rec in r.iter_records(from_offset=lo, to_offset=hi)]

        assert offs(None, None) == every
        for lo in [None, *range(-1, 37)]:
            for hi in [None, *range(-1, 37)]:
                want = [o for o in every if (lo is None or o >= lo) and (hi is None or o < hi)]
                assert offs(lo, hi) == want, (lo, hi)
        assert offs(10, 20) == b2  # exactly one block
        assert offs(9, 10) == [9]  # last record of a block, end exclusive
        assert offs(3, 5) == []  # only holes
        assert offs(30, None) == []  # empty trailing block
        blocks = [m.start for m, _ in r.iter_block_payloads(from_offset=10, to_offset=21)]
        assert blocks == [10, 20]


# -- naming ---------------------------------------------------------------------------------


def test_zero_padding_sorts_numerically() -> None:
    rng = random.Random(3)
    starts = sorted({rng.randrange(0, 10**rng.randrange(1, 19)) for _ in range(300)})
    names = [naming.segment_name("attendance", 7, s, s + 1) for s in starts]
    shuffled = names[:]
    rng.shuffle(shuffled)
    assert sorted(shuffled) == names
    assert naming.segment_name("a", 1, 9, 10) < naming.segment_name("a", 1, 10, 11)
    assert naming.segment_name("a", 2, 0, 1) < naming.segment_name("a", 10, 0, 1)
    assert naming.segment_name("a", 1, 0, 5) == (
        "segments/a/000001/00000000000000000000-00000000000000000005.seg")


def test_parse_segment_name_round_trip() -> None:
    for topic, part, start, end in [("attendance", 0, 0, 0), ("x.y_z-1", 999_999, 5, 10**19),
                                    ("...", 3, 7, 8)]:
        name = naming.segment_name(topic, part, start, end)
        seg = naming.parse_segment_name(name)
        assert (seg.topic, seg.partition, seg.start, seg.end) == (topic, part, start, end)
        assert seg.name == name and naming.is_segment_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "segments/../000000/00000000000000000000-00000000000000000001.seg",
        "segments/./000000/00000000000000000000-00000000000000000001.seg",
        "/segments/t/000000/00000000000000000000-00000000000000000001.seg",
        "../segments/t/000000/00000000000000000000-00000000000000000001.seg",
        "segments/t/0/00000000000000000000-00000000000000000001.seg",
        "segments/t/000000/0-1.seg",
        "segments/a/b/000000/00000000000000000000-00000000000000000001.seg",
        "segments/t/000000/00000000000000000000-00000000000000000001.seg.tmp",
        "segments/t/000000/.tmp-x-00000000000000000000-00000000000000000001.seg",
        "segments/tö/000000/00000000000000000000-00000000000000000001.seg",
    ],
)
def test_parse_segment_name_rejects(name: str) -> None:
    with pytest.raises(InvalidNameError):
        naming.parse_segment_name(name)


@pytest.mark.parametrize("topic", ["", ".", "..", "a/b", "../x", "/abs", "a\\b", "t\x00",
                                   "ünïcode", "sp ace", "x" * 250])
def test_bad_topics_rejected_everywhere(topic: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        naming.check_topic(topic)
    with pytest.raises(InvalidNameError):
        naming.segment_name(topic, 0, 0, 1)
    with pytest.raises(InvalidNameError):
        naming.spool_dir(tmp_path, topic, 0)
    with pytest.raises(InvalidNameError):
        naming.quarantine_path(tmp_path, topic)


def test_offsets_and_partitions_range_checked() -> None:
    for bad in (-1, 10**20):
        with pytest.raises(InvalidNameError):
            naming.segment_name("t", 0, bad, 10**19)
    with pytest.raises(InvalidNameError):
        naming.segment_name("t", 10**6, 0, 1)
    with pytest.raises(InvalidNameError, match="end 4 < start 5"):
        naming.segment_name("t", 0, 5, 4)
    assert naming.check_topic("x" * 249) == "x" * 249


# -- local store ----------------------------------------------------------------------------


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "name",
    ["../escape", "a/../../escape", "/abs/escape", "a/./b", "a//b", "", "a\\..\\b", "x/..",
     str(Path("/tmp/escape-abs").resolve())],
)
async def test_local_store_rejects_path_traversal(tmp_path: Path, name: str) -> None:
    root = tmp_path / "store"
    store = LocalStore(root=root)
    await store.put_bytes("ok/one", b"1")
    before = _tree(tmp_path)
    src = tmp_path / "src"
    src.write_bytes(b"payload")
    before.add("src")
    with pytest.raises((InvalidNameError, StoreError)):
        await store.put_bytes(name, b"evil")
    with pytest.raises((InvalidNameError, StoreError)):
        await store.put_file(name, src)
    with pytest.raises((InvalidNameError, StoreError)):
        await store.get_bytes(name)
    with pytest.raises((InvalidNameError, StoreError)):
        await store.delete(name)
    assert _tree(tmp_path) == before
    assert not Path("/tmp/escape-abs").exists()


async def test_local_store_symlink_escape_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalStore(root=root)
    with pytest.raises(StoreError, match="escapes the store"):
        await store.put_bytes("link/evil", b"x")
    assert list(outside.iterdir()) == []


async def test_local_store_create_only(tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "store")
    name = naming.segment_name("t", 0, 0, 10)
    await store.put_bytes(name, b"first")
    with pytest.raises(ObjectExistsError) as ei:
        await store.put_bytes(name, b"second")
    assert ei.value.name == name
    src = tmp_path / "src"
    src.write_bytes(b"third")
    with pytest.raises(ObjectExistsError):
        await store.put_file(name, src)
    assert await store.get_bytes(name) == b"first"
    assert src.read_bytes() == b"third"
    # no temp or extra file left behind by the refused puts
    assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()] == [name.split("/")[-1]]
    # explicit replace is allowed (watermark objects)
    await store.put_bytes(name, b"replaced", create_only=False)
    assert await store.get_bytes(name) == b"replaced"
    assert await store.get_bytes(name, 2, 3) == b"pla"
    with pytest.raises(ObjectNotFoundError):
        await store.get_bytes("segments/none")
    with pytest.raises(ObjectNotFoundError):
        await store.fetch_to("segments/none", tmp_path / "x")


async def test_local_store_concurrent_create_only_one_wins(tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "store")
    results = await asyncio.gather(
        *(store.put_bytes("race/obj", f"writer-{i}".encode()) for i in range(16)),
        return_exceptions=True,
    )
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, ObjectExistsError) for r in results if r is not None)
    assert await store.get_bytes("race/obj") == f"writer-{winners[0]}".encode()


async def test_local_store_list_delete_and_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = LocalStore(root=root)
    names = [naming.segment_name(t, p, s, s + 5) for t in ("b", "a", "a-b") for p in (10, 2)
             for s in (100, 5, 0)]
    rng = random.Random(1)
    shuffled = names[:]
    rng.shuffle(shuffled)
    for n in shuffled:
        await store.put_bytes(n, n.encode())
    await store.put_bytes("watermarks/a/000002.json", b"{}")
    listed = await store.list("segments/")
    assert [o.name for o in listed] == sorted(names)
    assert all(o.size == len(o.name) for o in listed)
    assert [o.name for o in await store.list(naming.segments_prefix("a", 2))] == [
        naming.segment_name("a", 2, s, s + 5) for s in (0, 5, 100)]
    assert await store.list("nothing/here/") == []
    assert len(await store.list()) == len(names) + 1
    # temp files (a crash mid-put) are never listed, and are swept
    tmp1 = root / "segments" / "a" / "000002" / ".tmp-dead-x.seg"
    tmp2 = root / ".tmp-beef-top"
    tmp1.write_bytes(b"partial")
    tmp2.write_bytes(b"partial")
    assert [o.name for o in await store.list("segments/")] == sorted(names)
    assert store.sweep_temp_sync() == 2
    assert not tmp1.exists() and not tmp2.exists()
    assert store.sweep_temp_sync() == 0
    # delete is idempotent
    victim = naming.segment_name("a", 2, 5, 10)
    await store.delete(victim)
    await store.delete(victim)
    await store.delete("segments/never/existed")
    assert victim not in [o.name for o in await store.list("segments/")]
    assert len(await store.list("segments/")) == len(names) - 1


# -- configuration --------------------------------------------------------------------------


def _toml(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(body)
    return p


def test_load_config_toml_and_env_overrides(tmp_path: Path) -> None:
    path = _toml(tmp_path, """
[kafka]
bootstrap_servers = "10.0.0.1:9092"
topics = ["attendance", "config"]

[ingest]
data_dir = "/srv/rep"
seal_age_s = 30
seal_bytes = 1048576

[objectives]
rpo_s = 600
""")
    cfg = load_config(path, env={})
    assert cfg.kafka.bootstrap_servers == "10.0.0.1:9092"
    assert cfg.kafka.topics == ("attendance", "config")
    assert cfg.ingest.data_dir == Path("/srv/rep")
    assert cfg.ingest.seal_age_s == 30.0 and isinstance(cfg.ingest.seal_age_s, float)
    assert cfg.ingest.seal_bytes == 1048576
    assert cfg.store_url == "/srv/rep/store"
    assert cfg.kafka.group_id == "replicator"  # defaults kept
    env = {
        "REPLICATOR_KAFKA_BOOTSTRAP_SERVERS": "broker-a:9092,broker-b:9092",
        "REPLICATOR_INGEST_SEAL_AGE_S": "12.5",
        "REPLICATOR_KAFKA_TOPICS": "participant, attendance",
        "REPLICATOR_CONFIG": "/ignored.toml",  # not a setting
        "REPLICATOR_TEST_PG_DSN": "postgres://x",  # not our section: ignored
        "OTHER_INGEST_SEAL_AGE_S": "1",
    }
    cfg2 = load_config(path, env=env)
    assert cfg2.kafka.bootstrap_servers == "broker-a:9092,broker-b:9092"
    assert cfg2.ingest.seal_age_s == 12.5
    assert cfg2.kafka.topics == ("participant", "attendance")
    assert cfg2.ingest.seal_bytes == 1048576
    # no file at all: defaults + env
    cfg3 = load_config(None, env={"REPLICATOR_INGEST_SEAL_AGE_S": "5"})
    assert cfg3.ingest.seal_age_s == 5.0 and cfg3.kafka.bootstrap_servers == "127.0.0.1:9092"


@pytest.mark.parametrize(
    ("body", "env", "setting", "text"),
    [
        ("[kafka]\nbootstrap = 'x'\n", {}, "kafka.bootstrap", "unknown setting"),
        ("[kafak]\nbootstrap_servers = 'x'\n", {}, "kafak", "unknown section"),
        ("[ingest]\nseal_bytes = 'big'\n", {}, "ingest.seal_bytes", "expected int"),
        ("[ingest]\nseal_age_s = true\n", {}, "ingest.seal_age_s", "expected float"),
        ("[ingest]\nseal_bytes = 1.5\n", {}, "ingest.seal_bytes", "expected int"),
        ("[kafka]\ntopics = [1, 2]\n", {}, "kafka.topics", "list of strings"),
        ("[kafka]\ntopics = ['../etc']\n", {}, "kafka.topics", "invalid topic"),
        ("[server]\nport = 70000\n", {}, "server.port", "0..65535"),
        ("[ingest]\nseal_age_s = 7200\n", {}, "ingest.seal_age_s", "exceeds the RPO"),
        ("[objectives]\nrpo_s = 10\n", {}, "ingest.seal_age_s", "rpo_s=10"),
        ("", {"REPLICATOR_INGEST_SEAL_AGE_S": "soon"}, "ingest.seal_age_s", "expected float"),
        ("", {"REPLICATOR_INGEST_SEAL_AGE_S": "99999"}, "ingest.seal_age_s", "exceeds the RPO"),
        ("", {"REPLICATOR_KAFKA_BOOTSTRAP_SERVERS": "  "}, "kafka.bootstrap_servers", "empty"),
        ("", {"REPLICATOR_INGEST_NOPE": "1"}, "ingest.nope", "unknown setting"),
        ("[ingest\n", {}, "--config", "not valid TOML"),
        ("kafka = 3\n", {}, "kafka", "expected a table"),
    ],
)
def test_bad_config_names_the_setting(
    tmp_path: Path, body: str, env: dict[str, str], setting: str, text: str
) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(_toml(tmp_path, body), env=env)
    assert ei.value.setting == setting
    assert text in str(ei.value)
    assert str(ei.value).startswith(setting + ":")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as ei:
        load_config(tmp_path / "nope.toml", env={})
    assert ei.value.setting == "--config"


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "replicator", *args], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False)


@pytest.mark.parametrize(
    ("body", "env", "needle"),
    [
        ("[ingest]\nseal_bytes = 'lots'\n", {}, "ingest.seal_bytes"),
        ("[ingest]\nseal_age_s = 7200\n", {}, "ingest.seal_age_s"),
        ("[nonsense]\n", {}, "nonsense"),
        ("[kafka\n", {}, "not valid TOML"),
        ("", {"REPLICATOR_INGEST_SEAL_AGE_S": "x"}, "ingest.seal_age_s"),
    ],
)
def test_cli_bad_config_one_line_exit_2(
    tmp_path: Path, body: str, env: dict[str, str], needle: str
) -> None:
    path = _toml(tmp_path, body)
    proc = _cli("--config", str(path), "segments", "list", env_extra=env)
    assert proc.returncode == 2, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("replicator: error:"), lines
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_missing_config_file_exit_2(tmp_path: Path) -> None:
    proc = _cli("--config", str(tmp_path / "absent.toml"), "segments", "verify")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("replicator: error:")
    assert "absent.toml" in lines[0] and "Traceback" not in proc.stderr
