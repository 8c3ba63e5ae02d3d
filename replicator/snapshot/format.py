"""Byte-level snapshot file format, version 1 (specified in docs/FORMAT.md §7).

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
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lz4.block
import orjson

from replicator.errors import CorruptSnapshotError
from replicator.segment.format import FILE_HEADER, decode_meta_header, encode_meta_header

FORMAT_MAJOR = 1
FORMAT_MINOR = 0

FILE_MAGIC = b"RPLSNAP\n"
BLOCK_MAGIC = b"RSB1"
FOOTER_MAGIC = b"RSFT"
TRAILER_MAGIC = b"RPLSNPND"

CODEC_NONE = 0
CODEC_LZ4 = 1
FLAG_DELETE = 0x01

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


def encode_file_header(meta: dict[str, Any]) -> bytes:
    return encode_meta_header(FILE_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, meta)


def decode_file_header(buf: bytes, path: str) -> tuple[dict[str, Any], int]:
    _major, _minor, meta, end = decode_meta_header(buf, path, FILE_MAGIC, FORMAT_MAJOR,
                                                   CorruptSnapshotError)
    return meta, end


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


def encode_block(raw: bytes, entries: int) -> bytes:
    payload: bytes = lz4.block.compress(raw, store_size=False)
    codec = CODEC_LZ4
    if len(payload) >= len(raw):
        payload, codec = raw, CODEC_NONE
    head = BLOCK_HEADER.pack(BLOCK_MAGIC, 0, len(payload), len(raw), entries, codec, 0, 0)
    crc = zlib.crc32(payload, zlib.crc32(head[BLOCK_CRC_FROM:]))
    return BLOCK_HEADER.pack(BLOCK_MAGIC, crc, len(payload), len(raw), entries, codec, 0,
                             0) + payload


def decode_block(buf: bytes | memoryview | mmap.mmap, ref: BlockRef, path: str) -> bytes:
    """The checked, uncompressed payload of the block ``ref`` points at in ``buf``."""
    pos = ref.position
    head = bytes(buf[pos:pos + BLOCK_HEADER.size])
    if len(head) != BLOCK_HEADER.size:
        raise CorruptSnapshotError(path, pos, "block header past the end of the file")
    magic, crc, plen, raw_len, entries, codec, _f, _r = BLOCK_HEADER.unpack(head)
    if magic != BLOCK_MAGIC or plen != ref.payload_len or entries != ref.entries:
        raise CorruptSnapshotError(path, pos, "block header disagrees with the footer index")
    payload = buf[pos + BLOCK_HEADER.size:pos + BLOCK_HEADER.size + plen]
    if zlib.crc32(payload, zlib.crc32(head[BLOCK_CRC_FROM:])) != crc:
        raise CorruptSnapshotError(path, pos, "block checksum mismatch")
    if raw_len > MAX_BLOCK_RAW:
        raise CorruptSnapshotError(path, pos, "block larger than the format allows")
    if codec == CODEC_NONE:
        return bytes(payload)
    if codec != CODEC_LZ4:
        raise CorruptSnapshotError(path, pos, f"unknown codec {codec}")
    try:
        return lz4.block.decompress(payload, uncompressed_size=raw_len)  # type: ignore[no-any-return]
    except lz4.block.LZ4BlockError as exc:
        raise CorruptSnapshotError(path, pos, f"lz4: {exc}") from None


def encode_footer(blocks: list[BlockRef], summary: dict[str, Any]) -> bytes:
    index = bytearray()
    for b in blocks:
        fk, lk = b.first_key.encode(), b.last_key.encode()
        index += INDEX_ENTRY.pack(b.position, b.payload_len, b.entries, len(fk), len(lk))
        index += fk + lk
    body = orjson.dumps(summary, option=orjson.OPT_SORT_KEYS)
    return FOOTER_HEAD.pack(FOOTER_MAGIC, len(blocks), len(index), len(body)) + bytes(index) + body


def encode_trailer(footer_pos: int, footer: bytes) -> bytes:
    return TRAILER.pack(footer_pos, len(footer), zlib.crc32(footer), TRAILER_MAGIC)


def decode_footer(buf: bytes | memoryview | mmap.mmap, size: int, path: str
                  ) -> tuple[list[BlockRef], dict[str, Any], int]:
    """Block index, summary and the footer's position, from a whole file's bytes."""
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
    fmagic, count, index_len, summary_len = FOOTER_HEAD.unpack_from(footer, 0)
    if fmagic != FOOTER_MAGIC or FOOTER_HEAD.size + index_len + summary_len != footer_len:
        raise CorruptSnapshotError(path, footer_pos, "malformed footer")
    blocks: list[BlockRef] = []
    pos = FOOTER_HEAD.size
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
