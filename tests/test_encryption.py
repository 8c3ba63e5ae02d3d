"""Encryption at rest (AES-256-GCM per segment block and per snapshot block).

What must hold: encrypted data round-trips through every reader (segment reader, the fast
value walk, live-tail frames, spool recovery, compaction, restore); a missing or wrong key
and any tampering are clear errors naming the file and the key id, never garbage; key
rotation reads old and new data; plain (format 1) data stays readable next to encrypted
data; an unusable key configuration stops every command with one line naming the setting;
no key material ever appears in an error, a repr or the files.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sqlite3
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from replicator import crypto, naming
from replicator.config import CompactionSettings, Config, EncryptionSettings, RetentionSettings
from replicator.crypto import Keyring
from replicator.errors import (
    AuthenticationError,
    CorruptSegmentError,
    CorruptSnapshotError,
    DecryptionError,
    EncryptionKeyError,
    KeyNotFoundError,
    SnapshotAuthenticationError,
)
from replicator.follow.runner import decode_frames, read_segment
from replicator.metrics import Metrics
from replicator.segment import format as fmt
from replicator.segment.format import Record
from replicator.segment.reader import SegmentReader, recover_active
from replicator.segment.writer import ActiveSegment, BlockBuilder, PendingBlock
from replicator.snapshot import file as sfile
from replicator.snapshot import format as sfmt
from replicator.snapshot.file import SnapshotFileReader, SnapshotFileWriter
from replicator.snapshot.manifest import Manifest, SnapshotFile
from replicator.spool import Spool, SpoolSettings
from replicator.storage.local import LocalStore
from tests.helpers import REPO_ROOT
from tests.restore_history import ENTITIES, History, build_history
from tests.test_segment_format import TRICKY_RECORDS
from tests.test_snapshot_file import entries

KEY_A = bytes(range(32))
KEY_B = hashlib.sha256(b"key b").digest()
KEY_C = hashlib.sha256(b"key c").digest()
A = Keyring.from_keys([KEY_A])
B = Keyring.from_keys([KEY_B])
BA = Keyring.from_keys([KEY_B, KEY_A])
MARKER = b"plaintext-marker-7f3a"  # must never be found in an encrypted file

TAIL_FRAME = struct.Struct("<qiIH")  # docs/FORMAT.md §8


def key_texts(key: bytes) -> list[str]:
    """Every printable form of ``key`` that must never leak."""
    return [key.hex(), key.hex().upper(), base64.b64encode(key).decode(),
            key.hex()[:16], base64.b64encode(key).decode()[:12]]


def assert_no_key(text: str, *keys: bytes) -> None:
    for k in keys:
        for form in key_texts(k):
            assert form not in text, "key material in output"


@pytest.fixture(autouse=True)
def no_process_keyring() -> Iterator[None]:
    """Each test starts (and leaves the process) with no keyring installed."""
    with crypto.installed_as(None, encrypt=False):
        yield


# -- segment helpers ------------------------------------------------------------------------


def records(n: int, start: int = 0, marker: bytes = MARKER) -> list[Record]:
    return [Record(start + i, 1_700_000_000_000 + start + i, 0, b"key-%d" % (start + i),
                   b'{"v":"%s %d"}' % (marker, start + i), (("entity", b"attendance"),))
            for i in range(n)]


def write_segment(path: Path, blocks: list[list[Record]], keyring: crypto.KeyringArg, *,
                  base: int = 0, partition: int = 3, seal: bool = True,
                  watermark: int = 0) -> ActiveSegment:
    seg = ActiveSegment.create(path, topic="attendance", partition=partition,
                               base_offset=base, keyring=keyring)
    b = BlockBuilder(base)
    for recs in blocks:
        for r in recs:
            b.append(r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers)
        blk = b.take()
        assert blk is not None
        seg.write(blk)
    if watermark:
        blk = b.take(watermark)
        assert blk is not None
        seg.write(blk)
    seg.sync()
    if seal:
        seg.seal()
    return seg


def read_all(path: Path, keyring: crypto.KeyringArg = crypto.INSTALLED) -> list[Record]:
    with SegmentReader(path, expect_sealed=True, keyring=keyring) as r:
        r.verify()
        return list(r.iter_records())


def rewrite_block(path: Path, index: int, edit: object) -> None:
    """Apply ``edit(block bytearray)`` to block ``index`` of a sealed segment and fix its
    CRC, as an attacker (or a bug) that knows the format would."""
    data = bytearray(path.read_bytes())
    with SegmentReader(path, expect_sealed=True, keyring=None) as r:
        meta = r.blocks[index]
    blk = bytearray(data[meta.position:meta.position + meta.size])
    edit(blk)  # type: ignore[operator]
    hs = fmt.BLOCK_HEADER.size
    struct.pack_into("<I", blk, 4, fmt.block_crc(bytes(blk[:hs]), bytes(blk[hs:])))
    data[meta.position:meta.position + meta.size] = blk
    path.write_bytes(bytes(data))


# -- keys and keyrings ----------------------------------------------------------------------


def test_key_ids_are_fingerprints_and_repr_never_shows_a_key() -> None:
    kr = Keyring.from_keys([KEY_B, KEY_A, KEY_B])  # duplicates dropped, order kept
    want_b = hashlib.sha256(crypto.KEY_ID_PREFIX + KEY_B).digest()[:8].hex()
    assert kr.active == want_b and kr.ids == (want_b, A.active) and len(kr.ids[0]) == 16
    assert kr == BA and kr != A
    for text in (repr(kr), str(kr), repr([kr]), f"{kr!r}"):
        assert kr.active in text
        assert_no_key(text, KEY_A, KEY_B)
    with pytest.raises(ValueError, match="31 bytes"):
        Keyring.from_keys([KEY_A[:31]])


def test_seal_is_randomised_bound_to_its_data_and_never_opens_unauthenticated() -> None:
    one, two = A.seal(b"hello", b"aad"), A.seal(b"hello", b"aad")
    assert one != two and len(one) == 5 + crypto.OVERHEAD  # fresh nonce per blob
    assert crypto.open_blob(A, one, b"aad", name="f", position=0) == b"hello"
    with pytest.raises(AuthenticationError, match="key " + A.active):
        crypto.open_blob(A, one, b"other aad", name="f", position=0)
    with pytest.raises(KeyNotFoundError) as ei:
        crypto.open_blob(B, one, b"aad", name="f", position=7)
    assert ei.value.key_id == A.active and ei.value.available == (B.active,)


@pytest.mark.parametrize("text", [
    KEY_A.hex(), KEY_A.hex().upper(), base64.b64encode(KEY_A).decode(),
    "  " + KEY_A.hex() + "\t",
])
def test_key_forms(text: str) -> None:
    assert crypto.parse_key(text) == KEY_A


@pytest.mark.parametrize(("text", "message"), [
    (KEY_A.hex()[:62], "a key of 62 hex digits; AES-256 needs 64"),
    (base64.b64encode(KEY_A[:16]).decode(), "a key of 16 bytes"),
    ("correct horse battery staple", "not a key"),
    (KEY_A.hex()[:63] + "g", "a key of 48 bytes"),  # not hex, so base64: of 48 bytes
])
def test_malformed_keys_are_refused_without_echoing_them(text: str, message: str) -> None:
    with pytest.raises(ValueError) as ei:
        crypto.parse_key(text)
    assert message in str(ei.value) and text.strip() not in str(ei.value)


def enc_config(**kw: Any) -> Config:
    return replace(Config(), encryption=replace(EncryptionSettings(), **kw))


def test_keyring_from_config_file_env_and_rotation(tmp_path: Path) -> None:
    kf = tmp_path / "keys"
    kf.write_text(f"# current key first\n{KEY_B.hex()}\n\n"
                  f"{base64.b64encode(KEY_A).decode()}  # old, kept for reading\n")
    kr = crypto.keyring_from_config(enc_config(enabled=True, key_file=kf), env={})
    assert kr == BA and kr is not None and kr.active == B.active
    # the environment: comma-separated, first one seals
    env = {"REPLICATOR_DATA_KEYS": f" {KEY_B.hex()} , {KEY_A.hex()},"}
    assert crypto.keyring_from_config(enc_config(enabled=True), env=env) == BA
    assert crypto.keyring_from_config(enc_config(enabled=True, key_env="MY_KEYS"),
                                      env={"MY_KEYS": KEY_A.hex()}) == A
    # a key file, when set, is the only source
    assert crypto.keyring_from_config(
        enc_config(enabled=True, key_file=kf), env={"REPLICATOR_DATA_KEYS": KEY_C.hex()}) == BA
    # disabled: no keys is fine; keys present still load, for reading old encrypted data
    assert crypto.keyring_from_config(enc_config(), env={}) is None
    assert crypto.keyring_from_config(enc_config(), env={"REPLICATOR_DATA_KEYS": ""}) is None
    assert crypto.keyring_from_config(
        enc_config(), env={"REPLICATOR_DATA_KEYS": KEY_A.hex()}) == A
    # configure(): installs for readers, and for writers only when enabled
    crypto.configure(enc_config(), env={"REPLICATOR_DATA_KEYS": KEY_A.hex()})
    assert crypto.installed() == A and crypto.sealing() is None
    crypto.configure(enc_config(enabled=True), env={"REPLICATOR_DATA_KEYS": KEY_A.hex()})
    assert crypto.installed() == A and crypto.sealing() == A


@pytest.mark.parametrize(("settings", "env", "setting", "message"), [
    ({"enabled": True}, {}, "encryption.key_env",
     "the environment variable REPLICATOR_DATA_KEYS is not set"),
    ({"enabled": True}, {"REPLICATOR_DATA_KEYS": " , "}, "encryption.key_env",
     "REPLICATOR_DATA_KEYS is empty"),
    ({"enabled": True}, {"REPLICATOR_DATA_KEYS": f"{KEY_A.hex()},{KEY_B.hex()[:62]}"},
     "encryption.key_env", "key 2 of 2 in the environment variable REPLICATOR_DATA_KEYS: "
     "a key of 62 hex digits"),
    ({}, {"REPLICATOR_DATA_KEYS": KEY_B.hex() + "00"}, "encryption.key_env",
     "66 hex digits"),
    ({}, {"REPLICATOR_DATA_KEYS": "not-a-key"}, "encryption.key_env", "not a key"),
    ({"enabled": True, "key_file": "missing"}, {}, "encryption.key_file", "no such file"),
    ({"enabled": True, "key_file": "empty"}, {}, "encryption.key_file", "holds no key"),
    ({"enabled": True, "key_file": "bad"}, {}, "encryption.key_file",
     "line 3: a key of 62 hex digits"),
    ({"key_file": "bad"}, {}, "encryption.key_file", "line 3"),
    ({"enabled": True, "key_file": "dir"}, {}, "encryption.key_file", "is a directory"),
])
def test_unusable_keys_are_a_config_error_naming_the_setting_not_the_key(
        tmp_path: Path, settings: dict[str, object], env: dict[str, str], setting: str,
        message: str) -> None:
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    (tmp_path / "bad").write_text(f"# keys\n{KEY_A.hex()}\n{KEY_B.hex()[:62]}\n")
    (tmp_path / "dir").mkdir()
    if "key_file" in settings:
        settings = {**settings, "key_file": tmp_path / str(settings["key_file"])}
    with pytest.raises(EncryptionKeyError) as ei:
        crypto.configure(enc_config(**settings), env=env)
    assert ei.value.setting == setting and message in str(ei.value)
    assert_no_key(str(ei.value), KEY_A, KEY_B)
    assert crypto.installed() is None  # nothing half-installed


# -- segments -------------------------------------------------------------------------------


def test_segment_round_trip_encrypted(tmp_path: Path) -> None:
    plain, enc = tmp_path / "plain.seg", tmp_path / "enc.seg"
    blocks = [TRICKY_RECORDS[:3], TRICKY_RECORDS[3:], records(200, start=7)]
    write_segment(plain, blocks, None, watermark=1_700_000_009_999)
    write_segment(enc, blocks, A, watermark=1_700_000_009_999)
    want = read_all(plain, keyring=None)
    assert read_all(enc, keyring=A) == want == [r for b in blocks for r in b]
    with SegmentReader(enc, expect_sealed=True, keyring=A) as r, \
            SegmentReader(plain, expect_sealed=True) as p:
        assert (r.header.major, r.header.key_id) == (2, A.active)
        assert (p.header.major, p.header.key_id) == (1, None)
        assert all(b.encrypted for b in r.blocks) and not any(b.encrypted for b in p.blocks)
        # the index (offsets, timestamps, counts) is the same; only payloads are sealed
        assert r.summary == p.summary and len(r.blocks) == 4
        assert [b.payload_len - p.blocks[i].payload_len for i, b in enumerate(r.blocks)] == [
            crypto.OVERHEAD] * 4
    data = enc.read_bytes()
    assert MARKER in plain.read_bytes() and MARKER not in data and b"key-10" not in data
    assert_no_key(data.hex(), KEY_A)
    # the fast walk (follower, restore) over the decrypted payloads
    with crypto.installed_as(A, encrypt=False):
        assert read_segment(enc, "enc.seg", 100) == read_segment(plain, "plain.seg", 100)


def test_the_installed_keyring_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "s.seg"
    with crypto.installed_as(A, encrypt=True):
        write_segment(path, [records(10)], crypto.INSTALLED)
        assert len(read_all(path)) == 10
    with crypto.installed_as(A, encrypt=False):  # reading only: new files are plain
        assert len(read_all(path)) == 10
        write_segment(tmp_path / "p.seg", [records(10)], crypto.INSTALLED)
    with SegmentReader(tmp_path / "p.seg", expect_sealed=True) as r:
        assert r.header.major == 1


def test_wrong_or_missing_key_names_the_file_and_the_key_id(tmp_path: Path) -> None:
    path = tmp_path / "s.seg"
    write_segment(path, [records(20), records(20, start=20)], A)
    for keyring in (None, B):
        with pytest.raises(KeyNotFoundError) as ei:
            read_all(path, keyring=keyring)
        msg = str(ei.value)
        assert str(path) in msg and A.active in msg and ei.value.key_id == A.active
        assert_no_key(msg, KEY_A, KEY_B)
        assert isinstance(ei.value, DecryptionError)
    with pytest.raises(KeyNotFoundError, match="no encryption key is configured"):
        read_all(path, keyring=None)
    # verify without any keyring: integrity by CRC (needs no key), authenticity not checked
    with SegmentReader(path, expect_sealed=True, keyring=None) as r:
        assert r.verify().records == 40 and r.unauthenticated_blocks == 2
    # with a keyring that lacks the key, data it cannot read is reported
    with SegmentReader(path, expect_sealed=True, keyring=B) as r, \
            pytest.raises(KeyNotFoundError):
        r.verify()


def test_a_block_relabelled_with_another_key_fails_authentication(tmp_path: Path) -> None:
    """The closest thing to "the wrong key": the block claims key B, B cannot open it."""
    path = tmp_path / "s.seg"
    write_segment(path, [records(20)], A)

    def relabel(blk: bytearray) -> None:
        hs = fmt.BLOCK_HEADER.size
        blk[hs:hs + 8] = bytes.fromhex(B.active)

    rewrite_block(path, 0, relabel)
    with pytest.raises(AuthenticationError) as ei:
        read_all(path, keyring=BA)
    msg = str(ei.value)
    assert str(path) in msg and B.active in msg and "authentication failed" in msg
    assert f"at byte {ei.value.position}" in msg and "(block starting at offset 0)" in msg
    assert isinstance(ei.value, CorruptSegmentError)  # every "corrupt backup" handler stops
    assert_no_key(msg, KEY_A, KEY_B)


def _flip(at: int) -> object:
    def edit(blk: bytearray) -> None:
        blk[at if at >= 0 else len(blk) + at] ^= 0x01
    return edit


def _set_max_ts(blk: bytearray) -> None:
    struct.pack_into("<q", blk, 48, struct.unpack_from("<q", blk, 48)[0] + 1)


@pytest.mark.parametrize(("what", "edit"), [
    ("ciphertext", _flip(fmt.BLOCK_HEADER.size + 8 + 12 + 5)),
    ("nonce", _flip(fmt.BLOCK_HEADER.size + 8 + 3)),
    ("tag", _flip(-1)),
    ("header max_ts", _set_max_ts),
    ("header watermark", _flip(56)),
])
def test_tampering_with_an_encrypted_block_is_detected(
        tmp_path: Path, what: str, edit: object) -> None:
    path = tmp_path / "s.seg"
    write_segment(path, [records(20), records(20, start=20)], A)
    if what == "header max_ts":  # the footer index must agree, so change it there too
        rewrite_block(path, 1, edit)
        data = bytearray(path.read_bytes())
        footer_pos, footer_len, _ = fmt.decode_trailer(bytes(data)) or (0, 0, 0)
        entry = footer_pos + fmt.FOOTER_HEAD.size + fmt.INDEX_ENTRY.size + 32
        struct.pack_into("<q", data, entry, struct.unpack_from("<q", data, entry)[0] + 1)
        footer = bytes(data[footer_pos:footer_pos + footer_len])
        struct.pack_into("<I", data, footer_pos + footer_len + 12, zlib.crc32(footer))
        path.write_bytes(bytes(data))
    else:
        rewrite_block(path, 1, edit)
    with pytest.raises(AuthenticationError) as ei:
        read_all(path, keyring=A)
    assert ei.value.offset == 20 and A.active in str(ei.value)
    # without fixing the CRC, it is an ordinary checksum failure found without any key
    path2 = tmp_path / "t.seg"
    write_segment(path2, [records(20)], A)
    data = bytearray(path2.read_bytes())
    with SegmentReader(path2, expect_sealed=True, keyring=None) as r:
        data[r.blocks[0].position + fmt.BLOCK_HEADER.size + 30] ^= 0x40
    path2.write_bytes(bytes(data))
    with SegmentReader(path2, expect_sealed=True, keyring=None) as r, \
            pytest.raises(CorruptSegmentError, match="block checksum mismatch"):
        r.verify()


def test_a_block_moved_to_another_partition_or_made_plain_is_refused(tmp_path: Path) -> None:
    p3, p4 = tmp_path / "p3.seg", tmp_path / "p4.seg"
    write_segment(p3, [records(20, marker=b"part3")], A, partition=3)
    write_segment(p4, [records(20, marker=b"part4")], A, partition=4)
    with SegmentReader(p3, expect_sealed=True, keyring=None) as r:
        m = r.blocks[0]
    three = p3.read_bytes()[m.position:m.position + m.size]
    data = bytearray(p4.read_bytes())
    with SegmentReader(p4, expect_sealed=True, keyring=None) as r:
        assert r.blocks[0].size == m.size and r.blocks[0].position == m.position
    data[m.position:m.position + m.size] = three  # same offsets, CRC valid
    p4.write_bytes(bytes(data))
    with pytest.raises(AuthenticationError):
        read_all(p4, keyring=A)
    # a plain block with valid CRC in place of a sealed one: a downgrade, refused
    plain = tmp_path / "plain.seg"
    write_segment(plain, [records(20)], None, partition=3)
    with SegmentReader(plain, expect_sealed=True) as r:
        pm = r.blocks[0]
    enc = tmp_path / "enc.seg"
    write_segment(enc, [records(20)], A, partition=3)
    enc_bytes = enc.read_bytes()
    with SegmentReader(enc, expect_sealed=True, keyring=None) as r:
        hdr_enc = r.header_len
    forged = enc_bytes[:hdr_enc] + plain.read_bytes()[pm.position:pm.position + pm.size]
    forged_path = tmp_path / "forged.active"
    forged_path.write_bytes(forged)
    with SegmentReader(forged_path, keyring=A) as r:  # scanned: the plain block is not valid
        assert r.blocks == []
    res = recover_active(forged_path, truncate=False)
    assert res.reason == "plain block in an encrypted segment" and res.blocks == []


def test_key_rotation(tmp_path: Path) -> None:
    old, new = tmp_path / "old.seg", tmp_path / "new.seg"
    write_segment(old, [records(30)], A)
    with crypto.installed_as(BA, encrypt=True):  # rotated: B first, A kept
        write_segment(new, [records(30, start=30)], crypto.INSTALLED,
                      base=30)
        assert len(read_all(old)) == 30 and len(read_all(new)) == 30
    with SegmentReader(new, expect_sealed=True, keyring=BA) as r:
        assert r.header.key_id == B.active
        assert {crypto.blob_key_id(r._stored(b)[1]) for b in r.blocks} == {B.active}
    assert len(read_all(new, keyring=B)) == 30
    with pytest.raises(KeyNotFoundError, match=A.active):
        read_all(old, keyring=B)  # A dropped too early: the old data names what it needs


def test_recovery_of_an_encrypted_active_segment_needs_no_key(tmp_path: Path) -> None:
    path = tmp_path / "a.active"
    seg = write_segment(path, [records(10), records(10, start=10), records(10, start=20)], A,
                        seal=False)
    seg.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - 7)  # torn last block
    res = recover_active(path)  # no keyring anywhere
    assert res.end_offset == 20 and res.truncated_bytes > 0
    sealed = ActiveSegment.reopen(res)  # sealing writes only the footer: no key needed
    sealed.seal()
    assert [r.offset for r in read_all(path, keyring=A)] == list(range(20))
    # appending to an encrypted file without its keyring is refused, not done in the clear
    path2 = tmp_path / "b.active"
    write_segment(path2, [records(5)], A, seal=False).close()
    seg2 = ActiveSegment.reopen(recover_active(path2), keyring=None)
    b = BlockBuilder(5)
    b.append(5, 1, 0, None, b"x", [])
    blk = b.take()
    assert blk is not None
    with pytest.raises(ValueError, match="needs a keyring"):
        seg2.write(blk)
    seg2.close()


def frames(blocks: list[bytes], topic: str = "attendance", partition: int = 3) -> bytes:
    t = topic.encode()
    return b"".join(TAIL_FRAME.pack(1000 + i, partition, len(b), len(t)) + t + b
                    for i, b in enumerate(blocks))


def test_live_tail_frames_decrypt_and_are_authenticated(tmp_path: Path) -> None:
    enc_blocks: list[bytes] = []
    plain_blocks: list[bytes] = []
    for keyring, out, name in ((A, enc_blocks, "e"), (None, plain_blocks, "p")):
        seg = ActiveSegment.create(tmp_path / f"{name}.active", topic="attendance",
                                   partition=3, base_offset=0, keyring=keyring)
        b = BlockBuilder(0)
        for chunk in (records(10), records(10, start=10)):
            for r in chunk:
                b.append(r.offset, r.timestamp, 0, r.key, r.value, r.headers)
            blk = b.take()
            assert blk is not None
            seg.write(blk)
            out.append(seg.last_block)
        seg.close()
    starts = {("attendance", 3): 5}
    got = decode_frames(frames(enc_blocks), starts, keyring=A)
    want = decode_frames(frames(plain_blocks), starts, keyring=None)
    assert [c.records for c in got] == [c.records for c in want] and len(got[0].records) == 15
    with pytest.raises(KeyNotFoundError, match=A.active):
        decode_frames(frames(enc_blocks), starts, keyring=B)
    # a frame claiming another partition: the block's associated data names partition 3
    with pytest.raises(AuthenticationError):
        decode_frames(frames(enc_blocks, partition=4), {("attendance", 4): 0}, keyring=A)
    # tampered ciphertext with a recomputed CRC
    bad = bytearray(enc_blocks[1])
    hs = fmt.BLOCK_HEADER.size
    bad[hs + 40] ^= 0x80
    struct.pack_into("<I", bad, 4, fmt.block_crc(bytes(bad[:hs]), bytes(bad[hs:])))
    with pytest.raises(AuthenticationError):
        decode_frames(frames([enc_blocks[0], bytes(bad)]), starts, keyring=A)


async def test_spool_writes_encrypted_blocks_and_recovers_them_without_a_key(
        tmp_path: Path) -> None:
    store = LocalStore(root=tmp_path / "store")
    with crypto.installed_as(A, encrypt=True):
        spool = Spool(settings=SpoolSettings(data_dir=tmp_path), store=store,
                      metrics=Metrics())
        plog = await spool.open_partition("attendance", 3)
        plog.start_at(0)
        plog.tail(0)  # a follower is asking: durable blocks are kept for the tail
        assert plog.builder is not None
        for r in records(50):
            plog.builder.append(r.offset, r.timestamp, 0, r.key, r.value, r.headers)
        await spool.flush()
        served, _ = plog.tail(0)
        assert len(served) == 1 and decode_frames(
            frames([served[0][1]]), {("attendance", 3): 0})[0].end == 50
        assert plog.active is not None
        active = plog.active.path
        assert MARKER not in active.read_bytes()
        plog.close_sync()  # a crash: the active segment stays in the spool
        await spool.stop()
    # restart without any key: the leftover is recovered, sealed and shipped by CRC alone
    spool2 = Spool(settings=SpoolSettings(data_dir=tmp_path), store=store, metrics=Metrics())
    plog2 = await spool2.open_partition("attendance", 3)
    assert plog2.store_end == 50 and not active.exists()
    await spool2.stop()
    name = naming.segment_name("attendance", 3, 0, 50)
    stored = tmp_path / "store" / name
    assert [r.offset for r in read_all(stored, keyring=A)] == list(range(50))
    # an overlapping leftover is trimmed: that re-encodes records, so it needs the key
    leftover = naming.sealed_spool_path(tmp_path, "attendance", 3, 0, 80)
    write_segment(leftover, [records(40), records(40, start=40)], A)
    with crypto.installed_as(BA, encrypt=True):
        spool3 = Spool(settings=SpoolSettings(data_dir=tmp_path), store=store,
                       metrics=Metrics())
        plog3 = await spool3.open_partition("attendance", 3)
        assert plog3.store_end == 80
        await spool3.stop()
        trimmed = tmp_path / "store" / naming.segment_name("attendance", 3, 50, 80)
        with SegmentReader(trimmed, expect_sealed=True) as tr:
            assert tr.header.key_id == B.active  # re-written with the current key
            assert [x.offset for x in tr.iter_records()] == list(range(50, 80))


# -- snapshots ------------------------------------------------------------------------------


def write_snap(path: Path, es: list[sfmt.Entry], keyring: Keyring | None,
               meta: dict[str, object] | None = None) -> SnapshotFileWriter:
    w = SnapshotFileWriter(path, meta or {"snapshot_id": "s1", "topic": "t"}, keyring=keyring)
    for e in es:
        w.add(*e)
    w.flush_block()
    w.finish({"entries": len(es), "content_hash": w.content_hash})
    return w


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sfile, "BLOCK_TARGET", 2048)


def test_snapshot_round_trip_encrypted(tmp_path: Path, small_blocks: None) -> None:
    es = entries(2000)
    plain, enc = tmp_path / "p.snap", tmp_path / "e.snap"
    assert write_snap(plain, es, None).key_id is None
    assert write_snap(enc, es, A).key_id == A.active
    with SnapshotFileReader(enc, keyring=A) as r, SnapshotFileReader(plain) as p:
        assert r.key_id == A.active and p.key_id is None
        assert list(r) == list(p) == es and len(r.blocks) > 20
        assert r.verify() == p.verify() and r.summary == p.summary
        assert [(b.first_key, b.last_key, b.entries) for b in r.blocks] == [
            (b.first_key, b.last_key, b.entries) for b in p.blocks]
        for i in (0, 7, 1234, 1999):
            key = f"k{i:06d}-é"
            assert r.lookup(key) == p.lookup(key) == [e for e in es if e[0] == key]
    data = enc.read_bytes()
    # neither values nor keys (which the footer index holds) are readable in the file
    assert b'"op":"upsert"' not in data and "k001234-é".encode() not in data
    assert b'"op":"upsert"' in plain.read_bytes()


def test_snapshot_without_the_key_or_tampered_is_refused(tmp_path: Path,
                                                         small_blocks: None) -> None:
    es = entries(500)
    enc = tmp_path / "e.snap"
    write_snap(enc, es, A)
    for keyring in (None, B):
        with pytest.raises(KeyNotFoundError) as ei:
            SnapshotFileReader(enc, keyring=keyring)
        assert str(enc) in str(ei.value) and ei.value.key_id == A.active
    with SnapshotFileReader(enc, keyring=BA) as r:  # rotation: A still opens it
        assert r.verify()[0] == len(es)
        b1 = r.blocks[1]
    # a ciphertext byte changed, CRC fixed: authentication fails, nothing is returned
    data = bytearray(enc.read_bytes())
    hs = sfmt.BLOCK_HEADER.size
    data[b1.position + hs + 30] ^= 0x04
    body = bytes(data[b1.position + hs:b1.position + hs + b1.payload_len])
    struct.pack_into("<I", data, b1.position + 4,
                     zlib.crc32(body, zlib.crc32(bytes(data[b1.position + 8:b1.position + hs]))))
    bad = tmp_path / "bad.snap"
    bad.write_bytes(bytes(data))
    with SnapshotFileReader(bad, keyring=A) as r:
        assert r.lookup(es[0][0]) == [e for e in es if e[0] == es[0][0]]  # block 0 is fine
        with pytest.raises(SnapshotAuthenticationError) as si:
            list(r)
    assert isinstance(si.value, CorruptSnapshotError) and si.value.position == b1.position
    assert "authentication failed with key " + A.active in str(si.value)
    # a block of another snapshot (same size, same position) is refused: bound to its file
    other = tmp_path / "o.snap"
    write_snap(other, es, A, meta={"snapshot_id": "s2", "topic": "t"})
    with SnapshotFileReader(other, keyring=A) as r:
        ob = r.blocks[1]
    assert (ob.position, ob.payload_len) == (b1.position, b1.payload_len)
    spliced = bytearray(enc.read_bytes())
    spliced[b1.position:b1.position + b1.size] = other.read_bytes()[
        ob.position:ob.position + ob.size]
    bad.write_bytes(bytes(spliced))
    with SnapshotFileReader(bad, keyring=A) as r, pytest.raises(SnapshotAuthenticationError):
        r.verify()
    # the footer is sealed too: a changed index byte (CRC fixed) fails before any use
    data = bytearray(enc.read_bytes())
    footer_pos, footer_len, _crc, _m = sfmt.TRAILER.unpack(bytes(data[-sfmt.TRAILER.size:]))
    data[footer_pos + sfmt.FOOTER_HEAD.size + 20 + 3] ^= 0x01
    struct.pack_into("<I", data, len(data) - sfmt.TRAILER.size + 12,
                     zlib.crc32(bytes(data[footer_pos:footer_pos + footer_len])))
    bad.write_bytes(bytes(data))
    with pytest.raises(SnapshotAuthenticationError, match="the footer was altered"):
        SnapshotFileReader(bad, keyring=A)


def test_manifest_records_the_key_id() -> None:
    f = SnapshotFile(topic="t", entity="t", name="t.snap", bytes=1, entries=1, live=1,
                     tombstones=0, digest="1:00", key_id=A.active)
    sid = naming.snapshot_id(1_000, "full", "abc123")
    m = Manifest(id=sid, kind="full", time_ms=1_000, created_ms=2, parent=None, cut={},
                 start={}, files=(f, replace(f, topic="u", name="u.snap", key_id=None)))
    doc = orjson.loads(m.encode())
    assert doc["files"][0]["key_id"] == A.active and "key_id" not in doc["files"][1]
    assert Manifest.decode(m.encode(), "manifest.json").files == m.files


def test_compaction_runs_are_sealed_with_a_throwaway_key(tmp_path: Path) -> None:
    from replicator.compaction import build

    es = entries(3000)
    run_kr = Keyring.from_keys([os.urandom(32)])
    p = tmp_path / "run"
    build._write_run(p, es, run_kr)
    assert b'"op":"upsert"' not in p.read_bytes()
    assert list(build._read_run(p, run_kr)) == es
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(AuthenticationError):
        list(build._read_run(p, run_kr))


# -- the command line over synthetic stores -------------------------------------------------


def write_config(path: Path, store: Path, data: Path, encryption: str = "") -> Path:
    topics = ", ".join(f'"{t}"' for t in ENTITIES)
    path.write_text(f"""[kafka]
bootstrap_servers = "127.0.0.1:1"
topics = [{topics}]

[store]
url = "{store}"

[ingest]
data_dir = "{data}"

[server]
port = 0

[retention]
enabled = false
{encryption}""")
    return path


def cli(config: Path, *args: str, keys: str | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    if keys is not None:
        env["REPLICATOR_DATA_KEYS"] = keys
    return subprocess.run(
        [sys.executable, "-m", "replicator", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env,
        stdin=subprocess.DEVNULL, check=False)


def restore_digests(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as c:
        (digests,) = c.execute("SELECT digests FROM replicator_restores").fetchone()
    out: dict[str, str] = orjson.loads(digests)
    return out


@pytest.mark.parametrize("command", [["segments", "list"], ["run"],
                                     ["restore", "--at", "latest", "--target", "sqlite:///x"]])
@pytest.mark.parametrize(("encryption", "keys", "setting"), [
    ("[encryption]\nenabled = true\n", None, "encryption.key_env"),
    ("[encryption]\nenabled = true\n", KEY_A.hex()[:62], "encryption.key_env"),
    ('[encryption]\nenabled = true\nkey_file = "/nonexistent/keys"\n', KEY_A.hex(),
     "encryption.key_file"),
])
def test_commands_refuse_to_start_with_unusable_keys(
        tmp_path: Path, command: list[str], encryption: str, keys: str | None,
        setting: str) -> None:
    cfg = write_config(tmp_path / "r.toml", tmp_path / "store", tmp_path / "data", encryption)
    res = cli(cfg, *command, keys=keys, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"replicator: error: bad configuration: {setting}: "), res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    assert_no_key(res.stderr, KEY_A)


def reencrypt(path: Path, keyring: Keyring) -> None:
    """Rewrite a plain sealed segment, block for block, as an encrypted one."""
    out = path.with_name(path.name + ".enc")
    with SegmentReader(path, expect_sealed=True, keyring=None) as r:
        seg = ActiveSegment.create(out, topic=r.header.topic, partition=r.header.partition,
                                   base_offset=r.header.base_offset, keyring=keyring)
        for meta in r.blocks:
            _head, payload = r._stored(meta)
            seg.write(PendingBlock(
                raw=fmt.decompress_payload(meta, payload, r.name), records=meta.records,
                start=meta.start, end=meta.end, min_ts=meta.min_ts, max_ts=meta.max_ts,
                watermark_ms=meta.watermark_ms, flags=meta.flags & fmt.FLAG_WATERMARK))
        seg.seal()
    os.replace(out, path)


@pytest.fixture(scope="module")
def plain_history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("plain"), events=1500, seed=5)


@pytest.fixture(scope="module")
def encrypted_history(tmp_path_factory: pytest.TempPathFactory) -> History:
    with crypto.installed_as(A, encrypt=True):
        return build_history(tmp_path_factory.mktemp("enc"), events=1500, seed=5)


def test_restore_of_an_encrypted_store_equals_the_plain_one(
        tmp_path: Path, plain_history: History, encrypted_history: History) -> None:
    segs = sorted((encrypted_history.store_root / "segments").rglob("*.seg"))
    assert len(segs) > 9
    for p in segs:
        with SegmentReader(p, expect_sealed=True, keyring=None) as r:
            assert r.header.major == 2 and r.header.key_id == A.active
    kf = tmp_path / "keys"
    kf.write_text(f"# data key\n{KEY_A.hex()}\n")
    kf.chmod(0o600)
    plain_cfg = write_config(tmp_path / "p.toml", plain_history.store_root, tmp_path / "pd")
    enc_cfg = write_config(tmp_path / "e.toml", encrypted_history.store_root, tmp_path / "ed",
                           f'[encryption]\nenabled = true\nkey_file = "{kf}"\n')
    pdb, edb = tmp_path / "p.db", tmp_path / "e.db"
    res = cli(plain_cfg, "restore", "--at", "latest", "--target", f"sqlite://{pdb}")
    assert res.returncode == 0, res.stderr
    res = cli(enc_cfg, "restore", "--at", "latest", "--target", f"sqlite://{edb}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].endswith("digest ok")
    assert restore_digests(edb) == restore_digests(pdb) and len(restore_digests(pdb)) == 3
    # the same store with no key configured: one line naming the file and the key id needed
    nokey = cli(write_config(tmp_path / "n.toml", encrypted_history.store_root,
                             tmp_path / "nd"),
                "restore", "--at", "latest", "--target", f"sqlite://{tmp_path / 'n.db'}")
    assert nokey.returncode == 4, nokey.stderr
    line = nokey.stderr.strip().splitlines()
    assert len(line) == 1 and A.active in line[0] and "segments/" in line[0], nokey.stderr
    assert "no encryption key is configured" in line[0]
    assert not (tmp_path / "n.db").exists()
    # a wrong key: names the key id needed and the one it has
    wrong = cli(write_config(tmp_path / "w.toml", encrypted_history.store_root,
                             tmp_path / "wd", "[encryption]\nenabled = true\n"),
                "restore", "--at", "latest", "--target", f"sqlite://{tmp_path / 'w.db'}",
                keys=KEY_B.hex())
    assert wrong.returncode == 4 and A.active in wrong.stderr and B.active in wrong.stderr
    assert_no_key(wrong.stderr + wrong.stdout, KEY_A, KEY_B)
    # segments verify: with the key everything is authenticated; without any key, CRC only
    # (each segment noted "unverifiable", not a failure); with a keyring that cannot read
    # the data, that is a problem worth reporting (no restore could read it)
    for config, keys, code, kinds in ((enc_cfg, None, 0, set()),
                                      (tmp_path / "n.toml", None, 0, {"unverifiable"}),
                                      (tmp_path / "w.toml", KEY_B.hex(), 4, {"unreadable"})):
        res = cli(config, "segments", "verify", "--json", keys=keys)
        assert res.returncode == code, res.stderr
        doc = orjson.loads(res.stdout)
        assert doc["segments"] == (0 if code else len(segs)), doc
        assert {p["kind"] for p in doc["problems"]} == kinds
        assert len(doc["problems"]) == (len(segs) if kinds else 0)
        if code:
            assert all(A.active in p["detail"] for p in doc["problems"])
        elif kinds:
            assert all("CRC only" in p["detail"] for p in doc["problems"])


def test_mixed_store_rotation_compaction_and_restore(
        tmp_path: Path, plain_history: History) -> None:
    """Plain segments, then some encrypted with A; a snapshot built after rotating to B (in
    the compaction child process of the service's scheduler); every restore agrees."""
    import shutil

    from replicator.compaction.schedule import Scheduler

    store = tmp_path / "store"
    shutil.copytree(plain_history.store_root, store)
    by_part: dict[Path, list[Path]] = {}
    for p in sorted((store / "segments").rglob("*.seg")):
        by_part.setdefault(p.parent, []).append(p)
    for segs in by_part.values():
        for p in segs[len(segs) // 2:]:  # the newer half: written after encryption was on
            reencrypt(p, A)
    majors = []
    for p in sorted((store / "segments").rglob("*.seg")):
        with SegmentReader(p, expect_sealed=True, keyring=None) as r:
            majors.append(r.header.major)
    assert set(majors) == {1, 2}
    kf = tmp_path / "keys"
    kf.write_text(f"{KEY_B.hex()}\n{KEY_A.hex()}\n")  # rotated: B seals, A still opens
    kf.chmod(0o600)
    cfg = write_config(tmp_path / "r.toml", store, tmp_path / "data",
                       f'[encryption]\nenabled = true\nkey_file = "{kf}"\n')

    # the service's scheduler runs compaction as a child process: it must get the keys
    async def listed() -> list[Manifest]:
        return []

    sched = Scheduler(compaction=CompactionSettings(),
                      retention=replace(RetentionSettings(), enabled=False),
                      list_snapshots=listed, config_path=cfg)
    kind = asyncio.run(sched.check())
    assert kind == "full" and sched.last_error is None and sched.last_result is not None
    snap_dir = store / "snapshots" / str(sched.last_result["id"])
    manifest = Manifest.decode((snap_dir / "manifest.json").read_bytes(), "m")
    assert {f.key_id for f in manifest.files} == {B.active}
    for f in manifest.files:
        with SnapshotFileReader(snap_dir / f.name, keyring=BA) as sr:
            assert sr.key_id == B.active
        with pytest.raises(KeyNotFoundError):
            SnapshotFileReader(snap_dir / f.name, keyring=A)
    # restore through the snapshot (encrypted, key B) + segments (plain and key A)
    db = tmp_path / "r.db"
    res = cli(cfg, "restore", "--at", "latest", "--target", f"sqlite://{db}")
    assert res.returncode == 0, res.stderr
    pdb = tmp_path / "p.db"
    res = cli(write_config(tmp_path / "p.toml", plain_history.store_root, tmp_path / "pd"),
              "restore", "--at", "latest", "--target", f"sqlite://{pdb}")
    assert res.returncode == 0, res.stderr
    assert restore_digests(db) == restore_digests(pdb)
    # the keys from the environment instead of the file work the same way
    env_cfg = write_config(tmp_path / "e.toml", store, tmp_path / "edata",
                           "[encryption]\nenabled = true\n")
    edb = tmp_path / "e.db"
    res = cli(env_cfg, "restore", "--at", "latest", "--target", f"sqlite://{edb}",
              keys=f"{KEY_B.hex()},{base64.b64encode(KEY_A).decode()}")
    assert res.returncode == 0, res.stderr
    assert restore_digests(edb) == restore_digests(pdb)


def test_check_segment_file_without_keys_is_unverifiable_not_corrupt(tmp_path: Path) -> None:
    """`verify` on a host without any key: encrypted segments are noted (CRC checked, tags
    and records not), never reported corrupt; with the key every check runs; with keys
    that lack it, the file is a problem (no restore could read it). Found in review."""
    from replicator import naming
    from replicator.catalog import check_segment_file
    from replicator.ops.verify import finding_of

    name = naming.segment_name("attendance", 3, 0, 10)
    path = tmp_path / "seg"
    write_segment(path, [records(4), records(6, start=4)], A, partition=3)
    with crypto.installed_as(None, encrypt=False):
        entry, problem = check_segment_file(path, name)
        assert entry is not None and problem is not None and problem.kind == "unverifiable"
        assert finding_of(problem).kind == "unverifiable" and not finding_of(problem).is_problem
    with crypto.installed_as(A, encrypt=False):
        assert check_segment_file(path, name)[1] is None
    with crypto.installed_as(Keyring.from_keys([bytes(32)]), encrypt=False):
        _entry, problem = check_segment_file(path, name)
        assert problem is not None and problem.kind == "unreadable"
        assert A.active in problem.detail and finding_of(problem).kind == "corrupt"
