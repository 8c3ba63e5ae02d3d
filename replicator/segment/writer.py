"""Writing segments: an in-memory block builder (event loop) and the active file (threads).

Division of labour:
- :class:`BlockBuilder` accumulates framed records on the event loop. It does no I/O and
  no compression; ``take()`` hands a :class:`PendingBlock` to the flusher.
- :class:`ActiveSegment` owns one spool file. Its blocking methods (compress + write,
  fsync, seal) run in a worker thread, one call at a time per file.

Invariants:
- The file header is fsync'd (with its directory) when the file is created.
- A block's bytes are written whole with one ``write``; the caller fsyncs before it treats
  the block's records as durable. A crash mid-write leaves a torn tail that
  :func:`replicator.segment.reader.recover_active` cuts.
- Blocks cover contiguous offset ranges; ``PendingBlock.start`` is always the previous
  block's ``end`` (or the segment's base offset).
- A file is encrypted (format 2, every block sealed) or plain (format 1) from its creation
  on: the keyring is chosen once, by :meth:`ActiveSegment.create`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from replicator import crypto
from replicator.crypto import INSTALLED, Keyring, KeyringArg
from replicator.segment import format as fmt
from replicator.segment.format import BlockMeta, SegmentHeader, SegmentSummary
from replicator.segment.reader import RecoveryResult
from replicator.storage.local import fsync_dir, makedirs_durable, write_all


@dataclass(frozen=True, slots=True)
class PendingBlock:
    """A block's uncompressed payload and metadata, ready to be encoded and written."""

    raw: bytes
    records: int
    start: int
    end: int
    min_ts: int
    max_ts: int
    watermark_ms: int = 0
    flags: int = 0


class _Record(Protocol):
    """What :meth:`BlockBuilder.extend` reads of a record (aiokafka's ``ConsumerRecord``)."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def timestamp_type(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


_pack_record_header = fmt.RECORD_HEADER.pack
_encode_headers = fmt.encode_headers
_NO_TS = fmt.NO_TS


class BlockBuilder:
    """Accumulates records of one partition until the flusher takes them as a block.

    ``position`` is the coverage end: the offset after the last record appended or skipped.
    Records are framed straight into one growing buffer (no per-record bytes objects).
    """

    __slots__ = ("_buf", "_count", "_max_ts", "_min_ts", "_start", "position")

    def __init__(self, start: int) -> None:
        self._start = start
        self.position = start
        self._buf = bytearray()
        self._count = 0
        self._min_ts = _NO_TS
        self._max_ts = _NO_TS

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    @property
    def pending_records(self) -> int:
        return self._count

    @property
    def has_pending(self) -> bool:
        """True if records were appended or coverage advanced since the last ``take``."""
        return self.position != self._start

    def append(
        self,
        offset: int,
        timestamp: int,
        timestamp_type: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
    ) -> None:
        """Add one record; offsets must increase. If framing fails (a bad argument) nothing
        is appended. The same bytes as :func:`replicator.segment.format.encode_record`; the
        framing itself lives in :meth:`extend` (the hot path)."""
        self.extend((fmt.Record(offset, timestamp, timestamp_type, key, value,
                                tuple(headers)),))

    def extend(self, records: Sequence[_Record]) -> None:
        """Add several records at once (offsets increasing), framed exactly like
        :func:`replicator.segment.format.encode_record`, in one loop (hot path: ingest frames
        every fetched run of valid records with one call). Records are read by attribute,
        like aiokafka's ``ConsumerRecord``.

        Consecutive records usually carry equal headers (one producer, one entity), so the
        previous record's encoded headers are reused when the headers compare equal. If
        framing fails, the records before the failing one stay appended.
        """
        if not records:
            return
        buf = self._buf
        pack = _pack_record_header
        encode_headers = _encode_headers
        min_ts = self._min_ts
        max_ts = self._max_ts
        last_headers: object = None
        last_encoded = b""
        count = 0
        position = self.position
        mark = len(buf)
        try:
            for r in records:
                offset = r.offset
                timestamp = r.timestamp
                key = r.key
                value = r.value
                headers = r.headers
                if headers:
                    if headers != last_headers:
                        last_encoded = encode_headers(headers)
                        last_headers = headers
                    hb = last_encoded
                else:
                    hb = b""
                mark = len(buf)
                buf += pack(
                    offset,
                    timestamp,
                    r.timestamp_type,
                    -1 if key is None else len(key),
                    -1 if value is None else len(value),
                    len(headers),
                )
                if key:
                    buf += key
                if value:
                    buf += value
                if hb:
                    buf += hb
                count += 1
                if min_ts == _NO_TS or timestamp < min_ts:
                    min_ts = timestamp
                if timestamp > max_ts:
                    max_ts = timestamp
                position = offset + 1
        except BaseException:
            del buf[mark:]  # no partial record: the failing one is not appended at all
            raise
        finally:
            self._count += count
            self._min_ts = min_ts
            self._max_ts = max_ts
            self.position = position

    def skip_to(self, position: int) -> None:
        """Cover offsets up to ``position`` that hold no record (quarantined, Kafka gaps)."""
        if position > self.position:
            self.position = position

    def take(self, watermark_ms: int = 0) -> PendingBlock | None:
        """Hand over what accumulated as one block; ``None`` if nothing did.

        With ``watermark_ms`` and nothing accumulated, returns an empty watermark block.
        """
        if not self.has_pending and not watermark_ms:
            return None
        block = PendingBlock(
            raw=bytes(self._buf),
            records=self._count,
            start=self._start,
            end=self.position,
            min_ts=self._min_ts,
            max_ts=self._max_ts,
            watermark_ms=watermark_ms,
            flags=fmt.FLAG_WATERMARK if watermark_ms and not self._count else 0,
        )
        self._start = self.position
        self._buf = bytearray()
        self._count = 0
        self._min_ts = _NO_TS
        self._max_ts = _NO_TS
        return block


class ActiveSegment:
    """One appendable spool file. Blocking; never call two methods concurrently."""

    def __init__(
        self, path: Path, header: SegmentHeader, blocks: list[BlockMeta], size: int, fd: int,
        keyring: Keyring | None = None,
    ) -> None:
        self.path = path
        self.header = header
        self.blocks = blocks
        self.size = size
        self._fd = fd
        self._keyring = keyring if header.encrypted else None
        self._context = fmt.block_context(header.topic, header.partition)
        self.opened_monotonic = time.monotonic()
        self._dirty = False
        self.last_block = b""

    @classmethod
    def create(cls, path: Path, *, topic: str, partition: int, base_offset: int,
               keyring: KeyringArg = INSTALLED) -> ActiveSegment:
        """A new active segment; encrypted (format 2) when ``keyring`` (by default the
        process's sealing keyring, see :func:`replicator.crypto.sealing`) is given."""
        sealer = crypto.for_writing(keyring)
        makedirs_durable(path.parent)
        header = SegmentHeader(
            topic=topic,
            partition=partition,
            base_offset=base_offset,
            created_ms=int(time.time() * 1000),
            major=fmt.FORMAT_MAJOR if sealer is None else fmt.FORMAT_MAJOR_ENCRYPTED,
            key_id=None if sealer is None else sealer.active,
        )
        data = header.encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        fsync_dir(path.parent)
        return cls(path, header, [], len(data), fd, sealer)

    @classmethod
    def reopen(cls, recovery: RecoveryResult, *, keyring: KeyringArg = INSTALLED
               ) -> ActiveSegment:
        """Continue appending after :func:`recover_active` validated (and cut) the file.

        An encrypted file's new blocks are sealed with ``keyring`` (by default the
        installed one); without one it can still be sealed (footer only) but not appended to.
        """
        assert recovery.header is not None
        fd = os.open(recovery.path, os.O_WRONLY)
        os.lseek(fd, recovery.valid_end, os.SEEK_SET)
        return cls(recovery.path, recovery.header, list(recovery.blocks), recovery.valid_end,
                   fd, crypto.for_reading(keyring))

    @property
    def base_offset(self) -> int:
        return self.header.base_offset

    @property
    def end(self) -> int:
        return self.blocks[-1].end if self.blocks else self.header.base_offset

    @property
    def records(self) -> int:
        return sum(b.records for b in self.blocks)

    def write(self, block: PendingBlock) -> BlockMeta:
        """Encode (lz4 + CRC) and append one block; not yet durable. CPU + I/O: thread."""
        if block.start != self.end:
            raise ValueError(
                f"{self.path}: block starts at {block.start}, segment ends at {self.end}"
            )
        if self.header.encrypted and self._keyring is None:
            raise ValueError(f"{self.path}: an encrypted segment needs a keyring to append to")
        data = fmt.encode_block(
            block.raw,
            records=block.records,
            start=block.start,
            end=block.end,
            min_ts=block.min_ts,
            max_ts=block.max_ts,
            watermark_ms=block.watermark_ms,
            flags=block.flags,
            keyring=self._keyring,
            context=self._context,
        )
        write_all(self._fd, data)
        self.last_block = data  # the spool's tail buffer serves it to live followers
        meta = BlockMeta(
            position=self.size,
            payload_len=len(data) - fmt.BLOCK_HEADER.size,
            raw_len=len(block.raw),
            records=block.records,
            start=block.start,
            end=block.end,
            min_ts=block.min_ts,
            max_ts=block.max_ts,
            watermark_ms=block.watermark_ms,
            flags=data[21],
            codec=data[20],
        )
        self.blocks.append(meta)
        self.size += len(data)
        self._dirty = True
        return meta

    def sync(self) -> None:
        """fsync the file if anything was written since the last sync."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def seal(self) -> SegmentSummary:
        """Append footer + trailer, fsync and close. The file is then immutable."""
        summary = fmt.summarize(self.blocks, self.header.base_offset)
        data = fmt.encode_footer(self.blocks, summary, self.size)
        write_all(self._fd, data)
        os.fsync(self._fd)
        self.size += len(data)
        self.close()
        return summary

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
