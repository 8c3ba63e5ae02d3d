"""Reading segments: sealed ones through their footer index, active ones by scanning.

Invariants:
- Every block's CRC is checked before its payload is used; a mismatch in a sealed segment
  raises :class:`CorruptSegmentError` naming the file, byte position and first offset.
  Nothing is ever skipped silently.
- :func:`recover_active` is the only function that truncates: it cuts an *active* segment at
  the first invalid block (a torn tail after a crash), like Kafka's log recovery. The bytes
  cut are re-consumed from Kafka because the resume point moves back with them. Recovery
  checks CRCs only, so it needs no key (an encrypted spool recovers without one).
- A sealed (encrypted) block's payload is used only after its GCM tag verified; a missing
  key or a failed tag raises (:class:`~replicator.errors.KeyNotFoundError`,
  :class:`~replicator.errors.AuthenticationError`), never yields bytes.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from replicator import crypto
from replicator.crypto import INSTALLED, KeyringArg
from replicator.errors import CorruptSegmentError
from replicator.segment import format as fmt
from replicator.segment.format import BlockMeta, Record, SegmentHeader, SegmentSummary

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Outcome of scanning blocks from the header to the end of a file."""

    header: SegmentHeader
    header_len: int
    blocks: list[BlockMeta]
    valid_end: int
    file_size: int
    #: why the scan stopped before ``file_size`` (None if the whole file was valid)
    stop_reason: str | None
    #: valid-looking blocks found after the first invalid one (corruption, not a torn write)
    blocks_after_damage: int


def _scan(buf: bytes | mmap.mmap, path: str, stop_at: int | None = None) -> ScanResult:
    header, pos = SegmentHeader.decode(bytes(buf[: min(len(buf), 1 << 16)]), path)
    size = len(buf) if stop_at is None else stop_at
    header_len = pos
    blocks: list[BlockMeta] = []
    stop_reason: str | None = None
    expected_start = header.base_offset
    while pos < size:
        try:
            meta, crc = fmt.decode_block_header(buf[pos : pos + fmt.BLOCK_HEADER.size], pos)
        except fmt.BlockHeaderError as exc:
            stop_reason = str(exc)
            break
        end = pos + meta.size
        if end > size:
            stop_reason = "incomplete block"
            break
        if (
            fmt.block_crc(
                buf[pos : pos + fmt.BLOCK_HEADER.size], buf[pos + fmt.BLOCK_HEADER.size : end]
            )
            != crc
        ):
            stop_reason = "block checksum mismatch"
            break
        if meta.start != expected_start:
            stop_reason = (
                f"offset discontinuity: block starts at {meta.start}, expected {expected_start}"
            )
            break
        if meta.encrypted != header.encrypted:
            stop_reason = (
                "plain block in an encrypted segment" if header.encrypted
                else "encrypted block in a format 1 segment"
            )
            break
        blocks.append(meta)
        expected_start = meta.end
        pos = end
    after = 0
    if stop_reason is not None:
        after = _count_valid_blocks_after(buf, pos + 1, size)
    return ScanResult(header, header_len, blocks, pos, size, stop_reason, after)


def _count_valid_blocks_after(buf: bytes | mmap.mmap, start: int, size: int) -> int:
    """Count CRC-valid blocks after a damaged position (to tell corruption from a torn tail)."""
    count = 0
    magic = fmt.BLOCK_MAGIC
    find = buf.find
    pos = find(magic, start, size)
    while pos != -1:
        try:
            meta, crc = fmt.decode_block_header(buf[pos : pos + fmt.BLOCK_HEADER.size], pos)
            end = pos + meta.size
            if (
                end <= size
                and fmt.block_crc(
                    buf[pos : pos + fmt.BLOCK_HEADER.size], buf[pos + fmt.BLOCK_HEADER.size : end]
                )
                == crc
            ):
                count += 1
                pos = find(magic, end, size)
                continue
        except fmt.BlockHeaderError:
            pass
        pos = find(magic, pos + 1, size)
    return count


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    """What recovering an active segment found and did."""

    path: Path
    header: SegmentHeader | None
    blocks: list[BlockMeta]
    valid_end: int
    truncated_bytes: int
    reason: str | None
    blocks_after_damage: int

    @property
    def end_offset(self) -> int | None:
        """Coverage end of the valid part (None if even the file header was lost)."""
        if self.header is None:
            return None
        return self.blocks[-1].end if self.blocks else self.header.base_offset


def recover_active(path: Path, *, truncate: bool = True) -> RecoveryResult:
    """Validate an active segment and cut a torn tail (fsync'd), returning what is valid.

    A file too short to hold its header (crash right after creation) yields
    ``header=None``; the caller removes it and starts again from the same base offset.
    """
    size = path.stat().st_size
    if size == 0:
        return RecoveryResult(path, None, [], 0, 0, "empty file", 0)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            scan = _scan(mm, str(path))
        except CorruptSegmentError as exc:
            if (
                size >= fmt.FILE_HEADER.size
                and mm[:8] == fmt.FILE_MAGIC
                and "truncated" not in exc.reason
            ):
                raise
            return RecoveryResult(path, None, [], 0, size, exc.reason, 0)
    cut = scan.file_size - scan.valid_end
    if cut and truncate:
        if scan.blocks_after_damage:
            log.error(
                "active segment damaged before its tail; truncating",
                extra={
                    "path": str(path),
                    "position": scan.valid_end,
                    "bytes": cut,
                    "reason": scan.stop_reason,
                    "valid_blocks_lost": scan.blocks_after_damage,
                },
            )
        else:
            log.warning(
                "torn tail truncated",
                extra={
                    "path": str(path),
                    "position": scan.valid_end,
                    "bytes": cut,
                    "reason": scan.stop_reason,
                },
            )
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, scan.valid_end)
            os.fsync(fd)
        finally:
            os.close(fd)
    return RecoveryResult(
        path,
        scan.header,
        scan.blocks,
        scan.valid_end,
        cut,
        scan.stop_reason,
        scan.blocks_after_damage,
    )


class SegmentReader:
    """Random access to one segment file (sealed or active). Use as a context manager.

    ``expect_sealed`` makes a missing or damaged footer an error (a store segment must be
    sealed); otherwise an unsealed file is scanned and only its valid prefix is readable.
    ``keyring`` opens encrypted (format 2) blocks; by default the process's installed one.
    Opening a file and reading its index need no key; reading an encrypted payload does.
    """

    def __init__(self, path: Path, *, name: str | None = None, expect_sealed: bool = False,
                 keyring: KeyringArg = INSTALLED) -> None:
        self.path = path
        self.name = name or str(path)
        self.keyring = crypto.for_reading(keyring)
        #: encrypted blocks :meth:`verify` could check only by CRC (no keyring at all)
        self.unauthenticated_blocks = 0
        self._file = path.open("rb")
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            if self.file_size == 0:
                raise CorruptSegmentError(self.name, 0, "empty file")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._open(expect_sealed)
        except BaseException:
            self._file.close()
            raise

    def _open(self, expect_sealed: bool) -> None:
        mm = self._mm
        trailer = (
            fmt.decode_trailer(mm[-fmt.TRAILER.size :])
            if self.file_size >= fmt.TRAILER.size
            else None
        )
        self.header, self.header_len = SegmentHeader.decode(
            mm[: min(self.file_size, 1 << 16)], self.name
        )
        self._context = fmt.block_context(self.header.topic, self.header.partition)
        if trailer is not None:
            footer_pos, footer_len, crc = trailer
            footer = mm[footer_pos : footer_pos + footer_len]
            if (
                footer_pos + footer_len + fmt.TRAILER.size != self.file_size
                or len(footer) != footer_len
            ):
                raise CorruptSegmentError(self.name, footer_pos, "footer position out of range")
            import zlib

            if zlib.crc32(footer) != crc:
                raise CorruptSegmentError(self.name, footer_pos, "footer checksum mismatch")
            summary, positions = fmt.decode_footer(footer, self.name, footer_pos)
            blocks: list[BlockMeta] = []
            for i, pos in enumerate(positions):
                # the footer index says what the block covers: name that offset, not a
                # value read from a damaged header
                _, start, end, min_ts, max_ts, records, raw_len = fmt.INDEX_ENTRY.unpack_from(
                    footer, fmt.FOOTER_HEAD.size + i * fmt.INDEX_ENTRY.size
                )
                try:
                    meta, _ = fmt.decode_block_header(mm[pos : pos + fmt.BLOCK_HEADER.size], pos)
                except fmt.BlockHeaderError as exc:
                    raise CorruptSegmentError(self.name, pos, str(exc), start) from exc
                if (meta.start, meta.end, meta.min_ts, meta.max_ts, meta.records, meta.raw_len) != (
                    start,
                    end,
                    min_ts,
                    max_ts,
                    records,
                    raw_len,
                ):
                    raise CorruptSegmentError(
                        self.name, pos, "block header disagrees with the footer index", start
                    )
                blocks.append(meta)
            self.blocks = blocks
            self.summary = summary
            self.sealed = True
            self.data_end = footer_pos
            return
        if expect_sealed:
            scan = _scan(mm, self.name)
            raise CorruptSegmentError(
                self.name,
                scan.valid_end,
                "sealed segment has no valid footer"
                + (f" ({scan.stop_reason})" if scan.stop_reason else ""),
                scan.blocks[-1].end if scan.blocks else None,
            )
        scan = _scan(mm, self.name)
        self.blocks = scan.blocks
        self.summary = fmt.summarize(scan.blocks, self.header.base_offset)
        self.sealed = False
        self.data_end = scan.valid_end

    def close(self) -> None:
        self._mm.close()
        self._file.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stored(self, meta: BlockMeta) -> tuple[bytes, bytes]:
        """Header and stored payload of one block, CRC checked (no key needed)."""
        mm = self._mm
        pos = meta.position
        end = pos + meta.size
        if end > self.data_end:
            raise CorruptSegmentError(self.name, pos, "block extends past the data", meta.start)
        head = mm[pos : pos + fmt.BLOCK_HEADER.size]
        try:
            meta2, crc = fmt.decode_block_header(head, pos)
        except fmt.BlockHeaderError as exc:
            raise CorruptSegmentError(self.name, pos, str(exc), meta.start) from exc
        payload = mm[pos + fmt.BLOCK_HEADER.size : end]
        if fmt.block_crc(head, payload) != crc or meta2 != meta:
            raise CorruptSegmentError(self.name, pos, "block checksum mismatch", meta.start)
        fmt.check_sealing(meta, self.name, self.header.encrypted)
        return head, payload

    def _payload(self, meta: BlockMeta) -> bytes:
        """Checked (CRC; for a sealed block also the GCM tag), uncompressed payload."""
        head, payload = self._stored(meta)
        return fmt.open_payload(meta, head, payload, self.name, keyring=self.keyring,
                                context=self._context)

    def verify(self) -> SegmentSummary:
        """Check every block (checksum, authentication tag, decompression, record framing,
        continuity).

        Without any keyring (``keyring=None``, or none installed) an encrypted block is
        checked by its CRC only -- integrity, not authenticity -- and counted in
        :attr:`unauthenticated_blocks`. With a keyring, a block whose key it lacks raises
        :class:`~replicator.errors.KeyNotFoundError`: data the configured keys cannot read
        is a problem worth knowing about.
        """
        expected = self.header.base_offset
        self.unauthenticated_blocks = 0
        for meta in self.blocks:
            if meta.start != expected:
                raise CorruptSegmentError(
                    self.name,
                    meta.position,
                    f"offset discontinuity: block starts at {meta.start}, expected {expected}",
                    meta.start,
                )
            if meta.encrypted and self.keyring is None:
                self._stored(meta)
                self.unauthenticated_blocks += 1
                expected = meta.end
                continue
            raw = self._payload(meta)
            try:
                n = fmt.check_records(raw, meta.start, meta.end)
            except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
                raise CorruptSegmentError(
                    self.name, meta.position, f"bad record framing: {exc}", meta.start
                ) from exc
            if n != meta.records:
                raise CorruptSegmentError(
                    self.name,
                    meta.position,
                    f"block claims {meta.records} records, holds {n}",
                    meta.start,
                )
            expected = meta.end
        return self.summary

    def block_index_for_offset(self, offset: int) -> int | None:
        """Index of the block whose range ``[start, end)`` contains ``offset`` (binary search)."""
        blocks = self.blocks
        i = bisect.bisect_right([b.start for b in blocks], offset) - 1
        if i >= 0 and blocks[i].start <= offset < blocks[i].end:
            return i
        return None

    def offset_at_time(self, ts_ms: int) -> int | None:
        """First offset of the first block holding a record with timestamp ``>= ts_ms``.

        Uses the block index only (min/max timestamps); records inside that block may still
        be older than ``ts_ms`` — callers filter records, the index only tells where to start.
        """
        for b in self.blocks:
            if b.records and b.max_ts >= ts_ms:
                return b.start
        return None

    def iter_block_payloads(
        self, *, from_offset: int | None = None, to_offset: int | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[BlockMeta, bytes]]:
        """Checked raw payloads of the blocks overlapping ``[from_offset, to_offset)``, in
        offset order or, with ``reverse``, newest block first."""
        if reverse:
            for meta in reversed(self.blocks):
                if to_offset is not None and meta.start >= to_offset:
                    continue
                if from_offset is not None and meta.end <= from_offset:
                    break
                if meta.records:
                    yield meta, self._payload(meta)
            return
        for meta in self.blocks:
            if from_offset is not None and meta.end <= from_offset:
                continue
            if to_offset is not None and meta.start >= to_offset:
                break
            if meta.records == 0:
                continue
            yield meta, self._payload(meta)

    def iter_records(
        self, *, from_offset: int | None = None, to_offset: int | None = None
    ) -> Iterator[Record]:
        """Records with ``from_offset <= offset < to_offset``, in offset order."""
        for _meta, raw in self.iter_block_payloads(from_offset=from_offset, to_offset=to_offset):
            for rec in fmt.iter_records(raw):
                if from_offset is not None and rec.offset < from_offset:
                    continue
                if to_offset is not None and rec.offset >= to_offset:
                    return
                yield rec
