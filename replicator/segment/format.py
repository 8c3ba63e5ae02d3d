"""Byte-level segment format, versions 1 and 2 (specified in docs/FORMAT.md).

Layout of a segment file::

    file header | block | block | ... | [footer | trailer]      (footer+trailer once sealed)

All integers are little-endian. Checksums are CRC-32 (zlib polynomial).

Invariants:
- A block is self-describing: its header carries the covered offset range ``[start, end)``,
  the record count, min/max Kafka timestamp and a CRC over header fields and payload, so a
  reader can validate any block without the footer and an index can always be rebuilt.
- Blocks of a segment cover contiguous ranges: ``block[i+1].start == block[i].end``.
  Offsets *inside* a range that hold no record are gaps Kafka made (transaction markers,
  compaction) or events diverted to quarantine -- never data loss.
- Records keep Kafka's bytes exactly: key, value and header values are stored as received.
- Version 2 is version 1 with every block's payload sealed (AES-256-GCM, after lz4; see
  docs/FORMAT.md §2.5); a file is either all plain (major 1) or all sealed (major 2), and a
  reader refuses a block that disagrees with its file. The CRC covers the stored
  (sealed) bytes, so integrity checks need no key; authenticity is the GCM tag's job,
  whose associated data binds the block header (offsets, timestamps, counts) and the
  partition to the payload.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lz4.block
import orjson

from replicator import crypto
from replicator.crypto import Keyring
from replicator.errors import CorruptSegmentError, UnsupportedVersionError

#: the format of unencrypted files (byte for byte what every version before encryption wrote)
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
#: the format of encrypted files: not readable by a major-1 reader, which must refuse them
FORMAT_MAJOR_ENCRYPTED = 2
SUPPORTED_MAJORS = (FORMAT_MAJOR, FORMAT_MAJOR_ENCRYPTED)

FILE_MAGIC = b"RPLSEG\r\n"
BLOCK_MAGIC = b"RPB1"
FOOTER_MAGIC = b"RPFT"
TRAILER_MAGIC = b"RPLSEGND"

CODEC_NONE = 0
CODEC_LZ4 = 1
FLAG_WATERMARK = 0x01
#: the payload is a sealed blob (key id, nonce, ciphertext, tag); format 2 files only
FLAG_ENCRYPTED = 0x02

#: magic, major, minor, meta_len, crc(major..meta)
FILE_HEADER = struct.Struct("<8sHHII")
#: magic, crc, payload_len, raw_len, count, codec, flags, reserved, start, end, min_ts,
#: max_ts, watermark_ms
BLOCK_HEADER = struct.Struct("<4sIIIIBBHqqqqq")
BLOCK_CRC_FROM = 8  # the CRC covers header bytes [8, 64) followed by the payload
#: offset, timestamp_ms, timestamp_type, key_len, value_len, header_count
RECORD_HEADER = struct.Struct("<qqbiiH")
HEADER_NAME = struct.Struct("<H")
HEADER_VALUE = struct.Struct("<i")
#: magic, entry_count, start, end, min_ts, max_ts, records, watermark_ms, raw_bytes
FOOTER_HEAD = struct.Struct("<4sIqqqqQqQ")
#: block position, start, end, min_ts, max_ts, records, raw_len
INDEX_ENTRY = struct.Struct("<QqqqqII")
#: footer_pos, footer_len, footer_crc, magic
TRAILER = struct.Struct("<QII8s")

MAX_BLOCK_RAW = 64 * 1024 * 1024  # sanity bound used to tell garbage from a header
NO_TS = -1
#: start of the associated data of a sealed segment block (docs/FORMAT.md §2.5)
BLOCK_AAD_PREFIX = b"replicator segment block\x00"


def block_context(topic: str, partition: int) -> bytes:
    """The partition part of a sealed block's associated data: prefix, u16 topic length,
    topic (UTF-8), u32 partition. The block header bytes 8..64 follow it."""
    t = topic.encode()
    return BLOCK_AAD_PREFIX + struct.pack("<H", len(t)) + t + struct.pack("<I", partition)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The file header: which partition the segment belongs to and where it starts."""

    topic: str
    partition: int
    base_offset: int
    created_ms: int
    major: int = FORMAT_MAJOR
    minor: int = FORMAT_MINOR
    #: format 2: id of the key that was active when the file was created (informative: each
    #: block names its own key, which differs after a rotation if blocks were re-written)
    key_id: str | None = None

    @property
    def encrypted(self) -> bool:
        """Every block of the file is sealed (format 2)."""
        return self.major >= FORMAT_MAJOR_ENCRYPTED

    def encode(self) -> bytes:
        meta: dict[str, Any] = {
            "topic": self.topic,
            "partition": self.partition,
            "base_offset": self.base_offset,
            "created_ms": self.created_ms,
            "codec": "lz4",
        }
        if self.encrypted:
            meta["cipher"] = crypto.CIPHER
            meta["key_id"] = self.key_id
        return encode_meta_header(FILE_MAGIC, self.major, self.minor, meta)

    @staticmethod
    def decode(buf: bytes, path: str) -> tuple[SegmentHeader, int]:
        """Decode the header at the start of ``buf``; return it and its encoded length."""
        major, minor, meta, end = decode_meta_header(buf, path, FILE_MAGIC, SUPPORTED_MAJORS,
                                                     CorruptSegmentError)
        if major >= FORMAT_MAJOR_ENCRYPTED and meta.get("cipher") != crypto.CIPHER:
            raise CorruptSegmentError(path, 0, f"unknown cipher {meta.get('cipher')!r} in an "
                                      "encrypted segment's header")
        kid = meta.get("key_id")
        header = SegmentHeader(
            topic=str(meta["topic"]),
            partition=int(meta["partition"]),
            base_offset=int(meta["base_offset"]),
            created_ms=int(meta["created_ms"]),
            major=major,
            minor=minor,
            key_id=None if kid is None else str(kid),
        )
        return header, end


def encode_meta_header(magic: bytes, major: int, minor: int, meta: dict[str, Any]) -> bytes:
    """A file header: ``magic``, format version, and ``meta`` as sorted-key JSON, with a CRC
    over version and meta (docs/FORMAT.md §2.1; snapshot files use the same layout)."""
    body = orjson.dumps(meta, option=orjson.OPT_SORT_KEYS)
    versions = struct.pack("<HHI", major, minor, len(body))
    crc = zlib.crc32(body, zlib.crc32(versions))
    return FILE_HEADER.pack(magic, major, minor, len(body), crc) + body


def decode_meta_header(buf: bytes, path: str, magic: bytes, supported: tuple[int, ...],
                       error: type[CorruptSegmentError]
                       ) -> tuple[int, int, dict[str, Any], int]:
    """(major, minor, meta, encoded length) of the header :func:`encode_meta_header` wrote;
    ``error`` (its ``kind`` names the file) for anything damaged, and
    :class:`UnsupportedVersionError` for a major version not in ``supported``."""
    if len(buf) < FILE_HEADER.size:
        raise error(path, 0, "file shorter than its header")
    got, major, minor, meta_len, crc = FILE_HEADER.unpack_from(buf, 0)
    if got != magic:
        raise error(path, 0, f"not a replicator {error.kind} (bad magic)")
    if major not in supported:
        raise UnsupportedVersionError(path, major, minor, max(supported))
    end = FILE_HEADER.size + meta_len
    if len(buf) < end:
        raise error(path, 0, "truncated file header")
    body = bytes(buf[FILE_HEADER.size : end])
    if zlib.crc32(body, zlib.crc32(struct.pack("<HHI", major, minor, meta_len))) != crc:
        raise error(path, 0, "file header checksum mismatch")
    return major, minor, orjson.loads(body), end


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What a block header (or a footer index entry) says about one block."""

    position: int
    payload_len: int
    raw_len: int
    records: int
    start: int
    end: int
    min_ts: int
    max_ts: int
    watermark_ms: int
    flags: int = 0
    codec: int = CODEC_LZ4

    @property
    def size(self) -> int:
        """Bytes the block occupies in the file, header included."""
        return BLOCK_HEADER.size + self.payload_len

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record exactly as received (bytes untouched)."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True, slots=True)
class SegmentSummary:
    """Aggregate facts of a segment (from its footer, or computed by a scan)."""

    start: int
    end: int
    min_ts: int
    max_ts: int
    records: int
    watermark_ms: int
    raw_bytes: int
    blocks: int


def _encode_headers_uncached(headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    parts: list[bytes] = []
    for name, hval in headers:
        nb = name.encode()
        parts.append(HEADER_NAME.pack(len(nb)))
        parts.append(nb)
        if hval is None:
            parts.append(HEADER_VALUE.pack(-1))
        else:
            parts.append(HEADER_VALUE.pack(len(hval)))
            parts.append(hval)
    return b"".join(parts)


#: Encoded header sections by header tuple. Producers put the same few header sets on every
#: message (ChangePublisher: entity + schema_version), so this turns per-record header
#: encoding into one dict lookup. Bounded: once full, new header sets are encoded uncached.
_HEADER_CACHE: dict[object, bytes] = {}
_HEADER_CACHE_MAX = 1024


def encode_headers(headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    """The header section of a framed record (name length, name, value length, value)*.

    Hot path. ``headers`` as aiokafka delivers them (a tuple of ``(str, bytes)`` tuples) is
    looked up in a small cache; unhashable sequences (lists) are encoded directly. The
    bytes depend only on the headers' contents, so cached and uncached results are equal.
    """
    try:
        hb = _HEADER_CACHE.get(headers)
    except TypeError:  # a list, or a tuple holding an unhashable value
        return _encode_headers_uncached(headers)
    if hb is None:
        hb = _encode_headers_uncached(headers)
        if len(_HEADER_CACHE) < _HEADER_CACHE_MAX:
            _HEADER_CACHE[headers] = hb
    return hb


def encode_record(
    offset: int,
    timestamp: int,
    timestamp_type: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
) -> bytes:
    """Frame one record (see FORMAT.md §Record). Hot path: keep it one join.

    (:meth:`replicator.segment.writer.BlockBuilder.append` frames records the same way
    directly into its buffer.)
    """
    klen = -1 if key is None else len(key)
    vlen = -1 if value is None else len(value)
    head = RECORD_HEADER.pack(offset, timestamp, timestamp_type, klen, vlen, len(headers))
    if not headers:
        return b"".join((head, key or b"", value or b""))
    return b"".join((head, key or b"", value or b"", encode_headers(headers)))


def iter_records(raw: bytes) -> Iterator[Record]:
    """Decode the records of an uncompressed block payload, in order."""
    pos = 0
    n = len(raw)
    unpack = RECORD_HEADER.unpack_from
    rsize = RECORD_HEADER.size
    while pos < n:
        offset, ts, ts_type, klen, vlen, hcount = unpack(raw, pos)
        pos += rsize
        key: bytes | None = None
        if klen >= 0:
            key = raw[pos : pos + klen]
            pos += klen
        value: bytes | None = None
        if vlen >= 0:
            value = raw[pos : pos + vlen]
            pos += vlen
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(hcount):
            header, pos = _decode_header(raw, pos)
            headers.append(header)
        yield Record(offset, ts, ts_type, key, value, tuple(headers))


def iter_values(raw: bytes, start: int = 0) -> Iterator[tuple[int, int, bytes | None]]:
    """``(offset, timestamp, value)`` of the records of an uncompressed block payload with
    ``offset >= start``: the framing is walked without decoding keys or headers (a run of
    records with the same headers, the usual case, is skipped by comparing bytes)."""
    unpack = RECORD_HEADER.unpack_from
    rsize = RECORD_HEADER.size
    name_unpack = HEADER_NAME.unpack_from
    nsize = HEADER_NAME.size
    hval_unpack = HEADER_VALUE.unpack_from
    hsize = HEADER_VALUE.size
    last_hdr = b""
    last_hcount = -1
    pos = 0
    n = len(raw)
    while pos < n:
        off, ts, _tt, klen, vlen, hcount = unpack(raw, pos)
        pos += rsize
        if klen > 0:
            pos += klen
        value: bytes | None = None
        if vlen >= 0:
            value = raw[pos : pos + vlen]
            pos += vlen
        if hcount:
            hl = len(last_hdr)
            if hcount == last_hcount and raw[pos : pos + hl] == last_hdr:
                pos += hl
            else:
                h0 = pos
                for _ in range(hcount):
                    pos += nsize + name_unpack(raw, pos)[0]
                    (vl,) = hval_unpack(raw, pos)
                    pos += hsize + (vl if vl > 0 else 0)
                last_hdr = raw[h0:pos]
                last_hcount = hcount
        if off >= start:
            yield off, ts, value


def check_records(raw: bytes, start: int, end: int) -> int:
    """Walk the framing of an uncompressed block payload without building records; return
    how many it holds. Raises ValueError when a record runs past the payload, a length is
    negative where it may not be, offsets are not increasing inside ``[start, end)``, or a
    header name is not UTF-8. The same checks as decoding every record with
    :func:`iter_records`, several times cheaper (a run of identical header regions, the usual
    case, is checked once)."""
    unpack = RECORD_HEADER.unpack_from
    rsize = RECORD_HEADER.size
    name_unpack = HEADER_NAME.unpack_from
    nsize = HEADER_NAME.size
    hval_unpack = HEADER_VALUE.unpack_from
    hsize = HEADER_VALUE.size
    last_hdr = b""
    last_hcount = -1
    pos = 0
    n = len(raw)
    count = 0
    prev = start - 1
    while pos < n:
        off, _ts, _tt, klen, vlen, hcount = unpack(raw, pos)  # struct.error past the end
        if not prev < off < end:
            raise ValueError(f"record offset {off} out of order or outside [{start}, {end})")
        prev = off
        if klen < -1 or vlen < -1:
            raise ValueError(f"negative length at byte {pos}")
        pos += rsize + max(klen, 0) + max(vlen, 0)
        if hcount:
            hl = len(last_hdr)
            if hcount == last_hcount and raw[pos : pos + hl] == last_hdr:
                pos += hl
            else:
                h0 = pos
                for _ in range(hcount):
                    (nlen,) = name_unpack(raw, pos)
                    raw[pos + nsize : pos + nsize + nlen].decode()
                    pos += nsize + nlen
                    (vl,) = hval_unpack(raw, pos)
                    if vl < -1:
                        raise ValueError(f"negative header length at byte {pos}")
                    pos += hsize + max(vl, 0)
                if pos > n:
                    raise ValueError("headers run past the end of the block")
                last_hdr = raw[h0:pos]
                last_hcount = hcount
        if pos > n:
            raise ValueError("a record runs past the end of the block")
        count += 1
    return count


def _decode_header(raw: bytes, pos: int) -> tuple[tuple[str, bytes | None], int]:
    """One header at ``pos``: ``((name, value), position after it)``."""
    (nlen,) = HEADER_NAME.unpack_from(raw, pos)
    pos += HEADER_NAME.size
    name = raw[pos : pos + nlen].decode()
    pos += nlen
    (hlen,) = HEADER_VALUE.unpack_from(raw, pos)
    pos += HEADER_VALUE.size
    if hlen < 0:
        return (name, None), pos
    return (name, raw[pos : pos + hlen]), pos + hlen


def decode_headers(raw: bytes) -> list[tuple[str, bytes | None]]:
    """The headers of an encoded header region (as :func:`encode_headers` writes it)."""
    out: list[tuple[str, bytes | None]] = []
    pos = 0
    while pos < len(raw):
        header, pos = _decode_header(raw, pos)
        out.append(header)
    return out


def encode_block(
    raw: bytes,
    *,
    records: int,
    start: int,
    end: int,
    min_ts: int,
    max_ts: int,
    watermark_ms: int = 0,
    flags: int = 0,
    compress: bool = True,
    keyring: Keyring | None = None,
    context: bytes = b"",
) -> bytes:
    """Build a whole block (header + payload). CPU-bound; safe to call off the event loop.

    With ``keyring`` the (compressed) payload is sealed with its active key, bound to
    ``context`` (:func:`block_context` of the segment's partition) and the header fields.
    """
    if compress and raw:
        payload = lz4.block.compress(raw, store_size=False)
        codec = CODEC_LZ4
    else:
        payload = raw
        codec = CODEC_NONE
    if keyring is not None:
        flags |= FLAG_ENCRYPTED
    fields = BLOCK_HEADER.pack(
        BLOCK_MAGIC,
        0,
        len(payload) + (crypto.OVERHEAD if keyring is not None else 0),
        len(raw),
        records,
        codec,
        flags,
        0,
        start,
        end,
        min_ts,
        max_ts,
        watermark_ms,
    )
    if keyring is not None:
        payload = keyring.seal(payload, context + fields[BLOCK_CRC_FROM:])
    crc = zlib.crc32(payload, zlib.crc32(memoryview(fields)[BLOCK_CRC_FROM:]))
    out: bytes = BLOCK_MAGIC + struct.pack("<I", crc) + fields[BLOCK_CRC_FROM:] + payload
    return out


class BlockHeaderError(Exception):
    """Internal: the bytes at a position are not a plausible block header."""


def decode_block_header(buf: bytes | memoryview, position: int) -> tuple[BlockMeta, int]:
    """Parse a block header from ``buf`` (which starts at file ``position``).

    Returns the metadata and the stored CRC. Raises :class:`BlockHeaderError` if the bytes
    are not a plausible header (the caller decides: torn tail or corruption).
    """
    if len(buf) < BLOCK_HEADER.size:
        raise BlockHeaderError("short block header")
    (
        magic,
        crc,
        payload_len,
        raw_len,
        count,
        codec,
        flags,
        _r,
        start,
        end,
        min_ts,
        max_ts,
        watermark,
    ) = BLOCK_HEADER.unpack_from(buf, 0)
    if magic != BLOCK_MAGIC:
        raise BlockHeaderError("bad block magic")
    if codec not in (CODEC_NONE, CODEC_LZ4) or raw_len > MAX_BLOCK_RAW or end < start:
        raise BlockHeaderError("implausible block header")
    meta = BlockMeta(
        position, payload_len, raw_len, count, start, end, min_ts, max_ts, watermark, flags, codec
    )
    return meta, crc


def block_crc(header: bytes | memoryview, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(memoryview(header)[BLOCK_CRC_FROM : BLOCK_HEADER.size]))


def check_sealing(meta: BlockMeta, path: str, file_encrypted: bool) -> None:
    """A block must be sealed exactly when its file is (format 2): a plain block in an
    encrypted file would be data nobody authenticated."""
    if meta.encrypted != file_encrypted:
        raise CorruptSegmentError(
            path, meta.position,
            "plain block in an encrypted (format 2) segment" if file_encrypted
            else "encrypted block in a format 1 segment", meta.start)


def open_payload(meta: BlockMeta, header: bytes | memoryview, payload: bytes | memoryview,
                 path: str, *, keyring: Keyring | None, context: bytes) -> bytes:
    """Uncompressed payload of a block whose CRC was already checked: opened (when sealed,
    with ``keyring`` and the partition's :func:`block_context`) and decompressed. Raises
    :class:`~replicator.errors.KeyNotFoundError` or
    :class:`~replicator.errors.AuthenticationError`; never returns unauthenticated bytes
    of a sealed block."""
    if meta.encrypted:
        payload = crypto.open_blob(
            keyring, payload, context + bytes(header[BLOCK_CRC_FROM:BLOCK_HEADER.size]),
            name=path, position=meta.position, offset=meta.start)
    return decompress_payload(meta, payload, path)


def decompress_payload(meta: BlockMeta, payload: bytes | memoryview, path: str) -> bytes:
    """Uncompressed payload of a plain (or already opened) block whose CRC was checked."""
    if meta.codec == CODEC_NONE:
        return bytes(payload)
    try:
        raw: bytes = lz4.block.decompress(payload, uncompressed_size=meta.raw_len)
    except Exception as exc:  # lz4 raises LZ4BlockError; checksum passed, so it is a bug
        raise CorruptSegmentError(path, meta.position, f"lz4: {exc}", meta.start) from exc
    return raw


def encode_footer(blocks: Sequence[BlockMeta], summary: SegmentSummary, footer_pos: int) -> bytes:
    """Footer index + trailer appended when a segment is sealed."""
    head = FOOTER_HEAD.pack(
        FOOTER_MAGIC,
        len(blocks),
        summary.start,
        summary.end,
        summary.min_ts,
        summary.max_ts,
        summary.records,
        summary.watermark_ms,
        summary.raw_bytes,
    )
    entries = b"".join(
        INDEX_ENTRY.pack(b.position, b.start, b.end, b.min_ts, b.max_ts, b.records, b.raw_len)
        for b in blocks
    )
    footer = head + entries
    trailer = TRAILER.pack(footer_pos, len(footer), zlib.crc32(footer), TRAILER_MAGIC)
    return footer + trailer


def decode_trailer(buf: bytes) -> tuple[int, int, int] | None:
    """``(footer_pos, footer_len, footer_crc)`` if ``buf`` ends with a trailer, else None."""
    if len(buf) < TRAILER.size:
        return None
    footer_pos, footer_len, crc, magic = TRAILER.unpack_from(buf, len(buf) - TRAILER.size)
    if magic != TRAILER_MAGIC:
        return None
    return footer_pos, footer_len, crc


def decode_footer(footer: bytes, path: str, footer_pos: int) -> tuple[SegmentSummary, list[int]]:
    """Summary and block positions from a footer whose CRC was checked."""
    (magic, count, start, end, min_ts, max_ts, records, watermark, raw_bytes) = (
        FOOTER_HEAD.unpack_from(footer, 0)
    )
    if magic != FOOTER_MAGIC or len(footer) != FOOTER_HEAD.size + count * INDEX_ENTRY.size:
        raise CorruptSegmentError(path, footer_pos, "malformed footer")
    positions = [
        INDEX_ENTRY.unpack_from(footer, FOOTER_HEAD.size + i * INDEX_ENTRY.size)[0]
        for i in range(count)
    ]
    summary = SegmentSummary(start, end, min_ts, max_ts, records, watermark, raw_bytes, count)
    return summary, positions


def summarize(blocks: Sequence[BlockMeta], base_offset: int) -> SegmentSummary:
    """Aggregate block metadata into a summary (coverage starts at ``base_offset``)."""
    with_records = [b for b in blocks if b.records]
    return SegmentSummary(
        start=blocks[0].start if blocks else base_offset,
        end=blocks[-1].end if blocks else base_offset,
        min_ts=min((b.min_ts for b in with_records), default=NO_TS),
        max_ts=max((b.max_ts for b in with_records), default=NO_TS),
        records=sum(b.records for b in blocks),
        watermark_ms=max((b.watermark_ms for b in blocks), default=0),
        raw_bytes=sum(b.raw_len for b in blocks),
        blocks=len(blocks),
    )
