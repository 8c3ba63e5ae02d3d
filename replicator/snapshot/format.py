"""Byte-level snapshot file format, versions 1 and 2 (specified in docs/FORMAT.md §7).

A snapshot file holds, for one topic, the last change of every key in every partition where
the key occurs (normally one), as of the snapshot's cut -- sorted by ``(key, partition)``::

    file header | block | block | ... | footer | trailer

All integers little-endian; checksums CRC-32 (zlib polynomial), like segments.

Invariants:
- Entries are strictly increasing in ``(key as UTF-8 bytes, partition)``; byte order of
  UTF-8 equals code point order, so a reader can compare ``str`` keys.
- A key's entries never straddle two blocks, so the block a key lives in is found from the
  footer's sparse index (first and last key of each block) alone.
- An entry keeps the stored change as received: value (event JSON), Kafka key and encoded
  headers, with offset, timestamp and version; a delete is kept as a tombstone (no value)
  so that layering snapshots and segments equals replaying segments (docs/FORMAT.md §7.3).
- The footer carries the block index and a JSON summary (counts, digest); the trailer
  locates and checksums the footer. A file without a valid trailer is never used.
- Version 2 (docs/FORMAT.md §7.5) seals every block payload and the footer's index and
  summary (they hold keys) with AES-256-GCM, bound to the file header, their position and
  their header fields; CRCs cover the stored bytes. A file is all plain (1) or all sealed
  (2); a reader refuses a block that disagrees with its file.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lz4.block
import orjson

from replicator import crypto
from replicator.crypto import Keyring
from replicator.errors import CorruptSnapshotError
from replicator.segment.format import FILE_HEADER, decode_meta_header, encode_meta_header

FORMAT_MAJOR = 1
FORMAT_MINOR = 0
#: encrypted files (§7.5); a major-1 reader refuses them
FORMAT_MAJOR_ENCRYPTED = 2
SUPPORTED_MAJORS = (FORMAT_MAJOR, FORMAT_MAJOR_ENCRYPTED)

FILE_MAGIC = b"RPLSNAP\n"
BLOCK_MAGIC = b"RSB1"
FOOTER_MAGIC = b"RSFT"
TRAILER_MAGIC = b"RPLSNPND"

CODEC_NONE = 0
CODEC_LZ4 = 1
FLAG_DELETE = 0x01  # entry flag
BLOCK_FLAG_ENCRYPTED = 0x01  # block header flag: the payload is a sealed blob (format 2)
#: starts of the associated data of sealed blocks and footers (§7.5)
BLOCK_AAD_PREFIX = b"replicator snapshot block\x00"
FOOTER_AAD_PREFIX = b"replicator snapshot footer\x00"

#: magic, crc (of header bytes [8, 24) + payload), payload_len, raw_len, entries, codec,
#: flags, reserved
BLOCK_HEADER = struct.Struct("<4sIIIIBBH")
BLOCK_CRC_FROM = 8
#: partition, offset, timestamp_ms, version (-1: none), flags, key_len, kafka_key_len (-1:
#: null), value_len (-1: tombstone), headers_len
ENTRY = struct.Struct("<IqqqBHiiI")
#: magic, block_count, index_len, summary_len
FOOTER_HEAD = struct.Struct("<4sIII")
#: position, payload_len, entries, first_key_len, last_key_len (keys follow)
INDEX_ENTRY = struct.Struct("<QIIHH")
#: footer_pos, footer_len, footer_crc, magic
TRAILER = struct.Struct("<QII8s")

MAX_BLOCK_RAW = 64 * 1024 * 1024
MAX_KEY_BYTES = 0xFFFF

#: One entry as decoded: key, partition, offset, ts_ms, version (-1: none), value (None: a
#: delete), Kafka key, encoded headers.
Entry = tuple[str, int, int, int, int, bytes | None, bytes | None, bytes]


def encode_file_header(meta: dict[str, Any], key_id: str | None = None) -> bytes:
    """The file header; with ``key_id`` (the sealing key's id) an encrypted, format 2 one."""
    if key_id is None:
        return encode_meta_header(FILE_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, meta)
    return encode_meta_header(FILE_MAGIC, FORMAT_MAJOR_ENCRYPTED, FORMAT_MINOR,
                              {**meta, "cipher": crypto.CIPHER, "key_id": key_id})


def decode_file_header(buf: bytes, path: str) -> tuple[dict[str, Any], int, bool]:
    """(meta, encoded length, encrypted) of a file header."""
    major, _minor, meta, end = decode_meta_header(buf, path, FILE_MAGIC, SUPPORTED_MAJORS,
                                                  CorruptSnapshotError)
    encrypted = major >= FORMAT_MAJOR_ENCRYPTED
    if encrypted and meta.get("cipher") != crypto.CIPHER:
        raise CorruptSnapshotError(path, 0, f"unknown cipher {meta.get('cipher')!r} in an "
                                   "encrypted snapshot's header")
    return meta, end, encrypted


def file_context(header: bytes) -> bytes:
    """What every sealed part of a file is bound to: SHA-256 of its encoded file header
    (snapshot id, topic, kind, time, key id), so a block or footer cannot be moved to
    another file."""
    return hashlib.sha256(header).digest()


def encode_entry(key: bytes, partition: int, offset: int, ts: int, version: int,
                 value: bytes | None, kafka_key: bytes | None, headers: bytes) -> bytes:
    """One entry's bytes (``key`` already UTF-8)."""
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"key longer than {MAX_KEY_BYTES} bytes")
    return b"".join((
        ENTRY.pack(partition, offset, ts, version, FLAG_DELETE if value is None else 0,
                   len(key), -1 if kafka_key is None else len(kafka_key),
                   -1 if value is None else len(value), len(headers)),
        key, kafka_key or b"", value or b"", headers,
    ))


def iter_entries(raw: bytes) -> Iterator[Entry]:
    """Decode the entries of one uncompressed block payload."""
    unpack = ENTRY.unpack_from
    esize = ENTRY.size
    pos = 0
    size = len(raw)
    while pos < size:
        partition, offset, ts, version, _flags, klen, kklen, vlen, hlen = unpack(raw, pos)
        pos += esize
        key = raw[pos:pos + klen].decode()
        pos += klen
        kkey: bytes | None = None
        if kklen >= 0:
            kkey = raw[pos:pos + kklen]
            pos += kklen
        value: bytes | None = None
        if vlen >= 0:
            value = raw[pos:pos + vlen]
            pos += vlen
        headers = raw[pos:pos + hlen]
        pos += hlen
        if pos > size:
            raise ValueError("entry runs past the end of the block")
        yield key, partition, offset, ts, version, value, kkey, headers


@dataclass(frozen=True, slots=True)
class BlockRef:
    """A block as the footer index describes it."""

    position: int
    payload_len: int
    entries: int
    first_key: str
    last_key: str

    @property
    def size(self) -> int:
        return BLOCK_HEADER.size + self.payload_len


@dataclass(frozen=True, slots=True)
class Sealing:
    """How the sealed parts of one file are sealed or opened: the keyring and the file's
    :func:`file_context`."""

    keyring: Keyring | None
    context: bytes


def _block_aad(sealing: Sealing, position: int, fields: bytes) -> bytes:
    return BLOCK_AAD_PREFIX + sealing.context + struct.pack("<Q", position) + fields


def encode_block(raw: bytes, entries: int, *, position: int = 0,
                 sealing: Sealing | None = None) -> bytes:
    """A whole block; with ``sealing`` (whose keyring seals) the payload is sealed, bound to
    the file, the block's ``position`` in it and its header fields."""
    payload: bytes = lz4.block.compress(raw, store_size=False)
    codec = CODEC_LZ4
    if len(payload) >= len(raw):
        payload, codec = raw, CODEC_NONE
    flags = 0
    plen = len(payload)
    if sealing is not None:
        flags, plen = BLOCK_FLAG_ENCRYPTED, plen + crypto.OVERHEAD
    head = BLOCK_HEADER.pack(BLOCK_MAGIC, 0, plen, len(raw), entries, codec, flags, 0)
    if sealing is not None:
        assert sealing.keyring is not None
        payload = sealing.keyring.seal(payload,
                                       _block_aad(sealing, position, head[BLOCK_CRC_FROM:]))
    crc = zlib.crc32(payload, zlib.crc32(head[BLOCK_CRC_FROM:]))
    return BLOCK_HEADER.pack(BLOCK_MAGIC, crc, plen, len(raw), entries, codec, flags,
                             0) + payload


def decode_block(buf: bytes | memoryview | mmap.mmap, ref: BlockRef, path: str,
                 sealing: Sealing | None = None) -> bytes:
    """The checked, uncompressed payload of the block ``ref`` points at in ``buf``; a file
    is encrypted exactly when ``sealing`` is given (its keyring opens the block)."""
    pos = ref.position
    head = bytes(buf[pos:pos + BLOCK_HEADER.size])
    if len(head) != BLOCK_HEADER.size:
        raise CorruptSnapshotError(path, pos, "block header past the end of the file")
    magic, crc, plen, raw_len, entries, codec, flags, _r = BLOCK_HEADER.unpack(head)
    if magic != BLOCK_MAGIC or plen != ref.payload_len or entries != ref.entries:
        raise CorruptSnapshotError(path, pos, "block header disagrees with the footer index")
    payload = buf[pos + BLOCK_HEADER.size:pos + BLOCK_HEADER.size + plen]
    if zlib.crc32(payload, zlib.crc32(head[BLOCK_CRC_FROM:])) != crc:
        raise CorruptSnapshotError(path, pos, "block checksum mismatch")
    if raw_len > MAX_BLOCK_RAW:
        raise CorruptSnapshotError(path, pos, "block larger than the format allows")
    if bool(flags & BLOCK_FLAG_ENCRYPTED) != (sealing is not None):
        raise CorruptSnapshotError(path, pos, "plain block in an encrypted (format 2) snapshot"
                                   if sealing is not None
                                   else "encrypted block in a format 1 snapshot")
    if sealing is not None:
        payload = crypto.open_blob(sealing.keyring, payload,
                                   _block_aad(sealing, pos, head[BLOCK_CRC_FROM:]),
                                   name=path, position=pos, snapshot=True)
    if codec == CODEC_NONE:
        return bytes(payload)
    if codec != CODEC_LZ4:
        raise CorruptSnapshotError(path, pos, f"unknown codec {codec}")
    try:
        return lz4.block.decompress(payload, uncompressed_size=raw_len)  # type: ignore[no-any-return]
    except lz4.block.LZ4BlockError as exc:
        raise CorruptSnapshotError(path, pos, f"lz4: {exc}") from None


def _footer_aad(sealing: Sealing, footer_pos: int, head: bytes) -> bytes:
    return FOOTER_AAD_PREFIX + sealing.context + struct.pack("<Q", footer_pos) + head


def encode_footer(blocks: list[BlockRef], summary: dict[str, Any], *, footer_pos: int = 0,
                  sealing: Sealing | None = None) -> bytes:
    """The footer at ``footer_pos``; with ``sealing`` its index and summary are one sealed
    blob (they hold keys of the data)."""
    index = bytearray()
    for b in blocks:
        fk, lk = b.first_key.encode(), b.last_key.encode()
        index += INDEX_ENTRY.pack(b.position, b.payload_len, b.entries, len(fk), len(lk))
        index += fk + lk
    body = orjson.dumps(summary, option=orjson.OPT_SORT_KEYS)
    head = FOOTER_HEAD.pack(FOOTER_MAGIC, len(blocks), len(index), len(body))
    if sealing is None:
        return head + bytes(index) + body
    assert sealing.keyring is not None
    return head + sealing.keyring.seal(bytes(index) + body,
                                       _footer_aad(sealing, footer_pos, head))


def encode_trailer(footer_pos: int, footer: bytes) -> bytes:
    return TRAILER.pack(footer_pos, len(footer), zlib.crc32(footer), TRAILER_MAGIC)


def decode_footer(buf: bytes | memoryview | mmap.mmap, size: int, path: str,
                  sealing: Sealing | None = None) -> tuple[list[BlockRef], dict[str, Any], int]:
    """Block index, summary and the footer's position, from a whole file's bytes (an
    encrypted file's footer is opened with ``sealing``)."""
    if size < FILE_HEADER.size + TRAILER.size:
        raise CorruptSnapshotError(path, 0, "file too short to be a snapshot")
    footer_pos, footer_len, crc, magic = TRAILER.unpack(bytes(buf[size - TRAILER.size:size]))
    if magic != TRAILER_MAGIC:
        raise CorruptSnapshotError(path, size - TRAILER.size, "no trailer (incomplete file)")
    if footer_pos + footer_len + TRAILER.size != size:
        raise CorruptSnapshotError(path, footer_pos, "footer position out of range")
    footer = bytes(buf[footer_pos:footer_pos + footer_len])
    if zlib.crc32(footer) != crc:
        raise CorruptSnapshotError(path, footer_pos, "footer checksum mismatch")
    if footer_len < FOOTER_HEAD.size:
        raise CorruptSnapshotError(path, footer_pos, "malformed footer")
    fmagic, count, index_len, summary_len = FOOTER_HEAD.unpack_from(footer, 0)
    sealed = crypto.OVERHEAD if sealing is not None else 0
    if (fmagic != FOOTER_MAGIC
            or FOOTER_HEAD.size + sealed + index_len + summary_len != footer_len):
        raise CorruptSnapshotError(path, footer_pos, "malformed footer")
    pos = FOOTER_HEAD.size
    if sealing is not None:
        head = footer[:FOOTER_HEAD.size]
        footer = head + crypto.open_blob(
            sealing.keyring, footer[FOOTER_HEAD.size:], _footer_aad(sealing, footer_pos, head),
            name=path, position=footer_pos, what="footer", snapshot=True)
    blocks: list[BlockRef] = []
    for _ in range(count):
        bpos, plen, entries, fkl, lkl = INDEX_ENTRY.unpack_from(footer, pos)
        pos += INDEX_ENTRY.size
        fk = footer[pos:pos + fkl].decode()
        pos += fkl
        lk = footer[pos:pos + lkl].decode()
        pos += lkl
        blocks.append(BlockRef(bpos, plen, entries, fk, lk))
    summary = orjson.loads(footer[pos:pos + summary_len])
    return blocks, summary, footer_pos
