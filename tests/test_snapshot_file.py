"""The snapshot file format: round trip, order enforced, point look-ups through the sparse
key index, and corruption found (never read past)."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator.errors import CorruptSnapshotError
from replicator.snapshot import file as sfile
from replicator.snapshot.file import SnapshotFileReader, SnapshotFileWriter
from replicator.snapshot.format import Entry


def entries(n: int) -> list[Entry]:
    out: list[Entry] = []
    for i in range(n):
        key = f"k{i:06d}-é"  # non-ASCII: byte order must equal code point order
        for part in ((0, 2) if i % 7 == 0 else (1,)):  # some keys in two partitions
            value = None if i % 11 == 0 else b'{"key":"%s","op":"upsert","data":{"n":%d}}' % (
                key.encode(), i)
            hdrs = b"" if i % 3 else b"\x01\x00h\x01\x00\x00\x00v"
            out.append((key, part, i * 3 + part, 1_700_000_000_000 + i, i % 5 - 1, value,
                        key.encode() if i % 2 else None, hdrs))
    return out


def write(path: Path, es: list[Entry]) -> int:
    w = SnapshotFileWriter(path, {"topic": "t"})
    for e in es:
        w.add(*e)
    w.flush_block()
    h = w.content_hash
    size = w.finish({"entries": len(es), "content_hash": h})
    return size


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sfile, "BLOCK_TARGET", 2048)


def test_round_trip_and_lookup(tmp_path: Path, small_blocks: None) -> None:
    es = entries(3000)
    p = tmp_path / "a.snap"
    write(p, es)
    with SnapshotFileReader(p) as r:
        assert len(r.blocks) > 20
        assert list(r) == es
        n, content = r.verify()
        assert n == len(es) and content == r.summary["content_hash"]
        # every key's entries sit in one block (keys never straddle blocks)
        for b in r.blocks:
            assert b.first_key <= b.last_key
        for i in (0, 1, 7, 11, 1234, 2999):
            key = f"k{i:06d}-é"
            assert r.lookup(key) == [e for e in es if e[0] == key]
        assert r.lookup("k") == [] and r.lookup("k000001") == [] and r.lookup("z") == []


def test_order_is_enforced(tmp_path: Path) -> None:
    w = SnapshotFileWriter(tmp_path / "b.snap", {})
    w.add("b", 0, 1, 1, -1, b"{}", None, b"")
    with pytest.raises(ValueError, match="out of order"):
        w.add("a", 0, 2, 1, -1, b"{}", None, b"")
    with pytest.raises(ValueError, match="out of order"):
        w.add("b", 0, 2, 1, -1, b"{}", None, b"")
    w.abort()
    assert not (tmp_path / "b.snap").exists()


def test_corruption_and_truncation_are_named(tmp_path: Path, small_blocks: None) -> None:
    es = entries(500)
    p = tmp_path / "c.snap"
    size = write(p, es)
    data = bytearray(p.read_bytes())
    with SnapshotFileReader(p) as r:
        victim = r.blocks[3]
    data[victim.position + 40] ^= 0xFF
    bad = tmp_path / "bad.snap"
    bad.write_bytes(bytes(data))
    with SnapshotFileReader(bad) as r, pytest.raises(CorruptSnapshotError,
                                                     match=f"at byte {victim.position}"):
        r.verify()
    short = tmp_path / "short.snap"
    short.write_bytes(p.read_bytes()[: size - 10])
    with pytest.raises(CorruptSnapshotError, match=r"incomplete file|footer"):
        SnapshotFileReader(short)
